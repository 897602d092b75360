"""Finetuning examples -> token ids and a per-token loss mask (llm-foundry's finetuning data).

    tokenize_example(example, tokenizer, template="auto", target_responses="last")
        -> {"input_ids": int32 [n], "loss_mask": int32 [n]}

Two kinds of rows, told apart by their keys (as llm-foundry's `_get_example_type`):

  prompt/response  {"prompt": str, "response": str} ("completion" is accepted for "response", as
                   llm-foundry's ALLOWED_RESPONSE_KEYS has it). Templates: `none` uses the prompt
                   as given (llm-foundry's default), `instruct` wraps it in MPT-7B-Instruct's
                   format (`INSTRUCT_FORMAT`: the Dolly / dolly_hhrlhf prompt llm-foundry's
                   `dolly_preprocessing_function` writes).
  chat             {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str},
                   ...]}. Templates: `chatml` renders ChatML as MPT-7B-Chat
                   (`<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, generation prompt
                   `<|im_start|>assistant\\n`: llm-foundry's `_DEFAULT_CHAT_TEMPLATE`); `tokenizer`
                   renders the tokenizer's own Jinja chat template (tokenizer_config.json's
                   `chat_template`, or chat_template.jinja), as transformers'
                   `apply_chat_template` does.
  `auto` (the default) is `none` for prompt/response rows and, for chat rows, the tokenizer's
  chat template when it has one, else ChatML: llm-foundry's choice in
  `_slice_chat_formatted_example`.

Construction (llm-foundry's `_tokenize_*_formatted_example` + `stitch_turns_decoder_only`):
  - A chat is cut into turns, one per assistant message: the turn's prompt is the rendered
    conversation up to that message with the generation prompt, minus what earlier turns hold;
    its response is the rest of the rendering through that message (so ChatML responses end in
    `<|im_end|>\\n`). A prompt/response row is one turn.
  - Each turn's prompt and response are tokenized separately (no special tokens added) and
    concatenated; EOS (`eos_text`, `<|endoftext|>` by default) follows the example's final
    response unless it already ends in it. llm-foundry appends EOS to the last turn only, and so
    do we: earlier assistant turns end in the template's own terminator (`<|im_end|>`), which is
    what the model sees in the history at inference time, and an EOS inside the history would
    teach it to stop a conversation after its first answer.
  - loss_mask is 1 exactly on response tokens (and the EOS): with `target_responses="last"` on
    the final assistant turn only, with `"all"` on every assistant turn; never on system, user
    or tool text, nor on any prompt (llm-foundry's target_prompts="none").

Row checks (one `BadExample` naming what is wrong; `mpt_jax.data.prepare` counts them as bad
rows): a missing or non-string prompt/response, an empty prompt or response, a `messages` that
is not a list of {role, content} objects, an unknown role, non-string content, an empty
assistant message, no assistant message, a conversation that does not end with an assistant
message, or two consecutive messages of one role (llm-foundry's
`_validate_chat_formatted_example`). Unlike llm-foundry, other keys of a row (an id, a source
name) are ignored rather than refused. Truncation to a maximum length is `fit_example`'s job.

Records of the examples layout (`mpt_jax.data.prepare --format ...` writes them, the pipeline
reads them): the token ids (little-endian, the shard dtype), then one uint8 loss-mask byte per
token (`encode_record` / `decode_record`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
import tokenizers

from mpt_jax.data import tokenizer as tokenizer_lib

FORMATS = ("prompt_response", "chat")
TEMPLATES = ("auto", "none", "instruct", "chatml", "tokenizer")
TARGET_RESPONSES = ("last", "all")
ROLES = ("system", "user", "assistant", "tool")
ON_TOO_LONG = ("truncate", "drop")

# MPT-7B-Instruct's training prompt: llm-foundry's dolly_preprocessing_function PROMPT_FORMAT,
# and the rows of mosaicml/dolly_hhrlhf, which MPT-7B-Instruct was finetuned on.
INSTRUCT_INTRO = ("Below is an instruction that describes a task. Write a response that "
                  "appropriately completes the request.")
INSTRUCT_FORMAT = INSTRUCT_INTRO + "\n\n### Instruction:\n{instruction}\n\n### Response:\n"

# llm-foundry's _DEFAULT_CHAT_TEMPLATE (ChatML, as MPT-7B-Chat).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

_PROMPT_KEY = "prompt"
_RESPONSE_KEYS = ("response", "completion")
_MESSAGES_KEY = "messages"


class BadExample(ValueError):
    """A row that cannot be a training example; the message says what is wrong with it."""


@dataclasses.dataclass(frozen=True)
class ExampleTokenizer:
    """A `tokenizers.Tokenizer` with what examples need beside it.

    eos_ids: appended after the final response (empty: nothing is appended).
    chat_template: the tokenizer's own Jinja chat template, or None.
    template_tokens: the special-token strings a chat template may use (bos_token, eos_token,
    ...), from tokenizer_config.json.
    """

    tokenizer: tokenizers.Tokenizer
    eos_ids: tuple[int, ...] = ()
    chat_template: str | None = None
    template_tokens: tuple[tuple[str, str], ...] = ()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []


def _special_token_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_chat_template(directory: str) -> tuple[str | None, dict[str, str]]:
    """(chat template, special-token strings) from a tokenizer directory; (None, {}) if none."""
    template, tokens = None, {}
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: invalid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_path}: not a JSON object")
        raw = config.get("chat_template")
        if isinstance(raw, list):  # named templates (transformers): the "default" one
            named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
            raw = named.get("default")
        if raw is not None and not isinstance(raw, str):
            raise ValueError(f"{config_path}: chat_template is not a string")
        template = raw
        for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                    "cls_token", "mask_token"):
            text = _special_token_text(config.get(key))
            if text is not None:
                tokens[key] = text
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if template is None and os.path.isfile(jinja_path):
        with open(jinja_path) as f:
            template = f.read()
    return template, tokens


def eos_ids_of(tok: tokenizers.Tokenizer, eos_text: str) -> tuple[int, ...]:
    """The EOS id for `eos_text` ('' -> none); ValueError unless it is one token."""
    return (tokenizer_lib.token_id(tok, eos_text),) if eos_text else ()


def load_example_tokenizer(path_or_name: str, *, eos_text: str = tokenizer_lib.ENDOFTEXT
                           ) -> ExampleTokenizer:
    """A tokenizer (tokenizer.json, its directory, or a hub name) with the chat template and
    special tokens of the tokenizer_config.json beside it, if any."""
    tok = tokenizer_lib.load_tokenizer(path_or_name)
    directory = path_or_name if os.path.isdir(path_or_name) else (
        os.path.dirname(path_or_name) if os.path.isfile(path_or_name) else None)
    template, tokens = _read_chat_template(directory) if directory else (None, {})
    return ExampleTokenizer(tok, eos_ids_of(tok, eos_text), template,
                            tuple(sorted(tokens.items())))


def as_example_tokenizer(tokenizer) -> ExampleTokenizer:
    """An ExampleTokenizer from what users hold: one already, a path or hub name, a
    `tokenizers.Tokenizer` (EOS <|endoftext|> if it has one; no chat template), or a
    transformers fast tokenizer (its backend, eos_token and chat_template)."""
    if isinstance(tokenizer, ExampleTokenizer):
        return tokenizer
    if isinstance(tokenizer, str):
        return _cached_example_tokenizer(tokenizer)
    if isinstance(tokenizer, tokenizers.Tokenizer):
        eos = tokenizer.token_to_id(tokenizer_lib.ENDOFTEXT)
        return ExampleTokenizer(tokenizer, () if eos is None else (eos,))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, tokenizers.Tokenizer):
        eos_token = getattr(tokenizer, "eos_token", None)
        tokens = {key: getattr(tokenizer, key) for key in ("bos_token", "eos_token", "unk_token",
                                                           "pad_token")
                  if isinstance(getattr(tokenizer, key, None), str)}
        return ExampleTokenizer(backend, eos_ids_of(backend, eos_token) if eos_token else (),
                                getattr(tokenizer, "chat_template", None),
                                tuple(sorted(tokens.items())))
    raise TypeError(f"tokenizer: expected a path, a tokenizers.Tokenizer, a transformers fast "
                    f"tokenizer or an ExampleTokenizer, got {type(tokenizer).__name__}")


@functools.lru_cache(maxsize=8)
def _cached_example_tokenizer(path_or_name: str) -> ExampleTokenizer:
    return load_example_tokenizer(path_or_name)


# ------------------------------------------------------------------------------------------
# Rows -> (prompt, response) text turns


def example_format(example) -> str:
    """'chat' or 'prompt_response' from the row's keys; BadExample if it is neither."""
    if not isinstance(example, Mapping):
        raise BadExample(f"not a JSON object (a {type(example).__name__})")
    if _MESSAGES_KEY in example:
        return "chat"
    if _PROMPT_KEY in example or any(k in example for k in _RESPONSE_KEYS):
        return "prompt_response"
    raise BadExample(f"missing key: neither 'prompt'/'response' nor 'messages' (keys: "
                     f"{sorted(map(str, example))})")


