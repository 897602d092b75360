"""Decode attention for GPUs: one new query token per row against a KV cache, as one Pallas
(Triton) kernel per layer.

Grid (B, KV): program (b, kv) streams row b's keys and values of KV head kv in blocks of
`block_s` cache slots, only up to cache_len[b] (a loop with a dynamic trip count, so a half-full
cache costs half the reads), with an online softmax in float32, ALiBi slope_h * (pos_j - pos_q),
and the optional kv_mask (left padding). The G = H / KV query heads of a group share each loaded
block. A single query row is below Triton's 16-row dot minimum, so scores and the weighted sum
are elementwise products and reductions; the kernel is bound by reading the cache either way.

This replaces the five or six XLA kernels of the jnp path (two batched matrix-vector products and
the softmax's reductions) with one launch, which matters at batch 1 where each launch is a few
microseconds against a ~100 us layer. At small batch (B * KV programs would leave most of the
GPU idle) the slots of each (row, head) are split over several programs that write partial
softmax states, merged by one more small launch (flash-decoding); see `n_splits`.

Layout: q `[B, H, D]`, caches `[B, KV, S, D]` (attention.decode_attention's layout), cache_len
int32 `[B]`, kv_mask `[B, S]`. Needs S % block_s == 0 (the generator allocates its cache so,
`alloc_slots`; long caches take larger blocks and more programs, `knobs`) and
D a power of two >= 16; `supported()` says whether a shape qualifies.

int8 cache (model/quant.py's format): int8 caches with float32 scales `[B, KV, S]`, one per
token and KV head. A block's scores are `(q . k_int8) * k_scale` and its values enter as
`(p * v_scale) . v_int8`, so the cache is read once as int8 and never dequantized in memory;
the appended token is quantized here (absmax over D, halves rounded away from zero, as
quant.quantize_rows does) and written with its scale.

Imports from mpt_jax nothing.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Tuning knobs (module level so a benchmark can sweep them): cache slots per loop step, the
# number of programs `n_splits` aims for (0: never split a (row, head)'s slots), warps a program.
BLOCK_S = 64
TARGET_PROGRAMS = 256
NUM_WARPS = 4
# Caches of at least LONG_SLOTS positions take their own block and target (`knobs`), swept on
# an H200 (bench/generate.py kvtune, B=1, MPT-7B heads). With 128 / 1024 the 65,536-token bf16
# decode step went 16.64 -> 13.83 ms in one call (the cache then read at about 3.4 TB/s, the
# step's time less the weights'); at 384 slots and batch 16 they split rows that need no split
# (a combine launch a layer: 4.83 against 4.54 ms a step), so short caches keep the knobs above.
LONG_SLOTS = 8192
LONG_BLOCK_S = 128
LONG_TARGET_PROGRAMS = 1024


def knobs(slots: int) -> tuple[int, int]:
    """(slots per block, target programs) for a cache of `slots` positions."""
    if slots >= LONG_SLOTS and slots % LONG_BLOCK_S == 0:
        return LONG_BLOCK_S, LONG_TARGET_PROGRAMS
    return BLOCK_S, TARGET_PROGRAMS


def alloc_slots(n: int) -> int:
    """The cache positions to allocate for `n` tokens: whole blocks of the block `knobs` picks
    for a cache that long."""
    block = LONG_BLOCK_S if n >= LONG_SLOTS else BLOCK_S
    return -(-n // block) * block


def supported(q_shape, cache_shape, block_s: int | None = None) -> bool:
    b, h, d = q_shape
    _, kvh, s, dk = cache_shape
    block_s = knobs(s)[0] if block_s is None else block_s
    return (d == dk and d >= 16 and d & (d - 1) == 0 and s % block_s == 0 and h % kvh == 0)


QMAX = 127.0  # int8 cache: symmetric absmax, as model/quant.py
# How the kernel widens an int8 cache block to float32: "cast" (a convert per element), or
# "magic": sign-extend x to int32, add 0x4B000000 (the float32 bits of 2^23) + 128, reinterpret
# as float32 (2^23 + 128 + x, exact), subtract 2^23 + 128: integer adds and one float subtract
# in place of the int-to-float converts, which run at a fraction of the ALU rate. Both exact;
# "magic" has not been timed on a GPU yet (bench/PERF_NOTES.md, session 9).
INT8_WIDEN = "cast"
_MAGIC_BITS = 0x4B000000 + 128  # the float32 bits of 2^23, plus the offset that makes x >= 0
_MAGIC = 8388608.0 + 128.0


def _to_f32(x):
    """A cache block in float32 (int8: by INT8_WIDEN)."""
    if x.dtype != jnp.int8 or INT8_WIDEN == "cast":
        return x.astype(jnp.float32)
    n = x.astype(jnp.int32) + jnp.int32(_MAGIC_BITS)
    return lax.bitcast_convert_type(n, jnp.float32) - jnp.float32(_MAGIC)


def _quantize_row(x):
    """float32 [D] -> (integral float32 [D] in [-127, 127], float32 scale): quant.quantize_rows
    of one row, op for op."""
    amax = jnp.max(jnp.abs(x))
    inv = jnp.where(amax > 0, QMAX / jnp.where(amax > 0, amax, 1.0), 0.0)
    y = x * inv
    q = jnp.clip(jnp.sign(y) * jnp.floor(jnp.abs(y) + 0.5), -QMAX, QMAX)
    return q, amax / QMAX


def _kernel(lens_ref, q_ref, k_ref, v_ref, mask_ref, slopes_ref, *refs, group, scale,
            block_s, blocks_per_split, has_alibi, has_mask, partial, append, quant):
    refs = list(refs)
    ks_ref = vs_ref = None
    if quant:  # the caches' scales [S]
        ks_ref, vs_ref = refs.pop(0), refs.pop(0)
    if append:  # the new token's key and value, and the caches again, as aliased outputs
        kn_ref, vn_ref = refs.pop(0), refs.pop(0)
        n_caches = 4 if quant else 2
        cache_refs = refs[-n_caches:]
        out_refs = refs[:-n_caches]
    else:
        out_refs = refs
    n = lens_ref[0]  # valid slots of this row; the query sits at slot n - 1
    d = q_ref.shape[-1]
    qs = [q_ref[g, :].astype(jnp.float32) * scale for g in range(group)]
    slopes = [slopes_ref[g] for g in range(group)] if has_alibi else None
    if append:
        k_new = kn_ref[...].astype(jnp.float32)
        v_new = vn_ref[...].astype(jnp.float32)
        if quant:  # what the cache will hold for the new token, and its scales
            k_new, ks_new = _quantize_row(k_new)
            v_new, vs_new = _quantize_row(v_new)

    def body(j, carry):
        start = pl.multiple_of(j * block_s, block_s)
        k = _to_f32(k_ref[pl.ds(start, block_s), :])  # [bs, D]
        v = _to_f32(v_ref[pl.ds(start, block_s), :])
        pos = start + lax.broadcasted_iota(jnp.int32, (block_s,), 0)
        if quant:
            k_sc = ks_ref[pl.ds(start, block_s)]
            v_sc = vs_ref[pl.ds(start, block_s)]
        if append:  # slot n - 1 is being written by this launch: use the new row itself
            new_row = (pos == n - 1)[:, None]
            k = jnp.where(new_row, k_new[None, :], k)
            v = jnp.where(new_row, v_new[None, :], v)
            if quant:
                k_sc = jnp.where(pos == n - 1, ks_new, k_sc)
                v_sc = jnp.where(pos == n - 1, vs_new, v_sc)
        valid = pos < n
        if has_mask:
            valid = valid & (mask_ref[pl.ds(start, block_s)] != 0)
        out = []
        for g in range(group):
            m, l, acc = carry[g]
            s = jnp.sum(k * qs[g][None, :], axis=1)  # [bs]
            if quant:
                s = s * k_sc
            if has_alibi:
                s = s + slopes[g] * (pos - (n - 1)).astype(jnp.float32)
            s = jnp.where(valid, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(s - m_safe)  # masked slots: exp(-inf) = 0
            l = l * alpha + jnp.sum(p)
            pv = p * v_sc if quant else p
            acc = acc * alpha + jnp.sum(pv[:, None] * v, axis=0)
            out.append((m_new, l, acc))
        return tuple(out)

    init = tuple((jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.zeros((d,), jnp.float32))
                 for _ in range(group))
    # This program's share of the filled blocks: [lo, hi) of cdiv(n, block_s).
    lo = pl.program_id(2) * blocks_per_split
    hi = jnp.minimum(lo + blocks_per_split, lax.div(n + block_s - 1, jnp.int32(block_s)))
    final = lax.fori_loop(lo, jnp.maximum(hi, lo), body, init)
    if append:
        # The program whose share holds slot n - 1 writes the new row into the caches.
        owner = (lo * block_s <= n - 1) & (n - 1 < jnp.maximum(hi, lo) * block_s)

        @pl.when(owner)
        def _():
            kc_ref, vc_ref = cache_refs[:2]
            kc_ref[pl.ds(n - 1, 1), :] = k_new[None, :].astype(kc_ref.dtype)
            vc_ref[pl.ds(n - 1, 1), :] = v_new[None, :].astype(vc_ref.dtype)
            if quant:
                ksc_ref, vsc_ref = cache_refs[2:]
                ksc_ref[pl.ds(n - 1, 1)] = ks_new[None]
                vsc_ref[pl.ds(n - 1, 1)] = vs_new[None]
    if partial:
        m_ref, l_ref, acc_ref = out_refs
        for g in range(group):
            m, l, acc = final[g]
            m_ref[g] = m
            l_ref[g] = l
            acc_ref[g, :] = acc
    else:
        (o_ref,) = out_refs
        for g in range(group):
            _, l, acc = final[g]
            o_ref[g, :] = (acc / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def n_splits(batch: int, kv_heads: int, slots: int, block_s: int | None = None,
             target_programs: int | None = None) -> int:
    """How many programs share one (row, KV head)'s cache: enough to give the GPU about
    `target_programs` programs (batch 1 has only KV of them otherwise), at least one block each.
    Defaults: `knobs(slots)`."""
    block_s = knobs(slots)[0] if block_s is None else block_s
    target = knobs(slots)[1] if target_programs is None else target_programs
    return max(1, min(slots // block_s, -(-target // (batch * kv_heads))))


def _combine_kernel(m_ref, l_ref, acc_ref, o_ref, *, group):
    """Merges one (row, KV head)'s partial softmax states [splits, G] (x D)."""
    for g in range(group):
        m = m_ref[:, g]
        m_max = jnp.max(m)
        w = jnp.exp(m - jnp.where(m_max == -jnp.inf, 0.0, m_max))  # empty splits: 0
        l_tot = jnp.sum(l_ref[:, g] * w)
        acc = jnp.sum(acc_ref[:, g, :] * w[:, None], axis=0)
        o_ref[g, :] = (acc / jnp.where(l_tot == 0.0, 1.0, l_tot)).astype(o_ref.dtype)


