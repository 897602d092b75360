"""Attention entry point: `flash_attention` dispatch and the jnp reference every kernel is tested
against.

Shapes: q `[B, T, H, D]`, k/v `[B, S, KV, D]` with KV dividing H (GQA/MQA: query head h uses KV
head h // (H // KV)). When S > T the queries are the last T positions (bottom-right alignment, as
in flash-attn), so causal masking and ALiBi distances work against a KV cache.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mpt_jax import sharding
from mpt_jax.model import alibi
from mpt_jax.kernels import decode_gpu, flash_gpu, packed_head_dim, unpack_qkv

IMPLS = ("auto", "reference", "pallas_gpu", "pallas_triton", "pallas_tpu")
GPU_IMPLS = ("pallas_gpu", "pallas_triton")


def _check_shapes(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be [B, T, H, D] / [B, S, KV, D]; got {q.shape}, {k.shape}, {v.shape}"
        )
    b, _, h, d = q.shape
    bk, s, kv, dk = k.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    if bk != b or dk != d:
        raise ValueError(f"batch/head_dim of k {k.shape} do not match q {q.shape}")
    if h % kv:
        raise ValueError(f"kv heads ({kv}) must divide query heads ({h})")
    if s < q.shape[1]:
        raise ValueError(f"key length {s} is shorter than query length {q.shape[1]}")


def _check_rows(name: str, x, shape: tuple[int, ...]) -> None:
    """`x` (segment ids, a mask: one entry per batch row and position) must have `shape`."""
    if x is not None and tuple(jnp.shape(x)) != tuple(shape):
        raise ValueError(f"{name} must be {list(shape)} (batch, positions), got "
                         f"{list(jnp.shape(x))}")


def check_cache_index(cache_index, t: int, slots: int) -> None:
    """A Python/numpy int `cache_index` must leave room for `t` new tokens in `slots`. (An
    array index is the caller's to keep in range: the cache update would clamp it and
    overwrite earlier slots.)"""
    if isinstance(cache_index, (int, np.integer)) and not 0 <= cache_index <= slots - t:
        raise ValueError(f"cache_index {int(cache_index)} with {t} new token(s) does not fit "
                         f"a cache of {slots} slots")


def reference_attention(
    q,
    k,
    v,
    *,
    alibi_slopes=None,
    causal: bool = True,
    segment_ids=None,
    kv_segment_ids=None,
    softmax_scale: float | None = None,
    q_positions=None,
    kv_positions=None,
    kv_mask=None,
):
    """Plain jnp attention in float32; the oracle for every kernel.

    segment_ids `[B, T]` (and kv_segment_ids `[B, S]`, defaulting to segment_ids when S == T)
    forbid attention across packed documents. q_positions `[T]` / kv_positions `[S]` default to
    bottom-right alignment. kv_mask `[B, S]` (True = attend) masks padding or unused cache slots.
    Rows with no visible key return zeros.
    """
    _check_shapes(q, k, v)
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    _check_rows("segment_ids", segment_ids, (b, t))
    _check_rows("kv_segment_ids", kv_segment_ids, (b, s))
    _check_rows("kv_mask", kv_mask, (b, s))
    g = h // kvh
    scale = (1.0 / d**0.5) if softmax_scale is None else softmax_scale
    if q_positions is None:
        q_positions = jnp.arange(s - t, s)
    if kv_positions is None:
        kv_positions = jnp.arange(s)

    q_btkgd = q.astype(jnp.float32).reshape(b, t, kvh, g, d)
    logits_bkgts = jnp.einsum(
        "btkgd,bskd->bkgts", q_btkgd, k.astype(jnp.float32), precision="highest"
    ) * jnp.float32(scale)
    if alibi_slopes is not None:
        bias_hts = alibi.alibi_bias(alibi_slopes, q_positions, kv_positions)
        logits_bkgts = logits_bkgts + bias_hts.reshape(kvh, g, t, s)[None]

    mask_bts = jnp.ones((b, t, s), bool)
    if causal:
        mask_bts &= (kv_positions[None, :] <= q_positions[:, None])[None]
    if segment_ids is not None:
        if kv_segment_ids is None:
            if s != t:
                raise ValueError("segment_ids with S != T needs kv_segment_ids")
            kv_segment_ids = segment_ids
        mask_bts &= segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if kv_mask is not None:
        mask_bts &= kv_mask.astype(bool)[:, None, :]
    mask_b11ts = mask_bts[:, None, None]
    logits_bkgts = jnp.where(mask_b11ts, logits_bkgts, -jnp.inf)
    m = jnp.max(logits_bkgts, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits_bkgts - m)
    p = jnp.where(mask_b11ts, p, 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    out_btkgd = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32), precision="highest")
    return out_btkgd.reshape(b, t, h, d).astype(q.dtype)


def resolve_impl(impl: str) -> str:
    """"auto" -> the backend's kernel (see _default_impl); anything else unchanged."""
    return _default_impl() if impl == "auto" else impl


