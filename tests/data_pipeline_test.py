"""mpt_jax.data.pipeline: order, mixing, determinism, exact resume, process shares, packing,
the held-out split, the built-in corpus and every bad config."""

import json
import os

import numpy as np
import pytest

from conftest import PIPELINE_T as T
from conftest import WORDS, data, data_config, make_docs, take  # noqa: F401 (data: fixture)
from mpt_jax.data import corpus, pipeline, prepare
from mpt_jax.data import tokenizer as tokenizer_lib

def rows_of(batches):
    return [tuple(row) for b in batches for row in b["input_ids"].tolist()]


def records_of(path):
    import grain

    manifest = prepare.read_manifest(path)
    source = grain.sources.ArrayRecordDataSource(prepare.shard_paths(path, manifest))
    return [tuple(np.frombuffer(source[i], manifest["dtype"]).tolist())
            for i in range(len(source))]


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == np.int32 and np.array_equal(x[key], y[key]), key


@pytest.mark.parametrize("mode", ["seq", "doc"])
def test_unshuffled_batches_detokenise_to_documents_in_order(data, mode):
    cfg = data_config({"a": (data[f"a_{mode}"], 1.0)}, shuffle=False)
    it = pipeline.make_train_iterator(cfg, seq_len=T, batch_size=4, seed=0)
    batches = take(it, 12)
    it.close()
    assert batches[0]["input_ids"].shape == (4, T) and set(batches[0]) == {"input_ids"}
    tok = tokenizer_lib.load_tokenizer(data["tok"])
    text = tok.decode(np.concatenate([b["input_ids"].reshape(-1) for b in batches]).tolist(),
                      skip_special_tokens=False)
    docs = text.split(tokenizer_lib.ENDOFTEXT)[:-1]  # the last one is cut off
    assert len(docs) > 10
    assert docs == data["docs"]["a"][: len(docs)]


def test_same_seed_same_batches_other_seed_other_batches(data):
    cfg = data_config({"a": (data["a_seq"], 1.0), "b": (data["b_seq"], 0.5)})
    first = take(pipeline.make_train_iterator(cfg, seq_len=T, batch_size=4, seed=3), 5)
    again = take(pipeline.make_train_iterator(cfg, seq_len=T, batch_size=4, seed=3), 5)
    other = take(pipeline.make_train_iterator(cfg, seq_len=T, batch_size=4, seed=4), 5)
    assert_same_batches(first, again)
    assert rows_of(first) != rows_of(other)


@pytest.mark.parametrize("mode,packing,num_workers", [
    ("seq", False, 0), ("doc", True, 0), ("doc", False, 0), ("doc", True, 1), ("ex", True, 0),
    ("ex", False, 0)])
@pytest.mark.slow
def test_resume_mid_epoch_yields_identical_next_batches(data, mode, packing, num_workers):
    cfg = data_config({"a": (data[f"a_{mode}"], 2.0), "c": (data[f"c_{mode}"], 1.0)},
                      packing=packing, num_workers=num_workers, eval_fraction=0.05)
    it = pipeline.make_train_iterator(cfg, seq_len=T, batch_size=3, seed=7)
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
    expected = take(it, 12)  # runs past an epoch of c
    it.close()
    efficiency = it.packing_efficiency()
    restored = pipeline.make_train_iterator(cfg, seq_len=T, batch_size=3, seed=7)
    restored.set_state(state)
    assert_same_batches(take(restored, 12), expected)
    assert restored.packing_efficiency() == efficiency
    restored.close()


