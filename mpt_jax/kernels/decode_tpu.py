"""Decode attention for TPUs: one new query token per row against a KV cache, as one Pallas
(Mosaic TPU) kernel per layer.

Grid (B, KV, S / block_s), the slot blocks last ("arbitrary": the online softmax's running max,
sum and weighted values stay in VMEM scratch across them). Program (b, kv, j) scores the
G = H / KV query heads of KV head kv against row b's slots [j * block_s, (j + 1) * block_s) as one
[G, D] x [D, block_s] matrix product, adds ALiBi slope_h * (pos_j - pos_q) from iotas, and masks
the slots at or past cache_len[b] and, when given, those where kv_mask is 0 (left padding). The
row lengths are scalar-prefetched into SMEM: the index maps clamp j to the row's last filled
block, so the pipeline issues no copy for the empty tail of a half-full cache (a repeated block
index is not fetched again) and the kernel skips its compute there (pl.when).

Appending (k_new / v_new given): the caches are aliased to outputs (updated in place under jit
when donated or loop-carried). Besides the output rows, each (b, kv) program writes one small
output block of the cache: the `window` slots (a whole sublane tile) around slot cache_len - 1,
taken from the block it has just read with the new row put in. Its index map depends on (b, kv)
only, so it is written back to HBM once, after the program's last step; no other slot of the
cache is written. The scores of slot cache_len - 1 use the new row itself.

There is no split of a row's slots over several programs (the GPU kernel's flash-decoding): a
TPU runs the grid in order on one TensorCore, or on two on megacore chips, which share out the
parallel (B, KV) axes, so splitting only pays when B * KV is 1 (MQA at batch 1), and it would add
a combine pass to every other call.

Layout: q [B, H, D], caches [B, KV, S, D] (attention.decode_attention's layout), cache_len int32
[B], kv_mask [B, S]. The slot block is the whole cache when S <= BLOCK_S, else the largest
multiple of the dtype's sublane tile (8 rows of 32 bits) up to BLOCK_S that divides S;
`supported()` says whether a shape qualifies. Tested on CPU in TPU interpret mode and lowered for
TPU from the CPU (tests/tpu_lowering_test.py); libtpu's Mosaic compiler has never compiled it and
it has never run on a TPU.

Imports from mpt_jax only the TPU flash kernel's interpret and compiler settings.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mpt_jax.kernels.flash_tpu import compiler_params, div, interpret_arg

# Cache slots per grid step at most (a benchmark may sweep it): per step the pipeline holds two
# buffers of a [block_s, D] key block and a value block, 1 MiB at 512 x 128 in float32.
BLOCK_S = 512


def sublane_rows(dtype) -> int:
    """Rows of one (sublane, 128-lane) tile of `dtype`: 8 of 32 bits, 16 of bf16, 32 of int8."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def block_slots(slots: int, dtype, block_s: int | None = None) -> int | None:
    """The slot block for a cache of `slots`: the whole cache when it fits in `block_s`
    (default BLOCK_S), else the largest multiple of the sublane tile up to `block_s` that
    divides `slots`; None when there is none."""
    block_s = BLOCK_S if block_s is None else block_s
    if slots <= block_s:
        return slots
    tile = sublane_rows(dtype)
    for bs in range(block_s - block_s % tile, 0, -tile):
        if slots % bs == 0:
            return bs
    return None


def supported(q_shape, cache_shape, dtype, block_s: int | None = None) -> bool:
    """Whether the kernel takes q `[B, H, D]` against caches `cache_shape` `[B, KV, S, D]` of
    `dtype` (a float type)."""
    b, h, d = q_shape
    bk, kvh, s, dk = cache_shape
    return (jnp.issubdtype(dtype, jnp.floating) and b == bk and d == dk and h % kvh == 0
            and s >= 1 and block_slots(s, dtype, block_s) is not None)


