"""ALiBi (Press et al.) as MPT computes it: per-head slopes and the reference bias.

MPT's slope scheme: n = next power of two >= H; m_i = (i + 1) * alibi_bias_max / n;
slope_i = 2^-m_i; when n != H the list is interleaved (odd indices first) and cut to H.
The bias added to score(i, j), after the softmax scale, is slope_h * (j - i).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def alibi_slopes(n_heads: int, alibi_bias_max: float = 8.0) -> np.ndarray:
    """Per-head slopes, float32 `[H]`, exactly llm-foundry's `gen_slopes`."""
    if n_heads <= 0:
        raise ValueError(f"n_heads must be positive, got {n_heads}")
    n = 2 ** math.ceil(math.log2(n_heads))
    m = np.arange(1, n + 1, dtype=np.float32) * np.float32(alibi_bias_max / n)
    slopes = 1.0 / np.power(np.float32(2.0), m)
    if n != n_heads:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes.astype(np.float32)


def alibi_bias(slopes, q_positions, kv_positions):
    """Reference bias `[H, T, S]` = slope_h * (kv_pos_j - q_pos_i), float32.

    Only the jnp reference attention materialises this; kernels compute it per block.
    """
    slopes = jnp.asarray(slopes, jnp.float32)
    rel_ts = (jnp.asarray(kv_positions)[None, :] - jnp.asarray(q_positions)[:, None]).astype(
        jnp.float32
    )
    return slopes[:, None, None] * rel_ts[None]
