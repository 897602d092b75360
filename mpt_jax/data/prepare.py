"""Text -> tokenized ArrayRecord shards + manifest.json (llm-foundry's convert_dataset_*).

    python -m mpt_jax.data.prepare --input PATH... --output DIR --tokenizer PATH_OR_NAME \
        (--seq_len N | --keep_documents) [--text_field text] [--eos_text ...] \
        [--bos_text ...] [--workers K] [--max_bad_fraction F]
    python -m mpt_jax.data.prepare --format prompt_response|chat --input PATH... \
        --output DIR --tokenizer PATH_OR_NAME [--template auto|none|instruct|chatml|tokenizer] \
        [--target_responses last|all] [--max_seq_len 2048] [--on_too_long truncate|drop]

Inputs (files or directories of them): plain text (`.txt`, `.text`, `.md`; a whole file is one
document, as llm-foundry's convert_text_to_mds does), JSON lines (`.jsonl`, `.json`; one object
per line, text under `--text_field`) and Parquet (`.parquet`, column `--text_field`); text and
JSON lines may be compressed (`.gz`, `.zst`). Every document gets `--bos_text` (if given) in
front and `--eos_text` (default `<|endoftext|>`; '' for none) at the end.

Three layouts (the manifest's `mode`):
  sequences  (default)           documents are concatenated and cut into records of exactly
                                 `seq_len` tokens (MPT's pretraining); each input's final partial
                                 sequence is dropped and counted as `dropped_tokens`.
  documents  (--keep_documents)  one record per document, for packing with segment ids; it
                                 serves any training seq_len (no --seq_len needed).
  examples   (--format prompt_response|chat)  one record per finetuning example: its token ids
                                 then its loss mask, one uint8 per token (1 on response tokens;
                                 `mpt_jax.data.finetune.tokenize_example` builds both). Rows are
                                 JSON lines or Parquet rows: {"prompt", "response"} or
                                 {"messages": [{"role", "content"}, ...]}, templated by
                                 --template (see finetune.py). An example longer than
                                 --max_seq_len is truncated (--on_too_long truncate: the end of
                                 the response goes) or dropped (drop); counts of examples,
                                 truncated, dropped and bad rows go into the manifest.
Token ids are little-endian uint16 when the vocabulary fits (< 65536), else int32.

Resumable: each input file is its own unit. Its shards are written under temporary names, renamed
when the file is finished, and only then recorded in the manifest; a rerun skips recorded inputs
(unless the file changed), deletes leftovers of an interrupted one and redoes it. An output
directory prepared with another tokenizer, seq_len, layout or BOS/EOS is refused.

Inputs and the output may be gs:// or s3:// paths (inputs are streamed). array_record writes
local files only, so a shard for a bucket is written into a local temporary directory and
uploaded when it is full (one shard on local disk at a time); an object store has no rename,
so it is uploaded under its final name, and until the manifest lists it, it is a leftover that
a rerun deletes.

Relocatable: the manifest names shards by file name and inputs by their path relative to the
output directory (plus the absolute path, to recognise them when only the output moved), so a
prepared directory, or a tree holding inputs and output, can be copied or moved.

Bad lines (invalid JSON, a missing or non-string text field, undecodable bytes, null Parquet
cells; for examples also a missing key, an empty response, an unknown role, no assistant turn,
non-string content, ...) are counted, reported on stderr and skipped; an input whose bad
fraction exceeds `--max_bad_fraction` fails the run, naming its first bad line, and leaves none
of that input's shards. Errors exit with status 1 and one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import tqdm

from mpt_jax import storage
from mpt_jax.data import finetune
from mpt_jax.data import readers
from mpt_jax.data import tokenizer as tokenizer_lib

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
# Random access reads one record at a time: one record per chunk, no compression (token ids
# barely compress and decompression would cost read throughput).
ARRAY_RECORD_OPTIONS = "group_size:1,uncompressed"
SHARD_SUFFIX = ".array_record"

# Documents handed to a tokenizer worker at once.
_DOCS_PER_BATCH = 256
FORMATS = ("text",) + finetune.FORMATS
# What an examples directory must have been prepared with to take more inputs.
_EXAMPLE_SETTINGS = ("format", "template", "chat_template", "target_responses", "max_seq_len",
                     "on_too_long")


# ------------------------------------------------------------------------------------------
# Tokenizing (in worker processes)


@dataclasses.dataclass(frozen=True)
class _Encoding:
    """What a worker needs to turn texts into token arrays."""

    tokenizer_json: str
    bos_ids: tuple[int, ...]
    eos_ids: tuple[int, ...]
    dtype: str


_worker_encoding: _Encoding | None = None
_worker_tokenizer = None


def _init_worker(encoding: _Encoding):
    global _worker_encoding, _worker_tokenizer
    import tokenizers

    _worker_encoding = encoding
    _worker_tokenizer = tokenizers.Tokenizer.from_str(encoding.tokenizer_json)


def _encode_texts(texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text with BOS/EOS added, as arrays of the shard dtype."""
    assert _worker_encoding is not None and _worker_tokenizer is not None
    encodings = _worker_tokenizer.encode_batch(texts, add_special_tokens=False)
    bos, eos, dtype = _worker_encoding.bos_ids, _worker_encoding.eos_ids, _worker_encoding.dtype
    return [np.array(bos + tuple(e.ids) + eos, dtype=dtype) for e in encodings]


