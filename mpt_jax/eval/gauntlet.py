"""llm-foundry's eval gauntlet: benchmark scores -> category scores -> named averages.

The arithmetic of llmfoundry/callbacks/eval_gauntlet_callback.py (EvalGauntlet), from a file
like scripts/eval/yamls/eval_gauntlet_v0.3.yaml (a top-level `eval_gauntlet:` mapping, or the
mapping itself):

  weighting                 EQUAL (1 per benchmark), SAMPLE_SZ (its example count) or
                            LOG_SAMPLE_SZ (max(log2(count), 1)); counts include categories
  subtract_random_baseline  score - random_baseline
  rescale_accuracy          ... / (1 - random_baseline) (needs subtract_random_baseline)
  categories                [{name, benchmarks: [{name, num_fewshot, random_baseline}]}]; a
                            benchmark's score is its `label/N-shot` accuracy (categories
                            averaged); a category's score is the weighted mean of its
                            benchmarks'. A category with a missing benchmark is dropped (with a
                            warning), as llm-foundry drops it.
  averages                  {name: [categories]}: the plain mean of the categories present (0
                            when none is); default: one `default_average` of every category.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

from mpt_jax import storage

WEIGHTINGS = ("EQUAL", "SAMPLE_SZ", "LOG_SAMPLE_SZ")


class GauntletError(ValueError):
    """A gauntlet file that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    num_fewshot: int
    random_baseline: float

    @property
    def key(self) -> str:
        return f"{self.name}/{self.num_fewshot}-shot"


@dataclasses.dataclass(frozen=True)
class Gauntlet:
    categories: tuple[tuple[str, tuple[Benchmark, ...]], ...]
    averages: tuple[tuple[str, tuple[str, ...]], ...]
    weighting: str = "EQUAL"
    subtract_random_baseline: bool = True
    rescale_accuracy: bool = True

    @classmethod
    def from_dict(cls, d: Any, where: str = "eval_gauntlet") -> "Gauntlet":
        if isinstance(d, dict) and "eval_gauntlet" in d:
            d = d["eval_gauntlet"]
        if not isinstance(d, dict):
            raise GauntletError(f"{where}: expected an `eval_gauntlet:` mapping")
        unknown = sorted(set(d) - {"weighting", "subtract_random_baseline", "rescale_accuracy",
                                   "categories", "averages"})
        if unknown:
            raise GauntletError(f"{where}: unknown key {unknown[0]!r}")
        weighting = d.get("weighting", "EQUAL")
        if weighting not in WEIGHTINGS:
            raise GauntletError(f"{where}: weighting {weighting!r}; expected one of "
                                + ", ".join(WEIGHTINGS))
        subtract = d.get("subtract_random_baseline", True)
        rescale = d.get("rescale_accuracy", True)
        if not isinstance(subtract, bool) or not isinstance(rescale, bool):
            raise GauntletError(f"{where}: subtract_random_baseline and rescale_accuracy must "
                                "be true or false")
        if rescale and not subtract:
            raise GauntletError(f"{where}: rescale_accuracy needs subtract_random_baseline "
                                "(as in llm-foundry)")
        cats = d.get("categories")
        if not isinstance(cats, list) or not cats:
            raise GauntletError(f"{where}: `categories` must be a non-empty list")
        categories = []
        for i, cat in enumerate(cats):
            if not isinstance(cat, dict) or not isinstance(cat.get("name"), str):
                raise GauntletError(f"{where}: categories[{i}] needs a `name`")
            benches = cat.get("benchmarks")
            if not isinstance(benches, list) or not benches:
                raise GauntletError(f"{where}: category {cat['name']!r} needs a non-empty "
                                    "`benchmarks` list")
            out = []
            for b in benches:
                if (not isinstance(b, dict) or not isinstance(b.get("name"), str)
                        or not isinstance(b.get("num_fewshot"), int)
                        or not isinstance(b.get("random_baseline"), (int, float))
                        or isinstance(b.get("random_baseline"), bool)):
                    raise GauntletError(f"{where}: category {cat['name']!r}: each benchmark "
                                        f"needs name, num_fewshot and random_baseline; got {b!r}")
                if rescale and b["random_baseline"] >= 1:
                    raise GauntletError(f"{where}: benchmark {b['name']!r}: random_baseline "
                                        f"{b['random_baseline']} leaves nothing to rescale")
                out.append(Benchmark(b["name"], b["num_fewshot"], float(b["random_baseline"])))
            categories.append((cat["name"], tuple(out)))
        names = [c for c, _ in categories]
        avgs = d.get("averages")
        if avgs is None:
            averages = (("default_average", tuple(names)),)
        else:
            if not isinstance(avgs, dict) or any(not isinstance(v, list) for v in avgs.values()):
                raise GauntletError(f"{where}: `averages` must map names to category lists")
            clash = sorted(set(avgs) & set(names))
            if clash:
                raise GauntletError(f"{where}: average name {clash[0]!r} is also a category "
                                    "name")
            averages = tuple((k, tuple(v)) for k, v in avgs.items())
        return cls(tuple(categories), averages, weighting, subtract, rescale)

    @classmethod
    def from_file(cls, path: str) -> "Gauntlet":
        import yaml

        if not storage.isfile(path):
            raise GauntletError(f"{path}: no such gauntlet file")
        try:
            doc = yaml.safe_load(storage.read_text(path))
        except yaml.YAMLError as e:
            raise GauntletError(f"{path}: not valid YAML: {e}".splitlines()[0]) from None
        return cls.from_dict(doc, where=path)

    def taxonomy(self) -> dict[str, str]:
        """benchmark name -> its category (for the results table)."""
        return {b.name: cat for cat, benches in self.categories for b in benches}

    def _weight(self, bench: Benchmark, sizes: dict[str, int]) -> float:
        if self.weighting == "EQUAL":
            return 1.0
        n = max(sum(c for name, c in sizes.items() if name.startswith(bench.key)), 1)
        return float(n) if self.weighting == "SAMPLE_SZ" else max(math.log2(n), 1.0)

    def score(self, scores: dict[str, float], sizes: dict[str, int] | None = None,
              warn=None) -> dict[str, float]:
        """{category or average name: score} from {`label/N-shot`: accuracy} (and example
        counts for the SAMPLE_SZ weightings)."""
        if self.weighting != "EQUAL" and sizes is None:
            raise GauntletError(f"weighting {self.weighting} needs the benchmark sizes")
        warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
        out: dict[str, float] = {}
        for cat, benches in self.categories:
            missing = [b.key for b in benches if b.key not in scores]
            if missing:
                warn(f"gauntlet category {cat!r} dropped: no results for {', '.join(missing)}")
                continue
            parts = []
            for b in benches:
                s = scores[b.key]
                if self.subtract_random_baseline:
                    s -= b.random_baseline
                if self.rescale_accuracy:
                    s /= 1.0 - b.random_baseline
                parts.append((s, self._weight(b, sizes or {})))
            total = sum(w for _, w in parts)
            out[cat] = sum(s * (w / total) for s, w in parts)
        categories = dict(out)  # averages are over categories only, never over averages
        for name, members in self.averages:
            present = [categories[c] for c in members if c in categories]
            out[name] = sum(present) / len(present) if present else 0.0
        return out
