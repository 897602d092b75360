"""Where a training step's time goes (one device): the whole train_step, its parts timed alone
at the same shapes, and the matmul ceiling measured on the same card.

    python bench/train_breakdown.py --model 1b --micro_batch 8 --remat dots_no_batch

Parts: forward+backward of the loss (no optimizer), forward only, attention fwd+bwd for every
layer (the Pallas kernel at [B, T, H, D]), the chunked cross entropy fwd+bwd, the optimizer
update (step minus forward+backward), and a bf16 matmul of the MLP's shape for the ceiling.
Prints a table (ms and share of the step); appends rows to bench/RESULTS.md with --results.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def timeit(fn, *args, iters=10):
    import jax
    out = fn(*args)
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / iters * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro_batch", type=int, default=8)
    ap.add_argument("--remat", default="dots_no_batch")
    ap.add_argument("--scan", type=int, default=0, help="1: layers under lax.scan; 0: unrolled "
                    "(the trainer's default)")
    ap.add_argument("--layers", type=int, default=0, help="override n_layers (smoke tests)")
    ap.add_argument("--results", default="")
    ap.add_argument("--commit", default="")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from mpt_jax import sharding
    from mpt_jax.model import attention
    from mpt_jax.train import optim
    from mpt_jax.train import loss as loss_lib
    from mpt_jax.train import step as step_lib
    from mpt_jax.model.alibi import alibi_slopes
    from mpt_jax.model.config import MPTConfig

    cfg = MPTConfig.preset(args.model, max_seq_len=max(args.seq, 2048))
    if args.layers:
        cfg = cfg.replace(n_layers=args.layers)
    b, t, d, h, layers = args.micro_batch, args.seq, cfg.d_model, cfg.n_heads, cfg.n_layers
    train = ml_collections.ConfigDict(dict(
        seq_len=t, global_batch_size=b, micro_batch_size=0, compute_dtype="bfloat16",
        param_dtype="float32", remat_policy=args.remat, scan_layers=bool(args.scan), attn_impl="auto",
        loss_chunk_size=512, nonfinite="stop"))
    ocfg = ml_collections.ConfigDict(dict(
        name="decoupled_lion", lr=1e-4, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0,
        weight_decay_mask="all", mu_dtype="", clip_norm=1.0, schedule="cosine",
        warmup_steps=10, alpha_f=0.1))
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    rules = sharding.DEFAULT_RULES
    tx = optim.make_optimizer(ocfg, 1000, clip=False)  # the step clips, as the trainer does
    settings = step_lib.make_settings(cfg, train, tx, lambda s: 1e-4, mesh=mesh, rules=rules,
                                      seed=0, global_batch=b, clip_norm=ocfg.clip_norm)
    _, shardings = step_lib.state_shardings(cfg, train, tx, mesh, rules)
    state = step_lib.init_state(cfg, train, tx, mesh, rules, seed=0)
    rng = np.random.default_rng(0)
    batch = sharding.make_global_batch(
        {"input_ids": rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)}, mesh, rules)
    rows = {}
    with sharding.use_mesh(mesh), sharding.use_rules(rules):
        step = step_lib.compile_train_step(settings, shardings, mesh, ("input_ids",))
        state, _ = step(state, batch)  # compile + warm
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(10):
            state, m = step(state, batch)
        jax.block_until_ready(m["loss"])
        rows["train_step (all)"] = (time.perf_counter() - t0) / 10 * 1e3
        params = state["params"]
        grad = jax.jit(jax.value_and_grad(
            lambda p, bt: step_lib._nll_sum(p, settings.graphdef, bt, None, 512)[0]))
        rows["forward+backward (loss grads)"] = timeit(grad, params, batch)
        fwd = jax.jit(lambda p, bt: step_lib._nll_sum(p, settings.graphdef, bt, None, 512)[0])
        rows["forward only"] = timeit(fwd, params, batch)
    rows["optimizer + clipping (step - fwd/bwd)"] = (rows["train_step (all)"]
                                                      - rows["forward+backward (loss grads)"])
    key = jax.random.key(1)
    q = jax.random.normal(key, (b, t, h, d // h), jnp.bfloat16)
    slopes = jnp.asarray(alibi_slopes(h))

    def attn_fb(q, k, v):
        o, vjp = jax.vjp(lambda q, k, v: attention.flash_attention(q, k, v, alibi_slopes=slopes),
                         q, k, v)
        return vjp(o)

    rows[f"attention fwd+bwd x {layers} layers"] = timeit(jax.jit(attn_fb), q, q, q) * layers
    rows[f"attention fwd x {layers} layers"] = timeit(jax.jit(
        lambda q: attention.flash_attention(q, q, q, alibi_slopes=slopes)), q) * layers
    hid = jax.random.normal(key, (b, t, d), jnp.bfloat16)
    wte = jax.random.normal(key, (cfg.vocab_size, d), jnp.float32) * 0.02
    tg, wt = loss_lib.targets_and_weights(batch["input_ids"])

    def ce(hid, wte):
        return loss_lib.chunked_cross_entropy(hid, wte, tg, wt, chunk_size=512)[0]

    rows["chunked cross entropy fwd+bwd"] = timeit(jax.jit(jax.grad(ce, argnums=(0, 1))),
                                                   hid, wte)
    x = jax.random.normal(key, (b * t, d), jnp.bfloat16)
    w = jax.random.normal(key, (d, 4 * d), jnp.bfloat16)
    mm_ms = timeit(jax.jit(lambda x, w: x @ w), x, w)
    ceiling = 2 * b * t * d * 4 * d / (mm_ms / 1e3) / 1e12
    n_params = cfg.num_params()
    # The dots policies save every projection's output (our einsums have no dot batch dims), so
    # only "full"/"nothing" recompute the forward matmuls (+2N per token).
    recompute = args.remat in ("full", "nothing")
    matmul_flops = (6 + 2 * recompute) * n_params * b * t
    rows[f"dense matmuls at the measured ceiling ({6 + 2 * recompute}N x tokens)"] = (
        matmul_flops / (ceiling * 1e12) * 1e3)

    dev = jax.devices()[0].device_kind
    step_ms = rows["train_step (all)"]
    print(f"# {dev}: MPT-{args.model} seq {t} micro-batch {b} remat {args.remat} scan "
          f"{args.scan}; bf16 matmul [{b * t}x{d}]@[{d}x{4 * d}] ceiling {ceiling:.0f} TFLOP/s")
    print("| part | ms | share of step |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.1f} | {100 * v / step_ms:.0f}% |")
    if args.results:
        date = datetime.date.today().isoformat()
        with open(args.results, "a") as fh:
            name = (f"train breakdown mpt-{args.model} seq {t} mb {b} remat {args.remat}"
                    + ("" if args.scan else " layers unrolled"))
            fh.write(f"| {date} | {name} | bf16 matmul ceiling TFLOP/s | {ceiling:.0f} | {dev} | "
                     f"{args.commit} |\n")
            for k, v in rows.items():
                fh.write(f"| {date} | {name} | {k} ms | {v:.1f} | {dev} | {args.commit} |\n")


if __name__ == "__main__":
    main()
