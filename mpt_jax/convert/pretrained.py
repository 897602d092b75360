"""Pretrained weights for finetuning (`train.init_from`): the checkpoint's model config, the
overrides a finetune may make to it, and its parameters read straight into their shards.

    cfg = merge_finetune_config(read_model_config(path), config.model)
    params = load_params_sharded(path, abstract_params, param_shardings)

`path` is an HF-layout directory (config.json + safetensors, sharded with an index or not; HF or
llm-foundry names, Composer's `model.` prefix), one of our converted checkpoints, a trainer
step directory or a trainer workdir (its latest step), as `load_pretrained` reads them.

`load_params_sharded` builds each parameter as a global jax.Array from per-device pieces: for
every distinct shard index among this process's devices it reads only that index's slice of
the tensor (a layer range of a stacked parameter, and the rows and columns the sharding keeps)
and puts it on the devices that hold that index, then assembles them with
`jax.make_array_from_single_device_arrays`. Safetensors tensors are memory-mapped for the slice
and unmapped right after (a shard's pages are read, not the file); our orbax arrays are sliced
by tensorstore, which reads only the chunks that hold the slice. So no process ever holds a
whole model, nor (on a sharded mesh) a whole parameter: the host peak is one shard of one
tensor, cast to the parameter dtype the abstract tree asks for.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mpt_jax import storage
from mpt_jax.convert.convert import (ParamsReader, _check_params, _source, plan_import,
                                     read_source_config, resolve_checkpoint)
from mpt_jax.convert.io import ConversionError, read_tensor
from mpt_jax.convert.table import name_table
from mpt_jax.model.config import TOKEN_ID_KEYS, MPTConfig

# What a finetune may change in the checkpoint's model config (llm-foundry's
# config_overrides in its finetuning yamls change max_seq_len and attn_uses_sequence_id):
# none of these changes a parameter's shape or meaning.
FINETUNE_OVERRIDES = ("max_seq_len", "resid_pdrop", "emb_pdrop", "attn_config.attn_pdrop",
                      "attn_config.attn_uses_sequence_id") + TOKEN_ID_KEYS
# Keys that describe how a model was initialised or run in PyTorch, not what it computes: a
# value in the config that differs from the checkpoint's is ignored (the checkpoint's is kept).
_NOT_THE_MODEL = ("init_config.", "attn_config.attn_impl", "init_device", "use_cache",
                  "model_type", "architectures")


def _is_ours(path: Path) -> bool:
    return (path / "params").is_dir() or (path / "checkpoints").is_dir()


def read_model_config(path) -> MPTConfig:
    """The model config of a checkpoint `path` (any form load_pretrained reads). A native
    transformers config.json is read as native MptForCausalLM computes it (the options it
    ignores are named in a warning)."""
    path = _source(path)
    if not path.is_dir():
        raise ConversionError(f"{path}: not a directory (train.init_from names a checkpoint "
                              "directory, an HF-layout directory or a training workdir)")
    if _is_ours(path):
        return resolve_checkpoint(path).cfg
    cfg, notes = read_source_config(path / "config.json")
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return cfg


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _set_dotted(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        d = d.setdefault(key, {})
    d[last] = value


def merge_finetune_config(ckpt_cfg: MPTConfig, overrides: Mapping | None) -> MPTConfig:
    """The checkpoint's config with the finetune's overrides: `overrides` is the experiment's
    `model` section (a mapping, llm-foundry names, nested attn_config / ffn_config /
    init_config; keys it leaves out, and vocab_size 0, mean the checkpoint's value).

    Only FINETUNE_OVERRIDES may differ (max_seq_len only with ALiBi: learned position
    embeddings have max_seq_len rows); init_config, attn_impl, init_device and use_cache are
    the checkpoint's whatever the config says (they do not change what a loaded model
    computes); any other key that differs is a ValueError naming it and both values. Dtypes are
    train.compute_dtype / train.param_dtype, free to choose: they are not model config keys.
    """
    if ckpt_cfg.quantization is not None:
        raise ValueError(f"the checkpoint's weights are {ckpt_cfg.quantization}-quantized "
                         "(inference only): finetune from the floating-point checkpoint")
    base = ckpt_cfg.to_dict("foundry")
    wanted = copy.deepcopy(base)
    flat_overrides = _flatten(dict(overrides or {}))
    known = set(_flatten(base)) | set(TOKEN_ID_KEYS) | {"ffn_config.ffn_hidden_size",
                                                        "norm_eps", "layer_norm_epsilon"}
    for key, value in flat_overrides.items():
        if key not in known:
            raise ValueError(f"model.{key}: not an MPT config key")
        if key == "vocab_size" and value == 0:  # 0: from the tokenizer, i.e. the checkpoint's
            continue
        if key in ("norm_eps", "layer_norm_epsilon"):  # (one value under two names)
            wanted["norm_eps"] = wanted["layer_norm_epsilon"] = value
            continue
        _set_dotted(wanted, key, value)
    try:
        wanted_flat = _flatten(MPTConfig.from_dict(wanted).to_dict("foundry"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"model config over the checkpoint's: {e}") from None
    base_flat = _flatten(base)
    merged = copy.deepcopy(base)
    for key in sorted(set(base_flat) | set(wanted_flat)):
        old, new = base_flat.get(key), wanted_flat.get(key)
        if old == new or key.startswith(_NOT_THE_MODEL):
            continue
        if key not in FINETUNE_OVERRIDES:
            raise ValueError(
                f"model.{key}={new!r} differs from the checkpoint's {old!r}: a finetune may "
                f"change only {', '.join(FINETUNE_OVERRIDES)} (and the dtypes, train.*)")
        if key == "max_seq_len" and ckpt_cfg.use_wpe:
            raise ValueError(
                f"model.max_seq_len={new!r} differs from the checkpoint's {old!r}, and this "
                "model learns position embeddings (learned_pos_emb without ALiBi) of "
                "max_seq_len rows: it can change only with ALiBi")
        _set_dotted(merged, key, new)
    return MPTConfig.from_dict(merged)


# ---------------------------------------------------------------------------------------------
# Parameters straight into their shards
# ---------------------------------------------------------------------------------------------
def _normalise(index, shape) -> tuple[slice, ...]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def _read_safetensors_slice(info, torch_index) -> np.ndarray:
    """`torch_index` of a safetensors tensor: the pages that hold it are mapped and read, the
    mapping dropped before returning (a copy of just the slice remains). On gs:// / s3:// (no
    mapping) the tensor is read whole with ranged requests and sliced."""
    if storage.is_remote(info.file):
        return np.array(read_tensor(info, str(info.file))[torch_index])
    mapped = np.memmap(info.file, dtype=info.dtype, mode="r", offset=info.start, shape=info.shape)
    piece = np.array(mapped[torch_index])
    del mapped  # (the file is unmapped when its last view goes)
    return piece


class _HFSource:
    def __init__(self, path: Path):
        self.plan = plan_import(path)
        for note in self.plan.notes:
            warnings.warn(note, stacklevel=3)
        self.cfg = self.plan.cfg

    def read(self, row, index: tuple[slice, ...]) -> np.ndarray:
        def one(key, idx):
            info = self.plan.sources[key]
            if row.transpose:  # ours [in, out] is torch's [out, in] transposed
                return _read_safetensors_slice(info, (idx[1], idx[0])).T
            return _read_safetensors_slice(info, idx)

        if not row.stacked:
            return one(row.torch_key, index)
        layers = range(self.cfg.n_layers)[index[0]]
        return np.stack([one(row.torch_key.format(i=i), index[1:]) for i in layers])


class _OurSource:
    def __init__(self, path: Path):
        self.ck = resolve_checkpoint(path)
        self.cfg = self.ck.cfg
        self.reader = ParamsReader(self.ck.params_dir)
        _check_params(self.ck, self.reader, name_table(self.cfg))

    def read(self, row, index: tuple[slice, ...]) -> np.ndarray:
        array = self.reader.array(row.path)
        try:
            return np.asarray(array[index].read().result())
        except ValueError as e:
            raise ConversionError(f"{self.ck.params_dir / '.'.join(row.path)}: cannot read "
                                  f"({e})") from None


def _host_shard(source, row, index, dtype) -> np.ndarray:
    """One device's piece of a parameter, on the host, in the parameter dtype."""
    arr = source.read(row, index)
    return arr if arr.dtype == dtype else arr.astype(dtype)


