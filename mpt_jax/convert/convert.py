"""PyTorch (HF / llm-foundry safetensors) <-> our checkpoints: the name table, streaming
import/export with validation, and `load_pretrained`.

Name table (`name_table(cfg)`): one row per parameter of our model, `(our path, torch key,
stacked, transpose)`. Torch keys are `transformer.blocks.{i}.attn.Wqkv.weight` etc. (the names
transformers' native MPT and llm-foundry share); a Composer checkpoint's `model.` prefix is
stripped. Our weights are `[in, out]` (torch's `[out, in]` transposed) and the blocks' parameters
are stacked on a leading layers axis. Every key and shape of the source is checked against the
config before anything is written: missing keys, unexpected keys and wrong shapes are errors.
With tied embeddings a source `lm_head.weight` (a copy of `transformer.wte.weight`) is accepted
and skipped.

Streaming: tensors are read one at a time (`io.read_tensor`) and written as one layer
slice of the stacked array (one layer per zarr chunk), so peak memory is a few tensors, not the
model (measured: ~1.2 GB peak RSS for MPT-7B, see bench/convert.py). Matrices go into
Fortran-order chunks, whose bytes are torch's `[out, in]` tensor as is: no transpose is computed
either way (see `io.ParamsWriter`). Params are stored in the source dtype (`--dtype` to
change). `export` reads our params (or a trainer checkpoint's) layer by layer and writes
safetensors shards of at most `max_shard_bytes` (5 GB by default) plus
`model.safetensors.index.json`.

Export form: when transformers' native `MptForCausalLM` can express the config, config.json is
its `MptConfig` (form 'hf') and `from_pretrained` loads it as is. Otherwise (GQA/MQA, GLU,
biases, qk_ln/qk_gn, logit_scale, untied head, learned positions without ALiBi,
alibi_bias_max != 8, which native MPT ignores, ...) config.json is llm-foundry's remote-code form
(architectures `MPTForCausalLM`, auto_map to configuration_mpt / modeling_mpt): the weights are
the same names, but loading needs llm-foundry's modeling code (`trust_remote_code=True` with its
files beside the weights, or llm-foundry installed). We do not silently write a native config
that would compute something else; the CLI prints a note saying which form was written and why.

Our checkpoint directory: `config.json` (llm-foundry form), `params/` (orbax, the model's
`nnx.to_pure_dict` tree) and the tokenizer files. A trainer step directory has items `params`
and `model_config`; a trainer workdir has `checkpoints/<step>/`.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
import warnings
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from mpt_jax import storage
from mpt_jax.model.config import MPTConfig
from mpt_jax.convert.io import (ConversionError, ParamsReader, ParamsWriter, SafetensorsWriter,
                                TensorInfo, read_tensor, scan_source)
from mpt_jax.convert.table import Row, export_form, name_table, set_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

def _local(path, what: str) -> Path:
    """An import destination as a Path; a gs:// / s3:// one is refused in one line (our params
    are written through tensorstore's file driver and renamed into place)."""
    if storage.is_remote(path):
        raise ConversionError(f"{what} {path}: importing into gs:// or s3:// is not supported "
                              "yet; import into a local directory and upload it")
    return Path(path)


def _source(path) -> Path:
    """A directory to read (HF layout or ours): local, or gs:// / s3:// as an etils.epath.Path
    (pathlib's interface over fsspec): safetensors are read with ranged requests and our
    params through tensorstore's gcs / s3 drivers, never staged on local disk."""
    if storage.is_remote(path):
        from etils import epath

        return epath.Path(str(path))
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Reading an HF-layout source
# ---------------------------------------------------------------------------------------------
def read_config(path: Path) -> MPTConfig:
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    try:
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return MPTConfig.from_dict(raw)
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise ConversionError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None


