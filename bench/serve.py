"""Continuous-batching serving on MPT-7B shapes with random bf16 weights (GPU): the engine
under open-loop Poisson load, beside static-batch Generator.generate at the same batch sizes.

    python bench/serve.py --no_http [--streams 1,8,32,64] [--static 1,8,32,64] [--scale 1]
        [--max_batch 64] [--decode_steps 1] [--json PATH]
        [--results bench/RESULTS.md --card C --commit X]

Sections, in this order (each prints a JSON line as it ends, so a run cut short keeps what
it measured):
  static    Generator.generate at each --static batch size B: B prompts of the mean prompt
            length, the mean number of new tokens (greedy, no EOS); decode ms/step and decode
            tokens/s (prefill excluded), as bench/generate.py measures them.
  latency   one stream alone on an engine of --max_batch 1 against generate at B=1 (same
            prompt and length): ms per token after the first, and the ratio (goal <= 1.05).
  load      for each --streams C, one engine of --max_batch slots (the server's pool) serves
            requests arriving as a Poisson process, at most C in flight (a client that has C
            open streams waits for one to end, as vLLM's benchmark_serving --max-concurrency).
            Prompts uniform in --prompt_range tokens, new tokens uniform in --new_range,
            greedy, no EOS. The arrival rate is --rate_factor x C / (mean new tokens x the
            static decode step at batch C), enough to keep C streams busy; with no static
            figure for C, arrivals come as fast as C allows (closed loop). Reported:
            throughput (generated tokens / (last finish - first arrival)), TTFT and
            inter-token latency p50 / p99 (engine side: arrival to first token, gaps between
            a choice's tokens), mean streams decoding, and the ratio of throughput at C to
            static decode tokens/s at B = C (goal >= 0.9 at 64). Also the steady state:
            tokens/s from the moment C requests are first open to the last submission (C
            stay open all along; the ramp and the drain left out), over static decode
            tokens/s and over static tokens/s with the prefill counted (the same prompts and
            lengths as one batch: what the engine's work, prefills included, costs statically).
            --prefill_catch_up 0,1 (and --prefill_chunk 256,512, --prefill_mode
            separate,mixed) runs the levels on an engine of each setting.
Without --no_http the load section goes through the OpenAI HTTP server instead (uvicorn on
127.0.0.1 in this process, httpx streaming clients; TTFT / inter-token measured by the client
on the streamed chunks).

Counts: --scale 1 sends max(8, 3 C) requests per level. Much of a run is compilation: 2 jit compilations per
static batch size (prefill, decode loop) and 3 per engine (decode step, prefill chunk, admit:
greedy requests never run the top-k / top-p / logprobs step, so the engines are warmed with
one request, not Engine.warm_up; with --decode_steps > 1 they are warmed by warm_up). To fit
a ~3 minute call, static-batch only the sizes the goals compare (--static 1,64) and use
--scale 0.5; levels without a static figure arrive closed-loop. A second call on the same
warm machine reuses compilations when both set JAX_COMPILATION_CACHE_DIR to one directory.

The GPU hosts have jax, flax, numpy, tokenizers, httpx, anyio, h11, click, prometheus-client
and jinja2 but no fastapi / uvicorn / pydantic; `--no_http` needs none of those. For the HTTP
mode carry these wheels (Python 3.12, manylinux x86_64, `pip download --no-deps
--only-binary=:all: --python-version 3.12 ...`, see the device README): fastapi, starlette,
pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions (newer than
the host's if pip says so), opentelemetry-api (fastapi 0.165 needs it), uvicorn; versions as pyproject.toml's `serve` extra allows.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import logging
import math
import os
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

# The repository (mpt_jax), then bench/ in front of it (its generate.py, not the CLI's).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from generate import random_bf16_model
from mpt_jax.infer import slots as slots_lib
from mpt_jax.infer.engine import PREFILL_MODES, Engine, chunk_plan
from mpt_jax.infer.generate import Generator, SamplingParams
from mpt_jax.infer.request import EngineMetrics, RequestParams
from mpt_jax.kernels import decode_gpu
from mpt_jax.model.config import AttnConfig, MPTConfig


def synthetic_tokenizer(vocab_size: int) -> tokenizers.Tokenizer:
    """A byte-level vocabulary of `vocab_size` pieces (the 256 byte symbols, then random 2-6
    letter words, some with a leading space), so detokenizing random token ids costs what a
    real BPE's decode does. Ids are the model's, no merges: it only decodes."""
    rs = np.random.RandomState(0)
    symbols = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(sorted(symbols))}
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    while len(vocab) < vocab_size:
        word = ("Ġ" if rs.rand() < 0.5 else "") + "".join(rs.choice(letters, rs.randint(2, 7)))
        vocab.setdefault(word, len(vocab))
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=symbols[0]))
    tok.decoder = tokenizers.decoders.ByteLevel()
    return tok


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs, np.float64), q)) if len(xs) else float("nan")


class _Latencies(EngineMetrics):
    """The engine's own TTFT / inter-token observations (its thread appends)."""

    def __init__(self):
        self.ttft, self.itl, self.token_times = [], [], []

    def tokens(self, n):
        self.token_times.append((time.perf_counter(), n))

    def first_token(self, seconds):
        self.ttft.append(seconds)

    def inter_token(self, seconds):
        self.itl.append(seconds)