def _last_block(n, block_s: int):
    """The block holding slot n - 1 (block 0 for an empty row)."""
    return div(jnp.maximum(n, 1) - 1, block_s)


def _kernel(lens_ref, *refs, scale, block_s, n_blocks, window, has_alibi, has_mask, append,
            precision):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    rest = refs[3:]
    mask_ref = rest.pop(0) if has_mask else None
    slopes_ref = rest.pop(0) if has_alibi else None
    kn_ref, vn_ref = (rest.pop(0), rest.pop(0)) if append else (None, None)
    o_ref = rest.pop(0)
    kw_ref, vw_ref = (rest.pop(0), rest.pop(0)) if append else (None, None)
    m_sc, l_sc, acc_sc = rest
    b, j = pl.program_id(0), pl.program_id(2)
    n = lens_ref[b]  # valid slots of this row; the query sits at slot n - 1
    start = j * block_s

    @pl.when(j == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(start < n)
    def _():
        k, v = k_ref[...], v_ref[...]  # [bs, D]
        if append:  # slot n - 1 is written by this call: the new row itself
            new_row = start + lax.broadcasted_iota(jnp.int32, (block_s, 1), 0) == n - 1
            k = jnp.where(new_row, kn_ref[...], k)
            v = jnp.where(new_row, vn_ref[...], v)
        s = lax.dot_general(q_ref[...], k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * scale  # [G, bs]
        pos = start + lax.broadcasted_iota(jnp.int32, (1, block_s), 1)
        if has_alibi:
            s = s + slopes_ref[...] * (pos - (n - 1)).astype(jnp.float32)  # [G, 1] x [1, bs]
        valid = pos < n
        if has_mask:
            valid = valid & (mask_ref[...] != 0)
        s = jnp.where(valid, s, -jnp.inf)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe)  # masked slots: exp(-inf) = 0
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
            preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    if append:
        @pl.when(j == _last_block(n, block_s))
        def _():
            # the window's slots from the block just read, slot n - 1 replaced by the new row
            slot = jnp.maximum(n, 1) - 1
            off = pl.multiple_of(div(slot, window) * window - start, window)
            is_new = off + lax.broadcasted_iota(jnp.int32, (window, 1), 0) == slot - start
            kw_ref[...] = jnp.where(is_new, kn_ref[...], k_ref[pl.ds(off, window), :])
            vw_ref[...] = jnp.where(is_new, vn_ref[...], v_ref[pl.ds(off, window), :])

    @pl.when(j == n_blocks - 1)
    def _():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def decode_attention_tpu(q, k_cache, v_cache, cache_len, kv_mask=None, slopes=None, *,
                         k_new=None, v_new=None, scale: float, block_s: int | None = None,
                         interpret: bool = False):
    """q [B, H, D], caches [B, KV, S, D], cache_len int32 [B] (the new token included),
    kv_mask [B, S] or None, slopes float32 [H] or None -> [B, H, D] in q's dtype, as
    attention.decode_attention with one query row. Rows with no visible slot return zeros.

    k_new/v_new [B, KV, D]: the new token's key and value, written into the caches at slot
    cache_len - 1 by this same launch (the caches are aliased to outputs, updated in place
    under jit when donated or loop-carried); returns (out, k_cache, v_cache) then.
    block_s: the most slots per grid step (default BLOCK_S; see block_slots).
    interpret: run in TPU interpret mode (CPU)."""
    return _decode(q, k_cache, v_cache, cache_len, kv_mask, slopes, k_new, v_new,
                   scale=float(scale), block_s=BLOCK_S if block_s is None else block_s,
                   interpret=interpret)


@functools.partial(jax.jit, static_argnames=("scale", "block_s", "interpret"))
def _decode(q, k_cache, v_cache, cache_len, kv_mask, slopes, k_new, v_new, *, scale, block_s,
            interpret):
    b, h, d = q.shape
    _, kvh, s, _ = k_cache.shape
    dtype = k_cache.dtype
    if not supported(q.shape, k_cache.shape, dtype, block_s) or v_cache.shape != k_cache.shape:
        raise ValueError(f"decode kernel: q {q.shape} against caches {k_cache.shape} / "
                         f"{v_cache.shape} of {dtype} (needs KV | H, equal head dims, and "
                         f"{block_s} slots or fewer, or a multiple of {sublane_rows(dtype)} "
                         f"up to {block_s} dividing them)")
    g = h // kvh
    bs = block_slots(s, dtype, block_s)
    n_blocks = s // bs
    rows = sublane_rows(dtype)
    window = rows if bs % rows == 0 else bs
    append = k_new is not None
    has_mask, has_alibi = kv_mask is not None, slopes is not None
    lens = jnp.broadcast_to(jnp.asarray(cache_len, jnp.int32), (b,))

    def blk(bi, ki, j, lens_ref):  # the row's last filled block at most: no copy past it
        return jnp.minimum(j, _last_block(lens_ref[bi], bs))

    head = pl.BlockSpec((None, None, g, d), lambda bi, ki, j, lens_ref: (bi, ki, 0, 0))
    cache = pl.BlockSpec((None, None, bs, d),
                         lambda bi, ki, j, lens_ref: (bi, ki, blk(bi, ki, j, lens_ref), 0))
    in_specs = [head, cache, cache]
    # q in the cache's dtype, as the jnp path multiplies (float32 accumulation either way)
    args = [q.astype(dtype).reshape(b, kvh, g, d), k_cache, v_cache]
    if has_mask:  # [B, blocks, 1, bs]: each block one (1, bs) row, whatever bs is
        in_specs.append(pl.BlockSpec((None, None, 1, bs), lambda bi, ki, j, lens_ref: (
            bi, blk(bi, ki, j, lens_ref), 0, 0)))
        args.append(jnp.asarray(kv_mask).astype(jnp.int32).reshape(b, n_blocks, 1, bs))
    if has_alibi:  # [KV, G, 1]: a column of the group's slopes
        in_specs.append(pl.BlockSpec((None, g, 1), lambda bi, ki, j, lens_ref: (ki, 0, 0)))
        args.append(jnp.asarray(slopes, jnp.float32).reshape(kvh, g, 1))
    out_specs = [head]
    out_shape = [jax.ShapeDtypeStruct((b, kvh, g, d), q.dtype)]
    aliases = {}
    if append:
        row = pl.BlockSpec((None, None, 1, d), lambda bi, ki, j, lens_ref: (bi, ki, 0, 0))
        in_specs += [row, row]
        args += [k_new.astype(dtype).reshape(b, kvh, 1, d),
                 v_new.astype(dtype).reshape(b, kvh, 1, d)]
        win = pl.BlockSpec((None, None, window, d), lambda bi, ki, j, lens_ref: (
            bi, ki, div(jnp.maximum(lens_ref[bi], 1) - 1, window), 0))
        out_specs += [win, win]
        out_shape += [jax.ShapeDtypeStruct(k_cache.shape, dtype),
                      jax.ShapeDtypeStruct(v_cache.shape, dtype)]
        aliases = {2: 1, 3: 2}  # operands counted with the scalar-prefetched lengths first
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT
    kernel = functools.partial(_kernel, scale=scale, block_s=bs, n_blocks=n_blocks,
                               window=window, has_alibi=has_alibi, has_mask=has_mask,
                               append=append, precision=precision)
    outs = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, kvh, n_blocks),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((g, 1), jnp.float32), pltpu.VMEM((g, 1), jnp.float32),
                            pltpu.VMEM((g, d), jnp.float32)],
        ),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=compiler_params(2, 1),
        interpret=interpret_arg(interpret),
        name="alibi_decode_tpu",
    )(lens, *args)
    o = outs[0].reshape(b, h, d)
    return (o, outs[1], outs[2]) if append else o