def _leaves(tree, what: str) -> dict[tuple[str, ...], object]:
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    out = {}
    for key_path, leaf in flat:
        out[tuple(str(getattr(k, "key", k)) for k in key_path)] = leaf
    if not out:
        raise ValueError(f"load_params_sharded: {what} is empty")
    return out


def load_params_sharded(path, abstract_params, shardings):
    """The parameters of checkpoint `path`, each placed directly as `shardings` says.

    abstract_params: the model's pure-dict tree of jax.ShapeDtypeStruct (or arrays) giving
    every parameter's shape and dtype (the dtype to load as: stored values are cast);
    shardings: the same tree of jax.sharding.Sharding. Returns the same tree of global
    jax.Arrays. Raises ConversionError (a ValueError) naming the file or parameter when the
    checkpoint's keys or shapes are not the model's.
    """
    import jax

    path = _source(path)
    read_model_config(path)  # (the same checks and messages for a missing / odd directory)
    source = _OurSource(path) if _is_ours(path) else _HFSource(path)
    rows = {row.path: row for row in name_table(source.cfg)}
    abstract = _leaves(abstract_params, "abstract_params")
    placements = _leaves(shardings, "shardings")
    for name, missing_in in ((set(abstract) - set(rows), "the checkpoint"),
                             (set(rows) - set(abstract), "the model")):
        if name:
            raise ConversionError(f"{path}: parameter {'.'.join(min(name))!r} is not in "
                                  f"{missing_in} ({len(name)} such)")
    if set(placements) != set(abstract):
        raise ValueError("load_params_sharded: shardings and abstract_params are different "
                         "trees")
    out = {}
    for leaf_path, leaf in abstract.items():
        row, sharding = rows[leaf_path], placements[leaf_path]
        shape, dtype = tuple(leaf.shape), np.dtype(leaf.dtype)
        if row.shape != shape:
            raise ConversionError(
                f"{path}: parameter {'.'.join(leaf_path)!r} has shape {list(row.shape)} in the "
                f"checkpoint, the model wants {list(shape)}")
        by_index: dict[tuple, list] = {}
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            idx = _normalise(index, shape)
            by_index.setdefault(tuple((s.start, s.stop, s.step) for s in idx), []).append(
                (device, idx))
        pieces = []
        for placed in by_index.values():
            host = _host_shard(source, row, placed[0][1], dtype)
            pieces += [jax.device_put(host, device) for device, _ in placed]
            del host
        node = out
        for key in leaf_path[:-1]:
            node = node.setdefault(key, {})
        node[leaf_path[-1]] = jax.make_array_from_single_device_arrays(shape, sharding, pieces)
    return out
