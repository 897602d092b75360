"""Data: text -> token shards (prepare), grain pipelines over them (pipeline), tokenizers."""

from mpt_jax.data.pipeline import (
    DataIterator,
    ResolvedData,
    make_eval_batches,
    make_train_iterator,
    resolve_data,
)
from mpt_jax.data.tokenizer import load_tokenizer, padded_vocab_size

__all__ = [
    "DataIterator",
    "ResolvedData",
    "load_tokenizer",
    "make_eval_batches",
    "make_train_iterator",
    "padded_vocab_size",
    "resolve_data",
]
