#!/usr/bin/env python3
"""ALiBi flash attention on one GPU: correctness, block-size sweep, TFLOP/s, peak memory.

  python bench/attention.py check [--first_case N | --cases I,J]
                                                  issue 21's grid (CHECK_CASES): fresh random
                                                  bf16 inputs vs the float32 reference, outputs
                                                  poisoned, every gradient, NaN fails
  python bench/attention.py sweep [--batch 4 --seq 2048]
                                                  each kernel (fwd, dk/dv, dq) per block config
  python bench/attention.py bench [--config NAME] [--results bench/RESULTS.md --card C --commit X]
                                                  BENCH_SHAPES: ours (Hopper and Triton; ALiBi
                                                  on/off, segment ids, GQA) beside FA3 (no
                                                  ALiBi, MHA and GQA) in the same process
  python bench/attention.py tiles [--batch 1 --seq 65536 --tiles '[{}, {"block_kv": 64}]']
                                                  the Hopper forward under MgpuBlocks variants,
                                                  interleaved rounds, best of each (with ALiBi)
  python bench/attention.py memory                compiled + measured peak of fwd+bwd, T up to 64k
  python bench/attention.py chunk [--results ...] a chunk of T new tokens against a KV cache at
                                                  its deepest (the serving engine's prefill): the
                                                  chunk kernel (block_q 128 / 64) vs the jnp path

bf16, causal, H=32, D=128 unless flags say otherwise. FLOP convention (as peers.py's):
causal forward = 2*B*H*T^2*D, forward+backward = 3.5x that. Every timing is the median over 5
batches of 20 back-to-back calls with one host sync per batch (peers.py's jax_time).
Results go to --out DIR as JSON (one file per mode).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
import traceback
from typing import NamedTuple

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
try:
    import mpt_jax  # noqa: F401
except Exception as _e:  # the model half of the package may be mid-edit: attention needs none of it
    import types

    print(f"# mpt_jax/__init__ failed ({type(_e).__name__}: {_e}); importing attention alone")
    _pkg = types.ModuleType("mpt_jax")
    _pkg.__path__ = [os.path.join(_ROOT, "mpt_jax")]
    sys.modules["mpt_jax"] = _pkg

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mpt_jax import attention  # noqa: E402
from mpt_jax.model.alibi import alibi_slopes  # noqa: E402
from mpt_jax.kernels import flash_gpu, flash_mgpu  # noqa: E402

B0 = flash_gpu.BlockSizes()
CONFIGS = {  # named whole-kernel configurations for `bench`
    "default": B0,
}


def fwd_flops(b, t, h, d):
    return 2 * b * h * t * t * d


def jax_time(fn, args, iters=20, warmup=3, reps=5):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            r = fn(*args)
        jax.block_until_ready(r)
        times.append((time.perf_counter() - t0) / iters)
    times.sort()
    return times[len(times) // 2]


def inputs(b, t, h, kvh, d, dtype=jnp.bfloat16, seed=None, s=None):
    """q, k, v, do: normal random, keys S = s (default T) long; seed None: fresh."""
    seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, h, d), dtype)
    k = jax.random.normal(ks[1], (b, s or t, kvh, d), dtype)
    v = jax.random.normal(ks[2], (b, s or t, kvh, d), dtype)
    do = jax.random.normal(ks[3], (b, t, h, d), dtype)
    return q, k, v, do


def rel(a, b):
    """Relative Frobenius error; the absolute one where the reference is all zeros (T = 1: the
    gradients of q and k vanish)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) or 1.0))


def fwd_bwd_fn(f):
    return jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))


def out_and_grads(f):
    """One compiled function: f's output and its gradients for `do` (check compiles this
    once a case, not a forward and a fwd+bwd: the forward kernel is the same in both, since
    the custom VJP's primal and forward rule call one `_forward`)."""
    def run(q, k, v, do):
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(do)

    return jax.jit(run)


# ---------------------------------------------------------------------------------------------


