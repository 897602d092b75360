"""MPT-7B-StoryWriter-65k+-style continued training: MPT-7B on long documents at 65,536 tokens.

    python -m mpt_jax.data.prepare --keep_documents --input books/ --output /data/ft/books \
        --tokenizer MPT7B_DIR
    python train.py --config configs/mpt7b_storywriter.py:MPT7B_DIR --workdir runs/storywriter

The model card: MPT-7B finetuned with a context of 65k tokens on a filtered fiction subset of
books3; ALiBi lets it read and write past that. Here: max_seq_len 65536 over the pretrained
2048 (ALiBi: no position table to grow, so the finetune may change it), documents packed into
65,536-token rows with segment ids (a longer book is cut into consecutive rows), full remat and
bf16 LION moments so that the 7B step at this length fits one H200 (issue #17 reports it
measured; bench/ holds the numbers). The loss is ordinary next-token loss on all text.

MosaicML published neither the optimizer settings nor the duration of StoryWriter's finetune.
Ours: decoupled LION (MPT-7B's pretraining optimizer) at lr 4e-5 / 4 = 1e-5, betas (0.9, 0.99),
no weight decay, cosine to 0.1 after 20 warmup steps, clipping 1.0; 8 rows (524,288 tokens) a
step, one row per micro-step on each device; 2,000 steps (about 1B tokens). Set them for your
data and hardware.
"""
import ml_collections

from configs import mpt7b
from configs.base import data_section

SEQ = 65536


def get_config(init_from: str = "", data_root: str = "/data/ft"):
    c = mpt7b.get_config()
    c.train.init_from = init_from
    c.model.max_seq_len = SEQ
    c.model.attn_config.attn_uses_sequence_id = True
    c.train.seq_len = SEQ
    c.train.global_batch_size = 8
    c.train.micro_batch_size = 1
    c.train.remat_policy = "full"
    c.train.loss_chunk_size = 4096
    c.optim.name = "decoupled_lion"
    c.optim.lr = 1.0e-5
    c.optim.b1, c.optim.b2 = 0.9, 0.99
    c.optim.weight_decay = 0.0
    c.optim.mu_dtype = "bfloat16"
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 20
    c.optim.alpha_f = 0.1
    c.optim.clip_norm = 1.0
    c.max_steps = 2000
    c.log_every = 1
    c.eval_every = 250
    c.checkpoint_every = 100
    c.eval.batch_size = 8
    c.eval.num_batches = 4
    c.loss_spike.enabled = False
    c.data = data_section(
        sources={"books": ml_collections.ConfigDict(dict(path=f"{data_root}/books", weight=1.0))},
        packing=True, eval_fraction=0.01, num_workers=4)
    return c
