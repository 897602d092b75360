"""llm-foundry's in-context-learning task files: reading them and building every example's prompt.

A task file is llm-foundry's (scripts/eval/yamls/tasks*.yaml): a top-level `icl_tasks:` list
(or the list itself) of entries with `label`, `dataset_uri` (a JSONL file; a relative path is
looked up next to the task file, then in the working directory), `icl_task_type`, `num_fewshot`
(a list, or one int), and optionally `continuation_delimiter` (' '), `example_delimiter` ('\\n'),
`prompt_string` (''), `prelimiter` / `question_prelimiter` (''), `metric_names`,
`fewshot_random_seed` (1234), `has_categories`, `strip_dataset` (true), `max_seq_len`, and for
generation `early_stopping_criteria`, `cot_delimiter`, `do_normalization`,
`generation_kwargs: {max_new_tokens: N}`. `batch_size` is accepted and unused (batches here are
sized in tokens: eval.py --batch_tokens). Any other key is an error, as it is in llm-foundry
(its dataset constructors take no unknown keyword).

JSONL formats by `icl_task_type` (llm-foundry's):
  language_modeling               context, continuation
  multiple_choice                 query, choices, gold
  schema                          context_options, continuation, gold
  generation_task_with_answers    context, answer, optional aliases and chain_of_thought

Prompts follow llmfoundry/eval/datasets/in_context_learning_evaluation.py exactly (function by
function below): the few-shot examples are drawn by `get_fewshot_sample_idxs` (utils.py) from one
`random.Random(fewshot_random_seed)` shared by the whole dataset in order, never the example
itself; the preamble (prompt_string + few-shot examples) is tokenized with special tokens and
a trailing EOS dropped (`_fix_eos_on_preamble`), the example's own context without, rstripped
(`strip_dataset`); continuations and choices get a leading space when the tokenizer encodes
' a' as one token (`tokenizer_needs_prefix_space`). One deliberate difference: a context that
does not fit `max_seq_len` with its continuation is an error naming the example (llm-foundry
cuts the context from the left, silently).
"""
from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from typing import Any

import tokenizers

from mpt_jax import storage
from mpt_jax.eval.scoring import Request

TASK_TYPES = ("language_modeling", "multiple_choice", "schema", "generation_task_with_answers")
LM_ACCURACY = "InContextLearningLMAccuracy"
MC_ACCURACY = "InContextLearningMultipleChoiceAccuracy"
GEN_ACCURACY = "InContextLearningGenerationExactMatchAccuracy"
# llmfoundry/utils/builders.py build_icl_evaluators: the default (and here the only) metric
METRICS = {"language_modeling": LM_ACCURACY, "multiple_choice": MC_ACCURACY,
           "schema": MC_ACCURACY, "generation_task_with_answers": GEN_ACCURACY}
FIELDS = {  # required fields, and their JSON types
    "language_modeling": {"context": str, "continuation": str},
    "multiple_choice": {"query": str, "choices": list, "gold": int},
    "schema": {"context_options": list, "continuation": str, "gold": int},
    "generation_task_with_answers": {"context": str, "answer": str},
}
# llmfoundry/eval/datasets/in_context_learning_evaluation.py _MAX_ANSWER_BUFFER_LENGTH
_COT_ANSWER_BUFFER = 10
_KEYS = {"label", "dataset_uri", "icl_task_type", "num_fewshot", "continuation_delimiter",
         "example_delimiter", "prompt_string", "prelimiter", "question_prelimiter",
         "metric_names", "fewshot_random_seed", "has_categories", "strip_dataset", "max_seq_len",
         "early_stopping_criteria", "cot_delimiter", "do_normalization", "generation_kwargs",
         "batch_size"}