def test_mixture_proportions_and_per_source_epochs(data):
    a_records, b_records = set(records_of(data["a_seq"])), set(records_of(data["b_seq"]))
    cfg = data_config({"a": (data["a_seq"], 7.0), "b": (data["b_seq"], 3.0)})  # unnormalised
    rows = rows_of(take(pipeline.make_train_iterator(cfg, seq_len=T, batch_size=10, seed=1), 60))
    from_a = [r for r in rows if r in a_records]
    from_b = [r for r in rows if r in b_records]
    assert len(from_a) + len(from_b) == len(rows) == 600
    assert abs(len(from_b) / len(rows) - 0.3) < 0.03
    # b is smaller: it runs through several epochs, each one a fresh permutation of all of b.
    n_b = len(b_records)
    assert len(from_b) >= 2 * n_b
    epochs = [from_b[i * n_b:(i + 1) * n_b] for i in range(2)]
    assert all(sorted(e) == sorted(b_records) for e in epochs)
    assert epochs[0] != epochs[1]


def drawn_per_source(batches, mode, packing, a_records, tok):
    """Records drawn from sources a and b, read off the batches themselves: a record is drawn
    once its first token has been yielded (sequences: the row is the record; documents: a piece
    of text that begins with a document's tag 'a12 ' / 'b3 ')."""
    import re

    if mode == "seq":
        rows = rows_of(batches)
        return {"a": sum(r in a_records for r in rows), "b": sum(r not in a_records for r in rows)}
    if packing:
        pieces = [ids[seg == s].tolist() for b in batches
                  for ids, seg in zip(b["input_ids"], b["segment_ids"])
                  for s in range(1, seg.max() + 1)]
        tags = [m.group(1) for p in pieces
                if (m := re.match(r"([ab])\d+ ", tok.decode(p, skip_special_tokens=False)))]
    else:  # one concatenated stream: a document starts after each end-of-text (the last one
        # may be cut anywhere after its first token, so only that first letter is read)
        stream = tok.decode(np.concatenate([b["input_ids"].reshape(-1) for b in batches]).tolist(),
                            skip_special_tokens=False)
        tags = [text[0] for text in stream.split(tokenizer_lib.ENDOFTEXT) if text]
    assert set(tags) <= {"a", "b"}
    return {"a": tags.count("a"), "b": tags.count("b")}


@pytest.mark.parametrize("mode,packing", [("seq", False), ("doc", False), ("doc", True)])
def test_epochs_per_source_count_the_records_drawn_and_survive_resume(data, mode, packing):
    tok = tokenizer_lib.load_tokenizer(data["tok"])
    a_records = set(records_of(data[f"a_{mode}"]))
    sizes = {"a": len(records_of(data[f"a_{mode}"])), "b": len(records_of(data[f"b_{mode}"]))}
    cfg = data_config({"a": (data[f"a_{mode}"], 1.0), "b": (data[f"b_{mode}"], 1.0)},
                      packing=packing)
    it = pipeline.make_train_iterator(cfg, seq_len=T, batch_size=4, seed=11)
    assert it.epochs() == {"a": 0.0, "b": 0.0}
    batches = take(it, 80)
    assert all(set(b) == ({"input_ids", "segment_ids"} if packing else {"input_ids"})
               for b in batches)
    drawn = drawn_per_source(batches, mode, packing, a_records, tok)
    assert it.epochs() == {name: drawn[name] / sizes[name] for name in sizes}
    assert it.epochs()["b"] > 1.0  # the small source is well into a later epoch
    state = json.loads(json.dumps(it.get_state()))
    more = take(it, 9)
    restored = pipeline.make_train_iterator(cfg, seq_len=T, batch_size=4, seed=11)
    restored.set_state(state)
    assert restored.epochs() == {name: drawn[name] / sizes[name] for name in sizes}
    assert_same_batches(take(restored, 9), more)
    assert restored.epochs() == it.epochs()
    drawn_all = drawn_per_source(batches + more, mode, packing, a_records, tok)
    assert it.epochs() == {name: drawn_all[name] / sizes[name] for name in sizes}
    it.close()
    restored.close()


