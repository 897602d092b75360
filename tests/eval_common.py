"""Shared by the eval tests: one tiny MPT checkpoint (transformers' MptForCausalLM, saved as an
HF directory with a small byte-level BPE tokenizer and HF tokenizer files), built once per
test process, and straightforward transformers computations to compare against."""
import atexit
import functools
import json
import os
import random
import shutil
import tempfile

import numpy as np

VOCAB = 384
MAX_SEQ_LEN = 128
WORDS = ("a the cat dog sat on mat red blue green sky is sun moon tree big small run jump "
         "what who why yes no one two three four five apple river stone bird fish day night "
         "question answer because then and of to in").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@functools.lru_cache(maxsize=None)
def checkpoint() -> str:
    """The HF directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json)
    of a d_model 40, 4-head, 2-layer MPT with a 384-token vocabulary."""
    import torch
    import transformers

    from mpt_jax.data.tokenizer import train_byte_level_bpe

    path = tempfile.mkdtemp(prefix="mpt_jax_eval_")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    rng = random.Random(0)
    texts = [sentence(rng, rng.randint(5, 30)) + "." for _ in range(400)]
    texts += ["Question: what is a cat?\nAnswer: a cat", "A: B: C: D: yes no"] * 20
    tok = train_byte_level_bpe(texts, VOCAB)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                   "bos_token": "<|endoftext|>", "model_max_length": MAX_SEQ_LEN}, fh)
    cfg = transformers.MptConfig(d_model=40, n_heads=4, n_layers=2, vocab_size=VOCAB,
                                 max_seq_len=MAX_SEQ_LEN, no_bias=True,
                                 attn_config={"alibi": True}, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    hf = transformers.MptForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim > 1:
                torch.nn.init.normal_(p, std=0.3)
            else:
                torch.nn.init.normal_(p, mean=1.0, std=0.1)
    hf.save_pretrained(path)
    return path


@functools.lru_cache(maxsize=None)
def hf_model():
    import transformers

    return transformers.MptForCausalLM.from_pretrained(checkpoint()).eval()


@functools.lru_cache(maxsize=None)
def tokenizer():
    from mpt_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(checkpoint())


@functools.lru_cache(maxsize=None)
def model():
    from mpt_jax import load_pretrained

    return load_pretrained(checkpoint())


def hf_token_logprobs(ids) -> np.ndarray:
    """log p(ids[t + 1] | ids[:t + 1]) for every t, from transformers, float64 `[len - 1]`."""
    import torch

    with torch.no_grad():
        logits = hf_model()(torch.tensor([list(ids)])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return np.array([lp[t, ids[t + 1]].item() for t in range(len(ids) - 1)])


def hf_score(context, continuation) -> tuple[float, bool]:
    """(summed log-probability of the continuation, every token the argmax) from transformers
    on the row context + continuation, alone (no padding)."""
    import torch

    ids = list(context) + list(continuation)
    with torch.no_grad():
        logits = hf_model()(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    n = len(context)
    total = sum(lp[n - 1 + j, c].item() for j, c in enumerate(continuation))
    greedy = all(int(logits[n - 1 + j].argmax()) == c for j, c in enumerate(continuation))
    return total, greedy


def hf_greedy(prompt, n: int) -> list[int]:
    """n greedy tokens after `prompt` from transformers (no EOS stop)."""
    import torch

    with torch.no_grad():
        out = hf_model().generate(torch.tensor([list(prompt)]), max_new_tokens=n,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
    return [int(x) for x in out[0, len(prompt):]]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return str(path)
