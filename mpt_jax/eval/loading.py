"""A checkpoint and its tokenizer, as every evaluation loads them.

The checkpoint is anything `load_pretrained` takes (an HF directory, our converted directory, a
training workdir or one of its step directories). The tokenizer is `tokenizer` when given (a
tokenizer.json, its directory or a hub name), else the checkpoint's: the directory itself, or
for a step directory (WORKDIR/checkpoints/N) its workdir.

Special tokens, as HF's tokenizer reports them (what lm-eval's `hf` model and llm-foundry use):
EOS from tokenizer_config.json's `eos_token` beside the tokenizer, else config.json's
`eos_token_id`, else `<|endoftext|>` if the vocabulary has it; BOS likewise from `bos_token` /
`bos_token_id` (else none).
"""
from __future__ import annotations

import json
from typing import NamedTuple

import tokenizers

from mpt_jax import storage
from mpt_jax.data.tokenizer import ENDOFTEXT, load_tokenizer
from mpt_jax.model import MPTForCausalLM


class Loaded(NamedTuple):
    model: MPTForCausalLM
    tokenizer: tokenizers.Tokenizer
    tokenizer_dir: str | None  # where tokenizer_config.json would be
    eos_id: int | None
    bos_id: int | None


def tokenizer_location(checkpoint: str, tokenizer: str | None = None) -> str:
    if tokenizer:
        return tokenizer
    path = storage.abspath(checkpoint)
    if (not storage.isfile(storage.join(path, "tokenizer.json"))
            and storage.basename(storage.dirname(path)) == "checkpoints"):
        return storage.dirname(storage.dirname(path))  # a step dir: its workdir
    return path


def _config_token(tok_dir: str | None, key: str, tokenizer) -> int | None:
    if tok_dir is None:
        return None
    path = storage.join(tok_dir, "tokenizer_config.json")
    if not storage.isfile(path):
        return None
    try:
        value = json.loads(storage.read_text(path)).get(key)
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{path}: not a JSON object") from None
    if isinstance(value, dict):  # {"content": "<|endoftext|>", ...}
        value = value.get("content")
    if not isinstance(value, str):
        return None
    token_id = tokenizer.token_to_id(value)
    if token_id is None:
        raise ValueError(f"{path}: {key} {value!r} is not a token of the tokenizer")
    return token_id


def special_ids(tokenizer, tok_dir: str | None, config) -> tuple[int | None, int | None]:
    """(eos_id, bos_id) as described in the module docstring."""
    eos = _config_token(tok_dir, "eos_token", tokenizer)
    if eos is None and isinstance(config.eos_token_id, int):
        eos = config.eos_token_id
    if eos is None:
        eos = tokenizer.token_to_id(ENDOFTEXT)
    bos = _config_token(tok_dir, "bos_token", tokenizer)
    if bos is None and isinstance(config.bos_token_id, int):
        bos = config.bos_token_id
    return eos, bos


def load(checkpoint: str, *, tokenizer: str | None = None, dtype="bfloat16") -> Loaded:
    """The model (compute and parameter dtype `dtype`) and its tokenizer; ValueError (or the
    converter's ConversionError) naming what is missing."""
    import jax.numpy as jnp

    from mpt_jax import load_pretrained

    if not storage.exists(checkpoint):
        raise ValueError(f"checkpoint {checkpoint!r} does not exist")
    where = tokenizer_location(checkpoint, tokenizer)
    tok = load_tokenizer(where)
    # jnp's scalar type (jnp.float32, not np.dtype('float32')): the model's static dtype then
    # hashes as load_pretrained's default does, so equal models share compiled functions
    dt = getattr(jnp, jnp.dtype(dtype).name)
    model = load_pretrained(checkpoint, dtype=dt, param_dtype=dt)
    tok_dir = where if storage.isdir(where) else (
        storage.dirname(where) if storage.isfile(where) else None)
    eos, bos = special_ids(tok, tok_dir, model.config)
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    if n_tok > model.config.vocab_size:
        raise ValueError(f"the tokenizer ({where}) has {n_tok} tokens, more than the model's "
                         f"vocab_size {model.config.vocab_size}")
    return Loaded(model, tok, tok_dir, eos, bos)
