"""The OpenAI API's completions and chat completions: request bodies checked field by field
into engine requests, and response / stream-chunk bodies built from the engine's output.

Fields (as OpenAI defines them; vLLM's `top_k` and `stop_token_ids` extensions too):
  completions       prompt (a string, a list of strings, a list of token ids, or a list of
                    lists of token ids), max_tokens (default 16), logprobs (0..top_logprobs:
                    the chosen token's log-probability and that many alternatives), echo
                    (false only), suffix (null only), best_of (= n only)
  chat completions  messages ({role, content}; content a string or a list of text parts),
                    max_tokens / max_completion_tokens (default: the rest of the context),
                    logprobs (bool), top_logprobs (0..top_logprobs, with logprobs)
  both              model, temperature (0..2, default 1), top_p (0..1], top_k, n, stop (a
                    string or a list of strings), seed, stream, stream_options.include_usage,
                    presence_penalty / frequency_penalty (-2..2), user (ignored)
A field of the wrong type or out of range, and a feature this server does not implement
(tools, logit_bias, response formats other than text), is an `ApiError` (HTTP 400) naming the
field, with OpenAI's error body. Unknown fields are ignored, as vLLM does.

Chat messages are rendered by the checkpoint's chat template (tokenizer_config.json's
`chat_template`) or ChatML when it has none, with the generation prompt, and `<|im_end|>` ends
a chat turn when the tokenizer has that token.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Mapping, Sequence

import tokenizers

from mpt_jax.data import finetune
from mpt_jax.infer.request import RequestHandle, RequestParams, TokenLogprob

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 16  # stop strings per request


class ApiError(Exception):
    """An HTTP error with OpenAI's body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = (
            status, message, param, type_, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(param: str | None, message: str) -> ApiError:
    return ApiError(400, message, param=param)


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """What the server serves, as the protocol needs it."""

    name: str
    tokenizer: tokenizers.Tokenizer
    max_seq_len: int
    vocab_size: int
    chat_template: str = finetune.CHATML_TEMPLATE
    template_tokens: tuple[tuple[str, str], ...] = ()
    chat_stop_ids: tuple[int, ...] = ()  # tokens that end a chat turn (<|im_end|>)
    top_logprobs: int = 20


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    chat: bool
    prompts: list[list[int]]
    params: RequestParams  # n, logprobs included
    stream: bool
    include_usage: bool


# ---------------------------------------------------------------------------------------------
# Field checks
# ---------------------------------------------------------------------------------------------
_MISSING = object()


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _get(body: Mapping, name: str, default):
    value = body.get(name, _MISSING)
    return default if value is _MISSING or value is None else value


def _int(body, name, default, low=None, high=None):
    value = _get(body, name, default)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise bad(name, f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        span = (f">= {low}" if high is None else f"between {low} and {high}" if low is not None
                else f"<= {high}")
        raise bad(name, f"{name} must be {span}, got {value}")
    return value


def _num(body, name, default, low, high, *, low_open=False):
    value = _get(body, name, default)
    if not _is_num(value):
        raise bad(name, f"{name} must be a number, got {value!r}")
    if value < low or value > high or (low_open and value == low):
        raise bad(name, f"{name} must be in {'(' if low_open else '['}{low}, {high}], got "
                        f"{value}")
    return float(value)


def _bool(body, name, default):
    value = _get(body, name, default)
    if not isinstance(value, bool):
        raise bad(name, f"{name} must be true or false, got {value!r}")
    return value


def _stop(body) -> tuple[str, ...]:
    value = _get(body, "stop", [])
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", f"stop must be a string or a list of strings, got {value!r}")
    if len(stops) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} stop strings, got {len(stops)}")
    return tuple(s for s in stops if s)


def _refuse_unsupported(body, chat: bool) -> None:
    """Features whose silent omission would change the answer."""
    if _get(body, "logit_bias", {}):
        raise bad("logit_bias", "logit_bias is not supported by this server")
    if not chat:
        if _get(body, "echo", False) is not False:
            raise bad("echo", "echo is not supported by this server")
        if _get(body, "suffix", "") != "":
            raise bad("suffix", "suffix (insertion) is not supported by this server")
        return
    for name in ("tools", "functions"):
        if _get(body, name, []):
            raise bad(name, f"{name} (tool calling) is not supported by this server")
    choice = _get(body, "tool_choice", "none")
    if choice not in ("none", "auto"):
        raise bad("tool_choice", "tool calling is not supported by this server")
    fmt = _get(body, "response_format", {"type": "text"})
    if not isinstance(fmt, Mapping) or fmt.get("type", "text") != "text":
        raise bad("response_format", "only response_format {\"type\": \"text\"} is supported")