def _triton_only(impl: str, block_sizes):
    """("pallas_gpu", block sizes): "pallas_triton" is "pallas_gpu" without the Hopper kernels."""
    if impl != "pallas_triton":
        return impl, block_sizes
    return "pallas_gpu", dataclasses.replace(block_sizes or flash_gpu.BlockSizes(), hopper=None)


def _default_impl() -> str:
    """The fastest implementation for the default backend: Pallas on GPU/TPU, jnp on CPU."""
    backend = jax.default_backend()
    if backend == "gpu":
        return "pallas_gpu"
    if backend == "tpu":
        return "pallas_tpu"
    return "reference"


def flash_attention(
    q,
    k,
    v,
    *,
    alibi_slopes=None,
    causal: bool = True,
    segment_ids=None,
    softmax_scale: float | None = None,
    impl: str = "auto",
    interpret: bool = False,
    block_sizes=None,
):
    """Causal/ALiBi/segment-aware attention; see the module docstring for shapes.

    impl: "auto" (pallas_gpu on GPU, pallas_tpu on TPU, reference on CPU), "reference" (jnp,
    float32), "pallas_gpu" (on Hopper, the Mosaic GPU kernels of kernels/flash_mgpu.py for the
    calls they take; otherwise Triton-lowered Pallas; `interpret=True` runs Triton on CPU),
    "pallas_triton" (Triton-lowered Pallas only),
    "pallas_tpu" (Mosaic TPU Pallas; `interpret=True` runs it on CPU). ALiBi is computed inside
    the kernels from the slopes, never materialised. block_sizes: the kernel's own BlockSizes
    (tuning only). Differentiable in q, k, v.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
    _check_shapes(q, k, v)
    _check_rows("segment_ids", segment_ids, q.shape[:2])
    if segment_ids is not None and k.shape[1] != q.shape[1]:
        raise ValueError(
            f"segment_ids need S == T (got T={q.shape[1]}, S={k.shape[1]}); "
            "use reference_attention with kv_segment_ids"
        )
    if alibi_slopes is not None and jnp.shape(alibi_slopes) != (q.shape[2],):
        raise ValueError(f"alibi_slopes must be [H={q.shape[2]}], got {jnp.shape(alibi_slopes)}")
    impl, block_sizes = _triton_only(resolve_impl(impl), block_sizes)
    if impl == "reference":
        return reference_attention(
            q, k, v, alibi_slopes=alibi_slopes, causal=causal, segment_ids=segment_ids,
            softmax_scale=softmax_scale,
        )
    if impl == "pallas_gpu":
        kernel = flash_gpu.flash_attention_gpu
    elif impl == "pallas_tpu":
        from mpt_jax.kernels import flash_tpu  # Mosaic TPU imports stay off the GPU path

        kernel = flash_tpu.flash_attention_tpu
    else:
        raise AssertionError(impl)

    def run(q, k, v, slopes, seg):
        return kernel(q, k, v, slopes, causal=causal, q_segment_ids=seg, kv_segment_ids=seg,
                      softmax_scale=softmax_scale, block_sizes=block_sizes, interpret=interpret)

    return per_shard(run, q, k, v, alibi_slopes, segment_ids)


def flash_attention_packed(
    qkv,
    n_heads: int,
    kv_heads: int,
    *,
    alibi_slopes=None,
    causal: bool = True,
    segment_ids=None,
    softmax_scale: float | None = None,
    impl: str = "auto",
    interpret: bool = False,
    block_sizes=None,
):
    """`flash_attention` of the fused projection qkv `[B, T, (H + 2 KV) * D]` (query heads,
    then key heads, then value heads) against itself -> `[B, T, H, D]`.

    On the Pallas GPU path the kernels read q, k and v in place and return the gradient as one
    array like qkv: no slices in the forward pass, no concatenation in the backward. Elsewhere
    (and where a mesh splits the heads) it slices and calls `flash_attention`.
    """
    b = qkv.shape[0]
    packed_head_dim(qkv.shape, n_heads, kv_heads)  # validates the width
    _check_rows("segment_ids", segment_ids, qkv.shape[:2])
    if alibi_slopes is not None and jnp.shape(alibi_slopes) != (n_heads,):
        raise ValueError(f"alibi_slopes must be [H={n_heads}], got {jnp.shape(alibi_slopes)}")
    impl = resolve_impl(impl)
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
    impl, block_sizes = _triton_only(impl, block_sizes)
    mesh = sharding.kernel_mesh()
    whole_heads = mesh is None or sharding.divided_axes(mesh, "heads", n_heads, kv_heads) is None
    if impl == "pallas_gpu" and whole_heads:
        def run(qkv, slopes, seg):
            return flash_gpu.flash_attention_gpu_packed(
                qkv, n_heads, kv_heads, slopes, causal=causal, segment_ids=seg,
                softmax_scale=softmax_scale, block_sizes=block_sizes, interpret=interpret)

        if mesh is None:
            return run(qkv, alibi_slopes, segment_ids)
        batch = sharding.divided_axes(mesh, "batch", b)
        specs = (P(batch, None, None), None if alibi_slopes is None else P(),
                 None if segment_ids is None else P(batch, None))
        return sharding.per_shard(run, mesh, specs, P(batch, None, None, None))(
            qkv, alibi_slopes, segment_ids)
    return flash_attention(
        *unpack_qkv(qkv, n_heads, kv_heads), alibi_slopes=alibi_slopes, causal=causal,
        segment_ids=segment_ids, softmax_scale=softmax_scale, impl=impl, interpret=interpret,
        block_sizes=block_sizes)


def per_shard(run, q, k, v, slopes, seg):
    """Calls `run(q, k, v, slopes, seg)` (a flash kernel) once per device shard.

    Inside a multi-device mesh context this runs `run` under `shard_map` (see
    sharding.kernel_mesh for why): the batch splits as the "batch" rule says and the heads as
    the "heads" rule says, each only where the mesh divides it, heads only when the kv heads
    divide too (each shard's GQA groups stay whole). No mesh: a plain call.
    """
    mesh = sharding.kernel_mesh()
    if mesh is None:
        return run(q, k, v, slopes, seg)
    batch = sharding.divided_axes(mesh, "batch", q.shape[0])
    heads = sharding.divided_axes(mesh, "heads", q.shape[2], k.shape[2])
    qkv_spec = P(batch, None, heads, None)
    in_specs = (qkv_spec, qkv_spec, qkv_spec,
                None if slopes is None else P(heads), None if seg is None else P(batch, None))
    return sharding.per_shard(run, mesh, in_specs, qkv_spec)(q, k, v, slopes, seg)


def decode_attention(
    q,
    k_cache,
    v_cache,
    cache_len,
    *,
    alibi_slopes=None,
    softmax_scale: float | None = None,
    kv_mask=None,
):
    """Attention of a few new query rows against a KV cache (the generation path's jnp form;
    `append_and_attend` picks the GPU kernel instead where it applies).

    q `[B, T, H, D]` (T small, usually 1), k_cache/v_cache `[B, KV, S_max, D]` (heads ahead of
    slots, so each (batch, head) pair's keys are one contiguous [S, D] matrix and both einsums
    are plain batched matrix products that read the cache in place), cache_len int32
    scalar or `[B]`: valid cache entries per sequence, the T new tokens included (already
    written at positions cache_len - T .. cache_len - 1). Query i sits at position
    cache_len - T + i and sees keys j <= its position; slots at or past cache_len are ignored,
    and so are slots where `kv_mask` `[B, S_max]` (optional) is False (left padding).
    ALiBi uses slope_h * (j - pos_i), as in training.

    It reads the cache once in its own dtype with float32 accumulation (full precision when the
    cache is float32), softmax in float32. Returns q.dtype. Rows with no visible key return
    zeros.
    """
    _check_shapes(q, k_cache.swapaxes(1, 2), v_cache.swapaxes(1, 2))
    b, t, h, d = q.shape
    kvh, s = k_cache.shape[1], k_cache.shape[2]
    _check_rows("kv_mask", kv_mask, (b, s))
    g = h // kvh
    scale = (1.0 / d**0.5) if softmax_scale is None else softmax_scale
    prec = (jax.lax.Precision.HIGHEST if k_cache.dtype == jnp.float32
            else jax.lax.Precision.DEFAULT)
    cache_len_b = jnp.broadcast_to(jnp.asarray(cache_len, jnp.int32), (b,))
    q_pos_bt = cache_len_b[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None, :]
    kv_pos_s = jnp.arange(s, dtype=jnp.int32)
    q_btkgd = q.astype(k_cache.dtype).reshape(b, t, kvh, g, d)
    logits_bkgts = jnp.einsum("btkgd,bksd->bkgts", q_btkgd, k_cache, precision=prec,
                              preferred_element_type=jnp.float32) * jnp.float32(scale)
    rel_bts = kv_pos_s[None, None, :] - q_pos_bt[:, :, None]  # key - query position
    if alibi_slopes is not None:
        slopes_kg = jnp.asarray(alibi_slopes, jnp.float32).reshape(kvh, g)
        logits_bkgts = logits_bkgts + (slopes_kg[None, :, :, None, None]
                                       * rel_bts.astype(jnp.float32)[:, None, None])
    mask_bts = (rel_bts <= 0) & (kv_pos_s[None, None, :] < cache_len_b[:, None, None])
    if kv_mask is not None:
        mask_bts &= jnp.asarray(kv_mask).astype(bool)[:, None, :]
    mask_b11ts = mask_bts[:, None, None]
    logits_bkgts = jnp.where(mask_b11ts, logits_bkgts, -jnp.inf)
    m = jnp.max(logits_bkgts, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask_b11ts, jnp.exp(logits_bkgts - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)
    # Batch dims first in the product's output, then one transpose (with "->btkgd" directly,
    # XLA:CPU cannot run the bf16 x bf16 -> f32 product for batch > 1).
    out_bkgtd = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v_cache.dtype), v_cache, precision=prec,
                           preferred_element_type=jnp.float32)
    return out_bkgtd.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


def append_and_attend(q, k_new, v_new, k_cache, v_cache, cache_index, *, alibi_slopes=None,
                      softmax_scale: float | None = None, kv_mask=None, impl: str = "auto",
                      interpret: bool = False, qkv=None):
    """Writes T new tokens' keys/values (`[B, T, KV, D]`) into the caches (`[B, KV, S, D]`) at
    slot `cache_index` (int32 scalar) and attends q `[B, T, H, D]` against them (as
    `decode_attention` with cache_len = cache_index + T). Returns (out, k_cache, v_cache).

    One new token per row on the Pallas GPU path is a single kernel launch that also writes the
    new row into the caches (no separate update kernels); otherwise the caches are updated with
    dynamic_update_slice and `decode_attention` runs. qkv (optional) `[B, T, (H + 2 KV) * D]`:
    the fused projection q, k_new and v_new were sliced from; the kernel then reads it in
    place."""
    b, t, h, d = q.shape
    _check_rows("kv_mask", kv_mask, (b, k_cache.shape[2]))
    check_cache_index(cache_index, t, k_cache.shape[2])
    impl = resolve_impl(impl)
    if impl in GPU_IMPLS and t == 1 and decode_gpu.supported((b, h, d), k_cache.shape):
        scale = (1.0 / d**0.5) if softmax_scale is None else softmax_scale
        slopes = None if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32)
        cache_len = jnp.asarray(cache_index, jnp.int32) + 1
        mesh = sharding.kernel_mesh()
        batch = heads = None
        if mesh is not None:
            batch = sharding.divided_axes(mesh, "batch", b)
            heads = sharding.divided_axes(mesh, "heads", h, k_cache.shape[1])
            if heads is not None:
                qkv = None  # a shard of the fused projection is not whole heads: use the slices

        def run(q1, k_cache, v_cache, cache_len, kv_mask, slopes, qkv1, k1, v1):
            return decode_gpu.decode_attention_gpu(
                q1, k_cache, v_cache, cache_len, kv_mask, slopes, scale=float(scale),
                interpret=interpret, qkv=qkv1, k_new=k1, v_new=v1)

        if qkv is not None:
            args = (None, k_cache, v_cache, cache_len, kv_mask, slopes, qkv[:, 0], None, None)
        else:
            args = (q[:, 0], k_cache, v_cache, cache_len, kv_mask, slopes, None, k_new[:, 0],
                    v_new[:, 0])
        if mesh is not None:
            rows, caches = P(batch, heads, None), P(batch, heads, None, None)
            specs = (rows, caches, caches, P(), P(batch, None), P(heads), P(batch, None), rows,
                     rows)
            specs = tuple(None if a is None else sp for a, sp in zip(args, specs))
            run = sharding.per_shard(run, mesh, specs, (rows, caches, caches))
        o, k_cache, v_cache = run(*args)
        return o[:, None], k_cache, v_cache
    k_cache = jax.lax.dynamic_update_slice(
        k_cache, k_new.swapaxes(1, 2).astype(k_cache.dtype), (0, 0, cache_index, 0))
    v_cache = jax.lax.dynamic_update_slice(
        v_cache, v_new.swapaxes(1, 2).astype(v_cache.dtype), (0, 0, cache_index, 0))
    o = decode_attention(q, k_cache, v_cache, cache_index + t, alibi_slopes=alibi_slopes,
                         softmax_scale=softmax_scale, kv_mask=kv_mask)
    return o, k_cache, v_cache