def doc_segments(rng, b, t):
    """int32 [B, T] segment ids of packed documents of random lengths, each row holding at
    least one document of length 1 (where T > 2)."""
    rows = []
    for _ in range(b):
        lens = []
        while sum(lens) < t:
            lens.append(int(rng.integers(1, max(2, t // 3) + 1)))
        if t > 2:
            lens.insert(int(rng.integers(0, len(lens))), 1)
        rows.append(np.repeat(np.arange(len(lens)), lens)[:t])
    return jnp.asarray(np.stack(rows), jnp.int32)


def poison(shapes):
    """Fill buffers of the kernels' output shapes with NaN and free them, so that the next
    allocations of those sizes (the kernels' outputs, from XLA's pooling allocator) most likely
    start as NaN: an element a kernel never writes then fails the check. (A heuristic: the
    Mosaic GPU kernels have no aliased-output mode to poison exactly.)"""
    bufs = [jnp.full(s, jnp.nan, dt) for s, dt in shapes]
    jax.block_until_ready(bufs)
    del bufs


class Case(NamedTuple):
    b: int
    t: int
    s: int
    h: int
    kv: int
    d: int
    alibi: bool
    seg: bool
    causal: bool = True
    dtype: object = jnp.bfloat16


# issue #21's grid (T 1 .. 8191, GQA groups 1/4/8, head dims 64/128, ALiBi on/off, packed
# documents with a length-1 one) and S > T (the forward on the Hopper path, the backward on
# Triton's); then the Triton kernels' own cases (non-causal, float32)
CHECK_CASES = [
    Case(2, 1, 1, 4, 4, 128, True, False),
    Case(2, 127, 127, 8, 2, 64, True, True),
    Case(2, 127, 127, 8, 8, 128, False, False),
    Case(2, 1000, 1000, 8, 1, 128, True, True),
    Case(2, 1000, 1000, 8, 4, 64, False, True),
    Case(2, 2048, 2048, 8, 8, 128, True, False),
    Case(2, 2048, 2048, 8, 8, 128, False, False),
    Case(1, 2048, 2048, 8, 2, 64, True, True),
    Case(1, 2048, 2048, 16, 2, 128, True, True),
    Case(1, 8191, 8191, 4, 1, 128, True, True),
    Case(1, 8191, 8191, 4, 4, 64, False, False),
    Case(1, 1000, 1500, 8, 8, 128, True, False),
    Case(2, 200, 1024, 8, 2, 64, True, False),
    Case(2, 777, 777, 6, 3, 64, True, False, causal=False),
    Case(1, 1024, 1024, 8, 1, 64, True, True, dtype=jnp.float32),
    Case(2, 2048, 2048, 4, 4, 128, False, False, dtype=jnp.float32),
    Case(1, 512, 512, 4, 4, 128, True, False, causal=False, dtype=jnp.float32),
]
CHECK_TOL = 1e-2  # bf16 (or float32 with tf32 dots) against the float32 reference


def mode_check(args):
    """Fresh random bf16 inputs for every case against the float32 reference: the output and
    every gradient within CHECK_TOL (relative Frobenius error), all finite; the outputs'
    buffers poisoned first. Prints which kernels ran (Hopper / Triton) per pass."""
    rows = []
    rng = np.random.default_rng()
    cases = ([CHECK_CASES[i] for i in args.cases] if args.cases else
             CHECK_CASES[args.first_case:])
    for b, t, s, h, kvh, d, use_alibi, use_seg, causal, dtype in cases:
        seed = int(rng.integers(2**31))
        q, k, v, do = inputs(b, t, h, kvh, d, dtype, seed=seed, s=s)
        slopes = jnp.asarray(alibi_slopes(h)) if use_alibi else None
        seg = doc_segments(rng, b, t) if use_seg else None
        kw = dict(alibi_slopes=slopes, segment_ids=seg, causal=causal)
        p = attention.plan("pallas_gpu", (b, t, h, d), kvh, s, dtype, causal=causal,
                           has_segments=use_seg)
        kernels = ("hopper" if p.hopper_fwd else "triton") + "/" + (
            "hopper" if p.hopper_bwd else "triton")
        ours = lambda q, k, v: attention.flash_attention(q, k, v, impl="pallas_gpu", **kw)  # noqa
        ref = lambda q, k, v: attention.reference_attention(  # noqa: E731
            q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), **kw)
        name = (f"b{b} t{t} s{s} h{h} kv{kvh} d{d} alibi={use_alibi} seg={use_seg} "
                f"causal={causal} {jnp.dtype(dtype).name} [{kernels}]")
        outs = [((b, t, h, d), dtype), ((b, h, flash_mgpu.padded_rows(t)), jnp.float32),
                ((b, t, h + 2 * kvh, d), dtype)]  # out, lse, the Hopper gradient
        try:
            poison(outs)
            o1, g1 = out_and_grads(ours)(q, k, v, do)
            o2, g2 = out_and_grads(ref)(q, k, v, do.astype(jnp.float32))
            errs = dict(out=rel(o1, o2), dq=rel(g1[0], g2[0]), dk=rel(g1[1], g2[1]),
                        dv=rel(g1[2], g2[2]))
            finite = all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in (o1, *g1))
            ok = finite and all(e < CHECK_TOL for e in errs.values())
            rows.append(dict(case=name, kernels=kernels, seed=seed, finite=finite, ok=ok,
                             **errs))
            print(f"check {'PASS' if ok else 'FAIL'} {name}: finite={finite} "
                  + " ".join(f"{k}={v:.2e}" for k, v in errs.items()), flush=True)
        except Exception as e:  # report, keep going
            rows.append(dict(case=name, kernels=kernels, ok=False,
                             error=f"{type(e).__name__}: {str(e)[:400]}"))
            print(f"check FAIL {name}: ERROR {type(e).__name__}: {str(e)[:400]}", flush=True)
    print(f"check: {sum(r['ok'] for r in rows)} of {len(rows)} cases pass", flush=True)
    return rows


# (block_q, block_k, num_warps, num_stages); the first H200 sweep (ATTENTION_NOTES.md) covered
# fwd (128,64,8,3) (128,64,4,3) (128,128,8,2) (64,64,4,3) (128,32,4,3) (128,64,8,4) (64,128,4,3),
# dkv (64,128,8,2|3) (32,128,4,3) (32,64,4,3) (128,128,8,2) (16,128,4,3) (32,128,8,2),
# dq (128,64,8,2) (128,32,4,3) (64,64,4,2) (128,128,8,2) (64,32,4,3) (64,128,8,2): all slower.
SWEEP_FWD = [(128, 128, 8, 3), (128, 128, 8, 4), (128, 128, 4, 3), (128, 64, 8, 3),
             (64, 128, 8, 3), (128, 64, 4, 4)]
SWEEP_DKV = [(64, 64, 4, 2), (64, 64, 4, 3), (32, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2),
             (128, 64, 8, 2), (64, 64, 4, 1), (32, 32, 4, 2)]
SWEEP_DQ = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3),
            (64, 32, 4, 2)]


