"""What a request is and how its consumer reads it: the sampling parameters a prompt is
completed with, the handle its events arrive on (threads block on it, event loops await it),
and the errors `Engine.submit` raises. The engine (engine.py) writes the handles; the server
and other consumers only read them.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import threading
import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple


class RequestError(ValueError):
    """A request the engine cannot take; `param` names the offending field."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    """The waiting queue is at its bound (max_queue)."""


class EngineUnavailable(RuntimeError):
    """The engine is shutting down or has failed."""


@dataclasses.dataclass(frozen=True)
class RequestParams:
    """How one prompt is completed (the OpenAI request fields).

    temperature 0 = greedy. top_k 0 / top_p 1.0 = off. seed None = a random one. stop: strings
    that end the completion (never part of it). stop_token_ids: token ids that end it besides
    EOS. logprobs None = none; N >= 0 = each token's log-probability and the N most likely.
    n: completions of the prompt (the prompt is prefilled once)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    n: int = 1

    def __post_init__(self):
        def need(ok, param, what):
            if not ok:
                raise RequestError(param, f"{param} {what}, got {getattr(self, param)!r}")

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        need(is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "must be an int >= 1")
        need(is_num(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0")
        need(is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(is_int(self.top_k) and self.top_k >= 0, "top_k", "must be an int >= 0")
        need(self.seed is None or is_int(self.seed), "seed", "must be an int or None")
        need(is_num(self.presence_penalty) and abs(self.presence_penalty) <= 2,
             "presence_penalty", "must be in [-2, 2]")
        need(is_num(self.frequency_penalty) and abs(self.frequency_penalty) <= 2,
             "frequency_penalty", "must be in [-2, 2]")
        need(all(isinstance(s, str) for s in self.stop), "stop", "must be strings")
        need(all(is_int(t) for t in self.stop_token_ids), "stop_token_ids", "must be ints")
        need(self.logprobs is None or (is_int(self.logprobs) and self.logprobs >= 0),
             "logprobs", "must be None or an int >= 0")
        need(is_int(self.n) and self.n >= 1, "n", "must be an int >= 1")

    @property
    def wants_full_step(self) -> bool:
        """Whether a decode step must sort (top-k / top-p) or rank (top logprobs) for it."""
        filtered = self.temperature > 0 and (self.top_k > 0 or self.top_p < 1)
        return filtered or bool(self.logprobs)


class TokenLogprob(NamedTuple):
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the most likely tokens, best first


class Event(NamedTuple):
    """New output of one choice: text (may be ''), the new tokens' log-probabilities (when
    asked for), and the finish reason once it ends ("stop" | "length")."""

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: str | None


@dataclasses.dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


class RequestHandle:
    """One submitted prompt: its events as they come, its choices, and its end.

    Written by the engine thread only; a consumer reads events (`stream`, or `next_events`
    after `wait` / `wait_async`) and, once `finished`, the choices. `error` is set when the
    request failed (its choices are then incomplete); `cancelled` after `cancel()`."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: RequestParams,
                 loop: asyncio.AbstractEventLoop | None = None,
                 async_wake: asyncio.Event | None = None):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.choices = [Choice(i) for i in range(params.n)]
        self.created = time.time()
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.finished = False
        self.cancelled = False
        self.error: str | None = None
        self._events: collections.deque = collections.deque()
        self._engine = None  # the Engine that serves it (set by submit)
        self._loop = loop
        self._async_wake = async_wake if async_wake is not None or loop is None else (
            asyncio.Event())
        self._wake = threading.Event()

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    def cancel(self) -> None:
        """Stops the request and frees its slots (a no-op once finished)."""
        if not self.finished and self._engine is not None:
            self._engine._cancel(self)

    @property
    def has_events(self) -> bool:
        return bool(self._events)

    def next_events(self) -> list[Event]:
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until there are events or the request finished; False on timeout."""
        if self._events or self.finished:
            return True
        self._wake.clear()
        if self._events or self.finished:
            return True
        return self._wake.wait(timeout)

    async def wait_async(self) -> None:
        """`wait` for handles submitted with an event loop (the server's)."""
        await wait_any([self])

    def stream(self, timeout: float | None = None) -> Iterator[Event]:
        """Events until the end (sync consumers); TimeoutError if none comes in `timeout`."""
        while True:
            events = self.next_events()
            yield from events
            if self.finished and not self._events:
                return
            if not events and not self.wait(timeout):
                raise TimeoutError(f"request {self.id}: no output in {timeout}s")

    def result(self, timeout: float | None = None) -> RequestHandle:
        """Waits for the end (sync consumers); returns self."""
        for _ in self.stream(timeout):
            pass
        return self


class EngineMetrics:
    """Hooks the engine calls on its thread (the server's Prometheus metrics implement them)."""

    def first_token(self, seconds: float) -> None:
        """Time from arrival to a request's first token."""

    def inter_token(self, seconds: float) -> None:
        """Time between two tokens of one choice."""

    def tokens(self, n: int) -> None:
        """n more tokens were generated."""

    def finished(self, handle: RequestHandle) -> None:
        """A request ended (finished, failed or cancelled)."""


async def wait_any(handles: Sequence[RequestHandle]) -> None:
    """Until one of `handles` has events or all of them finished; the handles come from one
    `submit_many(..., loop=...)` call on this loop (they share its wake-up event)."""
    wake = handles[0]._async_wake
    while not (any(h._events for h in handles) or all(h.finished for h in handles)):
        wake.clear()
        await wake.wait()


__all__ = ["Choice", "EngineMetrics", "EngineUnavailable", "Event", "QueueFull", "RequestError",
           "RequestHandle", "RequestParams", "TokenLogprob", "wait_any"]