class TaskError(ValueError):
    """A task file, dataset or example that cannot be evaluated; the message names it."""


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    label: str
    dataset_uri: str  # resolved path
    icl_task_type: str
    num_fewshot: tuple[int, ...]
    source: str  # the task file, for messages
    continuation_delimiter: str = " "
    example_delimiter: str = "\n"
    prompt_string: str = ""
    prelimiter: str = ""
    metric_names: tuple[str, ...] = ()
    fewshot_random_seed: int = 1234
    has_categories: bool = False
    strip_dataset: bool = True
    max_seq_len: int | None = None
    early_stopping_criteria: tuple[str, ...] = ()
    cot_delimiter: str = ""
    do_normalization: bool = True
    max_new_tokens: int | None = None


@dataclasses.dataclass
class Example:
    """One example, tokenized: its requests (one for language modeling, one per choice for
    multiple choice and schema) or, for generation, its prompt and accepted answers."""

    index: int  # 0-based position in its (category's) dataset
    line: int  # 1-based line in the JSONL file
    requests: list[Request]
    gold: int | None = None
    prompt: tuple[int, ...] | None = None
    answers: tuple[str, ...] = ()


@dataclasses.dataclass
class PreparedTask:
    """One (task, num_fewshot[, category]) dataset with every example tokenized."""

    config: TaskConfig
    num_fewshot: int
    category: str | None
    examples: list[Example]
    max_new_tokens: int = 0  # generation only

    @property
    def name(self) -> str:
        """llm-foundry's evaluator label: `label/N-shot` (`/category` for a category)."""
        base = f"{self.config.label}/{self.num_fewshot}-shot"
        return base if self.category is None else f"{base}/{self.category}"

    @property
    def benchmark(self) -> str:
        return f"{self.config.label}/{self.num_fewshot}-shot"


# ---------------------------------------------------------------------------------------------
# Task files
# ---------------------------------------------------------------------------------------------
def _type_error(where: str, key: str, want: str, got) -> TaskError:
    return TaskError(f"{where}: {key} must be {want}, got {got!r}")


def load_task_file(path: str) -> list[TaskConfig]:
    """Reads an llm-foundry task YAML; TaskError naming the file and entry on any problem."""
    import yaml

    if not storage.isfile(path):
        raise TaskError(f"{path}: no such task file")
    try:
        doc = yaml.safe_load(storage.read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise TaskError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}"
                        .splitlines()[0]) from None
    entries = doc.get("icl_tasks") if isinstance(doc, dict) else doc
    if not isinstance(entries, list) or not entries:
        raise TaskError(f"{path}: expected a non-empty `icl_tasks:` list of tasks")
    tasks = [_task_config(entry, path, i) for i, entry in enumerate(entries)]
    labels = [t.label for t in tasks]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise TaskError(f"{path}: task label {dup[0]!r} is used twice")
    return tasks


