"""`eval.py icl` on llm-foundry's four ICL task types (task files written here, few-shot
included, one task with categories): every example's scores equal transformers' on the prompts
this test builds from llm-foundry's task format, the metrics follow, the gauntlet arithmetic
(from the run and on hand-made scores), and every bad input is one line with exit status 1."""
import json
import math
import random

import pytest

import eval_common
from eval import main
from mpt_jax.eval.gauntlet import Gauntlet

def enc(text, special=False):
    return eval_common.tokenizer().encode(text, add_special_tokens=special).ids


def fewshot(n, k, i, rng):
    """llm-foundry's get_fewshot_sample_idxs, written out: k of n, never i."""
    k = min(n - 1, k)
    chosen = set(rng.sample(range(n), k))
    if i in chosen:
        chosen.remove(i)
        if len(chosen) < n - 1:
            extra = rng.choice(range(n))
            while extra in chosen or extra == i:
                extra = rng.choice(range(n))
            chosen.add(extra)
    assert i not in chosen
    return chosen


def _rows():
    rng = random.Random(7)
    s = lambda n: eval_common.sentence(rng, n)  # noqa: E731
    lm = [{"context": s(rng.randint(3, 6)) + (" " if i == 2 else ""),
           "continuation": s(rng.randint(1, 3))} for i in range(6)]
    mc = [{"query": s(rng.randint(3, 6)), "choices": [s(1), s(2), s(1)],
           "gold": rng.randint(0, 2), "category": "xy"[i % 2]} for i in range(8)]
    schema = [{"context_options": [s(3), s(4)], "continuation": s(2), "gold": rng.randint(0, 1)}
              for _ in range(5)]
    gen = [{"context": s(rng.randint(3, 5)), "answer": s(1), "aliases": [s(1)]}
           for _ in range(5)]
    return lm, mc, schema, gen


TASKS = """icl_tasks:
- label: lm
  dataset_uri: lm.jsonl
  icl_task_type: language_modeling
  num_fewshot: [0, 2]
  continuation_delimiter: ": "
  prompt_string: "Complete:"
- label: mc
  dataset_uri: mc.jsonl
  icl_task_type: multiple_choice
  num_fewshot: [2]
  continuation_delimiter: "\\nAnswer: "
  has_categories: true
- label: schema
  dataset_uri: schema.jsonl
  icl_task_type: schema
  num_fewshot: [0, 1]
- label: gen
  dataset_uri: gen.jsonl
  icl_task_type: generation_task_with_answers
  num_fewshot: [1]
  continuation_delimiter: "\\nA:"
  early_stopping_criteria: ["\\n"]
  generation_kwargs: {max_new_tokens: 6}
"""

GAUNTLET = """eval_gauntlet:
  weighting: EQUAL
  subtract_random_baseline: true
  rescale_accuracy: true
  averages:
    core: [knowledge, reasoning]
  categories:
  - name: knowledge
    benchmarks:
    - {name: mc, num_fewshot: 2, random_baseline: 0.25}
    - {name: lm, num_fewshot: 2, random_baseline: 0}
  - name: reasoning
    benchmarks:
    - {name: schema, num_fewshot: 1, random_baseline: 0.5}
    - {name: gen, num_fewshot: 1, random_baseline: 0}
  - name: absent
    benchmarks:
    - {name: nope, num_fewshot: 0, random_baseline: 0}
"""