def _prompt_response_turn(example: Mapping, template: str) -> tuple[str, str]:
    if _PROMPT_KEY not in example:
        raise BadExample(f"missing key {_PROMPT_KEY!r}")
    response_key = next((k for k in _RESPONSE_KEYS if k in example), None)
    if response_key is None:
        raise BadExample("missing key 'response'")
    prompt, response = example[_PROMPT_KEY], example[response_key]
    for key, value in ((_PROMPT_KEY, prompt), (response_key, response)):
        if not isinstance(value, str):
            raise BadExample(f"non-string {key!r} (a {type(value).__name__})")
    if not prompt:
        raise BadExample("empty prompt")
    if not response:
        raise BadExample("empty response")
    if template == "instruct":
        prompt = INSTRUCT_FORMAT.format(instruction=prompt)
    return prompt, response


def _check_messages(example: Mapping) -> list[dict]:
    messages = example[_MESSAGES_KEY]
    if not isinstance(messages, list):
        raise BadExample(f"'messages' is a {type(messages).__name__}, not a list")
    if not messages:
        raise BadExample("'messages' is empty: no assistant turn")
    previous = None
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, Mapping):
            raise BadExample(f"message {i} is a {type(message).__name__}, not an object")
        for key in ("role", "content"):
            if key not in message:
                raise BadExample(f"message {i}: missing key {key!r}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise BadExample(f"message {i}: unknown role {role!r} (expected one of {ROLES})")
        if not isinstance(content, str):
            raise BadExample(f"message {i} ({role}): non-string content "
                             f"(a {type(content).__name__})")
        if role == "assistant" and not content:
            raise BadExample(f"message {i} (assistant): empty response")
        if role == previous:
            raise BadExample(f"messages {i - 1} and {i} are both {role!r} (roles must alternate)")
        previous = role
    if not any(m["role"] == "assistant" for m in messages):
        raise BadExample("no assistant turn")
    if messages[-1]["role"] != "assistant":
        raise BadExample(f"the last message is from {messages[-1]['role']!r}, not 'assistant'")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


@functools.lru_cache(maxsize=8)
def _compiled_template(source: str):
    """A chat template compiled as transformers compiles it: a sandboxed Jinja environment with
    trim_blocks / lstrip_blocks, loop controls, `tojson`, `raise_exception`, `strftime_now`,
    and `{% generation %}` blocks rendered as their content."""
    import datetime

    import jinja2
    from jinja2 import ext, nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template does not compile: {e}") from None


def render_chat(messages: Sequence[Mapping], template: str, *, add_generation_prompt: bool,
                template_tokens: Mapping[str, str] = ()) -> str:
    """The conversation rendered by a Jinja chat template (CHATML_TEMPLATE, or a tokenizer's)."""
    import jinja2

    try:
        return _compiled_template(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            **dict(template_tokens))
    except jinja2.exceptions.TemplateError as e:
        raise BadExample(f"the chat template refused the conversation: {e}") from None


def resolve_template(template: str, fmt: str, tok: ExampleTokenizer) -> str:
    """The concrete template for rows of `fmt`: 'auto' resolved, combinations checked."""
    if template not in TEMPLATES:
        raise ValueError(f"template {template!r}: expected one of {TEMPLATES}")
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: expected one of {FORMATS}")
    if template == "auto":
        if fmt == "prompt_response":
            return "none"
        return "tokenizer" if tok.chat_template else "chatml"
    wanted = ("none", "instruct") if fmt == "prompt_response" else ("chatml", "tokenizer")
    if template not in wanted:
        raise ValueError(f"template {template!r} does not apply to {fmt} rows (use one of "
                         f"{('auto',) + wanted})")
    if template == "tokenizer" and not tok.chat_template:
        raise ValueError("template 'tokenizer': the tokenizer has no chat template "
                         "(no chat_template in the tokenizer_config.json beside it)")
    return template


def example_turns(example, tokenizer, *, template: str = "auto", format: str | None = None
                  ) -> list[tuple[str, str]]:
    """The example's (prompt, response) text turns, templated (see the module docstring).

    `format` ('prompt_response' | 'chat') requires that kind of row; None reads it from the
    keys. Raises BadExample for a row that cannot be an example.
    """
    tok = as_example_tokenizer(tokenizer)
    fmt = example_format(example) if format is None else format
    if format is not None and not isinstance(example, Mapping):
        raise BadExample(f"not a JSON object (a {type(example).__name__})")
    template = resolve_template(template, fmt, tok)
    if fmt == "prompt_response":
        return [_prompt_response_turn(example, template)]
    if _MESSAGES_KEY not in example:
        raise BadExample(f"missing key {_MESSAGES_KEY!r}")
    messages = _check_messages(example)
    source = CHATML_TEMPLATE if template == "chatml" else tok.chat_template
    turns, so_far = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        full = render_chat(messages[:i + 1], source, add_generation_prompt=False,
                           template_tokens=tok.template_tokens)
        prompt_part = render_chat(messages[:i], source, add_generation_prompt=True,
                                  template_tokens=tok.template_tokens)
        # llm-foundry's consistency checks: each rendering extends the one before it
        if not (full.startswith(so_far) and prompt_part.startswith(so_far)
                and full.startswith(prompt_part)):
            raise BadExample(f"the chat template does not render message {i + 1} as an "
                             "extension of the conversation before it")
        turns.append((prompt_part[len(so_far):], full[len(prompt_part):]))
        so_far = full
    return turns


# ------------------------------------------------------------------------------------------
# Turns -> ids and loss mask


def tokenize_example(example, tokenizer, *, template: str = "auto",
                     target_responses: str = "last", format: str | None = None
                     ) -> dict[str, np.ndarray]:
    """One example row -> {"input_ids": int32 [n], "loss_mask": int32 [n]}.

    `tokenizer`: an ExampleTokenizer, a tokenizer path / directory / hub name (its
    tokenizer_config.json's chat template is used by templates 'auto' and 'tokenizer'), a
    `tokenizers.Tokenizer` or a transformers fast tokenizer. `template`: see TEMPLATES and the
    module docstring. `target_responses`: 'last' (loss on the final assistant turn) or 'all'
    (every assistant turn). Raises BadExample naming what is wrong with the row, ValueError
    for bad arguments.
    """
    if target_responses not in TARGET_RESPONSES:
        raise ValueError(f"target_responses {target_responses!r}: expected one of "
                         f"{TARGET_RESPONSES}")
    tok = as_example_tokenizer(tokenizer)
    turns = example_turns(example, tok, template=template, format=format)
    ids, mask = [], []
    for i, (prompt, response) in enumerate(turns):
        last = i == len(turns) - 1
        prompt_ids, response_ids = tok.encode(prompt), tok.encode(response)
        if last and tok.eos_ids and tuple(response_ids[-len(tok.eos_ids):]) != tok.eos_ids:
            response_ids = response_ids + list(tok.eos_ids)
        target = 1 if (last or target_responses == "all") else 0
        ids += prompt_ids + response_ids
        mask += [0] * len(prompt_ids) + [target] * len(response_ids)
    return {"input_ids": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.int32)}


