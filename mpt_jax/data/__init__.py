"""Data: text -> token shards (prepare), grain pipelines over them (pipeline), tokenizers.

Names are imported lazily, so `python -m mpt_jax.data.prepare` and `mpt_jax.data.tokenizer` do not
pull in grain.
"""

import importlib

_EXPORTS = {
    "DataIterator": "pipeline",
    "ResolvedData": "pipeline",
    "batch_keys": "pipeline",
    "make_eval_batches": "pipeline",
    "make_train_iterator": "pipeline",
    "resolve_data": "pipeline",
    "load_tokenizer": "tokenizer",
    "padded_vocab_size": "tokenizer",
    "tokenize_example": "finetune",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mpt_jax.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mpt_jax.data' has no attribute {name!r}")