def mode_sweep(args):
    b, t, h, d = args.batch, args.seq, args.heads, 128
    q, k, v, do = inputs(b, t, h, h, d)
    slopes = jnp.pad(jnp.asarray(alibi_slopes(h)), (0, 0))
    fl = fwd_flops(b, t, h, d)
    out, lse = None, None
    rows = []

    def cfg_for(bs):
        return flash_gpu._Cfg(seq_q=t, seq_k=t, offset=0, group=1, scale=d ** -0.5, causal=True,
                              has_alibi=True, has_segments=False, blocks=bs, interpret=False)

    def record(kernel, variant, f, f_args, flop_mult):
        """Times one block-size variant of one kernel; a variant that fails to compile or run
        is recorded with its error, and the sweep goes on."""
        bq, bk, w, s = variant
        row = dict(kernel=kernel, bq=bq, bk=bk, warps=w, stages=s)
        try:
            tt = jax_time(f, f_args)
            row.update(ms=tt * 1e3, tflops=flop_mult * fl / tt / 1e12)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(row, flush=True)

    for bq, bk, w, s in SWEEP_FWD:
        bs = dataclasses.replace(B0, block_q=bq, block_k=bk, num_warps=w, num_stages=s)
        cfg = cfg_for(bs)
        f = jax.jit(lambda q, k, v, cfg=cfg: flash_gpu._forward(cfg, q, k, v, slopes, None, None))
        if out is None:  # the backward sweeps need one forward's out and lse
            try:
                out, lse = f(q, k, v)
            except Exception:  # noqa: BLE001  (recorded by `record` below)
                pass
        record("fwd", (bq, bk, w, s), f, (q, k, v), 1.0)
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    for bq, bk, w, s in SWEEP_DKV:
        bs = dataclasses.replace(B0, block_q_dkv=bq, block_k_dkv=bk, num_warps_dkv=w,
                                 num_stages_dkv=s)
        cfg = cfg_for(bs)
        f = jax.jit(lambda *a, cfg=cfg: flash_gpu._backward_dkv(cfg, *a, slopes, None, None))
        # dk/dv does 4 of the backward's matmuls: 2x forward flops
        record("dkv", (bq, bk, w, s), f, (q, k, v, do, lse, delta), 2.0)
    for bq, bk, w, s in SWEEP_DQ:
        bs = dataclasses.replace(B0, block_q_dq=bq, block_k_dq=bk, num_warps_dq=w,
                                 num_stages_dq=s)
        cfg = cfg_for(bs)
        f = jax.jit(lambda *a, cfg=cfg: flash_gpu._backward_dq(cfg, *a, slopes, None, None))
        # dq does 3 matmuls: 1.5x forward flops
        record("dq", (bq, bk, w, s), f, (q, k, v, do, lse, delta), 1.5)
    return rows


