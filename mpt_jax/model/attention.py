"""Attention: `plan` (which kernel runs a call, on what layout, split how), the `flash_attention`
entry point, the KV-cache paths, and the jnp reference every kernel is tested against.

Shapes: q `[B, T, H, D]`, k/v `[B, S, KV, D]` with KV dividing H (GQA/MQA: query head h uses KV
head h // (H // KV)). When S > T the queries are the last T positions (bottom-right alignment, as
in flash-attn), so causal masking and ALiBi distances work against a KV cache. KV caches are
`[B, KV, S_max, D]` (see decode_attention), or int8 with per-token scales (quant.QuantizedKV).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mpt_jax import sharding
from mpt_jax.model import alibi, quant
from mpt_jax.kernels import decode_gpu, flash_gpu, flash_mgpu
from mpt_jax.kernels.common import packed_head_dim, softmax_scale as _scale, unpack_qkv

IMPLS = ("auto", "reference", "pallas_gpu", "pallas_triton", "pallas_tpu")
GPU_IMPLS = ("pallas_gpu", "pallas_triton")
# logical axes of q, k, v [B, T, H, D] for the kernels' shard_map (sharding.per_shard_logical)
_BTHD = ("batch", None, "heads", None)


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


def _check_slopes(alibi_slopes, h: int) -> None:
    if alibi_slopes is not None and jnp.shape(alibi_slopes) != (h,):
        raise ValueError(f"alibi_slopes must be [H={h}], got {jnp.shape(alibi_slopes)}")


def _slopes(alibi_slopes):
    return None if alibi_slopes is None else jnp.asarray(alibi_slopes, jnp.float32)


def check_cache_index(cache_index, t: int, slots: int, batch: int | None = None) -> None:
    """`cache_index` is a scalar or one position per row (`[batch]`). A concrete one (Python or
    numpy ints) must leave room for `t` new tokens in `slots`. (An array index is the caller's
    to keep in range: the cache update would clamp it and overwrite earlier slots.)"""
    shape = tuple(jnp.shape(cache_index))
    if shape not in ((),) + (((batch,),) if batch is not None else ()):
        raise ValueError(f"cache_index must be a scalar or [batch={batch}], got shape "
                         f"{list(shape)}")
    if isinstance(cache_index, (int, np.integer, np.ndarray)):
        idx = np.asarray(cache_index)
        if ((idx < 0) | (idx > slots - t)).any():
            shown = int(idx) if idx.ndim == 0 else idx.tolist()
            raise ValueError(f"cache_index {shown} with {t} new token(s) does not fit a cache "
                             f"of {slots} slots")


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    """How one attention call runs; `plan` decides.

    kernel: "reference" (jnp: reference_attention, or decode_attention against a cache),
    "flash_gpu" (kernels/flash_gpu: Triton, or Mosaic GPU where hopper_fwd / hopper_bwd),
    "flash_tpu" (kernels/flash_tpu), "decode_gpu" / "decode_tpu" (kernels/decode_gpu,
    kernels/decode_tpu, which also write the new token's key and value into the cache in
    place), "chunk_gpu" (flash_gpu.chunk_attention_gpu: several new tokens against a cache,
    at a traced position). packed: the kernel reads q, k and v in
    place from the fused projection. batch_axes / head_axes: the mesh axes the kernel's batch /
    heads split over (shard_map, sharding.per_shard_logical); None when not split, without a
    multi-device mesh, and for the jnp path (XLA partitions it).
    """

    kernel: str
    packed: bool = False
    hopper_fwd: bool = False
    hopper_bwd: bool = False
    batch_axes: str | tuple[str, ...] | None = None
    head_axes: str | tuple[str, ...] | None = None


def resolve_impl(impl: str) -> str:
    """"auto" -> the backend's kernel (see _default_impl); anything else unchanged."""
    return _default_impl() if impl == "auto" else impl


def _default_impl() -> str:
    """The fastest implementation for the default backend: Pallas on GPU/TPU, jnp on CPU."""
    backend = jax.default_backend()
    if backend == "gpu":
        return "pallas_gpu"
    if backend == "tpu":
        return "pallas_tpu"
    return "reference"


