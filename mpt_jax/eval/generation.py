"""Completion until stop sequences, on our Generator: generation tasks and lm-eval's
generate_until.

    completer = Completer(model, tokenizer, eos_id=0)
    texts = completer.complete([prompt_ids, ...], max_new_tokens=32, stop=["\\n\\n"])

Prompts are sorted by length and run `batch_size` at a time, left-padded to a bucket length
(scoring.bucket_length), the last batch filled with one-token dummy prompts: the Generator
compiles once per (bucket, max_new_tokens), not per prompt. Each row's tokens up to its EOS are
decoded (special tokens skipped, as HF's `batch_decode(..., skip_special_tokens=True)`) and cut
before the first stop sequence found in the text, as lm-eval's `postprocess_generated_text` and
llm-foundry's generation metric cut it (stop strings are matched literally; llm-foundry joins
them into a regular expression unescaped).

Sharding: the Generator places the weights on `mesh` by the rules and the prompts are
replicated. With several processes every process runs the same batches, and the weights are
replicated over the mesh instead (every device then computes whole batches): the Generator's
outputs are read on every process, which needs them replicated.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
import tokenizers

from mpt_jax import sharding
from mpt_jax.eval.scoring import bucket_length
from mpt_jax.infer.generate import Generator
from mpt_jax.model import MPTForCausalLM


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` before the earliest occurrence of any (non-empty) stop string."""
    end = len(text)
    for s in stop:
        if s:
            at = text.find(s)
            if at != -1:
                end = min(end, at)
    return text[:end]


class Completer:
    """Greedy (or sampled) completion with `model` (see the module docstring).

    eos_id: generation of a row stops at it (None: runs max_new_tokens). batch_size: prompts
    per batch (rounded up to a multiple of the mesh's batch shards).
    """

    def __init__(self, model: MPTForCausalLM, tokenizer: tokenizers.Tokenizer, *,
                 eos_id: int | None, pad_id: int = 0, mesh=None,
                 rules=sharding.DEFAULT_RULES, batch_size: int = 16, min_bucket: int = 16,
                 progress: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config = model.config
        self.tokenizer = tokenizer
        self.eos_id, self.pad_id = eos_id, pad_id
        shards = 1 if mesh is None else sharding.batch_shards(mesh, rules)
        self.batch_size = -(-batch_size // shards) * shards
        self.min_bucket = min_bucket
        self.progress = progress
        if mesh is not None and jax.process_count() > 1:
            rules = tuple((name, None) for name, _ in rules)
        self.generator = Generator(model, mesh=mesh, rules=rules)

    def complete(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 stop: Sequence[str] = (), max_len: int | None = None, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 desc: str = "generating") -> list[str]:
        """One completion per prompt, in order. max_len: the longest prompt + completion
        (config.max_seq_len by default); a prompt that does not leave room for max_new_tokens
        is a ValueError naming it (callers truncate first if they want to)."""
        import tqdm

        limit = self.config.max_seq_len if max_len is None else int(max_len)
        prompts = [tuple(int(t) for t in p) for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + max_new_tokens > limit:
                raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens "
                                 f"{max_new_tokens} exceed max_len {limit}")
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[str | None] = [None] * len(prompts)
        bar = tqdm.tqdm(total=len(prompts), desc=desc, unit="req", dynamic_ncols=True,
                        disable=not self.progress or jax.process_index() != 0 or not prompts)
        room = limit - max_new_tokens
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            t = min(bucket_length(len(prompts[chunk[0]]), self.min_bucket), room)
            ids = np.full((self.batch_size, t), self.pad_id, np.int32)
            mask = np.zeros((self.batch_size, t), np.int32)
            ids[:, -1], mask[:, -1] = self.pad_id, 1  # dummy rows: one token
            for r, i in enumerate(chunk):
                p = prompts[i]
                ids[r, t - len(p):], mask[r, t - len(p):] = p, 1
            result = self.generator.generate(
                ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                eos_id=self.eos_id, pad_id=self.pad_id, max_len=limit)
            for r, i in enumerate(chunk):
                row = [int(x) for x in result.tokens[r, :int(result.lengths[r])]]
                if self.eos_id is not None and row and row[-1] == self.eos_id:
                    row = row[:-1]
                out[i] = cut_at_stop(self.tokenizer.decode(row, skip_special_tokens=True), stop)
            bar.update(len(chunk))
        bar.close()
        return out
