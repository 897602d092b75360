"""MPT-7B as trained (model card): 6.65B parameters, 1T tokens, global batch 1760 x 2048,
decoupled LION, bf16, FSDP, activation checkpointing, the 10-source pretraining mix.

    python train.py --config configs/mpt7b.py --workdir runs/mpt7b \
        # sources under /data/mpt/<name>

Data: each source is a directory of shards prepared with
`python -m mpt_jax.data.prepare --tokenizer <gpt-neox-20b> --seq_len 2048 ...`, at
`DATA_ROOT/<name>` where DATA_ROOT defaults to /data/mpt; change it with the config argument
(`--config configs/mpt7b.py:/my/root`) or per source (`--config.data.sources.c4.path=...`).

Optimizer: the MPT-7B card says LION; llm-foundry's public mpt-7b.yaml is decoupled AdamW lr
1.2e-4, betas (0.9, 0.95), wd 0, cosine_with_warmup t_warmup 100ba alpha_f 0.1, clipping 1.0.
MosaicML did not publish MPT-7B's LION hyperparameters. We follow the LION paper's rule of thumb
(lr 3-10x smaller than AdamW's): lr 4e-5 = 1.2e-4 / 3, betas (0.9, 0.99) (DecoupledLionW's
defaults), weight decay 0 as the yaml; warmup and alpha_f as the yaml. These three numbers are
our choice, not MosaicML's record.
Batch: 1760 sequences per step; 1T tokens / (1760 * 2048) = 277,432 steps. Micro-batch 8
sequences per batch shard (llm-foundry's device_train_microbatch_size); the number of
micro-steps is derived from the mesh (e.g. 8 GPUs: 1760 / (8 * 8) is not whole, so the trainer
asks for a micro-batch that divides 220 rows per shard: use --config.train.micro_batch_size=4
or 5 or 10 there; on 16/32/... devices adjust likewise).
"""
import os

import ml_collections

from configs.base import data_section, get_base_config

# (name, weight) as on the MPT-7B model card.
MIX = (
    ("mc4", 0.33),
    ("c4", 0.299),
    ("redpajama_commoncrawl", 0.1),
    ("the_stack", 0.1),
    ("wikipedia", 0.04),
    ("stack_markdown", 0.035),
    ("s2orc", 0.033),
    ("books", 0.03),
    ("arxiv", 0.019),
    ("stackexchange", 0.014),
)


def get_config(data_root: str = "/data/mpt"):
    c = get_base_config("7b")
    c.max_steps = 277_432
    c.log_every = 10
    c.eval_every = 5000
    c.checkpoint_every = 1000
    c.train.seq_len = 2048
    c.train.global_batch_size = 1760
    c.train.micro_batch_size = 5  # divides 1760/8 = 220 and 1760/32 = 55 rows per shard
    c.train.remat_policy = "dots_no_batch"
    c.optim.name = "decoupled_lion"
    c.optim.lr = 4.0e-5
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.weight_decay = 0.0
    c.optim.mu_dtype = "bfloat16"  # halves LION's state; '' keeps float32 moments
    c.optim.warmup_steps = 100
    c.optim.alpha_f = 0.1
    c.optim.clip_norm = 1.0
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.eval.batch_size = 64
    c.eval.num_batches = 16
    c.checkpoint.keep = 3
    c.data = data_section(
        tokenizer="",  # the shards carry their tokenizer (GPT-NeoX-20B; checked if set)
        sources={name: ml_collections.ConfigDict(dict(path=os.path.join(data_root, name),
                                                      weight=weight))
                 for name, weight in MIX},
        num_workers=8)
    return c