def _parse_blocks(spec):
    if spec in CONFIGS:
        return CONFIGS[spec]
    if spec.startswith("sweep:"):  # the fastest block config per kernel from a sweep's JSON
        rows = json.load(open(spec[6:]))["result"]
        best = {}
        for r in rows:
            if "ms" in r and (r["kernel"] not in best or r["ms"] < best[r["kernel"]]["ms"]):
                best[r["kernel"]] = r
        kw = {}
        for kern, suffix in (("fwd", ""), ("dkv", "_dkv"), ("dq", "_dq")):
            r = best[kern]
            kw.update({f"block_q{suffix}": r["bq"], f"block_k{suffix}": r["bk"],
                       f"num_warps{suffix}": r["warps"], f"num_stages{suffix}": r["stages"]})
        print(f"# blocks from sweep: {kw}", flush=True)
        return flash_gpu.BlockSizes(**kw)
    return flash_gpu.BlockSizes(**json.loads(spec))


BENCH_SHAPES = [(4, 2048, 32, 128), (1, 8192, 32, 128), (4, 2048, 32, 64), (1, 65536, 32, 128)]


def _fa3():
    try:  # FlashAttention-3 for JAX (../shared/bench/fa3_peer.sh): no ALiBi, the bar to reach
        import dew_flash_attn
        return dew_flash_attn.flash_mha
    except ImportError:
        return None


