"""The built-in corpus: the running interpreter's Python standard library, as code.

`configs/tiny.py` trains on it (code, as The Stack is in MPT's mix) so the CPU demo needs no
download. On first use the `.py` files under sysconfig's stdlib path (test suites and
site-packages left out) are written to one JSON-lines file, a byte-level BPE is trained on a
quarter of them by `tokenizers` (seconds) unless a tokenizer is given, and the lot is prepared
into documents-layout shards. Everything lives under `data_dir` and is reused on later runs; a
file lock keeps concurrent processes (multi-host on one machine) from preparing it twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import sysconfig
import time

import tqdm

from mpt_jax.data import prepare as prepare_lib
from mpt_jax.data import tokenizer as tokenizer_lib

BUILTIN_NAMES = ("python_stdlib",)
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                           "__pycache__"})


def stdlib_files() -> list[str]:
    """The standard library's `.py` files (no tests, no site-packages), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS)
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    if not found:
        raise ValueError(f"built-in corpus: no .py files under the stdlib path {root!r}")
    return found


def _prepare_workers() -> int:
    """Tokenizer processes for the built-in corpus: the cores, up to 4."""
    return max(1, min(4, os.cpu_count() or 1))


@contextlib.contextmanager
def _file_lock(path: str):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_corpus_jsonl(jsonl_path: str, progress: bool) -> None:
    root = sysconfig.get_paths()["stdlib"]
    tmp = jsonl_path + ".tmp"
    files = stdlib_files()
    with open(tmp, "w") as f:
        for path in tqdm.tqdm(files, desc=f"built-in corpus: reading {root}", unit=" files",
                              file=sys.stderr, disable=not progress, dynamic_ncols=True):
            try:
                with open(path, encoding="utf-8") as source:
                    text = source.read()
            except (UnicodeDecodeError, OSError):
                continue  # a handful of files are deliberately not UTF-8
            f.write(json.dumps({"path": os.path.relpath(path, root), "text": text}) + "\n")
    os.replace(tmp, jsonl_path)


def _iter_texts(jsonl_path: str, every: int):
    with open(jsonl_path) as f:
        for i, line in enumerate(f):
            if i % every == 0:
                yield json.loads(line)["text"]


def prepare_builtin(name: str, data_dir: str, *, vocab_size: int, tokenizer: str = "",
                    progress: bool = False) -> str:
    """Prepares built-in corpus `name` under `data_dir` (once) and returns its shards directory.

    The shards directory holds `manifest.json`, the shards and `tokenizer.json`: the given
    `tokenizer` (path or hub name) or, when it is '', a byte-level BPE of `vocab_size` tokens
    trained here. `progress`: say on stderr what is being done (files read, the tokenizer
    training, documents and tokens written) while preparing; a prepared corpus is silent.
    """
    if name not in BUILTIN_NAMES:
        raise ValueError(f"data.builtin={name!r}: unknown built-in corpus (have {BUILTIN_NAMES})")
    os.makedirs(data_dir, exist_ok=True)
    with _file_lock(os.path.join(data_dir, ".lock")):
        jsonl_path = os.path.join(data_dir, f"{name}.jsonl")
        if not os.path.exists(jsonl_path):
            _write_corpus_jsonl(jsonl_path, progress)
        if tokenizer:
            tok = tokenizer_lib.load_tokenizer(tokenizer)
            shards_dir = os.path.join(
                data_dir, f"{name}-tok{tokenizer_lib.tokenizer_sha256(tok)[:12]}")
            tokenizer_source = tokenizer
        else:
            shards_dir = os.path.join(data_dir, f"{name}-bpe{vocab_size}")
            tokenizer_source = os.path.join(shards_dir, prepare_lib.TOKENIZER_FILE)
            if not os.path.exists(tokenizer_source):
                os.makedirs(shards_dir, exist_ok=True)
                if progress:
                    print(f"built-in corpus: training a {vocab_size}-token byte-level BPE on a "
                          f"quarter of {jsonl_path} ...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                tok = tokenizer_lib.train_byte_level_bpe(_iter_texts(jsonl_path, 4), vocab_size)
                tok.save(tokenizer_source + ".tmp")
                os.replace(tokenizer_source + ".tmp", tokenizer_source)
                if progress:
                    print(f"built-in corpus: tokenizer trained in {time.perf_counter() - t0:.1f}"
                          f" s -> {tokenizer_source}", file=sys.stderr, flush=True)
        manifest_path = os.path.join(shards_dir, prepare_lib.MANIFEST)
        if os.path.exists(manifest_path):
            manifest = prepare_lib.read_manifest(shards_dir)
            # by its path relative to the shards: a copied or moved workdir is still prepared
            if prepare_lib.find_input(manifest, jsonl_path, shards_dir) is not None:
                return shards_dir
        prepare_lib.prepare_dataset(
            [jsonl_path], shards_dir, tokenizer_source, seq_len=None, keep_documents=True,
            workers=_prepare_workers(), progress=progress)
        return shards_dir