# ---------------------------------------------------------------------------------------------
# static: Generator.generate
# ---------------------------------------------------------------------------------------------
def bench_static(gen: Generator, b: int, prompt: int, new: int, reps: int) -> dict:
    rs = np.random.RandomState(b)
    ids = rs.randint(0, gen.config.vocab_size, (b, prompt)).astype(np.int32)
    kw = {"attention_mask": np.ones_like(ids), "max_new_tokens": new, "temperature": 0.0,
              "eos_id": None, "max_len": prompt + new}
    t0 = time.perf_counter()
    gen.generate(ids, **kw)
    first = time.perf_counter() - t0
    # The prefill alone: the compiled call generate made, with generate's arguments.
    alloc = decode_gpu.alloc_slots(prompt + new)
    pre_args = (gen.weights, jnp.asarray(ids), jnp.asarray(kw["attention_mask"]),
                jax.random.key(0), jnp.int32(0), alloc, new, SamplingParams(), False,
                False)  # keep_logits, padded (an all-ones mask: generate's call)
    jax.block_until_ready(gen._prefill(*pre_args).tokens)
    totals, pre = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        gen.generate(ids, **kw)
        totals.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(gen._prefill(*pre_args).tokens)
        pre.append(time.perf_counter() - t0)
    total, prefill = min(totals), min(pre)
    step = (total - prefill) / (new - 1)
    return {"section": "static", "batch": b, "prompt": prompt, "new": new,
            "total_s": total, "prefill_ms": prefill * 1e3, "decode_ms_per_step": step * 1e3,
            "decode_tokens_per_s": b / step, "tokens_per_s": b * new / total,
            "first_call_s": first}


def warm(engine: Engine, vocab: int) -> float:
    """Compiles what greedy requests run (decode, prefill chunks, admit) with one request as
    long as the context; `Engine.warm_up` would also compile the top-k / top-p / logprobs step
    and the n > 1 cache copy, which these loads never run (minutes of compilation on MPT-7B)."""
    if engine.decode_steps > 1:  # (the one-step decode runs only beside a prefill: all)
        return engine.warm_up()
    t0 = time.perf_counter()
    # A prompt of the whole context: its chunks attend over every span the pool compiles.
    ids = np.random.RandomState(0).randint(0, vocab, engine.max_seq_len - 2).tolist()
    h = engine.submit(ids, RequestParams(max_tokens=2, temperature=0.0)).result(timeout=900)
    assert h.error is None, h.error
    if engine.prefill_mode == "mixed":  # again beside a decoding request: mixed steps
        n = 2 * len(chunk_plan(len(ids), engine.chunk)) + 8  # (it outlasts every chunk)
        running = engine.submit(ids[:8], RequestParams(max_tokens=n, temperature=0.0))
        while not running.choices[0].token_ids and not running.finished:
            time.sleep(0.001)
        h = engine.submit(ids, RequestParams(max_tokens=2, temperature=0.0)).result(timeout=900)
        assert h.error is None and running.result(timeout=900).error is None
    return time.perf_counter() - t0


