"""mpt_jax.data.tokenizer: loading, fingerprinting, vocabulary padding, the built-in BPE."""

import os
import shutil

import pytest

from mpt_jax.data import tokenizer as tokenizer_lib

# EleutherAI's GPT-NeoX-20B tokenizer.json (MPT's) is not part of the repository: point
# MPT_JAX_NEOX_TOKENIZER at a copy to run the tests that need it.
NEOX_JSON = os.environ.get("MPT_JAX_NEOX_TOKENIZER", "")
needs_neox = pytest.mark.skipif(
    not os.path.isfile(NEOX_JSON),
    reason="needs GPT-NeoX-20B's tokenizer.json: set MPT_JAX_NEOX_TOKENIZER=/path/to/"
           "gpt-neox-20b.json" + (f" ({NEOX_JSON!r} is not a file)" if NEOX_JSON else ""))


def test_padded_vocab_size():
    assert tokenizer_lib.padded_vocab_size(50277) == 50304  # smallest multiple of 128
    assert tokenizer_lib.padded_vocab_size(50277, multiple=256) == 50432  # MPT-7B's table
    assert tokenizer_lib.padded_vocab_size(128) == 128
    assert tokenizer_lib.padded_vocab_size(1) == 128
    assert tokenizer_lib.padded_vocab_size(4097, multiple=64) == 4160
    with pytest.raises(ValueError, match="n_tokens=0"):
        tokenizer_lib.padded_vocab_size(0)


@needs_neox
def test_load_neox_by_file_and_directory(tmp_path):
    tok = tokenizer_lib.load_tokenizer(NEOX_JSON)
    # 50277 in EleutherAI's release; the shared copy carries 4 more added (chat) tokens.
    assert 50277 <= tok.get_vocab_size() <= 50304
    assert tokenizer_lib.padded_vocab_size(tok.get_vocab_size(), multiple=256) == 50432
    assert tokenizer_lib.token_id(tok, "<|endoftext|>") == 0
    text = "def f(x):\n    return x  # héllo"
    assert tok.decode(tok.encode(text).ids) == text
    shutil.copy(NEOX_JSON, tmp_path / "tokenizer.json")
    tok_dir = tokenizer_lib.load_tokenizer(str(tmp_path))
    assert tokenizer_lib.tokenizer_sha256(tok_dir) == tokenizer_lib.tokenizer_sha256(tok)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        tokenizer_lib.load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="holds no tokenizer.json"):
        tokenizer_lib.load_tokenizer(str(tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        tokenizer_lib.load_tokenizer(str(bad))
    with pytest.raises(ValueError, match="empty"):
        tokenizer_lib.load_tokenizer("")


def test_trained_byte_level_bpe_round_trips(tmp_path):
    texts = ["import os\nprint(os.getcwd())\n", "x = [i * 2 for i in range(10)]\n"] * 20
    tok = tokenizer_lib.train_byte_level_bpe(texts, vocab_size=300)
    assert tok.get_vocab_size() <= 300
    assert tokenizer_lib.token_id(tok, tokenizer_lib.ENDOFTEXT) == 0
    unseen = "café ✓ 日本\tend"  # byte-level: anything encodes and decodes back exactly
    assert tok.decode(tok.encode(unseen).ids) == unseen
    tok.save(str(tmp_path / "t.json"))
    reloaded = tokenizer_lib.load_tokenizer(str(tmp_path / "t.json"))
    assert tokenizer_lib.tokenizer_sha256(reloaded) == tokenizer_lib.tokenizer_sha256(tok)
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizer_lib.train_byte_level_bpe(texts, vocab_size=100)
    with pytest.raises(ValueError, match="not a single token"):
        tokenizer_lib.token_id(tok, "not one token at all")
