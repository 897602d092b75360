"""ALiBi flash attention for Hopper GPUs: Pallas kernels lowered through Mosaic GPU.

FlashAttention-3's structure (warp specialisation, TMA, wgmma), for MPT's case: causal attention
with ALiBi computed in the kernel, bf16, head dim 64 or 128, any length (a ragged last block is
read with TMA's zero fill, masked by causality, and written clipped), segment ids (packed
documents), GQA/MQA (a KV head's dk/dv summed over its query heads inside the kernel), and
S > T with the queries aligned to the keys' end (forward only). `flash_gpu` owns the custom VJP
and calls this module on sm_90 for what `supported(...)` takes; anything else runs its Triton
kernels.

Each CTA runs three warpgroups: two compute warpgroups, each owning `block` rows of the CTA's
tile, and one memory warpgroup that streams the other operand's blocks through a ring of shared
memory buffers with TMA, guarded by "loaded" and "consumed" barriers.

  forward  grid (H, q tiles, B): rows are queries, the stream is K/V; writes out and the per-row
           logsumexp, both as `flash_gpu` does (base 2, ALiBi's row term folded in), so the
           backward kernels of either module can consume them.
  dk/dv    (KV heads x kv tiles over the grid's first two axes): rows are keys, the stream is
           q/do/lse/delta from the diagonal block to the end, for each query head of the
           group in turn (4 wgmmas a step: S and dP issued together, then dv and dk).
  dq       grid (H, q tiles, B): rows are queries, the stream is K/V up to the diagonal (3 wgmmas
           a step: S and dP together, then dq).
dk/dv and dq are one launch (the first CTAs do dk/dv, the rest dq) writing one gradient array, so
the packed layout (q, k and v heads in one [B, T, H + 2 KV, D] array) needs no concatenation.

Segment ids skip whole blocks: `segment_bounds` (in XLA, any ids) gives each query tile the first
key of its rows' documents and each key tile the last row of its keys' documents. The forward and
dq stream and compute K/V blocks from the first one's block, and dk/dv stream q blocks up to the
last one's. Inside those ranges blocks are still masked per score.

ALiBi: score(i, j) = scale * q_i.k_j + slope_h * (j - i). With the anchor a = first row of a
warpgroup's block, the kernels add slope * (j - a) per column and fold -slope * (i - a), which is
constant along a row, into the logsumexp; so no large positions cancel.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mpt_jax.kernels import common

LOG2E = math.log2(math.e)
_WGS = 2  # compute warpgroups per CTA


@dataclasses.dataclass(frozen=True)
class MgpuBlocks:
    """Tile sizes: rows per compute warpgroup and the streamed block, per kernel; `stages`
    is the depth of the shared-memory ring."""

    block_q: int = 64
    block_kv: int = 128
    stages: int = 2
    block_kv_dkv: int = 64
    block_q_dkv: int = 64
    block_q_dq: int = 64
    block_kv_dq: int = 64
    stages_bwd: int = 2
    # registers a thread in the compute / memory warpgroups (two compute warpgroups and one
    # memory warpgroup of 128 threads share 64K): 240 / 24 as FlashAttention-3 splits them;
    # at 232 / 40 the backward spilled 156 bytes (92 at 240), fwd+bwd 1-2% slower (H200)
    regs: tuple[int, int] = (240, 24)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    heads: int
    group: int  # query heads per KV head
    head_dim: int
    scale: float
    has_alibi: bool
    has_segments: bool
    blocks: MgpuBlocks
    q_off: int  # head index of query head 0 / key head 0 / value head 0 in the arrays read
    k_off: int
    v_off: int
    seq_q: int  # T and S: the real lengths (the arrays may be longer; rows past T are not
    seq_k: int  # written where the arrays end at T)

    @property
    def kv_heads(self) -> int:
        return self.heads // self.group

    @property
    def offset(self) -> int:  # position of query row i: i + offset (bottom-right alignment)
        return self.seq_k - self.seq_q


def supported(q_shape, kv_heads, seq_k, dtype, *, causal, has_segments) -> bool:
    """Whether these kernels take the forward of the call (else use flash_gpu). Any T; S >= T
    (queries aligned to the keys' end); segment ids with S == T."""
    _, t, h, d = q_shape
    return (causal and seq_k >= t and (seq_k == t or not has_segments) and d in (64, 128)
            and jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16)  # fp16: never run on a GPU
            and h % kv_heads == 0)


def supports_backward(q_shape, seq_k) -> bool:
    """Whether the backward kernels take a call whose forward `supported` takes: S == T."""
    return seq_k == q_shape[1]


ROW_ALIGN = 8  # TMA views split the sequence into tiles of 8 rows: its length must divide


def padded_length(n: int) -> int:
    """The sequence length q/k/v need for these kernels: n rounded up to ROW_ALIGN (a copy in
    XLA only where n is not already a multiple; any whole-tile remainder is the kernels')."""
    return n if n < ROW_ALIGN else pl.cdiv(n, ROW_ALIGN) * ROW_ALIGN


def padded_rows(t: int, blocks: MgpuBlocks | None = None) -> int:
    """Length of the logsumexp / delta vectors and of the segment ids the kernels read: T (or
    S) rounded up to whole tiles of every kernel, so that each 1-D block is in bounds (and
    16-byte aligned). q, k, v, out and the gradient keep their real length: a ragged last
    block is read with TMA's zero fill and written clipped."""
    bs = blocks or MgpuBlocks()
    tile = math.lcm(_WGS * bs.block_q, bs.block_kv, _WGS * bs.block_kv_dkv, bs.block_q_dkv,
                    _WGS * bs.block_q_dq, bs.block_kv_dq)
    return pl.cdiv(t, tile) * tile


