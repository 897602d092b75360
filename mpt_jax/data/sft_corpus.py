"""The built-in instruction set: the running interpreter's standard library as
(signature + docstring -> body) examples, for the CPU finetuning demo (configs/tiny_sft.py).

Every function or method of the stdlib's `.py` files (the files of the built-in pretraining
corpus, `corpus.stdlib_files`) that has a docstring and a body after it becomes one
prompt/response row: the prompt is the function's source from its `def` line through the end
of its docstring (dedented), wrapped by prepare in MPT-7B-Instruct's template; the response is
the rest of the function's source (its body, as indented in the dedented function, ending in a
newline). Functions whose signature and docstring are seen twice are kept once. Nothing of it
is shipped: it is read from the interpreter on first use, written to
`{data_dir}/python_stdlib_sft.jsonl` and prepared into examples shards beside it, reused after.
"""
from __future__ import annotations

import ast
import json
import os
import textwrap

from mpt_jax.data import corpus
from mpt_jax.data import prepare as prepare_lib
from mpt_jax.data import tokenizer as tokenizer_lib

BUILTIN_NAMES = ("python_stdlib_sft",)


def function_examples(source: str) -> list[dict]:
    """{"prompt": signature + docstring, "response": body, "name"} for each documented function
    of a module's source with a body after its docstring, in source order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if ast.get_docstring(node, clean=False) is None or len(node.body) < 2:
            continue
        doc_end = node.body[0].end_lineno  # the docstring statement's last line
        block = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno]))
        block_lines = block.splitlines()
        split = doc_end - node.lineno + 1
        prompt = "\n".join(block_lines[:split]) + "\n"
        response = "\n".join(block_lines[split:]).rstrip() + "\n"
        if response.strip():
            out.append({"prompt": prompt, "response": response, "name": node.name,
                        "line": node.lineno})
    out.sort(key=lambda row: row["line"])
    return out


def _write_jsonl(jsonl_path: str) -> None:
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    seen = set()
    tmp = jsonl_path + ".tmp"
    with open(tmp, "w") as f:
        for path in corpus.stdlib_files():
            try:
                with open(path, encoding="utf-8") as fh:
                    source = fh.read()
            except (UnicodeDecodeError, OSError):
                continue  # a handful of files are deliberately not UTF-8
            for row in function_examples(source):
                if row["prompt"] in seen:
                    continue
                seen.add(row["prompt"])
                row["path"] = os.path.relpath(path, root)
                f.write(json.dumps(row) + "\n")
    os.replace(tmp, jsonl_path)


def prepare_builtin(name: str, data_dir: str, *, tokenizer: str, max_seq_len: int,
                    on_too_long: str, progress: bool = False) -> str:
    """Prepares built-in instruction set `name` under `data_dir` (once) with `tokenizer` (the
    pretrained model's: required) and returns its examples shards directory."""
    if name not in BUILTIN_NAMES:
        raise ValueError(f"data.builtin={name!r}: unknown built-in instruction set "
                         f"(have {BUILTIN_NAMES})")
    if not tokenizer:
        raise ValueError(f"data.builtin={name!r} needs data.tokenizer: the tokenizer of the "
                         "model it finetunes (e.g. runs/tiny/data/python_stdlib-bpe4096/"
                         "tokenizer.json for the tiny demo)")
    os.makedirs(data_dir, exist_ok=True)
    with corpus._file_lock(os.path.join(data_dir, ".lock")):
        jsonl_path = os.path.join(data_dir, f"{name}.jsonl")
        if not os.path.exists(jsonl_path):
            _write_jsonl(jsonl_path)
        tok = tokenizer_lib.load_tokenizer(tokenizer)
        shards_dir = os.path.join(
            data_dir, f"{name}-tok{tokenizer_lib.tokenizer_sha256(tok)[:12]}-{max_seq_len}-"
                      f"{on_too_long}")
        manifest_path = os.path.join(shards_dir, prepare_lib.MANIFEST)
        if os.path.exists(manifest_path):
            manifest = prepare_lib.read_manifest(shards_dir)
            if prepare_lib.find_input(manifest, jsonl_path, shards_dir) is not None:
                return shards_dir
        prepare_lib.prepare_dataset(
            [jsonl_path], shards_dir, tokenizer, seq_len=None, format="prompt_response",
            template="instruct", max_seq_len=max_seq_len, on_too_long=on_too_long,
            workers=corpus._prepare_workers(), max_bad_fraction=0.0, progress=progress)
        return shards_dir
