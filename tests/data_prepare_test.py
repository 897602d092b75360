"""mpt_jax.data.prepare: text -> ArrayRecord shards + manifest, resumption, every bad input."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zstandard

from mpt_jax.data import prepare
from mpt_jax.data import tokenizer as tokenizer_lib

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
         "lambda", "mu"]


def make_docs(n, seed=0, tag="d"):
    rng = np.random.default_rng(seed)
    return [f"{tag}{i} " + " ".join(rng.choice(WORDS, rng.integers(2, 40))) for i in range(n)]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer_lib.train_byte_level_bpe(make_docs(300) + [str(i) for i in range(100)], 320).save(
        str(path))
    return str(path)


def write_jsonl(path, docs, field="text"):
    with open(path, "w") as f:
        f.writelines(json.dumps({field: doc}) + "\n" for doc in docs)


def read_records(out_dir):
    """All records of a prepared directory as int arrays, in order."""
    import grain

    manifest = prepare.read_manifest(str(out_dir))
    source = grain.sources.ArrayRecordDataSource(prepare.shard_paths(str(out_dir), manifest))
    return [np.frombuffer(source[i], manifest["dtype"]) for i in range(len(source))]


def expected_ids(tok_path, docs, bos=()):
    tok = tokenizer_lib.load_tokenizer(tok_path)
    eos = tokenizer_lib.token_id(tok, tokenizer_lib.ENDOFTEXT)
    return [list(bos) + tok.encode(d, add_special_tokens=False).ids + [eos] for d in docs]


def test_sequences_layout_concatenates_and_chunks(tmp_path, tok_path):
    docs_a, docs_b = make_docs(50, 1, "a"), make_docs(30, 2, "b")
    write_jsonl(tmp_path / "a.jsonl", docs_a)
    write_jsonl(tmp_path / "b.jsonl", docs_b)
    manifest = prepare.prepare_dataset([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")],
                                       str(tmp_path / "out"), tok_path, seq_len=16,
                                       progress=False)
    records = read_records(tmp_path / "out")
    assert manifest["mode"] == "sequences" and manifest["dtype"] == "uint16"
    assert manifest["format_version"] == prepare.FORMAT_VERSION and manifest["seq_len"] == 16
    assert manifest["documents"] == 80 and manifest["sequences"] == len(records)
    assert manifest["sources"] == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert os.path.isfile(tmp_path / "out" / "tokenizer.json")
    assert all(len(r) == 16 for r in records)
    # Each input is concatenated and cut on its own; its partial tail is dropped and counted.
    want = []
    for docs in (docs_a, docs_b):
        flat = [t for ids in expected_ids(tok_path, docs) for t in ids]
        want += flat[: len(flat) // 16 * 16]
    assert np.concatenate(records).tolist() == want
    assert manifest["tokens"] == len(want) + manifest["dropped_tokens"]


def test_documents_layout_every_format(tmp_path, tok_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(40, 3)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "0.txt").write_text(docs[0])
    with gzip.open(tmp_path / "in" / "1.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"body": d}) + "\n" for d in docs[1:10])
    with open(tmp_path / "in" / "2.jsonl.zst", "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(
            "".join(json.dumps({"body": d}) + "\n" for d in docs[10:20]).encode()))
    pq.write_table(pa.table({"body": docs[20:40]}), tmp_path / "in" / "3.parquet")
    (tmp_path / "in" / "ignored.csv").write_text("not an input")
    manifest = prepare.prepare_dataset([str(tmp_path / "in")], str(tmp_path / "out"), tok_path,
                                       seq_len=16, keep_documents=True, text_field="body",
                                       bos_text="alpha", progress=False)
    tok = tokenizer_lib.load_tokenizer(tok_path)
    bos = tok.encode("alpha", add_special_tokens=False).ids
    assert manifest["mode"] == "documents" and manifest["documents"] == 40
    assert [r.tolist() for r in read_records(tmp_path / "out")] == expected_ids(tok_path, docs,
                                                                                 bos)


@pytest.mark.slow
def test_workers_match_single_process(tmp_path, tok_path):
    docs = make_docs(600, 4)
    write_jsonl(tmp_path / "a.jsonl", docs)
    one = prepare.prepare_dataset([str(tmp_path / "a.jsonl")], str(tmp_path / "one"), tok_path,
                                  seq_len=32, workers=1, progress=False)
    two = prepare.prepare_dataset([str(tmp_path / "a.jsonl")], str(tmp_path / "two"), tok_path,
                                  seq_len=32, workers=2, progress=False)
    assert one["records"] == two["records"] > 0
    assert all(np.array_equal(x, y) for x, y in
               zip(read_records(tmp_path / "one"), read_records(tmp_path / "two")))


def test_rerun_skips_done_inputs_and_redoes_interrupted(tmp_path, tok_path, monkeypatch):
    for name, seed in (("a", 5), ("b", 6), ("c", 7)):
        write_jsonl(tmp_path / f"{name}.jsonl", make_docs(30, seed, name))
    inputs = [str(tmp_path / f"{n}.jsonl") for n in "abc"]
    out = str(tmp_path / "out")
    real_prepare_one = prepare._prepare_one

    def crash_on_c(path, *args):
        if path.endswith("c.jsonl"):
            open(os.path.join(out, "partial.array_record.tmp"), "w").close()
            raise KeyboardInterrupt  # killed mid-file
        return real_prepare_one(path, *args)

    monkeypatch.setattr(prepare, "_prepare_one", crash_on_c)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_dataset(inputs, out, tok_path, seq_len=8, progress=False)
    partial = prepare.read_manifest(out)
    assert sorted(os.path.basename(p) for p in partial["inputs"]) == ["a.jsonl", "b.jsonl"]
    mtimes = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)
              if n.endswith(prepare.SHARD_SUFFIX)}

    calls = []
    monkeypatch.setattr(prepare, "_prepare_one",
                        lambda path, *a: calls.append(path) or real_prepare_one(path, *a))
    manifest = prepare.prepare_dataset(inputs, out, tok_path, seq_len=8, progress=False)
    assert calls == [inputs[2]]  # only the interrupted input is redone
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    for name, mtime in mtimes.items():
        assert os.stat(os.path.join(out, name)).st_mtime_ns == mtime
    fresh = prepare.prepare_dataset(inputs, str(tmp_path / "fresh"), tok_path, seq_len=8,
                                    progress=False)
    assert manifest["records"] == fresh["records"] and manifest["tokens"] == fresh["tokens"]
    assert [r.tolist() for r in read_records(out)] == [
        r.tolist() for r in read_records(tmp_path / "fresh")]
    calls.clear()
    prepare.prepare_dataset(inputs, out, tok_path, seq_len=8, progress=False)
    assert calls == []  # all done: a rerun does nothing


def test_existing_output_must_match(tmp_path, tok_path):
    write_jsonl(tmp_path / "a.jsonl", make_docs(30))
    out = str(tmp_path / "out")
    prepare.prepare_dataset([str(tmp_path / "a.jsonl")], out, tok_path, seq_len=8,
                            progress=False)
    other = tmp_path / "other.json"
    tokenizer_lib.train_byte_level_bpe(["something else entirely"] * 5, 280).save(str(other))
    with pytest.raises(ValueError, match=r"prepared with tokenizer .*sha256.*use a new --output"):
        prepare.prepare_dataset([str(tmp_path / "a.jsonl")], out, str(other), seq_len=8,
                                progress=False)
    with pytest.raises(ValueError, match="prepared with seq_len=8, this run asks seq_len=16"):
        prepare.prepare_dataset([str(tmp_path / "a.jsonl")], out, tok_path, seq_len=16,
                                progress=False)
    with pytest.raises(ValueError, match="mode='sequences'.*mode='documents'"):
        prepare.prepare_dataset([str(tmp_path / "a.jsonl")], out, tok_path, seq_len=8,
                                keep_documents=True, progress=False)


def test_failed_redo_of_a_changed_input_leaves_a_consistent_directory(tmp_path, tok_path):
    """An input that changed is redone; when the redo fails (too many bad lines) the manifest
    no longer lists the old shards it removed, and once the input is fixed a rerun finishes
    with the records a fresh prepare writes."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, make_docs(30, 1, "a"))
    write_jsonl(b, make_docs(30, 2, "b"))
    inputs, out = [str(a), str(b)], str(tmp_path / "out")
    prepare.prepare_dataset(inputs, out, tok_path, seq_len=8, progress=False)
    a.write_text("{broken\n" * 20 + a.read_text())
    with pytest.raises(ValueError, match="over --max_bad_fraction"):
        prepare.prepare_dataset(inputs, out, tok_path, seq_len=8, progress=False)
    listed = [sh["path"] for inp in prepare.read_manifest(out)["inputs"].values()
              for sh in inp["shards"]]
    assert listed and all(os.path.exists(os.path.join(out, p)) for p in listed)
    write_jsonl(a, make_docs(25, 3, "a"))
    prepare.prepare_dataset(inputs, out, tok_path, seq_len=8, progress=False)
    prepare.prepare_dataset(inputs, str(tmp_path / "fresh"), tok_path, seq_len=8, progress=False)
    assert [r.tolist() for r in read_records(out)] == [
        r.tolist() for r in read_records(tmp_path / "fresh")]