def plan(impl: str, q_shape, kv_heads: int, kv_len: int, dtype, *, causal: bool = True,
         has_segments: bool = False, cache: bool = False, packed: bool = False,
         interpret: bool = False, block_sizes=None) -> Plan:
    """The one place that decides which kernel runs an attention call, on which layout, and how
    it splits over the mesh (the rules in force).

    q_shape `[B, T, H, D]`; kv_heads / kv_len: the keys' heads and length (the cache's slots
    when `cache`: T new tokens appended to a KV cache and attending to it; otherwise
    self-attention over the given keys). packed: the caller holds the fused projection
    `[B, T, (H + 2 KV) * D]` for the kernel to read in place.

    The kernels are tried in order, each where its capability check takes the call as one
    device shard sees it (batch and heads split by the "batch" and "heads" rules where the mesh
    divides them, heads only in whole GQA groups):
      pallas_gpu     Mosaic GPU (compiled, on Hopper: flash_mgpu.supported; its backward
                     where S == T), else Triton
      pallas_triton  Triton
      pallas_tpu     Mosaic TPU
      reference      jnp
    Against a cache, a GPU impl runs the GPU decode kernel for one new token per row
    (decode_gpu.supported) and the chunk kernel for several (flash_gpu.chunk_supported: a
    float cache), pallas_tpu the TPU decode kernel (decode_tpu.supported, `dtype` being the
    cache's), anything else the jnp path. packed holds where the kernel takes the
    fused projection whole (heads not split; for the flash kernels no padding either,
    flash_gpu.takes_packed); otherwise q, k and v are slices.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
    impl = resolve_impl(impl)
    b, t, h, d = q_shape
    if impl == "reference" or (cache and impl not in GPU_IMPLS + ("pallas_tpu",)):
        return Plan("reference")
    axes = sharding.shard_axes({"batch": (b,), "heads": (h, kv_heads)})
    mesh = sharding.kernel_mesh()
    nb, nh = ((1, 1) if mesh is None else
              (sharding.axes_size(mesh, axes["batch"]), sharding.axes_size(mesh, axes["heads"])))
    split = dict(batch_axes=axes["batch"], head_axes=axes["heads"])
    whole_heads = axes["heads"] is None
    bs, hs, kvs = b // nb, h // nh, kv_heads // nh  # one shard's batch, heads, kv heads
    if cache and impl == "pallas_tpu":
        from mpt_jax.kernels import decode_tpu  # Mosaic TPU imports stay off the GPU path

        if t == 1 and decode_tpu.supported((bs, hs, d), (bs, kvs, kv_len, d), dtype):
            return Plan("decode_tpu", **split)
        return Plan("reference")
    if cache:
        if t == 1 and decode_gpu.supported((bs, hs, d), (bs, kvs, kv_len, d)):
            return Plan("decode_gpu", packed=packed and whole_heads, **split)
        if t > 1 and flash_gpu.chunk_supported((bs, t, hs, d), kvs, kv_len, dtype, block_sizes):
            return Plan("chunk_gpu", **split)
        return Plan("reference")
    if impl == "pallas_tpu":
        return Plan("flash_tpu", **split)
    blocks = block_sizes or flash_gpu.BlockSizes.default(dtype)
    hopper = (impl == "pallas_gpu" and not interpret and flash_mgpu.is_hopper()
              and flash_mgpu.supported((bs, t, hs, d), kvs, kv_len, dtype, causal=causal,
                                       has_segments=has_segments))
    return Plan("flash_gpu",
                packed=packed and whole_heads and flash_gpu.takes_packed(t, d, dtype, blocks),
                hopper_fwd=hopper,
                hopper_bwd=hopper and flash_mgpu.supports_backward((bs, t, hs, d), kv_len),
                **split)


# ---------------------------------------------------------------------------------------------
# jnp reference
# ---------------------------------------------------------------------------------------------
def _masked_softmax(logits, mask):
    """Softmax over the last axis of float32 `logits` where `mask` (broadcastable) is True;
    rows with nothing visible give zeros."""
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(logits - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(denom == 0, 1.0, denom)


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
    scale = _scale(d, softmax_scale)
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
    p = _masked_softmax(logits_bkgts, mask_bts[:, None, None])
    out_btkgd = jnp.einsum("bkgts,bskd->btkgd", p, v.astype(jnp.float32), precision="highest")
    return out_btkgd.reshape(b, t, h, d).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# Self-attention: training, and prefill into an empty cache
# ---------------------------------------------------------------------------------------------
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
    "pallas_tpu" (Mosaic TPU Pallas; `interpret=True` runs it on CPU). `plan` says exactly
    which kernel takes which call. ALiBi is computed inside the kernels from the slopes, never
    materialised. block_sizes: the kernel's own BlockSizes (tuning only). Differentiable in q,
    k, v. Under a multi-device mesh the kernels run once per shard.
    """
    _check_shapes(q, k, v)
    _check_rows("segment_ids", segment_ids, q.shape[:2])
    if segment_ids is not None and k.shape[1] != q.shape[1]:
        raise ValueError(
            f"segment_ids need S == T (got T={q.shape[1]}, S={k.shape[1]}); "
            "use reference_attention with kv_segment_ids"
        )
    _check_slopes(alibi_slopes, q.shape[2])
    p = plan(impl, q.shape, k.shape[2], k.shape[1], q.dtype, causal=causal,
             has_segments=segment_ids is not None, interpret=interpret, block_sizes=block_sizes)
    return _run_flash(p, q, k, v, _slopes(alibi_slopes), segment_ids, causal=causal,
                      softmax_scale=softmax_scale, interpret=interpret, block_sizes=block_sizes)


