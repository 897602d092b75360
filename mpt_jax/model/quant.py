"""Weight-only int8 quantization and the int8 KV cache.

Format (`MPTConfig.quantization == "int8"`): every matrix (Wqkv, out_proj, up/down/gate_proj,
and the embeddings wte / lm_head) is int8 in torch's `[out, in]` layout with one float32 scale
per output channel, symmetric absmax: `scale = max|w_row| / 127`, `q = round(w / scale)`
(halves away from zero), so `w ~ q * scale` with an error of at most scale / 2 per entry.
Norm weights, biases and learned position embeddings stay floating point. The scale of a
parameter `P` is the sibling parameter `P_scale` (`attn.Wqkv_scale [out]`, `wte_scale [V]`).

The embeddings are quantized too: at batch 1 the tied wte (50432 x 4096) is 6% of MPT-7B's
int8 bytes and is read whole by every step's unembedding, and its per-row scales serve both of
its uses: the row of a token (the embedding gather) and the output channel of the logits
(`h @ wte^T`). Group-wise scales are not offered: at 8 bits the per-channel error is already
below the bf16 activations' rounding for these matrices, and a group's scale cannot be applied
after the matmul (the XLA path would need a dequantized copy or a partial product per group).

Matmuls: `int8_dense` runs `x @ (q * scale)^T` as the Pallas kernel of kernels/int8_gpu.py
(GPU, up to int8_gpu.MAX_ROWS rows: decoding) or as XLA's
`dot(x, q.astype(x.dtype)^T) * scale` (CPU, prefill, large batches). XLA converts the int8
weight to the compute dtype exactly (|q| <= 127); whether it fuses that convert into the GEMM's
operand read or materialises a transient converted copy of the one matrix is XLA's choice (not
measured here; the weights themselves stay int8 in memory either way). qwix and AQT were read
for this: both hand the same dot to XLA (see kernels/int8_gpu.py).

KV cache (`cache_dtype="int8"`): keys and values are int8 with one float32 scale per token and
KV head (absmax over head_dim), `QuantizedKV(values [B, KV, S, D] int8, scales [B, KV, S])`,
quantized when written (this module's jnp path, and inside the decode kernel), dequantized on
read by folding the scales into the scores and the softmax weights. Per token because a row is
quantized once, when it is written, without knowing later rows; per KV head because heads
differ in range. The scales add 4 bytes per head_dim bytes (3% at head_dim 128).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mpt_jax import sharding
from mpt_jax.kernels import int8_gpu
from mpt_jax.model.config import QUANT_MODES, QUANTIZED_MATRICES, scale_path

QMAX = 127
# The int8 kernel's up-projection applies the MLP's exact GELU as its epilogue (one launch
# fewer per layer); a benchmark may switch it off to compare.
GELU_EPILOGUE = True
# The most rows the int8 kernel takes (int8_gpu.MAX_ROWS); 0 sends every int8 matmul to XLA (a
# benchmark's comparison).
KERNEL_ROWS = int8_gpu.MAX_ROWS
CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32", "int8")


# ---------------------------------------------------------------------------------------------
# Command-line values (generate.py and serve.py)
# ---------------------------------------------------------------------------------------------
def parse_quantize(value: str | None) -> str | None:
    """A `--quantize` value -> the weight quantization mode (None = floating point): "none" or
    one of QUANT_MODES. ValueError naming what is supported otherwise."""
    if value is None or value == "none":
        return None
    if value not in QUANT_MODES:
        raise ValueError(f"--quantize {value}: unsupported; supported: none, "
                         f"{', '.join(QUANT_MODES)} (weight-only, per output channel)")
    return value


def parse_cache_dtype(value: str | None):
    """A `--kv_cache` value -> the KV cache dtype for `Generator(cache_dtype=...)`: None for
    "auto" (the model's compute dtype), else a jnp dtype (int8 = the quantized cache).
    ValueError naming the choices otherwise."""
    if value is None or value == "auto":
        return None
    if value not in CACHE_DTYPES:
        raise ValueError(f"--kv_cache {value}: unsupported; choose one of "
                         f"{', '.join(CACHE_DTYPES)}")
    return jnp.dtype(value)


# ---------------------------------------------------------------------------------------------
# Quantizing rows
# ---------------------------------------------------------------------------------------------
def round_half_away(y, xp=jnp):
    """Rounds to the nearest integer, halves away from zero (the rule the kernels use too)."""
    return xp.sign(y) * xp.floor(xp.abs(y) + 0.5)


def quantize_rows(w, xp=jnp):
    """float `[..., n]` -> (int8 `[..., n]`, float32 scales `[...]`): symmetric absmax over the
    last axis. `xp` is jnp (traceable) or np (host arrays). All-zero rows get scale 0."""
    w32 = xp.asarray(w).astype(xp.float32)
    amax = xp.max(xp.abs(w32), axis=-1)
    inv = xp.where(amax > 0, QMAX / xp.where(amax > 0, amax, 1), 0).astype(xp.float32)
    q = xp.clip(round_half_away(w32 * inv[..., None], xp), -QMAX, QMAX).astype(xp.int8)
    return q, (amax / QMAX).astype(xp.float32)


def dequantize_rows(q, scale):
    """(int8 `[..., n]`, scales `[...]`) -> float32 `[..., n]` (tests and export)."""
    return q.astype(jnp.float32) * scale[..., None].astype(jnp.float32)


def linear_params(w_io, logical_axes, mode: str | None):
    """A dense layer's parameters from its float weight `[in, out]`: (the weight Param, its
    scale Param or None). Float: the weight as given. int8: `[out, in]` int8 and float32
    scales `[out]`, the logical axes following the dimensions."""
    if mode is None:
        return nnx.Param(w_io, logical_axes=logical_axes), None
    q, s = quantize_rows(jnp.swapaxes(w_io, -1, -2))
    return (nnx.Param(q, logical_axes=tuple(logical_axes)[::-1]),
            nnx.Param(s, logical_axes=tuple(logical_axes)[1:]))


def embedding_params(w_vd, logical_axes, mode: str | None):
    """An embedding `[V, D]`'s parameters: (Param, scale Param or None); int8 rows keep their
    layout (a row is a token's embedding and an output channel of the unembedding)."""
    if mode is None:
        return nnx.Param(w_vd, logical_axes=logical_axes), None
    q, s = quantize_rows(w_vd)
    return nnx.Param(q, logical_axes=logical_axes), nnx.Param(s, logical_axes=logical_axes[:1])


@functools.partial(jax.jit, static_argnames="layout_io")
def quantize_leaf(w, *, layout_io: bool):
    """One float parameter (`[..., in, out]` when layout_io, else `[..., V, D]` rows) ->
    (int8 in the quantized layout, scales), layer by layer for stacked layers (a float32 copy
    of one layer at a time), on the device w is on."""
    def one(w2):
        return quantize_rows(w2.T if layout_io else w2)

    if w.ndim == 2:
        return one(w)
    return jax.lax.map(one, w)


def quantize_pure_dict(pure: dict) -> dict:
    """A float model's `nnx.to_pure_dict` tree -> the int8 model's (QUANTIZED_MATRICES
    quantized, with their scales; the rest as given). The input tree is not changed."""
    out = jax.tree.map(lambda a: a, pure)  # a copy of the containers (leaves shared)
    for path, layout_io in QUANTIZED_MATRICES.items():
        node = out
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or path[-1] not in node:
            continue
        q, s = quantize_leaf(node[path[-1]], layout_io=layout_io)
        node[path[-1]] = q
        node[scale_path(path)[-1]] = s
    return out


# ---------------------------------------------------------------------------------------------
# Matmuls and the embedding gather
# ---------------------------------------------------------------------------------------------
def int8_dense(x, q, scale, bias, dtype, *, act: Callable | None = None,
               act_name: str | None = None, kernels: bool = False, interpret: bool = False,
               out_axis: str | None = None, out_dtype=None):
    """`act(x @ (q * scale)^T + bias)` for an int8 weight q `[N, K]` and scales `[N]`; x
    `[..., K]` in the compute dtype `dtype`; the result in `out_dtype` (default dtype).

    kernels: the model runs Pallas GPU kernels: up to KERNEL_ROWS rows go through
    kernels/int8_gpu.py (once per shard under a mesh: rows split as "batch", outputs as
    `out_axis`, the contraction gathered), with the exact GELU as its epilogue when act_name is
    "gelu" and GELU_EPILOGUE; otherwise XLA's dot with the scale applied to its float32
    result."""
    out_dtype = jnp.dtype(dtype if out_dtype is None else out_dtype)
    lead, k = x.shape[:-1], x.shape[-1]
    n = q.shape[0]
    rows = int(np.prod(lead)) if lead else 1
    x = x.astype(dtype)
    if kernels and rows <= KERNEL_ROWS and int8_gpu.supported(rows, n, k):
        fuse = act_name == "gelu" and GELU_EPILOGUE
        y_dtype = out_dtype if act is None or fuse else jnp.dtype(dtype)

        def run(x2, q, s, b):
            return int8_gpu.int8_matmul_gpu(x2, q, s, b, gelu=fuse, out_dtype=y_dtype,
                                            interpret=interpret)

        y = sharding.per_shard_logical(
            run, in_axes=(("batch", None), (out_axis, None), (out_axis,), (out_axis,)),
            out_axes=("batch", out_axis))(x.reshape(rows, k), q, scale, bias)
        y = y.reshape(*lead, n)
        if act is not None and not fuse:
            y = act(y)
        return y.astype(out_dtype)
    y = jnp.einsum("...k,nk->...n", x, q.astype(dtype), preferred_element_type=jnp.float32)
    y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    if act is None:
        return y.astype(out_dtype)
    return act(y.astype(dtype)).astype(out_dtype)


def embed_rows(q_vd, scale_v, ids):
    """Rows `ids` of an int8 embedding, dequantized: float32 `[*ids.shape, D]`."""
    return jnp.take(q_vd, ids, axis=0).astype(jnp.float32) * jnp.take(scale_v, ids)[..., None]


# ---------------------------------------------------------------------------------------------
# The int8 KV cache
# ---------------------------------------------------------------------------------------------
class QuantizedKV(NamedTuple):
    """One layer's int8 keys (or values) `[B, KV, S, D]` and their float32 scales `[B, KV, S]`
    (one per token and KV head)."""

    values: jax.Array
    scales: jax.Array


def is_quantized(cache) -> bool:
    return isinstance(cache, QuantizedKV)


def is_int8(dtype) -> bool:
    return dtype is not None and jnp.dtype(dtype) == jnp.int8


def empty_cache(shape, dtype) -> jax.Array | QuantizedKV:
    """Zeros `shape` (`[..., S, D]`) in `dtype`, or a QuantizedKV when dtype is int8."""
    if is_int8(dtype):
        return QuantizedKV(jnp.zeros(shape, jnp.int8), jnp.zeros(shape[:-1], jnp.float32))
    return jnp.zeros(shape, dtype)