def test_bad_lines_counted_then_fatal_past_threshold(tmp_path, tok_path, capsys):
    docs = make_docs(99)
    lines = [json.dumps({"text": d}) for d in docs]
    lines.insert(10, "{broken json")
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n\n")
    manifest = prepare.prepare_dataset([str(tmp_path / "a.jsonl")], str(tmp_path / "ok"),
                                       tok_path, seq_len=8, keep_documents=True,
                                       max_bad_fraction=0.05, progress=False)
    assert manifest["documents"] == 99 and manifest["bad_lines"] == 1
    assert "1 bad of 100 lines" in capsys.readouterr().err
    lines += ['{"text": 5}', '["a list"]', '{"other": "x"}', "\xff garbage"]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"b.jsonl: 5 of 104 lines bad .*over --max_bad_fraction"):
        prepare.prepare_dataset([str(tmp_path / "b.jsonl")], str(tmp_path / "bad"), tok_path,
                                seq_len=8, max_bad_fraction=0.01, progress=False)
    assert "field 'text' is a int" in capsys.readouterr().err
    assert not [n for n in os.listdir(tmp_path / "bad") if n.endswith(prepare.SHARD_SUFFIX)]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: 1 of 1 lines bad"):
        prepare.prepare_dataset([str(tmp_path / "latin1.txt")], str(tmp_path / "l1"), tok_path,
                                seq_len=8, progress=False)