def _run_flash(p: Plan, q, k, v, slopes, seg, *, causal, softmax_scale, interpret,
               block_sizes):
    """flash_attention as planned by `p` (q, k and v apart)."""
    if p.kernel == "reference":
        return reference_attention(q, k, v, alibi_slopes=slopes, causal=causal, segment_ids=seg,
                                   softmax_scale=softmax_scale)
    if p.kernel == "flash_gpu":
        def run(q, k, v, slopes, seg):
            return flash_gpu.flash_attention_gpu(
                q, k, v, slopes, causal=causal, q_segment_ids=seg, kv_segment_ids=seg,
                softmax_scale=softmax_scale, block_sizes=block_sizes, interpret=interpret,
                hopper_fwd=p.hopper_fwd, hopper_bwd=p.hopper_bwd)
    elif p.kernel == "flash_tpu":
        from mpt_jax.kernels import flash_tpu  # Mosaic TPU imports stay off the GPU path

        def run(q, k, v, slopes, seg):
            return flash_tpu.flash_attention_tpu(
                q, k, v, slopes, causal=causal, q_segment_ids=seg, kv_segment_ids=seg,
                softmax_scale=softmax_scale, block_sizes=block_sizes, interpret=interpret)
    else:
        raise AssertionError(p)
    return sharding.per_shard_logical(
        run, in_axes=(_BTHD, _BTHD, _BTHD, ("heads",), ("batch", None)), out_axes=_BTHD)(
        q, k, v, slopes, seg)


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

    Where the plan keeps the packed layout (the Pallas GPU kernels, heads whole on each shard,
    no padding) the kernels read q, k and v in place and return the gradient as one array like
    qkv: no slices in the forward pass, no concatenation in the backward. Elsewhere q, k and v
    are sliced out and attend as in `flash_attention`.
    """
    b, t, _ = qkv.shape
    d = packed_head_dim(qkv.shape, n_heads, kv_heads)  # validates the width
    _check_rows("segment_ids", segment_ids, qkv.shape[:2])
    _check_slopes(alibi_slopes, n_heads)
    p = plan(impl, (b, t, n_heads, d), kv_heads, t, qkv.dtype, causal=causal,
             has_segments=segment_ids is not None, packed=True, interpret=interpret,
             block_sizes=block_sizes)
    kw = dict(causal=causal, softmax_scale=softmax_scale, interpret=interpret,
              block_sizes=block_sizes)
    if not p.packed:
        return _run_flash(p, *unpack_qkv(qkv, n_heads, kv_heads), _slopes(alibi_slopes),
                          segment_ids, **kw)

    def run(qkv, slopes, seg):
        return flash_gpu.flash_attention_gpu_packed(
            qkv, n_heads, kv_heads, slopes, segment_ids=seg, hopper_fwd=p.hopper_fwd,
            hopper_bwd=p.hopper_bwd, **kw)

    # heads whole on every shard: the slopes go to each shard entire
    return sharding.per_shard_logical(
        run, in_axes=(("batch", None, None), (None,), ("batch", None)),
        out_axes=("batch", None, None, None))(qkv, _slopes(alibi_slopes), segment_ids)


# ---------------------------------------------------------------------------------------------
# Against a KV cache: decoding, and chunks of tokens at any position
# ---------------------------------------------------------------------------------------------
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
    zeros. An int8 cache (quant.QuantizedKV) is read as int8 in q's dtype (exact), its scales
    applied to the scores and to the softmax weights.
    """
    k_scales = v_scales = None
    if quant.is_quantized(k_cache):
        (k_cache, k_scales), (v_cache, v_scales) = k_cache, v_cache
    _check_shapes(q, k_cache.swapaxes(1, 2), v_cache.swapaxes(1, 2))
    b, t, h, d = q.shape
    kvh, s = k_cache.shape[1], k_cache.shape[2]
    _check_rows("kv_mask", kv_mask, (b, s))
    g = h // kvh
    scale = _scale(d, softmax_scale)
    read_dtype = q.dtype if k_scales is not None else k_cache.dtype
    prec = (jax.lax.Precision.HIGHEST if read_dtype == jnp.float32
            else jax.lax.Precision.DEFAULT)
    cache_len_b = jnp.broadcast_to(jnp.asarray(cache_len, jnp.int32), (b,))
    q_pos_bt = cache_len_b[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None, :]
    kv_pos_s = jnp.arange(s, dtype=jnp.int32)
    q_btkgd = q.astype(read_dtype).reshape(b, t, kvh, g, d)
    logits_bkgts = jnp.einsum("btkgd,bksd->bkgts", q_btkgd, k_cache.astype(read_dtype),
                              precision=prec, preferred_element_type=jnp.float32)
    if k_scales is not None:
        logits_bkgts = logits_bkgts * k_scales[:, :, None, None, :]
    logits_bkgts = logits_bkgts * jnp.float32(scale)
    rel_bts = kv_pos_s[None, None, :] - q_pos_bt[:, :, None]  # key - query position
    if alibi_slopes is not None:
        slopes_kg = jnp.asarray(alibi_slopes, jnp.float32).reshape(kvh, g)
        logits_bkgts = logits_bkgts + (slopes_kg[None, :, :, None, None]
                                       * rel_bts.astype(jnp.float32)[:, None, None])
    mask_bts = (rel_bts <= 0) & (kv_pos_s[None, None, :] < cache_len_b[:, None, None])
    if kv_mask is not None:
        mask_bts &= jnp.asarray(kv_mask).astype(bool)[:, None, :]
    p = _masked_softmax(logits_bkgts, mask_bts[:, None, None])
    if v_scales is not None:
        p = p * v_scales[:, :, None, None, :]
    # Batch dims first in the product's output, then one transpose (with "->btkgd" directly,
    # XLA:CPU cannot run the bf16 x bf16 -> f32 product for batch > 1).
    out_bkgtd = jnp.einsum("bkgts,bksd->bkgtd", p.astype(read_dtype), v_cache.astype(read_dtype),
                           precision=prec, preferred_element_type=jnp.float32)
    return out_bkgtd.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


