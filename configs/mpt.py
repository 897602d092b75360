"""llm-foundry's MPT pretraining sizes: `--config configs/mpt.py:1b` (125m, 350m, 760m, 1b, 3b,
7b, 13b, 30b). Model presets from MPTConfig.preset; lr, batch and duration from llm-foundry's
scripts/train/yamls/pretrain/mpt-<size>.yaml (decoupled AdamW). Data: C4 shards prepared with
python -m mpt_jax.data.prepare at /data/c4 (--config.data.sources.c4.path=DIR), or
--config.data.builtin=python_stdlib for a demo.
For MPT-7B exactly as trained (LION, 1760 x 2048, the 10-source mix) use configs/mpt7b.py.
"""
import ml_collections

from configs.base import get_base_config

# size: (lr, global batch, max_steps = llm-foundry's max_duration in batches, micro batch).
# 125m, 1b and 7b are llm-foundry's yamls; the other rows are not checked against them:
# verify against scripts/train/yamls/pretrain/mpt-<size>.yaml before relying on them.
RECIPES = {
    "125m": (6.0e-4, 256, 4800, 16),
    "350m": (3.0e-4, 256, 13400, 8),
    "760m": (2.5e-4, 512, 29000, 8),
    "1b": (2.0e-4, 512, 24800, 4),
    "3b": (1.6e-4, 512, 53700, 8),
    "7b": (1.2e-4, 1024, 63900, 8),
    "13b": (1.0e-4, 2048, 71500, 8),
    "30b": (1.0e-4, 2048, 142000, 4),
}


def get_config(size: str = "125m"):
    c = get_base_config(size)
    lr, batch, steps, micro = RECIPES[size]
    c.optim.lr = lr
    c.train.global_batch_size = batch
    c.train.micro_batch_size = micro
    c.train.seq_len = c.model.max_seq_len
    c.max_steps = steps
    # llm-foundry's pretraining yamls train on C4: one source, prepared shards at /data/c4 by
    # default (--config.data.sources.c4.path=DIR points elsewhere; data.builtin overrides it).
    c.data.sources = ml_collections.ConfigDict(
        {"c4": ml_collections.ConfigDict(dict(path="/data/c4", weight=1.0))})
    return c
