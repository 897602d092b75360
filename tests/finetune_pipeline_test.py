"""The grain pipeline over example shards: padded and packed rows hold whole examples with
their loss masks aligned, packing efficiency, the held-out split, process shares, and an
example longer than seq_len refused. (Exact resume: data_pipeline_test's parametrisation.)"""

from pathlib import Path

import numpy as np
import pytest

from conftest import PIPELINE_T as T
from conftest import data, data_config, take  # noqa: F401 (data: fixture)
from mpt_jax.data import finetune, pipeline, prepare


def examples_of(path):
    import grain

    manifest = prepare.read_manifest(path)
    source = grain.sources.ArrayRecordDataSource(prepare.shard_paths(path, manifest))
    return [tuple(map(tuple, finetune.decode_record(source[i], manifest["dtype"])))
            for i in range(len(source))]


def segments(batches):
    """Every (ids, mask) segment of every row, with checks on the layout of the rows."""
    out = []
    for batch in batches:
        assert set(batch) == {"input_ids", "segment_ids", "loss_mask"}
        assert all(v.dtype == np.int32 and v.shape == batch["input_ids"].shape
                   for v in batch.values())
        for ids, seg, mask in zip(batch["input_ids"], batch["segment_ids"], batch["loss_mask"]):
            k = seg.max()
            runs = [s for i, s in enumerate(seg) if i == 0 or s != seg[i - 1]]
            assert runs[:k] == list(range(1, k + 1)) and runs[k:] in ([], [0])
            assert (ids[seg == 0] == 0).all() and (mask[seg == 0] == 0).all()
            out += [(tuple(ids[seg == s]), tuple(mask[seg == s])) for s in range(1, k + 1)]
    return out


@pytest.mark.parametrize("packing", [False, True])
def test_rows_hold_whole_examples_with_their_masks(data, packing):
    records = examples_of(data["c_ex"]) + examples_of(data["b_ex"])
    cfg = data_config({"c": (data["c_ex"], 1.0), "b": (data["b_ex"], 1.0)}, packing=packing)
    it = pipeline.make_train_iterator(cfg, seq_len=T, batch_size=4, seed=2)
    batches = take(it, 25)
    found = segments(batches)
    assert set(found) <= set(records)  # each segment is one whole example, mask aligned
    rows = 25 * 4
    if packing:
        assert len(found) > rows  # some rows hold several examples
    else:
        assert len(found) == rows
    real = sum(int(np.count_nonzero(b["segment_ids"])) for b in batches)
    assert it.packing_efficiency() == real / (rows * T)
    assert it.packing_efficiency() < 1.0
    it.close()
    assert pipeline.batch_keys(pipeline.resolve_data(cfg, None), packing) == (
        "input_ids", "segment_ids", "loss_mask")


def test_packing_fills_rows_better_than_padding(data, tmp_path):
    import json

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta"]
    (tmp_path / "short.jsonl").write_text("".join(json.dumps(
        {"prompt": str(rng.choice(words)), "response": " " + " ".join(rng.choice(words, 2))})
        + "\n" for _ in range(50)))
    prepare.prepare_dataset([str(tmp_path / "short.jsonl")], str(tmp_path / "short"),
                            data["tok"], seq_len=None, format="prompt_response", max_seq_len=T,
                            progress=False)
    effs = []
    for packing in (False, True):
        it = pipeline.make_train_iterator(data_config({"s": (str(tmp_path / "short"), 1.0)},
                                                      packing=packing),
                                          seq_len=T, batch_size=4, seed=0)
        take(it, 20)
        effs.append(it.packing_efficiency())
        it.close()
    assert effs[0] < 0.5 and effs[1] > 0.8, effs


