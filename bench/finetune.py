"""Finetuning throughput on this machine's devices: MPT-7B's train_step on packed instruction
data (segment ids on), as the trainer runs it. Each variant runs in its own subprocess (clean
peak memory; an OOM loses only that variant).

    python bench/finetune.py --variants sft,story,lora [--steps 4 --attn auto[,pallas_triton]
        --xla_flags ';--xla_gpu_enable_triton_gemm=false' --profile DIR
        --results bench/RESULTS.md --card H200 --commit abc1234]

Variants:
  sft    MPT-7B full finetune, seq 2048, packed examples (llm-foundry's Dolly SFT recipe,
         configs/mpt7b_instruct.py: decoupled AdamW, fp32 params, bf16 compute, full remat),
         micro-batch --sft_micro_batch rows per device
  story  MPT-7B-StoryWriter continued training, seq 65536 (configs/mpt7b_storywriter.py:
         decoupled LION with bf16 moments, full remat, one row per device, loss chunks of 4096),
         documents packed with segment ids
  lora   MPT-7B LoRA, seq 2048, packed examples as `sft`: rank 16, alpha 32, on Wqkv,
         out_proj, up_proj, down_proj (train.lora), the frozen base in bf16, float32 adapters
         with decoupled AdamW, full remat, micro-batch --lora_micro_batch rows per device.
         Run it beside `sft` at the same micro-batch (`--variants sft,lora --sft_micro_batch
         4`): the summary then prints LoRA's step time over the full finetune's.

Data: synthetic examples of Dolly-like lengths: log-normal token counts (median 200, sigma 1.0,
seed 0, clipped to [16, seq]), the first 40% of each the prompt (loss mask 0), packed into rows
first-fit by the data pipeline's own packer (grain's FirstFitPackIterDataset, as
mpt_jax.data.pipeline does for examples with data.packing). For `story`, documents of
log-normal length (median 20,000 tokens, sigma 1.0: book-length) cut into rows. These are
assumed distributions (no dataset is read here), stated so the packing efficiency can be
compared. Weights are random (a step's speed does not depend on their values); token ids are
uniform.

Figures: tokens/s per device counts row positions (real tokens / packing efficiency = row
tokens); MFU is llm-foundry's convention (mpt_jax/train/metrics.py, DESIGN.md) over row
positions, as llm-foundry counts its padded batches; packing efficiency = real tokens / row
positions over the timed batches; peak memory from the device's allocator. The attention
kernel the packed (segment-id) path runs is printed and recorded: `attention.plan` picks it,
on an H200 the Hopper (Mosaic GPU) kernels (which take segment ids since 12-02; the Triton
kernels before).
--attn runs every variant under each attention impl named, one after the other in the same call
(`auto,pallas_triton`: the kernels the plan picks beside the Triton kernels, the previous ones
on a Hopper GPU). --xla_flags likewise: `;`-separated sets of XLA flags, each added to
XLA_FLAGS for a run of every variant (an empty set: XLA's defaults).
LoRA's MFU counts the whole model's forward and backward flops (6 x params + attention per
token, the full finetune's count and llm-foundry's MPT flops_per_batch, which does not discount
frozen weights or add the adapters'), so its MFU is comparable with the full finetune's as
model throughput; the flops LoRA executes are fewer (no base weight gradients).
Reference rows (llm-foundry's published 8x H100 MPT-7B finetuning: seq 2048 10,643 tokens/s/GPU
46.4% MFU; seq 65536 1,956 tokens/s/GPU 28.6% MFU) are not measured here.
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

VARIANTS = {
    # name: (seq, optimizer, mu_dtype, remat, loss_chunk, layout, LoRA rank)
    "sft": (2048, "decoupled_adamw", "", "full", 512, "examples", 0),
    "story": (65536, "decoupled_lion", "bfloat16", "full", 4096, "documents", 0),
    "lora": (2048, "decoupled_adamw", "", "full", 512, "examples", 16),
}
LORA_TARGETS = ("Wqkv", "out_proj", "up_proj", "down_proj")
DATA_SEED = 0


def synthetic_records(layout: str, seq: int, vocab: int, n_tokens: int):
    """Example (or document) records of the stated length distributions, as the pipeline's
    decoded records: input_ids, loss_mask (examples), source_starts."""
    import numpy as np

    from mpt_jax.data import pipeline as data_lib

    rng = np.random.default_rng(DATA_SEED)
    median = 200 if layout == "examples" else 20_000
    records, total = [], 0
    while total < n_tokens:
        n = int(np.clip(rng.lognormal(np.log(median), 1.0), 16, seq if layout == "examples"
                        else 8 * seq))
        ids = rng.integers(1, vocab, n).astype(np.int32)
        starts = np.zeros(n, np.int16)
        starts[0] = 1
        rec = {"input_ids": ids, data_lib.SOURCE_STARTS: starts}
        if layout == "examples":
            rec["loss_mask"] = (np.arange(n) >= int(0.4 * n)).astype(np.int32)
        records.append(rec)
        total += n
    return records


def packed_batches(layout: str, seq: int, rows: int, vocab: int, n_batches: int):
    """n_batches host batches of `rows` packed rows, and their packing efficiency."""
    import grain
    import numpy as np

    from mpt_jax.data import pipeline as data_lib

    records = synthetic_records(layout, seq, vocab, n_tokens=(n_batches + 2) * rows * seq * 2)
    resolved = data_lib.ResolvedData(sources=(), tokenizer_path="", vocab_size=vocab,
                                     mode=layout, dtype="uint16")
    if layout == "documents":  # (the pipeline reads the longest document from the manifest)
        resolved = resolved.__class__(**{**resolved.__dict__, "sources": (data_lib.Source(
            "synthetic", "", 1.0, {"max_document_tokens": max(len(r["input_ids"])
                                                              for r in records)}),)})
    ds = grain.MapDataset.source(records)
    it = iter(data_lib._rows_and_batches(ds, resolved, packing=True, seq_len=seq,
                                         batch_size=rows, prefetch=0))
    batches, real = [], 0
    for _ in range(n_batches):
        b = next(it)
        b.pop(data_lib.SOURCE_STARTS)
        real += int(np.count_nonzero(b["segment_ids"]))
        batches.append(b)
    return batches, real / (n_batches * rows * seq)


def run_one(args) -> dict:
    import jax
    import jax.numpy as jnp
    import ml_collections

    from mpt_jax import sharding
    from mpt_jax.model import attention
    from mpt_jax.model.config import AttnConfig, MPTConfig
    from mpt_jax.train import metrics as metrics_lib
    from mpt_jax.train import optim
    from mpt_jax.train import step as step_lib

    seq, opt_name, mu_dtype, remat, loss_chunk, layout, rank = VARIANTS[args.variant]
    micro = {"sft": args.sft_micro_batch, "lora": args.lora_micro_batch}.get(args.variant, 1)
    cfg = MPTConfig.preset(args.model, max_seq_len=max(seq, 2048),
                           attn_config=AttnConfig(attn_uses_sequence_id=True))
    n = jax.device_count()
    rows = micro * n
    train = ml_collections.ConfigDict(dict(
        seq_len=seq, global_batch_size=rows, micro_batch_size=0, compute_dtype="bfloat16",
        param_dtype="bfloat16" if rank else "float32", remat_policy=remat, scan_layers=False,
        attn_impl=args.attn, loss_chunk_size=loss_chunk, nonfinite="stop",
        lora=ml_collections.ConfigDict(dict(rank=rank, alpha=2.0 * rank, dropout=0.0,
                                            targets=LORA_TARGETS, adapter=""))))
    ocfg = ml_collections.ConfigDict(dict(
        name=opt_name, lr=1e-5, b1=0.9, b2=0.999 if opt_name == "decoupled_adamw" else 0.99,
        eps=1e-8, weight_decay=0.0, weight_decay_mask="all", mu_dtype=mu_dtype, clip_norm=1.0,
        schedule="linear", warmup_steps=2, alpha_f=0.0))
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    rules = sharding.DEFAULT_RULES
    tx = optim.make_optimizer(ocfg, 1000, clip=False)
    settings = step_lib.make_settings(cfg, train, tx, lambda s: 1e-5, mesh=mesh, rules=rules,
                                      seed=0, global_batch=rows, clip_norm=1.0)
    _, shardings = step_lib.state_shardings(cfg, train, tx, mesh, rules)
    state = step_lib.init_state(cfg, train, tx, mesh, rules, seed=0)
    keys = ("input_ids", "segment_ids", "loss_mask") if layout == "examples" else (
        "input_ids", "segment_ids")
    step = step_lib.compile_train_step(settings, shardings, mesh, keys)
    host, efficiency = packed_batches(layout, seq, rows, cfg.vocab_size, max(2, args.steps))
    with sharding.use_mesh(mesh), sharding.use_rules(rules):
        p = attention.plan(args.attn, (micro, seq, cfg.n_heads, cfg.head_dim), cfg.kv_n_heads, seq,
                           jnp.bfloat16, has_segments=True, packed=True)
        kernel = p.kernel + (" (Mosaic GPU fwd)" if p.hopper_fwd else "") + (
            " (Mosaic GPU bwd)" if p.hopper_bwd else "")
        batches = [sharding.make_global_batch(b, mesh, rules) for b in host]
        t0 = time.time()
        compiled = step.lower(state, batches[0]).compile()
        compile_s = time.time() - t0
        analysis = compiled.memory_analysis()  # XLA's plan: the step's scratch beyond its state
        temp_gb = None if analysis is None else analysis.temp_size_in_bytes / 2**30
        state, m = compiled(state, batches[0])  # warm-up
        jax.block_until_ready(m["loss"])
        t0 = time.time()
        for i in range(args.steps):
            state, m = compiled(state, batches[i % len(batches)])
        loss = float(m["loss"])
        dt = (time.time() - t0) / args.steps
        table = ""
        if args.profile:  # one more step under the profiler: its device-time table
            sys.path.insert(0, os.path.join(ROOT, "bench"))
            from profile_util import profile

            def one():
                nonlocal state
                state, m = compiled(state, batches[0])
                jax.block_until_ready(m["loss"])

            tag = "_".join(filter(None, [args.variant, args.attn, args.tag]))
            table = profile(one, os.path.join(args.profile, tag), steps=1, top=40)
    tps = rows * seq / dt
    mem = metrics_lib.device_memory_gb()
    return dict(variant=args.variant, attn=args.attn, model=args.model, seq=seq,
                micro_batch=micro, devices=n, optim=opt_name, lora_rank=rank,
                base_dtype=train.param_dtype,
                mu_dtype=mu_dtype or "float32", remat=remat, kernel=kernel,
                packing_efficiency=efficiency, step_s=dt, compile_s=compile_s,
                tokens_per_s_per_device=tps / n,
                real_tokens_per_s_per_device=tps * efficiency / n,
                mfu=metrics_lib.mfu(tps, cfg, seq, n), peak_mem_gb=mem["mem_peak_gb"],
                temp_gb=temp_gb, loss=loss, device=jax.devices()[0].device_kind, profile=table)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="sft,story,lora",
                   help="comma list of " + ",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    p.add_argument("--sft_micro_batch", type=int, default=8, help="sft rows per device")
    p.add_argument("--lora_micro_batch", type=int, default=4, help="lora rows per device")
    p.add_argument("--attn", default="auto", help="attention impls, each a run of every variant "
                   "(auto, pallas_gpu, pallas_triton, reference)")
    p.add_argument("--xla_flags", default="", help="';'-separated XLA flag sets, each a run "
                   "of every variant")
    p.add_argument("--model", default="7b", help="MPT size (a smaller one for a smoke run)")
    p.add_argument("--profile", default="", help="trace one more step of each run into this "
                   "directory and print its device-time table (bench/profile_util.py)")
    p.add_argument("--results", default="")
    p.add_argument("--card", default="")
    p.add_argument("--commit", default="")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)
    p.add_argument("--tag", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    from mpt_jax.model.attention import IMPLS  # (no backend starts: the runs are subprocesses)

    rows = []
    impls = args.attn.split(",")
    flag_sets = [f.strip() for f in args.xla_flags.split(";")]
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            p.error(f"--variants: unknown {variant!r}; expected some of {sorted(VARIANTS)}")
    for impl in impls:
        if impl not in IMPLS:
            p.error(f"--attn: unknown {impl!r}; expected some of {IMPLS}")
    runs = itertools.product(enumerate(flag_sets), impls, args.variants.split(","))
    for (flag_index, flags), impl, variant in runs:
        cmd = [sys.executable, __file__, "--one", "--variant", variant, "--steps",
               str(args.steps), "--sft_micro_batch", str(args.sft_micro_batch),
               "--lora_micro_batch", str(args.lora_micro_batch), "--model", args.model,
               "--attn", impl, "--profile", args.profile,
               "--tag", f"flags{flag_index}"]
        env = dict(os.environ)
        if flags:
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
        label = f"--attn {impl}" + (f", XLA_FLAGS {flags}" if flags else "")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not lines:
            err = (out.stderr.strip().splitlines() or ["?"])[-1][:200]
            print(f"{variant} ({label}): FAILED ({err})", flush=True)
            continue
        r = json.loads(lines[-1][7:])
        r["xla_flags"] = flags
        table = r.pop("profile", "")
        if table:
            print(f"{variant} ({label}) profile:\n{table}", flush=True)
        rows.append(r)
        lora = (f" LoRA r{r['lora_rank']} on {len(LORA_TARGETS)} targets, {r['base_dtype']} base"
                if r["lora_rank"] else "")
        print(f"{variant} ({label}): MPT-{r['model']} seq {r['seq']} mb {r['micro_batch']} "
              f"x{r['devices']} "
              f"{r['optim']}/{r['mu_dtype']} remat {r['remat']}{lora}, attention {r['kernel']}: "
              f"{r['tokens_per_s_per_device']:,.0f} tok/s/device "
              f"({r['real_tokens_per_s_per_device']:,.0f} real), MFU "
              f"{100 * (r['mfu'] or 0):.1f}%, packing {100 * r['packing_efficiency']:.1f}%, "
              f"step {r['step_s']:.3f}s, compile {r['compile_s']:.0f}s, peak "
              f"{r['peak_mem_gb'] or 0:.1f} GiB (step scratch {r['temp_gb'] or 0:.1f}) "
              f"[{r['device']}]", flush=True)
    first = (impls[0], flag_sets[0])
    by_name = {r["variant"]: r for r in rows if (r["attn"], r["xla_flags"]) == first}
    ratio = None
    if "sft" in by_name and "lora" in by_name:
        full, lora = by_name["sft"], by_name["lora"]
        if full["micro_batch"] == lora["micro_batch"]:
            ratio = lora["step_s"] / full["step_s"]
            print(f"lora step / full finetune step at micro-batch {lora['micro_batch']}: "
                  f"{ratio:.3f} (goal <= 0.75); lora peak {lora['peak_mem_gb'] or 0:.1f} GiB "
                  "(goal < 30)", flush=True)
        else:
            print(f"(no lora/full step ratio: micro-batches differ, {lora['micro_batch']} vs "
                  f"{full['micro_batch']}; pass --sft_micro_batch {lora['micro_batch']})")
    if args.results and rows:
        date = datetime.date.today().isoformat()
        with open(args.results, "a") as fh:
            for r in rows:
                name = (f"finetune {r['variant']} mpt-{r['model']} seq {r['seq']} mb "
                        f"{r['micro_batch']} x"
                        f"{r['devices']} packed (segment ids, --attn {r['attn']}: {r['kernel']}"
                        + (f"; XLA_FLAGS {r['xla_flags']}" if r["xla_flags"] else "") + ") "
                        f"{r['optim']} mu {r['mu_dtype']} remat {r['remat']}"
                        + (f" LoRA r{r['lora_rank']} {'+'.join(LORA_TARGETS)} {r['base_dtype']} "
                           "base (MFU: full-model flops)" if r["lora_rank"] else ""))
                card = args.card or r["device"]
                figures = [
                    ("tokens/s/GPU", f"{r['tokens_per_s_per_device']:,.0f}"),
                    ("real tokens/s/GPU", f"{r['real_tokens_per_s_per_device']:,.0f}"),
                    ("MFU %", f"{100 * (r['mfu'] or 0):.1f}"),
                    ("packing efficiency %", f"{100 * r['packing_efficiency']:.1f}"),
                    ("step s", f"{r['step_s']:.3f}"),
                    ("compile s", f"{r['compile_s']:.0f}"),
                    ("peak GiB/GPU", f"{r['peak_mem_gb'] or 0:.1f}"),
                    ("step scratch GiB/GPU (XLA temp)", f"{r['temp_gb'] or 0:.1f}")]
                if (r["variant"] == "lora" and (r["attn"], r["xla_flags"]) == first
                        and ratio is not None):
                    figures.append(("step / full finetune step (same call)", f"{ratio:.3f}"))
                for fig, val in figures:
                    fh.write(f"| {date} | {name} | {fig} | {val} | {card} | {args.commit} |\n")


if __name__ == "__main__":
    main()