def fit_example(tokens: Mapping[str, np.ndarray], max_seq_len: int, on_too_long: str
                ) -> tuple[dict[str, np.ndarray] | None, str]:
    """An example cut to `max_seq_len` tokens -> (example or None, 'fits' | 'truncated' |
    'dropped').

    'truncate' keeps the first max_seq_len tokens, as llm-foundry's collator does (the
    response's end goes; the prompt stays); an example left with no loss token is dropped, as
    llm-foundry's `is_valid_ift_example` filters it. 'drop' drops every example that is too long.
    """
    if on_too_long not in ON_TOO_LONG:
        raise ValueError(f"on_too_long {on_too_long!r}: expected one of {ON_TOO_LONG}")
    n = len(tokens["input_ids"])
    if n <= max_seq_len:
        return dict(tokens), "fits"
    if on_too_long == "drop":
        return None, "dropped"
    cut = {key: value[:max_seq_len] for key, value in tokens.items()}
    if not cut["loss_mask"].any():
        return None, "dropped"
    return cut, "truncated"


# ------------------------------------------------------------------------------------------
# Records of the examples layout (prepare writes them, the pipeline reads them)


@dataclasses.dataclass(frozen=True)
class WorkerEncoding:
    """What a worker of mpt_jax.data.prepare needs to turn example rows into records."""

    tokenizer_json: str
    eos_ids: tuple[int, ...]
    chat_template: str | None
    template_tokens: tuple[tuple[str, str], ...]
    format: str
    template: str
    target_responses: str
    max_seq_len: int
    on_too_long: str
    dtype: str


