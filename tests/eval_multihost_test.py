"""`eval.py icl` on two CPU processes (gloo, 2 devices each) over one data x fsdp mesh: each
process feeds its share of every batch, the parameters are sharded across both, and process 0's
results (shared-context, flat and generation paths) equal transformers'; process 1 writes
nothing."""
import json
import random
import subprocess
import sys

import portpicker
import pytest

import eval_common
from conftest import ROOT, subprocess_env

TASKS = """icl_tasks:
- {label: mc, dataset_uri: mc.jsonl, icl_task_type: multiple_choice, num_fewshot: [1]}
- {label: lm, dataset_uri: lm.jsonl, icl_task_type: language_modeling, num_fewshot: [0]}
- {label: gen, dataset_uri: gen.jsonl, icl_task_type: generation_task_with_answers,
   num_fewshot: [0], generation_kwargs: {max_new_tokens: 3}}
"""


@pytest.mark.slow
def test_two_processes_score_as_transformers(tmp_path):
    mc = [{"query": "the cat sat on", "choices": [" mat", " sky", " dog"], "gold": 0},
          {"query": "the sun is", "choices": [" big", " blue"], "gold": 1},
          {"query": "a bird can", "choices": [" jump", " run", " fish"], "gold": 0}]
    lm = [{"context": "one two", "continuation": "three"}, {"context": "red", "continuation":
                                                            "blue green"}]
    gen = [{"context": "what is a cat", "answer": "a cat"}, {"context": "yes", "answer": "no"}]
    for name, rows in (("mc", mc), ("lm", lm), ("gen", gen)):
        eval_common.write_jsonl(tmp_path / f"{name}.jsonl", rows)
    (tmp_path / "tasks.yaml").write_text(TASKS)
    port = portpicker.pick_unused_port()
    out = tmp_path / "out.json"
    cmd = [sys.executable, "eval.py", "icl", "--checkpoint", eval_common.checkpoint(),
           "--tasks", str(tmp_path / "tasks.yaml"), "--dtype", "float32", "--mesh", "2,2,1",
           "--min_bucket", "64", "--batch_tokens", "256", "--generation_batch_size", "2",
           "--output", str(out), "--samples", str(tmp_path / "samples.jsonl"), "--no_progress",
           f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    procs = [subprocess.Popen(cmd + [f"--process_id={i}"], cwd=ROOT, env=subprocess_env(2),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "| mc" in outs[0][0] and "| mc" not in outs[1][0]  # process 0 reports
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    tok = eval_common.tokenizer()
    enc = lambda t: tok.encode(t, add_special_tokens=False).ids  # noqa: E731
    by_task = {}
    for s in samples:
        by_task.setdefault(s["task"], []).append(s)
    # 1-shot multiple choice: another question, solved, then this one
    rng = random.Random(1234)
    for i, row in enumerate(mc):
        (j,) = _one_other(len(mc), i, rng)
        shot = f"{mc[j]['query']} {mc[j]['choices'][mc[j]['gold']]}"
        ctx = enc(shot) + enc(f"\n{row['query']} ".rstrip())
        want = [eval_common.hf_score(ctx, enc(c))[0] for c in row["choices"]]
        got = by_task["mc/1-shot"][i]["logprobs"]
        assert all(abs(a - b) <= 1e-4 * max(1, abs(b)) for a, b in zip(got, want)), (got, want)
    for i, row in enumerate(lm):
        want = eval_common.hf_score(enc(row["context"]), enc(" " + row["continuation"]))[0]
        assert abs(by_task["lm/0-shot"][i]["logprob"] - want) <= 1e-4 * max(1, abs(want))
    for i, row in enumerate(gen):
        ids = eval_common.hf_greedy(enc(row["context"]), 3)
        ids = ids[:ids.index(0)] if 0 in ids else ids
        assert by_task["gen/0-shot"][i]["output"] == tok.decode(ids)
    assert json.loads(out.read_text())["examples"] == 7


def _one_other(n, i, rng):
    """llm-foundry's 1-shot draw for example i (see eval_icl_test.fewshot)."""
    chosen = set(rng.sample(range(n), 1))
    if i in chosen:
        chosen.remove(i)
        extra = rng.choice(range(n))
        while extra in chosen or extra == i:
            extra = rng.choice(range(n))
        chosen.add(extra)
    return chosen