@pytest.mark.parametrize("mode", ["seq", "doc"])
def test_two_processes_read_disjoint_shares_covering_everything(data, mode):
    cfg = data_config({"b": (data[f"b_{mode}"], 1.0)}, packing=mode == "doc")
    if mode == "seq":
        everything = records_of(data["b_seq"])
        shares = []
        for process_index in range(2):
            it = pipeline.make_train_iterator(cfg, seq_len=T, batch_size=1, seed=5,
                                              process_index=process_index, process_count=2)
            n = len(everything[process_index::2])  # one epoch of this process's share
            shares.append(rows_of(take(it, n)))
        assert not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == sorted(everything)
    else:  # packed rows: compare the document pieces they hold
        docs = set()
        for process_index in range(2):
            it = pipeline.make_train_iterator(
                cfg, seq_len=T, batch_size=1, seed=5, process_index=process_index,
                process_count=2)
            pieces = set()
            for batch in take(it, 200):  # several epochs of a 30-document share
                ids, seg = batch["input_ids"][0], batch["segment_ids"][0]
                for s in range(1, seg.max() + 1):
                    pieces.add(tuple(ids[seg == s]))
            docs_here = pieces
            assert not docs & docs_here
            docs |= docs_here
        all_pieces = {tuple(r[i:i + T]) for r in records_of(data["b_doc"])
                      for i in range(0, len(r), T)}
        assert docs == all_pieces


def test_packing_never_straddles(data):
    cfg = data_config({"c": (data["c_doc"], 1.0), "b": (data["b_doc"], 1.0)}, packing=True)
    pieces = {tuple(r[i:i + T]) for path in (data["c_doc"], data["b_doc"])
              for r in records_of(path) for i in range(0, len(r), T)}
    batches = take(pipeline.make_train_iterator(cfg, seq_len=T, batch_size=4, seed=2), 30)
    n_segments = 0
    for batch in batches:
        assert set(batch) == {"input_ids", "segment_ids"}
        for ids, seg in zip(batch["input_ids"], batch["segment_ids"]):
            # ids 1..k in order, each one contiguous, then only padding (segment 0, token 0)
            k = seg.max()
            runs = [s for i, s in enumerate(seg) if i == 0 or s != seg[i - 1]]
            assert runs[: k] == list(range(1, k + 1)) and runs[k:] in ([], [0])
            assert (ids[seg == 0] == 0).all()
            for s in range(1, k + 1):
                # each segment is exactly one (piece of one) document
                assert tuple(ids[seg == s]) in pieces
                n_segments += 1
    assert n_segments > len(batches) * 4  # rows really hold several documents