def _live_fraction(seg) -> float:
    """Of the causal (query tile, key block) pairs of the Hopper forward at its default tiles,
    the fraction it computes with these segment ids (flash_mgpu.segment_bounds: the blocks
    before a tile's first document key are skipped)."""
    bs = flash_mgpu.MgpuBlocks()
    rows, bkv = flash_mgpu._WGS * bs.block_q, bs.block_kv
    b, t = seg.shape
    first = np.asarray(_bounds_fn(bs)(seg))
    tiles = -(-t // rows)
    ends = np.minimum(-(-(np.arange(tiles) + 1) * rows // bkv), -(-t // bkv))
    dense = ends.sum() * b
    return float((ends[None] - first[:, :tiles] // bkv).sum() / dense)


def _bounds_fn(blocks):
    """flash_mgpu.segment_bounds as the forward calls it (padded ids, its tiles; the forward
    keeps only the first of the two bounds), jitted."""
    rows = flash_mgpu._WGS * blocks.block_q

    def run(seg):
        ids = flash_mgpu._pad_rows(seg, blocks)
        return flash_mgpu.segment_bounds(ids, ids, rows, rows)[0]

    return jax.jit(run)


def mode_tiles(args):
    """The Hopper forward (ALiBi, causal, bf16, --heads H, D=128) at --batch / --seq under each
    of --tiles (a JSON list of MgpuBlocks overrides; {} is the default), two rounds in turn,
    the best of each; a variant that does not compile (e.g. past shared memory) is reported."""
    b, t, h, d = args.batch, args.seq, args.heads, 128
    variants = json.loads(args.tiles)
    q, k, v, _ = inputs(b, t, h, h, d)
    slopes = jnp.asarray(alibi_slopes(h))
    fl = fwd_flops(b, t, h, d)
    iters = dict(iters=3, warmup=1, reps=3) if t > 16384 else {}
    best, errors = {}, {}
    for _ in range(2):
        for var in variants:
            name = json.dumps(var, sort_keys=True)
            bs = dataclasses.replace(B0, hopper=flash_mgpu.MgpuBlocks(**var))
            f = jax.jit(lambda q, k, v, bs=bs: attention.flash_attention(
                q, k, v, alibi_slopes=slopes, impl="pallas_gpu", block_sizes=bs))
            try:
                best[name] = min(best.get(name, float("inf")), jax_time(f, (q, k, v), **iters))
            except Exception as e:  # noqa: BLE001  (reported below)
                errors[name] = " ".join(f"{type(e).__name__}: {str(e)[:200]}".split())
    rows = [dict(tiles=n, ms=tt * 1e3, tflops=fl / tt / 1e12) for n, tt in best.items()]
    rows += [dict(tiles=n, error=e) for n, e in errors.items() if n not in best]
    device = jax.devices()[0].device_kind
    print(f"\n| Hopper forward tiles | B | T | fwd TFLOP/s |  ({device})\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['tiles']} | {b} | {t} | "
              + (f"{r['tflops']:.0f} |" if "error" not in r else f"{r['error']} |"))
    if args.results:
        with open(args.results, "a") as fh:
            for r in rows:
                value = f"{r['tflops']:.0f}" if "error" not in r else r["error"].replace("|", "/")
                fh.write(f"| {time.strftime('%Y-%m-%d')} | attention Hopper forward tiles "
                         f"{r['tiles']} ({{}}: the default), ALiBi causal bf16 H={h} D={d} "
                         f"B={b} T={t} (bench/attention.py tiles, best of 2 rounds in turn) | "
                         f"TFLOP/s fwd | {value} | {args.card or device} | {args.commit} |\n")
    return rows


def mode_bench(args):
    """At each of BENCH_SHAPES (B, T, H, D; causal bf16): ours (impl pallas_gpu: on Hopper the
    Mosaic GPU kernels of kernels/flash_mgpu.py; pallas_triton: the Triton kernels) with and
    without ALiBi, with segment ids (packed documents of random lengths), with GQA (4 query
    heads a KV head), beside FlashAttention-3 for JAX without ALiBi (MHA and the same GQA) in
    the same process. FLOPs counted as causal dense (segments do not reduce them)."""
    bs = _parse_blocks(args.config)
    rows = []
    fa3 = _fa3()
    hopper = flash_mgpu.is_hopper()
    rng = np.random.default_rng(0)
    for b, t, h, d in BENCH_SHAPES:
        long = t > 16384
        iters = dict(iters=3, warmup=1, reps=3) if long else {}
        fl = fwd_flops(b, t, h, d)
        seg = doc_segments(rng, b, t)
        variants = []  # (name, kv heads, fn(q, k, v))
        for impl, label in ([("pallas_gpu", "ours_mosaic_gpu")] if hopper else []) + (
                [] if long else [("pallas_triton", "ours_pallas_triton")]):
            for alibi, segs, kvh in ([(True, False, h), (False, False, h), (True, True, h),
                                      (True, False, h // 4)] if not long else
                                     [(True, False, h)]):
                if label.endswith("triton") and (segs or kvh != h):
                    continue
                slopes = jnp.asarray(alibi_slopes(h)) if alibi else None
                name = (f"{label}_{'alibi' if alibi else 'noalibi'}" + ("_segments" if segs else "")
                        + (f"_gqa{h // kvh}" if kvh != h else ""))
                variants.append((name, kvh, functools.partial(
                    lambda q, k, v, slopes, seg, impl: attention.flash_attention(
                        q, k, v, alibi_slopes=slopes, segment_ids=seg, impl=impl, block_sizes=bs),
                    slopes=slopes, seg=seg if segs else None, impl=impl)))
        if fa3 is not None:
            variants.append(("fa3_noalibi", h, lambda q, k, v: fa3(q, k, v, is_causal=True)))
            if not long:
                variants.append(("fa3_noalibi_gqa4", h // 4,
                                 lambda q, k, v: fa3(q, k, v, is_causal=True)))
        live = _live_fraction(seg)
        for name, kvh, f in variants:
            q, k, v, do = inputs(b, t, h, kvh, d)
            try:
                t_f = jax_time(jax.jit(f), (q, k, v), **iters)
                t_fb = jax_time(fwd_bwd_fn(f), (q, k, v, do), **iters)
                extra = {}
                if "segments" in name and "mosaic" in name:
                    extra = dict(live_blocks=live, bounds_ms=1e3 * jax_time(
                        _bounds_fn(bs.hopper), (seg,), **iters))
                rows.append(dict(name=name, batch=b, seq=t, heads=h, head_dim=d, fwd_ms=t_f * 1e3,
                                 fwd_tflops=fl / t_f / 1e12, fwdbwd_ms=t_fb * 1e3,
                                 fwdbwd_tflops=3.5 * fl / t_fb / 1e12, **extra))
            except Exception as e:
                rows.append(dict(name=name, batch=b, seq=t, heads=h, head_dim=d,
                                 error=f"{type(e).__name__}: {str(e)[:300]}"))
            print(rows[-1], flush=True)
            del q, k, v, do
    device = jax.devices()[0].device_kind
    print(f"\n| kernel | B | T | H | D | fwd TFLOP/s | fwd+bwd TFLOP/s |  ({device})\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" not in r:
            print(f"| {r['name']} | {r['batch']} | {r['seq']} | {r['heads']} | {r['head_dim']} | "
                  f"{r['fwd_tflops']:.0f} | {r['fwdbwd_tflops']:.0f} |")
    if args.results:
        date = time.strftime("%Y-%m-%d")
        with open(args.results, "a") as fh:
            for r in rows:
                if "error" in r:
                    continue
                live = (f"; the Hopper forward computes {r['live_blocks']:.0%} of the causal "
                        "blocks (the rest lie wholly in other documents); segment_bounds alone "
                        f"{r['bounds_ms']:.3f} ms"
                        if "live_blocks" in r else "")
                fh.write(f"| {date} | attention {r['name']} bf16 causal H={r['heads']} "
                         f"D={r['head_dim']} B={r['batch']} T={r['seq']} (bench/attention.py "
                         f"bench; FLOPs counted as dense causal{live}) | TFLOP/s fwd / fwd+bwd | "
                         f"{r['fwd_tflops']:.0f} / {r['fwdbwd_tflops']:.0f} | "
                         f"{args.card or device} | {args.commit} |\n")
    return dict(blocks=dataclasses.asdict(bs), rows=rows, device=device, jax=jax.__version__)


def mode_chunk(args):
    """One slot's prefill chunk (B=1, H=KV=32, D=128, bf16) at the end of an S-position cache
    span: flash_gpu.chunk_attention_gpu beside attention.decode_attention (the jnp path it
    replaces), checked against decode_attention in float32. FLOPs: 4 * H * D * the visible
    (query, key) pairs."""
    rows = []
    h, d = args.heads, 128
    slopes = jnp.asarray(alibi_slopes(h))
    for t, s in [(256, 2048), (256, 4096), (512, 2048), (512, 4096)]:
        q, _, _, _ = inputs(1, t, h, h, d)
        kc = jax.random.normal(jax.random.key(1), (1, h, s, d), jnp.bfloat16)
        vc = jax.random.normal(jax.random.key(2), (1, h, s, d), jnp.bfloat16)
        start = jnp.int32(s - t)
        pairs = t * (s - t) + t * (t + 1) // 2
        fl = 4 * h * d * pairs
        want = attention.decode_attention(q.astype(jnp.float32), kc.astype(jnp.float32),
                                          vc.astype(jnp.float32), start + t, alibi_slopes=slopes)
        variants = [("jnp path (decode_attention)", jax.jit(
            lambda q, k, v, st: attention.decode_attention(q, k, v, st + t, alibi_slopes=slopes)))]
        for bq in (128, 64):
            bs = dataclasses.replace(flash_gpu.BlockSizes(), block_q=bq)
            variants.append((f"chunk kernel block_q {bq}", jax.jit(
                lambda q, k, v, st, bs=bs: flash_gpu.chunk_attention_gpu(
                    q, k, v, st, slopes, block_sizes=bs))))
        variants.append(("chunk kernel default blocks", jax.jit(
            lambda q, k, v, st: flash_gpu.chunk_attention_gpu(q, k, v, st, slopes))))
        for name, fn in variants:
            try:
                err = rel(fn(q, kc, vc, start), want)
                ms = jax_time(fn, (q, kc, vc, start)) * 1e3
                rows.append(dict(name=name, t=t, s=s, ms=ms, tflops=fl / ms / 1e9, rel_err=err))
            except Exception as e:
                rows.append(dict(name=name, t=t, s=s, error=f"{type(e).__name__}: {str(e)[:300]}"))
            print(rows[-1], flush=True)
    device = jax.devices()[0].device_kind
    print(f"\n| variant | T | S | ms | TFLOP/s | rel err |  ({device})\n|---|---|---|---|---|---|")
    for r in rows:
        if "error" not in r:
            print(f"| {r['name']} | {r['t']} | {r['s']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
                  f"{r['rel_err']:.1e} |")
    if args.results:
        date = time.strftime("%Y-%m-%d")
        with open(args.results, "a") as fh:
            for r in rows:
                if "error" not in r:
                    fh.write(f"| {date} | attention chunk {r['name']}: B=1 T={r['t']} at the "
                             f"end of S={r['s']} cache positions, H={h} D=128 bf16 ALiBi (bench/"
                             f"attention.py chunk) | ms / TFLOP/s / rel err vs fp32 | "
                             f"{r['ms']:.3f} / {r['tflops']:.0f} / {r['rel_err']:.1e} | "
                             f"{args.card or device} | {args.commit} |\n")
    return dict(rows=rows, device=device, jax=jax.__version__)


def mode_memory(args):
    bs = _parse_blocks(args.config)
    h, d, rows = args.heads, 128, []
    for t in args.mem_seqs:
        q, k, v, do = inputs(1, t, h, h, d)
        slopes = jnp.asarray(alibi_slopes(h))
        f = lambda q, k, v: attention.flash_attention(  # noqa: E731
            q, k, v, alibi_slopes=slopes, impl="pallas_gpu", block_sizes=bs)
        fb = fwd_bwd_fn(f)
        ma = fb.lower(q, k, v, do).compile().memory_analysis()
        row = dict(seq=t, args_gib=ma.argument_size_in_bytes / 2**30,
                   out_gib=ma.output_size_in_bytes / 2**30, temp_gib=ma.temp_size_in_bytes / 2**30)
        t0 = time.perf_counter()
        jax.block_until_ready(fb(q, k, v, do))
        row["first_call_s"] = time.perf_counter() - t0
        if t == args.mem_seqs[-1]:
            tt = jax_time(fb, (q, k, v, do), iters=3, warmup=1, reps=3)
            row["fwdbwd_ms"] = tt * 1e3
            row["fwdbwd_tflops"] = 3.5 * fwd_flops(1, t, h, d) / tt / 1e12
        stats = jax.devices()[0].memory_stats() or {}
        row["peak_gib_process"] = stats.get("peak_bytes_in_use", float("nan")) / 2**30
        rows.append(row)
        print(row, flush=True)
        del q, k, v, do
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["check", "sweep", "bench", "tiles", "memory", "chunk"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--config", default="default", help="a CONFIGS name or BlockSizes JSON")
    ap.add_argument("--first_case", type=int, default=0, help="check: start at this case")
    ap.add_argument("--cases", default="", help="check: only these case indices (0,3,...)")
    ap.add_argument("--tiles", default='[{}, {"block_kv": 64}, {"block_kv": 64, "stages": 3}]',
                    help="tiles: a JSON list of MgpuBlocks overrides ({} = the default)")
    ap.add_argument("--mem_seqs", type=int, nargs="+", default=[16384, 32768, 65536])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--results", default="", help="bench: append rows to this RESULTS.md")
    ap.add_argument("--card", default="")
    ap.add_argument("--commit", default="")
    args = ap.parse_args()
    if args.cases and args.first_case:
        ap.error("--cases and --first_case: give one (--cases names the cases to run)")
    if args.cases:  # parsed here once: mode_check reads the list
        text = args.cases
        try:
            args.cases = [int(i) for i in text.split(",")]
        except ValueError:
            ap.error(f"--cases: expected case indices like 0,3; got {text!r}")
        if any(not 0 <= i < len(CHECK_CASES) for i in args.cases):
            ap.error(f"--cases: indices run from 0 to {len(CHECK_CASES) - 1}; got {text}")
    print(f"# jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    try:
        res = globals()["mode_" + args.mode](args)
    except Exception:
        traceback.print_exc()
        raise
    with open(os.path.join(args.out, f"attention_{args.mode}.json"), "w") as f:
        json.dump(dict(mode=args.mode, device=jax.devices()[0].device_kind,
                       jax=jax.__version__, date=time.strftime("%Y-%m-%d"), result=res), f,
                  indent=1)


if __name__ == "__main__":
    main()
