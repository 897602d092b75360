"""The lm-eval backend (`mpt_jax`, registered on import) against lm-eval's own `hf` model on the
same checkpoint: local custom tasks (YAML + JSONL written here) of the three request types:
multiple choice (loglikelihood), perplexity (loglikelihood_rolling, documents longer than
max_length) and generate_until. Per-request results within 1e-4, equal metrics; the CLI."""
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

import eval_common  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")

from eval import main  # noqa: E402

TASKS = {
    "tiny_mc": """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "tiny_ppl": """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
    "tiny_gen": """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def include_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    rng = random.Random(11)
    s = lambda n: eval_common.sentence(rng, n)  # noqa: E731
    rows = {
        "tiny_mc": [{"query": s(rng.randint(3, 8)), "choices": [s(1), s(2), s(3), s(1)],
                     "gold": rng.randint(0, 3)} for _ in range(8)],
        # two documents longer than max_length 128: several rolling windows each
        "tiny_ppl": [{"text": s(n)} for n in (20, 90, 150)],
        "tiny_gen": [{"context": s(rng.randint(3, 6)), "answer": s(1)} for _ in range(4)],
    }
    for name, text in TASKS.items():
        data = eval_common.write_jsonl(d / f"{name}.jsonl", rows[name])
        (d / f"{name}.yaml").write_text(text.format(data=data))
    return str(d)


def _evaluate(model, model_args, include_path):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=list(TASKS), batch_size=4,
        task_manager=TaskManager(include_path=include_path, include_defaults=False),
        log_samples=True)


@pytest.fixture(scope="module")
def both(include_path):
    import mpt_jax.eval.harness  # noqa: F401  (registers "mpt_jax")

    ckpt = eval_common.checkpoint()
    ours = _evaluate("mpt_jax", f"pretrained={ckpt},dtype=float32,batch_tokens=1024,"
                     "min_bucket=128,progress=False", include_path)
    ref = _evaluate("hf", f"pretrained={ckpt},dtype=float32,max_length=128,device=cpu",
                    include_path)
    return ours, ref


def _responses(result, task):
    return [s["resps"] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.slow
def test_loglikelihoods_equal_lm_evals_hf_model(both):
    ours, ref = both
    for task in ("tiny_mc", "tiny_ppl"):
        a, b = _responses(ours, task), _responses(ref, task)
        assert len(a) == len(b) > 0
        for ra, rb in zip(a, b):
            for (x,), (y,) in zip(ra, rb):
                lx, ly = (x[0], y[0]) if isinstance(x, (list, tuple)) else (x, y)
                assert abs(lx - ly) <= 1e-4 * max(1.0, abs(ly)), (task, lx, ly)
                if isinstance(x, (list, tuple)):
                    assert x[1] == y[1]  # is_greedy
    for task, metrics in (("tiny_mc", ("acc,none", "acc_norm,none")),
                          ("tiny_ppl", ("word_perplexity,none", "bits_per_byte,none"))):
        for m in metrics:
            assert ours["results"][task][m] == pytest.approx(ref["results"][task][m], rel=1e-5)


def test_generate_until_equals_lm_evals_hf_model(both):
    ours, ref = both
    assert _responses(ours, "tiny_gen") == _responses(ref, "tiny_gen")
    assert ours["results"]["tiny_gen"]["exact_match,none"] == (
        ref["results"]["tiny_gen"]["exact_match,none"])


@pytest.mark.slow
def test_cli_and_bad_input(include_path, tmp_path, capsys):
    out = tmp_path / "h.json"
    base = ["harness", "--checkpoint", eval_common.checkpoint(), "--dtype", "float32",
            "--include_path", include_path, "--batch_tokens", "1024", "--min_bucket", "128",
            "--no_progress", "--output", str(out)]
    assert main(base + ["--tasks", "tiny_mc", "--limit", "4"]) == 0
    result = json.loads(out.read_text())
    assert "acc,none" in result["results"]["tiny_mc"]
    assert "tiny_mc" in capsys.readouterr().out
    out.unlink()
    bad = base + ["--tasks", "tiny_mc"]
    bad[bad.index(include_path)] = str(tmp_path / "none")
    assert main(bad) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("eval.py")]
    assert err == [f"eval.py harness: error: --include_path '{tmp_path / 'none'}' is not a "
                   "directory"]
    assert not out.exists()
    # a task whose template names a field the documents lack: one line, not jinja2's traceback
    broken = tmp_path / "broken"
    broken.mkdir()
    data = eval_common.write_jsonl(broken / "rows.jsonl", [{"query": "a", "choices": ["b"],
                                                             "gold": 0}])
    (broken / "tiny_bad.yaml").write_text(TASKS["tiny_mc"].format(data=data).replace(
        "task: tiny_mc", "task: tiny_bad").replace("{{query}}", "{{nofield}}"))
    bad = base + ["--tasks", "tiny_bad"]
    bad[bad.index(include_path)] = str(broken)
    assert main(bad) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("eval.py")]
    assert len(err) == 1 and "a task template failed" in err[0] and "nofield" in err[0], err
    assert not out.exists()
    with pytest.raises(ValueError, match="unknown model_args \\['colour'\\]"):
        lm_eval.api.registry.get_model("mpt_jax").create_from_arg_string(
            f"pretrained={eval_common.checkpoint()},colour=red")


def test_loglikelihood_requests_equal_template_lms(monkeypatch):
    """Our batched tokenization gives _loglikelihood_tokens exactly the requests lm-eval's
    TemplateLM.loglikelihood builds one encode at a time: trailing context spaces, an empty
    context (prefix token, or the continuation's own first token), texts that start with the
    prefix token's text (no special tokens added), repeated contexts and pairs."""
    import tokenizers
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM

    from mpt_jax.eval.harness import MPTJaxLM

    lm = MPTJaxLM(pretrained=eval_common.checkpoint(), dtype="float32", progress=False)
    eos = lm.prefix_token_id
    prefix = lm.tok_decode([eos], skip_special_tokens=False)
    # a tokenizer that adds the prefix token in front: the add_special_tokens choice matters
    tok = tokenizers.Tokenizer.from_str(lm.tokenizer.to_str())
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{prefix} $A", special_tokens=[(prefix, eos)])
    lm.tokenizer = tok
    seen = []
    monkeypatch.setattr(lm, "_loglikelihood_tokens",
                        lambda reqs, **kw: seen.append(reqs) or [(0.0, False)] * len(reqs))
    args = [("the cat", " sat"), ("the cat ", "sat"), ("the cat  \n", " sat down"),
            ("", "the cat"), ("", prefix + " the"), (prefix + "the dog", " ran"),
            ("the cat", " sat"), ("the cat", " ran"), ("a", "b")]
    reqs = [Instance("loglikelihood", {}, a, i) for i, a in enumerate(args)]
    lm.loglikelihood(reqs)
    TemplateLM.loglikelihood(lm, reqs, disable_tqdm=True)
    assert len(seen) == 2 and len(seen[0]) == len(args)
    assert seen[0] == seen[1]
    assert seen[0][3][1] == [eos] and seen[0][4][1] == [eos]  # both empty-context branches


def test_compiled_templates_render_as_lm_eval_and_restore():
    import lm_eval.utils as lm_utils

    from mpt_jax.eval.harness import compiled_templates

    original = lm_utils.apply_template
    doc = {"query": "Is it?", "choices": ["a", "b"], "n": 3}
    templates = ["{{query}}\nAnswer:", "{{choices}}", "{{query | regex_replace('I', 'i')}}",
                 "{{n + 1}} {{query}}"]
    want = [original(t, doc) for t in templates]
    with compiled_templates():
        assert lm_utils.apply_template is not original
        assert [lm_utils.apply_template(t, doc) for t in templates * 2] == want * 2
        with pytest.raises(Exception, match="undefined"):  # lm-eval's StrictUndefined
            lm_utils.apply_template("{{missing}}", doc)
    assert lm_utils.apply_template is original