def test_held_out_split(data):
    cfg = data_config({"a": (data["a_seq"], 1.0)}, eval_fraction=0.1)
    records = records_of(data["a_seq"])
    evals = pipeline.make_eval_batches(cfg, seq_len=T, batch_size=2, num_batches=3)
    assert_same_batches(evals, pipeline.make_eval_batches(cfg, seq_len=T, batch_size=2,
                                                          num_batches=3))
    assert rows_of(evals) == records[9::10][:6]  # every 10th record, in order
    train = rows_of(take(pipeline.make_train_iterator(cfg, seq_len=T, batch_size=8, seed=0),
                         len(records) // 8))
    assert not set(train) & set(records[9::10])
    with pytest.raises(ValueError, match=r"yields only \d+ batches .* 1000 asked"):
        pipeline.make_eval_batches(cfg, seq_len=T, batch_size=2, num_batches=1000)
    packed = pipeline.make_eval_batches(
        data_config({"a": (data["a_doc"], 1.0)}, eval_fraction=0.1, packing=True),
        seq_len=T, batch_size=2, num_batches=2)
    assert packed[0]["segment_ids"].shape == (2, T)


def test_bad_configs(data, tmp_path):
    def train(cfg, **kw):
        return pipeline.make_train_iterator(cfg, **{"seq_len": T, "batch_size": 2, "seed": 0,
                                                    **kw})

    with pytest.raises(ValueError, match="shards directory .*missing.* does not exist"):
        train(data_config({"x": (str(tmp_path / "missing"), 1.0)}))
    with pytest.raises(ValueError, match="holds no manifest.json"):
        train(data_config({"x": (str(tmp_path), 1.0)}))
    with pytest.raises(ValueError, match=r"prepared with seq_len 16, the config asks for seq_len"):
        train(data_config({"a": (data["a_seq"], 1.0)}), seq_len=32)
    # document records serve any seq_len, though a_doc's manifest records 16 (older CLIs
    # required one)
    assert next(train(data_config({"a": (data["a_doc"], 1.0)}, packing=True),
                      seq_len=32))["input_ids"].shape == (2, 32)
    with pytest.raises(ValueError, match="packing=True needs shards that keep documents"):
        train(data_config({"a": (data["a_seq"], 1.0)}, packing=True))
    with pytest.raises(ValueError, match="disagree on mode"):
        train(data_config({"a": (data["a_seq"], 1.0), "b": (data["b_doc"], 1.0)}))
    with pytest.raises(ValueError, match="weight must be a positive number, got 0"):
        train(data_config({"a": (data["a_seq"], 0.0)}))
    with pytest.raises(ValueError, match="data.sources is empty"):
        train(data_config({}))
    with pytest.raises(ValueError, match="eval_fraction must be 0 or in"):
        train(data_config({"a": (data["a_seq"], 1.0)}, eval_fraction=0.7))
    with pytest.raises(ValueError, match="process_index 2 not in"):
        train(data_config({"a": (data["a_seq"], 1.0)}), process_index=2, process_count=2)
    other_tok = tmp_path / "other.json"
    tokenizer_lib.train_byte_level_bpe(["entirely different text"] * 3, 270).save(str(other_tok))
    with pytest.raises(ValueError, match=r"data.tokenizer=.*other.json.* is not the tokenizer"):
        train(data_config({"a": (data["a_seq"], 1.0)}, tokenizer=str(other_tok)))
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "alpha beta"}) + "\n")
    prepare.prepare_dataset([str(tmp_path / "docs.jsonl")], str(tmp_path / "other"),
                            str(other_tok), seq_len=2, progress=False)
    with pytest.raises(ValueError, match="different tokenizers"):
        pipeline.resolve_data(data_config({"a": (data["a_seq"], 1.0),
                                           "o": (str(tmp_path / "other"), 1.0)}), None)
    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = prepare.read_manifest(data["b_seq"])
    (empty / "manifest.json").write_text(json.dumps({**manifest, "inputs": {}, "records": 0}))
    with pytest.raises(ValueError, match="empty.* is empty: 0 records"):
        train(data_config({"e": (str(empty), 1.0)}))
    with pytest.raises(ValueError, match="unknown built-in corpus"):
        train(data_config({}, builtin="wikipedia"), workdir=str(tmp_path))
    with pytest.raises(ValueError, match="needs a workdir"):
        train(data_config({}, builtin="python_stdlib"))
    it = train(data_config({"a": (data["a_seq"], 1.0)}))
    with pytest.raises(ValueError, match="state is from another pipeline"):
        train(data_config({"a": (data["a_seq"], 1.0)}), seed=1).set_state(it.get_state())


def test_builtin_corpus_prepared_once_and_cached(tmp_path, monkeypatch):
    files = corpus.stdlib_files()
    assert len(files) > 100 and all(f.endswith(".py") for f in files)
    assert not any("site-packages" in f or f"{os.sep}test{os.sep}" in f for f in files)
    # A slice of the real corpus keeps this test fast; the full one takes ~30 s on 2 cores.
    monkeypatch.setattr(corpus, "stdlib_files", lambda: files[:40])
    monkeypatch.setattr(corpus, "_prepare_workers", lambda: 1)
    cfg = data_config({}, builtin="python_stdlib", builtin_vocab_size=512, eval_fraction=0.05)
    resolved = pipeline.resolve_data(cfg, str(tmp_path))
    assert resolved.vocab_size == 512 and resolved.mode == "documents"
    assert resolved.tokenizer_path.startswith(str(tmp_path / "data"))
    assert tokenizer_lib.load_tokenizer(resolved.tokenizer_path).get_vocab_size() == 512
    manifest_path = os.path.join(resolved.sources[0].path, "manifest.json")
    mtime = os.stat(manifest_path).st_mtime_ns
    monkeypatch.setattr(prepare, "prepare_dataset", None)  # a rerun must not prepare again
    again = pipeline.resolve_data(cfg, str(tmp_path))
    assert again == resolved and os.stat(manifest_path).st_mtime_ns == mtime
    batch = next(pipeline.make_train_iterator(cfg, seq_len=32, batch_size=2, seed=0,
                                              workdir=str(tmp_path)))
    assert batch["input_ids"].shape == (2, 32) and batch["input_ids"].max() < 512
    assert len(pipeline.make_eval_batches(cfg, seq_len=32, batch_size=2, num_batches=2,
                                          workdir=str(tmp_path))) == 2