def _smem(shape, dtype, swizzled=True):
    if not swizzled:
        return plgpu.SMEM(shape, dtype)
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)),
                                                plgpu.SwizzleTransform(128)))


def _accumulate(acc, issue):
    """acc + the wgmma(s) that `issue(acc_ref)` starts, accumulated in place."""
    return pl.run_state(issue)(plgpu.ACC.init(acc))


def _full(shape, value, rows=False):
    """A float32 constant in the WGMMA register layout (rows=True: a per-row vector)."""
    x = jnp.full(shape, value, jnp.float32)
    return plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1) if rows else plgpu.Layout.WGMMA)


def _iota(shape, dim):
    """int32 iota in the WGMMA layout of a [rows, cols] tile ([rows]: its row vector)."""
    layout = plgpu.Layout.WGMMA if len(shape) == 2 else plgpu.Layout.WGMMA.reduce(1)
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=layout)


def _cols(n):
    """int32 iota over the columns of a WGMMA tile, as a [n] vector (a few registers: a
    thread holds n / 4 columns), to broadcast with `_bcast_cols`."""
    return plgpu.broadcasted_iota(jnp.int32, (n,), 0, layout=plgpu.Layout.WGMMA.reduce(0))


def _bcast_rows(x, shape):
    return lax.broadcast_in_dim(x, shape, [0])


def _bcast_cols(x, shape):
    return lax.broadcast_in_dim(x, shape, [1])


def _same_segment(row_ids, col_ids, shape):
    """bool [rows, cols]: the row's and the column's segment ids (row / column vectors) agree."""
    return _bcast_rows(row_ids, shape) == _bcast_cols(col_ids, shape)


# ----------------------------------------------------------------------------------------------
# forward