def _args(ckpt, tasks, out, *extra):
    return ["icl", "--checkpoint", ckpt, "--tasks", str(tasks), "--dtype", "float32",
            "--batch_tokens", "1024", "--min_bucket", "128", "--output", str(out),
            "--no_progress", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("icl")
    lm, mc, schema, gen = _rows()
    # half of the generation examples accept the model's own greedy answer (as an alias, which
    # never enters a prompt), so exact match is tested both ways
    for name, rows in (("lm", lm), ("mc", mc), ("schema", schema), ("gen", gen)):
        eval_common.write_jsonl(d / f"{name}.jsonl", rows)
    reference = _reference_gen(gen)  # aliases never enter a prompt: it stays the reference
    for i in range(0, 5, 2):
        gen[i]["aliases"] = [reference[i].strip().split(" ")[0] or "x"]
    eval_common.write_jsonl(d / "gen.jsonl", gen)
    (d / "tasks.yaml").write_text(TASKS)
    (d / "gauntlet.yaml").write_text(GAUNTLET)
    out, samples = d / "icl.json", d / "samples.jsonl"
    rc = main(_args(eval_common.checkpoint(), d / "tasks.yaml", out, "--gauntlet",
                    str(d / "gauntlet.yaml"), "--samples", str(samples)))
    assert rc == 0
    got = {}
    for line in samples.read_text().splitlines():
        row = json.loads(line)
        got.setdefault(row["task"], []).append(row)
    return json.loads(out.read_text()), got, (lm, mc, schema, gen), d, reference


def _close(a, b):
    return abs(a - b) <= 1e-4 * max(1.0, abs(b))


def _stripped(rows):
    return [{k: v.strip() if isinstance(v, str) else v for k, v in r.items()} for r in rows]


def _preamble(text):
    return enc(text, special=True)  # (this tokenizer adds no special tokens, hence no EOS)


@pytest.mark.slow
def test_language_modeling_scores(run):
    _, got, (lm, *_), _, _ = run
    rows = _stripped(lm)
    for k in (0, 2):
        rng = random.Random(1234)
        samples = got[f"lm/{k}-shot"]
        assert len(samples) == len(rows)
        for i, row in enumerate(rows):
            text = "Complete:"
            if k:
                for j in fewshot(len(rows), k, i, rng):
                    text += f"\n{rows[j]['context']}: {rows[j]['continuation']}"
            ctx = _preamble(text) + enc(f"\n{row['context']}: ".rstrip())
            cont = enc(" " + row["continuation"])
            want, greedy = eval_common.hf_score(ctx, cont)
            assert _close(samples[i]["logprob"], want)
            assert samples[i]["correct"] == greedy and samples[i]["tokens"] == len(cont)


def _mc_reference(rows):
    """Per category (sorted), its own rng and indices: (category, index, logprobs, lengths)."""
    out = []
    for cat in sorted({r["category"] for r in rows}):
        part = [r for r in _stripped(rows) if r["category"] == cat]
        rng = random.Random(1234)
        for i, row in enumerate(part):
            text = ""
            for j in fewshot(len(part), 2, i, rng):
                q = f"{part[j]['query']}\nAnswer: {part[j]['choices'][part[j]['gold']]}"
                text += f"\n{q}" if text else q
            ctx = _preamble(text) + enc(f"\n{row['query']}\nAnswer: ".rstrip())
            conts = [enc(" " + c) for c in row["choices"]]
            out.append((cat, row, [eval_common.hf_score(ctx, c)[0] for c in conts],
                        [len(c) for c in conts]))
    return out


def test_multiple_choice_scores_and_both_accuracies(run):
    result, got, (_, mc, _, _), _, _ = run
    per_cat = {}
    for cat, row, lps, lengths in _mc_reference(mc):
        sample = got[f"mc/2-shot/{cat}"][len(per_cat.setdefault(cat, []))]
        assert all(_close(a, b) for a, b in zip(sample["logprobs"], lps))
        means = [lp / n for lp, n in zip(lps, lengths)]
        assert sample["pick"] == means.index(max(means))  # lowest mean loss: llm-foundry's
        assert sample["pick_acc"] == lps.index(max(lps))  # highest sum: lm-eval's acc
        per_cat[cat].append((sample["pick"] == row["gold"], sample["pick_acc"] == row["gold"]))
    entry = result["tasks"]["mc/2-shot"]
    assert entry["n"] == 8 and sorted(entry["categories"]) == ["x", "y"]
    for cat, marks in per_cat.items():
        m = entry["categories"][cat]["metrics"]
        assert m["InContextLearningMultipleChoiceAccuracy"] == sum(a for a, _ in marks) / 4
        assert m["acc"] == sum(b for _, b in marks) / 4
    mean = sum(entry["categories"][c]["metrics"]["acc"] for c in "xy") / 2
    assert entry["metrics"]["acc"] == pytest.approx(mean)


def test_schema_scores(run):
    _, got, (_, _, schema, _), _, _ = run
    rows = _stripped(schema)
    for k in (0, 1):
        rng = random.Random(1234)
        for i, row in enumerate(rows):
            text = ""
            for j in fewshot(len(rows), k, i, rng):
                c = rows[j]["context_options"][rows[j]["gold"]]
                text += (f"\n{c}" if text else c) + f" {rows[j]['continuation']}"
            # llm-foundry: with a preamble each option is delimited and followed by the
            # (rstripped) continuation delimiter; without one, neither
            ctxs = [enc(f"\n{o}" if text else o) for o in row["context_options"]]
            cont = enc(" " + row["continuation"])
            lps = [eval_common.hf_score(_preamble(text) + c, cont)[0] for c in ctxs]
            sample = got[f"schema/{k}-shot"][i]
            assert all(_close(a, b) for a, b in zip(sample["logprobs"], lps))
            assert sample["correct"] == (lps.index(max(lps)) == row["gold"])


def _gen_prompts(rows):
    rows = _stripped(rows)
    rng = random.Random(1234)
    prompts = []
    for i, row in enumerate(rows):
        text = ""
        for j in fewshot(len(rows), 1, i, rng):
            q = f"{rows[j]['context']}\nA:{rows[j]['answer']}"
            text += f"\n{q}" if text else q
        prompts.append(_preamble(text) + enc(f"\n{row['context']}\nA:".rstrip()))
    return prompts


def _reference_gen(rows):
    """transformers' greedy completion (stopped at EOS), decoded, cut at the stop."""
    tok = eval_common.tokenizer()
    outs = []
    for prompt in _gen_prompts(rows):
        ids = eval_common.hf_greedy(prompt, 6)
        ids = ids[:ids.index(0)] if 0 in ids else ids
        outs.append(tok.decode(ids, skip_special_tokens=True).split("\n")[0])
    return outs


def _normalize(text):
    import re
    import string

    text = "".join(" " if ch in set(string.punctuation + "‘’´`") else ch
                   for ch in text.replace("_", " ").lower())
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def test_generation_outputs_and_exact_match(run):
    result, got, (*_, gen), _, outs = run
    samples = got["gen/1-shot"]
    marks = []
    for sample, out, row in zip(samples, outs, gen):
        assert sample["output"] == out
        answers = {_normalize(a) for a in [row["answer"], *row["aliases"]]}
        marks.append(any(_normalize(out).startswith(a) for a in answers))
        assert sample["correct"] == marks[-1]
    assert any(marks)
    assert result["tasks"]["gen/1-shot"]["metrics"][
        "InContextLearningGenerationExactMatchAccuracy"] == sum(marks) / len(marks)


def test_gauntlet_and_tables_from_the_run(run, capsys):
    result, _, _, d, _ = run
    t = {k: v["metrics"] for k, v in result["tasks"].items()}
    mc = t["mc/2-shot"]["InContextLearningMultipleChoiceAccuracy"]
    lm = t["lm/2-shot"]["InContextLearningLMAccuracy"]
    sc = t["schema/1-shot"]["InContextLearningMultipleChoiceAccuracy"]
    gn = t["gen/1-shot"]["InContextLearningGenerationExactMatchAccuracy"]
    knowledge = ((mc - 0.25) / 0.75 + lm) / 2
    reasoning = ((sc - 0.5) / 0.5 + gn) / 2
    g = result["gauntlet"]
    assert "absent" not in g  # a category with a missing benchmark is dropped
    assert g["knowledge"] == pytest.approx(knowledge) and g["reasoning"] == pytest.approx(
        reasoning)
    assert g["core"] == pytest.approx((knowledge + reasoning) / 2)
    table = (d / "icl.md").read_text()
    assert "| knowledge" in table and "Average" in table and "| core" in table


def test_evaluate_tasks_for_the_trainer(run):
    """The trainer's hook: models merged from params pure dicts (as train_step's state holds
    them) with the trainer's one graphdef, task files prepared once: the CLI run's accuracies,
    and a second call (new weights) compiles nothing."""
    import jax
    from flax import nnx

    from mpt_jax.eval import icl, tasks
    from mpt_jax.eval.scoring import TRACES, parse_mesh

    result, _, _, d, _ = run
    base = eval_common.model()
    graphdef, params = nnx.graphdef(base), nnx.to_pure_dict(nnx.state(base))
    prepared = tasks.prepare_tasks([str(d / "tasks.yaml")], eval_common.tokenizer(), eos_id=0,
                                   max_seq_len=128)
    kw = dict(eos_id=0, mesh=parse_mesh(None), batch_tokens=1024, min_bucket=128)
    got = icl.evaluate_tasks(nnx.merge(graphdef, params), prepared, eval_common.tokenizer(),
                             **kw)
    want = {k: v["metrics"][next(iter(v["metrics"]))] for k, v in result["tasks"].items()}
    assert got == pytest.approx(want)
    before = sum(TRACES.values())
    params = jax.tree.map(lambda x: x * 1.01, params)
    icl.evaluate_tasks(nnx.merge(graphdef, params), prepared, eval_common.tokenizer(), **kw)
    assert sum(TRACES.values()) == before


def test_gauntlet_arithmetic_on_hand_made_scores():
    spec = {"eval_gauntlet": {
        "weighting": "LOG_SAMPLE_SZ", "subtract_random_baseline": True, "rescale_accuracy": True,
        "averages": {"avg": ["a", "b", "gone"]},
        "categories": [
            {"name": "a", "benchmarks": [{"name": "x", "num_fewshot": 0, "random_baseline": 0.5},
                                         {"name": "y", "num_fewshot": 3, "random_baseline": 0}]},
            {"name": "b", "benchmarks": [{"name": "z", "num_fewshot": 1,
                                          "random_baseline": 0.25}]},
            {"name": "gone", "benchmarks": [{"name": "w", "num_fewshot": 0,
                                             "random_baseline": 0}]}]}}
    scores = {"x/0-shot": 0.8, "y/3-shot": 0.3, "z/1-shot": 0.4}
    sizes = {"x/0-shot": 1024, "y/3-shot/c1": 100, "y/3-shot/c2": 28, "z/1-shot": 1}
    warnings = []
    out = Gauntlet.from_dict(spec).score(scores, sizes, warn=warnings.append)
    wx, wy = 10.0, 7.0  # log2(1024), log2(100 + 28)
    a = (0.6 * wx + 0.3 * wy) / (wx + wy)
    b = (0.4 - 0.25) / 0.75
    assert out["a"] == pytest.approx(a) and out["b"] == pytest.approx(b)
    assert out["avg"] == pytest.approx((a + b) / 2) and "gone" not in out
    assert len(warnings) == 1 and "w/0-shot" in warnings[0]
    spec["eval_gauntlet"].update(weighting="SAMPLE_SZ", rescale_accuracy=False)
    out = Gauntlet.from_dict(spec).score(scores, sizes, warn=warnings.append)
    assert out["a"] == pytest.approx((0.3 * 1024 + 0.3 * 128) / 1152)
    spec["eval_gauntlet"].update(weighting="EQUAL", subtract_random_baseline=False)
    out = Gauntlet.from_dict(spec).score(scores, warn=warnings.append)
    assert out["a"] == pytest.approx(0.55) and out["b"] == pytest.approx(0.4)
    assert math.isclose(out["avg"], 0.475)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 1
# ---------------------------------------------------------------------------------------------
def _fails(capsys, argv, *needles):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("[eval]")]
    assert rc == 1 and len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]


