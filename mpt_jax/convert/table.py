"""The HF / llm-foundry <-> mpt_jax name table: one row per parameter of our model, with its
torch key (`transformer.blocks.{i}.attn.Wqkv.weight`, ...), whether it is layer-stacked, whether
it is transposed (torch Linear `[out, in]` vs our `[in, out]`), and our shape, derived from the
config alone (tests check it equals `abstract_model(cfg)`). Also: the config.json form for export.

A quantized config (`cfg.quantization`, model/quant.py) has int8 rows (kind "int8": the matrix
in torch's `[out, in]` layout, so never transposed) and their float32 scales (kind "scale",
torch key the weight's, shape `[out]`); no torch checkpoint holds either: import quantizes the
float tensors, export dequantizes.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mpt_jax.model.config import QUANTIZED_MATRICES, MPTConfig, scale_path

# our path (inside blocks, or top level) -> (torch name, transpose)
_BLOCK_TABLE = {
    ("norm_1", "weight"): ("norm_1.weight", False),
    ("norm_1", "bias"): ("norm_1.bias", False),
    ("norm_2", "weight"): ("norm_2.weight", False),
    ("norm_2", "bias"): ("norm_2.bias", False),
    ("attn", "Wqkv"): ("attn.Wqkv.weight", True),
    ("attn", "Wqkv_bias"): ("attn.Wqkv.bias", False),
    ("attn", "out_proj"): ("attn.out_proj.weight", True),
    ("attn", "out_proj_bias"): ("attn.out_proj.bias", False),
    ("attn", "q_ln", "weight"): ("attn.q_ln.weight", False),
    ("attn", "q_ln", "bias"): ("attn.q_ln.bias", False),
    ("attn", "k_ln", "weight"): ("attn.k_ln.weight", False),
    ("attn", "k_ln", "bias"): ("attn.k_ln.bias", False),
    ("ffn", "up_proj"): ("ffn.up_proj.weight", True),
    ("ffn", "up_proj_bias"): ("ffn.up_proj.bias", False),
    ("ffn", "down_proj"): ("ffn.down_proj.weight", True),
    ("ffn", "down_proj_bias"): ("ffn.down_proj.bias", False),
    ("ffn", "gate_proj"): ("ffn.gate_proj.weight", True),
    ("ffn", "gate_proj_bias"): ("ffn.gate_proj.bias", False),
}
_TOP_TABLE = {
    ("wte",): "transformer.wte.weight",
    ("wpe",): "transformer.wpe.weight",
    ("norm_f", "weight"): "transformer.norm_f.weight",
    ("norm_f", "bias"): "transformer.norm_f.bias",
    ("lm_head",): "lm_head.weight",
}


class Row(NamedTuple):
    path: tuple[str, ...]  # our pure-dict path
    torch_key: str  # with "{i}" for the layer index when stacked
    stacked: bool
    transpose: bool
    shape: tuple[int, ...]  # ours (with the leading layers axis when stacked)
    kind: str = "float"  # "float", or in a quantized model "int8" / "scale" (of an int8 row)

    def torch_shape(self) -> tuple[int, ...]:
        s = self.shape[1:] if self.stacked else self.shape
        return tuple(reversed(s)) if self.transpose else tuple(s)

    def keys(self, n_layers: int) -> list[str]:
        if not self.stacked:
            return [self.torch_key]
        return [self.torch_key.format(i=i) for i in range(n_layers)]


def model_shapes(cfg: MPTConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our pure-dict paths and shapes, from the config (no jax import: the converter starts
    fast). tests/convert_test.py checks this equals `abstract_model(cfg)` for every option."""
    d, f, v, L = cfg.d_model, cfg.ffn_hidden_size, cfg.vocab_size, cfg.n_layers
    h, kv, hd = cfg.n_heads, cfg.kv_n_heads, cfg.head_dim
    bias = not cfg.no_bias
    norm_bias = bias and not cfg.norm_type.endswith("rmsnorm")
    out: dict[tuple[str, ...], tuple[int, ...]] = {("wte",): (v, d)}
    if cfg.use_wpe:
        out[("wpe",)] = (cfg.max_seq_len, d)

    def norm(prefix, dim, stacked):
        lead = (L,) if stacked else ()
        out[prefix + ("weight",)] = lead + (dim,)
        if norm_bias:
            out[prefix + ("bias",)] = lead + (dim,)

    n_qkv = (h + 2 * kv) * hd
    blocks = {("attn", "Wqkv"): (d, n_qkv), ("attn", "out_proj"): (h * hd, d),
              ("ffn", "up_proj"): (d, f), ("ffn", "down_proj"): (f, d)}
    if bias:
        blocks.update({("attn", "Wqkv_bias"): (n_qkv,), ("attn", "out_proj_bias"): (d,),
                       ("ffn", "up_proj_bias"): (f,), ("ffn", "down_proj_bias"): (d,)})
    if cfg.ffn_config.ffn_type == "mptglu":
        blocks[("ffn", "gate_proj")] = (d, f)
        if bias:
            blocks[("ffn", "gate_proj_bias")] = (f,)
    for k, s in blocks.items():
        out[("blocks",) + k] = (L,) + s
    norm(("blocks", "norm_1"), d, True)
    norm(("blocks", "norm_2"), d, True)
    if cfg.attn_config.qk_ln:
        norm(("blocks", "attn", "q_ln"), d, True)
        norm(("blocks", "attn", "k_ln"), kv * hd, True)
    elif cfg.attn_config.qk_gn:
        norm(("blocks", "attn", "q_ln"), hd, True)
        norm(("blocks", "attn", "k_ln"), hd, True)
    norm(("norm_f",), d, False)
    if not cfg.tie_word_embeddings:
        out[("lm_head",)] = (v, d)
    if cfg.quantization is not None:
        for path, layout_io in QUANTIZED_MATRICES.items():
            if path in out:
                shape = out[path]
                if layout_io:  # [..., in, out] -> int8 [..., out, in]
                    out[path] = shape[:-2] + (shape[-1], shape[-2])
                out[scale_path(path)] = out[path][:-1]
    return out