def _task_config(entry: Any, path: str, i: int) -> TaskConfig:
    where = f"{path}: icl_tasks[{i}]"
    if not isinstance(entry, dict):
        raise TaskError(f"{where}: expected a mapping, got {type(entry).__name__}")
    if isinstance(entry.get("label"), str):
        where = f"{path}: task {entry['label']!r}"
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise TaskError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    for key in ("label", "dataset_uri", "icl_task_type", "num_fewshot"):
        if key not in entry or entry[key] is None:
            raise TaskError(f"{where}: missing {key!r}")
    kind = entry["icl_task_type"]
    if kind not in TASK_TYPES:
        raise TaskError(f"{where}: unknown icl_task_type {kind!r}; supported: "
                        + ", ".join(TASK_TYPES))
    shots = entry["num_fewshot"]
    shots = [shots] if isinstance(shots, int) and not isinstance(shots, bool) else shots
    if (not isinstance(shots, list) or not shots
            or any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in shots)
            or len(set(shots)) != len(shots)):
        raise _type_error(where, "num_fewshot", "a list of distinct integers >= 0",
                          entry["num_fewshot"])
    strings = {}
    for key in ("label", "dataset_uri", "continuation_delimiter", "example_delimiter",
                "prompt_string", "prelimiter", "question_prelimiter", "cot_delimiter"):
        if key in entry:
            if not isinstance(entry[key], str):
                raise _type_error(where, key, "a string", entry[key])
            strings[key] = entry[key]
    if "prelimiter" in strings and "question_prelimiter" in strings:
        raise TaskError(f"{where}: both prelimiter and question_prelimiter given; they are one "
                        "option (llm-foundry refuses both too)")
    flags = {}
    for key in ("has_categories", "strip_dataset", "do_normalization"):
        if key in entry:
            if not isinstance(entry[key], bool):
                raise _type_error(where, key, "true or false", entry[key])
            flags[key] = entry[key]
    ints = {}
    for key in ("fewshot_random_seed", "max_seq_len", "batch_size"):
        if entry.get(key) is not None:
            if not isinstance(entry[key], int) or isinstance(entry[key], bool) or (
                    key != "fewshot_random_seed" and entry[key] < 1):
                raise _type_error(where, key, "a positive integer", entry[key])
            ints[key] = entry[key]
    metrics = entry.get("metric_names", [METRICS[kind]])
    if not isinstance(metrics, list) or not metrics or any(m != METRICS[kind] for m in metrics):
        raise TaskError(f"{where}: metric_names {metrics!r} not supported for {kind}; "
                        f"supported: [{METRICS[kind]}]")
    stops = entry.get("early_stopping_criteria") or []
    if not isinstance(stops, list) or any(not isinstance(s, str) or not s for s in stops):
        raise _type_error(where, "early_stopping_criteria", "a list of non-empty strings", stops)
    gen_kwargs = entry.get("generation_kwargs") or {}
    if not isinstance(gen_kwargs, dict) or set(gen_kwargs) - {"max_new_tokens"}:
        raise TaskError(f"{where}: generation_kwargs {gen_kwargs!r}: only max_new_tokens is "
                        "supported (decoding is greedy)")
    max_new = gen_kwargs.get("max_new_tokens")
    if max_new is not None and (not isinstance(max_new, int) or max_new < 1):
        raise _type_error(where, "generation_kwargs.max_new_tokens", "a positive integer",
                          max_new)
    if kind != "generation_task_with_answers":
        for key in ("early_stopping_criteria", "cot_delimiter", "do_normalization",
                    "generation_kwargs"):
            if key in entry:
                raise TaskError(f"{where}: {key} applies to generation_task_with_answers only")
    return TaskConfig(
        label=strings["label"], dataset_uri=_resolve(strings["dataset_uri"], path, where),
        icl_task_type=kind, num_fewshot=tuple(shots), source=path,
        continuation_delimiter=strings.get("continuation_delimiter", " "),
        example_delimiter=strings.get("example_delimiter", "\n"),
        prompt_string=strings.get("prompt_string", ""),
        prelimiter=strings.get("prelimiter", strings.get("question_prelimiter", "")),
        metric_names=tuple(metrics),
        fewshot_random_seed=ints.get("fewshot_random_seed", 1234),
        has_categories=flags.get("has_categories", False),
        strip_dataset=flags.get("strip_dataset", True), max_seq_len=ints.get("max_seq_len"),
        early_stopping_criteria=tuple(stops), cot_delimiter=strings.get("cot_delimiter", ""),
        do_normalization=flags.get("do_normalization", True), max_new_tokens=max_new)


