"""The HTTP server: the OpenAI API over the continuous-batching engine (FastAPI on uvicorn).

    app = create_app(engine, served, api_key=None)      # then uvicorn.run(app, ...)

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (streaming as server-sent
events ending in `data: [DONE]`), `GET /v1/models`, `GET /health` (200 while serving, 503 once
the engine failed or shuts down), `GET /metrics` (Prometheus text).

Faults: a bad field is 400 with OpenAI's error body naming it (protocol.py), a prompt that
does not fit the context too; a body past max_body_bytes is 413 (bodies are parsed and
tokenized off the event loop, so a large one does not stall the running streams); a full
queue (requests a free slot takes at once do not wait in it) is 429; with `api_key`, /v1 needs
`Authorization: Bearer KEY` (401 otherwise); an unknown model is 404. A client that goes away
cancels its request at once (its slots serve the next one): a stream notices through
Starlette's disconnect listener, a plain request by watching its connection. An exception in
one request is that request's 500; the engine and the other requests go on.

Access log: one JSON object per /v1 request on the `mpt_jax.access` logger: id, method, path,
status, prompt_tokens, completion_tokens, latency_s, ttft_s, finish_reasons, stream, and
disconnected / error where they apply.

Metrics (prefix mpt_jax_): requests_total{endpoint,status}, prompt_tokens_total,
generation_tokens_total, queue_depth, batch_slots_used, batch_slots, batch_occupancy,
backend_compilations, time_to_first_token_seconds, inter_token_latency_seconds and
request_latency_seconds histograms.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid

import prometheus_client as prom
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mpt_jax.infer import protocol, slots
from mpt_jax.infer.engine import Engine
from mpt_jax.infer.protocol import ApiError, ServedModel
from mpt_jax.infer.request import (
    EngineMetrics,
    EngineUnavailable,
    QueueFull,
    RequestError,
    RequestHandle,
    wait_any,
)

access_log = logging.getLogger("mpt_jax.access")
log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
                    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
_ACCESS_KEY = "mpt_jax.access"
MAX_BODY_BYTES = 32 << 20  # a 65k-token prompt is well under 1 MB of text


class ServerMetrics(EngineMetrics):
    """Prometheus metrics in their own registry (the engine calls the EngineMetrics hooks)."""

    def __init__(self):
        r = self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("mpt_jax_requests", "HTTP requests by endpoint and status",
                                     ["endpoint", "status"], registry=r)
        self.prompt_tokens = prom.Counter("mpt_jax_prompt_tokens", "Prompt tokens of finished "
                                          "requests", registry=r)
        self.generation_tokens = prom.Counter("mpt_jax_generation_tokens", "Generated tokens",
                                              registry=r)
        self.ttft = prom.Histogram("mpt_jax_time_to_first_token_seconds", "Arrival to first "
                                   "token", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = prom.Histogram("mpt_jax_inter_token_latency_seconds", "Between two tokens "
                                  "of one choice", buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = prom.Histogram("mpt_jax_request_latency_seconds", "Arrival to the last "
                                      "token", buckets=_REQUEST_BUCKETS, registry=r)
        self._gauges = {name: prom.Gauge(f"mpt_jax_{name}", doc, registry=r) for name, doc in (
            ("queue_depth", "Requests waiting for a slot"),
            ("batch_slots_used", "KV-cache slots held by requests"),
            ("batch_slots", "KV-cache slots (max_batch)"),
            ("batch_occupancy", "Fraction of the slots held"),
            ("backend_compilations", "XLA compilations in this process (flat after warm-up)"))}

    def attach(self, engine: Engine) -> None:
        g = self._gauges
        g["queue_depth"].set_function(lambda: engine.queue_depth)
        g["batch_slots_used"].set_function(lambda: engine.slots_used)
        g["batch_slots"].set_function(lambda: engine.max_batch)
        g["batch_occupancy"].set_function(lambda: engine.slots_used / engine.max_batch)
        g["backend_compilations"].set_function(slots.backend_compiles)

    # EngineMetrics hooks (engine thread)
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def tokens(self, n: int) -> None:
        self.generation_tokens.inc(n)

    def finished(self, handle: RequestHandle) -> None:
        self.prompt_tokens.inc(len(handle.prompt_ids))
        if handle.finished_at is not None and handle.first_token_at is not None:
            self.latency.observe(handle.finished_at - handle.arrival)


class _AccessLog:
    """ASGI middleware: one JSON line per /v1 request, when its response ends, and the
    requests counter of every endpoint. Handlers add fields to scope[_ACCESS_KEY]."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, info = time.perf_counter(), [500], {}
        scope[_ACCESS_KEY] = info

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            self.metrics.requests.labels(_endpoint(path), str(status[0])).inc()
            if path.startswith("/v1/"):
                record = {"id": info.pop("id", None), "method": scope.get("method"),
                          "path": path, "status": status[0],
                          "latency_s": round(time.perf_counter() - t0, 6), **info}
                access_log.info(json.dumps(record))


