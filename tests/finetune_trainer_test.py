"""The trainer finetuning from `train.init_from` (issue #17 part 2): the first step's loss and the
step-0 held-out loss equal transformers' on the same batches, stop and resume reproduces the
uninterrupted run without reading init_from again, ICL tasks during training compile once, and
every bad input is refused before anything is written."""
import json
import re
import shutil

import ml_collections
import numpy as np
import pytest

from conftest import hf_model, make_docs, read_losses, stop_at_check, tiny
from mpt_jax.data import prepare, tokenizer as tokenizer_lib

T = 32
CFG = tiny(d_model=40, n_heads=4, vocab_size=384, max_seq_len=T)


def _examples(n, seed, tag):
    docs = make_docs(n, seed, tag, max_words=12)
    return [{"prompt": " ".join(d.split()[:2]) + ":", "response": " " + " ".join(
        d.split()[2:] or ["alpha"])} for d in docs]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny HF MPT directory with its tokenizer, examples shards made with that tokenizer,
    and shards made with another one."""
    root = tmp_path_factory.mktemp("ft")
    rows = _examples(120, 1, "a")
    texts = [r["prompt"] + r["response"] for r in rows]
    tok_path = root / "tokenizer.json"
    tokenizer_lib.train_byte_level_bpe(texts, 320).save(str(tok_path))
    hf = hf_model(CFG, seed=5, std=0.1)
    hf.save_pretrained(root / "hf")
    shutil.copy(tok_path, root / "hf" / "tokenizer.json")
    jsonl = root / "ex.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare.prepare_dataset([str(jsonl)], str(root / "ex"), str(tok_path), seq_len=None,
                            format="prompt_response", max_seq_len=T, progress=False)
    other = root / "other_tok.json"
    tokenizer_lib.train_byte_level_bpe(texts[:40], 300).save(str(other))
    prepare.prepare_dataset([str(jsonl)], str(root / "ex_other"), str(other), seq_len=None,
                            format="prompt_response", max_seq_len=T, progress=False)
    return root, hf


def ft_config(init_from, shards, **overrides):
    from configs.base import data_section, get_base_config, model_section

    c = get_base_config("125m")
    c.model = model_section(CFG)
    c.seed = 3
    c.max_steps, c.log_every, c.eval_every, c.checkpoint_every = 1, 1, 1, 1
    c.train.update(dict(init_from=str(init_from), seq_len=T, global_batch_size=4,
                        micro_batch_size=0, compute_dtype="float32", param_dtype="float32",
                        remat_policy="none", scan_layers=True, attn_impl="reference",
                        loss_chunk_size=8))
    c.optim.update(dict(name="decoupled_lion", lr=1e-3, warmup_steps=0, schedule="constant"))
    c.eval.update(dict(batch_size=4, num_batches=2, first=True))
    c.loss_spike.enabled = False
    c.checkpoint.async_save = False
    c.data = data_section(sources={"ex": ml_collections.ConfigDict(dict(path=str(shards),
                                                                        weight=1.0))},
                          eval_fraction=0.1, prefetch=0)
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def _hf_masked_nll(hf, batch):
    """(sum of response-token NLLs, their number) with labels -100 off the mask, as HF's
    loss counts them."""
    import torch

    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    labels = np.where(batch["loss_mask"] == 1, batch["input_ids"], -100)
    with torch.no_grad():
        logits = hf(ids, attention_mask=torch.tensor(batch["segment_ids"])).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).numpy()
    tgt = labels[:, 1:]
    keep = tgt != -100
    picked = np.take_along_axis(logp, np.where(keep, tgt, 0)[..., None], -1)[..., 0]
    return float(-(picked * keep).sum()), int(keep.sum())


@pytest.mark.slow
def test_init_from_hf_dir_first_step_and_step0_eval_equal_transformers(pretrained, tmp_path):
    from mpt_jax.data import pipeline as data_lib
    from mpt_jax.train import trainer

    root, hf = pretrained
    config = ft_config(root / "hf", root / "ex")
    workdir = tmp_path / "run"
    summary = trainer.train(config, str(workdir))
    assert summary["step"] == 1
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    (step0,) = [r for r in rows if r["step"] == 0]
    (train1,) = [r for r in rows if r["step"] == 1 and "loss" in r]
    batch = next(data_lib.make_train_iterator(config.data, seq_len=T, batch_size=4,
                                              seed=config.seed, workdir=str(workdir)))
    nll, count = _hf_masked_nll(hf, batch)
    np.testing.assert_allclose(train1["loss"], nll / count, rtol=1e-5)
    assert train1["loss_tokens"] == count and 0 < train1["packing_efficiency"] < 1
    eval_batches = data_lib.make_eval_batches(config.data, seq_len=T, batch_size=4,
                                              num_batches=2, workdir=str(workdir))
    sums = [_hf_masked_nll(hf, b) for b in eval_batches]
    want = sum(s for s, _ in sums) / sum(c for _, c in sums)
    np.testing.assert_allclose(step0["eval_loss"], want, rtol=1e-5)
    assert step0["eval_tokens"] == sum(c for _, c in sums)
    sha = lambda p: tokenizer_lib.tokenizer_sha256(tokenizer_lib.load_tokenizer(str(p)))  # noqa
    assert sha(workdir) == sha(root / "hf")  # the run's tokenizer is the checkpoint's


@pytest.mark.slow
def test_stop_and_resume_mid_finetune_reproduces_the_run(pretrained, tmp_path, monkeypatch,
                                                         caplog):
    """Packed examples (segment ids), a stop after step 3 (the signal's path), then the same
    config again with init_from gone: the losses of the uninterrupted run, exactly."""
    from mpt_jax.train import trainer

    root, _ = pretrained
    base = shutil.copytree(root / "hf", tmp_path / "base")
    # (packed, the held-out split fills 2 batches of 2 rows, not of 4)
    over = {"max_steps": 6, "checkpoint_every": 3, "eval_every": 3, "data.packing": True,
            "model.attn_config.attn_uses_sequence_id": True, "eval.batch_size": 2}
    trainer.train(ft_config(base, root / "ex", **over), str(tmp_path / "full"))

    split = str(tmp_path / "split")
    with monkeypatch.context() as m:
        stop_at_check(m, 3)
        first = trainer.train(ft_config(base, root / "ex", **over), split)
    assert first["stopped"].startswith("signal") and first["step"] == 3
    shutil.rmtree(base)  # a resumed finetune never reads init_from again
    with caplog.at_level("INFO", logger="mpt_jax"):
        again = trainer.train(ft_config(base, root / "ex", **over), split)
    assert again["step"] == 6
    assert "resumed from checkpoint 3 (the finetune's own" in caplog.text
    want, got = read_losses(str(tmp_path / "full")), read_losses(split)
    assert sorted(want) == list(range(1, 7)) and got == want


def _bad_inputs(root, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    return {
        "missing": (dict(init_from=tmp_path / "nope"), root / "ex",
                    f"train.init_from='{tmp_path / 'nope'}': {tmp_path / 'nope'}: not a "
                    "directory"),
        "not_a_checkpoint": (dict(init_from=empty), root / "ex",
                             f"{empty / 'config.json'}: file not found"),
        "unsafe_model_key": (dict(init_from=root / "hf", **{"model.n_layers": 3}),
                             root / "ex", "model.n_layers=3 differs from the checkpoint's 2"),
        "tokenizer_mismatch": (dict(init_from=root / "hf"), root / "ex_other",
                               "not with train.init_from's tokenizer"),
        "packed_without_segments": (dict(init_from=root / "hf", **{"data.packing": True}),
                                    root / "ex", "attn_uses_sequence_id is False"),
    }


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "unsafe_model_key",
                                  "tokenizer_mismatch", "packed_without_segments"])
def test_bad_finetune_inputs_are_refused_before_anything_is_written(pretrained, tmp_path,
                                                                     case):
    from mpt_jax.train import trainer

    root, _ = pretrained
    over, shards, needle = _bad_inputs(root, tmp_path)[case]
    init_from = over.pop("init_from")
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=re.escape(needle)) as err:
        trainer.train(ft_config(init_from, shards, **over), str(workdir))
    assert "\n" not in str(err.value)
    assert not workdir.exists()


TASKS = """icl_tasks:
- label: lm
  dataset_uri: lm.jsonl
  icl_task_type: language_modeling
  num_fewshot: [0]
- label: mc
  dataset_uri: mc.jsonl
  icl_task_type: multiple_choice
  num_fewshot: [1]
"""


@pytest.mark.slow
def test_icl_tasks_during_training_compile_once(pretrained, tmp_path, monkeypatch):
    """eval.icl_tasks: accuracies logged as icl/<label>/<N>-shot at step 0 and every
    eval_every, equal to evaluate_tasks on the saved weights; no recompilation across evals;
    a task file that does not load is refused before any data is read."""
    from mpt_jax import load_pretrained
    from mpt_jax.eval import icl, tasks
    from mpt_jax.eval.scoring import TRACES
    from mpt_jax.train import trainer

    root, _ = pretrained
    rows = _examples(6, 9, "q")
    (tmp_path / "lm.jsonl").write_text("".join(json.dumps(
        {"context": r["prompt"], "continuation": r["response"]}) + "\n" for r in rows))
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(
        {"query": r["prompt"], "choices": [r["response"], " alpha beta", " mu"], "gold": 0})
        + "\n" for r in rows))
    (tmp_path / "tasks.yaml").write_text(TASKS)
    traces = []
    real = icl.evaluate_tasks

    def counting(*args, **kwargs):
        before = sum(TRACES.values())
        out = real(*args, **kwargs)
        traces.append(sum(TRACES.values()) - before)
        return out

    monkeypatch.setattr(icl, "evaluate_tasks", counting)
    config = ft_config(root / "hf", root / "ex", max_steps=2,
                       **{"eval.icl_tasks": (str(tmp_path / "tasks.yaml"),),
                          "eval.icl_batch_tokens": 512})
    workdir = tmp_path / "run"
    trainer.train(config, str(workdir))
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    icl_rows = {r["step"]: r for r in rows if "icl/lm/0-shot" in r}
    assert sorted(icl_rows) == [0, 1, 2] and all("icl/mc/1-shot" in r for r in icl_rows.values())
    assert traces[0] > 0 and traces[1:] == [0, 0]
    model = load_pretrained(str(workdir))
    tok = tokenizer_lib.load_tokenizer(str(workdir))
    prepared = tasks.prepare_tasks([str(tmp_path / "tasks.yaml")], tok,
                                   eos_id=tok.token_to_id("<|endoftext|>"), max_seq_len=T)
    want = real(model, prepared, tok, eos_id=tok.token_to_id("<|endoftext|>"), batch_tokens=512)
    assert {k[len("icl/"):]: v for k, v in icl_rows[2].items() if k.startswith("icl/")} == \
        pytest.approx(want)

    (tmp_path / "bad.yaml").write_text("icl_tasks:\n- label: x\n  icl_task_type: nope\n")
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match="bad.yaml"):
        trainer.train(ft_config(root / "hf", root / "ex",
                                **{"eval.icl_tasks": (str(tmp_path / "bad.yaml"),)}),
                      str(fresh))
    assert not fresh.exists()
