"""LoRA adapters on disk: our LoRA checkpoints, PEFT's adapter directories, and the merged model.

Ours (`find_adapters` recognises each; the adapters are the `*_lora` leaves of model/lora.py):
  - a LoRA training run: WORKDIR (its latest step) or WORKDIR/checkpoints/N, whose `params`
    item holds the adapters only and `lora/lora.json` the LoRA settings, the base
    (train.init_from) and its fingerprint;
  - a LoRA directory (what `import_peft` writes): config.json (the base's model), lora.json,
    params/ (the adapters), the base's tokenizer files.
PEFT's (`peft.PeftModel.save_pretrained` of a LoRA on MptForCausalLM): adapter_config.json and
adapter_model.safetensors with keys
`base_model.model.transformer.blocks.{i}.{attn|ffn}.{target}.lora_A.weight` `[r, in]` and
`...lora_B.weight` `[out, r]` (torch's Linear layout; ours are their transposes, stacked over
layers). Only what our LoRA computes is read or written: peft_type LORA, bias "none", no DoRA,
no rsLoRA, no per-module ranks or alphas, no layer subsets, no modules_to_save, no
fan_in_fan_out; anything else is a ConversionError naming the field.

`export_peft` writes PEFT's directory; `export_merged` a plain HF directory of the base with
W + A @ B * scale, tensor by tensor (the base is streamed, never held whole); `import_peft` our
LoRA directory; `load_adapted` the base and adapters for load_pretrained.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mpt_jax import storage
from mpt_jax.convert.convert import (_AtomicDir, _check_params, _copy_tokenizer, _parse_dtype,
                                     _source, check_shard_bytes, plan_import, read_pure,
                                     resolve_checkpoint, tokenizer_dir, write_hf_dir)
from mpt_jax.convert.io import ConversionError, ParamsReader, ParamsWriter, read_tensor
from mpt_jax.convert.table import name_table, set_path
from mpt_jax.model.config import MPTConfig
from mpt_jax.model.lora import SUFFIX, TARGET_PLACES, LoraConfig

LORA_JSON = "lora.json"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.transformer.blocks."


class Adapted(NamedTuple):
    """A LoRA checkpoint of ours or a PEFT adapter directory, resolved."""

    cfg: MPTConfig  # the base's model
    lora: LoraConfig
    base: str  # the base checkpoint's path
    fingerprint: str | None  # the base's, when the run recorded it
    adapters: dict  # pure dict of numpy arrays, our layout
    files_dir: Path  # tokenizer files


def target_shapes(cfg: MPTConfig, target: str, rank: int) -> tuple[tuple, tuple]:
    """Our (A, B) shapes of one target's stacked adapter: [L, in, r], [L, r, out]."""
    d, f, L = cfg.d_model, cfg.ffn_hidden_size, cfg.n_layers
    n_qkv = (cfg.n_heads + 2 * cfg.kv_n_heads) * cfg.head_dim
    d_in, d_out = {"Wqkv": (d, n_qkv), "out_proj": (cfg.n_heads * cfg.head_dim, d),
                   "up_proj": (d, f), "down_proj": (f, d), "gate_proj": (d, f)}[target]
    return (L, d_in, rank), (L, rank, d_out)


def _check_shapes(adapters: dict, cfg: MPTConfig, lora: LoraConfig, where) -> None:
    try:
        lora.check_model(cfg)
    except ValueError as e:
        raise ConversionError(f"{where}: {e}") from None
    for target in lora.targets:
        module = TARGET_PLACES[target][0]
        pair = adapters["blocks"][module][target + SUFFIX]
        for name, want in zip(("a", "b"), target_shapes(cfg, target, lora.rank)):
            if tuple(pair[name].shape) != want:
                raise ConversionError(
                    f"{where}: the {target} adapter's {'A' if name == 'a' else 'B'} has shape "
                    f"{list(pair[name].shape)}, the base model wants {list(want)} (an adapter "
                    "made for another base?)")


