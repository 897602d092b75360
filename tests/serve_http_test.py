"""The OpenAI-compatible server, for real: uvicorn on 127.0.0.1 (a free port) in a thread of
this process, the real `openai` client and httpx against it. Completions, chat (ChatML),
streaming, stop strings, max_tokens, usage, n and prompt lists; 16 concurrent staggered
requests equal Generator.generate on each prompt alone with no compilation; every bad request
(400 naming the field, 401, 404, 429); disconnects (streaming and not) free their slots; a
failing request is its own 500; metrics, health, models and the access log."""
import contextlib
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import (ROOT, SERVE_ENGINE, left_padded, slow_engine, subprocess_env, wait_for,
                      write_serve_checkpoint)

from mpt_jax.data import finetune
from mpt_jax.eval import loading
from mpt_jax.infer import slots
from mpt_jax.infer.engine import Engine
from mpt_jax.infer.generate import Generator
from mpt_jax.infer.protocol import ServedModel
from mpt_jax.infer.server import ServerMetrics, create_app

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

KEY = "sk-test-key"
NAME = "tiny-mpt"
REF_T, REF_N = 44, 24  # reference prompts padded to REF_T: one Generator compilation
TEXT = ("def main(argv=None):\n    parser = argparse.ArgumentParser()\n    return parser"
        ".parse_args(argv)\n\nclass Config:\n    name = 'x'\n")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    path = write_serve_checkpoint(str(tmp_path_factory.mktemp("ckpt")))
    loaded = loading.load(path, dtype="float32")
    tok = loaded.tokenizer
    gen = Generator(loaded.model)
    metrics = ServerMetrics()
    engine = Engine(gen, tok, eos_id=loaded.eos_id, metrics=metrics, **SERVE_ENGINE)
    engine.warm_up()
    im_end = tok.token_to_id("<|im_end|>")
    served = ServedModel(NAME, tok, SERVE_ENGINE["max_seq_len"], gen.config.vocab_size,
                         chat_stop_ids=(im_end,), top_logprobs=SERVE_ENGINE["top_logprobs"])
    app = create_app(engine, served, api_key=KEY, metrics=metrics, shutdown_timeout=5,
                     max_body_bytes=BODY_LIMIT)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    yield {"url": url, "client": client, "engine": engine, "gen": gen, "tok": tok,
           "eos": loaded.eos_id, "im_end": im_end}
    server.should_exit = True
    thread.join(60)
    assert not thread.is_alive() and not engine.alive


def _reference(s, prompt_ids, n, stops=()):
    """Generator.generate on the prompt alone (greedy): (tokens up to and with the first EOS
    or stop id, whether it stopped there)."""
    ids, mask = left_padded(prompt_ids, REF_T)
    out = s["gen"].generate(ids, attention_mask=mask, max_new_tokens=REF_N,
                            max_len=REF_T + REF_N)  # (the padding only shifts ALiBi rows)
    out = [int(t) for t in out.tokens[0]][:n]
    ends = {s["eos"], *stops}
    for i, t in enumerate(out):
        if t in ends:
            return out[:i + 1], True
    return out, False


def _text(s, prompt_ids, tokens, stops=()):
    """The completion text: the full decode past the prompt's text (end tokens dropped)."""
    tok, ends = s["tok"], {s["eos"], *stops}
    body = [t for t in tokens if t not in ends]
    return tok.decode(prompt_ids + body)[len(tok.decode(prompt_ids)):]


BODY_LIMIT = 1 << 18


