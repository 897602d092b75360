"""Generate text with an MPT checkpoint; prints only the completion on stdout (logs on stderr).

    python generate.py --checkpoint PATH --prompt TEXT [--max_new_tokens N --temperature T
        --top_k K --top_p P --seed S --max_seq_len L --tokenizer P --dtype bfloat16
        --quantize int8 --kv_cache int8]

PATH is one of our checkpoint directories, a training workdir or step directory, or an
HF-layout directory (config.json + safetensors); the tokenizer comes from PATH (a workdir and
each of its step directories carry the run's) unless --tokenizer names a file, directory or hub
name. --max_seq_len lets prompt + completion run past the training length (ALiBi extrapolation).
With several devices, --mesh data,fsdp,tensor shards the model (e.g. --mesh 1,1,-1).
--quantize int8 quantizes the weights as they load (weight-only int8, per output channel; a
checkpoint saved quantized needs no flag), --kv_cache int8 keeps an int8 KV cache.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _log(msg: str) -> None:
    print(f"[generate] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top_k", type=int, default=0, help="0 = off")
    ap.add_argument("--top_p", type=float, default=1.0, help="1.0 = off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max_seq_len", type=int, default=None,
                    help="longest prompt + completion (default: the model's max_seq_len)")
    ap.add_argument("--tokenizer", default=None, help="default: the checkpoint directory")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    ap.add_argument("--eos_id", type=int, default=None,
                    help="default: config.json's eos_token_id, else the tokenizer's <|endoftext|> "
                         "(no EOS stop if neither)")
    ap.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes; one may be -1")
    ap.add_argument("--quantize", default="none",
                    help="none (the weights as stored) or int8 (weight-only, quantized at load)")
    ap.add_argument("--kv_cache", default="auto",
                    help="KV cache dtype: auto (the compute dtype), bfloat16, float16, float32 "
                         "or int8 (per-token scales)")
    args = ap.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"generate.py: {msg}".splitlines()[0], file=sys.stderr)
        return 1

    if not args.prompt:
        return fail("--prompt is empty")
    if args.max_new_tokens < 1:  # (the sampling flags too, before the weights load)
        return fail(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        return fail(f"--max_seq_len must be >= 2, got {args.max_seq_len}")
    from mpt_jax.infer.sampling import SamplingParams

    try:
        SamplingParams(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        return fail(f"--{e}")
    from mpt_jax import storage

    try:
        if not storage.exists(args.checkpoint):
            return fail(f"checkpoint {args.checkpoint!r} does not exist")
    except storage.StorageError as e:
        return fail(str(e))
    from mpt_jax import sharding

    mesh_sizes = None
    if args.mesh:
        try:
            mesh_sizes = sharding.parse_mesh_sizes(args.mesh)
        except ValueError as e:
            return fail(str(e))

    import jax
    import jax.numpy as jnp

    from mpt_jax import load_pretrained
    from mpt_jax.convert.convert import tokenizer_dir
    from mpt_jax.data.tokenizer import load_tokenizer
    from mpt_jax.infer.generate import Generator
    from mpt_jax.model import quant

    try:
        quantize = quant.parse_quantize(args.quantize)
        cache_dtype = quant.parse_cache_dtype(args.kv_cache)
    except ValueError as e:
        return fail(str(e))
    if mesh_sizes is not None:
        try:
            sharding.mesh_shape(mesh_sizes, jax.device_count())
        except ValueError as e:
            return fail(f"--mesh {args.mesh}: {e}")
    try:
        tok = load_tokenizer(args.tokenizer or str(tokenizer_dir(args.checkpoint)))
        t0 = time.perf_counter()
        dtype = jnp.dtype(args.dtype)
        model = load_pretrained(args.checkpoint, dtype=dtype, param_dtype=dtype,
                                quantize=quantize)
    except Exception as e:  # noqa: BLE001  (bad path or file: one line, no traceback)
        return fail(f"{type(e).__name__}: {e}")
    weights = f"{args.dtype}, {model.config.quantization} weights" if (
        model.config.quantization) else args.dtype
    _log(f"loaded {args.checkpoint} ({weights}) in {time.perf_counter() - t0:.1f}s")
    vocab = model.config.vocab_size
    if args.eos_id is not None and not 0 <= args.eos_id < vocab:
        return fail(f"--eos_id {args.eos_id} is not a token id of this model (vocab_size "
                    f"{vocab})")
    mesh = None
    if mesh_sizes is not None:
        mesh = sharding.make_mesh(mesh_sizes)
        _log(f"mesh {dict(mesh.shape)}")
    gen = Generator(model, mesh=mesh, cache_dtype=cache_dtype)
    del model  # the generator keeps per-layer copies of the weights

    eos_id = args.eos_id
    if eos_id is None and isinstance(gen.config.eos_token_id, int):
        eos_id = gen.config.eos_token_id  # config.json's, as HF's generate uses it
    if eos_id is None:
        eos_id = tok.token_to_id("<|endoftext|>")
    if eos_id is not None and eos_id >= gen.config.vocab_size:
        eos_id = None
    prompt_ids = tok.encode(args.prompt).ids
    if not prompt_ids:
        return fail(f"--prompt {args.prompt!r} encodes to no tokens")
    _log(f"prompt: {len(prompt_ids)} tokens; eos_id={eos_id}")

    printed = ""

    def on_tokens(tokens_bn, n):
        nonlocal printed
        ids = [int(x) for x in tokens_bn[0, :n]]
        if eos_id is not None and eos_id in ids:
            ids = ids[:ids.index(eos_id)]
        text = tok.decode(ids)
        if text.endswith("\ufffd"):  # an unfinished multi-byte character: wait for the rest
            return
        if text.startswith(printed):
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    t0 = time.perf_counter()
    try:
        out = gen.generate([prompt_ids], max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           seed=args.seed, eos_id=eos_id, max_len=args.max_seq_len,
                           on_tokens=on_tokens)
        n = int(out.lengths[0])
        ids = [int(x) for x in out.tokens[0, :n] if x != eos_id]
        text = tok.decode(ids)
        if text.startswith(printed):
            sys.stdout.write(text[len(printed):])
        sys.stdout.write("\n")
        sys.stdout.flush()
    except ValueError as e:
        return fail(str(e))
    except BrokenPipeError:  # `| head`: the reader left; no traceback (Python's advice)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    _log(f"{n} tokens in {time.perf_counter() - t0:.2f}s (compilation included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