def test_held_out_split_and_process_shares(data):
    records = examples_of(data["a_ex"])
    cfg = data_config({"a": (data["a_ex"], 1.0)}, eval_fraction=0.1, shuffle=False)
    evals = pipeline.make_eval_batches(cfg, seq_len=T, batch_size=2, num_batches=3)
    assert segments(evals) == records[9::10][:6]  # every 10th example, in order, one a row
    train = set(segments(take(pipeline.make_train_iterator(cfg, seq_len=T, batch_size=8, seed=0),
                              len(records) // 8)))
    assert not train & set(records[9::10])
    shares = []
    for process_index in range(2):
        it = pipeline.make_train_iterator(data_config({"b": (data["b_ex"], 1.0)}), seq_len=T,
                                          batch_size=1, seed=5, process_index=process_index,
                                          process_count=2)
        shares.append(set(segments(take(it, 30))))  # one epoch of a 30-example share
        it.close()
    assert not shares[0] & shares[1]
    assert shares[0] | shares[1] == set(examples_of(data["b_ex"]))


def test_examples_longer_than_seq_len_are_refused(data):
    with pytest.raises(ValueError, match=r"holds examples of up to 16 tokens \(prepared with "
                                         r"--max_seq_len 16\), longer than seq_len 8"):
        pipeline.make_train_iterator(data_config({"c": (data["c_ex"], 1.0)}, packing=True),
                                     seq_len=8, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="disagree on mode"):
        pipeline.make_train_iterator(data_config({"c": (data["c_ex"], 1.0),
                                                  "a": (data["a_doc"], 1.0)}),
                                     seq_len=T, batch_size=2, seed=0)


SOURCE = '''
import os

def plain(a, b=2):
    """Adds.

    Twice."""
    # a comment
    return a + b

class C:
    @property
    def m(self):
        """Doc."""
        return 1

def no_doc():
    return 3

def only_doc():
    """Nothing after."""
'''


def test_builtin_instruction_set(tmp_path, monkeypatch, data):
    from mpt_jax.data import corpus, sft_corpus

    rows = sft_corpus.function_examples(SOURCE)
    assert [(r["name"], r["prompt"], r["response"]) for r in rows] == [
        ("plain", 'def plain(a, b=2):\n    """Adds.\n\n    Twice."""\n',
         "    # a comment\n    return a + b\n"),
        ("m", 'def m(self):\n    """Doc."""\n', "    return 1\n")]
    files = corpus.stdlib_files()
    monkeypatch.setattr(corpus, "stdlib_files", lambda: [f for f in files
                                                         if f.endswith(("/textwrap.py",
                                                                        "/shlex.py"))])
    monkeypatch.setattr(corpus, "_prepare_workers", lambda: 1)
    cfg = data_config({}, builtin="python_stdlib_sft", tokenizer=data["tok"], eval_fraction=0.1,
                      builtin_max_seq_len=256, builtin_on_too_long="truncate")
    with pytest.raises(ValueError, match="needs data.tokenizer"):
        pipeline.resolve_data(data_config({}, builtin="python_stdlib_sft",
                                          builtin_max_seq_len=64, builtin_on_too_long="drop"),
                              str(tmp_path))
    resolved = pipeline.resolve_data(cfg, str(tmp_path))
    manifest = resolved.sources[0].manifest
    assert resolved.mode == "examples" and manifest["template"] == "instruct"
    chosen = corpus.stdlib_files()
    n_functions = sum(len(sft_corpus.function_examples(Path(f).read_text())) for f in chosen)
    assert len(chosen) == 2 and n_functions > 15
    assert manifest["examples"] + manifest["dropped"] == n_functions
    assert manifest["examples"] > 5 and manifest["truncated"] > 0
    batch = next(pipeline.make_train_iterator(cfg, seq_len=256, batch_size=2, seed=0,
                                              workdir=str(tmp_path)))
    assert batch["loss_mask"].shape == (2, 256) and batch["loss_mask"].sum() > 0
    monkeypatch.setattr(prepare, "prepare_dataset", None)  # cached: not prepared again
    assert pipeline.resolve_data(cfg, str(tmp_path)) == resolved
