"""python -m mpt_jax.data.prepare --format prompt_response|chat: example records (ids + loss
mask) equal tokenize_example's, too-long truncate/drop counts, every kind of bad row named by
file and line, nothing half-written past --max_bad_fraction, resume of an interrupted run."""

import gzip
import json
import os

import numpy as np
import pytest

from mpt_jax.data import finetune, prepare
from mpt_jax.data import tokenizer as tokenizer_lib

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


def rows(n, seed=0, tag="q"):
    rng = np.random.default_rng(seed)
    return [{"prompt": f"{tag}{i} " + " ".join(rng.choice(WORDS, rng.integers(1, 8))),
             "response": " ".join(rng.choice(WORDS, rng.integers(1, 12)))} for i in range(n)]


def chats(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "be brief"}]
        for _ in range(rng.integers(1, 3)):
            messages += [{"role": "user", "content": " ".join(rng.choice(WORDS, 3))},
                         {"role": "assistant", "content": " ".join(rng.choice(WORDS, 4))}]
        out.append({"messages": messages, "id": i})
    return out


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    texts = [json.dumps(r) for r in rows(200) + chats(50)]
    tokenizer_lib.train_byte_level_bpe(texts, 300).save(str(path))
    return str(path)


def write_jsonl(path, items):
    with (gzip.open(path, "wt") if str(path).endswith(".gz") else open(path, "w")) as f:
        f.writelines((item if isinstance(item, str) else json.dumps(item)) + "\n"
                     for item in items)


def read_examples(out_dir):
    import grain

    manifest = prepare.read_manifest(str(out_dir))
    source = grain.sources.ArrayRecordDataSource(prepare.shard_paths(str(out_dir), manifest))
    return [finetune.decode_record(source[i], manifest["dtype"]) for i in range(len(source))]