def decode_attention_gpu(q, k_cache, v_cache, cache_len, kv_mask=None, slopes=None, *,
                         k_new=None, v_new=None, qkv=None, k_scales=None, v_scales=None,
                         scale: float, block_s: int | None = None, num_warps: int | None = None,
                         splits: int | None = None, interpret: bool = False):
    """q [B, H, D], caches [B, KV, S, D], cache_len int32 [B] (the new token included),
    kv_mask [B, S] or None, slopes float32 [H] or None -> [B, H, D] in q's dtype.
    Rows with no visible slot return zeros. splits: programs per (row, KV head) (default
    `n_splits`, rounded up to a power of two); with more than one, each writes a partial
    softmax (max, sum, weighted values) and one more launch combines them (flash-decoding).

    k_new/v_new [B, KV, D]: the new token's key and value, written into the caches at slot
    cache_len - 1 by this same launch (the caches are aliased to outputs, updated in place
    under jit when donated or loop-carried); returns (out, k_cache, v_cache) then.

    qkv [B, (H + 2 KV) * D]: instead of q, k_new and v_new (pass None for them), the fused
    projection they are slices of; the kernel reads its rows in place (no slice copies).

    k_scales/v_scales float32 [B, KV, S]: the caches are int8 with these per-token scales
    (the module docstring); appending then also writes the new token's scales, and returns
    (out, k_cache, v_cache, k_scales, v_scales)."""
    default_block, target = knobs(k_cache.shape[2])
    block_s = default_block if block_s is None else block_s
    num_warps = NUM_WARPS if num_warps is None else num_warps
    if splits is None:
        splits = n_splits(k_cache.shape[0], k_cache.shape[1], k_cache.shape[2], block_s, target)
    if (k_scales is None) != (v_scales is None) or (
            (k_scales is None) != (k_cache.dtype != jnp.int8)):
        raise ValueError(f"int8 caches need k_scales and v_scales (and only they do): cache "
                         f"{k_cache.dtype}, scales given: {k_scales is not None}")
    return _decode(q, k_cache, v_cache, cache_len, kv_mask, slopes, k_new, v_new, qkv,
                   k_scales, v_scales, scale=float(scale), block_s=block_s,
                   num_warps=num_warps, splits=splits, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("scale", "block_s", "num_warps", "splits",
                                             "interpret"))