def _batched(docs: Iterator[str], n: int) -> Iterator[list[str]]:
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# ------------------------------------------------------------------------------------------
# Writing shards


class _ShardWriter:
    """Writes records into `{stem}-{k:04d}.array_record.tmp`, rolling over every `shard_tokens`.
    For a bucket: into a local temporary file, uploaded to its final name once full."""

    def __init__(self, output_dir: str, stem: str, shard_tokens: int):
        self._output_dir, self._stem, self._shard_tokens = output_dir, stem, shard_tokens
        self._local = None if not storage.is_remote(output_dir) else tempfile.mkdtemp(
            prefix="mpt-prepare-")
        self._writer = None
        self._tokens_in_shard = 0
        self.shards: list[dict] = []  # {"path", "records", "tokens"} per shard

    def write(self, tokens_t: np.ndarray):
        self.write_record(
            tokens_t.astype(tokens_t.dtype.newbyteorder("<"), copy=False).tobytes(),
            int(tokens_t.size))

    def write_record(self, payload: bytes, n_tokens: int):
        """One record of `n_tokens` tokens (what shard rollover counts)."""
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None or self._tokens_in_shard >= self._shard_tokens:
            self._close_current()
            name = f"{self._stem}-{len(self.shards):04d}{SHARD_SUFFIX}"
            self._writer = ArrayRecordWriter(
                os.path.join(self._local or self._output_dir, name + ".tmp"),
                ARRAY_RECORD_OPTIONS)
            self.shards.append({"path": name, "records": 0, "tokens": 0})
            self._tokens_in_shard = 0
        self._writer.write(payload)
        self.shards[-1]["records"] += 1
        self.shards[-1]["tokens"] += n_tokens
        self._tokens_in_shard += n_tokens

    def _close_current(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            if self._local is not None:
                name = self.shards[-1]["path"]
                local = os.path.join(self._local, name + ".tmp")
                storage.upload(local, storage.join(self._output_dir, name))
                os.remove(local)

    def commit(self):
        """Closes the last shard and renames every `.tmp` shard to its final name (a bucket's
        are uploaded under it already)."""
        self._close_current()
        if self._local is not None:
            os.rmdir(self._local)
            return
        for shard in self.shards:
            final = os.path.join(self._output_dir, shard["path"])
            os.replace(final + ".tmp", final)

    def abandon(self):
        """Removes what this writer wrote (a failed input), committed or not."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._local is not None:
            shutil.rmtree(self._local, ignore_errors=True)
        else:
            for shard in self.shards:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self._output_dir, shard["path"] + ".tmp"))
        _remove_shards(self._output_dir, self.shards)


def _remove_shards(output_dir: str, shards: list[dict]) -> None:
    for shard in shards:  # one already gone (an earlier run stopped here) is fine
        storage.remove(storage.join(output_dir, shard["path"]))


def _write_json_atomic(path: str, obj: dict):
    storage.write_atomic(path, json.dumps(obj, indent=1) + "\n")


def read_manifest(shards_dir: str) -> dict:
    """The manifest of a prepared directory, or ValueError naming what is missing or wrong."""
    path = storage.join(shards_dir, MANIFEST)
    if not storage.isfile(path):
        if not storage.isdir(shards_dir):
            raise ValueError(f"shards directory {shards_dir!r} does not exist")
        raise ValueError(f"{shards_dir!r} holds no {MANIFEST}: not a prepared dataset")
    try:
        manifest = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {manifest.get('format_version')!r}, "
            f"this code reads {FORMAT_VERSION}")
    return manifest


def shard_dtype(vocab_size: int) -> str:
    """uint16 when every token id fits (vocab < 65536), else int32."""
    return "uint16" if vocab_size < 65536 else "int32"


def input_key(path: str, output_dir: str) -> str:
    """The manifest's name for input `path`: its path relative to the output directory (in the
    same bucket, for a remote one), else its full path."""
    path = storage.abspath(path)
    rel = storage.relpath(path, storage.abspath(output_dir))
    return path if rel is None else rel


def find_input(manifest: dict, path: str, output_dir: str) -> str | None:
    """The key under which `manifest` records input `path`, or None: its relative key, else an
    entry recorded with its absolute path (an output directory moved without its inputs, or a
    manifest of an older version, which keyed inputs by absolute path)."""
    key = input_key(path, output_dir)
    if key in manifest["inputs"]:
        return key
    absolute = storage.abspath(path)
    for name, entry in manifest["inputs"].items():
        if entry.get("path") == absolute or (os.path.isabs(name) and name == absolute):
            return name
    return None


def _input_fingerprint(path: str) -> dict:
    """What tells a changed input: size and modification time (a bucket's: its ETag)."""
    if storage.is_remote(path):
        return storage.fingerprint(path)
    stat = os.stat(path)
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def prepare_dataset(
    inputs: Sequence[str],
    output_dir: str,
    tokenizer: str,
    *,
    seq_len: int | None,
    keep_documents: bool = False,
    text_field: str = "text",
    eos_text: str = tokenizer_lib.ENDOFTEXT,
    bos_text: str = "",
    workers: int = 1,
    max_bad_fraction: float = 0.01,
    shard_tokens: int = 1 << 27,
    progress: bool = True,
    format: str = "text",
    template: str = "auto",
    target_responses: str = "last",
    max_seq_len: int = 2048,
    on_too_long: str = "truncate",
) -> dict:
    """Tokenizes `inputs` into ArrayRecord shards under `output_dir`; returns the manifest.

    `seq_len` is required for the sequences layout; with `keep_documents` it may be None (the
    shards then serve any sequence length). `format` 'prompt_response' or 'chat' writes the
    examples layout (template, target_responses, max_seq_len and on_too_long apply; seq_len,
    keep_documents, text_field and bos_text do not). See the module docstring for layouts,
    resumption and bad-line handling. Raises ValueError naming the offending path and numbers.
    """
    examples = format != "text"
    if format not in FORMATS:
        raise ValueError(f"--format {format!r}: expected one of {FORMATS}")
    if examples:
        if seq_len is not None or keep_documents:
            raise ValueError(f"--format {format}: examples take --max_seq_len, not --seq_len "
                             "or --keep_documents")
        if not isinstance(max_seq_len, int) or max_seq_len <= 0:
            raise ValueError(f"--max_seq_len must be a positive integer, got {max_seq_len}")
        for flag, value, allowed in (("--template", template, finetune.TEMPLATES),
                                     ("--target_responses", target_responses,
                                      finetune.TARGET_RESPONSES),
                                     ("--on_too_long", on_too_long, finetune.ON_TOO_LONG)):
            if value not in allowed:
                raise ValueError(f"{flag} {value!r}: expected one of {allowed}")
    elif not keep_documents and (seq_len is None or seq_len <= 0):
        raise ValueError(f"--seq_len must be a positive integer, got {seq_len}")
    if seq_len is not None and seq_len <= 0:
        raise ValueError(f"--seq_len must be a positive integer, got {seq_len}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"--max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    files = readers.expand_inputs(inputs)
    tok = tokenizer_lib.load_tokenizer(tokenizer)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = shard_dtype(vocab_size)
    eos_ids = tuple(tok.encode(eos_text, add_special_tokens=False).ids) if eos_text else ()
    bos_ids = tuple(tok.encode(bos_text, add_special_tokens=False).ids) if bos_text else ()
    settings = {
        "format_version": FORMAT_VERSION,
        "mode": "examples" if examples else "documents" if keep_documents else "sequences",
        "seq_len": seq_len,
        "dtype": dtype,
        "tokenizer": {"name": tokenizer, "sha256": tokenizer_lib.tokenizer_sha256(tok),
                      "vocab_size": vocab_size},
        "text_field": text_field,
        "eos_text": eos_text, "eos_ids": list(eos_ids),
        "bos_text": bos_text, "bos_ids": list(bos_ids),
    }
    compared = ("mode", "seq_len", "dtype", "text_field", "eos_ids", "bos_ids")
    if examples:
        example_tok = finetune.load_example_tokenizer(tokenizer, eos_text=eos_text)
        resolved_template = finetune.resolve_template(template, format, example_tok)
        settings.update({
            "text_field": None, "bos_text": "", "bos_ids": [],
            "format": format, "template": resolved_template,
            "chat_template": (example_tok.chat_template if resolved_template == "tokenizer"
                              else None),
            "target_responses": target_responses, "max_seq_len": max_seq_len,
            "on_too_long": on_too_long})
        compared += _EXAMPLE_SETTINGS

    # An existing output directory must have been prepared the same way.
    storage.makedirs(output_dir)
    manifest_path = storage.join(output_dir, MANIFEST)
    if storage.exists(manifest_path):
        manifest = read_manifest(output_dir)
        for key in compared:
            if manifest.get(key) != settings[key]:
                raise ValueError(
                    f"{output_dir}: prepared with {key}={manifest.get(key)!r}, this run asks "
                    f"{key}={settings[key]!r}; use a new --output directory")
        old_tok, new_tok = manifest["tokenizer"], settings["tokenizer"]
        if old_tok["sha256"] != new_tok["sha256"]:
            raise ValueError(
                f"{output_dir}: prepared with tokenizer {old_tok['name']!r} (sha256 "
                f"{old_tok['sha256'][:12]}, vocab {old_tok['vocab_size']}), not "
                f"{new_tok['name']!r} (sha256 {new_tok['sha256'][:12]}, vocab "
                f"{new_tok['vocab_size']}); use a new --output directory")
    else:
        manifest = {**settings, "inputs": {}}
    storage.write_atomic(storage.join(output_dir, TOKENIZER_FILE), tok.to_str())
    manifest["sources"] = files
    _write_json_atomic(manifest_path, _with_totals(manifest))

    # Recorded inputs under their relative key (a manifest of an older version, or an output
    # that moved alone, knows them by absolute path).
    keys = [input_key(path, output_dir) for path in files]
    if len(set(keys)) != len(keys):
        raise ValueError(f"an input is given twice: {files}")
    for path, key in zip(files, keys):
        found = find_input(manifest, path, output_dir)
        if found is not None:
            manifest["inputs"][key] = {**manifest["inputs"].pop(found),
                                       "path": storage.abspath(path)}
    # Leftovers of an interrupted run: temporary shards, and shards of this run's inputs that
    # the manifest does not list (a bucket's are uploaded under their final names).
    listed = {shard["path"] for entry in manifest["inputs"].values() for shard in entry["shards"]}
    stems = tuple(_shard_stem(path, key) + "-" for path, key in zip(files, keys))
    for name in storage.listdir(output_dir):
        if _temporary(name) or (name.startswith(stems) and name.endswith(SHARD_SUFFIX)
                                and name not in listed):
            storage.remove(storage.join(output_dir, name))

    if examples:
        initializer, encoding = finetune.init_worker, finetune.WorkerEncoding(
            tok.to_str(), example_tok.eos_ids, example_tok.chat_template,
            example_tok.template_tokens, format, resolved_template, target_responses,
            max_seq_len, on_too_long, dtype)
    else:
        initializer, encoding = _init_worker, _Encoding(tok.to_str(), bos_ids, eos_ids, dtype)
    pool = None
    if workers > 1:
        # Each worker tokenizes its batches single-threaded: parallelism comes from processes.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        # forkserver: safe in a process that already runs jax threads, and the server imports
        # this module (and with it the mpt_jax package) once for all workers.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__, finetune.__name__])
        pool = context.Pool(workers, initializer, (encoding,))
    else:
        initializer(encoding)
    try:
        # Documents read and tokens written, from the first batch on (the files may be few
        # and large: a bar over files alone would sit at 0 for minutes).
        bar = tqdm.tqdm(unit=" docs", file=sys.stderr, disable=not progress, dynamic_ncols=True,
                        desc=f"prepare {os.path.basename(os.path.normpath(output_dir))}")
        for i, (path, key) in enumerate(zip(files, keys)):
            done = manifest["inputs"].get(key)
            if done is not None and done["input"] == _input_fingerprint(path):
                continue
            if done is not None:  # the file changed since: redo it
                # The manifest forgets the old shards before they go, so a redo that fails or
                # is interrupted leaves a consistent directory that the next run completes.
                del manifest["inputs"][key]
                _write_json_atomic(manifest_path, _with_totals(manifest))
                _remove_shards(output_dir, done["shards"])
            bar.set_postfix_str(f"file {i + 1}/{len(files)} {os.path.basename(path)[-40:]}")
            manifest["inputs"][key] = _prepare_one(
                path, key, output_dir, settings, pool, max_bad_fraction, shard_tokens, bar)
            _write_json_atomic(manifest_path, _with_totals(manifest))
        bar.close()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    # Keep only the inputs of this run, in this run's order (the record order of the dataset);
    # the manifest forgets the others before their shards go.
    dropped = {key: manifest["inputs"].pop(key) for key in set(manifest["inputs"]) - set(keys)}
    manifest["inputs"] = {key: manifest["inputs"][key] for key in keys}
    manifest = _with_totals(manifest)
    if manifest["records"] == 0:
        raise ValueError(
            f"{output_dir}: no records written from {len(files)} input file(s) "
            + (f"({manifest['dropped']} examples dropped as longer than --max_seq_len "
               f"{max_seq_len}, {manifest['bad_lines']} bad rows)" if examples else
               f"({manifest['documents']} documents, {manifest['tokens']} tokens"
               + (f"; seq_len {seq_len} is longer than all of it" if not keep_documents else "")
               + ")"))
    _write_json_atomic(manifest_path, manifest)
    for key, entry in sorted(dropped.items()):
        print(f"{output_dir}: dropping shards of {key}, not an input of this run",
              file=sys.stderr)
        _remove_shards(output_dir, entry["shards"])
    return manifest


def _temporary(name: str) -> bool:
    """A temporary file of ours: a shard being written (`.tmp`), storage.write_atomic's."""
    return re.search(r"\.tmp\d*$", name) is not None


def _shard_stem(path: str, key: str) -> str:
    """A shard file name stem: the input's name and a hash of its (relative) manifest key."""
    return os.path.basename(path).split(".")[0][:40] + "-" + hashlib.sha1(
        key.encode()).hexdigest()[:8]


def _commit_unless_too_bad(path, writer, bad, max_bad_fraction) -> None:
    """Reports the input's bad lines; past max_bad_fraction raises, naming the first bad line
    (_prepare_one then removes the shards), else commits them."""
    if bad.count:
        print(f"{path}: {bad.count} bad of {bad.total} lines skipped (first: "
              + "; ".join(bad.examples) + ")", file=sys.stderr)
    if bad.total and bad.count / bad.total > max_bad_fraction:
        raise ValueError(
            f"{path}: {bad.count} of {bad.total} lines bad ({bad.count / bad.total:.2%}), over "
            f"--max_bad_fraction {max_bad_fraction:.2%} (first: {bad.examples[0]})")
    writer.commit()


def _prepare_one(path, key, output_dir, settings, pool, max_bad_fraction, shard_tokens, bar
                 ) -> dict:
    """Tokenizes one input file into committed shards; returns its manifest entry. On failure
    nothing of the input's is left (a read error of a bucket's input: one line naming it)."""
    writer = _ShardWriter(output_dir, _shard_stem(path, key), shard_tokens)
    prepare = _prepare_examples if settings["mode"] == "examples" else _prepare_text
    try:
        return prepare(path, writer, settings, pool, max_bad_fraction, bar)
    except BaseException:
        writer.abandon()
        raise


def _prepare_text(path, writer, settings, pool, max_bad_fraction, bar) -> dict:
    """The sequences and documents layouts of _prepare_one."""
    bad = readers.BadLines()
    seq_len, keep_documents = settings["seq_len"], settings["mode"] == "documents"
    pending_t = np.zeros((0,), settings["dtype"])  # sequences layout: tokens not yet in a record
    documents = tokens = max_document_tokens = 0
    documents_iter = readers.guarded(path, readers.iter_documents(path, settings["text_field"],
                                                                  bad))
    batches = _batched(documents_iter, _DOCS_PER_BATCH)
    encoded = pool.imap(_encode_texts, batches) if pool is not None else map(_encode_texts, batches)
    for docs in encoded:
        documents += len(docs)
        tokens += sum(int(d.size) for d in docs)
        bar.update(len(docs))
        max_document_tokens = max(max_document_tokens, *(int(d.size) for d in docs))
        if keep_documents:
            for doc_t in docs:
                writer.write(doc_t)
        else:
            pending_t = np.concatenate([pending_t, *docs])
            n_full = pending_t.size // seq_len
            for row_t in pending_t[: n_full * seq_len].reshape(n_full, seq_len):
                writer.write(row_t)
            pending_t = pending_t[n_full * seq_len:]
        bar.set_postfix_str(f"{os.path.basename(path)[-40:]}: {tokens:,} tokens written",
                            refresh=False)
    _commit_unless_too_bad(path, writer, bad, max_bad_fraction)
    return {
        "input": _input_fingerprint(path),
        "path": storage.abspath(path),
        "shards": writer.shards,
        "documents": documents,
        "records": sum(s["records"] for s in writer.shards),
        "tokens": tokens,
        "dropped_tokens": int(pending_t.size),
        "max_document_tokens": max_document_tokens,
        "bad_lines": bad.count,
    }


def _prepare_examples(path, writer, settings, pool, max_bad_fraction, bar) -> dict:
    """The examples layout of _prepare_one: rows -> (ids, mask) records, counted."""
    bad = readers.BadLines()
    counts = dict.fromkeys(("examples", "tokens", "loss_tokens", "truncated", "dropped",
                            "max_example_tokens"), 0)
    batches = _batched(readers.guarded(path, readers.iter_records(path, bad)), _DOCS_PER_BATCH)
    encoded = (pool.imap(finetune.encode_rows, batches) if pool is not None
               else map(finetune.encode_rows, batches))
    for results in encoded:
        for result in results:
            if result[0] == "bad":
                bad.add(*result[1:])  # (where, why)
                continue
            status, ids_t, mask_t = result
            if status != "fits":
                counts[status] += 1
            if ids_t is None:
                continue
            writer.write_record(finetune.encode_record(ids_t, mask_t), int(ids_t.size))
            counts["examples"] += 1
            counts["tokens"] += int(ids_t.size)
            counts["loss_tokens"] += int(mask_t.sum())
            counts["max_example_tokens"] = max(counts["max_example_tokens"], int(ids_t.size))
        bar.set_postfix(examples=counts["examples"], tokens=counts["tokens"], refresh=False)
    _commit_unless_too_bad(path, writer, bad, max_bad_fraction)
    return {
        "input": _input_fingerprint(path),
        "path": storage.abspath(path),
        "shards": writer.shards,
        "documents": counts["examples"],
        "records": sum(s["records"] for s in writer.shards),
        "dropped_tokens": 0,
        "max_document_tokens": counts["max_example_tokens"],
        "bad_lines": bad.count,
        **counts,
    }


_EXAMPLE_COUNTS = ("examples", "loss_tokens", "truncated", "dropped")


def _with_totals(manifest: dict) -> dict:
    inputs = manifest["inputs"].values()
    totals = {key: sum(entry[key] for entry in inputs)
              for key in ("documents", "records", "tokens", "dropped_tokens", "bad_lines")}
    totals["max_document_tokens"] = max((entry["max_document_tokens"] for entry in inputs),
                                        default=0)
    if manifest["mode"] == "examples":
        totals.update({key: sum(entry[key] for entry in inputs) for key in _EXAMPLE_COUNTS})
        totals["max_example_tokens"] = totals["max_document_tokens"]
    # "sequences": records of the sequences layout; documents layout has none until packed.
    totals["sequences"] = totals["records"] if manifest["mode"] == "sequences" else 0
    return {**manifest, **totals}


def shard_paths(shards_dir: str, manifest: dict) -> list[str]:
    """Absolute shard paths in record order (inputs in manifest order, shards in order);
    ValueError naming the first one the manifest lists that is not there."""
    names = [shard["path"] for entry in manifest["inputs"].values() for shard in entry["shards"]]
    present = set(storage.listdir(shards_dir))
    for name in names:
        if name not in present:
            raise ValueError(f"{storage.join(shards_dir, name)}: shard listed in "
                             f"{storage.join(shards_dir, MANIFEST)} is missing (re-run "
                             "mpt_jax.data.prepare on its inputs)")
    return [storage.join(shards_dir, name) for name in names]


# ------------------------------------------------------------------------------------------
# CLI


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mpt_jax.data.prepare",
        description="Tokenize text into ArrayRecord shards for mpt_jax's data pipeline.")
    parser.add_argument("--input", nargs="+", required=True, help="files or directories")
    parser.add_argument("--output", required=True, help="output directory (resumable)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json, its dir, or hub name")
    parser.add_argument("--seq_len", type=int, default=None,
                        help="tokens per record (required unless --keep_documents, whose "
                             "records are whole documents and serve any training seq_len)")
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--eos_text", default=tokenizer_lib.ENDOFTEXT)
    parser.add_argument("--bos_text", default="")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--keep_documents", action="store_true",
                        help="one record per document, for packing")
    parser.add_argument("--max_bad_fraction", type=float, default=0.01)
    parser.add_argument("--shard_tokens", type=int, default=1 << 27)
    parser.add_argument("--no_progress", action="store_true")
    examples = parser.add_argument_group(
        "finetuning examples (--format prompt_response|chat: one record per example, with a "
        "loss mask on its response tokens)")
    examples.add_argument("--format", default="text", choices=FORMATS,
                          help="text (pretraining documents, the default), prompt_response "
                               "({prompt, response} rows) or chat ({messages} rows)")
    examples.add_argument("--template", default="auto", choices=finetune.TEMPLATES,
                          help="auto: prompts as given / the tokenizer's chat template, else "
                               "ChatML; instruct: MPT-7B-Instruct's prompt; chatml: MPT-7B-Chat's")
    examples.add_argument("--target_responses", default="last", choices=finetune.TARGET_RESPONSES,
                          help="chat: loss on the last assistant turn, or on all of them")
    examples.add_argument("--max_seq_len", type=int, default=2048,
                          help="longest example, in tokens (default 2048, MPT-7B's context)")
    examples.add_argument("--on_too_long", default="truncate", choices=finetune.ON_TOO_LONG,
                          help="a longer example loses the end of its response, or is dropped")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: prints a summary line; on bad input prints one error line, returns 1."""
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        manifest = prepare_dataset(
            args.input, args.output, args.tokenizer, seq_len=args.seq_len,
            keep_documents=args.keep_documents, text_field=args.text_field,
            eos_text=args.eos_text, bos_text=args.bos_text, workers=args.workers,
            max_bad_fraction=args.max_bad_fraction, shard_tokens=args.shard_tokens,
            progress=not args.no_progress, format=args.format, template=args.template,
            target_responses=args.target_responses, max_seq_len=args.max_seq_len,
            on_too_long=args.on_too_long)
    except (ValueError, OSError) as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 1
    if manifest["mode"] == "examples":
        print(f"{args.output}: {manifest['examples']} examples ({manifest['template']} "
              f"template; {manifest['truncated']} truncated, {manifest['dropped']} dropped as "
              f"longer than {manifest['max_seq_len']} tokens), {manifest['tokens']} tokens "
              f"({manifest['loss_tokens']} in the loss), {manifest['bad_lines']} bad rows")
        return 0
    print(f"{args.output}: {manifest['documents']} documents, {manifest['records']} records "
          f"({manifest['mode']}), {manifest['tokens']} tokens, {manifest['bad_lines']} bad lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