def read_source_config(path: Path) -> tuple[MPTConfig, list[str]]:
    """config.json of a safetensors source -> (the model its PyTorch class computes, notes).

    A config.json of transformers' own MptForCausalLM (architectures ["MptForCausalLM"] and no
    llm-foundry auto_map) means what native MPT computes from it: options native MPT ignores
    (logit_scale, alibi_bias_max, norm_type, ...) are ignored here too, and named in a note.
    Anything else is llm-foundry's MPTConfig, every option honoured."""
    cfg = read_config(path)
    raw = json.loads(path.read_text())
    if raw.get("auto_map") or "MptForCausalLM" not in (raw.get("architectures") or []):
        return cfg, []
    cfg, ignored = cfg.as_hf_native()
    if not ignored:
        return cfg, []
    return cfg, [f"{path} is transformers' native MptForCausalLM config (no llm-foundry "
                 f"auto_map), which ignores {'; '.join(ignored)}: imported as native MPT "
                 "computes it"]


class Plan(NamedTuple):
    cfg: MPTConfig
    rows: list[Row]
    sources: dict[str, TensorInfo]  # torch key (unprefixed) -> where it is
    dtypes: dict[tuple[str, ...], np.dtype]  # the source dtype per our path
    files: list[Path]
    notes: list[str]  # what the import changed of config.json's literal meaning, and why


def _check_source_dir(src: Path) -> None:
    if not (src.exists() if storage.is_remote(src) else os.path.lexists(src)):
        raise ConversionError(f"{src}: does not exist")
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory")