# ---------------------------------------------------------------------------------------------
# Finding and reading adapters
# ---------------------------------------------------------------------------------------------
def find_adapters(path: Path, *, base: str | None = None) -> Adapted | None:
    """`path` resolved as a LoRA checkpoint of ours or a PEFT directory; None when it is
    neither (a plain checkpoint). base: a PEFT directory's base (default: its
    base_model_name_or_path when that is a local directory)."""
    path = _source(path)
    if (path / PEFT_CONFIG).is_file():
        return read_peft(path, base=base)
    if not ((path / "params").is_dir() or (path / "checkpoints").is_dir()):
        return None
    ck = resolve_checkpoint(path)
    step_dir = ck.params_dir.parent
    meta_path = next((p for p in (step_dir / "lora" / LORA_JSON, step_dir / LORA_JSON)
                      if p.is_file()), None)
    if meta_path is None:
        return None
    try:
        meta = json.loads(meta_path.read_text())
        lora = LoraConfig.from_dict(meta)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{meta_path}: not a LoRA description ({e})") from None
    reader = ParamsReader(ck.params_dir)
    adapters: dict = {}
    for target in lora.targets:
        module = TARGET_PLACES[target][0]
        for name in ("a", "b"):
            leaf = ("blocks", module, target + SUFFIX, name)
            if leaf not in set(reader.paths):
                raise ConversionError(f"{ck.params_dir}: no {target} adapter ({'.'.join(leaf)})")
            set_path(adapters, leaf, reader.read(leaf))
    _check_shapes(adapters, ck.cfg, lora, ck.params_dir)
    files_dir = tokenizer_dir(path)
    return Adapted(ck.cfg, lora, meta["base"], meta.get("base_fingerprint"), adapters,
                   _source(files_dir))


def _base_config(base: str, where) -> MPTConfig:
    from mpt_jax.convert.pretrained import read_model_config

    if not base or not storage.isdir(base):
        raise ConversionError(f"{where}: its base {base!r} is not a directory (pass --base, "
                              "the base model's checkpoint directory)")
    return read_model_config(base)


def read_peft(src: Path, *, base: str | None = None) -> Adapted:
    """A PEFT LoRA adapter directory, in our layout, checked against its base's shapes."""
    from safetensors.numpy import load

    src = _source(src)
    cfg_path = src / PEFT_CONFIG
    try:
        meta = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{cfg_path}: cannot read ({e})") from None
    if meta.get("peft_type") != "LORA":
        raise ConversionError(f"{cfg_path}: peft_type {meta.get('peft_type')!r}, not LORA")
    unsupported = [(k, meta.get(k)) for k, ok in (
        ("bias", ("none", None)), ("use_dora", (False, None)), ("use_rslora", (False, None)),
        ("fan_in_fan_out", (False, None)), ("modules_to_save", (None, [])),
        ("layers_to_transform", (None, [])), ("rank_pattern", ({}, None)),
        ("alpha_pattern", ({}, None))) if meta.get(k) not in ok]
    if unsupported:
        k, v = unsupported[0]
        raise ConversionError(f"{cfg_path}: {k}={v!r} is not supported (plain LoRA only)")
    targets = meta.get("target_modules")
    if not isinstance(targets, list):
        raise ConversionError(f"{cfg_path}: target_modules {targets!r}: expected a list of "
                              f"module names among {', '.join(TARGET_PLACES)}")
    try:
        lora = LoraConfig(int(meta["r"]), float(meta["lora_alpha"]),
                          float(meta.get("lora_dropout") or 0.0), tuple(targets))
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{cfg_path}: {e}") from None
    base = base or meta.get("base_model_name_or_path") or ""
    cfg = _base_config(base, src)
    weights = src / PEFT_WEIGHTS
    if not weights.is_file():
        raise ConversionError(f"{weights}: file not found (only safetensors adapters are read)")
    with storage.errors(str(weights), "reading"):
        tensors = load(storage.read_bytes(str(weights)))  # (an adapter: megabytes)
    adapters: dict = {}
    used = set()
    for target in lora.targets:
        module = TARGET_PLACES[target][0]
        for name, peft in (("a", "lora_A"), ("b", "lora_B")):
            layers = []
            for i in range(cfg.n_layers):
                key = f"{PEFT_PREFIX}{i}.{module}.{target}.{peft}.weight"
                if key not in tensors:
                    raise ConversionError(f"{weights}: missing key {key!r} (the base has "
                                          f"{cfg.n_layers} layers)")
                layers.append(np.asarray(tensors[key], np.float32).T)
                used.add(key)
            shapes = {a.shape for a in layers}
            if len(shapes) != 1:
                raise ConversionError(f"{weights}: the {target} {peft} tensors differ in shape "
                                      f"across layers ({sorted(shapes)})")
            set_path(adapters, ("blocks", module, target + SUFFIX, name), np.stack(layers))
    extra = sorted(set(tensors) - used)
    if extra:
        raise ConversionError(f"{weights}: unexpected key {extra[0]!r} for target_modules "
                              f"{list(lora.targets)} on a {cfg.n_layers}-layer base")
    _check_shapes(adapters, cfg, lora, weights)
    files_dir = src if (src / "tokenizer.json").is_file() else _source(tokenizer_dir(base))
    base = storage.abspath(base) if storage.is_remote(base) else str(Path(base).resolve())
    return Adapted(cfg, lora, base, None, adapters, files_dir)


