"""lm-evaluation-harness backend: our model as lm-eval's `mpt_jax` model.

    import mpt_jax.eval.harness        # registers "mpt_jax" with lm-eval
    lm_eval.simple_evaluate(model="mpt_jax", model_args="pretrained=PATH,dtype=bfloat16",
                            tasks=["hellaswag"], batch_size=16)
    python -m mpt_jax.eval.harness --model mpt_jax --model_args pretrained=PATH --tasks ...
                                       # lm-eval's own command line, our model registered
    python eval.py harness --checkpoint PATH --tasks hellaswag [...]

model_args: pretrained (a checkpoint path as `load_pretrained` takes, or an MPTForCausalLM),
tokenizer (a path, or a tokenizers.Tokenizer; default the checkpoint's), dtype (bfloat16),
batch_size (an int: batches of batch_size x max_length tokens, and batch_size prompts when
generating; "auto": 32768 tokens and 16 prompts), max_length (config.max_seq_len), max_gen_toks
(256), batch_tokens (overrides the batch_size token count), mesh ("data,fsdp,tensor" sizes, one
may be -1; default every device data-parallel), prefix_token_id (default BOS, else EOS, as HF's),
min_bucket (16: the shortest padded row), progress (true: tqdm bars).

The requests are lm-eval's, scored as lm-eval's `hf` model (lm_eval/models/huggingface.py HFLM)
scores them, on the scoring core (mpt_jax/eval/scoring.py):
  loglikelihood          TemplateLM's tokenization (context and continuation encoded together,
                         trailing context spaces moved to the continuation); the row cut from
                         the left to max_length + 1 tokens as HFLM._loglikelihood_tokens cuts it;
                         returns (summed log-probability, continuation is greedy). Requests that
                         share a context (a question's choices) share its forward pass.
  loglikelihood_rolling  lm-eval's rolling windows (utils.get_rolling_token_windows +
                         make_disjoint_window, EOS/BOS prefix, context_len 1, at max_length),
                         summed per document.
  generate_until         lm-eval's generation kwargs (until + EOS, max_gen_toks; do_sample with
                         temperature / top_k / top_p), the context cut from the left to
                         max_length - max_gen_toks, greedy or sampled on our Generator, the text
                         cut at the first stop sequence.
Every process of a multi-host run evaluates every request in lock step (the mesh splits each
batch) and presents itself to lm-eval as rank 0 of 1; only process 0 should write results.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence

import lm_eval.utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from mpt_jax.eval.generation import Completer
from mpt_jax.eval.scoring import DEFAULT_BATCH_TOKENS, Request, Scorer, parse_mesh
from mpt_jax.model import MPTForCausalLM

log = logging.getLogger("mpt_jax.eval.harness")
NAME = "mpt_jax"
_DEFAULT_GENERATION_BATCH = 16


def _adds_special_tokens(text: str, prefix: str) -> bool:
    """tok_encode's default: the tokenizer's special tokens, unless `text` already starts with
    the prefix token's text."""
    return not (prefix and text.startswith(prefix))