def test_bad_inputs(tmp_path, tok_path):
    outputs = iter(range(100))

    def run(inputs, **kw):
        kw = {"seq_len": 8, "progress": False, **kw}
        out = str(tmp_path / f"out{next(outputs)}")
        return prepare.prepare_dataset([str(p) for p in inputs], out,
                                       kw.pop("tokenizer", tok_path), **kw)

    write_jsonl(tmp_path / "ok.jsonl", make_docs(5))
    with pytest.raises(ValueError, match="missing.jsonl: no such file"):
        run([tmp_path / "missing.jsonl"])
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match="data.csv: unsupported input type"):
        run([tmp_path / "data.csv"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no supported input files"):
        run([tmp_path / "empty"])
    with pytest.raises(ValueError, match="named twice"):
        run([tmp_path / "ok.jsonl", tmp_path / "ok.jsonl"])
    with pytest.raises(ValueError, match="--seq_len must be a positive integer, got 0"):
        run([tmp_path / "ok.jsonl"], seq_len=0)
    with pytest.raises(ValueError, match="tokenizer: no such file"):
        run([tmp_path / "ok.jsonl"], tokenizer=str(tmp_path / "nope.json"))
    write_jsonl(tmp_path / "short.jsonl", ["alpha"])
    with pytest.raises(ValueError, match="no records written.*seq_len 1000 is longer"):
        run([tmp_path / "short.jsonl"], seq_len=1000)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="bad.parquet: not a readable Parquet file"):
        run([tmp_path / "bad.parquet"])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "cols.parquet")
    with pytest.raises(ValueError, match="cols.parquet: Parquet file has no column 'text'"):
        run([tmp_path / "cols.parquet"])
    assert prepare.shard_dtype(50277) == "uint16" and prepare.shard_dtype(65536) == "int32"