def _two_forward_impl(pool, w, state, owned_b, ids_1c, slot, start, n_valid, span, full):
    """slots.mixed_jit as it was before its one forward pass (Session 15): the chunk's forward
    and the decode step's, one after the other, in one call."""
    rows = slots_lib._slot_rows(pool, state.cache, slot, span)
    logits_1v, kv = slots_lib._chunk_forward(pool, w, rows, ids_1c, start, n_valid)
    state, out, top = slots_lib._one(slots_lib._decode_step(pool, w, owned_b, full)(state))
    return slots_lib._put_chunk(pool, state, kv, slot, start), out, top, logits_1v[0]


_two_forward_jit = jax.jit(slots_lib._under_rules(_two_forward_impl), static_argnums=(0, 8, 9),
                           donate_argnums=(2,))


def bench_step(engine: Engine, reps: int, depth: int, profile_dir: str = "") -> dict:
    """A decode step over every slot (all at `depth` cache positions) and one prefill chunk
    into a slot at the same depth, on the engine's pool with the engine idle: each alone,
    one after the other as two calls ("separate"), as one call with two forward passes
    ("two_forward", Session 15's mixed step) and as one call with one forward pass over both
    ("mixed", slots.mixed_jit). ms per call (min of reps). profile_dir: then trace the decode
    step, two_forward and mixed there and print their device-time tables
    (bench/profile_util.py)."""
    pool = engine.pool
    b = pool.batch
    st = engine._state
    engine._state = st._replace(pos=jnp.full((b,), depth, jnp.int32),
                                active=jnp.ones((b,), bool).at[0].set(False),
                                remaining=jnp.full((b,), 10**6, jnp.int32))
    owned = jax.device_put(np.ones(b, bool))
    ids = np.random.RandomState(8).randint(0, engine.config.vocab_size,
                                           (1, pool.chunk)).astype(np.int32)
    start = depth - pool.chunk
    span = pool.span_for(depth)
    w = engine._weights

    def decode():
        engine._state, out, _ = slots_lib.decode_jit(pool, w, engine._state, owned, 1, False)
        return out

    def chunk():
        engine._state, logits = slots_lib.prefill_jit(pool, w, engine._state, ids, 0, start,
                                                      pool.chunk, span)
        return logits

    def separate():
        chunk()
        return decode()

    def mixed():
        engine._state, out, _, _ = slots_lib.mixed_jit(pool, w, engine._state, owned, ids, 0,
                                                       start, pool.chunk, span, False)
        return out

    def two_forward():
        engine._state, out, _, _ = _two_forward_jit(pool, w, engine._state, owned, ids, 0,
                                                    start, pool.chunk, span, False)
        return out

    r = {"section": "step", "batch": b, "depth": depth, "chunk": pool.chunk, "span": span}
    for name, fn in (("decode", decode), ("chunk", chunk), ("separate", separate),
                     ("two_forward", two_forward), ("mixed", mixed)):
        times = []
        for i in range(reps + 2):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            if i > 0:
                times.append(time.perf_counter() - t0)
        r[f"{name} ms"] = min(times) * 1e3
    r["mixed saves ms"] = r["separate ms"] - r["mixed ms"]
    r["one pass saves ms"] = r["two_forward ms"] - r["mixed ms"]
    if profile_dir:
        from profile_util import profile
        for name, fn in (("decode", decode), ("two_forward", two_forward), ("mixed", mixed)):
            print(profile(lambda fn=fn: jax.block_until_ready(fn()),
                          os.path.join(profile_dir, name), steps=2, top=25), flush=True)
    return r