def test_prompt_response_and_chat_records(tmp_path, tok_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pr = rows(30, 1)
    write_jsonl(tmp_path / "a.jsonl.gz", pr[:20])
    pq.write_table(pa.Table.from_pylist(pr[20:]), tmp_path / "b.parquet")
    manifest = prepare.prepare_dataset(
        [str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.parquet")], str(tmp_path / "pr"),
        tok_path, seq_len=None, format="prompt_response", template="instruct", max_seq_len=512,
        progress=False)
    assert manifest["mode"] == "examples" and manifest["template"] == "instruct"
    assert manifest["examples"] == manifest["records"] == 30 and manifest["bad_lines"] == 0
    got = read_examples(tmp_path / "pr")
    want = [finetune.tokenize_example(r, tok_path, template="instruct") for r in pr]
    assert [(i.tolist(), m.tolist()) for i, m in got] == [
        (w["input_ids"].tolist(), w["loss_mask"].tolist()) for w in want]
    assert manifest["tokens"] == sum(len(w["input_ids"]) for w in want)
    assert manifest["loss_tokens"] == sum(int(w["loss_mask"].sum()) for w in want)
    assert manifest["max_example_tokens"] == max(len(w["input_ids"]) for w in want)

    ch = chats(12, 2)
    write_jsonl(tmp_path / "c.jsonl", ch)
    for workers in (1, 2):  # worker processes give the same records
        out = tmp_path / f"chat{workers}"
        manifest = prepare.prepare_dataset([str(tmp_path / "c.jsonl")], str(out), tok_path,
                                           seq_len=None, format="chat", target_responses="all",
                                           workers=workers, progress=False)
        assert manifest["template"] == "chatml" and manifest["target_responses"] == "all"
        want = [finetune.tokenize_example(r, tok_path, target_responses="all") for r in ch]
        assert [(i.tolist(), m.tolist()) for i, m in read_examples(out)] == [
            (w["input_ids"].tolist(), w["loss_mask"].tolist()) for w in want]


def test_too_long_examples_truncated_or_dropped_and_counted(tmp_path, tok_path, capsys):
    pr = rows(40, 3) + [{"prompt": " ".join(WORDS * 4), "response": "alpha"}]  # prompt too long
    write_jsonl(tmp_path / "a.jsonl", pr)
    full = [finetune.tokenize_example(r, tok_path) for r in pr]
    lengths = [len(f["input_ids"]) for f in full]
    prompt_lengths = [int(np.argmax(f["loss_mask"])) for f in full]
    limit = int(np.median(lengths))
    too_long = sum(n > limit for n in lengths)
    no_room = sum(n > limit and p >= limit for n, p in zip(lengths, prompt_lengths))
    assert too_long > no_room > 0
    manifest = prepare.prepare_dataset([str(tmp_path / "a.jsonl")], str(tmp_path / "t"), tok_path,
                                       seq_len=None, format="prompt_response", max_seq_len=limit,
                                       progress=False)
    assert manifest["truncated"] == too_long - no_room and manifest["dropped"] == no_room
    got = read_examples(tmp_path / "t")
    kept = [f for f, p in zip(full, prompt_lengths) if p < limit]
    assert [i.tolist() for i, _ in got] == [f["input_ids"][:limit].tolist() for f in kept]
    assert max(len(i) for i, _ in got) == limit == manifest["max_example_tokens"]
    assert prepare.main(["--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "d"),
                         "--tokenizer", tok_path, "--format", "prompt_response",
                         "--max_seq_len", str(limit), "--on_too_long", "drop",
                         "--workers", "1", "--no_progress"]) == 0
    out = capsys.readouterr().out
    dropped = prepare.read_manifest(str(tmp_path / "d"))
    assert dropped["dropped"] == too_long and dropped["truncated"] == 0
    assert dropped["examples"] == 41 - too_long
    assert f"{41 - too_long} examples (none template; 0 truncated, {too_long} dropped" in out


BAD_ROWS = [
    ('{"prompt": "x"', "invalid JSON"),
    ('{"response": "y"}', "missing key 'prompt'"),
    ('{"prompt": "x", "response": ""}', "empty response"),
    ('{"prompt": "x", "response": 5}', "non-string 'response'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "missing key 'prompt'"),
]
BAD_CHATS = [
    ('{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "message 1: unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]}',
     "message 1 (user): non-string content (a list)"),
    ('{"prompt": "x", "response": "y"}', "missing key 'messages'"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}',
     "message 2 (assistant): empty response"),
]


@pytest.mark.parametrize("fmt,bad", [("prompt_response", BAD_ROWS), ("chat", BAD_CHATS)])
def test_each_bad_row_named_then_fatal_past_the_threshold(tmp_path, tok_path, capsys, fmt, bad):
    good = [json.dumps(r) for r in (rows(95, 4) if fmt == "prompt_response" else chats(95, 4))]
    for line, why in bad:
        lines = good[:10] + [line] + good[10:]
        write_jsonl(tmp_path / "one.jsonl", lines)
        manifest = prepare.prepare_dataset([str(tmp_path / "one.jsonl")],
                                           str(tmp_path / f"ok{len(why)}"), tok_path,
                                           seq_len=None, format=fmt, max_bad_fraction=0.05,
                                           progress=False)
        assert manifest["bad_lines"] == 1 and manifest["examples"] == 95
        assert f"one.jsonl: 1 bad of 96 lines skipped (first: line 11: {why}" in (
            capsys.readouterr().err)
    # every kind at once is past 1%: exit 1, one line naming the file, the first bad line and
    # what is wrong with it; the earlier input stays complete, nothing of the bad one is left
    write_jsonl(tmp_path / "good.jsonl", good)
    write_jsonl(tmp_path / "bad.jsonl", good[:3] + [line for line, _ in bad] + good[3:])
    out = tmp_path / "out"
    rc = prepare.main(["--input", str(tmp_path / "good.jsonl"), str(tmp_path / "bad.jsonl"),
                       "--output", str(out), "--tokenizer", tok_path, "--format", fmt,
                       "--workers", "1", "--no_progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1] == (f"error: {tmp_path / 'bad.jsonl'}: {len(bad)} of {95 + len(bad)} lines "
                       f"bad ({len(bad) / (95 + len(bad)):.2%}), over --max_bad_fraction 1.00% "
                       f"(first: line 4: {bad[0][1]}" + err[-1].split(bad[0][1], 1)[1])
    manifest = prepare.read_manifest(str(out))
    assert list(manifest["inputs"]) == [prepare.input_key(str(tmp_path / "good.jsonl"), str(out))]
    listed = {sh["path"] for e in manifest["inputs"].values() for sh in e["shards"]}
    assert {n for n in os.listdir(out) if n.endswith(prepare.SHARD_SUFFIX)} == listed
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_rerun_resumes_an_interrupted_prepare_and_refuses_other_settings(tmp_path, tok_path,
                                                                          monkeypatch):
    for name, seed in (("a", 5), ("b", 6), ("c", 7)):
        write_jsonl(tmp_path / f"{name}.jsonl", chats(20, seed))
    inputs = [str(tmp_path / f"{n}.jsonl") for n in "abc"]
    out = str(tmp_path / "out")
    real = prepare._prepare_one

    def crash_on_c(path, *args):
        if path.endswith("c.jsonl"):
            open(os.path.join(out, "partial.array_record.tmp"), "w").close()
            raise KeyboardInterrupt
        return real(path, *args)

    kw = dict(seq_len=None, format="chat", max_seq_len=256, progress=False)
    monkeypatch.setattr(prepare, "_prepare_one", crash_on_c)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_dataset(inputs, out, tok_path, **kw)
    calls = []
    monkeypatch.setattr(prepare, "_prepare_one", lambda p, *a: calls.append(p) or real(p, *a))
    manifest = prepare.prepare_dataset(inputs, out, tok_path, **kw)
    assert calls == [inputs[2]]
    fresh = prepare.prepare_dataset(inputs, str(tmp_path / "fresh"), tok_path, **kw)
    for key in ("examples", "records", "tokens", "loss_tokens", "truncated", "dropped"):
        assert manifest[key] == fresh[key], key
    assert [(i.tolist(), m.tolist()) for i, m in read_examples(out)] == [
        (i.tolist(), m.tolist()) for i, m in read_examples(tmp_path / "fresh")]
    with pytest.raises(ValueError, match="prepared with target_responses='last', this run asks "
                                         "target_responses='all'"):
        prepare.prepare_dataset(inputs, out, tok_path, **{**kw, "target_responses": "all"})
    with pytest.raises(ValueError, match="prepared with max_seq_len=256, this run asks "
                                         "max_seq_len=32"):
        prepare.prepare_dataset(inputs, out, tok_path, **{**kw, "max_seq_len": 32})
    with pytest.raises(ValueError, match="prepared with mode='examples'"):
        prepare.prepare_dataset(inputs, out, tok_path, seq_len=8, progress=False)


def test_bad_arguments(tmp_path, tok_path):
    write_jsonl(tmp_path / "a.jsonl", rows(3))
    (tmp_path / "a.txt").write_text("plain text")

    def run(inputs, **kw):
        return prepare.prepare_dataset([str(p) for p in inputs], str(tmp_path / "o"), tok_path,
                                       **{"seq_len": None, "progress": False, **kw})

    with pytest.raises(ValueError, match="examples take --max_seq_len, not --seq_len"):
        run([tmp_path / "a.jsonl"], format="chat", seq_len=8)
    with pytest.raises(ValueError, match="--template 'alpaca'"):
        run([tmp_path / "a.jsonl"], format="chat", template="alpaca")
    with pytest.raises(ValueError, match="template 'instruct' does not apply to chat rows"):
        run([tmp_path / "a.jsonl"], format="chat", template="instruct")
    with pytest.raises(ValueError, match="--max_seq_len must be a positive integer, got 0"):
        run([tmp_path / "a.jsonl"], format="chat", max_seq_len=0)
    with pytest.raises(ValueError, match="a.txt: a plain-text file holds no examples"):
        run([tmp_path / "a.txt"], format="prompt_response")
    with pytest.raises(ValueError, match="--format 'csv'"):
        run([tmp_path / "a.jsonl"], format="csv")
