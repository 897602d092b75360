"""Decode GEMVs at batch 1 (bf16, MPT-7B layer shapes): XLA's dot against a Pallas (Triton)
GEMV, to decide whether decode should own its matrix-vector kernels (GPU).

    python bench/gemv.py [--results bench/RESULTS.md --commit abc1234]

For each shape (qkv, out, up, down) it times:
- XLA `x @ W` with W `[K, N]`, as the model stores it;
- XLA on the transposed weight `[N, K]`;
- XLA `gelu(x) @ W` for the down projection, to see whether the exact GELU fuses into the GEMV;
- a Pallas GEMV on `W^T [N, K]`, over a grid of tile sizes, warps and stages.

Each pass reads 12 distinct weights, so the 50 MB L2 holds none of them. Ten passes run in one
`fori_loop` with a data dependency from each GEMV to the next, which spreads the dispatch cost.
The figure is wall time per GEMV, and it includes one tiny dependency op, so TB/s reads low
against a profile's kernel time. Compare rows with each other, not with the HBM rate. Prints a
table and appends the best XLA and the best Pallas row per shape to `--results`.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
N_WEIGHTS = 12
PASSES = 10
SHAPES = {"qkv": (4096, 12288), "out": (4096, 4096), "up": (4096, 16384), "down": (16384, 4096)}


def gemv_t(x, wt, *, bn, bk, warps, stages, interpret=False):
    """x `[K]`, wt `[N, K]` -> `[N]`: one program per BN output rows, looping over K in BK
    chunks with a float32 `[BN, BK]` accumulator reduced once at the end."""
    n, k = wt.shape
    nk = k // bk

    def kernel(x_ref, w_ref, o_ref):
        def body(i, acc):
            xs = x_ref[pl.ds(i * bk, bk)].astype(F32)
            return acc + w_ref[:, pl.ds(i * bk, bk)].astype(F32) * xs[None, :]

        acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((bn, bk), F32))
        o_ref[...] = jnp.sum(acc, axis=1).astype(o_ref.dtype)

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((n,), x.dtype), grid=(n // bn,),
        in_specs=[pl.BlockSpec((k,), lambda j: (0,)), pl.BlockSpec((bn, k), lambda j: (j, 0))],
        out_specs=pl.BlockSpec((bn,), lambda j: (j,)),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret)(x, wt)


def time_per_gemv(f, x, weights, reps=5):
    """Seconds per GEMV: PASSES dependent passes over `weights` inside one jit."""
    def loop(x, ws):
        def body(_, acc):
            for w in ws:
                y = f(x + (acc[0] * 1e-30).astype(x.dtype), w)
                acc = acc + y[:1].astype(F32)
            return acc

        return jax.lax.fori_loop(0, PASSES, body, jnp.zeros((1,), F32))

    g = jax.jit(loop)
    jax.block_until_ready(g(x, weights))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(g(x, weights))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / (len(weights) * PASSES), jax.jit(f)(x, weights[0])


def bench_shape(name, k, n, key):
    keys = jax.random.split(key, N_WEIGHTS + 1)
    ws = [jax.random.normal(kk, (k, n), jnp.bfloat16) * 0.02 for kk in keys[:N_WEIGHTS]]
    wts = [jax.jit(lambda a: a.T)(w) for w in ws]
    x = jax.random.normal(keys[-1], (k,), jnp.bfloat16)
    x32 = x.astype(F32)
    want = x32 @ ws[0].astype(F32)
    gelu_x = jax.nn.gelu(x32, approximate=False).astype(jnp.bfloat16).astype(F32)
    want_gelu = gelu_x @ ws[0].astype(F32)
    rows = []

    def run(label, f, weights, ref):
        try:
            t, out = time_per_gemv(f, x, weights)
        except Exception as e:  # noqa: BLE001  (one failing config must not stop the sweep)
            print(f"  {label}: FAILED {type(e).__name__}: {str(e)[:160]}", flush=True)
            return
        err = float(jnp.max(jnp.abs(out.astype(F32) - ref)) / jnp.max(jnp.abs(ref)))
        if err > 2e-2:
            print(f"  {label}: WRONG (relative error {err:.1e})", flush=True)
            return
        rows.append((t, label))

    run("xla x @ W[K,N]", lambda x, w: (x[None] @ w)[0], ws, want)
    run("xla W^T[N,K] @ x", lambda x, w: w @ x, wts, want)
    if name == "down":
        run("xla gelu(x) @ W[K,N]",
            lambda x, w: (jax.nn.gelu(x, approximate=False)[None] @ w)[0], ws, want_gelu)
    for bn, bk, warps, stages in itertools.product((8, 16, 32), (256, 512), (4, 8), (1, 3)):
        if bn * bk <= 16384:
            run(f"pallas W^T bn{bn} bk{bk} warps{warps} stages{stages}",
                functools.partial(gemv_t, bn=bn, bk=bk, warps=warps, stages=stages), wts, want)
    rows.sort()
    nbytes = k * n * 2
    print(f"\n## {name}: K={k} N={n} ({nbytes / 1e6:.0f} MB of weight)")
    shown = rows[:8] + [r for r in rows[8:] if r[1].startswith("xla")]
    for t, label in shown:
        print(f"  {t * 1e6:8.1f} us  {nbytes / t / 1e12:5.2f} TB/s  {label}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default="")
    ap.add_argument("--commit", default="")
    args = ap.parse_args()
    card = jax.devices()[0].device_kind
    print(f"# {card}, jax {jax.__version__}; wall time per GEMV ({N_WEIGHTS} weights x "
          f"{PASSES} passes in one jit)", flush=True)
    lines = []
    for name, (k, n) in SHAPES.items():
        rows = bench_shape(name, k, n, jax.random.key(0))
        best = {kind: next((r for r in rows if r[1].startswith(kind)), None)
                for kind in ("xla x @ W", "pallas")}
        if all(best.values()):
            (tx, _), (tp, lp) = best["xla x @ W"], best["pallas"]
            lines.append(f"| {datetime.date.today()} | decode GEMV {name} K={k} N={n} bf16 M=1 "
                         f"(bench/gemv.py): XLA x @ W vs best {lp} | us per GEMV (wall, "
                         f"dependency op included) | {tx * 1e6:.1f} vs {tp * 1e6:.1f} | {card} | "
                         f"{args.commit} |\n")
    if args.results:
        with open(args.results, "a") as fh:
            fh.writelines(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
