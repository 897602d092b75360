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
`nnx.to_pure_dict` tree) and the tokenizer files. `quantize="int8"` (import, `quantize`,
`load_pretrained`) quantizes the float tensors as they stream in (convert/quantized.py); the
config.json of such a checkpoint records `"quantization": "int8"`, and export writes its
dequantized weights. A trainer step directory has items `params`
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

import numpy as np

from mpt_jax import storage
from mpt_jax.model.config import MPTConfig, scale_path
from mpt_jax.convert import quantized as quant_io
from mpt_jax.convert.io import ConversionError, ParamsReader, ParamsWriter, SafetensorsWriter
# (sources' names stay importable from here: pretrained.py, generate.py and tests use them)
from mpt_jax.convert.sources import (OurCheckpoint, Plan, _check_params,  # noqa: F401
                                     _check_source_dir, _source, iter_tensors, plan_import,
                                     read_config, read_source_config, resolve_checkpoint,
                                     tokenizer_dir)
from mpt_jax.convert.table import export_form, model_shapes, name_table, set_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

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


def _write_params(directory: Path, cfg: MPTConfig, tensors, float_dtype_of, np_dtype,
                  total: int, desc: str) -> None:
    """Our params/ for the model of `cfg` from (float row, layer, torch-layout tensor) items,
    quantized as they come when cfg is (quant_io.stream)."""
    rows = name_table(cfg)
    dtypes = quant_io.leaf_dtypes(cfg, lambda p: np_dtype or float_dtype_of(p))
    writer = ParamsWriter(directory, {r.path: (r.shape, dtypes[r.path]) for r in rows},
                          [r.path for r in rows if r.stacked],
                          [r.path for r in rows if r.transpose])
    with _progress(total, desc) as bar:
        for path, i, arr, _ in quant_io.stream(cfg, tensors, np_dtype):
            writer.write(path, i, arr)  # (torch's layout, as the writer takes it)
            bar.update(arr.nbytes)
    writer.close()


def import_checkpoint(src, dst, *, dtype: str | None = None,
                      quantize: str | None = None) -> tuple[MPTConfig, list[str]]:
    """HF / llm-foundry safetensors directory -> our checkpoint directory (streaming), its
    matrices quantized when `quantize` ("int8") is given. Returns the config written and
    notes on how config.json was read (read_source_config)."""
    src, dst = _source(src), _source(dst)
    np_dtype = _parse_dtype(dtype)
    quant_io.check_mode(quantize)
    plan = plan_import(src)
    cfg = plan.cfg.replace(quantization=quantize)
    total = sum(plan.sources[k].nbytes for r in plan.rows for k in r.keys(plan.cfg.n_layers))
    with _AtomicDir(dst) as tmp:
        _write_params(tmp / "params", cfg, iter_tensors(plan), plan.dtypes.__getitem__,
                      np_dtype, total, f"import {src.name}")
        _copy_tokenizer(src, tmp)
        cfg.to_json_file(tmp / "config.json", form="foundry")  # last: a bucket's "complete"
    return cfg, plan.notes


def quantize_checkpoint(src, dst, *, quantize: str = "int8") -> MPTConfig:
    """Any checkpoint `load_pretrained` reads (HF-layout or ours, float) -> our checkpoint
    with its matrices quantized (streaming, one tensor at a time). Returns its config."""
    src, dst = _source(src), _source(dst)
    quant_io.check_mode(quantize)
    _check_source_dir(src)
    if not ((src / "params").is_dir() or (src / "checkpoints").is_dir()):
        return import_checkpoint(src, dst, quantize=quantize)[0]
    ck = resolve_checkpoint(src)
    if ck.cfg.quantization is not None:
        raise ConversionError(f"{src}: already quantized ({ck.cfg.quantization})")
    rows = name_table(ck.cfg)
    reader = ParamsReader(ck.params_dir)
    _check_params(ck, reader, rows)
    n = ck.cfg.n_layers

    def tensors():  # in torch's layout, one layer at a time
        for r in rows:
            for i in (range(n) if r.stacked else [None]):
                yield r, i, reader.read(r.path, i, transpose=r.transpose)

    cfg = ck.cfg.replace(quantization=quantize)
    total = sum(int(np.prod(r.shape)) * reader.shape_dtype(r.path)[1].itemsize for r in rows)
    with _AtomicDir(dst) as tmp:
        _write_params(tmp / "params", cfg, tensors(), lambda p: reader.shape_dtype(p)[1], None,
                      total, f"quantize {src.name}")
        _copy_tokenizer(ck.files_dir, tmp)
        cfg.to_json_file(tmp / "config.json", form="foundry")  # last: a bucket's "complete"
    return cfg


