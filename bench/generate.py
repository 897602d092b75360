"""Decode speed of mpt_jax.generate on MPT-7B shapes with random bf16 weights (GPU).

    python bench/generate.py [--batches 1,16] [--prompt 128] [--new 256] [--json PATH]

Weights are initialised directly in bfloat16 on the device (never float32 on the host). For each
batch: one warm-up generate (compiles), then timed runs of the whole generate (prefill + 256
tokens, greedy, no EOS) and of the prefill alone; decode ms/step = (total - prefill) / (new - 1).
`tokens/s` counts new tokens over the whole call, as peers.py hf_generate does. Prints a table
and markdown rows for bench/RESULTS.md. Imports nothing outside jax/flax/numpy and mpt_jax's
model/generate modules (the GPU hosts lack grain and friends).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mpt_jax.model.config import MPTConfig  # noqa: E402
from mpt_jax.infer.generate import Generator, SamplingParams  # noqa: E402
from mpt_jax.kernels import decode_gpu  # noqa: E402
from mpt_jax.model import MPTForCausalLM  # noqa: E402


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


def bench_batch(gen: Generator, b: int, prompt: int, new: int, reps: int,
                profile_dir: str = "") -> dict:
    rs = np.random.RandomState(b)
    ids = rs.randint(0, gen.config.vocab_size, (b, prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    kw = {"attention_mask": mask, "max_new_tokens": new, "temperature": 0.0, "eos_id": None}
    t0 = time.perf_counter()
    out = gen.generate(ids, **kw)
    compile_s = time.perf_counter() - t0
    totals = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = gen.generate(ids, **kw)
        totals.append(time.perf_counter() - t0)
    # Prefill alone (same compiled function generate uses).
    args = (gen.weights, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), jnp.int32(0),
            -(-(prompt + new) // decode_gpu.BLOCK_S) * decode_gpu.BLOCK_S, new, SamplingParams(),
            False)  # the cache length generate allocates
    jax.block_until_ready(gen._prefill(*args).tokens)
    pre = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(gen._prefill(*args).tokens)
        pre.append(time.perf_counter() - t0)
    total, prefill = min(totals), min(pre)
    if profile_dir:
        from profile_util import profile

        print(f"# batch {b}: one whole generate traced ({new} tokens); divide by {new - 1} for "
              "per-step figures", flush=True)
        print(profile(lambda: gen.generate(ids, **kw), f"{profile_dir}/b{b}", steps=1), flush=True)
    assert out.tokens.shape == (b, new)
    return {"batch": b, "total_s": total, "prefill_ms": prefill * 1e3,
                "decode_ms_per_step": (total - prefill) / (new - 1) * 1e3,
                "tokens_per_s": b * new / total,
                "decode_tokens_per_s": b * (new - 1) / (total - prefill),
                "first_call_s": compile_s}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--attn_impl", default="auto")
    ap.add_argument("--size", default="7b", help="MPTConfig preset (7b = MPT-7B shapes)")
    ap.add_argument("--json", default="")
    ap.add_argument("--profile", default="", help="trace one generate per batch size into this "
                    "directory and print device time per kernel (bench/profile_util.py)")
    ap.add_argument("--decode_block", type=int, default=0,
                    help="decode kernel: cache slots per loop step (kernels/decode_gpu.BLOCK_S)")
    ap.add_argument("--decode_programs", type=int, default=-1,
                    help="decode kernel: programs to aim for when splitting a row's slots "
                         "(decode_gpu.TARGET_PROGRAMS; 0 = never split)")
    ap.add_argument("--norm_warps", type=int, default=0,
                    help="add+norm kernel warps (kernels/norm_gpu.NUM_WARPS)")
    args = ap.parse_args()
    from mpt_jax.kernels import norm_gpu

    if args.norm_warps:
        norm_gpu.NUM_WARPS = args.norm_warps
    if args.decode_block:
        decode_gpu.BLOCK_S = args.decode_block
    if args.decode_programs >= 0:
        decode_gpu.TARGET_PROGRAMS = args.decode_programs
    knobs = (f"decode kernel block {decode_gpu.BLOCK_S}, target programs "
             f"{decode_gpu.TARGET_PROGRAMS}, norm warps {norm_gpu.NUM_WARPS}")
    print(f"# {knobs}", flush=True)
    cfg = MPTConfig.mpt_7b() if args.size == "7b" else MPTConfig.preset(args.size)
    dev = jax.devices()[0]
    print(f"# device {dev.device_kind}, jax {jax.__version__}", flush=True)
    t0 = time.perf_counter()
    model = random_bf16_model(cfg, args.attn_impl)
    gen = Generator(model)
    del model
    jax.block_until_ready(gen.weights)
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(gen.weights))
    print(f"# weights {n_bytes / 1e9:.2f} GB bf16, ready in {time.perf_counter() - t0:.1f}s",
          flush=True)
    results = {"device": dev.device_kind, "weight_gb": n_bytes / 1e9, "attn_impl": args.attn_impl}
    for b in [int(x) for x in args.batches.split(",")]:
        try:
            r = bench_batch(gen, b, args.prompt, args.new, args.reps, args.profile)
        except Exception as e:  # noqa: BLE001  (keep the other batch sizes' figures)
            r = {"batch": b, "error": f"{type(e).__name__}: {e}"[:600]}
        results[f"bs{b}"] = r
        print(json.dumps(r), flush=True)
    date = time.strftime("%Y-%m-%d")
    for r in results.values():
        if isinstance(r, dict) and "error" not in r:
            name = (f"generate mpt_jax MPT-{args.size} random bf16 B={r['batch']} prompt={args.prompt} "
                    f"new={args.new} greedy, {knobs}")
            print(f"| {date} | {name} | decode ms/step | {r['decode_ms_per_step']:.2f} | "
                  f"{dev.device_kind} | COMMIT |")
            print(f"| {date} | {name} | new tokens/s (prefill incl.) | {r['tokens_per_s']:.0f} | "
                  f"{dev.device_kind} | COMMIT |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
