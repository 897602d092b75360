"""What the attention kernels share: the residual names that remat policies save, the packed
qkv layout, the default softmax scale, block fitting, padding, and paired segment ids.

Imports nothing from the package.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl

# checkpoint_name tags on each kernel's forward residuals (output, per-row logsumexp): a remat
# policy that saves these names keeps the backward pass from rerunning the forward kernel.
ATTN_OUT_NAME = "attn_out"
ATTN_LSE_NAME = "attn_lse"


def name_residuals(out, lse):
    """Tags a forward kernel's output and logsumexp with the names above. Without them,
    jax.checkpoint reruns the forward kernel in the backward pass to rebuild the residuals."""
    return checkpoint_name(out, ATTN_OUT_NAME), checkpoint_name(lse, ATTN_LSE_NAME)


def packed_head_dim(qkv_shape, n_heads: int, kv_heads: int) -> int:
    """D of a fused projection `[B, T, (H + 2 KV) * D]`; ValueError naming the numbers if the
    width does not split so."""
    width = qkv_shape[-1]
    if n_heads % kv_heads or width % (n_heads + 2 * kv_heads):
        raise ValueError(f"qkv width {width} is not (H + 2 KV) * D for H={n_heads}, "
                         f"KV={kv_heads}")
    return width // (n_heads + 2 * kv_heads)


def unpack_qkv(qkv, n_heads: int, kv_heads: int):
    """The fused projection `[B, T, (H + 2 KV) * D]` -> q `[B, T, H, D]`, k, v `[B, T, KV, D]`
    (slices: copies, where the packed kernels read it in place)."""
    b, t, _ = qkv.shape
    d = packed_head_dim(qkv.shape, n_heads, kv_heads)
    q, k, v = jnp.split(qkv, [n_heads * d, (n_heads + kv_heads) * d], axis=-1)
    return (q.reshape(b, t, n_heads, d), k.reshape(b, t, kv_heads, d),
            v.reshape(b, t, kv_heads, d))


def softmax_scale(head_dim: int, scale: float | None) -> float:
    """The scale on q.k: `scale`, or 1/sqrt(head_dim) when None."""
    return float(1.0 / math.sqrt(head_dim) if scale is None else scale)


def fit_block(block: int, n: int, minimum: int) -> int:
    """A power-of-two block no larger than needed for length n, and at least `minimum` (the
    smallest tile the backend's dots take: 16 for Triton, 8 for Mosaic TPU)."""
    return max(minimum, min(block, pl.next_power_of_2(n)))


def pad_to(x, axis: int, n: int, value=0):
    """x padded with `value` at the end of `axis` to length n."""
    if x.shape[axis] == n:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def padded_segments(q_segment_ids, kv_segment_ids, tp: int, sp: int):
    """int32 segment ids `[B, T]` / `[B, S]` padded to tp / sp, or (None, None). The padded
    query rows (-1) and key columns (-2) match nothing, not even each other."""
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is None:
        return None, None
    return (pad_to(q_segment_ids.astype(jnp.int32), 1, tp, value=-1),
            pad_to(kv_segment_ids.astype(jnp.int32), 1, sp, value=-2))
