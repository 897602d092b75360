"""Data benchmark: prepare throughput (tokens/s per core) and pipeline read throughput.

    python bench/data.py [--prepare_mb 4] [--read_seconds 10] [--tokenizer PATH] [--no_record]

1. prepare: the Python stdlib (the built-in corpus) as JSON lines, tokenized into sequences-layout
   shards by `mpt_jax.data.prepare` with one tokenizer process (tokens/s per core) and with one
   per core. Tokenizer: `--tokenizer` (a tokenizer.json or its directory; default: the
   MPT_JAX_NEOX_TOKENIZER environment variable, e.g. GPT-NeoX-20B's, MPT's), else a byte-level
   BPE trained here.
2. read: tokens/s delivered by `make_train_iterator` from local shards (synthetic random token
   ids written in prepare's format; reading does not look at the values): MPT-7B's shape
   (seq_len 2048) and its 10-source mix, shuffled; in-process and with grain workers; and the
   packing path over variable-length documents.

Prints a table and appends rows to bench/RESULTS.md (`| date | bench | figure | value |
card/machine | commit |`). Goal: >= 1M tokens/s per host from local shards.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import ml_collections
import numpy as np

from mpt_jax.data import corpus, pipeline, prepare
from mpt_jax.data import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPT_MIX = {"mc4": 0.33, "c4": 0.299, "rp_cc": 0.1, "the_stack": 0.1, "wikipedia": 0.04,
           "stack_markdown": 0.035, "s2orc": 0.033, "books": 0.03, "arxiv": 0.019,
           "stackexchange": 0.014}


def machine() -> str:
    cpu = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0]  # shared machines: say how busy it was
    return (f"CPU {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
            f"load avg {load:.1f} at start")


def stdlib_jsonl(path: str, max_mb: float) -> int:
    """Writes the first `max_mb` MB of the stdlib corpus as JSON lines; returns bytes of text."""
    total = 0
    with open(path, "w") as f:
        for file_path in corpus.stdlib_files():
            try:
                with open(file_path, encoding="utf-8") as source:
                    text = source.read()
            except (UnicodeDecodeError, OSError):
                continue
            f.write(json.dumps({"text": text}) + "\n")
            total += len(text.encode())
            if total >= max_mb * 1e6:
                break
    return total


def bench_prepare(tmp: str, max_mb: float, tokenizer: str) -> list[tuple[str, str, float]]:
    jsonl = os.path.join(tmp, "stdlib.jsonl")
    n_bytes = stdlib_jsonl(jsonl, max_mb)
    if tokenizer:
        tok_path = tokenizer
        tok_name = os.path.basename(tokenizer.rstrip("/")).removesuffix(".json")
    else:
        tok_path, tok_name = os.path.join(tmp, "bpe.json"), "byte-level BPE 4096"
        with open(jsonl) as f:
            texts = [json.loads(line)["text"] for line in f]
        tokenizer_lib.train_byte_level_bpe(texts, 4096).save(tok_path)
    rows = []
    cores = os.cpu_count() or 1
    for workers in sorted({1, cores}):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per tokenizer process
        start = time.perf_counter()
        manifest = prepare.prepare_dataset([jsonl], os.path.join(tmp, f"prep{workers}"),
                                           tok_path, seq_len=2048, workers=workers,
                                           progress=False)
        seconds = time.perf_counter() - start
        tokens_per_s = manifest["tokens"] / seconds
        what = f"data prepare stdlib {n_bytes / 1e6:.1f} MB, {tok_name}, {workers} process(es)"
        rows.append((what, "tokens/s", tokens_per_s))
        if workers == 1:
            rows.append((what, "tokens/s per core", tokens_per_s))
        else:
            rows.append((what, "tokens/s per core", tokens_per_s / workers))
        print(f"  prepare workers={workers}: {manifest['tokens']} tokens in {seconds:.1f} s "
              f"(includes process start-up)", file=sys.stderr)
    return rows


def write_synthetic_source(path: str, *, mode: str, n_records: int, seq_len: int, seed: int):
    """Shards of random uint16 token ids plus a manifest in prepare's format."""
    from array_record.python.array_record_module import ArrayRecordWriter

    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    shard = "synthetic-0000" + prepare.SHARD_SUFFIX
    writer = ArrayRecordWriter(os.path.join(path, shard), prepare.ARRAY_RECORD_OPTIONS)
    tokens = 0
    for _ in range(n_records):
        n = seq_len if mode == "sequences" else int(rng.integers(16, 2 * seq_len))
        writer.write(rng.integers(1, 50000, size=n, dtype=np.uint16).tobytes())
        tokens += n
    writer.close()
    entry = {"input": {}, "shards": [{"path": shard, "records": n_records, "tokens": tokens}],
             "documents": n_records, "records": n_records, "tokens": tokens,
             "dropped_tokens": 0, "max_document_tokens": 2 * seq_len, "bad_lines": 0}
    manifest = {
        "format_version": prepare.FORMAT_VERSION, "mode": mode,
        "seq_len": seq_len if mode == "sequences" else None, "dtype": "uint16",
        "tokenizer": {"name": "synthetic", "sha256": "0" * 64, "vocab_size": 50277},
        "text_field": "text", "eos_text": "", "eos_ids": [], "bos_text": "", "bos_ids": [],
        "inputs": {"synthetic": entry}, "sources": ["synthetic"],
        "documents": n_records, "records": n_records, "tokens": tokens, "dropped_tokens": 0,
        "max_document_tokens": 2 * seq_len, "bad_lines": 0,
        "sequences": n_records if mode == "sequences" else 0,
    }
    with open(os.path.join(path, prepare.MANIFEST), "w") as f:
        json.dump(manifest, f)


