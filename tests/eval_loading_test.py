"""The checkpoints eval.py takes: an HF directory, our converted directory, a training workdir
and one of its step directories, each with the tokenizer found where it lives; special tokens
as HF's tokenizer files say."""
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import eval_common
from mpt_jax.convert import import_checkpoint
from mpt_jax.eval.loading import load, special_ids, tokenizer_location


def _params(model):
    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_every_checkpoint_layout_loads_with_its_tokenizer(tmp_path):
    hf = load(eval_common.checkpoint(), dtype="float32")
    assert (hf.eos_id, hf.bos_id) == (0, 0)
    ours = tmp_path / "ours"
    import_checkpoint(eval_common.checkpoint(), ours)
    # a trainer workdir: the tokenizer at its root, the weights in checkpoints/<step>/
    work = tmp_path / "work"
    step = work / "checkpoints" / "7"
    shutil.copytree(ours, step)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.move(step / name, work / name)
    assert tokenizer_location(str(step)) == str(work)
    for path in (ours, work, step):
        got = load(str(path), dtype="float32")
        assert got.tokenizer.to_str() == hf.tokenizer.to_str()
        assert (got.eos_id, got.bos_id) == (0, 0)
        for a, b in zip(_params(got.model), _params(hf.model)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_special_tokens_and_errors(tmp_path):
    tok = eval_common.tokenizer()
    cfg = eval_common.model().config
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|endoftext|>"}}))
    assert special_ids(tok, str(tmp_path), cfg) == (0, 0)  # bos from config.json
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="eos_token '<\\|nope\\|>' is not a token"):
        special_ids(tok, str(tmp_path), cfg)
    with pytest.raises(ValueError, match="does not exist"):
        load(str(tmp_path / "missing"))