def _forward(cfg: _Cfg, q, k, v, slopes, qseg, kseg):
    b = q.shape[0]
    h, d = cfg.heads, cfg.head_dim
    bq, bkv, stages = cfg.blocks.block_q, cfg.blocks.block_kv, cfg.blocks.stages
    n_tiles = pl.cdiv(cfg.seq_q, _WGS * bq)
    n_kb = pl.cdiv(cfg.seq_k, bkv)  # key blocks (the last may be ragged: zero-filled, masked)
    off = cfg.offset
    seg = cfg.has_segments
    dtype = q.dtype
    c = cfg.scale * LOG2E

    def kernel(q_ref, k_ref, v_ref, slopes_ref, qseg_ref, kseg_ref, first_ref, out_ref, lse_ref,
               scoped):
        smem, loaded, consumed, sched = scoped
        qo_smem2, k_smem, v_smem, lse_smem2, qs_smem2, ks_smem = smem
        k_bar, v_bar, q_bar, ks_bar = loaded
        k_free, v_free, ks_free = consumed
        bi = lax.axis_index("batch")
        hi = lax.axis_index("heads")
        tile = n_tiles - 1 - lax.axis_index("q_seq")  # the longest rows first
        wg = lax.axis_index("wg")
        kvh = lax.div(hi, jnp.array(cfg.group, hi.dtype))
        # key blocks the CTA needs: up to its last row's position
        cta_steps = jnp.minimum(
            pl.cdiv((tile + 1) * (_WGS * bq) + off, jnp.array(bkv, jnp.int32)), n_kb)
        cta_first, slot_of = _ring_start(first_ref, bi, tile, bkv, stages)

        def sched_barrier():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < _WGS)
        def _compute():
            plgpu.set_max_registers(cfg.blocks.regs[0], action="increase")
            qo_smem = qo_smem2.at[wg]
            lse_smem = lse_smem2.at[wg]
            base = tile * (_WGS * bq) + wg * bq  # first row
            anchor = base + off  # its position
            steps = jnp.minimum(pl.cdiv(anchor + bq, jnp.array(bkv, jnp.int32)), n_kb)
            # blocks with no key after the first row: no causal mask
            full = jnp.minimum(lax.div(anchor + 1, jnp.array(bkv, jnp.int32)), steps)
            plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(base, bq), cfg.q_off + hi], qo_smem,
                                    q_bar.at[wg])
            if seg:
                plgpu.copy_gmem_to_smem(qseg_ref.at[bi, pl.ds(base, bq)], qs_smem2.at[wg],
                                        q_bar.at[_WGS + wg])
            if cfg.has_alibi:
                slope = slopes_ref[hi]
            plgpu.barrier_wait(q_bar.at[wg])
            if seg:
                plgpu.barrier_wait(q_bar.at[_WGS + wg])
                q_seg = _load_vec(qs_smem2.at[wg], 1)
            m_i = _full((bq,), -jnp.inf, rows=True)
            l_i = _full((bq,), 0.0, rows=True)
            acc = _full((bq, d), 0.0)
            plgpu.barrier_wait(k_bar.at[0])
            pl.when(wg == 1)(sched_barrier)

            def step(j, carry, masked):
                acc, m_i, l_i = carry
                slot = slot_of(j)

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                    sched_barrier()
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((bq, bkv), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                if cfg.has_alibi:  # slope * (key position - anchor), one value per column
                    col = (_cols(bkv) + (j * bkv - anchor)).astype(jnp.float32) * slope
                    s = s * c + _bcast_cols(col, s.shape)
                else:
                    s = s * c
                if masked:
                    rel = _iota((bq, bkv), 1) + (j * bkv - anchor)  # key position - anchor
                    s = jnp.where(rel <= _iota((bq, bkv), 0), s, -jnp.inf)
                if seg:
                    plgpu.barrier_wait(ks_bar.at[slot])
                    k_seg = _load_vec(ks_smem.at[slot], 0)
                    plgpu.barrier_arrive(ks_free.at[slot])
                    s = jnp.where(_same_segment(q_seg, k_seg, s.shape), s, -jnp.inf)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                if seg:  # a row's blocks so far may all lie in other documents: m still -inf
                    m_new = jnp.where(m_new == -jnp.inf, jnp.float32(-1e30), m_new)
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_wait(sched)

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    nxt = j + 1

                    @pl.when(nxt < steps)
                    def _():
                        plgpu.barrier_wait(k_bar.at[slot_of(nxt)])

                acc = _accumulate(acc, pv)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l_i

            if seg:
                full = jnp.maximum(full, cta_first)
            carry = lax.fori_loop(cta_first, full, functools.partial(step, masked=False),
                                  (acc, m_i, l_i))
            acc, m_i, l_i = lax.fori_loop(full, steps, functools.partial(step, masked=True), carry)

            def drain(j, _):  # blocks the other warpgroup needs: release them, keep in step
                slot = slot_of(j)
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                if seg:
                    plgpu.barrier_arrive(ks_free.at[slot])
                sched_barrier()
                sched_barrier()

            lax.fori_loop(steps, cta_steps, drain, None)
            pl.when(wg == 0)(sched_barrier)
            if seg:  # a row that sees no key (q and kv ids that never meet): out 0, lse +inf
                empty = l_i == 0.0  # (as flash_gpu's kernels leave it for either backward)
                l_i = jnp.where(empty, 1.0, l_i)
            acc = acc / lax.broadcast_in_dim(l_i, acc.shape, [0])
            qo_smem[...] = acc.astype(dtype)
            lse = m_i + jnp.log2(l_i)
            if seg:
                lse = jnp.where(empty, jnp.inf, lse)
            if cfg.has_alibi:
                rows = _iota((bq,), 0)
                lse = lse - rows.astype(jnp.float32) * slope
            lse_smem[...] = lse
            plgpu.commit_smem()
            # rows past the array's end (a ragged last tile) are clipped by TMA
            plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[bi, pl.ds(base, bq), hi])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, pl.ds(base, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == _WGS)
        def _memory():
            plgpu.set_max_registers(cfg.blocks.regs[1], action="decrease")
            _stream_kv(cfg, (k_ref, v_ref, kseg_ref), (k_smem, v_smem, ks_smem),
                       (k_bar, v_bar, ks_bar), (k_free, v_free, ks_free), bi, kvh, bkv,
                       cta_first, cta_steps, stages, n_kb)

    def alibi_flash_fwd_mgpu(q_ref, k_ref, v_ref, slopes_ref, *refs):
        qseg_ref, kseg_ref, first_ref = refs[:3] if seg else (None, None, None)
        out_ref, lse_ref = refs[-2:]
        vec = functools.partial(_smem, swizzled=False)
        scratch = (
            _smem((_WGS, bq, d), dtype), _smem((stages, bkv, d), dtype),
            _smem((stages, bkv, d), dtype), vec((_WGS, bq), jnp.float32),
            vec((_WGS, bq), jnp.int32) if seg else None,
            vec((stages, bkv), jnp.int32) if seg else None,
        )
        ring = plgpu.Barrier(num_barriers=stages)
        free = plgpu.Barrier(num_arrivals=_WGS, num_barriers=stages)
        pl.run_scoped(
            lambda *args: kernel(q_ref, k_ref, v_ref, slopes_ref, qseg_ref, kseg_ref, first_ref,
                                 out_ref, lse_ref, args),
            scratch,
            (ring, ring, plgpu.Barrier(num_barriers=2 * _WGS), ring if seg else None),
            (free, free, free if seg else None),
            plgpu.Barrier(num_arrivals=_WGS),
            collective_axes="wg",
        )

    segs = ()
    if seg:
        qseg, kseg = _pad_rows(qseg, cfg.blocks), _pad_rows(kseg, cfg.blocks)
        segs = (qseg, kseg, segment_bounds(qseg, kseg, _WGS * bq, _WGS * bq)[0])
    out, lse = plgpu.kernel(
        alibi_flash_fwd_mgpu,
        out_type=(jax.ShapeDtypeStruct((b, q.shape[1], h, d), dtype),
                  jax.ShapeDtypeStruct((b, h, padded_rows(q.shape[1], cfg.blocks)),
                                       jnp.float32)),
        grid=(h, n_tiles, b),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, slopes, *segs)
    return out, lse


