"""Decode speed of mpt_jax's Generator on MPT-7B shapes with random weights (GPU): bf16 and int8
weights, bf16 and int8 KV caches, short and long contexts, each against its bandwidth floor;
and the decode-loop variants of bench/PERF_NOTES.md, all in one call.

    python bench/generate.py [--sections copy,short,variants,long] [--weights bf16,int8]
        [--batches 1,16] [--prompt 128] [--new 256] [--contexts 65536,81920] [--long_new 32]
        [--kv_caches bf16,int8] [--long_kv_caches bf16,int8] [--variants sync8,...]
        [--budget_s S] [--json PATH]

Weights are made on the device in bfloat16 (std 0.02 matrices, unit norm weights), never in
float32 on the host; int8 weights are those quantized on the device (`quantize_model`).

Timing: the prompt is prefilled once (timed on its own, best of --reps; the long section's
prefill once more, --long_reps), then the decode loop alone runs `new - 1` steps from a copy of
the prefilled state (the loop donates its state), best of --reps: decode ms/step = loop time /
(new - 1). `tokens/s` = batch * new / (prefill + loop), new tokens over the whole call as
peers.py hf_generate counts them.

Floors: the bytes a step must read are every weight once (the unembedding reads all of wte; the
embedding gather's B rows are noise) plus the filled KV-cache slots of every layer at the mean
context of the timed steps (prompt + new / 2), scales included for int8. Two floors: bytes /
4.8 TB/s (the H200 datasheet; --peak_tbs) and bytes / the copy rate measured in this call (a
4 GiB device-to-device copy, read + write bytes over time). Rows give ms/step, both floors and
the ratio to each.

Sections (each runs alone; they run in the order given): copy (the copy rate, always measured
when a later section needs it), tune (int8 kernel tiles per matrix shape over a small grid,
installed for the sections after it; opt-in: each tile is a compile), kvtune (the decode
attention kernel alone at each long context and --long_kv_caches over a grid of block, target
programs and warps; the best installed for the sections after it; opt-in), short (prompt + new at
each batch, --weights and --kv_caches), long (batch 1 at each context, --long_weights and
--long_kv_caches), variants (batch 1 decode under each decode-loop variant of VARIANTS in the
order given; "default" times the shipped loop again inside the section). Every row is a new
compile (MPT-7B's decode loop is unrolled over its 32 layers); --budget_s skips the rows that
would start more than that many seconds after the start, naming them, so a bounded call returns
what it measured. Prints JSON lines as it goes and markdown rows for bench/RESULTS.md at the
end. Imports nothing outside jax/flax/numpy and mpt_jax's model/generate modules (the GPU hosts
lack grain and friends).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mpt_jax.infer.generate import DecodeOptions, Generator, SamplingParams  # noqa: E402
from mpt_jax.kernels import decode_gpu, int8_gpu, norm_gpu  # noqa: E402
from mpt_jax.model import MPTForCausalLM, quant, quantize_model  # noqa: E402
from mpt_jax.model.config import MPTConfig  # noqa: E402

def decode_knobs() -> tuple[int, ...]:
    """decode_gpu's knobs in force: (block, target programs, long-cache block, long-cache
    target programs, warps)."""
    return (decode_gpu.BLOCK_S, decode_gpu.TARGET_PROGRAMS, decode_gpu.LONG_BLOCK_S,
            decode_gpu.LONG_TARGET_PROGRAMS, decode_gpu.NUM_WARPS)


SHIPPED_DECODE_KNOBS = decode_knobs()
SHIPPED_INT8_WIDEN = decode_gpu.INT8_WIDEN
SHIPPED_LONG_KNOBS = SHIPPED_DECODE_KNOBS[2:]  # (long-cache block, target programs, warps)

# compiler_options set the list of command types itself (the "+T" syntax of XLA_FLAGS is
# refused there): XLA's default list plus WHILE and CONDITIONAL; "" turns command buffers off (as
# jax's own PGLE pass does).
CMDBUF_DEFAULT_TYPES = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION"
CMDBUF_WHILE = (("xla_gpu_enable_command_buffer", CMDBUF_DEFAULT_TYPES + ",WHILE,CONDITIONAL"),
                ("xla_gpu_graph_min_graph_size", 1))
# name -> (what it changes, DecodeOptions kwargs, module knobs {(module, attr): value}).
# The predicted gains are in bench/PERF_NOTES.md ("Session 7"), written before measurement.
VARIANTS = {
    "default": ("as shipped", {}, {}),
    "cmdbuf_off": ("XLA command buffers (CUDA graphs) off for the decode loop: the control",
                   {"compiler_options": (("xla_gpu_enable_command_buffer", ""),)}, {}),
    "cmdbuf_while": ("the whole decode while loop one CUDA graph (WHILE/CONDITIONAL commands): "
                     "no host round trip per step", {"compiler_options": CMDBUF_WHILE}, {}),
    "sync8": ("8 decode steps per host check of the loop's exit (fixed-trip inner loop)",
              {"steps_per_sync": 8}, {}),
    "sync8_cmdbuf_while": ("sync8 with the loops as CUDA graphs",
                           {"steps_per_sync": 8, "compiler_options": CMDBUF_WHILE}, {}),
    "sync8_cmdbuf_unroll": ("sync8 with the loops as CUDA graphs, the inner fixed-trip loop "
                            "unrolled into the graph (xla_gpu_command_buffer_unroll_loops)",
                            {"steps_per_sync": 8, "compiler_options": CMDBUF_WHILE + (
                                ("xla_gpu_command_buffer_unroll_loops", True),)}, {}),
    "int8_xla_dots": ("int8 weights through XLA's dot(x, q.astype(bf16)) * scale instead of "
                      "the int8 kernel (int8 rows only)", {}, {(quant, "KERNEL_ROWS"): 0}),
    "int8_gelu_unfused": ("int8: the up-projection's GELU as its own XLA kernel instead of the "
                          "kernel's epilogue (int8 rows only)", {},
                          {(quant, "GELU_EPILOGUE"): False}),
}
INT8_ONLY = ("int8_xla_dots", "int8_gelu_unfused")


def random_bf16_model(cfg: MPTConfig, attn_impl: str) -> MPTForCausalLM:
    """Random weights made on the device in bfloat16: std 0.02 matrices, unit norm weights."""
    abstract = nnx.eval_shape(lambda: MPTForCausalLM(
        cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
        attn_impl=attn_impl))
    graphdef, state = nnx.split(abstract)
    leaves, treedef = jax.tree.flatten(state)

    @jax.jit
    def init(key):
        keys = jax.random.split(key, len(leaves))
        return [jnp.ones(a.shape, a.dtype) if a.ndim == 1 or (a.ndim == 2 and a.shape[0] ==
                cfg.n_layers and a.shape[1] == cfg.d_model) else
                (jax.random.normal(k, a.shape, jnp.bfloat16) * 0.02).astype(a.dtype)
                for k, a in zip(keys, leaves)]

    return nnx.merge(graphdef, jax.tree.unflatten(treedef, init(jax.random.key(0))))


def _best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# ---------------------------------------------------------------------------------------------
# Copy bandwidth and floors
# ---------------------------------------------------------------------------------------------
def copy_rate(gib: float = 4.0, reps: int = 5) -> float:
    """Bytes per second of a large device-to-device copy (read + write), as `x + 1` over a
    uint32 array (an op XLA cannot elide)."""
    n = int(gib * 2**30) // 4
    x = jnp.zeros((n,), jnp.uint32)
    f = jax.jit(lambda a: a + jnp.uint32(1))
    jax.block_until_ready(f(x))
    t = _best(lambda: jax.block_until_ready(f(x)), reps)
    return 2 * n * 4 / t


def weight_bytes(gen: Generator) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(gen.weights))


def cache_bytes(cfg: MPTConfig, batch: int, context: float, cache_dtype) -> float:
    """KV-cache bytes a decode step reads at `context` filled slots (keys and values, every
    layer; int8: plus a float32 scale per token and KV head)."""
    per_slot = cfg.head_dim * jnp.dtype(cache_dtype).itemsize
    if quant.is_int8(cache_dtype):
        per_slot += 4
    return 2 * cfg.n_layers * batch * cfg.kv_n_heads * context * per_slot


# ---------------------------------------------------------------------------------------------
# One measurement
# ---------------------------------------------------------------------------------------------
def bench_decode(gen: Generator, batch: int, prompt: int, new: int, reps: int,
                 prefill_reps: int | None = None, profile_prefill: str = "") -> dict:
    """Prefill and decode-loop times of `batch` random prompts of `prompt` tokens and `new`
    greedy tokens (no EOS). profile_prefill: a directory to trace one more prefill into (its
    table printed, bench/profile_util.py)."""
    rs = np.random.RandomState(batch + prompt)
    ids = jnp.asarray(rs.randint(0, gen.config.vocab_size, (batch, prompt)).astype(np.int32))
    mask = jnp.ones_like(ids)
    alloc = decode_gpu.alloc_slots(prompt + new)  # as generate does
    pre_args = (gen.weights, ids, mask, jax.random.key(0), jnp.int32(0), alloc, new,
                SamplingParams(), False, False)  # keep_logits, padded: as generate calls it
    t0 = time.perf_counter()
    state0 = jax.block_until_ready(gen._prefill(*pre_args))
    first = time.perf_counter() - t0
    prefill = _best(lambda: jax.block_until_ready(gen._prefill(*pre_args).tokens),
                    reps if prefill_reps is None else prefill_reps)
    if profile_prefill:
        from profile_util import profile
        print(profile(lambda: jax.block_until_ready(gen._prefill(*pre_args).tokens),
                      profile_prefill, steps=1, top=40), flush=True)
    statics = (prompt, new, SamplingParams(), jnp.int32(-1), jnp.int32(0))
    fresh = jax.jit(lambda s: jax.tree.map(jnp.copy, s))

    def loop():
        state = jax.block_until_ready(fresh(state0))
        t0 = time.perf_counter()
        _, tokens, step, _ = gen._decode(gen.weights, state, *statics)
        jax.block_until_ready(tokens)
        return time.perf_counter() - t0, int(step)

    t0 = time.perf_counter()
    _, steps = loop()  # compiles
    first += time.perf_counter() - t0
    assert steps == new, (steps, new)
    decode = min(loop()[0] for _ in range(reps))
    return {"batch": batch, "prompt": prompt, "new": new, "prefill_ms": prefill * 1e3,
            "decode_ms_per_step": decode / (new - 1) * 1e3,
            "tokens_per_s": batch * new / (prefill + decode),
            "decode_tokens_per_s": batch * (new - 1) / decode, "first_call_s": first}


def with_floor(r: dict, gen: Generator, peak: float, copy: float | None) -> dict:
    ctx = r["prompt"] + r["new"] / 2
    nbytes = weight_bytes(gen) + cache_bytes(gen.config, r["batch"], ctx, gen.cache_dtype)
    r = dict(r, bytes_per_step=nbytes, floor_ms=nbytes / peak * 1e3)
    r["ratio"] = r["decode_ms_per_step"] / r["floor_ms"]
    if copy:
        r["copy_floor_ms"] = nbytes / copy * 1e3
        r["copy_ratio"] = r["decode_ms_per_step"] / r["copy_floor_ms"]
    return r


# ---------------------------------------------------------------------------------------------
# int8 kernel tiles
# ---------------------------------------------------------------------------------------------
def _time_matmul(m, n, k, tiles, reps=5, n_weights=8, passes=10) -> float:
    """Seconds per int8 matmul of [m, k] against `n_weights` distinct [n, k] weights (more than
    L2 holds), `passes` dependent passes in one jit."""
    key = jax.random.key(n + k)
    ws = [jax.random.randint(kk, (n, k), -127, 128, jnp.int32).astype(jnp.int8)
          for kk in jax.random.split(key, n_weights)]
    s = jnp.full((n,), 1e-3, jnp.float32)
    x = jax.random.normal(key, (m, k), jnp.bfloat16)
    saved = dict(int8_gpu.TILES)
    int8_gpu.TILES[(1 if m == 1 else 16, n, k)] = tiles
    try:
        def run(x, ws):
            def body(_, acc):
                for w in ws:
                    y = int8_gpu.int8_matmul_gpu(x + (acc * 1e-30).astype(x.dtype), w, s)
                    acc = acc + y[0, 0].astype(jnp.float32)
                return acc
            return jax.lax.fori_loop(0, passes, body, jnp.float32(0))

        f = jax.jit(run)
        jax.block_until_ready(f(x, ws))
        return _best(lambda: jax.block_until_ready(f(x, ws)), reps) / (n_weights * passes)
    finally:
        int8_gpu.TILES.clear()
        int8_gpu.TILES.update(saved)


def tune_int8(cfg: MPTConfig, batches) -> list[dict]:
    """For each int8 matrix shape of `cfg` and row regime (1, or 16 for batch > 1), the fastest
    tile of a small grid; installed in int8_gpu.TILES. Returns one dict per shape."""
    d, f, v = cfg.d_model, cfg.ffn_hidden_size, cfg.vocab_size
    n_qkv = (cfg.n_heads + 2 * cfg.kv_n_heads) * cfg.head_dim
    shapes = {"qkv": (n_qkv, d), "out": (d, d), "up": (f, d), "down": (d, f), "unembed": (v, d)}
    # tiles: (block_n, block_k, warps, stages, splits, rows). The 16-row dot path (x padded at
    # M = 1) with K split over programs (more where N is narrow: 4096 outputs are 128 programs
    # of 32 rows on 132 SMs), and a few elementwise GEMV tiles at M = 1
    gemv = list(itertools.product((4,), (1024, 2048), (4, 8), (1, 3), (1,), (1,)))

    def grid(m, n):
        splits = (2, 4, 8) if n <= 4096 else (1, 2)
        dot = list(itertools.product((32, 64, 128), (128, 256, 512), (4,), (3,), splits, (16,)))
        return (gemv if m == 1 else []) + dot

    out = []
    for m in sorted({1 if b == 1 else 16 for b in batches}):
        for name, (n, k) in shapes.items():
            best = None
            for candidate in grid(m, n):
                bn, bk, _, _, splits, _ = candidate
                if n % bn or k % (bk * splits):
                    continue
                try:
                    t = _time_matmul(m, n, k, candidate)
                except Exception as e:  # noqa: BLE001  (a tile that does not compile)
                    print(f"# tune {name} m={m} {candidate}: {type(e).__name__}", flush=True)
                    continue
                if best is None or t < best[0]:
                    best = (t, candidate)
            if best is None:
                continue
            int8_gpu.TILES[(m, n, k)] = best[1]
            row = {"matrix": name, "m": m, "n": n, "k": k, "tile": best[1],
                   "us": best[0] * 1e6, "tb_s": n * k / best[0] / 1e12}
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def tune_decode(cfg: MPTConfig, contexts, kv_names, new: int) -> dict:
    """The decode attention kernel alone at batch 1 and each long context (cache_len = the
    context; keys and values separate arrays), for each KV cache kind, over a
    grid of (slots per block, target programs, warps); the fastest in total over the contexts
    and caches is installed in decode_gpu's long-cache knobs (LONG_BLOCK_S,
    LONG_TARGET_PROGRAMS; contexts of at least LONG_SLOTS) and NUM_WARPS for the sections
    after it."""
    h, kvh, d = cfg.n_heads, cfg.kv_n_heads, cfg.head_dim
    grid = list(itertools.product((64, 128, 256), (256, 1024, 4096), (4, 8)))
    slopes = jnp.asarray(2.0 ** -np.arange(1, h + 1), jnp.float32)
    totals: dict = {}  # knobs -> total seconds over the cases it ran
    counts: dict = {}  # knobs -> cases it ran
    rows = []
    key = jax.random.key(0)
    for ctx, kv_name in itertools.product(contexts, kv_names):
        alloc = -(-(ctx + new) // 256) * 256  # a multiple of every block in the grid
        kk, kv_key = jax.random.split(key)
        q = jax.random.normal(key, (1, h, d), jnp.bfloat16)
        if kv_name == "int8":  # keys and values apart: a value block is no cached key block
            kc, vc = (jax.random.randint(k, (1, kvh, alloc, d), -127, 128, jnp.int32).astype(
                jnp.int8) for k in (kk, kv_key))
            extra = dict(k_scales=jnp.full((1, kvh, alloc), 0.01, jnp.float32),
                         v_scales=jnp.full((1, kvh, alloc), 0.02, jnp.float32))
        else:
            kc, vc = (jax.random.normal(k, (1, kvh, alloc, d), jnp.bfloat16)
                      for k in (kk, kv_key))
            extra = {}
        lens = jnp.full((1,), ctx, jnp.int32)
        nbytes = cache_bytes(cfg, 1, ctx, kc.dtype) / cfg.n_layers  # one layer's call
        for bs, target, warps in grid:
            splits = decode_gpu.n_splits(1, kvh, alloc, bs, target)
            fn = jax.jit(lambda q, kc, vc, bs=bs, splits=splits, warps=warps: (
                decode_gpu.decode_attention_gpu(q, kc, vc, lens, None, slopes, scale=d ** -0.5,
                                                block_s=bs, num_warps=warps, splits=splits,
                                                **extra)))
            try:
                jax.block_until_ready(fn(q, kc, vc))
                t = _best(lambda fn=fn: jax.block_until_ready(fn(q, kc, vc)), 5)
            except Exception as e:  # noqa: BLE001  (a tile that does not compile)
                print(f"# decode tune {ctx} {kv_name} {(bs, target, warps)}: "
                      f"{type(e).__name__}", flush=True)
                continue
            row = {"context": ctx, "kv_cache": kv_name, "block_s": bs, "target": target,
                   "warps": warps, "splits": splits, "us": t * 1e6, "tb_s": nbytes / t / 1e12}
            rows.append(row)
            totals[(bs, target, warps)] = totals.get((bs, target, warps), 0.0) + t
            counts[(bs, target, warps)] = counts.get((bs, target, warps), 0) + 1
        print(json.dumps(max((r for r in rows if r["context"] == ctx
                              and r["kv_cache"] == kv_name), key=lambda r: r["tb_s"])),
              flush=True)
    done = [k for k in totals if counts[k] == len(contexts) * len(kv_names)]
    if not done:
        return {"rows": rows}
    best = min(done, key=totals.get)
    default = SHIPPED_LONG_KNOBS
    decode_gpu.LONG_BLOCK_S, decode_gpu.LONG_TARGET_PROGRAMS, decode_gpu.NUM_WARPS = best
    print(json.dumps({"decode_tune_best": best, "default": default,
                      "best_s": totals[best], "default_s": totals.get(default)}), flush=True)
    return {"rows": rows, "best": best, "default": default}


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def _csv(text, kind=str):
    return [kind(x) for x in text.split(",") if x]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="copy,short,variants,long",
                    help="comma list, run in this order: copy, tune, kvtune, short, long, "
                         "variants")
    ap.add_argument("--weights", default="bf16,int8")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--contexts", default="65536,81920", help="long section: prompt lengths")
    ap.add_argument("--long_new", type=int, default=32, help="long section: new tokens")
    ap.add_argument("--kv_caches", default="bf16,int8", help="short section: KV caches")
    ap.add_argument("--long_kv_caches", default="bf16,int8", help="long section: KV caches")
    ap.add_argument("--long_weights", default="", help="long section: weights (default --weights)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--long_reps", type=int, default=1, help="long section: prefill timings")
    ap.add_argument("--budget_s", type=float, default=0,
                    help="skip rows that would start this many seconds after the start (0: none)")
    ap.add_argument("--peak_tbs", type=float, default=4.8, help="datasheet HBM TB/s (H200)")
    ap.add_argument("--attn_impl", default="auto")
    ap.add_argument("--size", default="7b", help="MPTConfig preset (7b = MPT-7B shapes)")
    ap.add_argument("--json", default="")
    ap.add_argument("--profile", default="", help="trace one short generate per weight kind "
                    "and batch, and one prefill per long row, into this directory "
                    "(bench/profile_util.py)")
    ap.add_argument("--decode_block", type=int, default=0,
                    help="decode kernel: cache slots per loop step (kernels/decode_gpu.BLOCK_S)")
    ap.add_argument("--decode_programs", type=int, default=-1,
                    help="decode kernel: programs to aim for when splitting a row's slots "
                         "(decode_gpu.TARGET_PROGRAMS; 0 = never split)")
    ap.add_argument("--int8_widen", default="", choices=("", "cast", "magic"),
                    help="decode kernel: how an int8 KV cache is widened "
                         "(kernels/decode_gpu.INT8_WIDEN)")
    ap.add_argument("--norm_warps", type=int, default=0,
                    help="add+norm kernel warps (kernels/norm_gpu.NUM_WARPS)")
    args = ap.parse_args()
    start = time.perf_counter()
    order = _csv(args.sections)
    sections = set(order)
    unknown = sections - {"copy", "tune", "kvtune", "short", "long", "variants"}
    bad_variants = set(_csv(args.variants)) - set(VARIANTS)
    if unknown or bad_variants:
        sys.exit(f"bench/generate.py: unknown section(s) {sorted(unknown)} / variant(s) "
                 f"{sorted(bad_variants)}; variants: {', '.join(VARIANTS)}")
    bad_weights = set(_csv(args.weights) + _csv(args.long_weights)) - {"bf16", "int8"}
    if bad_weights or not set(_csv(args.long_weights)) <= set(_csv(args.weights)):
        sys.exit(f"bench/generate.py: --weights / --long_weights take bf16 and int8, and "
                 f"--long_weights only what --weights has; got {args.weights!r} / "
                 f"{args.long_weights!r}")
    if args.norm_warps:
        norm_gpu.NUM_WARPS = args.norm_warps
    if args.int8_widen:
        decode_gpu.INT8_WIDEN = args.int8_widen
    if args.decode_block:
        decode_gpu.BLOCK_S = args.decode_block
    if args.decode_programs >= 0:
        decode_gpu.TARGET_PROGRAMS = args.decode_programs
    knobs = ("decode kernel block / target programs {} / {}, caches of {}+ slots {} / {}, "
             "warps {}".format(*decode_knobs()[:2], decode_gpu.LONG_SLOTS, *decode_knobs()[2:])
             + f", int8 cache widened by {decode_gpu.INT8_WIDEN}, norm warps "
             f"{norm_gpu.NUM_WARPS}")
    cfg = MPTConfig.mpt_7b() if args.size == "7b" else MPTConfig.preset(args.size)
    dev = jax.devices()[0]
    print(f"# device {dev.device_kind}, jax {jax.__version__}; {knobs}", flush=True)
    peak = args.peak_tbs * 1e12
    results: dict = {"device": dev.device_kind, "jax": jax.__version__, "knobs": knobs,
                     "rows": []}

    copy = None
    if sections & {"copy", "short", "long", "variants"}:
        copy = copy_rate()
        results["copy_tb_s"] = copy / 1e12
        print(json.dumps({"copy_tb_s": copy / 1e12}), flush=True)

    batches = _csv(args.batches, int)
    weights = _csv(args.weights)

    t0 = time.perf_counter()
    model = random_bf16_model(cfg, args.attn_impl)
    gens = {}  # one copy of each kind of weights; every row's Generator shares it
    if "int8" in weights:
        gens["int8"] = Generator(quantize_model(model))
    if "bf16" in weights:
        gens["bf16"] = Generator(model)
    del model
    jax.block_until_ready([g.weights for g in gens.values()])
    sizes = {k: f"{weight_bytes(g) / 1e9:.2f} GB" for k, g in gens.items()}
    print(f"# weights {sizes} ready in {time.perf_counter() - t0:.1f}s", flush=True)
    results["weight_bytes"] = {k: weight_bytes(g) for k, g in gens.items()}
    kv = {"bf16": jnp.bfloat16, "int8": jnp.int8}
    traced_knobs = [{}]  # module knobs in force when the jitted functions were last traced

    def run(section, wname, kv_name, b, prompt, new, variant="default", prefill_reps=None):
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            r = {"section": section, "weights": wname, "kv_cache": kv_name, "batch": b,
                 "prompt": prompt, "new": new, "variant": variant, "skipped": "budget"}
            print(json.dumps(r), flush=True)
            results["rows"].append(r)
            return
        _, opts, module_knobs = VARIANTS[variant]
        saved = {(mod, attr): getattr(mod, attr) for mod, attr in module_knobs}
        for (mod, attr), value in module_knobs.items():
            setattr(mod, attr, value)
        if module_knobs != traced_knobs[0]:  # knobs are read when a function is traced
            jax.clear_caches()
            traced_knobs[0] = module_knobs
        try:
            gen = gens[wname].variant(cache_dtype=kv[kv_name], decode=DecodeOptions(**opts))
            traced = (f"{args.profile}/{wname}_{kv_name}_prefill{prompt}"
                      if args.profile and section == "long" else "")
            r = with_floor(bench_decode(gen, b, prompt, new, args.reps, prefill_reps, traced),
                           gen, peak, copy)
            if args.profile and section == "short":
                from profile_util import profile

                ids = np.zeros((b, prompt), np.int32)
                print(profile(lambda: gen.generate(ids, attention_mask=np.ones_like(ids),
                                                   max_new_tokens=new, eos_id=None),
                              f"{args.profile}/{wname}_b{b}", steps=1), flush=True)
        except Exception as e:  # noqa: BLE001  (keep the other rows' figures)
            r = {"batch": b, "prompt": prompt, "new": new,
                 "error": f"{type(e).__name__}: {e}"[:600]}
        finally:
            for (mod, attr), value in saved.items():
                setattr(mod, attr, value)
        r.update(section=section, weights=wname, kv_cache=kv_name, variant=variant,
                 decode_knobs=decode_knobs(), int8_widen=decode_gpu.INT8_WIDEN)
        print(json.dumps(r), flush=True)
        results["rows"].append(r)

    for section in order:
        if section == "tune" and "int8" in weights:
            results["tiles"] = tune_int8(cfg, batches)
        if section == "kvtune":
            results["decode_tune"] = tune_decode(cfg, _csv(args.contexts, int),
                                                 _csv(args.long_kv_caches), args.long_new)
            jax.clear_caches()
            results["knobs"] = f"decode kernel knobs {decode_knobs()} (kvtune)"
        if section == "short":  # batch-major: bf16 and int8 weights of a batch side by side
            for b, kv_name, wname in itertools.product(batches, _csv(args.kv_caches), weights):
                run("short", wname, kv_name, b, args.prompt, args.new)
        if section == "long":
            long_weights = _csv(args.long_weights) or weights
            for ctx, kv_name, wname in itertools.product(_csv(args.contexts, int),
                                                        _csv(args.long_kv_caches), long_weights):
                run("long", wname, kv_name, 1, ctx, args.long_new, prefill_reps=args.long_reps)
        if section == "variants":
            for variant, wname in itertools.product(_csv(args.variants), weights):
                if variant in INT8_ONLY and wname != "int8":
                    continue
                run("variants", wname, "bf16", 1, args.prompt, args.new, variant)

    print_rows(results, args, dev.device_kind)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


def print_rows(results: dict, args, card: str) -> None:
    date = time.strftime("%Y-%m-%d")
    copy = results.get("copy_tb_s")
    if copy:
        print(f"| {date} | device-to-device copy 4 GiB (read + write bytes / time) | TB/s | "
              f"{copy:.2f} | {card} | COMMIT |")
    ok = [r for r in results["rows"] if "error" not in r and "skipped" not in r]
    for r in ok:
        name = (f"generate MPT-{args.size} random {r['weights']} weights, {r['kv_cache']} KV "
                f"cache, B={r['batch']} prompt={r['prompt']} new={r['new']} greedy"
                + ("" if r["variant"] == "default" else f", variant {r['variant']}")
                + ("" if tuple(r["decode_knobs"]) == SHIPPED_DECODE_KNOBS else
                   ", decode kernel block / target programs {} / {}, long caches {} / {}, "
                   "warps {}".format(*r["decode_knobs"]))
                + ("" if r["kv_cache"] != "int8" or r.get("int8_widen", SHIPPED_INT8_WIDEN)
                   == SHIPPED_INT8_WIDEN else f", int8 cache widened by {r['int8_widen']}"))
        floors = f"floor {r['floor_ms']:.2f} ms at {args.peak_tbs} TB/s ({r['ratio']:.2f}x)"
        if "copy_floor_ms" in r:
            floors += f", {r['copy_floor_ms']:.2f} ms at the copy rate ({r['copy_ratio']:.2f}x)"
        print(f"| {date} | {name} | decode ms/step | {r['decode_ms_per_step']:.2f}; "
              f"{floors}; {r['bytes_per_step'] / 1e9:.2f} GB a step | {card} | COMMIT |")
        print(f"| {date} | {name} | new tokens/s (prefill incl.) / prefill ms | "
              f"{r['tokens_per_s']:.0f} / {r['prefill_ms']:.1f} | {card} | COMMIT |")
    for b in sorted({r["batch"] for r in ok if r["section"] == "short"}):
        pick = {r["weights"]: r for r in ok if r["section"] == "short" and r["batch"] == b
                and r["kv_cache"] == "bf16"}
        if "bf16" in pick and "int8" in pick:
            i8, bf = pick["int8"], pick["bf16"]
            print(f"| {date} | generate MPT-{args.size} B={b} prompt={args.prompt} "
                  f"new={args.new}: int8 weights / bf16 weights, same call | tokens/s ratio, "
                  f"decode loop / prefill incl. | "
                  f"{i8['decode_tokens_per_s'] / bf['decode_tokens_per_s']:.2f} / "
                  f"{i8['tokens_per_s'] / bf['tokens_per_s']:.2f} | {card} | COMMIT |")
    tune = results.get("decode_tune") or {}
    for ctx, kv_name in sorted({(r["context"], r["kv_cache"]) for r in tune.get("rows", [])}):
        mine = [r for r in tune["rows"] if (r["context"], r["kv_cache"]) == (ctx, kv_name)]
        ref = (SHIPPED_LONG_KNOBS if ctx >= decode_gpu.LONG_SLOTS else
               (*SHIPPED_DECODE_KNOBS[:2], SHIPPED_DECODE_KNOBS[4]))
        shipped = [r for r in mine if (r["block_s"], r["target"], r["warps"]) == ref]
        top = max(mine, key=lambda r: r["tb_s"])
        print(f"| {date} | decode attention kernel alone, B=1, {kv_name} cache, {ctx} slots, "
              f"MPT-{args.size} heads (kvtune): shipped block {ref[0]} / "
              f"target {ref[1]} / warps {ref[2]} vs the "
              f"grid's best ({top['block_s']} / {top['target']} / {top['warps']}) | us, TB/s | "
              + (f"{shipped[0]['us']:.0f}, {shipped[0]['tb_s']:.2f} vs " if shipped else "")
              + f"{top['us']:.0f}, {top['tb_s']:.2f} | {card} | COMMIT |")
    for r in results["rows"]:
        if "skipped" in r:
            print(f"# SKIPPED (--budget_s) {r['section']} {r['weights']} {r['kv_cache']} "
                  f"B={r['batch']} prompt={r['prompt']} {r['variant']}", flush=True)
        if "error" in r:
            print(f"# FAILED {r['section']} {r['weights']} {r['kv_cache']} B={r['batch']} "
                  f"prompt={r['prompt']} {r['variant']}: {r['error']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