def write_cache(k_cache, v_cache, k_new, v_new, cache_index):
    """The caches `[B, KV, S, D]` with T new keys/values `[B, T, KV, D]` written from slot
    `cache_index` (int32 scalar, or `[B]`: each row at its own slot). An int8 cache
    (quant.QuantizedKV) gets the rows quantized and their scales."""
    index = jnp.asarray(cache_index, jnp.int32)

    def update(cache, new):  # cache [B, KV, S, ...], new [B, KV, T, ...]
        tail = (0,) * (cache.ndim - 3)
        if index.ndim == 0:
            return jax.lax.dynamic_update_slice(cache, new, (0, 0, index, *tail))
        return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (0, i, *tail)))(
            cache, new, index)

    def put(cache, new):
        new = new.swapaxes(1, 2)
        if quant.is_quantized(cache):
            values, scales = quant.quantize_rows(new)
            return quant.QuantizedKV(update(cache.values, values), update(cache.scales, scales))
        return update(cache, new.astype(cache.dtype))

    return put(k_cache, k_new), put(v_cache, v_new)


def append_and_attend(q, k_new, v_new, k_cache, v_cache, cache_index, *, alibi_slopes=None,
                      softmax_scale: float | None = None, kv_mask=None, impl: str = "auto",
                      interpret: bool = False, qkv=None):
    """Writes T new tokens' keys/values (`[B, T, KV, D]`) into the caches (`[B, KV, S, D]`) at
    slot `cache_index` (int32 scalar, or `[B]`: each row at its own slot) and attends q
    `[B, T, H, D]` against them (as `decode_attention` with cache_len = cache_index + T).
    Returns (out, k_cache, v_cache).

    Where the plan picks a Pallas decode kernel (GPU or TPU, one new token per row) it is a
    single launch that also writes the new row into the caches (no separate update kernels);
    for several new tokens on a GPU, `write_cache` and the chunk flash kernel (which reads the
    cache in place, up to the chunk's last position only); otherwise `write_cache` and
    `decode_attention` run. qkv (optional) `[B, T, (H + 2 KV) * D]`:
    the fused projection q, k_new and v_new were sliced from; the kernel then reads it in place."""
    b, t, h, d = q.shape
    quantized = quant.is_quantized(k_cache)
    kv_heads, s = (k_cache.values if quantized else k_cache).shape[1:3]
    _check_rows("kv_mask", kv_mask, (b, s))
    check_cache_index(cache_index, t, s, batch=b)
    index = jnp.asarray(cache_index, jnp.int32)
    # (the TPU kernel checks the cache's dtype: an int8 cache takes the jnp path there)
    p = plan(impl, q.shape, kv_heads, s, jnp.int8 if quantized else k_cache.dtype, cache=True,
             packed=qkv is not None, interpret=interpret)
    if p.kernel == "reference":
        k_cache, v_cache = write_cache(k_cache, v_cache, k_new, v_new, index)
        o = decode_attention(q, k_cache, v_cache, index + t, alibi_slopes=alibi_slopes,
                             softmax_scale=softmax_scale, kv_mask=kv_mask)
        return o, k_cache, v_cache
    cache_axes = ("batch", "heads", None, None)
    if p.kernel == "chunk_gpu":
        k_cache, v_cache = write_cache(k_cache, v_cache, k_new, v_new, index)

        def chunk(q, k_cache, v_cache, start, kv_mask, slopes):
            return flash_gpu.chunk_attention_gpu(q, k_cache, v_cache, start, slopes, kv_mask,
                                                 softmax_scale=softmax_scale,
                                                 interpret=interpret)

        rows = ("batch", None, "heads", None)
        o = sharding.per_shard_logical(
            chunk, in_axes=(rows, cache_axes, cache_axes, ("batch",), ("batch", None),
                            ("heads",)), out_axes=rows)(
            q, k_cache, v_cache, jnp.broadcast_to(index, (b,)), kv_mask, _slopes(alibi_slopes))
        return o, k_cache, v_cache
    scale = _scale(d, softmax_scale)

    def run(q1, k_cache, v_cache, k_scales, v_scales, cache_len, kv_mask, slopes, qkv1, k1,
            v1):
        if p.kernel == "decode_tpu":  # (never packed or int8: it reads q, k and v apart)
            from mpt_jax.kernels import decode_tpu

            return decode_tpu.decode_attention_tpu(
                q1, k_cache, v_cache, cache_len, kv_mask, slopes, scale=scale,
                interpret=interpret, k_new=k1, v_new=v1)
        return decode_gpu.decode_attention_gpu(
            q1, k_cache, v_cache, cache_len, kv_mask, slopes, scale=scale, interpret=interpret,
            qkv=qkv1, k_new=k1, v_new=v1, k_scales=k_scales, v_scales=v_scales)

    cache_len = jnp.broadcast_to(index + 1, (b,))
    if p.packed:
        args = (None, qkv[:, 0], None, None)
    else:
        args = (q[:, 0], None, k_new[:, 0], v_new[:, 0])
    caches = (k_cache.values, v_cache.values, k_cache.scales, v_cache.scales) if quantized else (
        k_cache, v_cache, None, None)
    row, scale_axes = ("batch", "heads", None), ("batch", "heads", None)
    cache_out = (cache_axes, cache_axes) + ((scale_axes, scale_axes) if quantized else ())
    o, *new = sharding.per_shard_logical(
        run, in_axes=(row, cache_axes, cache_axes, scale_axes, scale_axes, ("batch",),
                      ("batch", None), ("heads",), ("batch", None), row, row),
        out_axes=(row, *cache_out))(
        args[0], *caches, cache_len, kv_mask, _slopes(alibi_slopes), *args[1:])
    if quantized:
        return o[:, None], quant.QuantizedKV(new[0], new[2]), quant.QuantizedKV(new[1], new[3])
    return o[:, None], new[0], new[1]