def segment_bounds(qseg, kseg, q_tile: int, k_tile: int):
    """Which blocks segment ids leave anything in. qseg, kseg: [B, N] int32 (N a multiple of
    both tiles). Returns (first [B, N / q_tile]: for each tile of q_tile query rows, the first
    key position whose id is one of the tile's; last [B, N / k_tile]: for each tile of k_tile
    keys, the last query position whose id is one of the tile's). A row whose id no key has
    (or a key no row has) counts its own position, and no bound passes it (first <= the row,
    last >= the key: a causal kernel needs nothing beyond, and each CTA's stream then holds
    its own diagonal block). Any ids: packed documents need not be contiguous or sorted; q
    and kv ids may differ."""
    def one(q, k):
        # One stable sort of the keys' ids then the rows' ids, each carrying its place in that
        # concatenation (< n: key position; >= n: n + row position). In a run of one id its
        # keys come first, ascending, then its rows, ascending: the run's first element is its
        # first key (if any key has the id) and its last element its last row (if any row
        # has it). No searchsorted: its loop of dependent steps cost the forward more than the
        # skipped blocks saved at T=2048 (bench/ATTENTION_NOTES.md, session 13).
        n = q.shape[0]
        pos = jnp.arange(n, dtype=jnp.int32)
        idx = jnp.arange(2 * n, dtype=jnp.int32)
        ids, src = jax.lax.sort((jnp.concatenate([k, q]), idx), num_keys=1, is_stable=True)
        change, edge = ids[1:] != ids[:-1], jnp.ones((1,), bool)
        new_run, run_end = jnp.concatenate([edge, change]), jnp.concatenate([change, edge])
        head = src[jax.lax.cummax(jnp.where(new_run, idx, 0))]  # the run's first element
        tail = src[jax.lax.cummin(jnp.where(run_end, idx, 2 * n), reverse=True)]
        at = jnp.zeros((2 * n,), jnp.int32).at[src].set(idx)  # place -> sorted index
        row_head = head[at[n:]]  # per row: its run's first element
        key_tail = tail[at[:n]]  # per key: its run's last element
        first = jnp.minimum(jnp.where(row_head < n, row_head, pos), pos)
        last = jnp.maximum(jnp.where(key_tail >= n, key_tail - n, pos), pos)
        return first.reshape(-1, q_tile).min(1), last.reshape(-1, k_tile).max(1)

    return jax.vmap(one)(qseg.astype(jnp.int32), kseg.astype(jnp.int32))


def _pad_rows(x, blocks: MgpuBlocks | None = None):
    """[B, N] segment ids -> [B, padded_rows(N)] int32; padding -1 for rows and keys alike
    (rows past T see the keys past S: no row of the kernels' tiles is wholly masked, and no
    block reads past the array)."""
    return common.pad_to(x.astype(jnp.int32), 1, padded_rows(x.shape[1], blocks), value=-1)


def _ring_start(first_ref, bi, tile, bkv: int, stages: int):
    """The forward's and dq's K/V stream for a CTA: (its first key block, block j -> ring
    slot). With segment ids (first_ref: segment_bounds' first key of each tile's documents) the
    blocks before that key's block are masked for every row, so nobody streams or computes
    them; without, the stream starts at block 0."""
    # (the stage count is made where each slot is computed: a constant made here and closed
    # over by the kernel's nested regions fails jax 0.11.2's Mosaic GPU lowering, "Shaped
    # arrays must be represented by ir.Values, got: 2", though 0.10.2 lowers it identically)
    if first_ref is None:
        return 0, lambda j: lax.rem(j, jnp.array(stages, jnp.int32))
    start = lax.div(first_ref[bi, tile], jnp.array(bkv, jnp.int32))
    return start, lambda j: lax.rem(j - start, jnp.array(stages, jnp.int32))


# ----------------------------------------------------------------------------------------------
# backward: one launch, dk/dv CTAs then dq CTAs, writing one [B, T, H + 2 KV, D] gradient


def _load_vec(ref, dim):
    """A [n] float32 vector from shared memory in the layout that broadcasts along `dim` of a
    WGMMA tile (dim 1: one value per row; dim 0: one value per column)."""
    layout = plgpu.Layout.WGMMA.reduce(1 if dim == 1 else 0)
    return plgpu.load(ref, (), layout=layout)


def _stream(srcs, bufs, loaded, consumed, start, stop, stages, n_blocks):
    """The memory warpgroup's loop: TMA block j of every source into ring slot j % stages,
    for j in [start, stop) (stop <= n_blocks, a static count); a slot is refilled once both
    compute warpgroups released it. srcs: functions j -> source ref slice; bufs/loaded/consumed:
    per source."""
    def issue(j, slot):
        for src, buf, bar in zip(srcs, bufs, loaded):
            plgpu.copy_gmem_to_smem(src(j), buf.at[slot], bar.at[slot])

    @pl.loop(0, min(stages, n_blocks))  # a traced index: a static slice past a ragged end
    def _(i):  # would fail JAX's bounds check (TMA zero-fills it)
        @pl.when(start + i < stop)
        def _():
            issue(start + i, i)

    @pl.loop(start + stages, stop)
    def _(j):
        slot = lax.rem(j - start, jnp.array(stages, j.dtype))
        for src, buf, bar, free in zip(srcs, bufs, loaded, consumed):
            plgpu.barrier_wait(free.at[slot])
            plgpu.copy_gmem_to_smem(src(j), buf.at[slot], bar.at[slot])


def _stream_kv(cfg: _Cfg, refs, bufs, loaded, consumed, bi, kvh, bkv, start, stop, stages,
               n_blocks):
    """The forward's and dq's memory warpgroup: blocks j in [start, stop) of KV head kvh's keys
    and values (and of the keys' segment ids where cfg.has_segments), block j in ring slot
    (j - start) % stages. refs, bufs, loaded, consumed: (keys, values, segment ids) each."""
    k_ref, v_ref, kseg_ref = refs
    kh, vh = cfg.k_off + kvh, cfg.v_off + kvh
    srcs = (lambda j: k_ref.at[bi, pl.ds(j * bkv, bkv), kh],
            lambda j: v_ref.at[bi, pl.ds(j * bkv, bkv), vh],
            lambda j: kseg_ref.at[bi, pl.ds(j * bkv, bkv)])
    n = 3 if cfg.has_segments else 2
    _stream(srcs[:n], bufs[:n], loaded[:n], consumed[:n], start, stop, stages, n_blocks)


