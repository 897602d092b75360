"""Training throughput of the real train_step (synthetic tokens, real model config) on this
machine's devices: tokens/s per device, MFU (DESIGN.md convention), step time, compile time,
peak memory per device. Each variant runs in its own subprocess (clean peak memory, an OOM
loses only that variant).

    python bench/train.py --model 1b --seq 2048 --micro_batch 8,16 --remat dots_no_batch,full \
        --attn auto,reference [--optim decoupled_lion --mu_dtype bfloat16 --steps 10]
        [--host_sync_every_step 0,1 --log_every 10]
        [--results bench/RESULTS.md --card H100 --commit abc1234]

--host_sync_every_step runs the trainer's host side around each step (a batch put on the
devices from host memory, the metrics read off them, the stop signal checked): 0 as the trainer
does it (metrics read one step late, everything else at --log_every boundaries), 1 as it was
before (every metric fetched right after its step and the stop flag gathered every step, so
the devices idle while the host prepares the next step). Without the flag the timed loop only
dispatches steps on two device-resident batches.

The global batch is micro_batch x devices x accum (accum micro-steps per optimizer step, summed
inside the jitted step), parameters and
optimizer state FSDP-sharded over all devices; LION with float32 params, bf16 compute.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def run_one(args) -> dict:
    import jax
    import ml_collections
    import numpy as np

    from mpt_jax.train import metrics as metrics_lib
    from mpt_jax import sharding
    from mpt_jax.train import optim
    from mpt_jax.train import step as step_lib
    from mpt_jax.model.config import MPTConfig

    cfg = MPTConfig.preset(args.model, max_seq_len=max(args.seq, 2048))
    n = jax.device_count()
    train = ml_collections.ConfigDict(dict(
        seq_len=args.seq, global_batch_size=args.micro_batch * n * args.accum,
        micro_batch_size=args.micro_batch if args.accum > 1 else 0,
        compute_dtype="bfloat16", param_dtype="float32", remat_policy=args.remat,
        scan_layers=bool(args.scan), attn_impl=args.attn, loss_chunk_size=args.loss_chunk,
        nonfinite="stop"))
    ocfg = ml_collections.ConfigDict(dict(
        name=args.optim, lr=1e-4, b1=0.9, b2=0.99 if args.optim == "decoupled_lion" else 0.95,
        eps=1e-8, weight_decay=0.0, weight_decay_mask="all", mu_dtype=args.mu_dtype,
        clip_norm=1.0, schedule="cosine", warmup_steps=10, alpha_f=0.1))
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    rules = sharding.DEFAULT_RULES
    in_step = args.clip == "step"  # the trainer's way; "optax": clip_by_global_norm in the chain
    tx = optim.make_optimizer(ocfg, 1000, clip=not in_step)
    settings = step_lib.make_settings(cfg, train, tx, lambda s: 1e-4, mesh=mesh, rules=rules,
                                      seed=0, global_batch=train.global_batch_size,
                                      clip_norm=ocfg.clip_norm if in_step else 0.0)
    _, shardings = step_lib.state_shardings(cfg, train, tx, mesh, rules)
    state = step_lib.init_state(cfg, train, tx, mesh, rules, seed=0)
    step = step_lib.compile_train_step(settings, shardings, mesh, ("input_ids",),
                                       xla_options=args.xla_options)
    rng = np.random.default_rng(0)
    host_batches = [
        {"input_ids": rng.integers(0, cfg.vocab_size, (train.global_batch_size // jax.process_count(),
                                                       args.seq)).astype(np.int32)}
        for _ in range(2)]
    batches = [sharding.make_global_batch(b, mesh, rules) for b in host_batches]
    with sharding.use_mesh(mesh), sharding.use_rules(rules):
        t0 = time.time()
        compiled = step.lower(state, batches[0]).compile()
        compile_s = time.time() - t0
        for i in range(2):  # warm-up
            state, m = compiled(state, batches[i % 2])
        jax.block_until_ready(m["loss"])
        t0 = time.time()
        if args.host_sync_every_step == "":
            for i in range(args.steps):
                state, m = compiled(state, batches[i % 2])
            loss = float(m["loss"])
        else:
            state, loss = trainer_host_loop(compiled, state, host_batches, mesh, rules, args)
        dt = (time.time() - t0) / args.steps
        if args.profile:
            from profile_util import profile

            holder = {"state": state}

            def one():
                holder["state"], mm = compiled(holder["state"], batches[0])
                jax.block_until_ready(mm["loss"])

            print(profile(one, args.profile, steps=2), flush=True)
    tokens = train.global_batch_size * args.seq
    tps = tokens / dt
    mem = metrics_lib.device_memory_gb()
    return dict(host_sync_every_step=args.host_sync_every_step, log_every=args.log_every,
                model=args.model, seq=args.seq, micro_batch=args.micro_batch, accum=args.accum,
                loss_chunk=args.loss_chunk, scan=int(args.scan), clip=args.clip,
                xla_flags=os.environ.get("XLA_FLAGS", ""), xla_options=args.xla_options,
                global_batch=train.global_batch_size, remat=args.remat,
                attn=args.attn, optim=args.optim, mu_dtype=args.mu_dtype or "float32",
                devices=n, step_s=dt, compile_s=compile_s, tokens_per_s_per_device=tps / n,
                mfu=metrics_lib.mfu(tps, cfg, args.seq, n), peak_mem_gb=mem["mem_peak_gb"],
                loss=loss, device=jax.devices()[0].device_kind)


def trainer_host_loop(compiled, state, host_batches, mesh, rules, args):
    """The trainer's per-step host work around `compiled` (see the module docstring)."""
    from mpt_jax import sharding
    from mpt_jax.train import monitor

    stop = monitor.StopSignal()
    values = {}
    reader = monitor.StepMetrics(lambda step, v: values.update(v))
    for i in range(1, args.steps + 1):
        batch = sharding.make_global_batch(host_batches[i % 2], mesh, rules)
        state, m = compiled(state, batch)
        if args.host_sync_every_step == "1":
            values = monitor.host_metrics(m)  # waits for this step
            stop.any_process()
        else:
            reader.push(i, m)  # waits for step i - 1 only
            if i % args.log_every == 0 or i == args.steps:
                reader.flush()
                stop.any_process()
    reader.flush()
    return state, values["loss"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="1b")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro_batch", default="8")
    p.add_argument("--remat", default="dots_no_batch")
    p.add_argument("--scan", default="0", help="1: layers under lax.scan; 0: unrolled (longer "
                   "compile, no per-layer residual copies); a comma list sweeps both")
    p.add_argument("--attn", default="auto")
    p.add_argument("--optim", default="decoupled_lion")
    p.add_argument("--mu_dtype", default="")
    p.add_argument("--loss_chunk", type=int, default=512)
    p.add_argument("--accum", type=int, default=1,
                   help="micro-batches accumulated per optimizer step (global batch = "
                        "micro_batch x devices x accum)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--clip", default="step", choices=("step", "optax"),
                   help="where gradient clipping runs: in the step's gradient scaling (as the "
                        "trainer does) or as optax.clip_by_global_norm in the optimizer chain")
    p.add_argument("--xla_options", default="",
                   help='XLA options for the train step alone (train.xla_options), '
                        'e.g. "xla_gpu_enable_triton_gemm=false"')
    p.add_argument("--results", default="")
    p.add_argument("--card", default="")
    p.add_argument("--commit", default="")
    p.add_argument("--profile", default="",
                   help="trace 2 steps of each variant into this directory and print the device "
                        "time per kernel / XLA op (bench/profile_util.py)")
    p.add_argument("--host_sync_every_step", default="",
                   help="'0': the trainer's host loop (metrics one step late); '1': the old one "
                        "(every metric fetched after its step); a comma list runs both")
    p.add_argument("--log_every", type=int, default=10,
                   help="log boundary of --host_sync_every_step 0 (the trainer's log_every)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        args.micro_batch = int(args.micro_batch)
        args.scan = int(args.scan)
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    rows = []
    for mb, remat, attn, scan, sync in itertools.product(
            args.micro_batch.split(","), args.remat.split(","), args.attn.split(","),
            args.scan.split(","), args.host_sync_every_step.split(",")):
        if sync not in ("", "0", "1"):
            p.error(f"--host_sync_every_step {sync!r}: expected 0, 1 or a comma list of them")
        cmd = [sys.executable, __file__, "--one", "--model", args.model, "--seq", str(args.seq),
               "--micro_batch", mb, "--remat", remat, "--attn", attn, "--scan", scan,
               "--host_sync_every_step", sync, "--log_every", str(args.log_every),
               "--optim", args.optim,
               "--mu_dtype", args.mu_dtype, "--loss_chunk", str(args.loss_chunk),
               "--steps", str(args.steps), "--accum", str(args.accum), "--clip", args.clip,
               "--xla_options", args.xla_options]
        if args.profile:
            cmd += ["--profile", os.path.join(args.profile, f"mb{mb}_{remat}_{attn}_scan{scan}")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        print("\n".join(ln for ln in out.stdout.splitlines() if not ln.startswith("RESULT ")),
              flush=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not lines:
            err = (out.stderr.strip().splitlines() or ["?"])[-1][:200]
            print(f"mb={mb} remat={remat} attn={attn} scan={scan} sync={sync}: FAILED ({err})",
                  flush=True)
            rows.append(dict(micro_batch=mb, remat=remat, attn=attn, failed=err))
            continue
        r = json.loads(lines[-1][7:])
        rows.append(r)
        print(f"{r['model']} seq {r['seq']} mb {r['micro_batch']} x accum {r['accum']} "
              f"(global {r['global_batch']}) remat {r['remat']} scan {r['scan']} attn "
              f"{r['attn']} {r['optim']}/{r['mu_dtype']}{_loop_name(r)}: "
              f"{r['tokens_per_s_per_device']:,.0f} "
              f"tok/s/device, MFU {100 * (r['mfu'] or 0):.1f}%, step {r['step_s']:.3f}s, compile "
              f"{r['compile_s']:.1f}s, peak {r['peak_mem_gb'] or 0:.1f} GiB, loss {r['loss']:.3f} "
              f"[{r['device']} x{r['devices']}]", flush=True)
    if args.results:
        new = not os.path.exists(args.results)
        date = datetime.date.today().isoformat()
        with open(args.results, "a") as fh:
            if new:
                fh.write("# Results\n\n| date | bench | figure | value | card | commit |\n"
                         "|---|---|---|---|---|---|\n")
            for r in rows:
                if "failed" in r:
                    continue
                name = (f"train mpt-{r['model']} seq {r['seq']} mb {r['micro_batch']} x"
                        f"{r['devices']} x accum {r['accum']} remat {r['remat']} attn {r['attn']} {r['optim']} "
                        f"mu {r['mu_dtype']} loss_chunk {r['loss_chunk']}"
                        + ("" if r["scan"] else " layers unrolled (no scan)")
                        + ("" if r["clip"] == "step" else " clip in optax chain")
                        + _loop_name(r)
                        + (f" XLA_FLAGS={r['xla_flags']}" if r["xla_flags"] else "")
                        + (f" train.xla_options={r['xla_options']}" if r["xla_options"] else ""))
                card = args.card or r["device"]
                for fig, val in (("tokens/s/GPU", f"{r['tokens_per_s_per_device']:,.0f}"),
                                 ("MFU %", f"{100 * (r['mfu'] or 0):.1f}"),
                                 ("step s", f"{r['step_s']:.3f}"),
                                 ("compile s", f"{r['compile_s']:.1f}"),
                                 ("peak GiB/GPU", f"{r['peak_mem_gb'] or 0:.1f}")):
                    fh.write(f"| {date} | {name} | {fig} | {val} | {card} | {args.commit} |\n")


def _loop_name(r) -> str:
    sync = r.get("host_sync_every_step", "")
    if sync == "":
        return ""
    return (" trainer host loop: metrics every step (old)" if sync == "1" else
            f" trainer host loop: metrics one step late, log_every {r['log_every']}")


if __name__ == "__main__":
    main()
