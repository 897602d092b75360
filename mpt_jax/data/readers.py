"""Reading prepare's inputs: plain text, JSON lines (optionally .gz/.zst) and Parquet.

A plain-text file is one document (as llm-foundry's convert_text_to_mds has it); JSON lines hold
one object per line with the text under a field; Parquet holds it in a column. Unusable lines are
counted in a `BadLines`, never raised, so the caller decides what is too many.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence

from mpt_jax import storage

_TEXT_SUFFIXES = (".txt", ".text", ".md")
_JSONL_SUFFIXES = (".jsonl", ".json")
_COMPRESSION_SUFFIXES = ("", ".gz", ".zst")


def input_kind(path: str) -> str:
    """'text' | 'jsonl' | 'parquet' from the file name, or ValueError naming the file."""
    name = path.lower()
    if name.endswith(".parquet"):
        return "parquet"
    for compression in _COMPRESSION_SUFFIXES:
        if any(name.endswith(s + compression) for s in _JSONL_SUFFIXES):
            return "jsonl"
        if any(name.endswith(s + compression) for s in _TEXT_SUFFIXES):
            return "text"
    raise ValueError(
        f"{path}: unsupported input type; expected .txt/.text/.md, .jsonl/.json "
        "(optionally .gz or .zst) or .parquet"
    )


def expand_inputs(paths: Sequence[str]) -> list[str]:
    """Files named by `paths` (local, gs:// or s3://), directories expanded to their supported
    files (sorted), in order."""
    if not paths:
        raise ValueError("no --input given")
    files = []
    for path in paths:
        if storage.isdir(path):
            found = []
            if storage.is_remote(path):  # in os.walk's order: a directory's files, then its
                root = storage.abspath(path)  # subdirectories
                found = sorted((f for f in storage.glob(path, "**") if _supported(f)),
                               key=lambda f: _walk_key(f[len(root) + 1:]))
            else:
                for root, dirs, names in os.walk(path):
                    dirs.sort()
                    found.extend(os.path.join(root, name) for name in sorted(names)
                                 if _supported(name))
            if not found:
                raise ValueError(f"{path}: directory holds no supported input files")
            files.extend(found)
        elif storage.isfile(path):
            input_kind(path)
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or directory")
    absolute = [storage.abspath(f) for f in files]
    if len(set(absolute)) != len(absolute):
        raise ValueError("an input file is named twice: " + ", ".join(
            sorted({f for f in absolute if absolute.count(f) > 1})))
    return absolute


def guarded(path: str, items: Iterator) -> Iterator:
    """`items` (a reader of `path`), its read failures (a bucket's network error, say) turned
    into one StorageError line naming `path`; errors of the caller's own work are not touched."""
    items = iter(items)
    while True:
        with storage.errors(path, "reading"):
            try:
                item = next(items)
            except StopIteration:
                return
        yield item


def _walk_key(relative: str) -> list:
    *dirs, name = relative.split("/")
    return [(1, d) for d in dirs] + [(0, name)]


def _supported(name: str) -> bool:
    try:
        input_kind(name)
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def _open_binary(path: str) -> Iterator:
    """The file's bytes, decompressed; a bucket's object is streamed (ranged reads). The file
    is closed with the decompressor."""
    with storage.open_file(path, "rb") as raw:
        if path.lower().endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                yield f
        elif path.lower().endswith(".zst"):
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as f:
                yield f
        else:
            yield raw


def _parquet_source(path: str):
    """pyarrow reads a local path itself (memory-mapped); a bucket's object as a ranged file."""
    return storage.open_file(path, "rb") if storage.is_remote(path) else path


@dataclasses.dataclass
class BadLines:
    """Counts of one input's unusable lines, with the first few for the report."""

    count: int = 0
    total: int = 0
    examples: list[str] = dataclasses.field(default_factory=list)

    def add(self, where: str, why: str):
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(f"{where}: {why}")


def _json_lines(path: str, bad: BadLines) -> Iterator[tuple[str, object]]:
    """('line N', parsed value) for each non-blank line of a JSON-lines file; lines that are
    not JSON are counted in `bad` and skipped."""
    with _open_binary(path) as f:
        for line_number, raw_line in enumerate(io.BufferedReader(f), start=1):
            if not raw_line.strip():
                continue
            bad.total += 1
            try:
                record = json.loads(raw_line)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                bad.add(f"line {line_number}", f"invalid JSON ({str(e).splitlines()[0]})")
                continue
            yield f"line {line_number}", record


def iter_documents(path: str, text_field: str, bad: BadLines) -> Iterator[str]:
    """Yields the documents of one input file; unusable lines are counted in `bad` and skipped.

    Empty documents are skipped without counting as bad.
    """
    kind = input_kind(path)
    if kind == "text":
        bad.total += 1
        with _open_binary(path) as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.add(path, f"not UTF-8 ({e.reason} at byte {e.start})")
            return
        if text:
            yield text
    elif kind == "jsonl":
        for where, record in _json_lines(path, bad):
            if not isinstance(record, dict):
                bad.add(where, "not a JSON object")
                continue
            text = record.get(text_field)
            if not isinstance(text, str):
                why = "missing" if text is None else f"a {type(text).__name__}, not a string"
                bad.add(where, f"field {text_field!r} is {why}")
                continue
            if text:
                yield text
    else:
        import pyarrow.parquet as pq

        try:
            parquet_file = pq.ParquetFile(_parquet_source(path))
        except Exception as e:  # noqa: BLE001 (pyarrow raises several types)
            raise ValueError(f"{path}: not a readable Parquet file ({e})".splitlines()[0]) from None
        if text_field not in parquet_file.schema_arrow.names:
            raise ValueError(
                f"{path}: Parquet file has no column {text_field!r} "
                f"(columns: {parquet_file.schema_arrow.names})"
            )
        row = 0
        for batch in parquet_file.iter_batches(columns=[text_field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                row += 1
                bad.total += 1
                if not isinstance(text, str):
                    bad.add(f"row {row}", f"column {text_field!r} is {text!r}, not a string")
                    continue
                if text:
                    yield text


def iter_records(path: str, bad: BadLines) -> Iterator[tuple[str, object]]:
    """Yields (where, row) for each row of a JSON-lines or Parquet file: where is 'line N' or
    'row N', row the parsed JSON value (any type: the caller checks it) or the Parquet row as a
    dict of its columns. Lines that are not JSON are counted in `bad` and skipped; blank lines
    are skipped. Plain-text files hold no rows: ValueError."""
    kind = input_kind(path)
    if kind == "text":
        raise ValueError(f"{path}: a plain-text file holds no examples; examples are read from "
                         "JSON lines (.jsonl/.json, optionally .gz/.zst) or Parquet")
    if kind == "jsonl":
        yield from _json_lines(path, bad)
        return
    import pyarrow.parquet as pq

    try:
        parquet_file = pq.ParquetFile(_parquet_source(path))
    except Exception as e:  # noqa: BLE001 (pyarrow raises several types)
        raise ValueError(f"{path}: not a readable Parquet file ({e})".splitlines()[0]) from None
    row = 0
    for batch in parquet_file.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            bad.total += 1
            yield f"row {row}", record
