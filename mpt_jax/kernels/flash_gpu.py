"""ALiBi flash attention for NVIDIA GPUs: Pallas kernels lowered through Triton.

Three kernels, FlashAttention-2 style:
  forward  grid (q block, B, H): online softmax over KV blocks, writes out and the per-row
           logsumexp (base 2);
  dk/dv    grid (kv block, B, KV): loops over the G query heads of its KV head and over q blocks,
           so GQA/MQA gradients are summed over the group in registers (no K/V copies);
  dq       grid (q block, B, H): loops over KV blocks.
The backward recomputes the probabilities from q, k and the saved logsumexp; the residuals are
q, k, v, out and lse only. delta = rowsum(dout * out) is one fused XLA reduction.

ALiBi is computed in the kernel: score(i, j) = scale * q_i.k_j + slope_h * (pos_j - pos_i). The
row term -slope_h * pos_i is constant along a row, so the kernels add only a column vector per
block (one add per element, fused with the scale) and fold the row term into the saved
logsumexp; the positions are taken relative to a block anchor so no large numbers cancel.

Positions: query i sits at position i + (S - T) (bottom-right alignment), key j at j.
Causal: key j visible to query i iff pos_j <= pos_i. Blocks entirely above the diagonal are
never visited; blocks entirely below it run a body without any mask arithmetic.
Lengths are padded internally to a multiple of the blocks (padded keys are masked, padded query
rows sliced off). Rows that see no key return 0 (their logsumexp is +inf, so their gradient is 0).

On Hopper the forward and/or the backward can run flash_mgpu's Mosaic GPU kernels instead
(`hopper_fwd` / `hopper_bwd`: the attention plan, mpt_jax.model.attention.plan, decides); this
module owns the custom VJP, the padding and the packed layout for both.

Imports from mpt_jax only the other kernels (flash_mgpu, common): slopes come in as an array.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mpt_jax.kernels import common, flash_mgpu

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton launch parameters.

    Defaults: the fastest of a sweep on an H200 (bf16, D=128, causal, B=4, T=2048, H=32; see
    bench/ATTENTION_NOTES.md). Float32 inputs use `BlockSizes.for_float32()`, which fits the
    shared memory (the bf16 tiles at 4 bytes a value ask for 295 KB of 227 KB).
    """

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    num_warps_dkv: int = 4
    num_stages_dkv: int = 2
    block_q_dq: int = 128
    block_k_dq: int = 64
    num_warps_dq: int = 8
    num_stages_dq: int = 3
    # The tiles of flash_mgpu's Mosaic GPU kernels (wgmma, TMA, warp specialisation), for the
    # calls the attention plan runs there on Hopper (sm_90).
    hopper: flash_mgpu.MgpuBlocks = flash_mgpu.MgpuBlocks()  # noqa: RUF009 (frozen)

    @classmethod
    def for_float32(cls) -> "BlockSizes":
        return cls(block_q=64, block_k=64, num_warps=4, num_stages=2,
                   block_q_dkv=32, block_k_dkv=64, num_warps_dkv=4, num_stages_dkv=2,
                   block_q_dq=64, block_k_dq=32, num_warps_dq=4, num_stages_dq=2)

    @classmethod
    def default(cls, dtype) -> "BlockSizes":
        """The defaults for inputs of `dtype`: `for_float32()` past two bytes a value."""
        return cls.for_float32() if jnp.dtype(dtype).itemsize > 2 else cls()


def _dot(a, b, *, ta=False, tb=False):
    """a @ b with optional transposes, float32 accumulation."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static description of one call (hashable: it parameterises the custom VJP)."""

    seq_q: int  # real lengths
    seq_k: int
    offset: int  # pos(query i) = i + offset
    group: int  # query heads per KV head
    scale: float
    causal: bool
    has_alibi: bool
    has_segments: bool
    blocks: BlockSizes
    interpret: bool
    poison: bool = False  # tests: outputs start as NaN buffers, so unwritten elements show
    # packed: q, k and v are one array [B, T, H + 2 KV, D] (the fused projection's output):
    # query heads first, then the keys' and the values' heads; the gradient is one such array.
    heads: int = 0  # H (packed only)
    hopper_fwd: bool = False  # flash_mgpu kernels run the forward / the backward
    hopper_bwd: bool = False
    # chunk_attention_gpu (forward only): pos(query i) = i + offset[b], a traced int32 per
    # row in place of the static offset; keys and values in the cache's [B, KV, S, D] layout.
    cache: bool = False

    @property
    def packed(self) -> bool:
        return self.heads > 0

    def kv_offsets(self):
        """Head index of KV head 0 of k and of v in the array the kernels read."""
        if not self.packed:
            return 0, 0
        return self.heads, self.heads + self.heads // self.group


