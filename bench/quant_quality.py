"""What int8 weights and the int8 KV cache cost in quality, on a trained checkpoint (CPU).

    python bench/quant_quality.py --checkpoint runs/tiny [--text FILE ...] [--max_tokens 65536]
        [--prompts 16 --prompt_len 32 --new 256] [--json PATH]

The checkpoint is any directory load_pretrained reads (e.g. the CPU demo's workdir after
`python train.py --config configs/tiny.py --workdir runs/tiny`); its tokenizer comes with it.
Held-out text: the files given, by default this repository's own `mpt_jax/**/*.py`, which the
demo never saw (it trains on the Python standard library).

Models, one process: the checkpoint as stored (float32), bf16 (weights and compute), and int8
weights quantized from the bf16 model (model/quant.py; bf16 compute), each also with an int8
KV cache.

Perplexity: the text's tokens in non-overlapping windows of the model's max_seq_len, every
token after a window's first scored (exp of the mean NLL). "full" runs the model's forward with
no cache; "cache" runs the same window through a KV cache of the given dtype (mode "decode"
from slot 0: each row is written to the cache, quantized for int8, and every key and value the
attention reads comes from the cache, as in generation).

Greedy agreement: `--prompts` prompts of `--prompt_len` tokens taken evenly from the text,
`--new` greedy tokens each through the Generator (past max_seq_len when the model has ALiBi),
compared position by position with the bf16 model's tokens: the fraction of identical tokens,
and the mean length of the identical prefix (a sequence that diverges once rarely re-aligns,
so this is the stricter figure). fp32 against bf16 is the yardstick: what rounding alone does.

Prints JSON and markdown rows for bench/RESULTS.md (card: this CPU).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mpt_jax.convert.convert import load_pretrained, tokenizer_dir  # noqa: E402
from mpt_jax.data.tokenizer import load_tokenizer  # noqa: E402
from mpt_jax.infer.generate import Generator  # noqa: E402
from mpt_jax.model import quantize_model  # noqa: E402


def window_nll(model, windows_nt: np.ndarray, batch: int, cache_dtype=None,
               use_cache: bool = False) -> np.ndarray:
    """Per-token NLL `[N, T - 1]` (float64) of every window's tokens after its first: the full
    forward, or (use_cache) the window written to and read from a KV cache of `cache_dtype`."""
    graphdef, state = nnx.split(model)
    t = windows_nt.shape[1]

    @jax.jit
    def nll(state, ids):
        m = nnx.merge(graphdef, state)
        if use_cache:
            logits, _ = m(ids, cache=m.init_cache(ids.shape[0], t, dtype=cache_dtype),
                          cache_index=0)
        else:
            logits = m(ids)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]

    out = []
    for i in range(0, len(windows_nt), batch):
        chunk = windows_nt[i:i + batch]
        pad = batch - len(chunk)  # one compiled shape: the last batch padded with copies
        ids = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
        out.append(np.asarray(nll(state, jnp.asarray(ids)), np.float64)[:len(chunk)])
    return np.concatenate(out)


def agreement(a_bn: np.ndarray, b_bn: np.ndarray) -> dict:
    same = a_bn == b_bn
    prefix = np.where(same.all(1), same.shape[1], np.argmin(same, axis=1))
    return {"identical_fraction": float(same.mean()), "mean_identical_prefix": float(prefix.mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--text", nargs="*", default=None,
                    help="held-out text files (default: this repository's mpt_jax/**/*.py)")
    ap.add_argument("--max_tokens", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)

    files = args.text or sorted(glob.glob(os.path.join(ROOT, "mpt_jax", "**", "*.py"),
                                          recursive=True))
    try:
        text = "\n\n".join(Path(f).read_text(encoding="utf-8") for f in files)
        tok = load_tokenizer(str(tokenizer_dir(args.checkpoint)))
        f32 = load_pretrained(args.checkpoint)
    except Exception as e:  # noqa: BLE001  (bad path or file: one line)
        print(f"quant_quality.py: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    ids = np.asarray(tok.encode(text).ids[:args.max_tokens], np.int32)
    cfg = f32.config
    t = cfg.max_seq_len
    n_win = len(ids) // t
    if n_win < 1 or len(ids) < args.prompts * args.prompt_len:
        print(f"quant_quality.py: {len(ids)} tokens of text is too little (need {t} for a "
              f"window and {args.prompts * args.prompt_len} for the prompts)", file=sys.stderr)
        return 1
    windows = ids[:n_win * t].reshape(n_win, t)
    bf16 = load_pretrained(args.checkpoint, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    int8 = quantize_model(bf16)
    models = {"fp32": f32, "bf16": bf16, "int8": int8}
    card = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    res = {"checkpoint": args.checkpoint, "text_files": len(files), "tokens": int(n_win * t),
           "windows": n_win, "seq_len": t, "card": card, "jax": jax.__version__,
           "perplexity": {}, "greedy": {}}
    print(f"# {len(files)} files, {n_win} windows of {t} tokens; model d_model {cfg.d_model}, "
          f"{cfg.n_layers} layers, vocab {cfg.vocab_size}", flush=True)

    runs = [("fp32", "full", None), ("bf16", "full", None), ("int8", "full", None),
            ("bf16", "cache", jnp.bfloat16), ("bf16", "cache", jnp.int8),
            ("int8", "cache", jnp.bfloat16), ("int8", "cache", jnp.int8)]
    for weights, path, kv in runs:
        t0 = time.perf_counter()
        nll = window_nll(models[weights], windows, args.batch, kv, use_cache=path == "cache")
        key = f"{weights} weights, " + ("no cache" if kv is None else
                                        f"{jnp.dtype(kv).name} KV cache")
        res["perplexity"][key] = {"ppl": float(np.exp(nll.mean())), "nll": float(nll.mean())}
        print(json.dumps({key: res["perplexity"][key], "s": round(time.perf_counter() - t0, 1)}),
              flush=True)

    starts = np.linspace(0, len(ids) - args.prompt_len, args.prompts).astype(int)
    prompts = np.stack([ids[s:s + args.prompt_len] for s in starts])
    max_len = args.prompt_len + args.new
    tokens = {}
    for weights, kv in (("bf16", None), ("fp32", None), ("int8", None), ("bf16", jnp.int8),
                        ("int8", jnp.int8)):
        t0 = time.perf_counter()
        gen = Generator(models[weights], cache_dtype=kv)
        out = gen.generate(prompts, max_new_tokens=args.new, eos_id=None, max_len=max_len)
        name = f"{weights} weights, " + ("its own" if kv is None else "int8") + " KV cache"
        tokens[name] = np.asarray(out.tokens)
        print(f"# generated {name} in {time.perf_counter() - t0:.1f}s", flush=True)
    ref = tokens["bf16 weights, its own KV cache"]
    for name, toks in tokens.items():
        if toks is not ref:
            res["greedy"][name] = agreement(toks, ref)
            print(json.dumps({name + " vs bf16": res["greedy"][name]}), flush=True)

    ppl = res["perplexity"]
    base = ppl["bf16 weights, no cache"]["ppl"]
    base_cache = ppl["bf16 weights, bfloat16 KV cache"]["ppl"]
    date = time.strftime("%Y-%m-%d")
    what = (f"quant_quality {os.path.basename(os.path.normpath(args.checkpoint))} (d_model "
            f"{cfg.d_model}, {cfg.n_layers} layers), held-out {res['tokens']} tokens")
    for key, v in ppl.items():
        ref_ppl = base if "no cache" in key else base_cache
        print(f"| {date} | {what}: {key} | perplexity (vs bf16) | {v['ppl']:.3f} "
              f"({(v['ppl'] / ref_ppl - 1) * 100:+.2f}%) | {card} | COMMIT |")
    for name, v in res["greedy"].items():
        print(f"| {date} | {what}: greedy {args.prompts} x {args.prompt_len}-token prompts + "
              f"{args.new} new, {name} vs bf16 | identical tokens / mean identical prefix | "
              f"{v['identical_fraction'] * 100:.1f}% / {v['mean_identical_prefix']:.1f} tokens | "
              f"{card} | COMMIT |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
