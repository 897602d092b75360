"""The CPU demo: a 1.3M-parameter MPT (d_model 128, 4 layers, 4 heads; 0.79M in the blocks, 0.52M
in the 4096 x 128 embedding) on the built-in Python-stdlib corpus, or on your own shards.

    python train.py --config configs/tiny.py --workdir runs/tiny
    python train.py --config configs/tiny.py:/path/to/shards --workdir runs/mine

The corpus and a byte-level BPE (data.builtin_vocab_size tokens) are prepared into
WORKDIR/data on the first run (about a minute on 2 cores, cached after). With `:DIR` the model
trains on DIR instead: a directory written by `python -m mpt_jax.data.prepare` (with
--keep_documents, which serves any seq_len, or with --seq_len 128), whose tokenizer sets the
vocabulary. model.vocab_size 0 = the tokenizer's vocabulary padded to a multiple of 128.
"""
import ml_collections

from configs.base import data_section, get_base_config


def get_config(shards: str = ""):
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
    if shards:
        c.data = data_section(eval_fraction=0.02, sources={"shards": ml_collections.ConfigDict(
            dict(path=shards, weight=1.0))})
    else:
        c.data = data_section(builtin="python_stdlib", builtin_vocab_size=4096,
                              eval_fraction=0.02)
    return c