def _backward(cfg: _Cfg, q, k, v, slopes, do, lse, delta, qseg, kseg):
    """dx [B, T, H + 2 KV, D]: dq for query head h at h, dk for KV head g at H + g, dv at
    H + KV + g (S == T; the dk/dv of a KV head summed over its group in the kernel)."""
    b = q.shape[0]
    t = cfg.seq_q
    h, d, kv = cfg.heads, cfg.head_dim, cfg.kv_heads
    group = cfg.group
    bs = cfg.blocks
    stages = bs.stages_bwd
    seg = cfg.has_segments
    dtype = q.dtype
    c = cfg.scale * LOG2E
    n_kv_tiles = pl.cdiv(t, _WGS * bs.block_kv_dkv)
    n_dkv = pl.cdiv(n_kv_tiles * kv, h)  # grid tiles of dk/dv work (KV heads x key tiles)
    n_q_tiles = pl.cdiv(t, _WGS * bs.block_q_dq)
    vec = functools.partial(_smem, swizzled=False)

    def dkv(q_ref, k_ref, v_ref, slopes_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
            first_ref, last_ref, dx_ref, bi, item, wg):
        bk, bq = bs.block_kv_dkv, bs.block_q_dkv
        n_qb = pl.cdiv(t, bq)
        kvh = lax.rem(item, jnp.array(kv, item.dtype))  # heavy tiles (the first keys) first
        tile = lax.div(item, jnp.array(kv, item.dtype))
        first = lax.div(tile * (_WGS * bk), jnp.array(bq, jnp.int32))  # CTA's first q block
        # with segment ids, q blocks past the last row of the CTA's documents see none of its
        # keys: the stream (and every loop) stops at q_stop
        q_stop = (jnp.minimum(lax.div(last_ref[bi, tile], jnp.array(bq, jnp.int32)) + 1, n_qb)
                  if seg else n_qb)
        nq = q_stop - first  # q blocks streamed per query head of the group

        def body(smem, loaded, consumed):
            k_smem2, v_smem2, ks_smem2, q_smem, do_smem, lse_smem, delta_smem, qs_smem = smem
            kv_bar, q_bar, do_bar, lse_bar, delta_bar, qs_bar = loaded
            q_free, do_free, lse_free, delta_free, qs_free = consumed
            vec_bars = [(lse_bar, lse_free), (delta_bar, delta_free)] + (
                [(qs_bar, qs_free)] if seg else [])

            @pl.when(wg < _WGS)
            def _compute():
                plgpu.set_max_registers(cfg.blocks.regs[0], action="increase")
                k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
                base = tile * (_WGS * bk) + wg * bk
                rows = pl.ds(base, bk)
                plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, cfg.k_off + kvh], k_smem,
                                        kv_bar.at[3 * wg])
                plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, cfg.v_off + kvh], v_smem,
                                        kv_bar.at[3 * wg + 1])
                if seg:
                    plgpu.copy_gmem_to_smem(kseg_ref.at[bi, rows], ks_smem2.at[wg],
                                            kv_bar.at[3 * wg + 2])
                plgpu.barrier_wait(kv_bar.at[3 * wg])
                plgpu.barrier_wait(kv_bar.at[3 * wg + 1])
                if seg:
                    plgpu.barrier_wait(kv_bar.at[3 * wg + 2])
                    k_seg = _load_vec(ks_smem2.at[wg], 1)
                # first q block with a visible row; first q block wholly below the rows
                mine = jnp.minimum(lax.div(base, jnp.array(bq, jnp.int32)), n_qb)
                full = jnp.minimum(pl.cdiv(base + bk, jnp.array(bq, jnp.int32)), n_qb)

                def release(slot):
                    plgpu.barrier_arrive(q_free.at[slot])
                    plgpu.barrier_arrive(do_free.at[slot])
                    for _, free in vec_bars:
                        plgpu.barrier_arrive(free.at[slot])

                def head(g, carry):
                    qh = kvh * group + g
                    u0 = g * nq - first  # ring position of block i: u0 + i
                    if cfg.has_alibi:
                        slope = slopes_ref[qh]
                        row_bias = _iota((bk,), 0).astype(jnp.float32) * slope

                    def skip(i, _):  # a block above this warpgroup's rows: wait (the
                        slot = lax.rem(u0 + i, jnp.array(stages, i.dtype))  # barriers'
                        for bar in (q_bar, do_bar) + tuple(b for b, _ in vec_bars):  # phases
                            plgpu.barrier_wait(bar.at[slot])  # stay in step) and release it
                        release(slot)

                    def step(i, carry, masked):
                        # S and dP are issued together (one wait), then dv and dk (one wait)
                        dk, dv = carry
                        slot = lax.rem(u0 + i, jnp.array(stages, i.dtype))
                        q_blk, do_blk = q_smem.at[slot], do_smem.at[slot]
                        plgpu.barrier_wait(q_bar.at[slot])
                        plgpu.barrier_wait(do_bar.at[slot])

                        def s_dp(s_ref, dp_ref):
                            plgpu.wgmma(s_ref, k_smem, plgpu.transpose_ref(q_blk, (1, 0)))
                            plgpu.wgmma(dp_ref, v_smem, plgpu.transpose_ref(do_blk, (1, 0)))
                            return s_ref[...], dp_ref[...]

                        s, dp = pl.run_scoped(s_dp, plgpu.ACC((bk, bq), jnp.float32),
                                              plgpu.ACC((bk, bq), jnp.float32))
                        plgpu.barrier_wait(lse_bar.at[slot])
                        col = -_load_vec(lse_smem.at[slot], 0)
                        plgpu.barrier_arrive(lse_free.at[slot])
                        if cfg.has_alibi:
                            col = col + (base - i * bq - _cols(bq)).astype(jnp.float32) * slope
                            s = s * c + _bcast_rows(row_bias, s.shape)
                        else:
                            s = s * c
                        p = jnp.exp2(s + _bcast_cols(col, s.shape))
                        if masked:
                            rel = (_iota((bk, bq), 0) - _iota((bk, bq), 1)
                                   + (base - i * bq))
                            p = jnp.where(rel <= 0, p, 0.0)
                        if seg:
                            plgpu.barrier_wait(qs_bar.at[slot])
                            q_seg = _load_vec(qs_smem.at[slot], 0)
                            plgpu.barrier_arrive(qs_free.at[slot])
                            p = jnp.where(_same_segment(k_seg, q_seg, p.shape), p, 0.0)
                        plgpu.barrier_wait(delta_bar.at[slot])
                        delta_v = _load_vec(delta_smem.at[slot], 0)
                        plgpu.barrier_arrive(delta_free.at[slot])
                        ds16 = (p * (dp - _bcast_cols(delta_v, dp.shape))).astype(dtype)
                        p16 = p.astype(dtype)

                        def dv_dk(refs):
                            dv_ref, dk_ref = refs
                            plgpu.wgmma(dv_ref, p16, do_blk)
                            plgpu.wgmma(dk_ref, ds16, q_blk)

                        dv, dk = pl.run_state(dv_dk)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
                        plgpu.barrier_arrive(do_free.at[slot])
                        plgpu.barrier_arrive(q_free.at[slot])
                        return dk, dv

                    lo, hi_ = ((jnp.minimum(mine, q_stop), jnp.minimum(full, q_stop)) if seg
                               else (mine, full))
                    lax.fori_loop(first, lo, skip, None)
                    carry = lax.fori_loop(lo, hi_, functools.partial(step, masked=True),
                                          carry)
                    return lax.fori_loop(hi_, q_stop, functools.partial(step, masked=False),
                                         carry)

                zero = (_full((bk, d), 0.0), _full((bk, d), 0.0))
                dk, dv = lax.fori_loop(0, group, head, zero) if group > 1 else head(0, zero)
                k_smem[...] = (dk * cfg.scale).astype(dtype)
                v_smem[...] = dv.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(k_smem, dx_ref.at[bi, rows, h + kvh],
                                        commit_group=False)
                plgpu.copy_smem_to_gmem(v_smem, dx_ref.at[bi, rows, h + kv + kvh],
                                        commit_group=False)
                plgpu.commit_smem_to_gmem_group()
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == _WGS)
            def _memory():
                plgpu.set_max_registers(cfg.blocks.regs[1], action="decrease")

                def at(u):  # ring position u: (query head, q block)
                    g = lax.div(u, nq)
                    return kvh * group + g, first + u - g * nq

                def src(ref, u, qkv=False, vec=False):
                    qh, i = at(u)
                    if vec:
                        return ref.at[bi, qh, pl.ds(i * bq, bq)]
                    return ref.at[bi, pl.ds(i * bq, bq), (cfg.q_off if qkv else 0) + qh]

                srcs = [lambda u: src(q_ref, u, qkv=True), lambda u: src(do_ref, u),
                        lambda u: src(lse_ref, u, vec=True),
                        lambda u: src(delta_ref, u, vec=True)]
                bufs = [q_smem, do_smem, lse_smem, delta_smem]
                if seg:
                    srcs.append(lambda u: qseg_ref.at[bi, pl.ds(at(u)[1] * bq, bq)])
                    bufs.append(qs_smem)
                _stream(srcs, bufs, [q_bar, do_bar, lse_bar, delta_bar, qs_bar][:len(bufs)],
                        [q_free, do_free, lse_free, delta_free, qs_free][:len(bufs)], 0,
                        group * nq, stages, group * n_qb)

        ring = plgpu.Barrier(num_barriers=stages)
        free = plgpu.Barrier(num_arrivals=_WGS, num_barriers=stages)
        pl.run_scoped(
            body,
            (_smem((_WGS, bk, d), dtype), _smem((_WGS, bk, d), dtype),
             vec((_WGS, bk), jnp.int32) if seg else None,
             _smem((stages, bq, d), dtype), _smem((stages, bq, d), dtype),
             vec((stages, bq), jnp.float32), vec((stages, bq), jnp.float32),
             vec((stages, bq), jnp.int32) if seg else None),
            (plgpu.Barrier(num_barriers=3 * _WGS), ring, ring, ring, ring,
             ring if seg else None),
            (free, free, free, free, free if seg else None),
            collective_axes="wg",
        )

    def dq(q_ref, k_ref, v_ref, slopes_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
           first_ref, last_ref, dx_ref, bi, hi, tile, wg):
        del last_ref
        bq, bkv = bs.block_q_dq, bs.block_kv_dq
        n_kb = pl.cdiv(t, bkv)
        kvh = lax.div(hi, jnp.array(group, hi.dtype))
        tile = n_q_tiles - 1 - tile  # the longest rows first
        cta_steps = jnp.minimum(pl.cdiv((tile + 1) * (_WGS * bq), jnp.array(bkv, jnp.int32)),
                                n_kb)
        cta_first, slot_of = _ring_start(first_ref, bi, tile, bkv, stages)

        def body(smem, loaded, consumed):
            q_smem2, do_smem2, lse_smem2, delta_smem2, qs_smem2, k_smem, v_smem, ks_smem = smem
            row_bar, k_bar, v_bar, ks_bar = loaded
            k_free, v_free, ks_free = consumed

            @pl.when(wg < _WGS)
            def _compute():
                plgpu.set_max_registers(cfg.blocks.regs[0], action="increase")
                q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
                lse_smem, delta_smem = lse_smem2.at[wg], delta_smem2.at[wg]
                base = tile * (_WGS * bq) + wg * bq
                rows = pl.ds(base, bq)
                srcs = [(q_ref.at[bi, rows, cfg.q_off + hi], q_smem),
                        (do_ref.at[bi, rows, hi], do_smem),
                        (lse_ref.at[bi, hi, rows], lse_smem),
                        (delta_ref.at[bi, hi, rows], delta_smem)]
                if seg:
                    srcs.append((qseg_ref.at[bi, rows], qs_smem2.at[wg]))
                for n, (src, dst) in enumerate(srcs):
                    plgpu.copy_gmem_to_smem(src, dst, row_bar.at[5 * wg + n])
                if cfg.has_alibi:
                    slope = slopes_ref[hi]
                for n in range(len(srcs)):
                    plgpu.barrier_wait(row_bar.at[5 * wg + n])
                lse_v = _load_vec(lse_smem, 1)
                if cfg.has_alibi:  # p = exp2(s c + slope (j - a) - (lse + slope (i - a)))
                    lse_v = lse_v + _iota((bq,), 0).astype(jnp.float32) * slope
                delta_v = _load_vec(delta_smem, 1)
                if seg:
                    q_seg = _load_vec(qs_smem2.at[wg], 1)
                steps = jnp.minimum(pl.cdiv(base + bq, jnp.array(bkv, jnp.int32)), n_kb)
                full = jnp.minimum(lax.div(base + 1, jnp.array(bkv, jnp.int32)), steps)

                def step(j, acc, masked):  # S and dP issued together, then dq
                    slot = slot_of(j)
                    plgpu.barrier_wait(k_bar.at[slot])
                    plgpu.barrier_wait(v_bar.at[slot])

                    def s_dp(s_ref, dp_ref):
                        plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                        plgpu.wgmma(dp_ref, do_smem, plgpu.transpose_ref(v_smem.at[slot], (1, 0)))
                        return s_ref[...], dp_ref[...]

                    s, dp = pl.run_scoped(s_dp, plgpu.ACC((bq, bkv), jnp.float32),
                                          plgpu.ACC((bq, bkv), jnp.float32))
                    plgpu.barrier_arrive(v_free.at[slot])
                    if cfg.has_alibi:
                        col = (_cols(bkv) + (j * bkv - base)).astype(jnp.float32) * slope
                        s = s * c + _bcast_cols(col, s.shape)
                    else:
                        s = s * c
                    p = jnp.exp2(s - _bcast_rows(lse_v, s.shape))
                    if masked:
                        rel = _iota((bq, bkv), 1) + (j * bkv - base)
                        p = jnp.where(rel <= _iota((bq, bkv), 0), p, 0.0)
                    if seg:
                        plgpu.barrier_wait(ks_bar.at[slot])
                        k_seg = _load_vec(ks_smem.at[slot], 0)
                        plgpu.barrier_arrive(ks_free.at[slot])
                        p = jnp.where(_same_segment(q_seg, k_seg, p.shape), p, 0.0)
                    ds16 = (p * (dp - _bcast_rows(delta_v, dp.shape))).astype(dtype)
                    acc = _accumulate(acc, lambda r: plgpu.wgmma(r, ds16, k_smem.at[slot]))
                    plgpu.barrier_arrive(k_free.at[slot])
                    return acc

                acc = _full((bq, d), 0.0)
                if seg:
                    full = jnp.maximum(full, cta_first)
                acc = lax.fori_loop(cta_first, full, functools.partial(step, masked=False), acc)
                acc = lax.fori_loop(full, steps, functools.partial(step, masked=True), acc)

                def drain(j, _):  # the other warpgroup's blocks: wait for each before its
                    slot = slot_of(j)  # release (nothing else keeps
                    bars = [(k_bar, k_free), (v_bar, v_free)] + (  # the two in step here: a
                        [(ks_bar, ks_free)] if seg else [])  # release ahead of the load would
                    for bar, free in bars:  # count toward the slot's previous block)
                        plgpu.barrier_wait(bar.at[slot])
                        plgpu.barrier_arrive(free.at[slot])

                lax.fori_loop(steps, cta_steps, drain, None)
                q_smem[...] = (acc * cfg.scale).astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(q_smem, dx_ref.at[bi, rows, hi])
                plgpu.wait_smem_to_gmem(0)

            @pl.when(wg == _WGS)
            def _memory():
                plgpu.set_max_registers(cfg.blocks.regs[1], action="decrease")
                _stream_kv(cfg, (k_ref, v_ref, kseg_ref), (k_smem, v_smem, ks_smem),
                           (k_bar, v_bar, ks_bar), (k_free, v_free, ks_free), bi, kvh, bkv,
                           cta_first, cta_steps, stages, n_kb)

        ring = plgpu.Barrier(num_barriers=stages)
        free = plgpu.Barrier(num_arrivals=_WGS, num_barriers=stages)
        pl.run_scoped(
            body,
            (_smem((_WGS, bq, d), dtype), _smem((_WGS, bq, d), dtype),
             vec((_WGS, bq), jnp.float32), vec((_WGS, bq), jnp.float32),
             vec((_WGS, bq), jnp.int32) if seg else None,
             _smem((stages, bkv, d), dtype), _smem((stages, bkv, d), dtype),
             vec((stages, bkv), jnp.int32) if seg else None),
            (plgpu.Barrier(num_barriers=5 * _WGS), ring, ring, ring if seg else None),
            (free, free, free if seg else None),
            collective_axes="wg",
        )

    def alibi_flash_bwd_mgpu(q_ref, k_ref, v_ref, slopes_ref, do_ref, lse_ref, delta_ref,
                             *refs):
        qseg_ref, kseg_ref, first_ref, last_ref = refs[:4] if seg else (None,) * 4
        dx_ref = refs[-1]
        bi = lax.axis_index("batch")
        hi = lax.axis_index("heads")
        tile = lax.axis_index("tile")
        wg = lax.axis_index("wg")
        refs = (q_ref, k_ref, v_ref, slopes_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref,
                first_ref, last_ref, dx_ref, bi)
        item = tile * h + hi  # dk/dv work item (KV head, key tile), in launch order

        @pl.when((tile < n_dkv) & (item < n_kv_tiles * kv))
        def _():
            dkv(*refs, item, wg)

        @pl.when(tile >= n_dkv)
        def _():
            dq(*refs, hi, tile - n_dkv, wg)

    segs = ()
    if seg:
        qseg, kseg = _pad_rows(qseg, cfg.blocks), _pad_rows(kseg, cfg.blocks)
        segs = (qseg, kseg, *segment_bounds(qseg, kseg, _WGS * bs.block_q_dq,
                                            _WGS * bs.block_kv_dkv))
    return plgpu.kernel(
        alibi_flash_bwd_mgpu,
        out_type=jax.ShapeDtypeStruct((b, q.shape[1], h + 2 * kv, d), dtype),
        grid=(h, n_dkv + n_q_tiles, b),
        grid_names=("heads", "tile", "batch"),
        num_threads=_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, slopes, do, lse, delta, *segs)