def _resolve(uri: str, task_file: str, where: str) -> str:
    """A JSONL file: local, gs:// or s3://, relative to the task file or the working
    directory."""
    if "://" in uri and not storage.is_remote(uri):
        raise TaskError(f"{where}: dataset_uri {uri!r}: only JSONL files (local, gs:// or "
                        "s3://) are read (no hub download here)")
    candidates = [uri] if storage.is_remote(uri) else [
        storage.join(storage.dirname(storage.abspath(task_file)), uri), uri]
    for candidate in candidates:
        if storage.isfile(candidate):
            return storage.abspath(candidate)
    raise TaskError(f"{where}: dataset_uri {uri!r} does not exist (looked next to the task "
                    "file and in the working directory)")


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------
def read_dataset(cfg: TaskConfig) -> list[tuple[int, dict]]:
    """(line number, row) for each JSON line, checked for the task type's fields (as read: see
    `strip_row`)."""
    rows = []
    want = FIELDS[cfg.icl_task_type]
    with storage.errors(cfg.dataset_uri, "reading"):
        text = storage.read_text(cfg.dataset_uri)
    # (split at newlines only: str.splitlines also splits at U+2028 and others, which JSON
    # strings may hold unescaped)
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{cfg.dataset_uri}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise TaskError(f"{where}: expected a JSON object")
        for key, typ in want.items():
            if key not in row:
                raise TaskError(f"{where}: missing field {key!r} ({cfg.icl_task_type} "
                                f"needs {', '.join(want)})")
            if not isinstance(row[key], typ) or isinstance(row[key], bool):
                raise TaskError(f"{where}: field {key!r} must be a {typ.__name__}, got "
                                f"{type(row[key]).__name__}")
        _check_row(cfg, row, where)
        rows.append((line_no, row))
    if not rows:
        raise TaskError(f"{cfg.dataset_uri}: empty dataset (task {cfg.label!r})")
    return rows


def _check_row(cfg: TaskConfig, row: dict, where: str) -> None:
    options = {"multiple_choice": "choices", "schema": "context_options"}.get(cfg.icl_task_type)
    if options is not None:
        n = len(row[options])
        if n == 0 or any(not isinstance(c, str) for c in row[options]):
            raise TaskError(f"{where}: {options!r} must be a non-empty list of strings")
        if not 0 <= row["gold"] < n:
            raise TaskError(f"{where}: gold index {row['gold']} is out of range for {n} "
                            f"{options}")
    if cfg.icl_task_type == "generation_task_with_answers":
        aliases = row.get("aliases", [])
        if not isinstance(aliases, list) or any(not isinstance(a, str) for a in aliases):
            raise TaskError(f"{where}: 'aliases' must be a list of strings")
        if not isinstance(row.get("chain_of_thought", ""), str):
            raise TaskError(f"{where}: 'chain_of_thought' must be a string")
    if cfg.has_categories and not isinstance(row.get("category"), str):
        raise TaskError(f"{where}: has_categories is set but the row has no string 'category'")


def strip_row(row: dict) -> dict:
    """utils.py strip_data: top-level strings stripped (lists, e.g. choices, are not)."""
    return {k: v.strip() if isinstance(v, str) else v for k, v in row.items()}


# ---------------------------------------------------------------------------------------------
# Prompts (llmfoundry/eval/datasets/in_context_learning_evaluation.py)
# ---------------------------------------------------------------------------------------------
def fewshot_indices(n: int, k: int, example: int, rng: random.Random) -> set[int]:
    """utils.py get_fewshot_sample_idxs: k distinct indices of n, never `example`, drawn from
    `rng` exactly as llm-foundry draws them (the set's iteration order is the prompt order)."""
    k = min(n - 1, k)
    chosen = set(rng.sample(range(0, n), k))
    if example in chosen:
        chosen.remove(example)
        if len(chosen) >= n - 1:
            return chosen
        extra = rng.choice(range(0, n))
        while extra in chosen or extra == example:
            extra = rng.choice(range(0, n))
        chosen.add(extra)
    return chosen


