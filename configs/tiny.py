"""The CPU demo: a ~2M-parameter MPT on the built-in Python-stdlib corpus.

    python train.py --config configs/tiny.py --workdir runs/tiny

The corpus and a byte-level BPE (data.builtin_vocab_size tokens) are prepared into
WORKDIR/data on the first run (about a minute on 2 cores, cached after). model.vocab_size 0 =
the tokenizer's vocabulary padded to a multiple of 128.
"""
from configs.base import data_section, get_base_config


def get_config():
    c = get_base_config("125m")
    c.max_steps = 300
    c.log_every = 10
    c.eval_every = 50
    c.checkpoint_every = 100
    m = c.model
    m.d_model, m.n_heads, m.n_layers, m.expansion_ratio = 128, 4, 4, 4
    m.max_seq_len = 128
    m.vocab_size = 0
    c.train.seq_len = 128
    c.train.global_batch_size = 16
    c.train.micro_batch_size = 0
    c.train.compute_dtype = "float32"  # bf16 matmuls are slow on CPUs
    c.train.remat_policy = "none"
    c.train.scan_layers = True  # on a CPU the scan's shorter compile matters more
    c.train.loss_chunk_size = 64
    c.train.attn_impl = "reference"
    c.optim.name = "decoupled_lion"
    c.optim.lr = 2.0e-3
    c.optim.b1, c.optim.b2 = 0.9, 0.99
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 20
    c.eval.batch_size = 16
    c.eval.num_batches = 4
    c.loss_spike.window = 50
    c.data = data_section(builtin="python_stdlib", builtin_vocab_size=4096, eval_fraction=0.02)
    return c