def read_adapters(path, cfg: MPTConfig) -> tuple[LoraConfig, dict]:
    """(LoRA settings, adapters) of a PEFT directory or a LoRA checkpoint of ours, for a model
    of config `cfg` (train.lora.adapter: the base is train.init_from)."""
    path = _source(path)
    # (a PEFT directory is read against `cfg`, whatever base it names: the run's base is
    # train.init_from)
    found = (_peft_for_config(path, cfg) if (path / PEFT_CONFIG).is_file() else
             find_adapters(path))
    if found is None:
        raise ConversionError(f"{path}: neither a PEFT adapter directory nor a LoRA run")
    _check_shapes(found.adapters, cfg, found.lora, path)
    return found.lora, found.adapters


def _peft_for_config(path: Path, cfg: MPTConfig) -> Adapted:
    """read_peft against a model config instead of a base directory."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        cfg.to_json_file(Path(d) / "config.json", form="foundry")
        found = read_peft(path, base=d)
    return found._replace(base="")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def export_peft(adapted: Adapted, dst) -> None:
    """PEFT's adapter directory: adapter_config.json, adapter_model.safetensors, and the
    tokenizer files. `peft.PeftModel.from_pretrained(MptForCausalLM.from_pretrained(base),
    dst)` loads it."""
    from safetensors.numpy import save

    lora = adapted.lora
    tensors = {}
    for target in lora.targets:
        module = TARGET_PLACES[target][0]
        pair = adapted.adapters["blocks"][module][target + SUFFIX]
        for i in range(adapted.cfg.n_layers):
            stem = f"{PEFT_PREFIX}{i}.{module}.{target}"
            tensors[f"{stem}.lora_A.weight"] = np.ascontiguousarray(pair["a"][i].T)
            tensors[f"{stem}.lora_B.weight"] = np.ascontiguousarray(pair["b"][i].T)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
              "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
              "target_modules": list(lora.targets), "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
              "rank_pattern": {}, "alpha_pattern": {},
              "base_model_name_or_path": adapted.base}
    with _AtomicDir(_source(dst)) as tmp:
        storage.write_atomic(str(tmp / PEFT_WEIGHTS), save(tensors, metadata={"format": "pt"}))
        _copy_tokenizer(adapted.files_dir, tmp)
        # last: what PEFT opens first, so in a bucket (no rename) it marks the whole
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _base_reader(base: str, cfg: MPTConfig):
    """(read(row, layer) in torch's layout, dtype_of(row)) of the base checkpoint."""
    path = _source(base)
    if (path / "params").is_dir() or (path / "checkpoints").is_dir():
        ck = resolve_checkpoint(path)
        reader = ParamsReader(ck.params_dir)
        _check_params(ck, reader, name_table(ck.cfg))
        return (lambda r, i: reader.read(r.path, i, transpose=r.transpose),
                lambda r: reader.shape_dtype(r.path)[1])
    plan = plan_import(path)

    def read(r, i):
        key = r.torch_key if i is None else r.torch_key.format(i=i)
        return read_tensor(plan.sources[key], key)

    return read, lambda r: plan.dtypes[r.path]


def export_merged(adapted: Adapted, dst, *, dtype: str | None = None,
                  max_shard_bytes: int) -> tuple[str, list[str]]:
    """The base with the adapters merged (W + A @ B * scale, float32 arithmetic, stored in W's
    dtype or `dtype`) as a plain HF directory, written tensor by tensor."""
    check_shard_bytes(max_shard_bytes)
    _check_base(adapted)
    read_base, dtype_of = _base_reader(adapted.base, adapted.cfg)
    by_path = {("blocks", TARGET_PLACES[t][0], t): t for t in adapted.lora.targets}
    scale = np.float32(adapted.lora.scale)

    def read(r, i):
        arr = read_base(r, i)
        target = by_path.get(r.path)
        if target is None:
            return arr
        pair = adapted.adapters["blocks"][r.path[1]][target + SUFFIX]
        delta_oi = (pair["a"][i].astype(np.float32) @ pair["b"][i].astype(np.float32)).T
        return (arr.astype(np.float32) + scale * delta_oi).astype(arr.dtype)

    return write_hf_dir(adapted.cfg, read, dtype_of, adapted.files_dir, _source(dst),
                        dtype=_parse_dtype(dtype), max_shard_bytes=max_shard_bytes,
                        desc="export merged")


def import_peft(src, dst, *, base: str | None = None) -> tuple[LoraConfig, str]:
    """A PEFT adapter directory -> our LoRA directory (config.json of the base's model,
    lora.json naming the base, params/ holding the adapters, the tokenizer files)."""
    adapted = read_peft(_source(src), base=base)
    leaves = {}
    for target in adapted.lora.targets:
        module = TARGET_PLACES[target][0]
        for name in ("a", "b"):
            arr = adapted.adapters["blocks"][module][target + SUFFIX][name]
            leaves[("blocks", module, target + SUFFIX, name)] = (arr.shape, arr.dtype)
    with _AtomicDir(_source(dst)) as tmp:
        writer = ParamsWriter(tmp / "params", leaves, [], [])
        for leaf in leaves:
            node = adapted.adapters
            for k in leaf:
                node = node[k]
            writer.write(leaf, None, node)
        writer.close()
        (tmp / LORA_JSON).write_text(json.dumps(
            {**adapted.lora.to_dict(), "base": adapted.base, "base_fingerprint": None},
            indent=2) + "\n")
        _copy_tokenizer(adapted.files_dir, tmp)
        adapted.cfg.to_json_file(tmp / "config.json", form="foundry")  # last (see _AtomicDir)
    return adapted.lora, adapted.base


# ---------------------------------------------------------------------------------------------
# Loading (load_pretrained)
# ---------------------------------------------------------------------------------------------
def _check_base(adapted: Adapted) -> MPTConfig:
    base_cfg = _base_config(adapted.base, "the LoRA adapters")
    if base_cfg.to_dict("foundry") != adapted.cfg.to_dict("foundry"):
        a, b = base_cfg.to_dict("foundry"), adapted.cfg.to_dict("foundry")
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ConversionError(f"{adapted.base}: the LoRA adapters' base has another model "
                              f"config (keys {diff})")
    return base_cfg


def load_adapted(adapted: Adapted, pd=None, *, merge: bool) -> tuple[MPTConfig, dict,
                                                                    LoraConfig]:
    """(config, params pure dict, LoRA settings): the base read whole (load_pretrained's way)
    with the adapters merged into it, or beside it (merge=False)."""
    from mpt_jax.model import lora as lora_lib

    _check_base(adapted)
    cfg, base = read_pure(_source(adapted.base), pd)
    if adapted.fingerprint is not None:
        fp = lora_lib.fingerprint(base)
        if fp != adapted.fingerprint:
            raise ConversionError(f"{adapted.base}: not the base these LoRA adapters were "
                                  f"trained on (fingerprint {fp}, theirs {adapted.fingerprint})")
    pure = lora_lib.join(adapted.adapters, base)
    return cfg, (lora_lib.merge(pure, adapted.lora) if merge else pure), adapted.lora