class _Prompter:
    """The text and tokens of one task's examples (one class for the four task types; each
    method names the llm-foundry method it follows)."""

    def __init__(self, cfg: TaskConfig, tokenizer: tokenizers.Tokenizer, eos_id: int | None,
                 raw_rows: list[dict]):
        self.cfg, self.tok, self.eos_id = cfg, tokenizer, eos_id
        # llm-foundry reads the generation answers (the aliases set, the longest answer)
        # before it strips the dataset, and everything else after
        self.raw_rows = raw_rows
        self.rows = [strip_row(r) for r in raw_rows] if cfg.strip_dataset else raw_rows
        # utils.py tokenizer_needs_prefix_space
        self.prefix_space = len(tokenizer.encode(" a", add_special_tokens=False).ids) == 1
        # GenerationTaskWithAnswers.read_dataset: has_cot when the column exists
        self.has_cot = any("chain_of_thought" in r for r in raw_rows)
        self.context_key = "query" if cfg.icl_task_type == "multiple_choice" else "context"

    def encode(self, text: str, special: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=special).ids

    def _spaced(self, text: str) -> str:
        return f" {text}" if self.prefix_space and not text.startswith(" ") else text

    def answer(self, row: dict, in_context: bool) -> str:
        """get_answer_from_example of each dataset class."""
        kind = self.cfg.icl_task_type
        if kind == "multiple_choice":
            return row["choices"][row["gold"]]
        if kind == "generation_task_with_answers":
            if self.has_cot:
                return f"{row.get('chain_of_thought', '')}{self.cfg.cot_delimiter}{row['answer']}"
            return row["answer"]
        cont = row["continuation"]  # the base class (language modeling)
        return cont if in_context else self._spaced(cont)

    def context(self, row: dict, preceding: str, add_answer: bool) -> str:
        """construct_context (InContextLearningDataset; the schema class overrides it: the gold
        context option, then the continuation, whatever add_answer says)."""
        c = self.cfg
        if c.icl_task_type == "schema":
            text = row["context_options"][row["gold"]]
            if preceding:
                text = f"{c.example_delimiter}{text}"
            return f"{c.prelimiter}{text}{c.continuation_delimiter}{row['continuation']}"
        text = f"{c.prelimiter}{row[self.context_key]}"
        if preceding:
            text = f"{c.example_delimiter}{text}"
        text = f"{text}{c.continuation_delimiter}"
        return f"{text}{self.answer(row, in_context=True)}" if add_answer else text

    def preamble_text(self, index: int, k: int, rng: random.Random) -> str:
        """_generate_few_shot_prompt: prompt_string, then k solved examples."""
        text = self.cfg.prompt_string
        if k > 0:
            for j in fewshot_indices(len(self.rows), k, index, rng):
                text += self.context(self.rows[j], text, add_answer=True)
        return text

    def preamble_ids(self, text: str) -> list[int]:
        """Tokenized with special tokens, then _fix_eos_on_preamble."""
        ids = self.encode(text, special=True)
        if self.eos_id is not None and len(ids) > 1 and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return ids

    def own_context_ids(self, row: dict, preamble: str) -> list[int]:
        """tokenize_example: the example's context, rstripped when strip_dataset."""
        text = self.context(row, preamble, add_answer=False)
        if self.cfg.strip_dataset:
            text = text.rstrip()
        return self.encode(text, special=False)

    def schema_contexts(self, row: dict, preamble: str) -> list[str]:
        """SchemaTaskDataset._construct_multiple_contexts (with a preamble, the continuation
        delimiter, rstripped, follows each option; without one, nothing does)."""
        c = self.cfg
        if preamble:
            delim = (c.continuation_delimiter.rstrip() if c.strip_dataset
                     else c.continuation_delimiter)
            return [f"{c.prelimiter}{c.example_delimiter}{o}{delim}"
                    for o in row["context_options"]]
        return [f"{c.prelimiter}{o}" for o in row["context_options"]]

    def example(self, index: int, line: int, k: int, rng: random.Random) -> Example:
        row = self.rows[index]
        text = self.preamble_text(index, k, rng)
        pre = self.preamble_ids(text)
        kind = self.cfg.icl_task_type
        if kind == "language_modeling":
            ctx = pre + self.own_context_ids(row, text)
            cont = self.encode(self.answer(row, in_context=False), special=False)
            return Example(index, line, [Request(tuple(ctx), tuple(cont))])
        if kind == "multiple_choice":
            ctx = tuple(pre + self.own_context_ids(row, text))
            reqs = [Request(ctx, tuple(self.encode(self._spaced(choice), special=False)))
                    for choice in row["choices"]]
            return Example(index, line, reqs, gold=row["gold"])
        if kind == "schema":
            cont = tuple(self.encode(self._spaced(row["continuation"]), special=False))
            reqs = [Request(tuple(pre + self.encode(option, special=False)), cont)
                    for option in self.schema_contexts(row, text)]
            return Example(index, line, reqs, gold=row["gold"])
        prompt = tuple(pre + self.own_context_ids(row, text))
        raw = self.raw_rows[index]
        answers = tuple(sorted({raw["answer"], *raw.get("aliases", [])}))
        return Example(index, line, [], prompt=prompt, answers=answers)

    def max_answer_tokens(self) -> int:
        """GenerationTaskWithAnswers._get_max_answer_length (+10 with a cot_delimiter)."""
        longest = 0
        for row in self.raw_rows:
            for answer in [row["answer"], *row.get("aliases", [])]:
                text = (f"{row.get('chain_of_thought', '')}{self.cfg.cot_delimiter}{answer}"
                        if self.has_cot else answer)
                longest = max(longest, len(self.encode(text, special=True)))
        return longest + (_COT_ANSWER_BUFFER if self.cfg.cot_delimiter else 0)