@pytest.mark.slow
def test_cli(tmp_path, tok_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", make_docs(20))
    assert prepare.main(["--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "o"),
                         "--tokenizer", tok_path, "--seq_len", "8", "--workers", "1",
                         "--no_progress"]) == 0
    assert "20 documents" in capsys.readouterr().out
    # --seq_len is for the sequences layout; whole documents need none
    assert prepare.main(["--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "d"),
                         "--tokenizer", tok_path, "--keep_documents", "--workers", "1",
                         "--no_progress"]) == 0
    assert prepare.read_manifest(str(tmp_path / "d"))["seq_len"] is None
    assert prepare.main(["--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "s"),
                         "--tokenizer", tok_path, "--workers", "1", "--no_progress"]) == 1
    assert "--seq_len must be a positive integer" in capsys.readouterr().err
    # A real process: exit status 1, one line on stderr, no traceback.
    result = subprocess.run(
        [sys.executable, "-m", "mpt_jax.data.prepare", "--input", str(tmp_path / "nope.jsonl"),
         "--output", str(tmp_path / "o2"), "--tokenizer", tok_path, "--seq_len", "8"],
        check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope.jsonl'}: no such file or directory"]


def test_relocatable_output_and_progress(tmp_path, tok_path, monkeypatch, capsys):
    """Inputs are recorded relative to the output (and by absolute path): a tree of inputs and
    output moved together, or the output moved alone, is recognised as done by a rerun; the
    progress bar counts documents and tokens from the first file on."""
    import shutil

    tree = tmp_path / "tree"
    (tree / "raw").mkdir(parents=True)
    write_jsonl(tree / "raw" / "a.jsonl", make_docs(30, 3, "a"))
    manifest = prepare.prepare_dataset([str(tree / "raw" / "a.jsonl")], str(tree / "out"),
                                       tok_path, seq_len=8)
    err = capsys.readouterr().err
    assert "30 docs" in err and f"{manifest['tokens']:,} tokens written" in err, err
    assert list(manifest["inputs"]) == [os.path.join("..", "raw", "a.jsonl")]
    calls = []
    real_prepare_one = prepare._prepare_one
    monkeypatch.setattr(prepare, "_prepare_one",
                        lambda path, *a: calls.append(path) or real_prepare_one(path, *a))
    shutil.move(str(tree), str(tmp_path / "moved"))  # (keeps mtimes, as a move does)
    moved = tmp_path / "moved"
    again = prepare.prepare_dataset([str(moved / "raw" / "a.jsonl")], str(moved / "out"),
                                    tok_path, seq_len=8, progress=False)
    shutil.move(str(moved / "out"), str(tmp_path / "out_alone"))
    alone = prepare.prepare_dataset([str(moved / "raw" / "a.jsonl")],
                                    str(tmp_path / "out_alone"), tok_path, seq_len=8,
                                    progress=False)
    assert calls == [] and again["records"] == alone["records"] == manifest["records"]
    assert list(alone["inputs"]) == [os.path.join("..", "moved", "raw", "a.jsonl")]