# ----------------------------------------------------------------------------------------------
# entry points for flash_gpu (which owns the custom VJP, padding and fallbacks)


def is_hopper() -> bool:
    """Whether the default device is an sm_90 GPU (H100/H200), which these kernels target."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def make_cfg(*, heads, group, head_dim, scale, has_alibi, seq_q, seq_k, has_segments=False,
             offsets=(0, 0, 0), blocks=None) -> _Cfg:
    blocks = blocks or MgpuBlocks()
    if min(blocks.stages, blocks.stages_bwd) < 2:  # the forward's drain relies on two slots
        raise ValueError(f"flash_mgpu needs rings of 2+ stages; got {blocks}")
    compute, memory = blocks.regs  # setmaxnreg: multiples of 8 in [24, 256], 64K for the CTA
    if (any(r % 8 or not 24 <= r <= 256 for r in blocks.regs)
            or (_WGS * compute + memory) * 128 > 65536):
        raise ValueError(f"flash_mgpu register split {blocks.regs} is not one setmaxnreg takes "
                         f"for {_WGS} compute warpgroups and one memory warpgroup")
    return _Cfg(heads=heads, group=group, head_dim=head_dim, scale=float(scale),
                has_alibi=has_alibi, has_segments=has_segments, blocks=blocks,
                q_off=offsets[0], k_off=offsets[1], v_off=offsets[2], seq_q=seq_q, seq_k=seq_k)


def forward(cfg: _Cfg, q, k, v, slopes, qseg=None, kseg=None):
    """(out [B, Tq, H, D], lse [B, H, padded_rows(Tq)] float32 base 2), Tq = q's length
    (>= cfg.seq_q; rows past seq_q are not meaningful). q/k/v may be one packed array (the
    offsets in cfg say where its query/key/value heads start). slopes: float32 [>= H];
    qseg [B, T] / kseg [B, S] int32 where cfg.has_segments."""
    return _forward(cfg, q, k, v, slopes.astype(jnp.float32) * LOG2E, qseg, kseg)


def backward(cfg: _Cfg, q, k, v, slopes, do, lse, delta, qseg=None, kseg=None):
    """[B, T, H + 2 KV, D]: dq at heads [0, H), dk at [H, H + KV), dv at [H + KV, H + 2 KV)
    (for a packed q/k/v that is its own layout). lse, delta: [B, H, padded_rows(T)]."""
    if not supports_backward((None, cfg.seq_q), cfg.seq_k):
        raise ValueError(f"the Hopper backward needs S == T; got T={cfg.seq_q}, S={cfg.seq_k}")
    return _backward(cfg, q, k, v, slopes.astype(jnp.float32) * LOG2E, do, lse, delta, qseg,
                     kseg)
