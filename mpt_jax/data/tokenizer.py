"""Tokenizers: load a Hugging Face `tokenizer.json`, fingerprint it, pad the model vocabulary.

MPT uses EleutherAI's GPT-NeoX-20B tokenizer (50277 tokens) with a 50432-row embedding table. 50432
is a multiple of 128 but not the smallest one >= 50277 (that is 50304): it is GPT-NeoX's Megatron
padding, a multiple of 128 x 2-way model parallelism = 256. The built-in corpus trains its own
small byte-level BPE here too.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator

import tokenizers

from mpt_jax import storage

# The end-of-text token our trained byte-level BPE reserves (GPT-NeoX-20B's is the same string).
ENDOFTEXT = "<|endoftext|>"


def load_tokenizer(path_or_name: str) -> tokenizers.Tokenizer:
    """Loads a tokenizer: a `tokenizer.json` file, a directory holding one, or a hub name.

    A hub name (e.g. "EleutherAI/gpt-neox-20b") is tried only when `path_or_name` is not an
    existing local path, and only through `tokenizers.Tokenizer.from_pretrained`; offline that
    fails with a ValueError saying so.
    """
    if not path_or_name:
        raise ValueError("tokenizer: got an empty path or name")
    if storage.is_remote(path_or_name):  # gs:// / s3://: a tokenizer.json or a directory
        file_path = path_or_name
        if not path_or_name.endswith(".json") and storage.isdir(path_or_name):
            file_path = storage.join(path_or_name, "tokenizer.json")
        if not storage.isfile(file_path):
            raise ValueError(f"tokenizer: no tokenizer.json at {file_path!r}")
        return _load_text(file_path, storage.read_text(file_path))
    if os.path.isdir(path_or_name):
        file_path = os.path.join(path_or_name, "tokenizer.json")
        if not os.path.isfile(file_path):
            raise ValueError(f"tokenizer: directory {path_or_name!r} holds no tokenizer.json")
        return _load_file(file_path)
    if os.path.isfile(path_or_name):
        return _load_file(path_or_name)
    looks_local = (
        path_or_name.startswith((".", "/", "~"))
        or path_or_name.endswith(".json")
        or path_or_name.count("/") > 1
    )
    if looks_local:
        raise ValueError(f"tokenizer: no such file or directory {path_or_name!r}")
    try:
        return tokenizers.Tokenizer.from_pretrained(path_or_name)
    # Network errors, missing repos, auth: all mean "cannot load".
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"tokenizer: {path_or_name!r} is not a local path and could not be fetched from the "
            f"Hugging Face hub (offline? wrong name?): {type(e).__name__}: {e}".splitlines()[0]
        ) from None


def _load_text(file_path: str, text: str) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception)
        raise ValueError(
            f"tokenizer: {file_path!r} is not a valid tokenizer.json: {e}".splitlines()[0]
        ) from None


def _load_file(file_path: str) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(file_path)
    except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception)
        raise ValueError(
            f"tokenizer: {file_path!r} is not a valid tokenizer.json: {e}".splitlines()[0]
        ) from None


def tokenizer_sha256(tokenizer: tokenizers.Tokenizer) -> str:
    """The SHA-256 of the tokenizer's canonical JSON: equal exactly when it tokenizes the same."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def padded_vocab_size(n_tokens: int, multiple: int = 128) -> int:
    """The smallest multiple of `multiple` >= n_tokens (the model's embedding rows).

    GPT-NeoX-20B's 50277 tokens give 50304 with the default 128; MPT-7B's 50432 is
    `padded_vocab_size(50277, multiple=256)` (see the module docstring).
    """
    if n_tokens <= 0 or multiple <= 0:
        raise ValueError(f"padded_vocab_size: need positive sizes, got {n_tokens=} {multiple=}")
    return -(-n_tokens // multiple) * multiple


def token_id(tokenizer: tokenizers.Tokenizer, text: str) -> int:
    """The id of `text` as a single token (e.g. "<|endoftext|>"), or ValueError if it is not one."""
    id_ = tokenizer.token_to_id(text)
    if id_ is None:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) != 1:
            raise ValueError(f"tokenizer: {text!r} is not a single token (it encodes to {ids})")
        id_ = ids[0]
    return id_


def train_byte_level_bpe(texts: Iterable[str] | Iterator[str], vocab_size: int
                         ) -> tokenizers.Tokenizer:
    """Trains a GPT-2-style byte-level BPE with `<|endoftext|>` as its only special token.

    Byte-level means every byte sequence is encodable and decodes back exactly.
    """
    if vocab_size < 257 + 1:
        raise ValueError(
            f"byte-level BPE needs vocab_size > 257 (256 bytes + EOS), got {vocab_size}")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer
