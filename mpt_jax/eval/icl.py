"""Running llm-foundry's in-context-learning tasks on our model: scores, metrics, tables.

    tasks = prepare_tasks(["tasks.yaml"], tokenizer, eos_id=0, max_seq_len=2048)   # once
    results = run_tasks(model, tasks, tokenizer, eos_id=0, mesh=mesh)             # TaskResults
    evaluate_tasks(model, tasks, tokenizer, eos_id=0, mesh=mesh)  # {"piqa/0-shot": 0.71, ...}

Every loglikelihood request of every task goes to one `Scorer.score` call (batched and bucketed
across tasks; a multiple-choice question's choices share their context's forward pass);
generation tasks run through the `Completer`. Metrics, from llmfoundry/eval/metrics/nlp.py:

  language_modeling   InContextLearningLMAccuracy: every continuation token is the argmax.
  multiple_choice,    InContextLearningMultipleChoiceAccuracy: the choice with the lowest mean
  schema              per-token loss (cross entropy averaged over the continuation's tokens;
                      llm-foundry takes exp of it, a perplexity, and the first minimum). Also
                      `acc`, lm-eval's accuracy: the highest summed log-likelihood.
  generation_task_    InContextLearningGenerationExactMatchAccuracy: the greedy completion, cut
  with_answers        at the stop sequences, after the last cot_delimiter, normalized (lower
                      case, no punctuation, articles or extra spaces) unless do_normalization
                      is false (then stripped), starts with one of the answers (the same).

A task with categories reports each, and their unweighted mean as the task's score (as
llm-foundry's eval gauntlet and markdown table average the categories' metrics).
"""
from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Sequence

import numpy as np
import tokenizers

from mpt_jax import sharding
from mpt_jax.eval import tasks as tasks_lib
from mpt_jax.eval.generation import Completer, cut_at_stop
from mpt_jax.eval.scoring import DEFAULT_BATCH_TOKENS, Request, Scorer
from mpt_jax.model import MPTForCausalLM

LM_EVAL_ACC = "acc"


@dataclasses.dataclass
class TaskResult:
    """One (task, num_fewshot[, category]) dataset's metrics and per-example records."""

    name: str  # label/N-shot[/category]
    benchmark: str  # label/N-shot
    label: str
    num_fewshot: int
    category: str | None
    icl_task_type: str
    metric_names: tuple[str, ...]
    metrics: dict[str, float]
    samples: list[dict]

    @property
    def n(self) -> int:
        return len(self.samples)


# ---------------------------------------------------------------------------------------------
# Metrics (llmfoundry/eval/metrics/nlp.py)
# ---------------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """InContextLearningGenerationExactMatchAccuracy.normalize_answer (TriviaQA's): underscores
    to spaces, lower case, punctuation (and ‘’´`) to spaces, articles removed, whitespace
    collapsed."""
    exclude = set(string.punctuation + "‘’´`")
    text = text.replace("_", " ").lower()
    text = "".join(" " if ch in exclude else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split()).strip()


def generation_correct(output: str, answers: Sequence[str], *, stop: Sequence[str],
                       cot_delimiter: str, do_normalization: bool) -> tuple[bool, str]:
    """InContextLearningGenerationExactMatchAccuracy.update for one sample -> (correct, the
    cleaned answer)."""
    final = cut_at_stop(output, stop)
    if cot_delimiter:
        final = final.split(cot_delimiter)[-1]
    if do_normalization:
        cleaned, labels = normalize_answer(final), {normalize_answer(a) for a in answers}
    else:
        cleaned, labels = final.strip(), {a.strip() for a in answers}
    return any(cleaned.startswith(label) for label in labels), cleaned


def choice_picks(logprobs: Sequence[float], lengths: Sequence[int]) -> tuple[int, int]:
    """(llm-foundry's pick: the lowest mean per-token loss, the first on ties; lm-eval's `acc`
    pick: the highest summed log-likelihood, the first on ties)."""
    mean = np.asarray(logprobs, np.float64) / np.asarray(lengths, np.float64)
    return int(np.argmax(mean)), int(np.argmax(np.asarray(logprobs, np.float64)))


# ---------------------------------------------------------------------------------------------
# Running tasks
# ---------------------------------------------------------------------------------------------
def run_tasks(model: MPTForCausalLM, tasks: Sequence[tasks_lib.PreparedTask],
              tokenizer: tokenizers.Tokenizer, *, eos_id: int | None, mesh=None,
              rules=sharding.DEFAULT_RULES, batch_tokens: int = DEFAULT_BATCH_TOKENS,
              generation_batch_size: int = 16, max_seq_len: int | None = None,
              min_bucket: int = 16, progress: bool = True) -> list[TaskResult]:
    """Scores every prepared task (see the module docstring). max_seq_len: the generation
    limit (prompt + completion; config.max_seq_len when None)."""
    requests: list[Request] = []
    where = []  # (task index, example index) -> first request index
    for ti, task in enumerate(tasks):
        for ex in task.examples:
            where.append((ti, ex.index, len(requests)))
            requests.extend(ex.requests)
    scorer = Scorer(model, mesh=mesh, rules=rules, batch_tokens=batch_tokens,
                    min_bucket=min_bucket, progress=progress)
    scores = scorer.score(requests, desc="icl: scoring") if requests else []
    first = {(ti, ei): r for ti, ei, r in where}

    completions = {}
    gen_tasks = [ti for ti, t in enumerate(tasks)
                 if t.config.icl_task_type == "generation_task_with_answers"]
    if gen_tasks:
        completer = Completer(model, tokenizer, eos_id=eos_id,
                              pad_id=0 if eos_id is None else eos_id, mesh=mesh, rules=rules,
                              batch_size=generation_batch_size, min_bucket=min_bucket,
                              progress=progress)
        for ti in gen_tasks:
            task = tasks[ti]
            texts = completer.complete(  # the limit prepare_task checked the task against
                [ex.prompt for ex in task.examples], max_new_tokens=task.max_new_tokens,
                stop=task.config.early_stopping_criteria,
                max_len=task.config.max_seq_len or max_seq_len, desc=f"icl: {task.name}")
            completions[ti] = texts

    results = []
    for ti, task in enumerate(tasks):
        cfg = task.config
        samples = []
        for ei, ex in enumerate(task.examples):
            if cfg.icl_task_type == "generation_task_with_answers":
                output = completions[ti][ei]
                ok, cleaned = generation_correct(
                    output, ex.answers, stop=cfg.early_stopping_criteria,
                    cot_delimiter=cfg.cot_delimiter, do_normalization=cfg.do_normalization)
                samples.append({"index": ex.index, "output": output, "cleaned_output": cleaned,
                                "answers": list(ex.answers), "correct": ok})
                continue
            r0 = first[(ti, ex.index)]
            sc = scores[r0:r0 + len(ex.requests)]
            if cfg.icl_task_type == "language_modeling":
                samples.append({"index": ex.index, "logprob": sc[0].logprob,
                                "tokens": len(ex.requests[0].continuation),
                                "correct": sc[0].greedy})
                continue
            lengths = [len(r.continuation) for r in ex.requests]
            pick, pick_sum = choice_picks([s.logprob for s in sc], lengths)
            samples.append({"index": ex.index, "gold": ex.gold,
                            "logprobs": [s.logprob for s in sc], "tokens": lengths,
                            "pick": pick, "pick_acc": pick_sum, "correct": pick == ex.gold,
                            "correct_acc": pick_sum == ex.gold})
        metric = cfg.metric_names[0]
        metrics = {metric: float(np.mean([s["correct"] for s in samples]))}
        if cfg.icl_task_type in ("multiple_choice", "schema"):
            metrics[LM_EVAL_ACC] = float(np.mean([s["correct_acc"] for s in samples]))
        results.append(TaskResult(task.name, task.benchmark, cfg.label, task.num_fewshot,
                                  task.category, cfg.icl_task_type, cfg.metric_names, metrics,
                                  samples))
    return results


def benchmark_scores(results: Sequence[TaskResult]) -> dict[str, dict[str, float]]:
    """`label/N-shot` -> {metric: value}: a task's categories averaged (unweighted)."""
    grouped: dict[str, list[TaskResult]] = {}
    for r in results:
        grouped.setdefault(r.benchmark, []).append(r)
    return {name: {m: float(np.mean([r.metrics[m] for r in rs])) for m in rs[0].metrics}
            for name, rs in grouped.items()}


def benchmark_sizes(results: Sequence[TaskResult]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for r in results:
        sizes[r.benchmark] = sizes.get(r.benchmark, 0) + r.n
    return sizes


def evaluate_tasks(model: MPTForCausalLM, tasks, tokenizer: tokenizers.Tokenizer, *,
                   eos_id: int | None, mesh=None, rules=sharding.DEFAULT_RULES,
                   max_seq_len: int | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                   min_bucket: int = 16, progress: bool = False) -> dict[str, float]:
    """{`label/N-shot`: accuracy} for the trainer's `eval_every` (the task's metric_names
    accuracy, categories averaged). tasks: prepared tasks (prepare once: `prepare_tasks`) or
    task file paths. The compiled scoring functions are keyed on the model's graph and the
    mesh, not its weights: later calls with new weights compile nothing."""
    if tasks and isinstance(tasks[0], str):
        tasks = tasks_lib.prepare_tasks(tasks, tokenizer, eos_id=eos_id,
                                        max_seq_len=max_seq_len or model.config.max_seq_len)
    results = run_tasks(model, tasks, tokenizer, eos_id=eos_id, mesh=mesh, rules=rules,
                        batch_tokens=batch_tokens, max_seq_len=max_seq_len,
                        min_bucket=min_bucket, progress=progress)
    by_name = {r.benchmark: r.metric_names[0] for r in results}
    return {name: values[by_name[name]] for name, values in benchmark_scores(results).items()}


def gauntlet_scores(results: Sequence[TaskResult], gauntlet) -> dict[str, float]:
    """The eval gauntlet's category scores and averages (gauntlet.Gauntlet) from the results:
    each benchmark's metric_names accuracy, categories averaged, with its example count."""
    primary = {r.benchmark: r.metric_names[0] for r in results}
    scores = {k: v[primary[k]] for k, v in benchmark_scores(results).items()}
    return gauntlet.score(scores, benchmark_sizes(results))


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------
def results_json(results: Sequence[TaskResult]) -> dict:
    """The per-benchmark JSON: metrics (categories averaged), example count, and the
    categories' own metrics when there are any."""
    out: dict[str, dict] = {}
    scores = benchmark_scores(results)
    for r in results:
        entry = out.setdefault(r.benchmark, {
            "label": r.label, "num_fewshot": r.num_fewshot, "icl_task_type": r.icl_task_type,
            "metrics": scores[r.benchmark], "n": 0})
        entry["n"] += r.n
        if r.category is not None:
            entry.setdefault("categories", {})[r.category] = {"metrics": r.metrics, "n": r.n}
    return out


def markdown_table(results: Sequence[TaskResult], model_name: str,
                   taxonomy: dict[str, str] | None = None) -> str:
    """llm-foundry's results table (command_utils/eval.py calculate_markdown_results): one row
    per benchmark (an `Average` row, then one per category, for tasks with categories), plus
    lm-eval's summed-loglikelihood `acc` for multiple choice."""
    taxonomy = taxonomy or {}
    head = ["Category", "Benchmark", "Subtask", "Accuracy", "acc (lm-eval)", "Number few shot",
            "Model"]
    rows = []
    scores = benchmark_scores(results)
    done = set()
    for r in results:
        if r.benchmark in done:
            continue
        done.add(r.benchmark)
        subs = [x for x in results if x.benchmark == r.benchmark]
        metric = r.metric_names[0]

        def fmt(metrics, metric=metric):
            acc = metrics.get(LM_EVAL_ACC)
            return [f"{metrics[metric]:.4f}", "" if acc is None else f"{acc:.4f}"]

        cat = taxonomy.get(r.label, "")
        shot = f"{r.num_fewshot}-shot"
        if r.category is None:
            rows.append([cat, r.label, "", *fmt(r.metrics), shot, model_name])
        else:
            rows.append([cat, r.label, "Average", *fmt(scores[r.benchmark]), shot, model_name])
            rows.extend([cat, "", x.category, *fmt(x.metrics), shot, model_name] for x in subs)
    return _markdown(head, rows)


def gauntlet_table(composite: dict[str, float], model_name: str) -> str:
    """One row: the model's gauntlet category scores and averages (llm-foundry's layout)."""
    return _markdown(["model_name", *composite],
                     [[model_name, *(f"{v:.4f}" for v in composite.values())]])


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    head, rows = _cells(head), [_cells(r) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep, *(line(r) for r in rows)])


def _cells(row) -> list[str]:
    """Table cells as text, a label's own "|" escaped so that it stays one cell."""
    return [str(c).replace("|", "\\|") for c in row]
