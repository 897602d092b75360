"""Continuous batching over a fixed pool of KV-cache slots: requests that arrive at different
times, with different lengths and sampling parameters, share every decode step.

    engine = Engine(Generator(model), tokenizer, max_batch=64, eos_id=0)
    engine.warm_up(); engine.start()
    handle = engine.submit(prompt_ids, RequestParams(max_tokens=64, temperature=0.0))
    for event in handle.stream(timeout=60):   # (index, text, logprobs, finish_reason)
        print(event.text, end="")
    engine.shutdown(timeout=10)

One thread (the engine's) owns the device. Each iteration it
  1. applies cancellations (a disconnected client frees its slots at once);
  2. dispatches prefill chunks of the requests at the head of the queue, once they have their
     slots (`prefill_chunks` per iteration while anything decodes, 1 by default, so a long
     prompt delays running decodes by that many chunks' time at most; with
     `prefill_catch_up`, one more while a second request waits with a slot free for it
     (prompts then arrive faster than one chunk a step takes them, and the free slots decode
     nothing); back to back when nothing decodes). After the last
     chunk it admits the request: first tokens sampled, parameters set, and for n > 1 the
     prefilled cache row copied into the other choices' slots (the prompt runs once);
  3. dispatches one decode step over all slots (`decode_steps` steps in one call while
     nothing waits to be prefilled); with `prefill_mode` "mixed" (the default) the
     iteration's last chunk goes in the same call as this step (slots.mixed_jit);
  4. only then reads the previous iteration's tokens and turns them into text (detokenizing,
     stop strings, events for the waiting clients): the device always has the next step queued
     while the host works, and host work per step is O(active slots).
The compiled steps live in slots.py; their shapes never change, so after `warm_up` serving
compiles nothing (`slots.backend_compiles()` counts every compilation in the process).

Requests finish at EOS or a stop token id (finish_reason "stop"), at a stop string (the text
is cut before it, "stop"), or after max_tokens tokens ("length"). A request whose handling
fails gets its error and frees its slots; the others go on. A failure of the device step ends
the engine: every open request gets the error, `error` says why, `submit` refuses.

Weights: the engine reads the Generator's weights object (`generator.weights`) and runs its
forward, so whatever the Generator holds (a mesh placement, quantized weights) serves as is.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np

from mpt_jax import sharding
from mpt_jax.infer import slots as slots_lib
from mpt_jax.infer.generate import Generator
from mpt_jax.infer.request import (
    EngineMetrics,
    EngineUnavailable,
    Event,
    QueueFull,
    RequestError,
    RequestHandle,
    RequestParams,
    TokenLogprob,
)
from mpt_jax.infer.text import Detokenizer, StopMatcher
from mpt_jax.kernels import decode_gpu

log = logging.getLogger(__name__)

N_STOP_IDS = 8  # stop token ids per slot, EOS included
# How an iteration's last prefill chunk runs beside its decode step (see Engine):
PREFILL_MODES = ("separate", "mixed")


class _Seq:
    """One choice of a request while it holds a slot."""

    __slots__ = (
        "detok",
        "done",
        "full",
        "handle",
        "index",
        "last_at",
        "n",
        "slot",
        "stop_ids",
        "stopper",
    )

    def __init__(self, handle, index, slot, detok, stop_ids):
        self.handle, self.index, self.slot = handle, index, slot
        self.detok, self.stopper = detok, StopMatcher(handle.params.stop)
        self.stop_ids, self.n, self.last_at, self.done = stop_ids, 0, 0.0, False
        self.full = handle.params.wants_full_step


class _Job:
    """A request being prefilled: its slots and its chunks (start, real tokens)."""

    def __init__(self, handle, slots, chunks):
        self.handle, self.slots, self.chunks, self.next = handle, slots, chunks, 0


class _Dispatch(NamedTuple):
    out: jax.Array  # [k, B, 3] int32 (slots.py)
    top: tuple | None
    owners: list  # the _Seq of each slot when the step was queued


def chunk_plan(prompt_len: int, chunk: int) -> list[tuple[int, int]]:
    """(start, real tokens) of each prefill chunk. Whole chunks from 0; a remainder becomes a
    last whole chunk ending at the prompt's end (it recomputes some tokens rather than pad
    past them), so padding exists only for a prompt shorter than one chunk."""
    if prompt_len <= chunk:
        return [(0, prompt_len)]
    plan = [(s, chunk) for s in range(0, prompt_len - chunk + 1, chunk)]
    if plan[-1][0] + chunk < prompt_len:
        plan.append((prompt_len - chunk, chunk))
    return plan


class Engine:
    """Continuous batching for one model (see the module docstring).

    generator: the Generator whose weights and forward serve. tokenizer: a
    `tokenizers.Tokenizer` (detokenization). max_batch: slots (concurrent choices).
    max_seq_len: prompt + completion per slot (default the model's; past it with ALiBi).
    prefill_chunk: prompt tokens per prefill call (384: on MPT-7B at 64 streams, H200,
    bench/PERF_NOTES.md Session 16, the same throughput as 256 with 2.5x sooner first tokens
    and inter-token p99 1.22x p50; 512 went to 1.58x). prefill_chunks: prefill calls between two
    decode steps while anything decodes (vLLM's token budget per step, in chunks: more admits
    a burst of long prompts sooner, each running decode then waits that many chunks).
    prefill_catch_up: one chunk more in an iteration where another request waits and a slot
    is free for it (idle slots waiting on the prefill). On MPT-7B at 64 streams (H200,
    bench/RESULTS.md) it cut TTFT p50 from 752 to 209 ms and raised steady tokens/s 6%, but
    inter-token p99 / p50 went from 1.29 to 1.81; off by default for the steadier stream.
    decode_steps: decode steps per call while
    no prompt waits (1 streams every token as it comes). prefill_mode: how an iteration's last
    prefill chunk runs beside the decode step, when something decodes: "mixed" (one call
    computing both; 1.6-2.4 ms less an iteration than two calls on MPT-7B at 64 slots, H200)
    or "separate" (a prefill call, then a decode call). Both compute the same tokens.
    max_queue: requests waiting for slots
    before `submit` raises QueueFull (one that a free slot takes at once does not wait).
    eos_id: ends every request (None: none). top_logprobs: the most top log-probabilities a
    request may ask for.
    """

    def __init__(self, generator: Generator, tokenizer, *, max_batch: int = 64,
                 max_seq_len: int | None = None, prefill_chunk: int = 384,
                 prefill_chunks: int = 1, prefill_catch_up: bool = False,
                 decode_steps: int = 1, prefill_mode: str = "mixed", max_queue: int = 256,
                 eos_id: int | None = None, top_logprobs: int = 20,
                 metrics: EngineMetrics | None = None):
        cfg = generator.config
        max_seq_len = cfg.max_seq_len if max_seq_len is None else int(max_seq_len)
        for name, value, low in (("max_batch", max_batch, 1), ("max_seq_len", max_seq_len, 2),
                                 ("prefill_chunk", prefill_chunk, 1),
                                 ("prefill_chunks", prefill_chunks, 1),
                                 ("decode_steps", decode_steps, 1), ("max_queue", max_queue, 0),
                                 ("top_logprobs", top_logprobs, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if prefill_mode not in PREFILL_MODES:
            raise ValueError(f"prefill_mode must be one of {PREFILL_MODES}, got {prefill_mode!r}")
        if cfg.use_wpe and max_seq_len > cfg.max_seq_len:
            raise ValueError(f"max_seq_len={max_seq_len} > the model's {cfg.max_seq_len}: it has "
                             "learned positions (no ALiBi) and cannot extrapolate")
        if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
            raise ValueError(f"eos_id={eos_id} is outside the vocabulary [0, {cfg.vocab_size})")
        self.generator, self.tokenizer, self.config = generator, tokenizer, cfg
        self.max_batch, self.max_seq_len, self.max_queue = max_batch, max_seq_len, max_queue
        self.decode_steps, self.eos_id, self.top_logprobs = decode_steps, eos_id, top_logprobs
        self.prefill_chunks, self.prefill_catch_up = prefill_chunks, bool(prefill_catch_up)
        self.prefill_mode = prefill_mode
        self.chunk = min(prefill_chunk, max_seq_len)
        # Whole decode-kernel blocks; a prompt chunk never reaches past max_seq_len.
        n_slots = decode_gpu.alloc_slots(max_seq_len)
        self.pool = slots_lib.Pool(generator._spec, max_batch, n_slots, self.chunk,
                                   top_logprobs, N_STOP_IDS)
        self.metrics = metrics or EngineMetrics()
        self._weights = generator.weights
        self._mesh = generator.mesh
        with self._device_context():
            self._state = slots_lib.init_jit(self.pool)
        self._owned = np.zeros(max_batch, bool)
        self._owned_dev = jax.device_put(self._owned.copy())
        self._owned_dirty = False
        self._free = list(range(max_batch))  # a heap: the lowest free slot first
        self._slot_seq: list[_Seq | None] = [None] * max_batch
        self._n_decoding = 0
        self._n_full = 0
        self._job: _Job | None = None
        self._inflight: list[_Dispatch] = []
        self._lock = threading.Condition()
        self._waiting: collections.deque = collections.deque()
        self._cancels: collections.deque = collections.deque()
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        self.stats = collections.Counter()  # steps, prefill_chunks, tokens, requests, ...

    # -- public API --------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def slots_used(self) -> int:
        return self.max_batch - len(self._free)

    @property
    def accepting(self) -> bool:
        return self._accepting and self.error is None

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def check(self, prompt_ids: Sequence[int], params: RequestParams) -> None:
        """RequestError unless the engine can serve this prompt with these parameters."""
        if not prompt_ids:
            raise RequestError("prompt", "the prompt is empty (it has no tokens)")
        vocab = self.config.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError("prompt", f"token id {bad} is outside the vocabulary [0, {vocab})")
        n = len(prompt_ids)
        if n >= self.max_seq_len:
            raise RequestError("prompt", f"the prompt has {n} tokens; this server's context is "
                               f"{self.max_seq_len} tokens (prompt + completion)")
        if n + params.max_tokens > self.max_seq_len:
            raise RequestError("max_tokens", f"{n} prompt tokens + max_tokens "
                               f"{params.max_tokens} = {n + params.max_tokens} exceeds this "
                               f"server's context of {self.max_seq_len} tokens")
        if params.n > self.max_batch:
            raise RequestError("n", f"n={params.n} is more than this server's {self.max_batch} "
                               "slots (--max_batch)")
        if params.logprobs is not None and params.logprobs > self.top_logprobs:
            raise RequestError("logprobs", f"at most {self.top_logprobs} top log-probabilities, "
                               f"got {params.logprobs}")
        ids = self._stop_ids(params)
        if len(ids) > N_STOP_IDS:
            raise RequestError("stop_token_ids", f"at most {N_STOP_IDS - 1} stop token ids")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError("stop_token_ids", f"token id {bad} is outside the vocabulary")

    def submit(self, prompt_ids: Sequence[int], params: RequestParams, *, loop=None,
               request_id: str | None = None) -> RequestHandle:
        """Queues one prompt; RequestError (bad request), QueueFull, EngineUnavailable."""
        return self.submit_many([(prompt_ids, params)], loop=loop, request_id=request_id)[0]

    def submit_many(self, items, *, loop=None, request_id: str | None = None
                    ) -> list[RequestHandle]:
        """Queues several (prompt_ids, params) at once: all, or none if the queue cannot
        take them all. loop: the asyncio loop whose coroutines `wait_async` on the handles."""
        handles = []
        wake = None if loop is None else asyncio.Event()  # one for the lot: see wait_any
        rid = request_id or uuid.uuid4().hex
        for i, (prompt_ids, params) in enumerate(items):
            prompt_ids = [int(t) for t in prompt_ids]
            self.check(prompt_ids, params)
            h = RequestHandle(rid if len(items) == 1 else f"{rid}-{i}", prompt_ids, params, loop,
                              wake)
            h._engine = self
            handles.append(h)
        with self._lock:
            if self.error is not None:
                raise EngineUnavailable(f"the engine failed: {self.error}")
            if not self._accepting:
                raise EngineUnavailable("the server is shutting down")
            if len(handles) > self.max_batch + self.max_queue:  # never, however long it waits
                raise RequestError("prompt", f"{len(handles)} prompts (x n) in one request; "
                                   f"this server takes at most {self.max_batch + self.max_queue}"
                                   f" at once (--max_batch + --max_queue)")
            # a request that a free slot takes at once does not wait: only the rest count
            free = len(self._free)
            if len(self._waiting) + len(handles) - free > self.max_queue:
                raise QueueFull(f"{max(0, len(self._waiting) - free)} requests are waiting for "
                                f"a slot (the queue holds {self.max_queue}); retry later")
            self._waiting.extend(handles)
            self.stats["requests"] += len(handles)
            self._lock.notify()
        return handles

    def warm_up(self) -> float:
        """Compiles every step the engine will run (before `start`); returns the seconds."""
        t0, c0 = time.perf_counter(), slots_lib.backend_compiles()
        pool = self.pool
        with self._device_context():
            for k in sorted({1, self.decode_steps}):
                for full in (False, True):
                    self._state, out, _ = slots_lib.decode_jit(pool, self._weights, self._state,
                                                               self._owned_dev, k, full)
            ids = np.zeros((1, self.chunk), np.int32)
            for span in pool.spans:  # (slot 0 is free: what lands there is overwritten)
                self._state, logits = slots_lib.prefill_jit(
                    pool, self._weights, self._state, ids, 0, span - self.chunk, 1, span)
                for full in (False, True) if self.prefill_mode == "mixed" else ():
                    self._state, out, _, logits = slots_lib.mixed_jit(
                        pool, self._weights, self._state, self._owned_dev, ids, 0,
                        span - self.chunk, 1, span, full)
            self._state, out, _ = slots_lib.admit_jit(pool, self._state, logits,
                                                      slots_lib.empty_rows(pool))
            self._state = slots_lib.copy_jit(pool, self._state, 0, 0)
            np.asarray(out)
            jax.block_until_ready(self._state)
        dt = time.perf_counter() - t0
        log.info("warm-up: %d compilations in %.1fs", slots_lib.backend_compiles() - c0, dt)
        return dt

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mpt_jax-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 0.0) -> None:
        """Stops accepting, lets open requests finish for up to `timeout` seconds, cancels the
        rest (their error says so) and stops the engine thread."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + timeout
        while self._busy() and self.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    # -- the loop ----------------------------------------------------------------------------
    def _device_context(self):
        return contextlib.nullcontext() if self._mesh is None else sharding.use_mesh(self._mesh)

    def _busy(self) -> bool:
        return bool(self._waiting or self._job or self._n_decoding or self._inflight)

    def _run(self) -> None:
        try:
            with self._device_context():
                while True:
                    with self._lock:
                        if self._stopping:
                            break
                        if not self._busy() and not self._cancels:
                            self._lock.wait(0.5)
                            continue
                    self._iteration()
                self._drain("the server shut down before the request finished")
        except Exception as e:
            log.exception("engine failed")
            self.error = f"{type(e).__name__}: {e}".splitlines()[0]
            self._drain(f"the engine failed: {self.error}")

    def _iteration(self) -> None:
        self._apply_cancels()
        new, chunks, decoded = [], 0, False
        while True:  # prefill: prefill_chunks while anything decodes, back to back otherwise
            if self._job is None:
                self._job = self._start_job()
                if self._job is None:
                    break
            # The budget's last chunk goes in one call with the decode step (prefill_mode).
            mixed = (self._n_decoding and self.prefill_mode == "mixed"
                     and chunks + 1 >= self._chunk_budget())
            step, admitted = self._prefill_chunk(self._job, with_decode=bool(mixed))
            chunks += 1
            if step is not None:
                new.append(step)
                decoded = True
            if admitted is not None:
                new.append(admitted)
            if self._n_decoding and chunks >= self._chunk_budget() or decoded:
                break
        if self._n_decoding and not decoded:
            new.append(self._decode())
        prev, self._inflight = self._inflight, new
        self._process(prev)

    def _chunk_budget(self) -> int:
        """Prefill chunks this iteration while something decodes (see prefill_catch_up)."""
        lagging = self.prefill_catch_up and self._waiting and self._free
        return self.prefill_chunks + (1 if lagging else 0)

    def _start_job(self) -> _Job | None:
        with self._lock:
            if not self._waiting or len(self._free) < self._waiting[0].params.n:
                return None
            h = self._waiting.popleft()
        slots = [heapq.heappop(self._free) for _ in range(h.params.n)]
        self._set_owned(slots, True)
        return _Job(h, slots, chunk_plan(len(h.prompt_ids), self.chunk))

    def _prefill_chunk(self, job: _Job, with_decode: bool = False
                       ) -> tuple[_Dispatch | None, _Dispatch | None]:
        """Dispatches the job's next chunk (with_decode: in one call with a decode step), and
        its admission after the last one: -> (the decode step's dispatch or None, the
        admission's or None)."""
        start, n_valid = job.chunks[job.next]
        ids = np.zeros((1, self.chunk), np.int32)
        ids[0, :n_valid] = job.handle.prompt_ids[start:start + n_valid]
        span = self.pool.span_for(start + self.chunk)
        step = None
        if with_decode:
            self._sync_owned()
            self._state, out, top, logits = slots_lib.mixed_jit(
                self.pool, self._weights, self._state, self._owned_dev, ids, job.slots[0],
                start, n_valid, span, self._n_full > 0)
            self.stats["steps"] += 1
            step = _Dispatch(out, top, list(self._slot_seq))
        else:
            self._state, logits = slots_lib.prefill_jit(self.pool, self._weights, self._state,
                                                        ids, job.slots[0], start, n_valid, span)
        self.stats["prefill_chunks"] += 1
        job.next += 1
        if job.next < len(job.chunks):
            return step, None
        h, p = job.handle, job.handle.params
        rows = slots_lib.empty_rows(self.pool)
        seed = secrets.randbits(64) if p.seed is None else p.seed % (1 << 64)
        stop_ids = self._stop_ids(p)
        for i, slot in enumerate(job.slots):
            rows.mask[slot] = True
            rows.pos[slot] = len(h.prompt_ids)
            rows.max_tokens[slot] = p.max_tokens
            rows.temperature[slot], rows.top_k[slot], rows.top_p[slot] = (
                p.temperature, p.top_k, p.top_p)
            rows.presence[slot], rows.frequency[slot] = p.presence_penalty, p.frequency_penalty
            rows.seed_lo[slot], rows.seed_hi[slot] = seed & 0xFFFFFFFF, seed >> 32
            rows.choice[slot] = i
            rows.stop_ids[slot, :len(stop_ids)] = stop_ids
        self._state, out, top = slots_lib.admit_jit(self.pool, self._state, logits, rows)
        for dst in job.slots[1:]:
            self._state = slots_lib.copy_jit(self.pool, self._state, job.slots[0], dst)
        stop_set = frozenset(stop_ids)
        for i, slot in enumerate(job.slots):
            seq = _Seq(h, i, slot, Detokenizer(self.tokenizer, h.prompt_ids), stop_set)
            self._slot_seq[slot] = seq
            self._n_decoding += 1
            self._n_full += seq.full
        self._job = None
        return step, _Dispatch(out, top, list(self._slot_seq))

    def _sync_owned(self) -> None:
        if self._owned_dirty:
            self._owned_dev = jax.device_put(self._owned.copy())  # (no alias of the host copy)
            self._owned_dirty = False

    def _decode(self) -> _Dispatch:
        self._sync_owned()
        k = self.decode_steps if not (self._waiting or self._job) else 1
        self._state, out, top = slots_lib.decode_jit(self.pool, self._weights, self._state,
                                                     self._owned_dev, k, self._n_full > 0)
        self.stats["steps"] += k
        return _Dispatch(out, top, list(self._slot_seq))

    # -- tokens to text ----------------------------------------------------------------------
    def _process(self, dispatches: list[_Dispatch]) -> None:
        touched: dict[int, RequestHandle] = {}
        n_tokens = 0
        for d in dispatches:
            out = np.asarray(d.out)
            top = None if d.top is None else (np.asarray(d.top[0]), np.asarray(d.top[1]))
            now = time.perf_counter()
            lps = out[..., 2].view(np.float32)
            for step in range(out.shape[0]):
                for b in np.flatnonzero(out[step, :, 1]):
                    seq = d.owners[b]
                    if seq is None or seq.done:
                        continue
                    h = seq.handle
                    touched[id(h)] = h
                    n_tokens += 1
                    try:
                        self._on_token(seq, int(out[step, b, 0]), float(lps[step, b]),
                                       None if top is None else (top[0][step, b],
                                                                 top[1][step, b]), now)
                    except Exception as e:
                        log.exception("request %s failed", h.id)
                        self._fail(h, f"{type(e).__name__}: {e}")
        if n_tokens:
            self.metrics.tokens(n_tokens)
        self._notify(touched.values())

    def _on_token(self, seq: _Seq, tok: int, lp: float, top, now: float) -> None:
        h, p = seq.handle, seq.handle.params
        choice = h.choices[seq.index]
        choice.token_ids.append(tok)
        seq.n += 1
        self.stats["tokens"] += 1
        if h.first_token_at is None:
            h.first_token_at = now
            self.metrics.first_token(now - h.arrival)
        elif seq.n > 1:
            self.metrics.inter_token(now - seq.last_at)
        seq.last_at = now
        entry = ()
        if p.logprobs is not None:
            n_top = p.logprobs
            pairs = (() if not n_top or top is None else
                     tuple((int(i), float(v)) for i, v in zip(top[0][:n_top], top[1][:n_top])))
            entry = (TokenLogprob(tok, lp, pairs),)
            choice.logprobs.append(entry[0])
        finish, text = None, ""
        if tok in seq.stop_ids:
            finish = "stop"
            text, hit = self._final_text(seq)
        else:
            text, hit = seq.stopper.feed(seq.detok.push(tok))
            if hit:
                finish = "stop"
            elif seq.n >= p.max_tokens:
                finish = "length"
                text2, hit = self._final_text(seq)
                text += text2
                finish = "stop" if hit else finish
        choice.text += text
        h._events.append(Event(seq.index, text, entry, finish))
        if finish is not None:
            choice.finish_reason = finish
            self._end_seq(seq)

    @staticmethod
    def _final_text(seq: _Seq) -> tuple[str, bool]:
        """The held-back text at the end (unless it completes a stop string)."""
        text, hit = seq.stopper.feed(seq.detok.flush())
        return (text, True) if hit else (text + seq.stopper.flush(), False)

    # -- slots and ends ----------------------------------------------------------------------
    def _stop_ids(self, params: RequestParams) -> list[int]:
        ids = [] if self.eos_id is None else [self.eos_id]
        return ids + [t for t in params.stop_token_ids if t not in ids]

    def _set_owned(self, slots, owned: bool) -> None:
        for s in slots:
            self._owned[s] = owned
        self._owned_dirty = True

    def _release(self, slot: int) -> None:
        self._slot_seq[slot] = None
        self._set_owned([slot], False)
        heapq.heappush(self._free, slot)

    def _end_seq(self, seq: _Seq) -> None:
        seq.done = True
        self._n_decoding -= 1
        self._n_full -= seq.full
        if self._slot_seq[seq.slot] is seq:
            self._release(seq.slot)
        h = seq.handle
        if all(c.finish_reason is not None for c in h.choices):
            self._finish(h)

    def _finish(self, h: RequestHandle) -> None:
        if h.finished:
            return
        h.finished_at = time.perf_counter()
        h.finished = True
        self.stats["finished"] += 1
        try:
            self.metrics.finished(h)
        except Exception:
            log.exception("metrics hook failed")

    def _end_handle(self, h: RequestHandle) -> None:
        """Frees whatever `h` holds (queue place, prefill job, slots) and finishes it."""
        with self._lock:
            if h in self._waiting:
                self._waiting.remove(h)
        if self._job is not None and self._job.handle is h:
            for s in self._job.slots:
                self._release(s)
            self._job = None
        for seq in list(self._slot_seq):
            if seq is not None and seq.handle is h and not seq.done:
                seq.done = True
                self._n_decoding -= 1
                self._n_full -= seq.full
                self._release(seq.slot)
        self._finish(h)

    def _fail(self, h: RequestHandle, message: str) -> None:
        if h.finished:
            return
        h.error = message
        self.stats["failed"] += 1
        self._end_handle(h)

    def _cancel(self, h: RequestHandle) -> None:
        with self._lock:
            self._cancels.append(h)
            self._lock.notify()

    def _apply_cancels(self) -> None:
        touched = []
        while self._cancels:
            h = self._cancels.popleft()
            if not h.finished:
                h.cancelled = True
                self.stats["cancelled"] += 1
                self._end_handle(h)
                touched.append(h)
        self._notify(touched)

    def _drain(self, message: str) -> None:
        """Ends every open request with `message` (shutdown, or a failed engine)."""
        with self._lock:
            self._accepting = False
            open_ = list(self._waiting)
        if self._job is not None:
            open_.append(self._job.handle)
        open_ += [s.handle for s in self._slot_seq if s is not None]
        self._inflight = []
        for h in dict.fromkeys(open_):
            if not h.finished:
                h.error = message
                self._end_handle(h)
        self._notify(open_)

    def _notify(self, handles) -> None:
        """Wakes the consumers of `handles`: threads directly, event loops with one call each."""
        by_loop: dict = {}
        for h in handles:
            if h._loop is None:
                h._wake.set()
            else:
                by_loop.setdefault(h._loop, {})[id(h._async_wake)] = h._async_wake
        for loop, wakes in by_loop.items():
            try:
                loop.call_soon_threadsafe(_set_all, list(wakes.values()))
            except RuntimeError:  # the loop closed: nobody is waiting any more
                pass


def _set_all(events) -> None:
    for e in events:
        e.set()


__all__ = ["Engine", "chunk_plan"]