_worker: tuple[WorkerEncoding, ExampleTokenizer] | None = None


def init_worker(encoding: WorkerEncoding):
    global _worker

    tok = ExampleTokenizer(tokenizers.Tokenizer.from_str(encoding.tokenizer_json),
                           encoding.eos_ids, encoding.chat_template, encoding.template_tokens)
    _worker = (encoding, tok)


def encode_rows(rows: list[tuple[str, object]]) -> list[tuple]:
    """Per row: ('bad', where, why) or (status, ids, mask) with status 'fits' | 'truncated' |
    'dropped' (ids and mask None), ids in the shard dtype and mask uint8."""
    assert _worker is not None, "init_worker first"
    enc, tok = _worker
    out = []
    for where, row in rows:
        try:
            example = tokenize_example(row, tok, template=enc.template,
                                       target_responses=enc.target_responses, format=enc.format)
        except BadExample as e:
            out.append(("bad", where, str(e)))
            continue
        fitted, status = fit_example(example, enc.max_seq_len, enc.on_too_long)
        if fitted is None:
            out.append((status, None, None))
        else:
            out.append((status, fitted["input_ids"].astype(enc.dtype),
                        fitted["loss_mask"].astype(np.uint8)))
    return out


def encode_record(ids_t: np.ndarray, mask_t: np.ndarray) -> bytes:
    """An examples-layout record: little-endian token ids, then one uint8 mask byte a token."""
    return (ids_t.astype(ids_t.dtype.newbyteorder("<"), copy=False).tobytes()
            + mask_t.astype(np.uint8).tobytes())


def decode_record(record: bytes, dtype) -> tuple[np.ndarray, np.ndarray]:
    """encode_record's inverse -> (ids int32 [n], loss mask int32 [n])."""
    dtype = np.dtype(dtype).newbyteorder("<")
    n = len(record) // (dtype.itemsize + 1)
    if n * (dtype.itemsize + 1) != len(record):
        raise ValueError(f"an examples record of {len(record)} bytes does not hold {dtype} ids "
                         "and uint8 mask bytes: not an examples shard")
    ids = np.frombuffer(record, dtype, count=n).astype(np.int32)
    mask = np.frombuffer(record, np.uint8, offset=n * dtype.itemsize).astype(np.int32)
    return ids, mask