def _decode(q, k_cache, v_cache, cache_len, kv_mask, slopes, k_new, v_new, qkv, k_scales,
            v_scales, *, scale, block_s, num_warps, splits, interpret):
    kvh, s, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    if qkv is not None:
        b = qkv.shape[0]
        h = qkv.shape[-1] // d - 2 * kvh
    else:
        b, h, d = q.shape
    kvh, s = k_cache.shape[1], k_cache.shape[2]
    if not supported((b, h, d), k_cache.shape, block_s):
        raise ValueError(f"decode kernel needs S % {block_s} == 0 and a power-of-two head dim; "
                         f"got {h} heads x {d}, cache {k_cache.shape}")
    g = h // kvh
    n_blocks = s // block_s
    splits = max(1, min(splits, n_blocks))
    splits = pl.next_power_of_2(splits)  # whole blocks for the combine; extra programs idle
    per_split = -(-n_blocks // splits)
    lens = jnp.broadcast_to(jnp.asarray(cache_len, jnp.int32), (b,)).reshape(b, 1)
    has_mask = kv_mask is not None
    mask = (jnp.asarray(kv_mask).astype(jnp.int32) if has_mask
            else jnp.zeros((b, s), jnp.int32))
    has_alibi = slopes is not None
    sl = (jnp.asarray(slopes, jnp.float32).reshape(kvh, g) if has_alibi
          else jnp.zeros((kvh, g), jnp.float32))
    partial = splits > 1
    append = k_new is not None or qkv is not None
    quant = k_scales is not None
    kernel = functools.partial(_kernel, group=g, scale=float(scale), block_s=block_s,
                               blocks_per_split=per_split, has_alibi=has_alibi,
                               has_mask=has_mask, partial=partial, append=append, quant=quant)
    cache_spec = pl.BlockSpec((None, None, s, d), lambda bi, ki, si: (bi, ki, 0, 0))
    if partial:
        out_specs = [pl.BlockSpec((None, None, None, g), lambda bi, ki, si: (bi, ki, si, 0))] * 2
        out_specs.append(pl.BlockSpec((None, None, None, g, d),
                                      lambda bi, ki, si: (bi, ki, si, 0, 0)))
        out_shape = [jax.ShapeDtypeStruct((b, kvh, splits, g), jnp.float32)] * 2
        out_shape.append(jax.ShapeDtypeStruct((b, kvh, splits, g, d), jnp.float32))
    else:
        out_specs = [pl.BlockSpec((None, None, g, d), lambda bi, ki, si: (bi, ki, 0, 0))]
        out_shape = [jax.ShapeDtypeStruct((b, kvh, g, d), (q if qkv is None else qkv).dtype)]
    if qkv is not None:  # rows of [B, H + 2 KV, D]: q heads, then keys, then values
        q_arg = qkv.reshape(b, h + 2 * kvh, d)
        q_spec = pl.BlockSpec((None, g, d), lambda bi, ki, si: (bi, ki, 0))
    else:
        q_arg = q.reshape(b, kvh, g, d)
        q_spec = pl.BlockSpec((None, None, g, d), lambda bi, ki, si: (bi, ki, 0, 0))
    in_specs = [
        pl.BlockSpec((None, 1), lambda bi, ki, si: (bi, 0)),
        q_spec,
        cache_spec,
        cache_spec,
        pl.BlockSpec((None, s), lambda bi, ki, si: (bi, 0)),
        pl.BlockSpec((None, g), lambda bi, ki, si: (ki, 0)),
    ]
    args = [lens, q_arg, k_cache, v_cache, mask, sl]
    scale_spec = pl.BlockSpec((None, None, s), lambda bi, ki, si: (bi, ki, 0))
    if quant:
        in_specs += [scale_spec, scale_spec]
        args += [k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)]
    aliases = {}
    if qkv is not None:
        in_specs += [pl.BlockSpec((None, None, d), lambda bi, ki, si: (bi, h + ki, 0)),
                     pl.BlockSpec((None, None, d), lambda bi, ki, si: (bi, h + kvh + ki, 0))]
        args += [q_arg, q_arg]
    elif append:
        row_spec = pl.BlockSpec((None, None, d), lambda bi, ki, si: (bi, ki, 0))
        in_specs += [row_spec, row_spec]
        if quant:  # quantized in the kernel
            args += [k_new, v_new]
        else:
            args += [k_new.astype(k_cache.dtype), v_new.astype(v_cache.dtype)]
    n_caches = 0
    if append:
        n_caches = 4 if quant else 2
        aliases = {2: len(out_shape), 3: len(out_shape) + 1}
        out_specs = [*out_specs, cache_spec, cache_spec]
        out_shape = [*out_shape, jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                     jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)]
        if quant:
            aliases.update({6: len(out_shape), 7: len(out_shape) + 1})
            out_specs += [scale_spec, scale_spec]
            out_shape += [jax.ShapeDtypeStruct(k_scales.shape, jnp.float32)] * 2
    outs = pl.pallas_call(
        kernel,
        grid=(b, kvh, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="alibi_decode",
    )(*args)
    caches = tuple(outs[len(outs) - n_caches:])
    outs = outs[:len(outs) - n_caches]
    out_dtype = (q if qkv is None else qkv).dtype
    if not partial:
        o = outs[0].reshape(b, h, d)
        return (o, *caches) if append else o
    # One more launch merges the partial states (XLA would take three or four).
    part = lambda *blk: pl.BlockSpec((None, None, splits, *blk),  # noqa: E731
                                     lambda bi, ki: (bi, ki, 0, *[0] * len(blk)))
    o = pl.pallas_call(
        functools.partial(_combine_kernel, group=g),
        grid=(b, kvh),
        in_specs=[part(g), part(g), part(g, d)],
        out_specs=pl.BlockSpec((None, None, g, d), lambda bi, ki: (bi, ki, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, kvh, g, d), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="alibi_decode_combine",
    )(*outs).reshape(b, h, d)
    return (o, *caches) if append else o