def quantized_paths(cfg: MPTConfig) -> dict[tuple[str, ...], tuple[str, ...]]:
    """{path of an int8 parameter: path of its scales} for `cfg` (empty when not quantized)."""
    if cfg.quantization is None:
        return {}
    shapes = model_shapes(cfg)
    return {p: scale_path(p) for p in QUANTIZED_MATRICES if p in shapes}


def name_table(cfg: MPTConfig) -> list[Row]:
    rows = []
    quantized = quantized_paths(cfg)
    scales = {s: p for p, s in quantized.items()}
    for path, shape in model_shapes(cfg).items():
        kind = "int8" if path in quantized else "scale" if path in scales else "float"
        key_path = scales.get(path, path)  # a scale row is named after its weight
        if path[0] == "blocks":
            if key_path[1:] not in _BLOCK_TABLE:
                raise AssertionError(f"no torch name for our parameter {path}")
            name, tr = _BLOCK_TABLE[key_path[1:]]
            rows.append(Row(path, "transformer.blocks.{i}." + name, True,
                            tr and kind == "float", shape, kind))
        else:
            if key_path not in _TOP_TABLE:
                raise AssertionError(f"no torch name for our parameter {path}")
            rows.append(Row(path, _TOP_TABLE[key_path], False, False, shape, kind))
    return rows


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def export_form(cfg: MPTConfig) -> tuple[str, list[str]]:
    """('hf', []) when native MptForCausalLM computes this model, else ('foundry', reasons)."""
    problems = cfg.hf_native_problems()
    return ("foundry" if problems else "hf"), problems


def pure_dict_from_torch(cfg: MPTConfig, tensors: dict[str, np.ndarray]) -> dict:
    """Torch-named tensors (a state_dict as numpy, `model.` prefix allowed) -> our pure dict.
    Exactly the keys of the name table (a tied `lm_head.weight` is ignored)."""
    if tensors and all(k.startswith("model.") for k in tensors):
        tensors = {k[len("model."):]: v for k, v in tensors.items()}
    rows, pure, used = name_table(cfg), {}, set()
    for r in rows:
        keys = r.keys(cfg.n_layers)
        arrs = [np.asarray(tensors[k]) for k in keys]
        for k, a in zip(keys, arrs):
            if a.shape != r.torch_shape():
                raise ValueError(f"{k}: shape {a.shape}, expected {r.torch_shape()}")
        arrs = [a.T if r.transpose else a for a in arrs]
        set_path(pure, r.path, np.stack(arrs) if r.stacked else arrs[0])
        used.update(keys)
    extra = set(tensors) - used - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    if extra:
        raise ValueError(f"unexpected keys {sorted(extra)}")
    return pure