_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def _endpoint(path: str) -> str:
    """The metrics label of a request path: its route, so that a scanner's made-up paths add
    one series ("other"), not one each."""
    if path in _ENDPOINTS:
        return path
    return "/v1/models/{model_id}" if path.startswith("/v1/models/") else "other"


def _handles_info(info: dict, handles, stream: bool) -> None:
    info.update(prompt_tokens=sum(len(h.prompt_ids) for h in handles),
                completion_tokens=sum(h.completion_tokens for h in handles), stream=stream,
                finish_reasons=[c.finish_reason for h in handles for c in h.choices])
    firsts = [h.first_token_at - h.arrival for h in handles if h.first_token_at is not None]
    if firsts:
        info["ttft_s"] = round(min(firsts), 6)
    errors = [h.error for h in handles if h.error]
    if errors:
        info["error"] = errors[0]


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def create_app(engine: Engine, served: ServedModel, *, api_key: str | None = None,
               metrics: ServerMetrics | None = None, shutdown_timeout: float = 0.0,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app over `engine` (started with the app if it is not running yet; shut
    down with it, open requests given `shutdown_timeout` seconds). metrics: the engine's
    ServerMetrics, if it was built with one (else fresh ones, without engine latencies).
    max_body_bytes: the largest request body (413 past it)."""
    metrics = metrics or ServerMetrics()
    metrics.attach(engine)
    token_text = protocol.TokenText(served.tokenizer)
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown, shutdown_timeout)

    app = FastAPI(title="mpt_jax", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_AccessLog, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        info = request.scope.get(_ACCESS_KEY)
        if info is not None:
            info["error"] = e.message
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        err = ApiError(e.status_code, str(e.detail), type_="invalid_request_error")
        return JSONResponse(err.body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        err = ApiError(500, f"internal error: {type(e).__name__}: {e}".splitlines()[0],
                       type_="server_error")
        return JSONResponse(err.body(), status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        if not hmac.compare_digest(key.strip().encode(), api_key.encode()):
            raise ApiError(401, "incorrect API key provided", code="invalid_api_key")

    async def body_of(request: Request):
        """The JSON body, at most max_body_bytes (413 past it, before reading the rest)."""
        too_big = ApiError(413, f"the request body is larger than {max_body_bytes} bytes",
                           code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise too_big
        raw, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise too_big
            raw.append(chunk)
        try:  # (off the event loop: a large body must not stall the running streams)
            return await asyncio.to_thread(json.loads, b"".join(raw))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    def submit(parsed, rid: str, chat: bool) -> list[RequestHandle]:
        try:
            return engine.submit_many([(p, parsed.params) for p in parsed.prompts],
                                      loop=asyncio.get_running_loop(), request_id=rid)
        except RequestError as e:
            param = "messages" if chat and e.param == "prompt" else e.param
            raise ApiError(400, str(e), param=param) from None
        except QueueFull as e:
            raise ApiError(429, str(e), type_="rate_limit_error",
                           code="rate_limit_exceeded") from None
        except EngineUnavailable as e:
            raise ApiError(503, str(e), type_="server_error") from None

    async def serve(request: Request, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        info = request.scope[_ACCESS_KEY]
        info["id"] = rid
        authorize(request)
        body = await body_of(request)
        parsed = await asyncio.to_thread(  # tokenizing: off the event loop too
            protocol.parse_chat if chat else protocol.parse_completion, body, served)
        handles = submit(parsed, rid, chat)
        if parsed.stream:
            return StreamingResponse(_stream(rid, parsed, handles, info),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _complete(request, rid, parsed, handles, info)

    async def _complete(request, rid, parsed, handles, info):
        done = asyncio.ensure_future(_until_finished(handles))
        gone = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (done, gone):
                task.cancel()
            if not all(h.finished for h in handles):
                info["disconnected"] = True
                for h in handles:
                    h.cancel()
            _handles_info(info, handles, stream=False)
        errors = [h.error for h in handles if h.error]
        if errors:
            raise ApiError(503 if engine.error or not engine.alive else 500, errors[0],
                           type_="server_error")
        return JSONResponse(protocol.response_body(rid, parsed, served, handles, token_text))

    async def _until_finished(handles):
        while not all(h.finished for h in handles):
            await wait_any(handles)
            for h in handles:
                h.next_events()  # (the choices hold the text; events only stream)

    async def _until_disconnect(request):
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def _stream(rid, parsed, handles, info):
        created, n, chat = int(handles[0].created), parsed.params.n, parsed.chat
        want_lp = parsed.params.logprobs is not None
        offsets = {}  # completions' text_offset per choice
        try:
            if chat:  # the role first, as OpenAI's first chunk
                yield _sse(protocol.chunk_body(rid, parsed, served, created, [
                    {"index": i * n + c.index, "delta": {"role": "assistant", "content": ""},
                     "logprobs": None, "finish_reason": None}
                    for i, h in enumerate(handles) for c in h.choices]))
            while True:
                out = []
                for i, h in enumerate(handles):
                    merged: dict = {}  # one entry per choice a chunk, as OpenAI sends
                    for ev in h.next_events():
                        text, lps, finish = merged.get(ev.index, ("", (), None))
                        merged[ev.index] = (text + ev.text, lps + ev.logprobs,
                                            ev.finish_reason or finish)
                    for j, (text, lps, finish) in merged.items():
                        if not (text or finish or (want_lp and lps)):
                            continue
                        index = i * n + j
                        lp = None
                        if want_lp and chat:
                            lp = protocol.chat_logprobs(lps, token_text)
                        elif want_lp:
                            lp = protocol.completion_logprobs(lps, token_text,
                                                              offsets.get(index, 0))
                            offsets[index] = offsets.get(index, 0) + sum(
                                len(token_text(e.token_id)[0]) for e in lps)
                        choice = {"index": index, "logprobs": lp, "finish_reason": finish}
                        if chat:
                            choice["delta"] = {"content": text} if text else {}
                        else:
                            choice["text"] = text
                        out.append(choice)
                if out:
                    yield _sse(protocol.chunk_body(rid, parsed, served, created, out))
                if all(h.finished for h in handles) and not any(h.has_events for h in handles):
                    break
                if not out:
                    await wait_any(handles)
            errors = [h.error for h in handles if h.error]
            if errors:
                yield _sse(ApiError(500, errors[0], type_="server_error").body())
            elif parsed.include_usage:
                yield _sse(protocol.chunk_body(rid, parsed, served, created, [],
                                               protocol.usage(handles)))
            yield "data: [DONE]\n\n"
        finally:
            if not all(h.finished for h in handles):
                info["disconnected"] = True
                for h in handles:
                    h.cancel()
            _handles_info(info, handles, stream=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return protocol.models_body(served, started)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        authorize(request)
        if model_id != served.name:
            raise ApiError(404, f"the model {model_id!r} does not exist", param="model",
                           code="model_not_found")
        return protocol.models_body(served, started)["data"][0]

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": engine.error}, status_code=503)
        if not engine.alive or not engine.accepting:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(prom.generate_latest(metrics.registry),
                                 media_type=prom.CONTENT_TYPE_LATEST)

    return app


__all__ = ["ServerMetrics", "access_log", "create_app"]
