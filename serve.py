"""Serve an MPT checkpoint over the OpenAI API with continuous batching (logs on stderr).

    python serve.py --checkpoint PATH [--host 127.0.0.1 --port 8000 --max_batch 64
        --max_seq_len N --api_key KEY --mesh data,fsdp,tensor --dtype bfloat16 ...]

PATH is anything load_pretrained reads (an HF-layout directory, our converted checkpoint, a
training workdir or step directory); the tokenizer comes from PATH unless --tokenizer names
one, and so does the chat template (tokenizer_config.json's chat_template, ChatML without).
Endpoints: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics. The server
compiles every step before it listens ("listening on http://HOST:PORT" on stderr; --port 0
picks a free port). SIGTERM or Ctrl-C: stop accepting, let open requests finish for up to
--shutdown_timeout seconds, cancel the rest, exit 0.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time

SHUTDOWN_GRACE = 5.0  # seconds uvicorn waits past --shutdown_timeout for handlers to reply


def _log(msg: str) -> None:
    print(f"[serve] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tokenizer", default=None, help="default: the checkpoint's")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 = a free port")
    ap.add_argument("--served_model_name", default=None,
                    help="the `model` clients name (default: the checkpoint directory's name)")
    ap.add_argument("--api_key", default=os.environ.get("MPT_JAX_API_KEY"),
                    help="require 'Authorization: Bearer KEY' (default: $MPT_JAX_API_KEY)")
    ap.add_argument("--max_batch", type=int, default=64,
                    help="KV-cache slots: sequences decoded together")
    ap.add_argument("--max_seq_len", type=int, default=None,
                    help="prompt + completion per slot (default: the model's max_seq_len; "
                         "larger extrapolates with ALiBi)")
    ap.add_argument("--max_queue", type=int, default=256,
                    help="requests waiting for a slot before new ones get 429")
    ap.add_argument("--prefill_chunk", type=int, default=384,
                    help="prompt tokens per prefill call (the most a running decode waits)")
    ap.add_argument("--prefill_chunks", type=int, default=1,
                    help="prefill calls between two decode steps (admits prompt bursts sooner; "
                         "running decodes wait that many chunks)")
    ap.add_argument("--prefill_catch_up", type=int, default=0, choices=(0, 1),
                    help="1: one chunk more in a step where another request waits and a slot "
                         "is free for it (much sooner first tokens under load; a less even "
                         "token stream)")
    ap.add_argument("--prefill_mode", default="mixed", choices=("mixed", "separate"),
                    help="mixed: a step's prefill chunk runs in the decode step's device call; "
                         "separate: in its own call before it")
    ap.add_argument("--decode_steps", type=int, default=1,
                    help="decode steps per device call while no prompt waits (tokens then "
                         "stream in groups of this many)")
    ap.add_argument("--top_logprobs", type=int, default=20,
                    help="the most alternatives a request's logprobs may ask for")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    ap.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes; one may be -1")
    ap.add_argument("--shutdown_timeout", type=float, default=30.0,
                    help="seconds open requests may finish after SIGTERM")
    ap.add_argument("--log_level", default="info",
                    choices=("critical", "error", "warning", "info", "debug"))
    args = ap.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"serve.py: {msg}".splitlines()[0], file=sys.stderr)
        return 1

    from mpt_jax import storage

    try:
        if not storage.exists(args.checkpoint):  # (local, gs:// or s3://)
            return fail(f"checkpoint {args.checkpoint!r} does not exist")
    except storage.StorageError as e:
        return fail(str(e))
    if not 0 <= args.port < 65536:
        return fail(f"--port {args.port} is not a port number")
    for name in ("max_batch", "max_seq_len", "prefill_chunk", "prefill_chunks", "decode_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return fail(f"--{name} must be >= 1, got {value}")
    for name in ("max_queue", "top_logprobs", "shutdown_timeout"):
        if getattr(args, name) < 0:
            return fail(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.api_key is not None and not args.api_key:
        return fail("--api_key is empty")
    from mpt_jax import sharding

    mesh_sizes = None
    if args.mesh:
        try:
            mesh_sizes = sharding.parse_mesh_sizes(args.mesh)
        except ValueError as e:
            return fail(str(e))
    try:  # bind first: a port in use fails before minutes of loading and compiling
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as e:
        return fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")

    level = getattr(logging, args.log_level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[serve] %(message)s"))
    logging.getLogger("mpt_jax").addHandler(handler)
    logging.getLogger("mpt_jax").setLevel(level)
    access = logging.getLogger("mpt_jax.access")
    access.propagate = False  # JSON lines, unprefixed
    raw = logging.StreamHandler(sys.stderr)
    raw.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(raw)
    access.setLevel(logging.INFO)

    import jax

    from mpt_jax.data import finetune
    from mpt_jax.eval import loading
    from mpt_jax.infer.engine import Engine
    from mpt_jax.infer.generate import Generator
    from mpt_jax.infer.protocol import ServedModel
    from mpt_jax.infer.server import ServerMetrics, create_app

    if mesh_sizes is not None:
        try:
            sharding.mesh_shape(mesh_sizes, jax.device_count())
        except ValueError as e:
            return fail(f"--mesh {args.mesh}: {e}")
    t0 = time.perf_counter()
    try:
        loaded = loading.load(args.checkpoint, tokenizer=args.tokenizer, dtype=args.dtype)
        where = loading.tokenizer_location(args.checkpoint, args.tokenizer)
        chat_tok = finetune.load_example_tokenizer(where, eos_text="")
    except Exception as e:  # noqa: BLE001  (bad path or file: one line, no traceback)
        return fail(f"{type(e).__name__}: {e}")
    model, tok = loaded.model, loaded.tokenizer
    cfg = model.config
    _log(f"loaded {args.checkpoint} ({args.dtype}) in {time.perf_counter() - t0:.1f}s")
    max_seq_len = args.max_seq_len or cfg.max_seq_len
    mesh = None
    if mesh_sizes is not None:
        mesh = sharding.make_mesh(mesh_sizes)
        _log(f"mesh {dict(mesh.shape)}")
    eos_id = loaded.eos_id if loaded.eos_id is not None and loaded.eos_id < cfg.vocab_size \
        else None
    metrics = ServerMetrics()
    try:
        gen = Generator(model, mesh=mesh)
        del model, loaded  # the generator keeps per-layer copies of the weights
        engine = Engine(gen, tok, max_batch=args.max_batch, max_seq_len=max_seq_len,
                        prefill_chunk=args.prefill_chunk, prefill_chunks=args.prefill_chunks,
                        prefill_catch_up=bool(args.prefill_catch_up),
                        decode_steps=args.decode_steps, prefill_mode=args.prefill_mode,
                        max_queue=args.max_queue, eos_id=eos_id, top_logprobs=args.top_logprobs,
                        metrics=metrics)
    except ValueError as e:
        return fail(str(e))
    im_end = tok.token_to_id("<|im_end|>")
    chat_stop = () if im_end is None or im_end >= cfg.vocab_size else (im_end,)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.checkpoint))
    served = ServedModel(name, tok, max_seq_len, cfg.vocab_size,
                         chat_template=chat_tok.chat_template or finetune.CHATML_TEMPLATE,
                         template_tokens=chat_tok.template_tokens, chat_stop_ids=chat_stop,
                         top_logprobs=args.top_logprobs)
    kv_bytes = (2 * cfg.n_layers * args.max_batch * engine.pool.slots * cfg.kv_n_heads
                * cfg.head_dim * jax.numpy.dtype(gen.cache_dtype).itemsize)
    _log(f"model {name!r}: {args.max_batch} slots x {max_seq_len} tokens (KV cache "
         f"{kv_bytes / 2**30:.2f} GiB), prefill chunk {engine.chunk}, eos_id={eos_id}, "
         f"chat template {'the tokenizer' if chat_tok.chat_template else 'ChatML'}'s")
    try:
        secs = engine.warm_up()
    except Exception as e:  # noqa: BLE001  (e.g. the KV cache does not fit: one line)
        return fail(f"warm-up failed: {type(e).__name__}: {e}")
    _log(f"compiled every step in {secs:.1f}s")

    import uvicorn

    app = create_app(engine, served, api_key=args.api_key, metrics=metrics,
                     shutdown_timeout=0.0)
    # uvicorn's own bound only cuts what is still open a few seconds after the engine's
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=args.shutdown_timeout + SHUTDOWN_GRACE)
    host, port = sock.getsockname()[:2]

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started:  # (the socket accepts connections from here on)
                _log(f"listening on http://{host}:{port}")

        async def shutdown(self, sockets=None):
            # The engine first: open requests get --shutdown_timeout to finish, then it ends
            # the rest with an error that their handlers still send (an OpenAI error body, or
            # an error event and [DONE]), while uvicorn waits for the connections to close.
            stopping = asyncio.ensure_future(asyncio.to_thread(engine.shutdown,
                                                               args.shutdown_timeout))
            await super().shutdown(sockets=sockets)
            await stopping

    server = Server(config)
    # uvicorn re-raises a caught SIGTERM / SIGINT once it has shut down gracefully; with these
    # handlers that ends main normally (exit 0) instead of killing the process.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    engine.shutdown(0.0)
    _log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
