"""The shared base of every training config: llm-foundry's pretraining recipe around an MPT size.

`get_base_config(size)` returns a ConfigDict whose keys are the whole truth for a run (config
files change values, never add keys; `--config.a.b=value` overrides any of them):

  seed, max_steps, log_every, eval_every, checkpoint_every      top-level loop settings
  model.*        MPTConfig fields (llm-foundry names; `attn_config`, `ffn_config`, `init_config`
                 nested). `model.vocab_size = 0` means: the tokenizer's vocabulary padded to a
                 multiple of 128.
  train.*        seq_len, global_batch_size (sequences per optimizer step, all processes),
                 micro_batch_size (sequences per batch shard per micro-step; 0 = no gradient
                 accumulation), compute_dtype, param_dtype, remat_policy
                 (none|full|dots|dots_no_batch|dots_act|nothing), scan_layers, attn_impl
                 (auto|reference|pallas_gpu|pallas_triton|pallas_tpu), loss_chunk_size (positions per
                 cross-entropy chunk; 0 = whole sequence), nonfinite (stop|skip),
                 xla_options (XLA options for the train step alone, "name=value,..."),
                 init_from ('' = random init; else the pretrained weights to finetune: an
                 HF-layout directory, one of our converted checkpoints, a training workdir or
                 step directory; weights only, the model config comes from it and `model.*`
                 may change only max_seq_len, dropout and attn_uses_sequence_id, see
                 mpt_jax/convert/pretrained.py),
                 lora.* (rank 0 = off; alpha, dropout, targets of Wqkv, out_proj, up_proj,
                 down_proj, gate_proj; adapter: '' or the adapters to start from, a PEFT
                 adapter directory or a LoRA run / checkpoint of ours): LoRA over train.init_from
                 (mpt_jax/model/lora.py), the base frozen in train.param_dtype
  optim.*        name (decoupled_lion|decoupled_adamw), lr, b1, b2, eps, weight_decay,
                 weight_decay_mask (all|matrices), mu_dtype ('' = param dtype), clip_norm,
                 schedule (cosine|linear|constant), warmup_steps, alpha_f
  mesh.*         data, fsdp, tensor (one may be -1: the rest of the devices), rules (the
                 logical-axis table of mpt_jax/sharding.py)
  checkpoint.*   keep, async_save
  eval.*         batch_size (global), num_batches, first (also evaluate at step 0 of a fresh
                 run: llm-foundry's eval_first, the pretrained model's held-out loss before a
                 finetune), icl_tasks (llm-foundry ICL task yaml files run at eval_every, each
                 task's accuracy logged as `icl/<label>/<N>-shot`; () = none), icl_batch_tokens
                 (tokens per ICL scoring batch)
  loss_spike.*   llm-foundry's kill_loss_spike: enabled, window, multiplier, patience,
                 loss_cap, action (warn|stop)
  profile.*      start_step (-1 = off), num_steps: a jax.profiler trace in WORKDIR/profile
  data.*         mpt_jax.data's keys: builtin, tokenizer, sources, packing, eval_fraction,
                 shuffle, num_workers, prefetch, builtin_vocab_size. A source may be a
                 directory of finetuning examples (prepare --format prompt_response|chat):
                 batches then carry a loss_mask and the loss is on response tokens only;
                 packing=True packs whole examples (pair it with
                 model.attn_uses_sequence_id=True). builtin='python_stdlib_sft' is the built-in
                 instruction set (a stdlib function's signature and docstring in the instruct
                 template -> its body), tokenized with data.tokenizer (the pretrained model's)
                 into examples of at most builtin_max_seq_len tokens (builtin_on_too_long:
                 truncate|drop)
"""
from __future__ import annotations

import ml_collections

from mpt_jax.model.config import MPTConfig
from mpt_jax.sharding import DEFAULT_RULES

SIZES = ("125m", "350m", "760m", "1b", "3b", "7b", "13b", "30b")


def model_section(cfg: MPTConfig) -> ml_collections.ConfigDict:
    d = cfg.to_dict("foundry")
    for key in ("model_type", "architectures", "layer_norm_epsilon"):
        d.pop(key, None)
    return ml_collections.ConfigDict(d)


def data_section(**overrides) -> ml_collections.ConfigDict:
    data = ml_collections.ConfigDict(dict(
        builtin="", tokenizer="", sources={}, packing=False, eval_fraction=0.01, shuffle=True,
        num_workers=0, prefetch=2, builtin_vocab_size=4096, builtin_max_seq_len=2048,
        builtin_on_too_long="drop"))
    data.update(overrides)
    return data


def get_base_config(size: str = "125m") -> ml_collections.ConfigDict:
    if size not in SIZES:
        raise ValueError(f"unknown MPT size {size!r}; expected one of {SIZES}")
    c = ml_collections.ConfigDict()
    c.seed = 17  # llm-foundry's global_seed
    c.max_steps = 4800
    c.log_every = 10
    c.eval_every = 1000
    c.checkpoint_every = 1000

    c.model = model_section(MPTConfig.preset(size))

    # scan_layers False unrolls the blocks: no per-layer copies of saved activations in and out
    # of the scan's stacked buffers; faster steps on GPUs at about twice the compile time
    # (bench/RESULTS.md has the measurements).
    c.train = ml_collections.ConfigDict(dict(
        seq_len=2048, global_batch_size=256, micro_batch_size=0, compute_dtype="bfloat16",
        param_dtype="float32", remat_policy="dots_no_batch", scan_layers=False, attn_impl="auto",
        loss_chunk_size=512, nonfinite="stop", xla_options="", init_from="",
        # PEFT's LoraConfig defaults (r 8, lora_alpha 8, no dropout) but off; PEFT's default
        # target for MPT is Wqkv
        lora=ml_collections.ConfigDict(dict(rank=0, alpha=8.0, dropout=0.0,
                                            targets=("Wqkv",), adapter=""))))

    # llm-foundry's pretrain yamls: decoupled_adamw lr 6e-4 (125m) ... 1.2e-4 (7b), betas
    # (0.9, 0.95), eps 1e-8, weight_decay 0; cosine_with_warmup t_warmup 100ba, alpha_f 0.1;
    # gradient clipping by norm 1.0.
    c.optim = ml_collections.ConfigDict(dict(
        name="decoupled_adamw", lr=6.0e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
        weight_decay_mask="all", mu_dtype="", clip_norm=1.0, schedule="cosine",
        warmup_steps=100, alpha_f=0.1))

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1,
                                            rules=tuple(DEFAULT_RULES)))
    c.checkpoint = ml_collections.ConfigDict(dict(keep=3, async_save=True))
    c.eval = ml_collections.ConfigDict(dict(batch_size=8, num_batches=4, first=False,
                                            icl_tasks=(), icl_batch_tokens=32768))
    c.loss_spike = ml_collections.ConfigDict(dict(
        enabled=True, window=100, multiplier=2.0, patience=4, loss_cap=10.0, action="warn"))
    c.profile = ml_collections.ConfigDict(dict(start_step=-1, num_steps=5))
    c.data = data_section()
    return c