def _common(body, served: ServedModel, chat: bool) -> dict:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"model must be a string, got {model!r}")
    if model is not None and model != served.name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                            f"{served.name!r}", param="model", code="model_not_found")
    _refuse_unsupported(body, chat)
    n = _int(body, "n", 1, 1)
    best_of = _int(body, "best_of", None, 1)
    if best_of is not None and best_of != n:
        raise bad("best_of", f"best_of must equal n ({n}): this server returns every sample")
    stream = _bool(body, "stream", False)
    options = _get(body, "stream_options", {})
    if not isinstance(options, Mapping):
        raise bad("stream_options", f"stream_options must be an object, got {options!r}")
    if options and not stream:
        raise bad("stream_options", "stream_options is only allowed with stream: true")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("stream_options", "stream_options.include_usage must be true or false")
    stop_ids = _get(body, "stop_token_ids", [])
    if not isinstance(stop_ids, list) or not all(_is_int(t) for t in stop_ids):
        raise bad("stop_token_ids", "stop_token_ids must be a list of token ids")
    bad_id = next((t for t in stop_ids if not 0 <= t < served.vocab_size), None)
    if bad_id is not None:
        raise bad("stop_token_ids", f"stop_token_ids: {bad_id} is not a token id")
    seed = _int(body, "seed", None)
    top_k = _int(body, "top_k", 0, -1)
    return {
        "n": n, "stream": stream, "include_usage": include_usage, "seed": seed, "stop": _stop(body),
        "temperature": _num(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _num(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        "top_k": max(top_k, 0),  # vLLM's -1 = off
        "presence_penalty": _num(body, "presence_penalty", 0.0, -2.0, 2.0),
        "frequency_penalty": _num(body, "frequency_penalty", 0.0, -2.0, 2.0),
        "stop_token_ids": tuple(stop_ids)}


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------
def _prompts(body, served: ServedModel) -> list[list[int]]:
    value = body.get("prompt", _MISSING)
    if value is _MISSING or value is None:
        raise bad("prompt", "prompt is required")
    tok = served.tokenizer

    def ids_of(p, where):
        if isinstance(p, str):
            ids = tok.encode(p).ids
            if not ids:
                raise bad("prompt", f"{where} is empty (it encodes to no tokens)")
            return ids
        if isinstance(p, list) and p and all(_is_int(t) for t in p):
            out = next((t for t in p if not 0 <= t < served.vocab_size), None)
            if out is not None:
                raise bad("prompt", f"{where}: {out} is not a token id (vocabulary "
                                    f"{served.vocab_size})")
            return list(p)
        raise bad("prompt", f"{where} must be a non-empty string or list of token ids")

    if isinstance(value, str) or (isinstance(value, list) and value and _is_int(value[0])):
        return [ids_of(value, "prompt")]
    if not isinstance(value, list) or not value:
        raise bad("prompt", "prompt must be a string, a list of strings, a list of token ids "
                            "or a list of lists of token ids")
    return [ids_of(p, f"prompt[{i}]") for i, p in enumerate(value)]


def _message_text(message, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                raise bad("messages", f"messages[{i}].content[{j}]: only text parts "
                                      "({\"type\": \"text\", \"text\": ...}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise bad("messages", f"messages[{i}].content must be a string or a list of text parts")


def render_messages(body, served: ServedModel) -> list[int]:
    """The conversation rendered by the chat template, with the generation prompt, as ids."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list of {role, content} objects")
    rendered = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise bad("messages", f"messages[{i}] must be an object, got {m!r}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad("messages", f"messages[{i}].role must be one of {list(CHAT_ROLES)}, "
                                  f"got {role!r}")
        rendered.append({"role": role, "content": _message_text(m, i)})
    try:
        text = finetune.render_chat(rendered, served.chat_template, add_generation_prompt=True,
                                    template_tokens=dict(served.template_tokens))
    except ValueError as e:  # BadExample: the template refused the conversation
        raise bad("messages", str(e)) from None
    ids = served.tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise bad("messages", "the rendered conversation has no tokens")
    return ids


def parse_completion(body, served: ServedModel) -> ParsedRequest:
    return _parse(body, served, chat=False)


def parse_chat(body, served: ServedModel) -> ParsedRequest:
    return _parse(body, served, chat=True)


def _parse(body, served: ServedModel, *, chat: bool) -> ParsedRequest:
    if not isinstance(body, Mapping):
        raise bad(None, "the request body must be a JSON object")
    common = _common(body, served, chat)
    if chat:
        prompts = [render_messages(body, served)]
        limit = _int(body, "max_completion_tokens", None, 1)
        max_tokens = _int(body, "max_tokens", None, 1) if limit is None else limit
        if max_tokens is None:  # the rest of the context, as OpenAI's chat API
            max_tokens = max(served.max_seq_len - len(prompts[0]), 1)
        want = _bool(body, "logprobs", False)
        top = _int(body, "top_logprobs", None, 0, served.top_logprobs)
        if top is not None and not want:
            raise bad("top_logprobs", "top_logprobs needs logprobs: true")
        logprobs = (top or 0) if want else None
        stop_ids = tuple(dict.fromkeys(common.pop("stop_token_ids") + served.chat_stop_ids))
    else:
        prompts = _prompts(body, served)
        max_tokens = _int(body, "max_tokens", 16, 1)
        logprobs = _int(body, "logprobs", None, 0, served.top_logprobs)
        stop_ids = common.pop("stop_token_ids")
    stream, include_usage = common.pop("stream"), common.pop("include_usage")
    params = RequestParams(max_tokens=max_tokens, logprobs=logprobs, stop_token_ids=stop_ids,
                           **common)
    return ParsedRequest(chat, prompts, params, stream, include_usage)


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    """Per-token strings and bytes for log-probabilities (cached per id)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self.tok = tokenizer
        self.byte_level = type(tokenizer.decoder).__name__ == "ByteLevel"
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self.tok.decode([token_id], skip_special_tokens=False)
            raw = self.tok.id_to_token(token_id) or ""
            table = _byte_decoder()
            if self.byte_level and raw and all(c in table for c in raw):
                data = [table[c] for c in raw]
            else:
                data = list(text.encode("utf-8"))
            hit = self._cache[token_id] = (text, data)
        return hit

    def key(self, token_id: int) -> str:
        """The token as the completions API names it: its text, or `bytes:\\xNN...` where its
        bytes are not UTF-8 by themselves (part of a character: OpenAI's form), so that two
        such tokens never share a top_logprobs key."""
        text, data = self(token_id)
        try:
            bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)
        return text


def usage(handles: Sequence[RequestHandle]) -> dict:
    prompt = sum(len(h.prompt_ids) for h in handles)
    completion = sum(h.completion_tokens for h in handles)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def completion_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText,
                        offset: int = 0) -> dict:
    """The legacy completions `logprobs` object for `entries`; offset: text before them."""
    tokens, offsets = [], []
    for e in entries:
        offsets.append(offset)
        tokens.append(token_text.key(e.token_id))
        offset += len(token_text(e.token_id)[0])
    tops = [{token_text.key(i): lp for i, lp in e.top} for e in entries]
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": tops if any(e.top for e in entries) else None,
            "text_offset": offsets}


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: TokenText) -> dict:
    def one(token_id, lp):
        text, data = token_text(token_id)
        return {"token": text, "logprob": lp, "bytes": data}

    return {"content": [dict(one(e.token_id, e.logprob),
                             top_logprobs=[one(i, lp) for i, lp in e.top]) for e in entries],
            "refusal": None}


