"""Decode matmuls on MPT-7B layer shapes (GPU): which kernel streams the weight fastest.

    python bench/gemv.py [--mode mgpu|triton] [--rows 1,16] [--shapes qkv,out,...]
        [--budget_s S] [--results bench/RESULTS.md --commit abc1234]

--mode mgpu (the default): for each shape and each M in --rows, XLA's bf16 `x @ W`, the shipped
int8 Triton kernel (kernels/int8_gpu.py, its tuned tiles) and the Mosaic GPU kernels of
kernels/gemv_mgpu.py for bf16 and int8 weights over a grid of tiles (tile_k, stages, rows a
warpgroup, K splits), each checked against a float32 reference. Two rows per mgpu variant: the
kernel alone (`partials`) and with XLA's epilogue (split sum, scale, transpose: `matmul`).
Ceilings in the same call: a 4 GiB read-only reduction and a 4 GiB copy (read + write bytes).
--budget_s stops starting variants after that many seconds, saying what it skipped.

--mode triton (the 2026-11-27 study): XLA's dot against a Pallas (Triton) bf16 GEMV at batch 1.
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

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(
    __import__("os").path.abspath(__file__))))

F32 = jnp.float32
N_WEIGHTS = 12
PASSES = 10
SHAPES = {"qkv": (4096, 12288), "out": (4096, 4096), "up": (4096, 16384), "down": (16384, 4096),
          "unembed": (4096, 50432)}


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
    """Seconds per GEMV: PASSES dependent passes over `weights` inside one jit (f's output:
    any shape; its first element feeds the next call's x)."""
    def loop(x, ws):
        def body(_, acc):
            for w in ws:
                y = f(x + (acc[0] * 1e-30).astype(x.dtype), w)
                acc = acc + y.reshape(-1)[:1].astype(F32)
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


# ---------------------------------------------------------------------------------------------
# --mode mgpu


def ceilings(gib: float = 4.0, reps: int = 5) -> tuple[float, float]:
    """(read-only reduction, copy) bytes per second over a `gib` GiB bf16 array: a sum, and
    `x + 1` counted as read + write."""
    n = int(gib * 2**30) // 2
    a = jnp.ones((n,), jnp.bfloat16)
    out = []
    for f, nbytes in ((jax.jit(lambda a: jnp.sum(a, dtype=F32)), 2 * n),
                      (jax.jit(lambda a: a + 1), 4 * n)):
        jax.block_until_ready(f(a))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(f(a))
            ts.append(time.perf_counter() - t0)
        out.append(nbytes / min(ts))
    del a
    return out[0], out[1]


def mgpu_grid(dtype: str, n: int, m: int):
    """GemvTiles to try for an N-wide output at M rows: (tile_k, stages, rows a warpgroup)
    sized to shared memory, each with the K splits that give 100-800 CTAs (at least one)."""
    from mpt_jax.kernels import gemv_mgpu
    shapes = ([(64, 8, 64), (128, 4, 64), (128, 6, 64), (64, 6, 128), (128, 3, 128)]
              if dtype == "bf16" else
              [(128, 8, 64), (256, 4, 64), (256, 6, 64), (128, 6, 128), (256, 3, 128)])
    x_rows = 8 if m <= 8 else 16
    out = []
    for tk, stages, wg_rows in shapes:
        ctas = n // (2 * wg_rows)
        splits = [s for s in (1, 2, 4, 8, 16) if 100 <= ctas * s <= 800][:2] or [1]
        out += [gemv_mgpu.GemvTiles(tk, stages, s, wg_rows, x_rows) for s in splits]
    return out


def bench_mgpu_shape(name, k, n, m, key, deadline, skipped):
    """Rows (seconds, label, weight bytes) for one shape at M rows, fastest first."""
    from mpt_jax.kernels import gemv_mgpu, int8_gpu
    keys = jax.random.split(key, N_WEIGHTS + 1)
    x = jax.random.normal(keys[-1], (m, k), jnp.bfloat16)
    rows = []

    def run(label, f, weights, ref, nbytes):
        if time.perf_counter() > deadline:
            skipped.append(f"{name} M={m} {label}")
            return
        try:
            t, out = time_per_gemv(f, x, weights)
        except Exception as e:  # noqa: BLE001  (one failing config must not stop the sweep)
            print(f"  {label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                  flush=True)
            return
        if ref is not None:
            err = float(jnp.max(jnp.abs(out.astype(F32) - ref)) / jnp.max(jnp.abs(ref)))
            if err > 2e-2:
                print(f"  {label}: WRONG (relative error {err:.1e})", flush=True)
                return
        print(f"  {t * 1e6:8.1f} us  {nbytes / t / 1e12:5.2f} TB/s  {label}", flush=True)
        rows.append((t, label, nbytes))

    print(f"\n## {name}: M={m} K={k} N={n}", flush=True)
    ws = [jax.random.normal(kk, (k, n), jnp.bfloat16) * 0.02 for kk in keys[:N_WEIGHTS]]
    want = x.astype(F32) @ ws[0].astype(F32)
    run("bf16 xla x @ W[K,N]", lambda x, w: x @ w, ws, want, k * n * 2)
    for t in mgpu_grid("bf16", n, m):
        if gemv_mgpu.supported(m, n, k, jnp.bfloat16, t):
            run(f"bf16 mgpu {_tiles_label(t)}",
                functools.partial(gemv_mgpu.matmul, tiles=t), ws, want, k * n * 2)
    best = sorted(r for r in rows if "mgpu" in r[1])[:1]
    for t in [t for t in mgpu_grid("bf16", n, m) if best and best[0][1].endswith(_tiles_label(t))]:
        # the best tiles' kernel without XLA's epilogue (checked above through `matmul`)
        run(f"bf16 mgpu kernel alone {_tiles_label(t)}",
            lambda x, w, t=t: gemv_mgpu.partials(
                jnp.zeros((t.x_rows, k), x.dtype).at[:m].set(x), w, t), ws, None, k * n * 2)
    del ws
    qs = [jax.random.randint(kk, (n, k), -127, 128, jnp.int8) for kk in keys[:N_WEIGHTS]]
    scale = jnp.full((n,), 0.02 / 127, F32)
    want = (x.astype(F32) @ qs[0].astype(F32).T) * scale
    if int8_gpu.supported(m, n, k):
        run("int8 triton (shipped tiles)",
            lambda x, q: int8_gpu.int8_matmul_gpu(x, q, scale), qs, want, k * n)
    for t in mgpu_grid("int8", n, m):
        if gemv_mgpu.supported(m, n, k, jnp.int8, t):
            run(f"int8 mgpu {_tiles_label(t)}",
                lambda x, q, t=t: gemv_mgpu.matmul(x, q, scale, tiles=t), qs, want, k * n)
    best = sorted(r for r in rows if r[1].startswith("int8 mgpu"))[:1]
    for t in [t for t in mgpu_grid("int8", n, m) if best and best[0][1].endswith(_tiles_label(t))]:
        run(f"int8 mgpu kernel alone {_tiles_label(t)}",
            lambda x, q, t=t: gemv_mgpu.partials(
                jnp.zeros((t.x_rows, k), x.dtype).at[:m].set(x), q, t), qs, None, k * n)
    rows.sort()
    return rows


def _tiles_label(t) -> str:
    return f"tk{t.tile_k} st{t.stages} sp{t.splits} wg{t.wg_rows} xr{t.x_rows}"


def main_mgpu(args) -> int:
    card = jax.devices()[0].device_kind
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    read, copy = ceilings(args.ceiling_gib)
    print(f"# {card}, jax {jax.__version__}; wall time per matmul ({N_WEIGHTS} weights x "
          f"{PASSES} passes in one jit). Ceilings: read-only reduction {read / 1e12:.2f} TB/s, "
          f"copy {copy / 1e12:.2f} TB/s", flush=True)
    lines, skipped = [], []
    for m in [int(v) for v in args.rows.split(",")]:
        for name in args.shapes.split(","):
            k, n = SHAPES[name]
            rows = bench_mgpu_shape(name, k, n, m, jax.random.key(0), deadline, skipped)
            for kind in ("bf16 xla", "bf16 mgpu", "int8 triton", "int8 mgpu"):
                r = next((r for r in rows if r[1].startswith(kind)), None)
                if r:
                    lines.append(
                        f"| {datetime.date.today()} | decode matmul {name} M={m} K={k} N={n}, "
                        f"{r[1]} (bench/gemv.py; read-only {read / 1e12:.2f} / copy "
                        f"{copy / 1e12:.2f} TB/s this call) | us (wall, dependency op "
                        f"included), TB/s of weight | {r[0] * 1e6:.1f}, "
                        f"{r[2] / r[0] / 1e12:.2f} | {card} | {args.commit} |\n")
    if skipped:
        print(f"\nskipped past --budget_s: {len(skipped)}: " + "; ".join(skipped), flush=True)
    print("\n" + "".join(lines), flush=True)
    if args.results:
        with open(args.results, "a") as fh:
            fh.writelines(lines)
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("mgpu", "triton"), default="mgpu")
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--budget_s", type=float, default=float("inf"))
    ap.add_argument("--ceiling_gib", type=float, default=4.0)
    ap.add_argument("--results", default="")
    ap.add_argument("--commit", default="")
    args = ap.parse_args()
    if args.mode == "mgpu":
        return main_mgpu(args)
    card = jax.devices()[0].device_kind
    print(f"# {card}, jax {jax.__version__}; wall time per GEMV ({N_WEIGHTS} weights x "
          f"{PASSES} passes in one jit)", flush=True)
    lines = []
    for name in ("qkv", "out", "up", "down"):
        k, n = SHAPES[name]
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