def _pallas_call(cfg: _Cfg, kernel, *, grid, in_specs, out_specs, out_shape, warps, stages, name,
                 n_acc=0):
    """pl.pallas_call; with cfg.poison the outputs alias NaN-filled inputs the kernel ignores.

    n_acc > 0: the last n_acc outputs are written in place over the last n_acc inputs, which
    alias them (never poisoned): the packed dq kernel writes its heads into the gradient the
    dk/dv kernel began. The kernel sees (*inputs without the aliased ones, *outputs).
    """
    n_in, n_out = len(in_specs), len(out_shape)
    n_real = n_in - n_acc
    n_pois = n_out - n_acc if cfg.poison else 0
    n_flat = sum(spec is not None for spec in in_specs)  # aliases count array inputs only
    n_real_flat = n_flat - n_acc
    aliases = {n_real_flat + i: n_out - n_acc + i for i in range(n_acc)}
    aliases.update({n_flat + i: i for i in range(n_pois)})

    def wrapped_kernel(*refs):
        return kernel(*refs[:n_real], *refs[n_in + n_pois:])

    call = pl.pallas_call(
        wrapped_kernel if aliases else kernel, grid=grid,
        in_specs=[*in_specs, *out_specs[:n_pois]], out_specs=out_specs, out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=cfg.interpret, name=name)

    def run(*args):
        nans = [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape[:n_pois]]
        return call(*args, *nans)

    return run


def _seg_mask(qseg_ref, kvseg_ref, qs, bq, ks, bk):
    qseg = qseg_ref[pl.ds(qs, bq)]
    kvseg = kvseg_ref[pl.ds(ks, bk)]
    return qseg[:, None] == kvseg[None, :]


def _mask(cfg: _Cfg, qseg_ref, kvseg_ref, qs, bq, ks, bk, offset=None):
    """Visibility of the [bq, bk] block at (query qs, key ks): causal, key tail, segments.
    offset: pos(query i) - i (default cfg.offset; a chunk's traced start)."""
    offset = cfg.offset if offset is None else offset
    kidx = ks + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    mask = kidx < cfg.seq_k
    if cfg.causal:
        qpos = qs + offset + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        mask = mask & (kidx <= qpos)
    if cfg.has_segments:
        mask = mask & _seg_mask(qseg_ref, kvseg_ref, qs, bq, ks, bk)
    return mask


