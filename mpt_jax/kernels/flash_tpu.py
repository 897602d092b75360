"""ALiBi flash attention for TPUs: Pallas kernels for Mosaic TPU (forward, dq, dk/dv).

Layout: the wrapper moves heads ahead of time ([B, H, T, D]) so each block is a [rows, D] tile
in the last two dimensions, as Mosaic wants. Grids put the reduction axis last ("arbitrary")
and keep running state in VMEM scratch:
  forward  (B, H, q block, kv block): online softmax, out + per-row logsumexp (natural log);
  dq       (B, H, q block, kv block);
  dk/dv    (B, KV, kv block, group head, q block): GQA/MQA gradients summed over the group in
           the scratch accumulators, K/V never copied per query head (index_map h // G).
Causal: blocks above the diagonal do no work (pl.when) and their index_map repeats the last
useful block, so the pipeline issues no copy for them. ALiBi slope_h * (pos_j - pos_i) is
computed per block from the slopes (SMEM) and iotas. Positions: query i at i + (S - T), key j
at j. Rows that see no key return 0 (logsumexp +inf, gradient 0). Lengths are padded to the
block internally. Tested on CPU in TPU interpret mode and lowered for TPU from the CPU
(tests/tpu_lowering_test.py); libtpu's Mosaic compiler has never compiled it and it has never run
on a TPU (none was available).

Imports from mpt_jax only the kernels' shared helpers (mpt_jax.kernels.common).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mpt_jax.kernels import common


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_q: int = 128
    block_k: int = 128


@dataclasses.dataclass(frozen=True)
class _Cfg:
    seq_q: int
    seq_k: int
    offset: int
    group: int
    scale: float
    causal: bool
    has_alibi: bool
    has_segments: bool
    block_q: int
    block_k: int
    interpret: bool


def interpret_arg(interpret: bool):
    """pallas_call's `interpret` for the TPU kernels: TPU interpret mode (InterpretParams: TPU
    memory spaces, DMAs and the pipeline simulated on the CPU; uninitialized reads give NaN)
    where this jax has it."""
    if not interpret:
        return False
    return pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True


def compiler_params(n_parallel: int, n_arbitrary: int):
    """Grid semantics: the leading axes parallel (megacore chips share them out), the trailing
    ones sequential (reductions over VMEM scratch)."""
    sem = ("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary
    return pltpu.CompilerParams(dimension_semantics=sem)


def _scores(cfg, q, k, slope, qi, ki, qseg_ref, kvseg_ref):
    """Scaled scores + ALiBi for block (qi, ki), masked to -inf: float32 [bq, bk]."""
    bq, bk = cfg.block_q, cfg.block_k
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = s * cfg.scale
    qpos = qi * bq + cfg.offset + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    kpos = ki * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    if cfg.has_alibi:
        s = s + slope * (kpos - qpos).astype(jnp.float32)
    mask = kpos < cfg.seq_k
    if cfg.causal:
        mask = mask & (kpos <= qpos)
    if cfg.has_segments:
        mask = mask & (qseg_ref[...] == kvseg_ref[...])  # [bq, 1] == [1, bk]
    return jnp.where(mask, s, -jnp.inf)


def div(i, n: int):
    """i // n for a non-negative traced index i: lax.div truncates, which is the same here, and
    it lowers to one integer division, where jnp's floor division adds a sign op whose Mosaic
    lowering asks the default device which TPU it is (lowering for "tpu" from a CPU host then
    fails)."""
    return lax.div(i, jnp.int32(n))


def _block_visible(cfg, qi, ki):
    """Some query of block qi may see some key of block ki (causal) and ki holds real keys."""
    vis = ki * cfg.block_k < cfg.seq_k
    if cfg.causal:
        vis = vis & (ki * cfg.block_k <= qi * cfg.block_q + cfg.block_q - 1 + cfg.offset)
    return vis


def _last_kv_block(cfg, qi, nk):
    if not cfg.causal:
        return nk - 1
    return jnp.minimum(div(qi * cfg.block_q + cfg.block_q - 1 + cfg.offset, cfg.block_k), nk - 1)


def _first_q_block(cfg, ki):
    if not cfg.causal:
        return 0
    return div(jnp.maximum(ki * cfg.block_k - cfg.offset, 0), cfg.block_q)


def _unpack(cfg, refs, n_in):
    """(slopes, q, k, v, ..., qseg, kvseg) with the optional segment refs possibly absent."""
    refs = list(refs)
    ins, rest = refs[:n_in], refs[n_in:]
    if cfg.has_segments:
        qseg, kvseg = rest[:2]
        rest = rest[2:]
    else:
        qseg = kvseg = None
    return ins, qseg, kvseg, rest


# ----------------------------------------------------------------------------------------------
# forward


def _fwd_kernel(*refs, cfg):
    (slopes_ref, q_ref, k_ref, v_ref), qseg_ref, kvseg_ref, rest = _unpack(cfg, refs, 4)
    o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
    h, qi, ki = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    nk = pl.num_programs(3)

    @pl.when(ki == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(_block_visible(cfg, qi, ki))
    def _():
        slope = slopes_ref[h] if cfg.has_alibi else None
        s = _scores(cfg, q_ref[...], k_ref[...], slope, qi, ki, qseg_ref, kvseg_ref)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(
            p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    @pl.when(ki == nk - 1)
    def _():
        l = l_sc[...]
        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, jnp.inf, m_sc[...] + jnp.log(l_safe))


def _seg_specs(cfg, tp, sp, qmap, kmap):
    if not cfg.has_segments:
        return []
    return [pl.BlockSpec((None, cfg.block_q, 1), qmap),
            pl.BlockSpec((None, None, 1, cfg.block_k), kmap)]


def _seg_args(cfg, qseg, kvseg):
    return [qseg, kvseg] if cfg.has_segments else []


def _forward(cfg, q, k, v, slopes, qseg, kvseg):
    b, h, tp, d = q.shape
    sp = k.shape[2]
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.group
    nq, nk = tp // bq, sp // bk
    kv_map = lambda bi, hi, qi, ki: (bi, div(hi, g), jnp.minimum(ki, _last_kv_block(cfg, qi, nk)), 0)  # noqa
    q_map = lambda bi, hi, qi, ki: (bi, hi, qi, 0)  # noqa: E731
    in_specs = [
        pl.BlockSpec(memory_space=pltpu.SMEM),
        pl.BlockSpec((None, None, bq, d), q_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
        *_seg_specs(cfg, tp, sp, lambda bi, hi, qi, ki: (bi, qi, 0),
                    lambda bi, hi, qi, ki: (bi, jnp.minimum(ki, _last_kv_block(cfg, qi, nk)), 0, 0)),
    ]
    out_specs = [pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, bq, 1), q_map)]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(b, h, nq, nk),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, tp, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=compiler_params(3, 1),
        interpret=interpret_arg(cfg.interpret),
        name="alibi_flash_fwd_tpu",
    )(slopes, q, k, v, *_seg_args(cfg, qseg, kvseg))


# ----------------------------------------------------------------------------------------------
# backward


def _probs_and_ds(cfg, q, k, v, do, lse, delta, slope, qi, ki, qseg_ref, kvseg_ref):
    s = _scores(cfg, q, k, slope, qi, ki, qseg_ref, kvseg_ref)
    p = jnp.exp(s - lse)  # masked: exp(-inf) = 0; empty rows: lse = +inf -> 0
    dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return p, p * (dp - delta)


def _dq_kernel(*refs, cfg):
    (slopes_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qseg_ref, kvseg_ref, rest = \
        _unpack(cfg, refs, 7)
    dq_ref, dq_sc = rest
    h, qi, ki = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    nk = pl.num_programs(3)

    @pl.when(ki == 0)
    def _():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(_block_visible(cfg, qi, ki))
    def _():
        slope = slopes_ref[h] if cfg.has_alibi else None
        k = k_ref[...]
        _, ds = _probs_and_ds(cfg, q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...],
                              delta_ref[...], slope, qi, ki, qseg_ref, kvseg_ref)
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(ki == nk - 1)
    def _():
        dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _backward_dq(cfg, q, k, v, do, lse, delta, slopes, qseg, kvseg):
    b, h, tp, d = q.shape
    sp = k.shape[2]
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.group
    nq, nk = tp // bq, sp // bk
    kv_map = lambda bi, hi, qi, ki: (bi, div(hi, g), jnp.minimum(ki, _last_kv_block(cfg, qi, nk)), 0)  # noqa
    q_map = lambda bi, hi, qi, ki: (bi, hi, qi, 0)  # noqa: E731
    qspec = pl.BlockSpec((None, None, bq, d), q_map)
    rowspec = pl.BlockSpec((None, None, bq, 1), q_map)
    kspec = pl.BlockSpec((None, None, bk, d), kv_map)
    in_specs = [
        pl.BlockSpec(memory_space=pltpu.SMEM), qspec, kspec, kspec, qspec, rowspec, rowspec,
        *_seg_specs(cfg, tp, sp, lambda bi, hi, qi, ki: (bi, qi, 0),
                    lambda bi, hi, qi, ki: (bi, jnp.minimum(ki, _last_kv_block(cfg, qi, nk)), 0, 0)),
    ]
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(b, h, nq, nk),
        in_specs=in_specs,
        out_specs=qspec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=compiler_params(3, 1),
        interpret=interpret_arg(cfg.interpret),
        name="alibi_flash_bwd_dq_tpu",
    )(slopes, q, k, v, do, lse, delta, *_seg_args(cfg, qseg, kvseg))


def _dkv_kernel(*refs, cfg):
    (slopes_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), qseg_ref, kvseg_ref, rest = \
        _unpack(cfg, refs, 7)
    dk_ref, dv_ref, dk_sc, dv_sc = rest
    kh, ki, gi, qi = pl.program_id(1), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    ng, nq = pl.num_programs(3), pl.num_programs(4)

    @pl.when((gi == 0) & (qi == 0))
    def _():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(_block_visible(cfg, qi, ki) & (qi * cfg.block_q < cfg.seq_q))
    def _():
        slope = slopes_ref[kh * cfg.group + gi] if cfg.has_alibi else None
        q, do = q_ref[...], do_ref[...]
        p, ds = _probs_and_ds(cfg, q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...],
                              slope, qi, ki, qseg_ref, kvseg_ref)
        tdims = (((0,), (0,)), ((), ()))
        dv_sc[...] += lax.dot_general(p.astype(do.dtype), do, tdims,
                                      preferred_element_type=jnp.float32)
        dk_sc[...] += lax.dot_general(ds.astype(q.dtype), q, tdims,
                                      preferred_element_type=jnp.float32)

    @pl.when((gi == ng - 1) & (qi == nq - 1))
    def _():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _backward_dkv(cfg, q, k, v, do, lse, delta, slopes, qseg, kvseg):
    b, h, tp, d = q.shape
    kvh, sp = k.shape[1], k.shape[2]
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.group
    nq, nk = tp // bq, sp // bk

    def q_map(bi, khi, ki, gi, qi):
        return (bi, khi * g + gi, jnp.maximum(qi, _first_q_block(cfg, ki)), 0)

    k_map = lambda bi, khi, ki, gi, qi: (bi, khi, ki, 0)  # noqa: E731
    qspec = pl.BlockSpec((None, None, bq, d), q_map)
    rowspec = pl.BlockSpec((None, None, bq, 1), q_map)
    kspec = pl.BlockSpec((None, None, bk, d), k_map)
    in_specs = [
        pl.BlockSpec(memory_space=pltpu.SMEM), qspec, kspec, kspec, qspec, rowspec, rowspec,
        *_seg_specs(cfg, tp, sp,
                    lambda bi, khi, ki, gi, qi: (bi, jnp.maximum(qi, _first_q_block(cfg, ki)), 0),
                    lambda bi, khi, ki, gi, qi: (bi, ki, 0, 0)),
    ]
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(b, kvh, nk, g, nq),
        in_specs=in_specs,
        out_specs=[kspec, kspec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        compiler_params=compiler_params(3, 2),
        interpret=interpret_arg(cfg.interpret),
        name="alibi_flash_bwd_dkv_tpu",
    )(slopes, q, k, v, do, lse, delta, *_seg_args(cfg, qseg, kvseg))


# ----------------------------------------------------------------------------------------------
# custom VJP on padded, head-major inputs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, slopes, qseg, kvseg):
    return _forward(cfg, q, k, v, slopes, qseg, kvseg)[0]


def _flash_fwd(cfg, q, k, v, slopes, qseg, kvseg):
    out, lse = common.name_residuals(*_forward(cfg, q, k, v, slopes, qseg, kvseg))
    return out, (q, k, v, slopes, qseg, kvseg, out, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, slopes, qseg, kvseg, out, lse = res
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    dk, dv = _backward_dkv(cfg, q, k, v, do, lse, delta, slopes, qseg, kvseg)
    dq = _backward_dq(cfg, q, k, v, do, lse, delta, slopes, qseg, kvseg)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention_tpu(
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
):
    """q [B, T, H, D], k/v [B, S, KV, D] -> [B, T, H, D]; same contract as flash_attention_gpu."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    bs = block_sizes if isinstance(block_sizes, BlockSizes) else BlockSizes()
    bq, bk = common.fit_block(bs.block_q, t, 8), common.fit_block(bs.block_k, s, 8)
    tp, sp = pl.cdiv(t, bq) * bq, pl.cdiv(s, bk) * bk
    qseg, kvseg = common.padded_segments(q_segment_ids, kv_segment_ids, tp, sp)
    cfg = _Cfg(seq_q=t, seq_k=s, offset=s - t, group=h // kvh,
               scale=common.softmax_scale(d, softmax_scale), causal=causal,
               has_alibi=alibi_slopes is not None, has_segments=qseg is not None, block_q=bq,
               block_k=bk, interpret=interpret)
    q_bhtd = common.pad_to(q, 1, tp).transpose(0, 2, 1, 3)
    k_bhsd = common.pad_to(k, 1, sp).transpose(0, 2, 1, 3)
    v_bhsd = common.pad_to(v, 1, sp).transpose(0, 2, 1, 3)
    slopes = (jnp.zeros((h,), jnp.float32) if alibi_slopes is None
              else jnp.asarray(alibi_slopes, jnp.float32).reshape(h))
    if cfg.has_segments:
        # [B, tp, 1]: a column per q block; [B, sp / bk, 1, bk]: each kv block its own (1, bk)
        # row, whole in its last two dims, so any block_k lowers for Mosaic (a (1, bk) block of
        # [B, 1, sp] would need bk % 128 == 0)
        qseg, kvseg = qseg[:, :, None], kvseg.reshape(b, sp // bk, 1, bk)
    out = _flash(cfg, q_bhtd, k_bhsd, v_bhsd, slopes, qseg, kvseg)
    return out.transpose(0, 2, 1, 3)[:, :t]