class MPTJaxLM(TemplateLM):
    """lm-eval's LM interface on an MPTForCausalLM (see the module docstring)."""

    def __init__(self, pretrained=None, tokenizer=None, dtype: str = "bfloat16",
                 batch_size=None, max_length: int | None = None, max_gen_toks: int = 256,
                 batch_tokens: int | None = None, mesh=None, prefix_token_id: int | None = None,
                 max_batch_size=None, device=None, progress: bool = True, min_bucket: int = 16,
                 **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"mpt_jax: unknown model_args {sorted(unknown)}; known: pretrained, "
                             "tokenizer, dtype, batch_size, max_length, max_gen_toks, "
                             "batch_tokens, mesh, prefix_token_id, min_bucket, progress")
        if pretrained is None:
            raise ValueError("mpt_jax: model_args needs pretrained=PATH")
        if device not in (None, "", "cpu", "cuda", "cuda:0"):
            log.warning("mpt_jax: device=%r ignored: JAX places the model on the mesh", device)
        del max_batch_size  # lm-eval's auto batch search; batches here are sized in tokens
        if isinstance(pretrained, MPTForCausalLM):
            if tokenizer is None or isinstance(tokenizer, str):
                raise ValueError("mpt_jax: a model object needs tokenizer= (a "
                                 "tokenizers.Tokenizer)")
            from mpt_jax.eval.loading import special_ids

            self.model, self.tokenizer = pretrained, tokenizer
            self._eos, self._bos = special_ids(tokenizer, None, pretrained.config)
            self._name = "model"
        else:
            from mpt_jax.eval.loading import load

            loaded = load(str(pretrained), tokenizer=tokenizer, dtype=dtype)
            self.model, self.tokenizer = loaded.model, loaded.tokenizer
            self._eos, self._bos = loaded.eos_id, loaded.bos_id
            self._name = os.path.basename(os.path.normpath(str(pretrained)))
        if self._eos is None:
            raise ValueError("mpt_jax: the tokenizer has no EOS token (<|endoftext|> or "
                             "tokenizer_config.json's eos_token); lm-eval needs one")
        self._prefix = prefix_token_id
        self._max_length = int(max_length or self.model.config.max_seq_len)
        self._max_gen_toks = int(max_gen_toks)
        auto = batch_size in (None, "auto") or (isinstance(batch_size, str)
                                                and batch_size.startswith("auto"))
        if not auto:
            try:
                batch_size = int(batch_size)
            except (TypeError, ValueError):
                raise ValueError(f"mpt_jax: batch_size {batch_size!r}: expected an int or "
                                 "'auto'") from None
        self._batch_size = _DEFAULT_GENERATION_BATCH if auto else batch_size
        tokens = batch_tokens or (DEFAULT_BATCH_TOKENS if auto
                                  else batch_size * self._max_length)
        self.mesh = parse_mesh(mesh)
        self.progress = progress
        self.scorer = Scorer(self.model, mesh=self.mesh, batch_tokens=int(tokens),
                             min_bucket=min_bucket, progress=progress)
        self.min_bucket = min_bucket
        self._completer = None

    # -- lm-eval's properties --------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def prefix_token_id(self) -> int:
        if self._prefix is not None:
            return self._prefix
        return self._bos if self._bos is not None else self._eos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self._name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        """HFLM.tok_encode: the tokenizer's own special tokens unless the text already starts
        with the prefix token's text."""
        if add_special_tokens is None:
            add_special_tokens = _adds_special_tokens(string, self._prefix_text())
        ids = self.tokenizer.encode(string, add_special_tokens=add_special_tokens).ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _prefix_text(self) -> str:
        return self.tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        tokens = [tokens] if isinstance(tokens, int) else list(tokens)
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- requests --------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        """TemplateLM.loglikelihood's requests, token for token: the context's trailing
        spaces moved to the continuation, context + continuation encoded whole and the
        context's own tokens cut off its front; an empty context becomes the prefix token.
        lm-eval encodes two strings a request, one call each (a question's shared context
        once per choice); here each distinct string is encoded once, in batched calls of the
        Rust tokenizer (its threads), before the scoring."""
        pairs = []
        for context, continuation in (req.args for req in requests):
            if context:
                n_spaces = len(context) - len(context.rstrip())
                if n_spaces:
                    context, continuation = (context[:-n_spaces],
                                             context[-n_spaces:] + continuation)
                pairs.append((context, context + continuation))
            else:
                pairs.append((None, continuation))
        ids = self._encode_many([(t, None) for c, w in pairs for t in (c, w) if c is not None]
                                + [(w, False) for c, w in pairs if c is None])
        new_reqs = []
        for (context, continuation), (c, w) in zip((req.args for req in requests), pairs):
            if c is None:  # TemplateLM: the prefix token, unless the text starts with it
                cont = ids[(w, False)]
                ctx_enc, cont_enc = (([self.prefix_token_id], cont)
                                     if self.prefix_token_id != cont[0] else (cont[:1], cont[1:]))
            else:
                ctx_enc = ids[(c, None)]
                cont_enc = ids[(w, None)][len(ctx_enc):]
            new_reqs.append(((context, continuation), ctx_enc, cont_enc))
        return self._loglikelihood_tokens(new_reqs, disable_tqdm=disable_tqdm)

    def _encode_many(self, keys) -> dict:
        """{(text, add_special_tokens): ids} for each distinct key, as tok_encode encodes it
        (add_special_tokens None: tok_encode's own choice), in one batched call per flag."""
        prefix = self._prefix_text()
        groups: dict[bool, list] = {True: [], False: []}
        for key in dict.fromkeys(keys):
            text, add = key
            groups[_adds_special_tokens(text, prefix) if add is None else add].append(key)
        out = {}
        for add, members in groups.items():
            if members:
                encs = self.tokenizer.encode_batch([t for t, _ in members],
                                                   add_special_tokens=add)
                out.update(zip(members, (e.ids for e in encs)))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        reqs, cut = [], 0
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError(f"mpt_jax: a request with {len(ctx)} context and {len(cont)} "
                                 "continuation tokens (both need one)")
            if len(cont) > self.max_length:
                raise ValueError(f"mpt_jax: a continuation of {len(cont)} tokens is longer than "
                                 f"max_length {self.max_length}")
            row = (list(ctx) + list(cont))[-(self.max_length + 1):]
            cut += len(ctx) + len(cont) > len(row)
            reqs.append(Request(tuple(row[:len(row) - len(cont)]), tuple(cont)))
        if cut:
            log.warning("mpt_jax: %d request(s) longer than max_length %d + 1 were cut from the "
                        "left (as lm-eval's hf model cuts them)", cut, self.max_length)
        scores = self.scorer.score(reqs, desc="lm-eval: loglikelihood")
        out = []
        for (key, _, _), sc in zip(requests, scores):
            answer = (sc.logprob, sc.greedy)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows) if windows else []
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if self._completer is None:
            self._completer = Completer(self.model, self.tokenizer, eos_id=self._eos,
                                        pad_id=self._eos, mesh=self.mesh,
                                        batch_size=self._batch_size, min_bucket=self.min_bucket,
                                        progress=self.progress)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        eos_text = self.tok_decode([self._eos], skip_special_tokens=False)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            top_k = int(kwargs.pop("top_k", 0) or 0)
            top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
            seed = int(kwargs.pop("seed", 0) or 0)
            if kwargs:
                raise ValueError(f"mpt_jax: generation kwargs {sorted(kwargs)} not supported "
                                 "(supported: until, max_gen_toks, do_sample, temperature, "
                                 "top_k, top_p, seed)")
            room = self.max_length - max_new
            if room < 1:
                raise ValueError(f"mpt_jax: max_gen_toks {max_new} leaves no room for a prompt "
                                 f"in max_length {self.max_length}")
            prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=room)
                       or [self.prefix_token_id] for i in members]
            texts = self._completer.complete(
                prompts, max_new_tokens=max_new, stop=until, max_len=self.max_length,
                temperature=temperature if sample else 0.0, top_k=top_k if sample else 0,
                top_p=top_p if sample else 1.0, seed=seed, desc="lm-eval: generate_until")
            for i, text in zip(members, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


@contextlib.contextmanager
def compiled_templates():
    """Within this block lm-eval compiles each of its Jinja prompt templates once.

    lm-eval 0.4's `utils.apply_template` compiles the template string on every call (lm-eval
    issue #1286, open): about 1 ms each on a CPU core, several calls per document and per
    few-shot example, so it is most of lm-eval's own time on a few-shot task. This swaps in a
    version that keeps each compiled template (same environment, filters and rendering, so
    the same text) and puts lm-eval's own back on exit (also on an exception). `evaluate` and
    our lm-eval command line run under it. It patches a module global: one evaluation at a
    time per process (not from several threads at once)."""
    original = lm_utils.apply_template
    compiled: dict = {}

    def apply_template(template: str, doc: dict) -> str:
        t = compiled.get(template)
        if t is None:
            t = compiled[template] = lm_utils.env.from_string(template)
        return t.render(**doc)

    lm_utils.apply_template = apply_template
    try:
        yield
    finally:
        lm_utils.apply_template = original


def evaluate(lm: MPTJaxLM, tasks: Sequence[str], *, include_path: str | None = None,
             num_fewshot: int | None = None, limit: float | None = None,
             log_samples: bool = False) -> dict:
    """lm_eval.simple_evaluate on `lm` with a TaskManager that also reads `include_path`; an
    unknown task name is a ValueError naming it. (Tasks all found in include_path skip
    indexing lm-eval's own ~15k task files, which takes tens of seconds.)"""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if include_path is not None and not os.path.isdir(include_path):
        raise ValueError(f"--include_path {include_path!r} is not a directory")
    manager = None
    if include_path is not None:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if any(t not in manager.all_tasks and not os.path.isfile(t) for t in tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=include_path)
    missing = [t for t in tasks if t not in manager.all_tasks and not os.path.isfile(t)]
    if missing:
        raise ValueError(f"unknown lm-eval task {missing[0]!r} (not in lm-eval's tasks"
                         + (f" nor in {include_path}" if include_path else "") + ")")
    with compiled_templates():
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot,
                                       limit=limit, task_manager=manager,
                                       log_samples=log_samples)


if __name__ == "mpt_jax.eval.harness":  # not under `python -m` (see below)
    register_model(NAME)(MPTJaxLM)

if __name__ == "__main__":
    # lm-eval's own command line with "mpt_jax" registered (by importing this module under its
    # package name, so that one class is registered however the module is reached)
    import mpt_jax.eval.harness  # noqa: F401
    from lm_eval.__main__ import cli_evaluate

    with mpt_jax.eval.harness.compiled_templates():
        cli_evaluate()