def _kv_range(cfg: _Cfg, qs, bq, bk, offset=None):
    """KV blocks [0, n_full) need no mask, [n_full, n_end) do; blocks past n_end are skipped."""
    offset = cfg.offset if offset is None else offset
    n_valid = pl.cdiv(cfg.seq_k, bk)
    if cfg.causal:
        last = jnp.minimum(qs + bq + offset, cfg.seq_k)  # one past the last visible key
        n_end = jnp.maximum(lax.div(last + bk - 1, jnp.int32(bk)), 0)
        n_full = jnp.minimum(lax.div(jnp.maximum(qs + offset + 1, 0), jnp.int32(bk)),
                             cfg.seq_k // bk)
    else:
        n_end = n_valid
        n_full = cfg.seq_k // bk
    if cfg.has_segments:
        n_full = 0
    n_full = jnp.minimum(n_full, n_end)
    return n_full, n_end


def _scores(cfg: _Cfg, q, k, ks, *, anchor, slope2, masked, qseg_ref, kvseg_ref, qs,
            offset=None):
    """log2-domain scores `[bq, bk]` of a query block against keys ks .. ks+bk: the softmax
    scale, ALiBi's column term slope * (pos_j - anchor) (the row term is constant per row and
    dropped), and, for blocks that need it, the causal/segment mask as -inf."""
    bq, bk = q.shape[0], k.shape[0]
    s = _dot(q, k, tb=True) * (cfg.scale * LOG2E)
    if cfg.has_alibi:
        kcol = (ks - anchor + lax.broadcasted_iota(jnp.int32, (1, bk), 1)).astype(jnp.float32)
        s = s + slope2[:, None] * kcol
    if masked:
        s = jnp.where(_mask(cfg, qseg_ref, kvseg_ref, qs, bq, ks, bk, offset), s, -jnp.inf)
    return s


# ----------------------------------------------------------------------------------------------
# forward


def _fwd_kernel(q_ref, k_ref, v_ref, slopes_ref, qseg_ref, kvseg_ref, off_ref, o_ref, lse_ref,
                *, cfg):
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_k
    n_qb = pl.num_programs(0)
    qb = n_qb - 1 - pl.program_id(0)  # longest rows first
    h = pl.program_id(2)
    qs = qb * bq
    q = q_ref[...]
    d = q.shape[-1]
    offset = off_ref[0] if cfg.cache else cfg.offset
    anchor = qs + offset  # position of row 0 of this block
    slope2 = slopes_ref[pl.ds(h, 1)] * LOG2E if cfg.has_alibi else None  # [1]

    def body(j, carry, masked):
        acc, m, l = carry
        ks = j * bk
        k = k_ref[pl.ds(ks, bk), :]
        v = v_ref[pl.ds(ks, bk), :]
        s = _scores(cfg, q, k, ks, anchor=anchor, slope2=slope2, masked=masked,
                    qseg_ref=qseg_ref, kvseg_ref=kvseg_ref, qs=qs, offset=offset)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        if masked:
            m_new_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        else:
            m_new_safe = m_new
        alpha = jnp.exp2(m - m_new_safe)
        p = jnp.exp2(s - m_new_safe[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
        return acc, m_new, l

    n_full, n_end = _kv_range(cfg, qs, bq, bk, offset)
    carry = (
        jnp.zeros((bq, d), jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    acc, m, l = lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), carry)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse = m + jnp.log2(l_safe)
    if cfg.has_alibi:  # fold the dropped row term -slope * (pos_i - anchor) back in
        lse = lse - slope2 * lax.broadcasted_iota(jnp.int32, (bq,), 0).astype(jnp.float32)
    lse_ref[...] = jnp.where(empty, jnp.inf, lse)


def _specs_seg(cfg, tp, sp, idx_b):
    if not cfg.has_segments:
        return [None, None]
    return [pl.BlockSpec((None, tp), lambda *g: (idx_b(*g), 0)),
            pl.BlockSpec((None, sp), lambda *g: (idx_b(*g), 0))]


def _mgpu_cfg(cfg: _Cfg, h, d):
    ko, vo = cfg.kv_offsets()
    return flash_mgpu.make_cfg(heads=h, group=cfg.group, head_dim=d, scale=cfg.scale,
                               has_alibi=cfg.has_alibi, seq_q=cfg.seq_q, seq_k=cfg.seq_k,
                               has_segments=cfg.has_segments, offsets=(0, ko, vo),
                               blocks=cfg.blocks.hopper)


def _hopper(cfg: _Cfg) -> bool:
    """Both passes on flash_mgpu: q, k, v at their real lengths, segment ids unpadded. (The
    Hopper forward before the Triton backward reads the Triton kernels' padded inputs.)"""
    return cfg.hopper_fwd and cfg.hopper_bwd


def _forward(cfg: _Cfg, q, k, v, slopes, qseg, kvseg, off=None):
    """off: int32 [B, 1], each row's query offset (cfg.cache: k, v [B, KV, S, D])."""
    b, tp, h, d = q.shape
    h = cfg.heads or h
    if cfg.hopper_fwd:
        out, lse = flash_mgpu.forward(_mgpu_cfg(cfg, h, d), q, k, v, slopes, qseg, kvseg)
        return out, (lse if _hopper(cfg) else lse[:, :, :tp])  # Triton's: [B, H, tp]
    sp = k.shape[2] if cfg.cache else k.shape[1]
    bs = cfg.blocks
    bq = bs.block_q
    n_qb = tp // bq
    g = cfg.group
    ko, vo = cfg.kv_offsets()
    grid = (n_qb, b, h)
    rev = lambda i: n_qb - 1 - i  # noqa: E731
    if cfg.cache:
        kv_specs = [pl.BlockSpec((None, None, sp, d), lambda i, bi, hi: (bi, hi // g, 0, 0))] * 2
    else:
        kv_specs = [
            pl.BlockSpec((None, sp, None, d), lambda i, bi, hi: (bi, 0, hi // g + ko, 0)),
            pl.BlockSpec((None, sp, None, d), lambda i, bi, hi: (bi, 0, hi // g + vo, 0))]
    in_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, rev(i), hi, 0)),
        *kv_specs,
        pl.BlockSpec((slopes.shape[0],), lambda i, bi, hi: (0,)),
        *_specs_seg(cfg, tp, sp, lambda i, bi, hi: bi),
        pl.BlockSpec((None, 1), lambda i, bi, hi: (bi, 0)) if cfg.cache else None,
    ]
    out_specs = [
        pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, rev(i), hi, 0)),
        pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, rev(i))),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((b, tp, h, d), q.dtype),
        jax.ShapeDtypeStruct((b, h, tp), jnp.float32),
    ]
    return _pallas_call(
        cfg, functools.partial(_fwd_kernel, cfg=cfg), grid=grid, in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape, warps=bs.num_warps, stages=bs.num_stages,
        name="alibi_chunk_fwd" if cfg.cache else "alibi_flash_fwd",
    )(q, k, v, slopes, qseg, kvseg, off)


# ----------------------------------------------------------------------------------------------
# backward: dk/dv


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, slopes_ref, qseg_ref, kvseg_ref,
                dk_ref, dv_ref=None, *, cfg):
    """dk, dv of one KV block. Packed: dk_ref is the block of rows of the packed gradient
    [bk, H + 2 KV, D] (dv_ref None); dk and dv go to this KV head's key and value heads in it."""
    bq, bk = cfg.blocks.block_q_dkv, cfg.blocks.block_k_dkv
    kb = pl.program_id(0)
    kvh = pl.program_id(2)
    ks = kb * bk
    c = cfg.scale * LOG2E
    k = k_ref[...]
    v = v_ref[...]
    d = k.shape[-1]
    kcol = lax.broadcasted_iota(jnp.int32, (1, bk), 1).astype(jnp.float32)  # pos_j - ks

    # q blocks: [lo, full) need the causal/segment mask, [full, hi) do not
    hi = pl.cdiv(cfg.seq_q, bq)
    if cfg.causal:
        first_q = jnp.maximum(ks - cfg.offset, 0)  # first query index that sees key ks
        lo = jnp.minimum(lax.div(first_q, jnp.int32(bq)), hi)
        full_q = jnp.maximum(ks + bk - 1 - cfg.offset, 0)  # first query seeing the whole block
        full = jnp.minimum(lax.div(full_q + bq - 1, jnp.int32(bq)), hi)
    else:
        lo = 0
        full = 0
    if cfg.has_segments:
        full = hi

    def group_body(gi, carry):
        dk, dv = carry
        hq = kvh * cfg.group + gi
        if cfg.has_alibi:
            slope2 = slopes_ref[pl.ds(hq, 1)] * LOG2E  # [1]
            kbias = slope2[:, None] * kcol  # [1, bk]

        def body(j, carry, masked):
            dk, dv = carry
            qs = j * bq
            q = q_ref[pl.ds(qs, bq), gi, :]
            do = do_ref[pl.ds(qs, bq), gi, :]
            lse = lse_ref[gi, pl.ds(qs, bq)]
            delta = delta_ref[gi, pl.ds(qs, bq)]
            s = _dot(q, k, tb=True) * c
            if cfg.has_alibi:
                rowpos = (qs + cfg.offset - ks
                          + lax.broadcasted_iota(jnp.int32, (bq,), 0)).astype(jnp.float32)
                lse = lse + slope2 * rowpos
                s = s + kbias
            s = s - lse[:, None]
            if masked:
                s = jnp.where(_mask(cfg, qseg_ref, kvseg_ref, qs, bq, ks, bk), s, -jnp.inf)
            p = jnp.exp2(s)
            dv = dv + _dot(p.astype(do.dtype), do, ta=True)
            dp = _dot(do, v, tb=True)
            ds = p * (dp - delta[:, None])
            dk = dk + _dot(ds.astype(q.dtype), q, ta=True)
            return dk, dv

        carry = lax.fori_loop(lo, full, functools.partial(body, masked=True), (dk, dv))
        return lax.fori_loop(full, hi, functools.partial(body, masked=False), carry)

    zeros = jnp.zeros((bk, d), jnp.float32)
    if cfg.group == 1:
        dk, dv = group_body(0, (zeros, zeros))
    else:
        dk, dv = lax.fori_loop(0, cfg.group, group_body, (zeros, zeros))
    if cfg.packed:
        ko, vo = cfg.kv_offsets()
        dk_ref[:, ko + kvh, :] = (dk * cfg.scale).astype(dk_ref.dtype)
        dk_ref[:, vo + kvh, :] = dv.astype(dk_ref.dtype)
        return
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward_dkv(cfg: _Cfg, q, k, v, do, lse, delta, slopes, qseg, kvseg):
    """dk, dv. Packed: the packed gradient [B, Tp, H + 2 KV, D] with its dk and dv heads
    written (dq heads not)."""
    b, tp, h, d = do.shape
    g = cfg.group
    kvh = h // g
    sp = k.shape[1]
    bs = cfg.blocks
    bk = bs.block_k_dkv
    ko, vo = cfg.kv_offsets()
    lse4 = lse.reshape(b, kvh, g, tp)
    delta4 = delta.reshape(b, kvh, g, tp)
    grid = (sp // bk, b, kvh)
    # a KV head's G query heads: one [tp, G, D] block of q (and of do)
    qspec = pl.BlockSpec((None, tp, g, d), lambda i, bi, hi: (bi, 0, hi, 0))
    rowspec = pl.BlockSpec((None, None, g, tp), lambda i, bi, hi: (bi, hi, 0, 0))
    kspec = pl.BlockSpec((None, bk, None, d), lambda i, bi, hi: (bi, i, hi + ko, 0))
    vspec = pl.BlockSpec((None, bk, None, d), lambda i, bi, hi: (bi, i, hi + vo, 0))
    in_specs = [
        qspec, kspec, vspec, qspec, rowspec, rowspec,
        pl.BlockSpec((slopes.shape[0],), lambda i, bi, hi: (0,)),
        *_specs_seg(cfg, tp, sp, lambda i, bi, hi: bi),
    ]
    args = [q, k, v, do, lse4, delta4, slopes, qseg, kvseg]
    if cfg.packed:  # every program writes its own heads of the same rows
        out_specs = [pl.BlockSpec((None, bk, q.shape[2], d), lambda i, bi, hi: (bi, i, 0, 0))]
        out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    else:
        out_specs = [kspec, kspec]
        out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype),
                     jax.ShapeDtypeStruct(v.shape, v.dtype)]
    outs = _pallas_call(
        cfg, functools.partial(_dkv_kernel, cfg=cfg), grid=grid, in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape, warps=bs.num_warps_dkv,
        stages=bs.num_stages_dkv, name="alibi_flash_bwd_dkv",
    )(*args)
    return outs[0] if cfg.packed else outs


# ----------------------------------------------------------------------------------------------
# backward: dq


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, slopes_ref, qseg_ref, kvseg_ref,
               dq_ref, *, cfg):
    bq, bk = cfg.blocks.block_q_dq, cfg.blocks.block_k_dq
    n_qb = pl.num_programs(0)
    qb = n_qb - 1 - pl.program_id(0)
    h = pl.program_id(2)
    qs = qb * bq
    q = q_ref[...]
    do = do_ref[...]
    d = q.shape[-1]
    lse = lse_ref[...]
    delta = delta_ref[...]
    anchor = qs + cfg.offset
    slope2 = slopes_ref[pl.ds(h, 1)] * LOG2E if cfg.has_alibi else None
    if cfg.has_alibi:
        lse = lse + slope2 * lax.broadcasted_iota(jnp.int32, (bq,), 0).astype(jnp.float32)

    def body(j, dq, masked):
        ks = j * bk
        k = k_ref[pl.ds(ks, bk), :]
        v = v_ref[pl.ds(ks, bk), :]
        s = _scores(cfg, q, k, ks, anchor=anchor, slope2=slope2, masked=masked,
                    qseg_ref=qseg_ref, kvseg_ref=kvseg_ref, qs=qs)
        p = jnp.exp2(s - lse[:, None])  # masked: -inf - lse = -inf -> 0
        dp = _dot(do, v, tb=True)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    n_full, n_end = _kv_range(cfg, qs, bq, bk)
    dq = jnp.zeros((bq, d), jnp.float32)
    dq = lax.fori_loop(0, n_full, functools.partial(body, masked=False), dq)
    dq = lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), dq)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _backward_dq(cfg: _Cfg, q, k, v, do, lse, delta, slopes, qseg, kvseg, dkv=None):
    """dq. Packed: dkv is _backward_dkv's packed gradient; its dq heads are written in place
    and the whole gradient returned."""
    b, tp, h, d = do.shape
    sp = k.shape[1]
    g = cfg.group
    ko, vo = cfg.kv_offsets()
    bs = cfg.blocks
    bq = bs.block_q_dq
    n_qb = tp // bq
    rev = lambda i: n_qb - 1 - i  # noqa: E731
    qspec = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, rev(i), hi, 0))
    kspec = pl.BlockSpec((None, sp, None, d), lambda i, bi, hi: (bi, 0, hi // g + ko, 0))
    vspec = pl.BlockSpec((None, sp, None, d), lambda i, bi, hi: (bi, 0, hi // g + vo, 0))
    rowspec = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, rev(i)))
    in_specs = [
        qspec, kspec, vspec, qspec, rowspec, rowspec,
        pl.BlockSpec((slopes.shape[0],), lambda i, bi, hi: (0,)),
        *_specs_seg(cfg, tp, sp, lambda i, bi, hi: bi),
    ]
    args = [q, k, v, do, lse, delta, slopes, qseg, kvseg]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if cfg.packed:  # the dk/dv heads already written ride through, aliased (never poisoned)
        in_specs.append(qspec)
        args.append(dkv)
    return _pallas_call(
        cfg, functools.partial(_dq_kernel, cfg=cfg), grid=(n_qb, b, h), in_specs=in_specs,
        out_specs=[qspec], out_shape=out_shape, warps=bs.num_warps_dq, stages=bs.num_stages_dq,
        name="alibi_flash_bwd_dq", n_acc=int(cfg.packed),
    )(*args)


# ----------------------------------------------------------------------------------------------
# custom VJP on padded inputs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, slopes, qseg, kvseg):
    return _forward(cfg, q, k, v, slopes, qseg, kvseg)[0]


def _flash_fwd(cfg, q, k, v, slopes, qseg, kvseg):
    out, lse = common.name_residuals(*_forward(cfg, q, k, v, slopes, qseg, kvseg))
    return out, (q, k, v, slopes, qseg, kvseg, out, lse)


def _delta(out, do, rows=None):
    """rowsum(dout * out) `[B, H, Tp]` float32: the backward kernels' softmax correction
    (rows: padded with zeros to that many)."""
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    return delta if rows is None else common.pad_to(delta, 2, rows)


def _hopper_backward(cfg: _Cfg, q, k, v, slopes, qseg, kvseg, out, lse, do, h):
    """flash_mgpu's backward: [B, T, H + 2 KV, D] (dq, dk, dv heads)."""
    mcfg = _mgpu_cfg(cfg, h, q.shape[3])
    delta = _delta(out, do, lse.shape[2])
    return flash_mgpu.backward(mcfg, q, k, v, slopes, do, lse, delta, qseg, kvseg)


def _flash_bwd(cfg, res, do):
    q, k, v, slopes, qseg, kvseg, out, lse = res
    if cfg.hopper_bwd:
        h, kvh = q.shape[2], k.shape[2]
        dx = _hopper_backward(cfg, q, k, v, slopes, qseg, kvseg, out, lse, do, h)
        dq, dk, dv = dx[:, :, :h], dx[:, :, h:h + kvh], dx[:, :, h + kvh:]
    else:
        delta = _delta(out, do)
        dk, dv = _backward_dkv(cfg, q, k, v, do, lse, delta, slopes, qseg, kvseg)
        (dq,) = _backward_dq(cfg, q, k, v, do, lse, delta, slopes, qseg, kvseg)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash_packed(cfg, x, slopes, qseg, kvseg):
    return _forward(cfg, x, x, x, slopes, qseg, kvseg)[0]


def _flash_packed_fwd(cfg, x, slopes, qseg, kvseg):
    out, lse = common.name_residuals(*_forward(cfg, x, x, x, slopes, qseg, kvseg))
    return out, (x, slopes, qseg, kvseg, out, lse)


def _flash_packed_bwd(cfg, res, do):
    x, slopes, qseg, kvseg, out, lse = res
    if cfg.hopper_bwd:  # its [B, T, H + 2 KV, D] gradient is the packed layout
        dx = _hopper_backward(cfg, x, x, x, slopes, qseg, kvseg, out, lse, do, cfg.heads)
        return dx, None, None, None
    delta = _delta(out, do)
    dkv = _backward_dkv(cfg, x, x, x, do, lse, delta, slopes, qseg, kvseg)
    (dx,) = _backward_dq(cfg, x, x, x, do, lse, delta, slopes, qseg, kvseg, dkv=dkv)
    return dx, None, None, None


_flash_packed.defvjp(_flash_packed_fwd, _flash_packed_bwd)


def _fit_blocks(bs: BlockSizes, t: int, s: int) -> BlockSizes:
    """The blocks cut down to the lengths (Triton dots need at least 16 rows)."""
    def q(block):
        return common.fit_block(block, t, 16)

    def k(block):
        return common.fit_block(block, s, 16)

    return dataclasses.replace(
        bs, block_q=q(bs.block_q), block_k=k(bs.block_k), block_q_dkv=q(bs.block_q_dkv),
        block_k_dkv=k(bs.block_k_dkv), block_q_dq=q(bs.block_q_dq), block_k_dq=k(bs.block_k_dq))


def _padded_lengths(bs: BlockSizes, t: int, s: int, d: int) -> tuple[int, int, int]:
    """(T, S, D) padded to whole blocks (of bs fitted to t, s) and to a power-of-two head dim."""
    mq = max(bs.block_q, bs.block_q_dkv, bs.block_q_dq)  # powers of two: the max is the lcm
    mk = max(bs.block_k, bs.block_k_dkv, bs.block_k_dq)
    return pl.cdiv(t, mq) * mq, pl.cdiv(s, mk) * mk, max(16, pl.next_power_of_2(d))


def takes_packed(t: int, d: int, dtype, block_sizes: BlockSizes | None = None) -> bool:
    """Whether `flash_attention_gpu_packed` takes a fused projection of T rows and head dim D:
    no padding needed (T a multiple of the blocks, D a power of two >= 16)."""
    bs = _fit_blocks(block_sizes or BlockSizes.default(dtype), t, t)
    return _padded_lengths(bs, t, t, d) == (t, t, d)


class _Prepared(NamedTuple):
    """One call's static config, padded lengths, and padded slopes / segment ids."""

    cfg: _Cfg
    tp: int  # T, S and D padded to whole blocks
    sp: int
    dp: int
    slopes: jax.Array  # float32 [next power of two >= H]
    qseg: jax.Array | None  # int32 [B, tp]
    kvseg: jax.Array | None  # int32 [B, sp]


def _prepare(q_shape, kvh, s, dtype, alibi_slopes, q_segment_ids, kv_segment_ids, *, causal,
             softmax_scale, block_sizes, interpret, poison, hopper_fwd, hopper_bwd,
             heads=0) -> _Prepared:
    _, t, h, d = q_shape
    if poison and (hopper_fwd or hopper_bwd):
        raise ValueError("_poison tests the Triton kernels; the Mosaic GPU ones do not take it")
    bs = _fit_blocks(block_sizes or BlockSizes.default(dtype), t, s)
    tp, sp, dp = _padded_lengths(bs, t, s, d)
    if hopper_fwd and hopper_bwd:  # flash_mgpu takes any length its TMA views take and pads
        tp, sp = (flash_mgpu.padded_length(n) for n in (t, s))  # the segment ids itself
        qseg, kvseg = common.padded_segments(q_segment_ids, kv_segment_ids, t, s)
    else:
        qseg, kvseg = common.padded_segments(q_segment_ids, kv_segment_ids, tp, sp)
    cfg = _Cfg(seq_q=t, seq_k=s, offset=s - t, group=h // kvh,
               scale=common.softmax_scale(d, softmax_scale), causal=causal,
               has_alibi=alibi_slopes is not None, has_segments=qseg is not None, blocks=bs,
               interpret=interpret, poison=poison, heads=heads, hopper_fwd=hopper_fwd,
               hopper_bwd=hopper_bwd)
    hp = pl.next_power_of_2(h)
    if alibi_slopes is None:
        slopes = jnp.zeros((hp,), jnp.float32)
    else:
        slopes = common.pad_to(jnp.asarray(alibi_slopes, jnp.float32).reshape(h), 0, hp)
    return _Prepared(cfg, tp, sp, dp, slopes, qseg, kvseg)


def flash_attention_gpu_packed(
    qkv,
    n_heads: int,
    kv_heads: int,
    alibi_slopes=None,
    *,
    causal: bool = True,
    segment_ids=None,
    softmax_scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    hopper_fwd: bool = False,
    hopper_bwd: bool = False,
    _poison: bool = False,
):
    """Self-attention straight from the fused projection: qkv [B, T, (H + 2 KV) * D] (query
    heads, then key heads, then value heads, as MPT's Wqkv lays them out) -> out [B, T, H, D].

    The kernels read q, k and v in place, and the gradient comes back as one array shaped like
    qkv (no slices before, no concatenation after). Only for shapes that need no padding
    (`takes_packed`); ValueError otherwise. segment_ids int32 [B, T] or None. hopper_fwd /
    hopper_bwd: run flash_mgpu's kernels for the forward / the backward (the caller checks
    flash_mgpu.supported).
    """
    b, t, _ = qkv.shape
    h, kvh = n_heads, kv_heads
    d = common.packed_head_dim(qkv.shape, h, kvh)
    if not takes_packed(t, d, qkv.dtype, block_sizes):
        raise ValueError(f"the packed kernels need T a multiple of the blocks and a power-of-two "
                         f"head dim >= 16; got T={t}, D={d} (slice q, k, v instead)")
    p = _prepare((b, t, h, d), kvh, t, qkv.dtype, alibi_slopes, segment_ids, segment_ids,
                 causal=causal, softmax_scale=softmax_scale, block_sizes=block_sizes,
                 interpret=interpret, poison=_poison, hopper_fwd=hopper_fwd,
                 hopper_bwd=hopper_bwd, heads=h)
    x = qkv.reshape(b, t, h + 2 * kvh, d)
    return _flash_packed(p.cfg, x, p.slopes, p.qseg, p.qseg)


def flash_attention_gpu(
    q,
    k,
    v,
    alibi_slopes=None,
    *,
    causal: bool = True,
    q_segment_ids=None,
    kv_segment_ids=None,
    softmax_scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
    hopper_fwd: bool = False,
    hopper_bwd: bool = False,
    _poison: bool = False,
):
    """q [B, T, H, D], k/v [B, S, KV, D] (S >= T, KV divides H) -> out [B, T, H, D].

    alibi_slopes float32 [H] or None; q_segment_ids int32 [B, T] and kv_segment_ids [B, S]
    (both or neither). Differentiable in q, k, v (not in the slopes). hopper_fwd / hopper_bwd:
    flash_mgpu's kernels run the forward / the backward (the caller checks
    flash_mgpu.supported; the backward needs S == T).
    """
    t, d = q.shape[1], q.shape[3]
    s, kvh = k.shape[1], k.shape[2]
    p = _prepare(q.shape, kvh, s, q.dtype, alibi_slopes, q_segment_ids, kv_segment_ids,
                 causal=causal, softmax_scale=softmax_scale, block_sizes=block_sizes,
                 interpret=interpret, poison=_poison, hopper_fwd=hopper_fwd,
                 hopper_bwd=hopper_bwd)
    qp = common.pad_to(common.pad_to(q, 1, p.tp), 3, p.dp)
    kp = common.pad_to(common.pad_to(k, 1, p.sp), 3, p.dp)
    vp = common.pad_to(common.pad_to(v, 1, p.sp), 3, p.dp)
    out = _flash(p.cfg, qp, kp, vp, p.slopes, p.qseg, p.kvseg)
    return out[:, :t, :, :d]


# ----------------------------------------------------------------------------------------------
# a chunk of new tokens against a KV cache (forward only)


def chunk_slots(n: int) -> int:
    """n cache slots rounded up to whole key blocks of the chunk kernel (its bf16 and float32
    default blocks alike): a cache of that length is read in place (chunk_supported)."""
    block = max(BlockSizes().block_k, BlockSizes.for_float32().block_k)
    return -(-n // block) * block


def chunk_supported(q_shape, kv_heads: int, slots: int, dtype,
                    block_sizes: BlockSizes | None = None) -> bool:
    """Whether `chunk_attention_gpu` takes q `[B, T, H, D]` against caches of `slots` positions
    in `dtype`: T > 1, a float cache whose slots fill whole key blocks (it is read in place, so
    it cannot be padded), D a power of two >= 16, KV dividing H."""
    _, t, h, d = q_shape
    if t < 2 or h % kv_heads or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16,
                                                          jnp.float32):
        return False
    bs = _fit_blocks(block_sizes or BlockSizes.default(dtype), t, slots)
    return _padded_lengths(bs, t, slots, d)[1:] == (slots, d)


def chunk_attention_gpu(q, k_cache, v_cache, start, alibi_slopes=None, kv_mask=None, *,
                        softmax_scale: float | None = None,
                        block_sizes: BlockSizes | None = None, interpret: bool = False,
                        _poison: bool = False):
    """T new tokens against a KV cache that already holds them: q `[B, T, H, D]`, caches
    `[B, KV, S, D]` (attention.decode_attention's layout, read in place), start int32 scalar
    or `[B]`: query i of row b sits at position start[b] + i and sees keys j <= start[b] + i
    (and, with kv_mask `[B, S]`, only where it is True). -> `[B, T, H, D]` in q's dtype.

    The forward kernel above with the offset a per-row traced value, so a chunk at any depth
    of the cache is one compilation; key blocks past the chunk's last position are never
    read, so the cost follows start + T, not S. (The serving engine's prefill chunks and any
    multi-token step against a cache; `chunk_supported` says which shapes qualify.)
    """
    b, t, h, d = q.shape
    _, kvh, s, _ = k_cache.shape
    if not chunk_supported(q.shape, kvh, s, k_cache.dtype, block_sizes):
        raise ValueError(f"chunk_attention_gpu: q {q.shape} against caches {k_cache.shape} "
                         f"({k_cache.dtype}) is not supported (see chunk_supported)")
    p = _prepare(q.shape, kvh, s, k_cache.dtype, alibi_slopes,
                 None if kv_mask is None else jnp.ones((b, t), jnp.int32),
                 None if kv_mask is None else jnp.asarray(kv_mask).astype(bool).astype(
                     jnp.int32),  # any nonzero entry is visible, as in the jnp path
                 causal=True, softmax_scale=softmax_scale, block_sizes=block_sizes,
                 interpret=interpret, poison=_poison, hopper_fwd=False, hopper_bwd=False)
    cfg = dataclasses.replace(p.cfg, offset=0, cache=True)
    off = jnp.broadcast_to(jnp.asarray(start, jnp.int32), (b,)).reshape(b, 1)
    qp = common.pad_to(q.astype(k_cache.dtype), 1, p.tp)
    out, _ = _forward(cfg, qp, k_cache, v_cache, p.slopes, p.qseg, p.kvseg, off)
    return out[:, :t].astype(q.dtype)
