"""mpt_jax.data.finetune: ids and loss masks of prompt/response and chat examples against
constructions written out here (and transformers' apply_chat_template for a tokenizer's own
template), truncation, and every kind of bad row."""

import json
import re

import numpy as np
import pytest

from mpt_jax.data import finetune
from mpt_jax.data import tokenizer as tokenizer_lib

TEXTS = ["def add(a, b):\n    return a + b\n", "What is a quoll? A marsupial.",
         "Below is an instruction that describes a task.", "system user assistant hello"] * 20


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A byte-level BPE with ChatML's special tokens, and a tokenizer_config.json beside it
    holding a chat template of its own (Llama-2-like, with a system block and bos/eos)."""
    d = tmp_path_factory.mktemp("tok")
    tok = tokenizer_lib.train_byte_level_bpe(TEXTS, 300)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(d / "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                "[SYS]{{ m['content'] }}[/SYS]\n{% elif m['role'] == 'user' %}"
                "[INST] {{ m['content'] | trim }} [/INST]{% else %} {{ m['content'] }}"
                "{{ eos_token }}\n{% endif %}{% endfor %}")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": template, "bos_token": "<|im_start|>",
        "eos_token": "<|endoftext|>"}))
    return d


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def expected(tok, turns, eos, targets):
    """ids / mask written out: each (prompt, response) tokenized on its own, EOS after the
    last response, mask 1 on the responses whose target flag is set."""
    ids, mask = [], []
    for i, ((prompt, response), target) in enumerate(zip(turns, targets)):
        p, r = encode(tok, prompt), encode(tok, response)
        if i == len(turns) - 1:
            r = r + [eos]
        ids += p + r
        mask += [0] * len(p) + [int(target)] * len(r)
    return ids, mask


def check(out, ids, mask):
    assert out["input_ids"].dtype == np.int32 and out["loss_mask"].dtype == np.int32
    assert out["input_ids"].tolist() == ids
    assert out["loss_mask"].tolist() == mask


def test_prompt_response_none_and_instruct(tok_dir):
    tok = tokenizer_lib.load_tokenizer(str(tok_dir))
    eos = tok.token_to_id("<|endoftext|>")
    row = {"prompt": "What is a quoll?", "response": " A marsupial.", "id": 7}
    out = finetune.tokenize_example(row, str(tok_dir), template="none")
    check(out, *expected(tok, [(row["prompt"], row["response"])], eos, [True]))
    # the prompt alone is not what the whole text tokenizes to at the seam: tokenized apart
    wrapped = ("Below is an instruction that describes a task. Write a response that "
               "appropriately completes the request.\n\n### Instruction:\nWhat is a quoll?"
               "\n\n### Response:\n")
    out = finetune.tokenize_example(row, tok, template="instruct")
    check(out, *expected(tok, [(wrapped, row["response"])], eos, [True]))
    # "completion" is llm-foundry's other response key; an EOS already there is not doubled
    out = finetune.tokenize_example({"prompt": "x", "completion": "y<|endoftext|>"}, tok)
    assert out["input_ids"].tolist() == encode(tok, "x") + encode(tok, "y") + [eos]


@pytest.mark.parametrize("target_responses", ["last", "all"])
def test_chatml_multi_turn(tok_dir, target_responses):
    tok = tokenizer_lib.load_tokenizer(str(tok_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a quoll?"},
        {"role": "assistant", "content": "A marsupial."},
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": "Australia."}]}
    turns = [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is a quoll?<|im_end|>"
         "\n<|im_start|>assistant\n", "A marsupial.<|im_end|>\n"),
        ("<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\n",
         "Australia.<|im_end|>\n")]
    want = expected(tok, turns, eos, [target_responses == "all", True])
    # a bare tokenizers.Tokenizer has no chat template: 'auto' is ChatML, as 'chatml' is
    for template in ("auto", "chatml"):
        check(finetune.tokenize_example(row, tok, template=template,
                                        target_responses=target_responses), *want)
    # <|im_start|> / <|im_end|> are single tokens of this tokenizer
    assert encode(tok, "<|im_start|>user")[0] == tok.token_to_id("<|im_start|>")
    # the directory's own template wins under 'auto'; 'chatml' still picks ChatML
    check(finetune.tokenize_example(row, str(tok_dir), template="chatml",
                                    target_responses=target_responses), *want)


def test_tokenizer_chat_template_matches_transformers(tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": " What is a quoll? "},
                {"role": "assistant", "content": "A marsupial."},
                {"role": "user", "content": "Where?"},
                {"role": "assistant", "content": "Australia."}]
    row = {"messages": messages}
    # transformers' renderings cut where llm-foundry cuts them
    full1 = hf.apply_chat_template(messages[:3], tokenize=False)
    ctx1 = hf.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    full2 = hf.apply_chat_template(messages, tokenize=False)
    ctx2 = hf.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True)
    turns = [(ctx1, full1[len(ctx1):]), (ctx2[len(full1):], full2[len(ctx2):])]
    assert turns[0][0].startswith("<|im_start|>[SYS]") and turns[1][1] == " Australia.<|endoftext|>\n"
    assert finetune.example_turns(row, str(tok_dir)) == turns
    tok = tokenizer_lib.load_tokenizer(str(tok_dir))
    eos = tok.token_to_id("<|endoftext|>")
    for source in (str(tok_dir), hf):  # a path, or the transformers tokenizer itself
        check(finetune.tokenize_example(row, source, target_responses="all"),
              *expected(tok, turns, eos, [True, True]))


def test_fit_example():
    ex = {"input_ids": np.arange(10, dtype=np.int32),
          "loss_mask": np.array([0] * 6 + [1] * 4, np.int32)}
    out, status = finetune.fit_example(ex, 10, "drop")
    assert status == "fits" and out["input_ids"].tolist() == list(range(10))
    out, status = finetune.fit_example(ex, 8, "truncate")
    assert status == "truncated" and out["loss_mask"].tolist() == [0] * 6 + [1] * 2
    assert finetune.fit_example(ex, 8, "drop") == (None, "dropped")
    assert finetune.fit_example(ex, 6, "truncate") == (None, "dropped")  # no response left
    with pytest.raises(ValueError, match="on_too_long 'cut'"):
        finetune.fit_example(ex, 6, "cut")


@pytest.mark.parametrize("row,fmt,needle", [
    ({"response": "y"}, None, "missing key 'prompt'"),
    ({"prompt": "x"}, None, "missing key 'response'"),
    ({"prompt": "x", "response": ""}, None, "empty response"),
    ({"prompt": "", "response": "y"}, None, "empty prompt"),
    ({"prompt": ["x"], "response": "y"}, None, "non-string 'prompt'"),
    ({"text": "x"}, None, "missing key: neither"),
    ({"prompt": "x", "response": "y"}, "chat", "missing key 'messages'"),
    ({"messages": "hi"}, None, "'messages' is a str, not a list"),
    ({"messages": [{"role": "user", "content": "x"}]}, None, "no assistant turn"),
    ({"messages": [{"role": "bot", "content": "x"}]}, None, "message 1: unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]},
     None, "message 2 (assistant): non-string content"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
     None, "message 2 (assistant): empty response"),
    ({"messages": [{"role": "user"}]}, None, "message 1: missing key 'content'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                   {"role": "user", "content": "z"}]}, None, "last message is from 'user'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "x"},
                   {"role": "assistant", "content": "y"}]}, None, "both 'user'"),
    ([1, 2], None, "not a JSON object"),
])
def test_bad_rows(tok_dir, row, fmt, needle):
    with pytest.raises(finetune.BadExample, match=re.escape(needle)):
        finetune.tokenize_example(row, str(tok_dir), format=fmt)


def test_bad_arguments(tok_dir):
    tok = tokenizer_lib.load_tokenizer(str(tok_dir))
    row = {"prompt": "x", "response": "y"}
    with pytest.raises(ValueError, match="target_responses 'first'"):
        finetune.tokenize_example(row, tok, target_responses="first")
    with pytest.raises(ValueError, match="template 'chatml' does not apply to prompt_response"):
        finetune.tokenize_example(row, tok, template="chatml")
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        finetune.tokenize_example({"messages": [{"role": "user", "content": "x"},
                                                {"role": "assistant", "content": "y"}]},
                                  tok, template="tokenizer")
    with pytest.raises(ValueError, match="template 'alpaca'"):
        finetune.tokenize_example(row, tok, template="alpaca")