def _task(d, kind, rows, **extra):
    path = eval_common.write_jsonl(d / "data.jsonl", rows)
    lines = [f"icl_tasks:\n- label: t\n  dataset_uri: {path}\n  icl_task_type: {kind}",
             "  num_fewshot: [0]"] + [f"  {k}: {v}" for k, v in extra.items()]
    (d / "t.yaml").write_text("\n".join(lines) + "\n")
    return d / "t.yaml"


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    ck = eval_common.checkpoint()
    capsys.readouterr()  # (building the checkpoint, when this test runs first, prints)
    out = tmp_path / "o.json"
    _fails(capsys, _args(ck, tmp_path / "nope.yaml", out), "nope.yaml: no such task file")
    (tmp_path / "bad.yaml").write_text("icl_tasks: [\n  {label: x\n")
    _fails(capsys, _args(ck, tmp_path / "bad.yaml", out), "bad.yaml: not valid YAML")
    mc = [{"query": "a cat", "choices": ["yes", "no"], "gold": 0}]
    _fails(capsys, _args(ck, _task(tmp_path, "code_evaluation", mc), out),
           "unknown icl_task_type 'code_evaluation'", "multiple_choice")
    _fails(capsys, _args(ck, _task(tmp_path, "multiple_choice", mc + [dict(mc[0], gold=2)]),
                         out), "data.jsonl:2: gold index 2 is out of range for 2 choices")
    _fails(capsys, _args(ck, _task(tmp_path, "multiple_choice", [{"query": "a"}]), out),
           "data.jsonl:1: missing field 'choices'")
    _fails(capsys, _args(ck, _task(tmp_path, "language_modeling", []), out), "empty dataset")
    long = [{"context": "a cat", "continuation": "b"},
            {"context": " ".join(["dog"] * 300), "continuation": "sat"}]
    _fails(capsys, _args(ck, _task(tmp_path, "language_modeling", long), out),
           "example 1", "data.jsonl:2", "more than max_seq_len 128")
    _fails(capsys, _args(ck, _task(tmp_path, "multiple_choice", mc, num_fewshots="[1]"), out),
           "unknown key 'num_fewshots'")
    _fails(capsys, _args(ck, _task(tmp_path, "language_modeling",
                                   [{"context": "", "continuation": "a cat"}]), out),
           "example 0", "data.jsonl:1", "is empty (0 tokens)")
    (tmp_path / "latin1.yaml").write_bytes(b"icl_tasks:\n- label: caf\xe9\n")
    _fails(capsys, _args(ck, tmp_path / "latin1.yaml", out), "latin1.yaml: not UTF-8 text")
    lm = _task(tmp_path, "language_modeling", [{"context": "a cat", "continuation": "b"}])
    _fails(capsys, _args(ck, lm, tmp_path / "o.md"), "--output", "give the results another")
    _fails(capsys, _args(ck, lm, out, "--max_seq_len", "0"), "--max_seq_len must be a positive")
    _fails(capsys, _args(ck, lm, tmp_path), "is a directory")
    assert not out.exists()  # nothing written on failure


def test_a_tasks_own_max_seq_len_is_its_generation_limit(tmp_path, capsys):
    """A generation task may set a max_seq_len above the model's (ALiBi extrapolates): the
    length check and the generator both use it, so a prompt past the model's 128 runs."""
    rows = [{"context": " ".join(["dog"] * 140), "answer": "sat"}]
    task = _task(tmp_path, "generation_task_with_answers", rows, max_seq_len=512,
                 generation_kwargs="{max_new_tokens: 2}")
    out = tmp_path / "o.json"
    assert main(_args(eval_common.checkpoint(), task, out)) == 0, capsys.readouterr().err
    (result,) = json.loads(out.read_text())["tasks"].values()
    assert result["n"] == 1 and result["icl_task_type"] == "generation_task_with_answers"


def test_markdown_cells_keep_a_labels_bar():
    from mpt_jax.eval.icl import _markdown

    table = _markdown(["task", "accuracy"], [["a|b", "0.5"]])
    assert table.splitlines()[2] == "| a\\|b | 0.5      |"
