"""Reading the converter's inputs: an HF-layout source (config.json and safetensors headers,
every key and shape checked against the config: `plan_import`, `iter_tensors`) and our
checkpoints (converter directory, trainer step directory or workdir: `resolve_checkpoint`,
`_check_params`, `tokenizer_dir`). See convert.py for the formats."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple
from collections.abc import Iterator

import numpy as np

from mpt_jax import storage
from mpt_jax.convert import quantized as quant_io
from mpt_jax.convert.io import ConversionError, ParamsReader, TensorInfo, read_tensor, scan_source
from mpt_jax.convert.table import Row, name_table
from mpt_jax.model.config import MPTConfig


# ---------------------------------------------------------------------------------------------
# Reading an HF-layout source
# ---------------------------------------------------------------------------------------------
def _source(path) -> Path:
    """A directory to read (HF layout or ours): local, or gs:// / s3:// as an etils.epath.Path
    (pathlib's interface over fsspec): safetensors are read with ranged requests and our
    params through tensorstore's gcs / s3 drivers, never staged on local disk."""
    if storage.is_remote(path):
        from etils import epath

        return epath.Path(str(path))
    return Path(path)


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
    if cfg.quantization is not None:
        raise ConversionError(f"{src / 'config.json'}: records quantization "
                              f"{cfg.quantization!r}, but a safetensors source holds float "
                              "weights (only our checkpoints are quantized)")
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
    quant_io.check_params(ck.cfg, reader, ck.params_dir)
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
