"""Evaluation speed on MPT-7B shapes with random bf16 weights (GPU): `eval.py icl`'s code path,
our lm-eval backend under lm-eval, lm-eval's own `hf` backend, and perplexity at 65536 tokens.

    python bench/eval.py [--sections icl,harness,floor,hf,ppl] [--examples 2000]
        [--lm_examples 2000] [--tokenizer PATH] [--batch_tokens 32768] [--hf_batch 32]
        [--ppl_len 65536] [--size 7b]
        [--results bench/RESULTS.md --card H200 --commit abc1234]

Each section runs alone in a subprocess (its own peak memory; an OOM loses only that section):
  icl      mpt_jax.eval.icl.run_tasks on llm-foundry-format task files: a 10-shot multiple-choice
           task (4 choices) of --examples questions and a 0-shot language-modeling task of
           --lm_examples; run twice, the second run timed (the first compiles)
  harness  our `mpt_jax` lm-eval model under lm_eval.simple_evaluate on the same documents as
           lm-eval tasks (10-shot multiple choice, 0-shot loglikelihood); twice, the second timed
           under harness.compiled_templates, as `eval.py harness` runs lm-eval
  floor    lm-eval's own time on those tasks: a model that answers every request at once, under
           lm-eval as shipped (no backend there can be faster; hf's time over it bounds the
           speedup), and with our backend's tokenization under compiled templates (our bound)
  hf       lm-eval's `hf` model (transformers' MptForCausalLM, bf16, random weights made on the
           GPU) on the same lm-eval tasks, batch --hf_batch; after one untimed run, once each
           under lm-eval as shipped and under compiled templates
  ppl      perplexity of one window of --ppl_len tokens (the scoring core's flat path, as
           `eval.py perplexity` runs it): seconds (second call) and peak device memory
The lm-eval sections share lm-eval's requests exactly; the icl section builds its prompts as
llm-foundry does (same documents and shot count, its own few-shot draw and delimiters), so its
tokens per example are printed beside its examples/s. The documents are synthetic sentences of
a fixed word list; the tokenizer is --tokenizer (a tokenizer.json, e.g. GPT-NeoX-20B's), else a
4096-token byte-level BPE trained here on those sentences (every word then one token, so every
example has the same length: few shapes to compile).

Wheels the GPU host needs for the lm-eval sections (Python 3.12, manylinux x86_64), beyond the
torch, transformers, numpy, pyarrow, fsspec, aiohttp, sacrebleu, pyyaml, tqdm, jinja2, scipy,
absl-py and huggingface_hub it has:
  lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19
  xxhash==4.1.0 pandas==3.1.1 python-dateutil==2.9.0.post0 pytz==2026.6 six==1.17.0
  pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1
  tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 nltk==3.10.4
  click==8.5.1 joblib==1.6.0 cloudpickle==3.1.3 defusedxml==0.7.1 scikit-learn==1.9.1
  threadpoolctl==3.8.0 narwhals==2.29.0 more-itertools==11.2.1
  (where absent: setuptools requests==2.34.2 urllib3==2.8.0 certifi==2026.10.19.post1
  charset-normalizer==3.5.3 idna==3.20)
  for the hf section also accelerate==1.15.0 psutil==7.2.2
  and three pure-Python packages published only as sources, built into wheels first:
  `pip wheel --no-deps rouge-score==0.1.2 sqlitedict==2.1.0 word2number==1.1`.
Install them all with `pip install --no-deps *.whl`. Checked: in a fresh Python 3.12 venv holding
only the host packages named above and these, `pip check` is clean and lm_eval.simple_evaluate
runs a local multiple-choice task (without torch or transformers imported).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

WORDS = ("the a of and to in is was for on with as by at from his her they this that which "
         "river stone cat dog tree house city king queen war peace sun moon star sea ship road "
         "red blue green old new big small first last long short early late high low good bad "
         "ran sat saw took gave made found said came went built held kept left told wrote "
         "because while after before when where then there here every many few some no").split()
N_CHOICES = 4
QUERY_WORDS, CHOICE_WORDS, LM_CONTEXT_WORDS = 40, 12, 80
MAX_LENGTH = 2048


# ---------------------------------------------------------------------------------------------
# Work directory: tokenizer, documents, task files
# ---------------------------------------------------------------------------------------------
def _sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_workdir(path: str, examples: int, lm_examples: int, tokenizer: str | None) -> None:
    from mpt_jax.data.tokenizer import ENDOFTEXT, load_tokenizer, train_byte_level_bpe

    rng = random.Random(0)
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    else:
        tok = train_byte_level_bpe([_sentence(rng, 50) for _ in range(2000)], 4096)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": ENDOFTEXT,
                   "bos_token": ENDOFTEXT, "model_max_length": MAX_LENGTH}, fh)
    with open(os.path.join(path, "mc.jsonl"), "w") as fh:
        for _ in range(examples):
            fh.write(json.dumps({"query": _sentence(rng, QUERY_WORDS),
                                 "choices": [_sentence(rng, CHOICE_WORDS)
                                             for _ in range(N_CHOICES)],
                                 "gold": rng.randrange(N_CHOICES)}) + "\n")
    with open(os.path.join(path, "lm.jsonl"), "w") as fh:
        for _ in range(lm_examples):
            fh.write(json.dumps({"context": _sentence(rng, LM_CONTEXT_WORDS),
                                 "continuation": _sentence(rng, 1)}) + "\n")
    with open(os.path.join(path, "foundry_mc.yaml"), "w") as fh:
        fh.write("icl_tasks:\n- {label: bench_mc, dataset_uri: mc.jsonl, icl_task_type: "
                 "multiple_choice, num_fewshot: [10], continuation_delimiter: \"\\nAnswer: \"}\n")
    with open(os.path.join(path, "foundry_lm.yaml"), "w") as fh:
        fh.write("icl_tasks:\n- {label: bench_lm, dataset_uri: lm.jsonl, icl_task_type: "
                 "language_modeling, num_fewshot: [0]}\n")
    os.makedirs(os.path.join(path, "lm_eval_tasks"), exist_ok=True)
    common = ("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
              "test_split: test\n")
    with open(os.path.join(path, "lm_eval_tasks", "bench_mc.yaml"), "w") as fh:
        fh.write("task: bench_mc\n" + common.format(data=os.path.join(path, "mc.jsonl"))
                 + "fewshot_split: test\noutput_type: multiple_choice\n"
                 "doc_to_text: \"{{query}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\n"
                 "doc_to_target: gold\nnum_fewshot: 10\nmetric_list:\n  - metric: acc\n")
    with open(os.path.join(path, "lm_eval_tasks", "bench_lm.yaml"), "w") as fh:
        fh.write("task: bench_lm\n" + common.format(data=os.path.join(path, "lm.jsonl"))
                 + "output_type: loglikelihood\ndoc_to_text: \"{{context}}\"\n"
                 "doc_to_target: \" {{continuation}}\"\nmetric_list:\n  - metric: acc\n")


# ---------------------------------------------------------------------------------------------
# Sections (each in its own process)
# ---------------------------------------------------------------------------------------------
def _config(size: str):
    from mpt_jax.model.config import MPTConfig

    return MPTConfig.mpt_7b() if size == "7b" else MPTConfig.preset(size)


def _our_model(size: str):
    import jax
    from flax import nnx

    from generate import random_bf16_model

    model = random_bf16_model(_config(size), "auto")
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    return model


def _jax_device() -> dict:
    import jax

    dev = jax.local_devices()[0]
    stats = dev.memory_stats() or {}
    return {"peak_gb": stats.get("peak_bytes_in_use", 0) / 2**30, "device": dev.device_kind}


def _eos(tok) -> int:
    from mpt_jax.data.tokenizer import ENDOFTEXT

    return tok.token_to_id(ENDOFTEXT)


def section_icl(w: str, args) -> dict:
    from mpt_jax.data.tokenizer import load_tokenizer
    from mpt_jax.eval import icl, tasks
    from mpt_jax.eval.scoring import parse_mesh

    model, tok, mesh = _our_model(args.size), load_tokenizer(w), parse_mesh(None)
    out = {}
    for name, n in (("mc", args.examples), ("lm", args.lm_examples)):
        prepared = tasks.prepare_tasks([os.path.join(w, f"foundry_{name}.yaml")], tok,
                                       eos_id=_eos(tok), max_seq_len=MAX_LENGTH)
        reqs = [r for t in prepared for ex in t.examples for r in ex.requests]
        n_tok = sum(len(r.context) + len(r.continuation) for r in reqs)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            icl.run_tasks(model, prepared, tok, eos_id=_eos(tok), mesh=mesh,
                          batch_tokens=args.batch_tokens, progress=False)
            times.append(time.perf_counter() - t0)
        out[name] = {"examples": n, "first_s": times[0], "s": times[1],
                     "examples_per_s": n / times[1], "tokens_per_example": n_tok / n}
    return {**out, **_jax_device()}


def _lm_eval_run(lm, w: str, task: str, compiled: bool = False) -> float:
    """Seconds of lm_eval.simple_evaluate on `task`; `compiled`: under our harness's
    compiled_templates (as `eval.py harness` runs lm-eval), else lm-eval as shipped."""
    import contextlib

    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=os.path.join(w, "lm_eval_tasks"), include_defaults=False)
    from mpt_jax.eval.harness import compiled_templates

    with compiled_templates() if compiled else contextlib.nullcontext():
        t0 = time.perf_counter()
        lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager,
                                log_samples=False, bootstrap_iters=0)
        return time.perf_counter() - t0


def section_harness(w: str, args) -> dict:
    from mpt_jax.data.tokenizer import load_tokenizer
    from mpt_jax.eval.harness import MPTJaxLM

    lm = MPTJaxLM(_our_model(args.size), tokenizer=load_tokenizer(w),
                  batch_tokens=args.batch_tokens, max_length=MAX_LENGTH, progress=False)
    out = {}
    for name, n in (("mc", args.examples), ("lm", args.lm_examples)):
        times = [_lm_eval_run(lm, w, f"bench_{name}", compiled=True) for _ in range(2)]
        out[name] = {"examples": n, "first_s": times[0], "s": times[1],
                     "examples_per_s": n / times[1]}
    return {**out, **_jax_device()}


def section_floor(w: str, args) -> dict:
    """lm-eval's own time on the same tasks: models that answer every request at once.
    "plain": lm-eval as shipped, TemplateLM's tokenization (one encode per string): no backend
    under plain lm-eval can take less, so hf's time over it bounds any backend's speedup.
    "ours": as `eval.py harness` runs it, our backend's batched tokenization under compiled
    templates: the least our backend can take, the bound on its own speedup."""
    from lm_eval.api.model import TemplateLM

    from mpt_jax.data.tokenizer import load_tokenizer
    from mpt_jax.eval.harness import MPTJaxLM

    tok = load_tokenizer(w)
    eos = _eos(tok)

    class Instant(TemplateLM):
        tokenizer = tok

        @property
        def eot_token_id(self):
            return eos

        @property
        def prefix_token_id(self):
            return eos

        def tok_encode(self, string, **kwargs):
            return tok.encode(string, add_special_tokens=False).ids

        def tok_decode(self, tokens, skip_special_tokens=True):
            return tok.decode(list(tokens), skip_special_tokens=skip_special_tokens)

        def _loglikelihood_tokens(self, requests, **kwargs):
            return [(-float(len(cont)), False) for _, _, cont in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return [-1.0 for _ in requests]

        def generate_until(self, requests, disable_tqdm=False):
            return ["" for _ in requests]

    class InstantOurs(Instant):
        loglikelihood = MPTJaxLM.loglikelihood
        _encode_many = MPTJaxLM._encode_many
        _prefix_text = MPTJaxLM._prefix_text

    out = {}
    for kind, lm, compiled in (("plain", Instant(), False), ("ours", InstantOurs(), True)):
        for name, n in (("mc", args.examples), ("lm", args.lm_examples)):
            times = [_lm_eval_run(lm, w, f"bench_{name}", compiled) for _ in range(2)]
            out.setdefault(kind, {})[name] = {"examples": n, "s": times[1],
                                              "examples_per_s": n / times[1]}
    return out


def section_hf(w: str, args) -> dict:
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM

    ours = _config(args.size)
    cfg = transformers.MptConfig(d_model=ours.d_model, n_heads=ours.n_heads,
                                 n_layers=ours.n_layers, expansion_ratio=ours.expansion_ratio,
                                 max_seq_len=MAX_LENGTH, vocab_size=ours.vocab_size, no_bias=True,
                                 attn_config={"alibi": True, "alibi_bias_max": 8})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):  # random weights made where they run, in bf16
        hf = transformers.MptForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(w)
    lm = HFLM(pretrained=hf, tokenizer=tok, batch_size=args.hf_batch, max_length=MAX_LENGTH)
    _lm_eval_run(lm, w, "bench_mc")  # untimed: the first call's warm-up (CUDA, the dataset)
    out = {}
    for kind, compiled in (("", False), ("compiled_", True)):  # as shipped; as ours runs
        for name, n in (("mc", args.examples), ("lm", args.lm_examples)):
            s = _lm_eval_run(lm, w, f"bench_{name}", compiled)
            out[kind + name] = {"examples": n, "s": s, "examples_per_s": n / s}
    cuda = device == "cuda"
    return {**out, "batch": args.hf_batch,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def section_ppl(w: str, args) -> dict:
    import numpy as np

    from mpt_jax.eval.scoring import Request, Scorer, parse_mesh

    model = _our_model(args.size)
    scorer = Scorer(model, mesh=parse_mesh(None), batch_tokens=args.batch_tokens,
                    progress=False)
    ids = np.random.RandomState(0).randint(0, model.config.vocab_size,
                                           args.ppl_len + 1).tolist()
    req = [Request(tuple(ids[:1]), tuple(ids[1:]))]
    times, loss = [], None
    for _ in range(2):
        t0 = time.perf_counter()
        (sc,) = scorer.score(req)
        times.append(time.perf_counter() - t0)
        loss = -sc.logprob / args.ppl_len
    return {"tokens": args.ppl_len, "first_s": times[0], "s": times[1],
            "tokens_per_s": args.ppl_len / times[1], "loss": loss, **_jax_device()}


SECTIONS = {"icl": section_icl, "harness": section_harness, "floor": section_floor,
            "hf": section_hf, "ppl": section_ppl}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def _rows(results: dict, args) -> list[tuple[str, str, str]]:
    rows = []
    shape = (f"MPT-{args.size} random bf16, 10-shot MC {args.examples} x {N_CHOICES} choices / "
             f"0-shot LM {args.lm_examples}")
    names = {"icl": "eval.py icl (native)", "harness": "eval.py harness (our lm-eval backend)",
             "hf": f"lm-eval hf backend (batch {args.hf_batch})"}
    for sec, label in names.items():
        r = results.get(sec)
        if not r or "error" in r:
            continue
        for task in ("mc", "lm"):
            rows.append((f"eval {label} {task} ({shape})", "examples/s",
                         f"{r[task]['examples_per_s']:.1f}"))
        rows.append((f"eval {label} ({shape})", "peak GiB", f"{r['peak_gb']:.1f}"))
    hf = results.get("hf")
    hf = hf if hf and "error" not in hf else None
    if hf:
        for task in ("mc", "lm"):
            rows.append((f"eval lm-eval hf backend (batch {args.hf_batch}) {task} under our "
                         f"compiled templates ({shape})", "examples/s",
                         f"{hf['compiled_' + task]['examples_per_s']:.1f}"))
            for sec in ("icl", "harness"):
                if sec in results and "error" not in results[sec]:
                    mine = results[sec][task]["s"]
                    x = f"{hf[task]['s'] / mine:.2f}x"
                    if sec == "harness":  # also against hf under the same lm-eval
                        x += f" / {hf['compiled_' + task]['s'] / mine:.2f}x"
                    rows.append((f"eval {names[sec]} {task} vs lm-eval hf ({shape})",
                                 "speedup" + (" (vs hf as shipped / vs hf under the same "
                                              "compiled templates)" if sec == "harness"
                                              else ""), x))
    r = results.get("floor")
    if r and "error" not in r:
        for task in ("mc", "lm"):
            for kind, label, bound in (
                    ("plain", "lm-eval's own time (an instant model, lm-eval as shipped)",
                     "the most any backend under lm-eval as shipped can be over hf"),
                    ("ours", "our backend's floor (an instant model with our tokenization, "
                     "compiled templates)", "the most our backend can be over hf as shipped")):
                rows.append((f"eval {label} {task} ({shape})", "examples/s",
                             f"{r[kind][task]['examples_per_s']:.1f}"))
                if hf:
                    rows.append((f"eval {label} {task} ({shape})", f"{bound} (hf s / this s)",
                                 f"{hf[task]['s'] / r[kind][task]['s']:.2f}x"))
    r = results.get("ppl")
    if r and "error" not in r:
        name = f"eval perplexity MPT-{args.size} random bf16, one {r['tokens']}-token window"
        rows += [(name, "seconds", f"{r['s']:.2f}"), (name, "tokens/s", f"{r['tokens_per_s']:.0f}"),
                 (name, "peak GiB", f"{r['peak_gb']:.1f}")]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default="icl,harness,floor,hf,ppl")
    ap.add_argument("--examples", type=int, default=2000, help="multiple-choice questions")
    ap.add_argument("--lm_examples", type=int, default=2000, help="language-modeling examples")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--batch_tokens", type=int, default=32768)
    ap.add_argument("--hf_batch", type=int, default=32)
    ap.add_argument("--ppl_len", type=int, default=65536)
    ap.add_argument("--size", default="7b", help="7b (MPT-7B as released) or an MPTConfig "
                    "preset (125m, ...: smoke runs)")
    ap.add_argument("--results", default="")
    ap.add_argument("--card", default="")
    ap.add_argument("--commit", default="")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(SECTIONS[args.one](args.workdir, args)), flush=True)
        return 0
    sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        print(f"bench/eval.py: unknown section {bad[0]!r}; expected {list(SECTIONS)}",
              file=sys.stderr)
        return 1
    results = {}
    with tempfile.TemporaryDirectory() as w:
        make_workdir(w, args.examples, args.lm_examples, args.tokenizer)
        for sec in sections:
            cmd = [sys.executable, __file__, "--one", sec, "--workdir", w,
                   "--examples", str(args.examples), "--lm_examples", str(args.lm_examples),
                   "--batch_tokens", str(args.batch_tokens), "--hf_batch", str(args.hf_batch),
                   "--ppl_len", str(args.ppl_len), "--size", args.size]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not lines:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
                results[sec] = {"error": err}
                print(f"{sec}: FAILED ({err})", flush=True)
                continue
            results[sec] = json.loads(lines[-1][7:])
            print(f"{sec} ({time.perf_counter() - t0:.0f}s): {json.dumps(results[sec])}",
                  flush=True)
    card = args.card or next((r["device"] for r in results.values() if "device" in r), "?")
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                           capture_output=True, text=True).stdout.strip()
    rows = _rows(results, args)
    print("| bench | figure | value |\n|---|---|---|")
    for name, fig, val in rows:
        print(f"| {name} | {fig} | {val} |")
    if args.results and rows:
        date = datetime.date.today().isoformat()
        with open(args.results, "a") as fh:
            for name, fig, val in rows:
                fh.write(f"| {date} | {name} | {fig} | {val} | {card} | {commit} |\n")
        print(f"appended {len(rows)} rows to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