def export_checkpoint(src, dst, *, dtype: str | None = None,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> tuple[str, list[str]]:
    """Our checkpoint (or a trainer's) -> HF-layout safetensors shards + index (streaming).
    Returns the config form written and, for 'foundry', why native MPT could not be used.
    A quantized checkpoint exports its dequantized weights (`q * scale`), in `dtype` or its
    float parameters' dtype."""
    src, dst = _source(src), _source(dst)
    np_dtype = _parse_dtype(dtype)
    check_shard_bytes(max_shard_bytes)
    _check_source_dir(src)
    ck = resolve_checkpoint(src)
    reader = ParamsReader(ck.params_dir)
    rows = name_table(ck.cfg)
    _check_params(ck, reader, rows)
    scale_rows = {r.path: r for r in rows if r.kind == "scale"}
    float_dt = reader.shape_dtype(("norm_f", "weight"))[1]

    def dtype_of(r):
        return float_dt if r.kind == "int8" else reader.shape_dtype(r.path)[1]

    def read(r, i):
        if r.kind == "int8":
            return quant_io.dequantized(reader, r, scale_rows[scale_path(r.path)], i,
                                        np_dtype or float_dt)
        return reader.read(r.path, i, transpose=r.transpose)

    return write_hf_dir(ck.cfg, read, dtype_of, ck.files_dir, dst, dtype=np_dtype,
                        max_shard_bytes=max_shard_bytes, desc=f"export {src.name}")


def check_shard_bytes(max_shard_bytes) -> None:
    if not (max_shard_bytes > 0):  # (also refuses NaN)
        raise ConversionError(f"--max_shard_size must be a positive number of GB, got "
                              f"{max_shard_bytes / 1e9:g}")


def write_hf_dir(cfg: MPTConfig, read, dtype_of, files_dir: Path, dst: Path, *, dtype=None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, desc: str = "export"
                 ) -> tuple[str, list[str]]:
    """An HF-layout directory (safetensors shards, index, config.json, tokenizer files from
    `files_dir`) written tensor by tensor: read(row, layer or None) gives each tensor in
    torch's layout, dtype_of(row) its stored dtype (`dtype` overrides); an int8 row's read
    gives it dequantized (its scales are no tensor of their own there). Atomic."""
    rows = [r for r in name_table(cfg) if r.kind != "scale"]
    form, problems = export_form(cfg)

    # tensors in torch order: wte, (wpe), blocks.0.*, ..., norm_f, (lm_head)
    items = []  # (torch key, row, layer)
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
        dt = dtype or dtype_of(r)
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
        with _progress(total, desc) as bar:
            for fname, shard in zip(names, shards):
                w = SafetensorsWriter(tmp / fname, [(k, dt, s) for k, _, _, dt, s in shard])
                for key, r, i, dt, _ in shard:
                    arr = read(r, i)
                    w.write(key, arr if arr.dtype == dt else arr.astype(dt))
                    weight_map[key] = fname
                    bar.update(arr.size * dt.itemsize)
                w.close()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = cfg.replace(quantization=None).to_dict(form)
        if form == "foundry":
            config["auto_map"] = {"AutoConfig": "configuration_mpt.MPTConfig",
                                  "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"}
        torch_dtype = {"bfloat16": "bfloat16", "float16": "float16"}.get(
            entries[0][3].name, "float32")
        config["torch_dtype"] = torch_dtype
        _copy_tokenizer(files_dir, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return form, problems


# ---------------------------------------------------------------------------------------------
# load_pretrained
# ---------------------------------------------------------------------------------------------
def load_pretrained(path, dtype=None, *, param_dtype=None, quantize: str | None = None,
                    merge_lora: bool = True, **model_kwargs):
    """Loads an HF-layout directory (config.json + safetensors, sharded or not, HF or
    llm-foundry names, `model.` prefix), our converter's directory, a trainer step directory or
    a trainer workdir (latest step). `dtype` is the compute dtype (float32 when None); float
    params keep their stored dtype unless `param_dtype` is given. Nothing is randomly
    initialised.

    quantize: "int8" quantizes the matrices as they are read, one tensor at a time (the float
    model is never held whole; model/quant.py has the format). A checkpoint saved quantized
    loads as it is stored (quantize None or its own mode).

    A LoRA run (workdir or step directory), a LoRA directory of ours (`convert_torch.py
    import` of a PEFT adapter) or a PEFT adapter directory whose base is a local directory
    loads as its base with the adapters: merged into the weights (merge_lora=True) or applied
    at run time beside them (False: the model carries the adapters, model/lora.py). The base's
    fingerprint is checked where the run recorded one."""
    from mpt_jax.convert import lora as lora_io

    quant_io.check_mode(quantize)
    path = _source(path)
    _check_source_dir(path)
    pd = _numpy_dtype(param_dtype)
    adapted = lora_io.find_adapters(path)
    if adapted is None:
        cfg, pure = read_pure(path, pd, quantize)
        return model_from_pure_dict(cfg, pure, dtype, **model_kwargs)
    if quantize is not None:
        raise ConversionError(f"{path} is a LoRA run or adapter: quantize its merged weights "
                              "(convert_torch.py export --merge_lora, then quantize)")
    cfg, pure, lora_cfg = lora_io.load_adapted(adapted, pd, merge=merge_lora)
    if not merge_lora:
        model_kwargs["lora"] = lora_cfg
    return model_from_pure_dict(cfg, pure, dtype, **model_kwargs)


def _numpy_dtype(param_dtype):
    if param_dtype is None:
        return None
    import jax.numpy as jnp

    return np.dtype(jnp.dtype(param_dtype))


def read_pure(path: Path, pd=None, quantize: str | None = None) -> tuple[MPTConfig, dict]:
    """(config, the model's params pure dict of numpy arrays) of a checkpoint in any form
    load_pretrained reads (not a LoRA one), float leaves cast to `pd` when given, matrices
    quantized as they stream in for `quantize`."""
    pure: dict = {}
    if (path / "params").is_dir() or (path / "checkpoints").is_dir():
        ck = resolve_checkpoint(path)
        rows = name_table(ck.cfg)
        reader = ParamsReader(ck.params_dir)
        _check_params(ck, reader, rows)
        stored = ck.cfg.quantization
        if stored is not None and quantize not in (None, stored):
            raise ConversionError(f"{path}: stored quantized as {stored}; it cannot load as "
                                  f"{quantize}")
        if stored is not None or quantize is None:  # every leaf as stored
            for r in rows:
                arr = reader.read(r.path)
                set_path(pure, r.path, arr if pd is None or r.kind != "float" else arr.astype(pd))
            return ck.cfg, pure
        cfg = ck.cfg.replace(quantization=quantize)
        layers = range(ck.cfg.n_layers)
        tensors = ((r, i, reader.read(r.path, i, transpose=r.transpose))  # torch's layout
                   for r in rows for i in (layers if r.stacked else [None]))
    else:
        plan = plan_import(path)
        cfg = plan.cfg.replace(quantization=quantize)
        for note in plan.notes:
            warnings.warn(note, stacklevel=3)
        tensors = iter_tensors(plan)
    shapes = model_shapes(cfg)
    stacks = {}
    for leaf, i, arr, transpose in quant_io.stream(cfg, tensors, pd):
        arr = arr.T if transpose else arr
        if i is None:
            set_path(pure, leaf, arr)
        else:
            if leaf not in stacks:
                stacks[leaf] = np.empty(shapes[leaf], arr.dtype)
            stacks[leaf][i] = arr
    for leaf, arr in stacks.items():
        set_path(pure, leaf, arr)
    return cfg, pure


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
    imp = sub.add_parser("import", help="HF/llm-foundry safetensors dir -> our checkpoint dir; "
                         "a PEFT adapter dir -> our LoRA dir")
    exp = sub.add_parser("export", help="our (or a trainer's) checkpoint -> HF safetensors dir "
                         "(a quantized checkpoint: its dequantized weights); a LoRA run -> PEFT "
                         "adapter dir (or --merge_lora)")
    qnt = sub.add_parser("quantize", help="any float checkpoint (HF or ours) -> our checkpoint "
                         "with int8 weights")
    for s in (imp, exp, qnt):
        s.add_argument("src")
        s.add_argument("dst")
    for s in (imp, exp):
        s.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="dtype to store (default: as stored in SRC)")
    for s in (imp, qnt):
        s.add_argument("--quantize", default="none" if s is imp else "int8",
                       help="weight quantization: none or int8 (weight-only, per output "
                            f"channel; default {'none' if s is imp else 'int8'})")
    exp.add_argument("--max_shard_size", type=float, default=5.0,
                     help="largest safetensors shard, in GB (default 5)")
    exp.add_argument("--merge_lora", action="store_true",
                     help="a LoRA run: write its base with the adapters merged, a plain HF "
                          "directory (default: PEFT's adapter directory)")
    imp.add_argument("--base", default=None,
                     help="SRC a PEFT adapter directory: the base it adapts (default: its "
                          "adapter_config.json's base_model_name_or_path, if a local directory)")
    args = p.parse_args(argv)
    try:
        with _interruptible():
            return _run(args)
    except KeyboardInterrupt:  # (the partial destination is already gone: _AtomicDir)
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _interruptible():
    """SIGTERM as Ctrl-C while converting, so that a killed conversion (a scheduler's
    preemption, `kill`) removes its partial destination as an interrupted one does. Only on
    the main thread, where Python can install handlers."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
    try:
        mode = None if getattr(args, "quantize", "none") == "none" else args.quantize
        if args.cmd == "import" and storage.isfile(storage.join(args.src,
                                                                 "adapter_config.json")):
            from mpt_jax.convert import lora as lora_io

            if mode is not None:
                raise ConversionError(f"{args.src} is a PEFT adapter: --quantize applies to "
                                      "base weights (import or quantize the base)")
            lora_cfg, base = lora_io.import_peft(args.src, args.dst, base=args.base)
            print(f"imported the PEFT adapter {args.src} -> {args.dst} (LoRA rank "
                  f"{lora_cfg.rank} on {', '.join(lora_cfg.targets)}; base {base})")
        elif args.cmd == "import":
            cfg, notes = import_checkpoint(args.src, args.dst, dtype=args.dtype, quantize=mode)
            print(f"imported {args.src} -> {args.dst} ({cfg.num_params():,} parameters"
                  f"{', ' + mode if mode else ''})")
            for note in notes:
                print(f"note: {note}")
        elif args.cmd == "quantize":
            if mode is None:
                raise ConversionError("quantize --quantize none: nothing to do (supported: int8)")
            cfg = quantize_checkpoint(args.src, args.dst, quantize=mode)
            print(f"quantized {args.src} -> {args.dst} ({cfg.num_params():,} parameters, {mode})")
        else:
            if not args.max_shard_size > 0:  # (NaN too)
                raise ConversionError(f"--max_shard_size must be a positive number of GB, got "
                                      f"{args.max_shard_size:g}")
            from mpt_jax.convert import lora as lora_io

            src = _source(args.src)
            adapted = lora_io.find_adapters(src) if src.is_dir() else None
            if adapted is not None and not args.merge_lora:
                lora_io.export_peft(adapted, args.dst)
                print(f"exported the LoRA adapters of {args.src} -> {args.dst} (PEFT; base "
                      f"{adapted.base})")
                return 0
            if args.merge_lora and adapted is None:
                raise ConversionError(f"{args.src}: --merge_lora, but this is no LoRA run or "
                                      "adapter directory")
            max_bytes = int(args.max_shard_size * 1e9)
            if adapted is not None:
                form, problems = lora_io.export_merged(adapted, args.dst, dtype=args.dtype,
                                                       max_shard_bytes=max_bytes)
            else:
                form, problems = export_checkpoint(args.src, args.dst, dtype=args.dtype,
                                                   max_shard_bytes=max_bytes)
            print(f"exported {args.src} -> {args.dst}"
                  + (" (LoRA adapters merged into the base)" if adapted is not None else ""))
            if adapted is None and resolve_checkpoint(src).cfg.quantization:
                print("note: the source is quantized; exported its dequantized weights")
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