# ---------------------------------------------------------------------------------------------
# latency: one stream on a one-slot engine
# ---------------------------------------------------------------------------------------------
def bench_latency(gen: Generator, tok, prompt: int, new: int, chunk: int, decode_steps: int,
                  reps: int, static_step_ms: float | None) -> dict:
    lat = _Latencies()
    engine = Engine(gen, tok, max_batch=1, max_seq_len=prompt + new, prefill_chunk=chunk,
                    decode_steps=decode_steps, eos_id=None, metrics=lat)
    engine.start()
    ids = np.random.RandomState(1).randint(0, gen.config.vocab_size, prompt).tolist()
    params = RequestParams(max_tokens=new, temperature=0.0)
    per_token = []
    try:
        compile_s = warm(engine, gen.config.vocab_size)
        for _ in range(reps):
            h = engine.submit(ids, params).result(timeout=600)
            assert h.error is None and len(h.choices[0].token_ids) == new, h.error
            per_token.append((h.finished_at - h.first_token_at) / (new - 1))
    finally:
        engine.shutdown(0)
    ms = min(per_token) * 1e3
    r = {"section": "latency", "prompt": prompt, "new": new, "engine_ms_per_token": ms,
         "engine_compile_s": compile_s, "ttft_ms": _pct(lat.ttft[1:], 50) * 1e3}
    if static_step_ms:
        r["generate_ms_per_step"] = static_step_ms
        r["ratio_to_generate"] = ms / static_step_ms
    return r


# ---------------------------------------------------------------------------------------------
# load: Poisson arrivals, at most C in flight
# ---------------------------------------------------------------------------------------------
def _workload(n: int, prompt_range, new_range, vocab: int, seed: int):
    rs = np.random.RandomState(seed)
    lengths = rs.randint(prompt_range[0], prompt_range[1] + 1, n)
    news = rs.randint(new_range[0], new_range[1] + 1, n)
    return [(rs.randint(0, vocab, p).tolist(), int(m)) for p, m in zip(lengths, news)]


def _arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    """Seconds from the start at which each request arrives (Poisson; all at 0 if rate is
    infinite: then only the concurrency cap paces them)."""
    if not math.isfinite(rate):
        return np.zeros(n)
    return np.cumsum(np.random.RandomState(seed + 1).exponential(1 / rate, n))


def run_load_engine(engine: Engine, lat: _Latencies, work, arrive, c: int) -> dict:
    """Submits each request at its arrival time (or when one of the C open ones ends)."""
    lat.ttft.clear()
    lat.itl.clear()
    lat.token_times.clear()
    handles, open_ = [], []
    t0 = time.perf_counter()
    i = 0
    saturated = last_submit = None  # when C were first open; the last submission
    while i < len(work) or open_:
        now = time.perf_counter() - t0
        open_ = [h for h in open_ if not h.finished]
        while i < len(work) and len(open_) < c and arrive[i] <= now:
            ids, new = work[i]
            h = engine.submit(ids, RequestParams(max_tokens=new, temperature=0.0))
            handles.append(h)
            open_.append(h)
            i += 1
            last_submit = time.perf_counter()
            if saturated is None and len(open_) == c:
                saturated = last_submit
        # Sleep to the next arrival (2 ms at most while capped): polling must not take the
        # engine thread's interpreter time.
        wait = arrive[i] - now if i < len(work) and len(open_) < c else 0.002
        time.sleep(min(max(wait, 0.0002), 0.002))
    bad = [h.error for h in handles if h.error]
    assert not bad, bad[:3]
    done_tokens = sum(h.completion_tokens for h in handles)
    assert done_tokens == sum(n for _, n in work)
    first = min(h.arrival for h in handles)
    last = max(h.finished_at for h in handles)
    busy = sum(h.finished_at - h.first_token_at for h in handles)
    out = {"tokens": done_tokens, "wall_s": last - first, "ttft": list(lat.ttft),
           "itl": list(lat.itl), "mean_streams": busy / (last - first)}
    # Steady state: from the moment C requests were first open to the last submission (C
    # stay open throughout: a finished one is replaced at once), without the ramp and drain.
    if saturated is not None and last_submit - saturated > 1.0:
        steady = sum(n for t, n in lat.token_times if saturated <= t <= last_submit)
        out["steady_s"] = last_submit - saturated
        out["steady_tokens_per_s"] = steady / out["steady_s"]
    return out