def prepare_task(cfg: TaskConfig, tokenizer: tokenizers.Tokenizer, *, eos_id: int | None,
                 max_seq_len: int) -> list[PreparedTask]:
    """Every (num_fewshot[, category]) dataset of one task, tokenized. max_seq_len: the
    longest context + continuation (prompt + generated tokens) allowed, unless the task sets
    its own; an example past it is a TaskError naming it."""
    limit = cfg.max_seq_len or max_seq_len
    rows = read_dataset(cfg)
    if cfg.has_categories:
        # partition_dataset_by_category: one dataset per category, sorted by name
        splits = {}
        for line, row in rows:
            splits.setdefault(row["category"], []).append((line, row))
        parts = [(name, splits[name]) for name in sorted(splits)]
    else:
        parts = [(None, rows)]
    out = []
    for k in cfg.num_fewshot:
        for category, part in parts:
            prompter = _Prompter(cfg, tokenizer, eos_id, [row for _, row in part])
            rng = random.Random(cfg.fewshot_random_seed)
            examples = [prompter.example(i, line, k, rng) for i, (line, _) in enumerate(part)]
            task = PreparedTask(cfg, k, category, examples)
            if cfg.icl_task_type == "generation_task_with_answers":
                task.max_new_tokens = cfg.max_new_tokens or max(prompter.max_answer_tokens(), 1)
            _check_lengths(task, limit)
            out.append(task)
    return out


def _check_lengths(task: PreparedTask, limit: int) -> None:
    for ex in task.examples:
        where = (f"{task.config.source}: task {task.name!r}: example {ex.index} "
                 f"({task.config.dataset_uri}:{ex.line})")
        empty = (not ex.prompt if task.config.icl_task_type == "generation_task_with_answers"
                 else any(not r.context or not r.continuation for r in ex.requests))
        if empty:  # nothing to condition on (or to score): the model needs a first token
            raise TaskError(f"{where}: its prompt, context or continuation is empty (0 tokens)")
        if task.config.icl_task_type == "generation_task_with_answers":
            need, what = len(ex.prompt) + task.max_new_tokens, (
                f"prompt ({len(ex.prompt)}) + max_new_tokens ({task.max_new_tokens})")
        else:
            need = max(len(r.context) + len(r.continuation) for r in ex.requests)
            what = "context + continuation"
        if need > limit:
            raise TaskError(
                f"{where}: {what} is {need} tokens, more than "
                f"max_seq_len {limit} (fewer shots, or a larger max_seq_len where ALiBi can "
                "extrapolate)")


def prepare_tasks(task_files: Sequence[str], tokenizer: tokenizers.Tokenizer, *,
                  eos_id: int | None, max_seq_len: int) -> list[PreparedTask]:
    """Every task of every file, tokenized (see prepare_task)."""
    configs = [cfg for path in task_files for cfg in load_task_file(path)]
    names = [c.label for c in configs]
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        raise TaskError(f"task label {dup[0]!r} appears in more than one task file")
    return [t for cfg in configs
            for t in prepare_task(cfg, tokenizer, eos_id=eos_id, max_seq_len=max_seq_len)]