def plan_import(src: Path) -> Plan:
    """Reads config.json and every safetensors header of `src`; checks keys and shapes."""
    _check_source_dir(src)
    cfg, notes = read_source_config(src / "config.json")
    tensors, files = scan_source(src)
    if tensors and all(k.startswith("model.") for k in tensors):
        tensors = {k[len("model."):]: v for k, v in tensors.items()}
    rows = name_table(cfg)
    expected: dict[str, Row] = {}
    for row in rows:
        for key in row.keys(cfg.n_layers):
            expected[key] = row
    if cfg.tie_word_embeddings and "lm_head.weight" in tensors:
        info = tensors.pop("lm_head.weight")  # the tied copy of wte
        if info.shape != (cfg.vocab_size, cfg.d_model):
            raise ConversionError(f"{info.file}: lm_head.weight has shape {list(info.shape)}, "
                                  f"config.json implies {[cfg.vocab_size, cfg.d_model]}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        info = tensors[unexpected[0]]
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConversionError(f"{info.file}: unexpected key {unexpected[0]!r}{more} for the "
                              f"config in {src / 'config.json'}")
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        where = files[0] if len(files) == 1 else src / "model.safetensors.index.json"
        raise ConversionError(f"{where}: missing key {missing[0]!r}{more}, which "
                              f"{src / 'config.json'} needs")
    dtypes = {}
    for key, row in expected.items():
        info = tensors[key]
        if info.shape != row.torch_shape():
            raise ConversionError(
                f"{info.file}: {key!r} has shape {list(info.shape)}, config.json implies "
                f"{list(row.torch_shape())}")
        if info.dtype.kind != "f" and info.dtype.name != "bfloat16":
            raise ConversionError(f"{info.file}: {key!r} has dtype {info.dtype}, expected float")
        dtypes.setdefault(row.path, info.dtype)
    return Plan(cfg, rows, tensors, dtypes, files, notes)


def iter_tensors(plan: Plan, dtype=None) -> Iterator[tuple[Row, int | None, np.ndarray]]:
    """(row, layer index or None, tensor in torch's layout), in file order (sequential reads)."""
    items = []
    for row in plan.rows:
        for i, key in enumerate(row.keys(plan.cfg.n_layers)):
            items.append((plan.sources[key], key, row, i if row.stacked else None))
    items.sort(key=lambda t: (str(t[0].file), t[0].start))
    for info, key, row, i in items:
        arr = read_tensor(info, key)
        want = np.dtype(dtype) if dtype is not None else plan.dtypes[row.path]
        yield row, i, arr if arr.dtype == want else arr.astype(want)


def _progress(total_bytes: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, file=sys.stderr,
                disable=None, leave=False)


# ---------------------------------------------------------------------------------------------
# import / export
# ---------------------------------------------------------------------------------------------
def _parse_dtype(dtype: str | None):
    if dtype is None:
        return None
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    name = DTYPES.get(dtype, dtype)
    if name not in DTYPES.values():
        raise ConversionError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


class _AtomicDir:
    """Builds a directory beside `dst` and renames it into place only on success. On gs:// /
    s3:// (no rename there) it is written in place, config.json last (what every loader
    opens first): a directory without config.json is an unfinished export; on failure what
    was written is removed."""

    def __init__(self, dst: Path):
        self.dst = dst

    def __enter__(self) -> Path:
        if storage.is_remote(self.dst):
            if storage.exists(str(self.dst)):
                raise ConversionError(f"{self.dst}: destination already exists (one without "
                                      "config.json is an unfinished export: remove it)")
            self.tmp = self.dst
            return self.tmp
        if os.path.lexists(self.dst):
            raise ConversionError(f"{self.dst}: destination already exists")
        parent = self.dst.parent
        if not os.path.lexists(parent):
            raise ConversionError(f"{parent}: destination's parent directory does not exist")
        if not parent.is_dir():
            raise ConversionError(f"{parent}: destination's parent is not a directory")
        # os.mkdir honours the umask (tempfile.mkdtemp would make it 0700, and a serving
        # process of another user could not read the result)
        self.tmp = parent / f".{self.dst.name}.partial-{secrets.token_hex(4)}"
        os.mkdir(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if storage.is_remote(self.dst):
            if exc_type is not None:
                with contextlib.suppress(storage.StorageError):
                    storage.rmtree(str(self.dst))
        elif exc_type is None:
            os.rename(self.tmp, self.dst)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            (dst / name).write_bytes((src / name).read_bytes())
            copied.append(name)
    return copied


def import_checkpoint(src, dst, *, dtype: str | None = None) -> tuple[MPTConfig, list[str]]:
    """HF / llm-foundry safetensors directory -> our checkpoint directory (streaming).
    Returns the config written and notes on how config.json was read (read_source_config)."""
    src, dst = _source(src), _local(dst, "DST")
    np_dtype = _parse_dtype(dtype)
    plan = plan_import(src)
    total = sum(plan.sources[k].nbytes for r in plan.rows for k in r.keys(plan.cfg.n_layers))
    with _AtomicDir(dst) as tmp:
        leaves = {r.path: (r.shape, np_dtype or plan.dtypes[r.path]) for r in plan.rows}
        writer = ParamsWriter(tmp / "params", leaves, [r.path for r in plan.rows if r.stacked],
                              [r.path for r in plan.rows if r.transpose])
        with _progress(total, f"import {src.name}") as bar:
            for row, i, arr in iter_tensors(plan, np_dtype):
                writer.write(row.path, i, arr)
                bar.update(plan.sources[row.keys(plan.cfg.n_layers)[i or 0]].nbytes)
        writer.close()
        plan.cfg.to_json_file(tmp / "config.json", form="foundry")
        _copy_tokenizer(src, tmp)
    return plan.cfg, plan.notes


class OurCheckpoint(NamedTuple):
    cfg: MPTConfig
    params_dir: Path
    files_dir: Path  # where tokenizer files would be


def resolve_checkpoint(path: Path) -> OurCheckpoint:
    """Our converter dir, a trainer step dir (params + model_config) or a trainer workdir.
    Tokenizer files: beside params/ (converter dir, workdir), or a step dir's tokenizer/ item
    (the trainer saves the run's tokenizer.json in every step)."""
    if (path / "checkpoints").is_dir() and not (path / "params").is_dir():
        steps = sorted((int(p.name), p) for p in (path / "checkpoints").iterdir()
                       if p.name.isdigit() and (p / "params").is_dir()
                       and (not storage.is_remote(p)
                            or (p / storage.ORBAX_COMMIT_MARKER).is_file()))
        if not steps:
            raise ConversionError(f"{path / 'checkpoints'}: no finished step directories")
        ck = resolve_checkpoint(steps[-1][1])
        return ck if not (path / "tokenizer.json").is_file() else ck._replace(files_dir=path)
    params = path / "params"
    if not params.is_dir():
        raise ConversionError(f"{path}: not one of our checkpoints (no params/ directory)")
    if (path / "config.json").is_file():
        cfg = read_config(path / "config.json")
    elif (path / "model_config").exists():
        mc = path / "model_config"
        # JsonSave writes model_config/metadata; accept a plain file or a *.json too
        files = [mc] if mc.is_file() else (
            [mc / "metadata"] if (mc / "metadata").is_file() else sorted(mc.glob("*.json")))
        if not files:
            raise ConversionError(f"{mc}: no config file inside")
        cfg = read_config(files[0])
    else:
        raise ConversionError(f"{path}: no config.json or model_config next to params/")
    step_tokenizer = path / "tokenizer"  # a trainer step dir's item
    files_dir = step_tokenizer if (step_tokenizer / "tokenizer.json").is_file() else path
    return OurCheckpoint(cfg, params, files_dir)


def tokenizer_dir(path) -> Path:
    """Where the tokenizer of checkpoint `path` lies: an HF directory or our converter's
    directory itself, a trainer workdir (its tokenizer.json, else its latest step's), a trainer
    step directory's tokenizer/ item."""
    path = _source(path)
    if (path / "params").is_dir() or (path / "checkpoints").is_dir():
        return resolve_checkpoint(path).files_dir
    return path


def _check_params(ck: OurCheckpoint, reader: ParamsReader, rows: list[Row]) -> None:
    ours = {r.path: r for r in rows}
    extra = sorted(set(reader.paths) - set(ours))
    if extra:
        raise ConversionError(f"{ck.params_dir}: unexpected parameter {'.'.join(extra[0])!r} "
                              f"for the config")
    for row in rows:
        if row.path not in set(reader.paths):
            raise ConversionError(f"{ck.params_dir}: missing parameter {'.'.join(row.path)!r}")
        shape, _ = reader.shape_dtype(row.path)
        if shape != row.shape:
            raise ConversionError(f"{ck.params_dir / '.'.join(row.path)}: shape {list(shape)}, "
                                  f"the config implies {list(row.shape)}")


def export_checkpoint(src, dst, *, dtype: str | None = None,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> tuple[str, list[str]]:
    """Our checkpoint (or a trainer's) -> HF-layout safetensors shards + index (streaming).
    Returns the config form written and, for 'foundry', why native MPT could not be used."""
    src, dst = _source(src), _source(dst)
    np_dtype = _parse_dtype(dtype)
    if not (max_shard_bytes > 0):  # (also refuses NaN)
        raise ConversionError(f"--max_shard_size must be a positive number of GB, got "
                              f"{max_shard_bytes / 1e9:g}")
    _check_source_dir(src)
    ck = resolve_checkpoint(src)
    cfg = ck.cfg
    rows = name_table(cfg)
    reader = ParamsReader(ck.params_dir)
    _check_params(ck, reader, rows)
    form, problems = export_form(cfg)

    # tensors in torch order: wte, (wpe), blocks.0.*, ..., norm_f, (lm_head)
    items = []  # (torch key, row, layer, dtype, torch shape)
    top_first = [r for r in rows if not r.stacked and r.path[0] in ("wte", "wpe")]
    top_last = [r for r in rows if not r.stacked and r.path[0] not in ("wte", "wpe")]
    for r in top_first:
        items.append((r.torch_key, r, None))
    for i in range(cfg.n_layers):
        for r in rows:
            if r.stacked:
                items.append((r.torch_key.format(i=i), r, i))
    for r in top_last:
        items.append((r.torch_key, r, None))
    entries = []
    for key, r, i in items:
        dt = np_dtype or reader.shape_dtype(r.path)[1]
        entries.append((key, r, i, dt, r.torch_shape()))

    shards: list[list] = [[]]
    size = 0
    for e in entries:
        nbytes = int(np.prod(e[4])) * e[3].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    n = len(shards)
    names = [f"model-{j + 1:05d}-of-{n:05d}.safetensors" for j in range(n)]
    total = sum(int(np.prod(e[4])) * e[3].itemsize for e in entries)

    with _AtomicDir(dst) as tmp:
        weight_map = {}
        with _progress(total, f"export {src.name}") as bar:
            for fname, shard in zip(names, shards):
                w = SafetensorsWriter(tmp / fname, [(k, dt, s) for k, _, _, dt, s in shard])
                for key, r, i, dt, _ in shard:
                    arr = reader.read(r.path, i, transpose=r.transpose)
                    w.write(key, arr if arr.dtype == dt else arr.astype(dt))
                    weight_map[key] = fname
                    bar.update(arr.size * dt.itemsize)
                w.close()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = cfg.to_dict(form)
        if form == "foundry":
            config["auto_map"] = {"AutoConfig": "configuration_mpt.MPTConfig",
                                  "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"}
        torch_dtype = {"bfloat16": "bfloat16", "float16": "float16"}.get(
            entries[0][3].name, "float32")
        config["torch_dtype"] = torch_dtype
        _copy_tokenizer(ck.files_dir, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return form, problems


# ---------------------------------------------------------------------------------------------
# load_pretrained
# ---------------------------------------------------------------------------------------------
def load_pretrained(path, dtype=None, *, param_dtype=None, **model_kwargs):
    """Loads an HF-layout directory (config.json + safetensors, sharded or not, HF or
    llm-foundry names, `model.` prefix), our converter's directory, a trainer step directory or
    a trainer workdir (latest step). `dtype` is the compute dtype (float32 when None); params
    keep their stored dtype unless `param_dtype` is given. Nothing is randomly initialised."""
    import jax.numpy as jnp

    path = _source(path)
    _check_source_dir(path)
    pd = None if param_dtype is None else np.dtype(jnp.dtype(param_dtype))
    pure: dict = {}
    if (path / "params").is_dir() or (path / "checkpoints").is_dir():
        ck = resolve_checkpoint(path)
        cfg, rows = ck.cfg, name_table(ck.cfg)
        reader = ParamsReader(ck.params_dir)
        _check_params(ck, reader, rows)
        for r in rows:
            arr = reader.read(r.path)
            set_path(pure, r.path, arr if pd is None else arr.astype(pd))
    else:
        plan = plan_import(path)
        cfg = plan.cfg
        for note in plan.notes:
            warnings.warn(note, stacklevel=2)
        stacks = {}
        for row, i, arr in iter_tensors(plan, pd):
            if row.stacked:
                if row.path not in stacks:
                    stacks[row.path] = np.empty(row.shape, arr.dtype)
                stacks[row.path][i] = arr.T if row.transpose else arr
            else:
                set_path(pure, row.path, arr)
        for p, arr in stacks.items():
            set_path(pure, p, arr)
    return model_from_pure_dict(cfg, pure, dtype, **model_kwargs)


def model_from_pure_dict(cfg: MPTConfig, pure: dict, dtype=None, **model_kwargs):
    """An MPTForCausalLM holding `pure` (the `nnx.to_pure_dict` tree; arrays kept as given),
    built from the abstract model: nothing is randomly initialised."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mpt_jax.model import MPTForCausalLM

    dtype = jnp.float32 if dtype is None else dtype
    abstract = nnx.eval_shape(lambda: MPTForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                                     **model_kwargs))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------
# CLI (convert_torch.py)
# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="convert_torch.py",
        description="Convert MPT weights between HF/llm-foundry safetensors and mpt_jax.")
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="HF/llm-foundry safetensors dir -> our checkpoint dir")
    exp = sub.add_parser("export", help="our (or a trainer's) checkpoint -> HF safetensors dir")
    for s in (imp, exp):
        s.add_argument("src")
        s.add_argument("dst")
        s.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="dtype to store (default: as stored in SRC)")
    exp.add_argument("--max_shard_size", type=float, default=5.0,
                     help="largest safetensors shard, in GB (default 5)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "import":
            cfg, notes = import_checkpoint(args.src, args.dst, dtype=args.dtype)
            print(f"imported {args.src} -> {args.dst} ({cfg.num_params():,} parameters)")
            for note in notes:
                print(f"note: {note}")
        else:
            if not args.max_shard_size > 0:  # (NaN too)
                raise ConversionError(f"--max_shard_size must be a positive number of GB, got "
                                      f"{args.max_shard_size:g}")
            form, problems = export_checkpoint(args.src, args.dst, dtype=args.dtype,
                                               max_shard_bytes=int(args.max_shard_size * 1e9))
            print(f"exported {args.src} -> {args.dst}")
            if form == "foundry":
                print("note: transformers' native MptForCausalLM cannot express this config ("
                      + "; ".join(problems) + "); wrote llm-foundry's remote-code config.json "
                      "(load with llm-foundry's modeling code, trust_remote_code=True)")
    except (ConversionError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0