def read_tokens_per_s(cfg, *, seq_len: int, batch_size: int, seconds: float) -> float:
    it = pipeline.make_train_iterator(cfg, seq_len=seq_len, batch_size=batch_size, seed=0)
    for _ in range(3):  # warm-up: worker start-up, first reads
        next(it)
    n_batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(it)
        n_batches += 1
    elapsed = time.perf_counter() - start
    it.close()
    return n_batches * batch["input_ids"].size / elapsed


def bench_read(tmp: str, seconds: float) -> list[tuple[str, str, float]]:
    seq_len, batch_size = 2048, 8
    sources = {}
    for i, (name, weight) in enumerate(MPT_MIX.items()):
        for mode in ("sequences", "documents"):
            path = os.path.join(tmp, f"{name}_{mode}")
            write_synthetic_source(path, mode=mode, n_records=2000, seq_len=seq_len, seed=i)
        sources[name] = weight

    def cfg(mode, **overrides):
        c = ml_collections.ConfigDict(dict(
            builtin="", tokenizer="", packing=False, eval_fraction=0.01, shuffle=True,
            num_workers=0, prefetch=2, builtin_vocab_size=4096,
            sources={n: dict(path=os.path.join(tmp, f"{n}_{mode}"), weight=w)
                     for n, w in sources.items()}))
        c.update(overrides)
        return c

    runs = [
        ("sequences, in-process", cfg("sequences")),
        ("sequences, 2 grain workers", cfg("sequences", num_workers=2)),
        ("documents packed, in-process", cfg("documents", packing=True)),
        ("documents packed, 2 grain workers", cfg("documents", packing=True, num_workers=2)),
        ("documents concatenated, in-process", cfg("documents")),
    ]
    rows = []
    for what, c in runs:
        value = read_tokens_per_s(c, seq_len=seq_len, batch_size=batch_size, seconds=seconds)
        rows.append((f"data read MPT mix (10 sources) B={batch_size} T={seq_len} shuffled, {what}",
                     "tokens/s delivered", value))
        print(f"  {what}: {value:,.0f} tokens/s", file=sys.stderr)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prepare_mb", type=float, default=12.0)
    parser.add_argument("--read_seconds", type=float, default=10.0)
    parser.add_argument("--tokenizer", default=os.environ.get("MPT_JAX_NEOX_TOKENIZER", ""),
                        help="tokenizer.json (or its directory) for the prepare bench; default "
                             "$MPT_JAX_NEOX_TOKENIZER, else a byte-level BPE trained here")
    parser.add_argument("--no_record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    where = machine()
    with tempfile.TemporaryDirectory() as tmp:
        rows = (bench_prepare(tmp, args.prepare_mb, args.tokenizer)
                + bench_read(tmp, args.read_seconds))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            check=False, capture_output=True, text=True).stdout.strip() or "unknown"
    date = datetime.date.today().isoformat()
    lines = [f"| {date} | {what} | {figure} | {value:,.0f} | {where} | {commit} |"
             for what, figure, value in rows]
    print("| bench | figure | value |\n|---|---|---|")
    for what, figure, value in rows:
        print(f"| {what} | {figure} | {value:,.0f} |")
    if not args.no_record:
        results = os.path.join(REPO, "bench", "RESULTS.md")
        if not os.path.exists(results):
            with open(results, "w") as f:
                f.write("# Results\n\n| date | bench | figure | value | card | commit |\n"
                        "|---|---|---|---|---|---|\n")
        with open(results, "a") as f:
            f.write("\n".join(lines) + "\n")
        print(f"appended {len(lines)} rows to {results}")


if __name__ == "__main__":
    main()