def response_body(rid: str, parsed: ParsedRequest, served: ServedModel,
                  handles: Sequence[RequestHandle], token_text: TokenText) -> dict:
    """The whole (non-streaming) response of finished handles."""
    n, choices = parsed.params.n, []
    for i, h in enumerate(handles):
        for c in h.choices:
            lp = None
            if parsed.params.logprobs is not None:
                lp = (chat_logprobs(c.logprobs, token_text) if parsed.chat
                      else completion_logprobs(c.logprobs, token_text))
            out = {"index": i * n + c.index, "logprobs": lp, "finish_reason": c.finish_reason}
            if parsed.chat:
                out["message"] = {"role": "assistant", "content": c.text}
            else:
                out["text"] = c.text
            choices.append(out)
    return {"id": rid, "object": "chat.completion" if parsed.chat else "text_completion",
            "created": int(handles[0].created), "model": served.name, "choices": choices,
            "usage": usage(handles)}


def chunk_body(rid: str, parsed: ParsedRequest, served: ServedModel, created: int,
               choices: list[dict], usage_: dict | None = None) -> dict:
    body = {"id": rid, "object": "chat.completion.chunk" if parsed.chat else "text_completion",
            "created": created, "model": served.name, "choices": choices}
    if parsed.include_usage:
        body["usage"] = usage_
    return body


def models_body(served: ServedModel, created: float) -> dict:
    return {"object": "list", "data": [{"id": served.name, "object": "model",
                                        "created": int(created), "owned_by": "mpt_jax",
                                        "max_model_len": served.max_seq_len}]}


def now() -> int:
    return int(time.time())
