"""`eval.py perplexity` against transformers' MptForCausalLM: per-window losses (non-overlapping
and sliding windows, each target token scored once, in the first window that reaches it), the
final-tokens losses, text data and prepared shards alike, the JSON and PNG, bad input."""
import json
import math
import random

import numpy as np
import pytest

import eval_common
from eval import main
from mpt_jax.eval import perplexity
from mpt_jax.eval.scoring import Scorer, parse_mesh

SEQ_LENS = (32, 64)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppl")
    rng = random.Random(3)
    docs = [eval_common.sentence(rng, rng.randint(10, 40)) for _ in range(12)]
    path = eval_common.write_jsonl(d / "docs.jsonl", [{"text": t} for t in docs])
    tok = eval_common.tokenizer()
    stream = [t for doc in docs for t in tok.encode(doc, add_special_tokens=False).ids + [0]]
    return d, path, np.asarray(stream)


def _hf_window_losses(stream, length, stride):
    """{window k: [target losses]}: target p (1..N-1) belongs to window
    k = max(0, ceil((p - length) / stride)), which reads stream[k * stride : p]."""
    n = len(stream)
    owner = {p: max(0, math.ceil((p - length) / stride)) for p in range(1, n)}
    out = {}
    for k in sorted(set(owner.values())):
        a = k * stride
        lp = eval_common.hf_token_logprobs(stream[a:min(a + length, n - 1) + 1])
        out[k] = [-lp[p - a - 1] for p in range(a + 1, min(a + length, n - 1) + 1)
                  if owner[p] == k]
    return out


@pytest.mark.parametrize("stride", [None, 16])
@pytest.mark.slow
def test_window_losses_equal_transformers(data, stride):
    _, _, stream = data
    scorer = Scorer(eval_common.model(), mesh=parse_mesh(None), batch_tokens=1024,
                    min_bucket=128, progress=False)
    for length in SEQ_LENS:
        s = length if stride is None else stride
        want = _hf_window_losses(stream, length, s)
        wins = perplexity.windows(len(stream), length, s)
        assert [a for a, _, _ in wins] == [k * s for k in sorted(want)]
        assert sum(end - first for _, first, end in wins) == len(stream) - 1  # each token once
        result = perplexity.evaluate(scorer, stream, [length], stride=stride)
        toks = [int(t) for t in stream]
        from mpt_jax.eval.scoring import Request

        scores = scorer.score([Request(tuple(toks[a:f]), tuple(toks[f:e])) for a, f, e in wins])
        for (k, losses), sc in zip(sorted(want.items()), scores):
            assert len(losses) == sc.token_logprobs.size
            assert abs(np.mean(losses) + sc.token_logprobs.mean()) <= 1e-4  # per window
        mean = np.mean([x for losses in want.values() for x in losses])
        r = result["seq_lens"][str(length)]
        assert abs(r["loss"] - mean) <= 1e-4 and r["tokens"] == len(stream) - 1
        assert sum(b["tokens"] for b in r["loss_by_context"]) == len(stream) - 1
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))


@pytest.mark.slow
def test_cli_text_and_shards_agree_with_transformers(data, tmp_path, capsys):
    d, path, stream = data
    from mpt_jax.data import prepare

    shards = str(tmp_path / "shards")
    prepare.prepare_dataset([path], shards, eval_common.checkpoint(), seq_len=None,
                            keep_documents=True, progress=False)
    results = []
    for source in (path, shards):
        out = tmp_path / f"ppl_{len(results)}.json"
        rc = main(["perplexity", "--checkpoint", eval_common.checkpoint(), "--data", source,
                   "--seq_lens", ",".join(map(str, SEQ_LENS)), "--dtype", "float32",
                   "--batch_tokens", "1024", "--min_bucket", "128", "--output", str(out),
                   "--no_progress"])
        assert rc == 0
        results.append(json.loads(out.read_text()))
        assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 64 |" in capsys.readouterr().out
    a, b = results
    assert a["tokens"] == b["tokens"] == len(stream)
    for length in SEQ_LENS:
        assert a["seq_lens"][str(length)]["loss"] == pytest.approx(
            b["seq_lens"][str(length)]["loss"], abs=1e-6)
    # the same final 16 tokens of each 65-token chunk, given 32 and 64 tokens of window
    final = a["final"]
    assert final["final_tokens"] == 16 and final["chunks"] == len(stream) // 65
    for length in SEQ_LENS:
        losses = []
        for j in range(final["chunks"]):
            row = stream[(j + 1) * 65 - (length + 1):(j + 1) * 65]
            losses.extend(-eval_common.hf_token_logprobs(row)[-16:])
        assert abs(final["loss"][str(length)] - np.mean(losses)) <= 1e-4


def _fails(capsys, argv, needle):
    rc = main(argv)
    err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("[eval]")]
    assert rc == 1 and len(err) == 1 and needle in err[0], err


def test_bad_input(data, tmp_path, capsys):
    _, path, stream = data
    base = ["perplexity", "--checkpoint", eval_common.checkpoint(), "--dtype", "float32",
            "--output", str(tmp_path / "x.json"), "--no_progress"]
    _fails(capsys, base + ["--data", str(tmp_path / "none.txt"), "--seq_lens", "32"],
           "none.txt: no such file or directory")
    _fails(capsys, base + ["--data", path, "--seq_lens", "4096"],
           f"the data has {len(stream)} tokens; the longest seq_len 4096 needs at least 4097")
    _fails(capsys, base + ["--data", path, "--seq_lens", "32", "--stride", "64"],
           "stride 64 must be between 1 and the window length 32")
    _fails(capsys, base + ["--data", path, "--seq_lens", "32,x"], "--seq_lens '32,x'")
    _fails(capsys, base + ["--data", path, "--seq_lens", "32", "--max_tokens", "-5"],
           "--max_tokens must be a positive integer, got -5")
    _fails(capsys, base + ["--data", path, "--seq_lens", "32", "--output",
                           str(tmp_path / "x.png")], "the .png is written beside")
    (tmp_path / "bad.jsonl").write_text('{"text": "a cat"}\n{"text": 3}\n')
    _fails(capsys, base + ["--data", str(tmp_path / "bad.jsonl"), "--seq_lens", "32"],
           "bad.jsonl: line 2: field 'text' is a int, not a string")
    assert not (tmp_path / "x.json").exists()


def test_final_tokens_are_checked_before_any_window_is_scored(data, monkeypatch):
    """A bad final_tokens fails at once, not after scoring every window (hours at 65k); the
    default for a seq_len of 1 is 1 token, not 0."""
    _, path, stream = data
    scorer = Scorer.__new__(Scorer)
    scorer.config = type("Cfg", (), {"use_wpe": False, "max_seq_len": 128, "vocab_size": 1 << 20})
    monkeypatch.setattr(Scorer, "score", lambda *a, **k: pytest.fail("scored before checking"))
    with pytest.raises(ValueError, match="final_tokens 0 must be between 1 and"):
        perplexity.evaluate(scorer, np.asarray(stream), [8, 16], final_tokens=0)
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        perplexity.load_stream(path, eval_common.tokenizer(), max_tokens=0)
    monkeypatch.setattr(Scorer, "score", lambda self, reqs, desc="": [
        type("S", (), {"token_logprobs": np.zeros(len(r.continuation), np.float32),
                       "logprob": 0.0})() for r in reqs])
    assert perplexity.evaluate(scorer, np.asarray(stream), [1])["final"]["final_tokens"] == 1