def test_a_body_past_the_limit_is_413(srv):
    """Past max_body_bytes, declared or chunked: 413 with OpenAI's error body; a body just
    under it is read, parsed and tokenized (here: a prompt too long for the context, 400)."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = json.dumps({"prompt": "a" * BODY_LIMIT, "max_tokens": 1}).encode()
    r = httpx.post(srv["url"] + "/v1/completions", content=big, headers=headers, timeout=120)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(srv["url"] + "/v1/completions", headers=headers, timeout=120,
                   content=(big[i:i + 4096] for i in range(0, len(big), 4096)))  # chunked
    assert r.status_code == 413
    near = json.dumps({"prompt": "the cat " * (BODY_LIMIT // 9), "max_tokens": 1})
    assert len(near) < BODY_LIMIT
    assert _post(srv, "/v1/completions", json.loads(near)).status_code == 400  # too long


def _post(s, path, body, key=KEY, **kw):
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.post(s["url"] + path, json=body, headers=headers,
                      timeout=kw.pop("timeout", 120), **kw)


# ---------------------------------------------------------------------------------------------
# The openai client
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_completions_with_the_openai_client(srv):
    client, tok = srv["client"], srv["tok"]
    prompt = TEXT[:40]
    ids = tok.encode(prompt).ids
    ref, stopped = _reference(srv, ids, 10)
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0)
    c = r.choices[0]
    assert c.text == _text(srv, ids, ref)
    assert c.finish_reason == ("stop" if stopped else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(ids), len(ref), len(ids) + len(ref))
    assert r.object == "text_completion" and r.model == NAME and r.id.startswith("cmpl-")
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == c.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref)
    # A list of prompts with n=2: choice i * n + j, each greedy choice its prompt's reference.
    prompts = [TEXT[:25], TEXT[30:60]]
    r = client.completions.create(model=NAME, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        p_ids = tok.encode(prompts[c.index // 2]).ids
        assert c.text == _text(srv, p_ids, _reference(srv, p_ids, 6)[0])
    assert r.usage.prompt_tokens == sum(len(tok.encode(p).ids) for p in prompts)


def test_chat_with_the_openai_client(srv):
    client, tok = srv["client"], srv["tok"]
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Go"}]
    rendered = finetune.render_chat(messages, finetune.CHATML_TEMPLATE,
                                    add_generation_prompt=True)
    assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(rendered, add_special_tokens=False).ids
    ref, stopped = _reference(srv, ids, 12, stops=(srv["im_end"],))
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12,
                                       temperature=0, logprobs=True, top_logprobs=2)
    c = r.choices[0]
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref)
    assert c.message.role == "assistant"
    assert c.message.content == _text(srv, ids, ref, stops=(srv["im_end"],))
    assert c.finish_reason == ("stop" if stopped else "length")
    assert len(c.logprobs.content) == len(ref)
    for entry in c.logprobs.content:  # greedy: the chosen token is the most likely
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=12,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == c.message.content
    assert chunks[-1].choices[0].finish_reason == c.finish_reason


def test_stop_strings_cut_and_never_stream(srv):
    """A stop string that spans a token boundary of the greedy completion: the text ends
    before its first occurrence, streamed or not, and no streamed piece holds any of it."""
    client, tok = srv["client"], srv["tok"]
    prompt = TEXT[10:50]
    ids = tok.encode(prompt).ids
    ref, _ = _reference(srv, ids, 16)
    text = _text(srv, ids, ref)
    pieces = [tok.decode([t]) for t in ref]
    k = next(k for k in range(1, len(ref) - 1) if all(
        p and "\ufffd" not in p for p in pieces[:k + 2]))
    boundary = sum(len(p) for p in pieces[:k + 1])
    stop = text[boundary - 1:boundary + 1]
    want = text[:text.find(stop)]
    kw = {"model": NAME, "prompt": prompt, "max_tokens": 16, "temperature": 0}
    r = client.completions.create(stop=[stop, "never-there"], **kw).choices[0]
    assert r.text == want and r.finish_reason == "stop"
    streamed = [ch.choices[0].text for ch in client.completions.create(stop=stop, stream=True,
                                                                       **kw)]
    assert "".join(streamed) == want
    assert not any(stop in p or (p and stop.startswith(p[-1])) for p in streamed if p), streamed


def test_sixteen_concurrent_staggered_requests_equal_generator(srv):
    """16 requests of 16 prompt lengths (1 to 5 prefill chunks) and 16 max_tokens over 4
    slots, each sent 10 ms after the last: every greedy completion is Generator.generate's on
    its prompt alone; each request gets its own answer once; nothing compiles."""
    tok = srv["tok"]
    by_length = {}  # prompt tokens -> the first prefix of TEXT with that many
    for c in range(1, 2 * len(TEXT)):
        by_length.setdefault(len(tok.encode((TEXT * 2)[:c]).ids), (TEXT * 2)[:c])
    lengths = [2, 3, 5, 7, 8, 9, 12, 15, 16, 17, 21, 24, 29, 31, 34, 40]
    max_tokens = [4, 9, 6, 12, 5, 16, 8, 3, 10, 14, 7, 11, 13, 2, 15, 20]
    prompts = [by_length[n] for n in lengths]
    c0 = slots.backend_compiles()
    results = [None] * 16

    def one(i):
        time.sleep(0.01 * i)
        r = _post(srv, "/v1/completions", {"model": NAME, "prompt": prompts[i],
                                           "max_tokens": max_tokens[i], "temperature": 0})
        results[i] = r

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    compiled = slots.backend_compiles() - c0
    bodies = [r.json() for r in results]
    assert [r.status_code for r in results] == [200] * 16, bodies
    assert len({b["id"] for b in bodies}) == 16
    for prompt, n, b in zip(prompts, max_tokens, bodies):
        ids = tok.encode(prompt).ids
        ref, stopped = _reference(srv, ids, n)
        assert len(b["choices"]) == 1
        assert b["choices"][0]["text"] == _text(srv, ids, ref), (len(ids), n)
        assert b["usage"]["completion_tokens"] == len(ref)
        assert b["choices"][0]["finish_reason"] == ("stop" if stopped else "length")
    assert [len(tok.encode(p).ids) for p in prompts] == lengths
    assert compiled == 0


# ---------------------------------------------------------------------------------------------
# Bad requests
# ---------------------------------------------------------------------------------------------
BAD_COMPLETIONS = [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "temperature": 3}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_k": "a"}, "top_k"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 5}, "n"),  # more than the 4 slots
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "logprobs": 9}, "logprobs"),
    ({"prompt": "x", "seed": "s"}, "seed"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": "x"}, "frequency_penalty"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "stop_token_ids": [9999]}, "stop_token_ids"),
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [5, 9999]}, "prompt"),
    ({"prompt": {"a": 1}}, "prompt"),
    ({"prompt": list(range(1, 65))}, "prompt"),  # the whole context: no room for a token
    ({"prompt": list(range(1, 61)), "max_tokens": 10}, "max_tokens"),
    ({"prompt": "x", "model": 5}, "model"),
]
BAD_CHAT = [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json"}},
     "response_format"),
    ({"messages": [{"role": "user", "content": "hi " * 70}]}, "messages"),  # too long
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
]


def test_bad_requests_are_400_naming_the_field(srv):
    cases = [("/v1/completions", b, p) for b, p in BAD_COMPLETIONS] + [
        ("/v1/chat/completions", b, p) for b, p in BAD_CHAT]
    for path, body, param in cases:
        r = _post(srv, path, body)
        err = r.json()["error"]
        assert (r.status_code, err["param"], err["type"]) == (
            400, param, "invalid_request_error"), (path, body, err)
        assert err["message"] and "\n" not in err["message"]
    for raw in (b"{not json", b"[1, 2]"):
        r = httpx.post(srv["url"] + "/v1/completions", content=raw, timeout=30,
                       headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 400 and r.json()["error"]["message"]
    # the openai client raises its own exception type with the field
    with pytest.raises(openai.BadRequestError) as e:
        srv["client"].completions.create(model=NAME, prompt="x", max_tokens=100)
    assert e.value.body["param"] == "max_tokens"


def test_api_key_unknown_model_and_routes(srv):
    for key in (None, "wrong"):
        r = _post(srv, "/v1/completions", {"prompt": "x"}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv["url"] + "/v1/models", timeout=30,
                         headers={} if key is None else {"Authorization": f"Bearer {key}"}
                         ).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv["url"] + "/v1", api_key="wrong", max_retries=0
                      ).models.list()
    with pytest.raises(openai.NotFoundError):
        srv["client"].completions.create(model="gpt-4", prompt="x")
    assert httpx.get(srv["url"] + "/nowhere", timeout=30).status_code == 404
    models = srv["client"].models.list()
    assert [m.id for m in models.data] == [NAME]
    assert srv["client"].models.retrieve(NAME).id == NAME


def test_full_queue_is_429_then_the_queued_are_served(srv, monkeypatch):
    engine = srv["engine"]
    gate = threading.Event()
    real = engine._iteration

    def gated():
        gate.wait(60)
        real()

    monkeypatch.setattr(engine, "_iteration", gated)
    monkeypatch.setattr(engine, "max_queue", 2)
    room = 2 + engine.max_batch - engine.slots_used  # the free slots' requests never wait
    r = _post(srv, "/v1/completions", {"prompt": ["abc"] * (room + 1), "max_tokens": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # can never fit
    results = []
    threads = [threading.Thread(target=lambda: results.append(_post(srv, "/v1/completions", {
        "prompt": "abc", "max_tokens": 3, "temperature": 0}))) for _ in range(room)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while engine.queue_depth < room:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    r = _post(srv, "/v1/completions", {"prompt": "abc", "max_tokens": 3})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    with pytest.raises(openai.RateLimitError):
        srv["client"].completions.create(model=NAME, prompt="abc", max_tokens=3)
    gate.set()
    for t in threads:
        t.join(120)
    assert [r.status_code for r in results] == [200] * room


# ---------------------------------------------------------------------------------------------
# Disconnects, failures
# ---------------------------------------------------------------------------------------------
def test_disconnects_free_their_slots(srv, monkeypatch):
    """Four long streams fill the 4 slots; one client goes away mid-stream: its slot is free
    at once and a new request is served beside the three others (a full batch again). A
    plain request whose client times out frees its slot too."""
    engine = srv["engine"]
    body = {"model": NAME, "prompt": "abc", "max_tokens": 50, "temperature": 0}
    assert _post(srv, "/v1/completions", body).json()["choices"][0]["finish_reason"] == \
        "length"  # (no EOS in these 50 greedy tokens: the streams stay long)
    slow_engine(engine, monkeypatch, 0.03)
    headers = {"Authorization": f"Bearer {KEY}"}
    with contextlib.ExitStack() as stack:
        streams = []
        for _ in range(4):  # four connections
            client = stack.enter_context(httpx.Client(timeout=120, headers=headers))
            streams.append(client.stream("POST", srv["url"] + "/v1/completions",
                                         json=dict(body, stream=True)))
        # Each has begun; the line iterators stay referenced (closing one closes its
        # connection, which is itself a disconnect).
        lines = [s.__enter__().iter_lines() for s in streams]
        for it in lines:
            assert next(it).startswith("data: ")
        wait_for(lambda: engine.slots_used == 4)
        cancelled = engine.stats["cancelled"]
        streams[0].__exit__(None, None, None)  # the first client goes away
        wait_for(lambda: engine.slots_used == 3)
        assert engine.stats["cancelled"] == cancelled + 1
        r = _post(srv, "/v1/completions", {"prompt": "xyz", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        assert engine.slots_used == 3  # it ran beside the three streams, which still run
        for s in streams[1:]:
            s.__exit__(None, None, None)
    wait_for(lambda: engine.slots_used == 0)
    cancelled = engine.stats["cancelled"]
    with pytest.raises(httpx.ReadTimeout):
        _post(srv, "/v1/completions", body, timeout=0.3)
    wait_for(lambda: engine.stats["cancelled"] == cancelled + 1 and engine.slots_used == 0)


def test_a_failing_request_is_its_own_500(srv, monkeypatch):
    engine = srv["engine"]
    real = engine._on_token

    def on_token(seq, *args):
        if seq.handle.id.startswith("cmpl-") and seq.handle.params.max_tokens == 7:
            raise RuntimeError("boom")
        return real(seq, *args)

    monkeypatch.setattr(engine, "_on_token", on_token)
    results = {}

    def one(n):
        results[n] = _post(srv, "/v1/completions", {"prompt": "abc", "max_tokens": n,
                                                    "temperature": 0})

    threads = [threading.Thread(target=one, args=(n,)) for n in (5, 7, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results[7].status_code == 500 and "boom" in results[7].json()["error"]["message"]
    assert results[5].status_code == results[9].status_code == 200
    assert httpx.get(srv["url"] + "/health", timeout=30).json() == {"status": "ok"}


def test_metrics_health_and_access_log(srv, caplog):
    with caplog.at_level(logging.INFO, logger="mpt_jax.access"):
        r = _post(srv, "/v1/completions", {"prompt": "abc", "max_tokens": 3, "temperature": 0})
        _post(srv, "/v1/completions", {"prompt": "abc", "max_tokens": 0})
    records = [json.loads(rec.getMessage()) for rec in caplog.records
               if rec.name == "mpt_jax.access"]
    ok, bad = records[-2:]
    assert ok["id"] == r.json()["id"] and ok["status"] == 200 and ok["prompt_tokens"] > 0
    assert ok["completion_tokens"] == 3 and ok["latency_s"] > 0 and ok["ttft_s"] > 0
    assert ok["finish_reasons"] == ["length"] and ok["stream"] is False
    assert bad["status"] == 400 and "max_tokens" in bad["error"]
    for path in ("/made/up", "/made/up/too"):  # a scanner's paths: one series, not one each
        assert httpx.get(srv["url"] + path, timeout=30).status_code == 404
    text = httpx.get(srv["url"] + "/metrics", timeout=30).text
    assert "/made/up" not in text

    def value(name):
        line = next(x for x in text.splitlines() if x.startswith((name + " ", name + "{")))
        return float(line.rsplit(" ", 1)[1])

    assert value('mpt_jax_requests_total{endpoint="/v1/completions",status="200"}') >= 1
    assert value('mpt_jax_requests_total{endpoint="/v1/completions",status="400"}') >= 1
    assert value('mpt_jax_requests_total{endpoint="other",status="404"}') >= 2
    assert value("mpt_jax_generation_tokens_total") >= 3
    assert value("mpt_jax_prompt_tokens_total") >= 1
    assert value("mpt_jax_time_to_first_token_seconds_count") >= 1
    assert value("mpt_jax_inter_token_latency_seconds_count") >= 2
    assert value("mpt_jax_batch_slots") == 4 and value("mpt_jax_queue_depth") == 0
    assert value("mpt_jax_batch_occupancy") == 0
    assert value("mpt_jax_backend_compilations") == slots.backend_compiles()
    assert httpx.get(srv["url"] + "/health", timeout=30).json() == {"status": "ok"}
    assert np.isfinite(value("mpt_jax_request_latency_seconds_sum"))


# ---------------------------------------------------------------------------------------------
# serve.py itself
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_serve_py_bad_arguments_are_one_line(tmp_path):
    env = subprocess_env()
    for argv, what in (([f"--checkpoint={tmp_path}/none"], "does not exist"),
                       ([f"--checkpoint={tmp_path}", "--max_batch=0"], "--max_batch"),
                       ([f"--checkpoint={tmp_path}", "--mesh=1,2"], "--mesh"),
                       ([f"--checkpoint={tmp_path}", "--port=70000"], "--port")):
        r = subprocess.run([sys.executable, "serve.py", *argv], check=False, cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and what in r.stderr, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.slow
def test_serve_py_sigterm_finishes_in_flight_then_exits_0(tmp_path):
    """serve.py in a subprocess: four streams in flight (two short, two long) when SIGTERM
    comes; new connections are refused, the short streams complete, the long ones end at the
    --shutdown_timeout bound with an OpenAI error event and [DONE] (not a cut connection), and
    the process exits 0 within the bound."""
    path = write_serve_checkpoint(str(tmp_path / "ckpt"))
    bound = 1.0
    proc = subprocess.Popen(
        [sys.executable, "serve.py", f"--checkpoint={path}", "--port=0", "--max_batch=4",
         "--max_seq_len=8192", "--prefill_chunk=8", "--dtype=float32", "--log_level=warning",
         f"--shutdown_timeout={bound}", f"--api_key={KEY}"],
        cwd=ROOT, env=subprocess_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any("listening on http://" in x for x in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        url = next(x for x in lines if "listening on" in x).split("listening on ")[1].strip()
        started, ends = threading.Barrier(5, timeout=120), {}

        def stream(i, max_tokens):
            body = {"model": "ckpt", "prompt": "abc" * (i + 1), "max_tokens": max_tokens,
                    "temperature": 0, "stream": True}
            events = []
            try:
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120,
                                  headers={"Authorization": f"Bearer {KEY}"}) as r:
                    it = r.iter_lines()
                    events.append(next(it))
                    started.wait()
                    events += [x for x in it if x]
            except httpx.HTTPError as e:  # cut at the bound
                events.append(type(e).__name__)
            ends[i] = events

        threads = [threading.Thread(target=stream, args=(i, n))
                   for i, n in enumerate((4, 6, 8000, 8000))]
        for t in threads:
            t.start()
        started.wait()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no new connections
            httpx.get(url + "/health", timeout=10)
        rc = proc.wait(timeout=bound + 60)
        elapsed = time.monotonic() - t0
        for t in threads:
            t.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    assert rc == 0 and elapsed < bound + 20, "".join(lines)
    for i in (0, 1):  # the short ones finished
        assert ends[i][-1] == "data: [DONE]", ends[i]
        assert json.loads(ends[i][-2][6:])["choices"][0]["finish_reason"] == "length"
    for i in (2, 3):  # the long ones were ended by the engine: an error event, then [DONE]
        assert ends[i][-1] == "data: [DONE]", ends[i][-3:]
        assert "shut down" in json.loads(ends[i][-2][6:]).get("error", {}).get("message", ""), (
            ends[i][-3:])
    assert not any("Traceback" in x for x in lines), "".join(lines)
    records = [json.loads(x) for x in lines if x.startswith("{")]
    assert sorted(r["completion_tokens"] for r in records)[:2] == [4, 6]
    assert any("stopped" in x for x in lines), "".join(lines)