def run_load_http(url: str, work, arrive, c: int) -> dict:
    """The same load through the HTTP server: one streaming request per prompt (token ids),
    TTFT and gaps measured on the chunks as the client receives them."""
    import httpx

    ttft, itl, tokens, spans = [], [], [0], []

    async def one(client, sem, ids, new, at, t0):
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        async with sem:
            start = time.perf_counter()
            last = None
            body = {"model": "bench", "prompt": ids, "max_tokens": new, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                assert r.status_code == 200, await r.aread()
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens[0] += chunk["usage"]["completion_tokens"]
                        continue
                    now = time.perf_counter()
                    if last is None:
                        ttft.append(now - start)
                    else:
                        itl.append(now - last)
                    last = now
            spans.append((start, time.perf_counter()))

    async def main():
        sem = asyncio.Semaphore(c)
        limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            t0 = time.perf_counter()
            await asyncio.gather(*(one(client, sem, ids, new, at, t0)
                                   for (ids, new), at in zip(work, arrive)))

    asyncio.run(main())
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    assert tokens[0] == sum(n for _, n in work), tokens[0]
    return {"tokens": tokens[0], "wall_s": last - first, "ttft": ttft, "itl": itl,
            "mean_streams": sum(e - s for s, e in spans) / (last - first)}


def start_http(engine: Engine, tok, max_seq_len: int, vocab: int) -> tuple[str, object]:
    import socket

    import uvicorn

    from mpt_jax.infer.protocol import ServedModel
    from mpt_jax.infer.server import create_app

    served = ServedModel("bench", tok, max_seq_len, vocab, top_logprobs=engine.top_logprobs)
    app = create_app(engine, served)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the HTTP server did not start"
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", (server, thread)


def summarize(c: int, m: dict, static: dict | None, rate: float, n: int) -> dict:
    r = {"section": "load", "streams": c, "requests": n,
         "arrival_rate_per_s": rate if math.isfinite(rate) else "closed loop",
         "tokens_per_s": m["tokens"] / m["wall_s"], "wall_s": m["wall_s"],
         "mean_streams": m["mean_streams"],
         "ttft_p50_ms": _pct(m["ttft"], 50) * 1e3, "ttft_p99_ms": _pct(m["ttft"], 99) * 1e3,
         "itl_p50_ms": _pct(m["itl"], 50) * 1e3, "itl_p99_ms": _pct(m["itl"], 99) * 1e3}
    r["itl_p99_over_p50"] = r["itl_p99_ms"] / r["itl_p50_ms"]
    if "steady_tokens_per_s" in m:
        r["steady_s"], r["steady_tokens_per_s"] = m["steady_s"], m["steady_tokens_per_s"]
    if static is not None:
        r["static_decode_tokens_per_s"] = static["decode_tokens_per_s"]
        r["ratio_to_static_decode"] = r["tokens_per_s"] / static["decode_tokens_per_s"]
        r["static_tokens_per_s"] = static["tokens_per_s"]  # prefill included
        if "steady_tokens_per_s" in r:
            r["steady_ratio_to_static_decode"] = (r["steady_tokens_per_s"]
                                                  / static["decode_tokens_per_s"])
            r["steady_ratio_to_static"] = r["steady_tokens_per_s"] / static["tokens_per_s"]
    return r


# ---------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no_http", action="store_true",
                    help="drive the engine directly (the GPU hosts lack fastapi/uvicorn)")
    ap.add_argument("--streams", default="1,8,32,64", help="load levels (concurrent streams)")
    ap.add_argument("--static", default="1,8,32,64", help="static generate batch sizes ('' "
                    "skips)")
    ap.add_argument("--latency", type=int, default=1, help="1: the one-stream latency section")
    ap.add_argument("--max_batch", type=int, default=64, help="the load engine's slots")
    ap.add_argument("--scale", type=float, default=1.0, help="requests per level: "
                    "ceil(scale x max(8, 3 C))")
    ap.add_argument("--prompt_range", default="128,2048")
    ap.add_argument("--new_range", default="64,512")
    ap.add_argument("--prefill_chunk", default="384",
                    help="serve.py's flag; a comma list runs the load levels once per value "
                         "(the latency section takes the first)")
    ap.add_argument("--prefill_chunks", type=int, default=1,
                    help="prefill calls between decode steps (serve.py's flag)")
    ap.add_argument("--prefill_catch_up", default="0",
                    help="serve.py's flag; a comma list (e.g. 0,1) runs the load levels once "
                         "per value, each on its own engine")
    ap.add_argument("--prefill_mode", default="mixed",
                    help=f"engine prefill modes to run the load on, comma-separated, of "
                         f"{','.join(PREFILL_MODES)}")
    ap.add_argument("--step_costs", type=int, default=0,
                    help="1: time the decode step and a chunk alone, in two calls and in one, "
                         "on each load engine before its load")
    ap.add_argument("--profile", default="", help="with --step_costs: trace the step variants "
                    "into this directory and print their device-time tables")
    ap.add_argument("--decode_steps", type=int, default=1,
                    help="engine decode steps per call while no prompt waits (serve.py's flag)")
    ap.add_argument("--rate_factor", type=float, default=1.2,
                    help="arrival rate over the rate that keeps C streams exactly busy")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--chunk_costs", type=int, default=0,
                    help="1: after the load levels, time one prefill chunk alone (start and "
                         "deep in a slot) beside generate's prefill of that many tokens")
    ap.add_argument("--size", default="7b", help="MPTConfig preset, or 'tiny' (CPU smoke run)")
    ap.add_argument("--json", default="")
    ap.add_argument("--results", default="", help="append markdown rows to this RESULTS.md")
    ap.add_argument("--card", default="")
    ap.add_argument("--commit", default="COMMIT")
    args = ap.parse_args()
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("mpt_jax.infer.slots").setLevel(logging.INFO)  # each step's compilation

    streams = [int(x) for x in args.streams.split(",") if x]
    statics = [int(x) for x in args.static.split(",") if x]
    chunks = [int(x) for x in args.prefill_chunk.split(",") if x] or [384]
    p_lo, p_hi = (int(x) for x in args.prompt_range.split(","))
    n_lo, n_hi = (int(x) for x in args.new_range.split(","))
    if not (1 <= p_lo <= p_hi and 2 <= n_lo <= n_hi) or max(streams, default=1) > args.max_batch:
        print("bench/serve.py: bad --prompt_range / --new_range / --streams", file=sys.stderr)
        return 1
    mean_p, mean_n = (p_lo + p_hi) // 2, (n_lo + n_hi) // 2
    max_seq_len = p_hi + n_hi

    if args.size == "tiny":
        cfg = MPTConfig(d_model=40, n_heads=4, n_layers=2, vocab_size=384, max_seq_len=64,
                        expansion_ratio=4, attn_config=AttnConfig())
    else:
        cfg = MPTConfig.mpt_7b() if args.size == "7b" else MPTConfig.preset(args.size)
    dev = jax.devices()[0]
    card = args.card or dev.device_kind
    print(f"# device {dev.device_kind}, jax {jax.__version__}, MPT-{args.size} random bf16",
          flush=True)
    t0 = time.perf_counter()
    model = random_bf16_model(cfg, "auto")
    gen = Generator(model)
    del model
    jax.block_until_ready(gen.weights)
    print(f"# weights ready in {time.perf_counter() - t0:.1f}s", flush=True)
    tok = synthetic_tokenizer(cfg.vocab_size)
    results: list[dict] = []

    def report(r):
        results.append(r)
        print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    static = {}
    for b in statics:
        try:
            static[b] = bench_static(gen, b, mean_p, mean_n, args.reps)
            report(static[b])
        except Exception as e:  # noqa: BLE001  (e.g. out of memory: keep the other figures)
            report({"section": "static", "batch": b, "error": f"{type(e).__name__}: {e}"[:600]})

    if args.latency:
        s1 = static.get(1)
        report(bench_latency(gen, tok, mean_p, mean_n, chunks[0], args.decode_steps,
                             args.reps,
                             None if s1 is None else s1["decode_ms_per_step"]))

    catch_ups = [int(x) for x in args.prefill_catch_up.split(",") if x]
    modes = [x for x in args.prefill_mode.split(",") if x]
    if any(m not in PREFILL_MODES for m in modes):
        print(f"bench/serve.py: --prefill_mode takes {','.join(PREFILL_MODES)}", file=sys.stderr)
        return 1
    for chunk, catch_up, pmode in (itertools.product(chunks, catch_ups, modes) if streams
                                   else []):
        lat = _Latencies()
        engine = Engine(gen, tok, max_batch=args.max_batch, max_seq_len=max_seq_len,
                        prefill_chunk=chunk, prefill_chunks=args.prefill_chunks,
                        prefill_catch_up=bool(catch_up), decode_steps=args.decode_steps,
                        prefill_mode=pmode,
                        eos_id=None, max_queue=10**6,
                        metrics=lat)
        url = server = None
        if args.no_http:
            engine.start()
        else:
            url, server = start_http(engine, tok, max_seq_len, cfg.vocab_size)
        try:
            secs = warm(engine, cfg.vocab_size)
            print(f"# load engine: {args.max_batch} slots x {max_seq_len}, chunk "
                  f"{engine.chunk}, prefill_catch_up {catch_up}, prefill_mode {pmode}, "
                  f"compiled in {secs:.1f}s", flush=True)
            if args.step_costs:
                report(bench_step(engine, args.reps, mean_p + mean_n // 2,
                                  args.profile and os.path.join(args.profile, pmode)))
            c0, traces0 = slots_lib.backend_compiles(), dict(slots_lib.TRACES)
            for c in streams:
                n = math.ceil(args.scale * max(8, 3 * c))
                work = _workload(n, (p_lo, p_hi), (n_lo, n_hi), cfg.vocab_size, seed=c)
                st = static.get(c)
                step_s = None if st is None else st["decode_ms_per_step"] / 1e3
                rate = (args.rate_factor * c / (mean_n * step_s) if step_s and step_s > 0
                        else math.inf)
                arrive = _arrivals(n, rate, seed=c)
                m = (run_load_engine(engine, lat, work, arrive, c) if args.no_http
                     else run_load_http(url, work, arrive, c))
                report({**summarize(c, m, st, rate, n), "prefill_chunk": engine.chunk,
                        "prefill_catch_up": catch_up,
                        "prefill_mode": pmode})
        finally:
            if server is not None:
                server[0].should_exit = True
                server[1].join(60)
            engine.shutdown(0)
        compiled = slots_lib.backend_compiles() - c0
        traced = {k: v - traces0.get(k, 0) for k, v in slots_lib.TRACES.items()
                  if v != traces0.get(k, 0)}
        report({"section": "compilations_after_warm_up", "prefill_chunk": chunk,
                "count": compiled,
                "steps_traced": traced})
        if args.chunk_costs:
            report(bench_chunk(engine, gen, args.reps))
        del engine, server  # the next engine's pool needs this one's memory (an MPT-7B pool
        gc.collect()        # of 64 x 2560 slots is 86 GB)

    date = time.strftime("%Y-%m-%d")
    mode = "engine" if args.no_http else "HTTP (uvicorn, httpx streams)"
    shape = (f"MPT-{args.size} random bf16 prompts {p_lo}-{p_hi} new {n_lo}-{n_hi} greedy")
    rows = []
    for r in results:
        if "error" in r:
            continue
        if r["section"] == "static":
            name = f"serve static generate B={r['batch']} prompt={r['prompt']} new={r['new']}"
            rows += [(name, "decode ms/step", f"{r['decode_ms_per_step']:.2f}"),
                     (name, "decode tokens/s", f"{r['decode_tokens_per_s']:.0f}"),
                     (name, "tokens/s with prefill", f"{r['tokens_per_s']:.0f}")]
        elif r["section"] == "latency":
            name = (f"serve engine 1 stream (max_batch 1, decode_steps {args.decode_steps}) "
                    f"prompt={r['prompt']} new={r['new']}")
            rows.append((name, "ms/token", f"{r['engine_ms_per_token']:.2f}"))
            if "ratio_to_generate" in r:
                rows.append((name, "ms/token over generate B=1",
                             f"{r['ratio_to_generate']:.3f}"))
        elif r["section"] == "load":
            arrivals = (f"Poisson x{args.rate_factor}" if r["arrival_rate_per_s"] !=
                        "closed loop" else "closed loop")
            name = (f"serve {mode} {r['streams']} streams max_batch {args.max_batch} "
                    f"decode_steps {args.decode_steps} prefill_chunk {r['prefill_chunk']} "
                    f"prefill_chunks {args.prefill_chunks} "
                    f"catch_up {r['prefill_catch_up']} prefill_mode {r['prefill_mode']} "
                    f"{arrivals} {r['requests']} requests {shape}")
            rows += [(name, "tokens/s", f"{r['tokens_per_s']:.0f}"),
                     (name, "TTFT p50 / p99 ms", (f"{r['ttft_p50_ms']:.0f} / "
                                                 f"{r['ttft_p99_ms']:.0f}")),
                     (name, "inter-token p50 / p99 ms", (f"{r['itl_p50_ms']:.2f} / "
                                                        f"{r['itl_p99_ms']:.2f}"))]
            if "ratio_to_static_decode" in r:
                rows.append((name, "tokens/s over static decode tokens/s",
                             f"{r['ratio_to_static_decode']:.2f}"))
            if "steady_tokens_per_s" in r:
                rows.append((name, f"steady-state tokens/s ({r['steady_s']:.1f} s with "
                             f"{r['streams']} open)", f"{r['steady_tokens_per_s']:.0f}"))
            if "steady_ratio_to_static" in r:
                rows.append((name, "steady tokens/s over static decode tokens/s / over "
                             "static tokens/s with prefill",
                             f"{r['steady_ratio_to_static_decode']:.2f} / "
                             f"{r['steady_ratio_to_static']:.2f}"))
        elif r["section"] == "step":
            name = (f"serve step B={r['batch']} at depth {r['depth']} + chunk {r['chunk']} "
                    f"(span {r['span']}, MPT-{args.size} random bf16)")
            modes_run = [k[:-3] for k in r if k.endswith(" ms") and not k.endswith("saves ms")]
            rows.append((name, "ms per call: " + " / ".join(modes_run),
                         " / ".join(f"{r[m + ' ms']:.2f}" for m in modes_run)))
        elif r["section"] == "chunk":
            name = f"serve prefill chunk {r['chunk']} alone (MPT-{args.size} random bf16)"
            rows += [(name, "ms at slot start / deep / generate prefill of as many tokens",
                      f"{r['start 0 ms']:.2f} / {r['start deep ms']:.2f} / "
                      f"{r['generate prefill ms']:.2f}"),
                     (name, "TFLOP/s (2 x params x tokens), same order",
                      f"{r['start 0 TFLOP/s']:.0f} / {r['start deep TFLOP/s']:.0f} / "
                      f"{r['generate prefill TFLOP/s']:.0f}")]
        elif r["section"] == "compilations_after_warm_up":
            rows.append((f"serve {mode} load (prefill_chunk {r['prefill_chunk']})",
                         "compilations after warm-up", str(r["count"])))
    lines = [f"| {date} | {n} | {fig} | {v} | {card} | {args.commit} |" for n, fig, v in rows]
    print("\n".join(lines))
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