def test_copied_workdir_needs_no_preparation_and_resumes_the_stream(tmp_path, monkeypatch,
                                                                    capsys):
    """The built-in corpus under a workdir, copied as `cp -r` does (fresh mtimes) and the
    original moved away: nothing is prepared again and an iterator state of the original
    restores in the copy to the same next batches."""
    import subprocess

    from conftest import prepare_small_builtin

    run, copy = tmp_path / "run", tmp_path / "copy"
    prepare_small_builtin(str(run), monkeypatch)
    assert "training a 384-token byte-level BPE" in capsys.readouterr().err  # says what it does
    cfg = data_config({}, builtin="python_stdlib", builtin_vocab_size=384, eval_fraction=0.05)
    it = pipeline.make_train_iterator(cfg, seq_len=T, batch_size=2, seed=0, workdir=str(run))
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    want = take(it, 3)
    subprocess.run(["cp", "-r", str(run), str(copy)], check=True)
    run.rename(tmp_path / "moved")
    monkeypatch.setattr(prepare, "prepare_dataset", None)  # the copy must not prepare again
    moved = pipeline.make_train_iterator(cfg, seq_len=T, batch_size=2, seed=0,
                                         workdir=str(copy))
    moved.set_state(state)
    assert_same_batches(take(moved, 3), want)
    assert capsys.readouterr().err == ""  # a prepared corpus is silent


def test_states_and_manifests_of_older_versions_still_resume(tmp_path, monkeypatch):
    """Older versions keyed manifest inputs and the pipeline fingerprint by absolute paths: a
    workdir of theirs (where it was written) is not prepared again and its iterator states
    restore. The old fingerprint is computed here as they computed it."""
    import hashlib

    from conftest import prepare_small_builtin

    run = tmp_path / "run"
    shards = prepare_small_builtin(str(run), monkeypatch)
    manifest_path = os.path.join(shards, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["inputs"] = {str(run / "data" / "python_stdlib.jsonl"): {
        k: v for k, v in entry.items() if k != "path"}
        for entry in manifest["inputs"].values()}
    with open(manifest_path, "w") as fh:
        json.dump(manifest, fh)
    monkeypatch.setattr(prepare, "prepare_dataset", None)
    cfg = data_config({}, builtin="python_stdlib", builtin_vocab_size=384, eval_fraction=0.05)
    settings = dict(split="train", seq_len=T, batch_size=2, seed=0, process_index=0,
                    process_count=1, packing=False, shuffle=True, eval_fraction=0.05,
                    num_workers=0)
    it = pipeline.make_train_iterator(cfg, seq_len=T, batch_size=2, seed=0, workdir=str(run))
    take(it, 2)
    state = json.loads(json.dumps(it.get_state()))
    want = take(it, 2)
    old = {"sources": [("python_stdlib", shards, 1.0, manifest["records"],
                        manifest["tokenizer"]["sha256"])], **settings}
    state["pipeline"] = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert state["pipeline"] != it.get_state()["pipeline"]
    again = pipeline.make_train_iterator(cfg, seq_len=T, batch_size=2, seed=0, workdir=str(run))
    again.set_state(state)
    assert_same_batches(take(again, 2), want)
