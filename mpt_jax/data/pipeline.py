"""grain pipelines over prepared ArrayRecord shards: MPT's data mix, resumably.

Per source (a directory written by `mpt_jax.data.prepare`, or the built-in corpus):

    records -> held-out split (every round(1/eval_fraction)-th record is eval, the rest train)
            -> this process's share (records process_index::process_count)
            -> seeded global shuffle, reshuffled every epoch, repeated forever (train)

Sources are mixed by normalised weight with grain's deterministic proportional interleaving, so
each source runs through its own epochs at its own pace (a small source repeats more often).
Then, by the shards' layout and `data.packing`:

    sequences layout              records are seq_len rows already -> batch
    documents layout, packing     documents split into <= seq_len pieces, first-fit packed into
                                  rows with segment ids (a piece never spans two rows) -> batch
    documents layout, no packing  documents concatenated and cut into seq_len rows -> batch
    examples layout, packing      whole finetuning examples first-fit packed into rows with
                                  segment ids, never split (one longer than seq_len is refused
                                  when the pipeline is built) -> batch
    examples layout, no packing   one example per row, padded -> batch

Batches are dicts of numpy int32 `[batch_size, seq_len]`: `input_ids`, plus `segment_ids`
(0 = padding, 1.. = document within the row) when packing; packed padding has input_ids 0.
Examples add `loss_mask` (1 on response tokens, 0 on prompts and padding) and always carry
`segment_ids` (a padded row is segment 1 then padding 0): `batch_keys` says which keys come.
`DataIterator.packing_efficiency()` is the share of row positions holding real tokens so far.
Worker processes (`data.num_workers`) or a background thread (`data.prefetch`) run the pipeline
ahead of the trainer. The iterator's state is a small JSON-serialisable dict; restoring it
yields exactly the batches the original would have yielded next.

Epochs per source: before mixing, each record gets a token-aligned `source_starts` feature
(source index + 1 at its first token, 0 elsewhere) that travels through splitting, packing and
batching; the train iterator counts the marks of every batch it yields, per source, and strips
the feature. A record is consumed once its first token has reached the trainer, so
`epochs()[name]` = records consumed / records in this process's share of that source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import weakref
import zlib
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from mpt_jax import storage
from mpt_jax.data import corpus
from mpt_jax.data import finetune
from mpt_jax.data import prepare as prepare_lib
from mpt_jax.data import sft_corpus
from mpt_jax.data import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class Source:
    """One prepared shards directory in the mix."""

    name: str
    path: str
    weight: float  # normalised: the weights of all sources sum to 1
    manifest: dict


@dataclasses.dataclass(frozen=True)
class ResolvedData:
    """Where the data is: the sources, the (local) tokenizer.json, and the vocabulary size.

    `vocab_size` is the tokenizer's own (pad it with `tokenizer.padded_vocab_size` for the
    model); `mode` is the shards' layout, 'sequences' or 'documents'.
    """

    sources: tuple[Source, ...]
    tokenizer_path: str
    vocab_size: int
    mode: str
    dtype: str


def check_data_config(data_cfg) -> None:
    """The checks of `data_cfg` that read no data (the trainer runs them before preparing any):
    a known built-in corpus or some sources, positive weights, eval_fraction in range."""
    if data_cfg.builtin:
        known = corpus.BUILTIN_NAMES + sft_corpus.BUILTIN_NAMES
        if data_cfg.builtin not in known:
            raise ValueError(f"data.builtin={data_cfg.builtin!r}: unknown built-in corpus (have "
                             f"{known})")
    elif not data_cfg.sources:
        raise ValueError("data.sources is empty and data.builtin is '': no data to read (name "
                         "a prepared shards directory, e.g. --config configs/tiny.py:DIR)")
    else:
        for name, src in data_cfg.sources.items():
            weight = src.weight
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
                raise ValueError(
                    f"data.sources.{name}.weight must be a positive number, got {weight!r}")
    _eval_every(data_cfg.eval_fraction)


def resolve_data(data_cfg, workdir: str | None) -> ResolvedData:
    """Finds (and for a built-in corpus, prepares) the data that `data_cfg` names.

    For `data.builtin == 'python_stdlib'` the built-in corpus is prepared into
    `{workdir}/data` on first use (cached after, reused on rerun), with a byte-level BPE of
    `data.builtin_vocab_size` tokens trained in seconds unless `data.tokenizer` is set; for
    'python_stdlib_sft' the built-in instruction set is prepared there with `data.tokenizer`
    (required) into examples of at most `data.builtin_max_seq_len` tokens.
    Otherwise every `data.sources` entry must be a prepared shards directory; all must share one
    tokenizer and layout, and `data.tokenizer` (when set) must be that tokenizer. Raises
    ValueError naming the path and numbers on any mismatch, a missing directory or an empty
    source.
    """
    check_data_config(data_cfg)
    if data_cfg.builtin:
        if workdir is None:
            raise ValueError(f"data.builtin={data_cfg.builtin!r} needs a workdir to prepare into")
        storage.require_local(workdir, f"data.builtin={data_cfg.builtin!r} with --workdir",
                              "the built-in corpus is prepared into WORKDIR/data on local disk "
                              "(prepare it with mpt_jax.data.prepare and name it in "
                              "data.sources)")
        if data_cfg.builtin in sft_corpus.BUILTIN_NAMES:
            shards_dir = sft_corpus.prepare_builtin(
                data_cfg.builtin, os.path.join(workdir, "data"), tokenizer=data_cfg.tokenizer,
                max_seq_len=data_cfg.builtin_max_seq_len,
                on_too_long=data_cfg.builtin_on_too_long)
        else:
            shards_dir = corpus.prepare_builtin(
                data_cfg.builtin, os.path.join(workdir, "data"),
                vocab_size=data_cfg.builtin_vocab_size, tokenizer=data_cfg.tokenizer, progress=True)
        named = [(data_cfg.builtin, shards_dir, 1.0)]
    else:
        named = [(name, src.path, src.weight) for name, src in data_cfg.sources.items()]
    total_weight = sum(weight for _, _, weight in named)

    sources = []
    for name, path, weight in named:
        try:
            manifest = prepare_lib.read_manifest(path)
        except ValueError as e:
            raise ValueError(f"data source {name!r}: {e}") from None
        if manifest["records"] == 0:
            raise ValueError(f"data source {name!r} at {path!r} is empty: 0 records")
        sources.append(Source(name, path, weight / total_weight, manifest))
    first = sources[0]
    for source in sources[1:]:
        for key in ("mode", "dtype"):
            if source.manifest[key] != first.manifest[key]:
                raise ValueError(
                    f"data sources disagree on {key}: {first.name!r} at {first.path!r} has "
                    f"{first.manifest[key]!r}, {source.name!r} at {source.path!r} has "
                    f"{source.manifest[key]!r}")
        if source.manifest["tokenizer"]["sha256"] != first.manifest["tokenizer"]["sha256"]:
            raise ValueError(
                f"data sources use different tokenizers: {first.name!r} at {first.path!r} "
                f"({first.manifest['tokenizer']['name']!r}, sha256 "
                f"{first.manifest['tokenizer']['sha256'][:12]}) vs {source.name!r} at "
                f"{source.path!r} ({source.manifest['tokenizer']['name']!r}, sha256 "
                f"{source.manifest['tokenizer']['sha256'][:12]})")
    if data_cfg.tokenizer and not data_cfg.builtin:
        wanted = tokenizer_lib.tokenizer_sha256(tokenizer_lib.load_tokenizer(data_cfg.tokenizer))
        if wanted != first.manifest["tokenizer"]["sha256"]:
            raise ValueError(
                f"data.tokenizer={data_cfg.tokenizer!r} (sha256 {wanted[:12]}) is not the "
                f"tokenizer the shards at {first.path!r} were prepared with "
                f"({first.manifest['tokenizer']['name']!r}, sha256 "
                f"{first.manifest['tokenizer']['sha256'][:12]})")
    return ResolvedData(
        sources=tuple(sources),
        tokenizer_path=os.path.join(first.path, prepare_lib.TOKENIZER_FILE),
        vocab_size=int(first.manifest["tokenizer"]["vocab_size"]),
        mode=first.manifest["mode"],
        dtype=first.manifest["dtype"],
    )


# ------------------------------------------------------------------------------------------
# Record-level datasets


class HeldOutSplit:
    """A random-access view of one split of a data source, chosen by record index.

    With `eval_every = round(1 / eval_fraction)`, record i is held out for eval exactly when
    `i % eval_every == eval_every - 1`; train is every other record. `eval_every=None` (an
    eval_fraction of 0) puts everything in train.
    """

    def __init__(self, source, *, eval_every: int | None, split: str):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self._source, self._eval_every, self._split = source, eval_every, split
        n = len(source)
        n_eval = 0 if eval_every is None else n // eval_every
        self._len = n_eval if split == "eval" else n - n_eval

    def __len__(self) -> int:
        return self._len

    def _record_index(self, index: int) -> int:
        s = self._eval_every
        if s is None:
            return index
        return index * s + s - 1 if self._split == "eval" else index + index // (s - 1)

    def __getitem__(self, index: int) -> bytes:
        return self._source[self._record_index(index)]

    def __getitems__(self, indices) -> list[bytes]:
        return self._source.__getitems__([self._record_index(i) for i in indices])


def shard_source(paths: list[str]):
    """Random access to the records of ArrayRecord shards in order: array_record's own reader
    for local shards; for a bucket's, ours over ranged reads (data/array_record_remote.py).
    array_record 0.8.6 opens s3:// paths as empty files, and its gs:// reader failed on a 5 MB
    shard in the GCS emulator ("Failed to read RiegeliPostscript", where fsspec's ranged reads
    of the same object are right), so neither is used on a bucket."""
    if paths and storage.is_remote(paths[0]):
        from mpt_jax.data.array_record_remote import RemoteArrayRecordSource

        return RemoteArrayRecordSource(paths)
    return grain.sources.ArrayRecordDataSource(paths)


def _eval_every(eval_fraction: float) -> int | None:
    if eval_fraction == 0:
        return None
    if not 0 < eval_fraction <= 0.5:
        raise ValueError(f"data.eval_fraction must be 0 or in (0, 0.5], got {eval_fraction}")
    return round(1 / eval_fraction)


SOURCE_STARTS = "source_starts"  # internal feature: never in a batch the iterator yields


class DecodeTokens:
    """Shard record bytes -> {'input_ids': int32 [n], 'source_starts': int16 [n]}.

    `source_starts` is `source_index + 1` at the record's first token and 0 elsewhere.
    """

    def __init__(self, dtype: str, source_index: int):
        self._dtype = np.dtype(dtype).newbyteorder("<")
        self._mark = source_index + 1

    def __call__(self, record: bytes) -> dict[str, np.ndarray]:
        ids = np.frombuffer(record, self._dtype).astype(np.int32)
        starts = np.zeros(ids.shape, np.int16)
        starts[:1] = self._mark
        return {"input_ids": ids, SOURCE_STARTS: starts}


class DecodeExample:
    """Examples-layout record bytes -> {'input_ids', 'loss_mask' (int32 [n]), 'source_starts'}."""

    def __init__(self, dtype: str, source_index: int):
        self._dtype = dtype
        self._mark = source_index + 1

    def __call__(self, record: bytes) -> dict[str, np.ndarray]:
        ids, mask = finetune.decode_record(record, self._dtype)
        starts = np.zeros(ids.shape, np.int16)
        starts[:1] = self._mark
        return {"input_ids": ids, "loss_mask": mask, SOURCE_STARTS: starts}


class PadExample:
    """One example -> one row of seq_len: segment 1 on its tokens, 0 (and loss_mask 0, id 0) on
    the padding after it."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def __call__(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(element["input_ids"])
        row = {key: np.zeros(self.seq_len, value.dtype) for key, value in element.items()}
        for key, value in element.items():
            row[key][:n] = value
        row["segment_ids"] = (np.arange(self.seq_len) < n).astype(np.int32)
        return row


def _packed_example_row(element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**_packed_row(element), "loss_mask": element["loss_mask"].astype(np.int32)}


class SplitLongDocuments(grain.experimental.FlatMapTransform):
    """A document longer than seq_len becomes consecutive pieces of at most seq_len tokens."""

    def __init__(self, seq_len: int, max_pieces: int):
        self.seq_len, self.max_fan_out = seq_len, max_pieces

    def flat_map(self, element: dict[str, np.ndarray]):
        return [{key: value[i:i + self.seq_len] for key, value in element.items()}
                for i in range(0, len(element["input_ids"]), self.seq_len)]


def _packed_row(element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"input_ids": element["input_ids"].astype(np.int32),
            "segment_ids": element["input_ids_segment_ids"].astype(np.int32),
            SOURCE_STARTS: element[SOURCE_STARTS]}


def _unpacked_row(element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"input_ids": element["input_ids"].astype(np.int32),
            SOURCE_STARTS: element[SOURCE_STARTS]}


def _source_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**32


def _check_shapes(resolved: ResolvedData, data_cfg, seq_len: int, batch_size: int,
                  process_index: int, process_count: int) -> None:
    if seq_len <= 0 or batch_size <= 0:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len=} {batch_size=}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    for source in resolved.sources:
        prepared_len = source.manifest["seq_len"]
        # (document records serve any seq_len; older CLIs recorded one for them anyway)
        if (prepared_len is not None and source.manifest["mode"] != "documents"
                and prepared_len != seq_len):
            raise ValueError(
                f"data source {source.name!r} at {source.path!r} was prepared with seq_len "
                f"{prepared_len}, the config asks for seq_len {seq_len}")
    if data_cfg.packing and resolved.mode == "sequences":
        raise ValueError(
            f"data.packing=True needs shards that keep documents (prepare --keep_documents); "
            f"{resolved.sources[0].path!r} holds {resolved.mode}")
    for source in resolved.sources:
        longest = source.manifest.get("max_example_tokens", 0)
        if source.manifest["mode"] == "examples" and longest > seq_len:
            raise ValueError(
                f"data source {source.name!r} at {source.path!r} holds examples of up to "
                f"{longest} tokens (prepared with --max_seq_len {source.manifest['max_seq_len']}),"
                f" longer than seq_len {seq_len}: prepare it again with --max_seq_len {seq_len}")


def _mixed_records(resolved: ResolvedData, *, split: str, eval_fraction: float, shuffle: bool,
                   seed: int, process_index: int, process_count: int
                   ) -> tuple[grain.MapDataset, dict[str, int]]:
    """The mixed, decoded and source-marked record stream of this process (infinite for train,
    finite for eval), and the number of records in this process's share of each source."""
    eval_every = _eval_every(eval_fraction)
    per_source, share_sizes = [], {}
    for source_index, source in enumerate(resolved.sources):
        records = HeldOutSplit(
            shard_source(prepare_lib.shard_paths(source.path, source.manifest)),
            eval_every=eval_every, split=split)
        ds = grain.MapDataset.source(records)[process_index::process_count]
        if len(ds) == 0:
            raise ValueError(
                f"data source {source.name!r} at {source.path!r}: its {split} split has no "
                f"records for process {process_index} of {process_count} "
                f"({source.manifest['records']} records, eval_fraction {eval_fraction})")
        share_sizes[source.name] = len(ds)
        decode = DecodeExample if resolved.mode == "examples" else DecodeTokens
        ds = ds.map(decode(resolved.dtype, source_index))
        if split == "train":
            if shuffle:
                ds = ds.shuffle(seed=_source_seed(seed, source.name))
            ds = ds.repeat()  # shuffle sees the epoch in the index: a fresh order every epoch
        per_source.append(ds)
    if len(per_source) == 1:
        return per_source[0], share_sizes
    return grain.MapDataset.mix(per_source, [s.weight for s in resolved.sources]), share_sizes


def _rows_and_batches(records: grain.MapDataset, resolved: ResolvedData, *, packing: bool,
                      seq_len: int, batch_size: int, prefetch: int) -> grain.IterDataset:
    """Decoded records -> batches of rows, by layout (see the module docstring)."""
    # grain reads a record per call: from a bucket each is a request, so more of them in flight
    remote = any(storage.is_remote(source.path) for source in resolved.sources)
    read_options = grain.ReadOptions(num_threads=16 if remote else 4,
                                     prefetch_buffer_size=max(prefetch, 1) * (32 if remote else 8))
    lengths = {"input_ids": seq_len, SOURCE_STARTS: seq_len}
    if resolved.mode == "sequences":
        return records.batch(batch_size, drop_remainder=True).to_iter_dataset(read_options)
    if resolved.mode == "examples" and not packing:
        return records.map(PadExample(seq_len)).batch(
            batch_size, drop_remainder=True).to_iter_dataset(read_options)
    documents = records.to_iter_dataset(
        grain.ReadOptions(num_threads=4, prefetch_buffer_size=max(prefetch, 1) * batch_size))
    if resolved.mode == "examples":  # (packing) whole examples: _check_shapes saw they fit
        rows = grain.experimental.FirstFitPackIterDataset(
            documents, length_struct={**lengths, "loss_mask": seq_len},
            num_packing_bins=batch_size, shuffle_bins=False).map(_packed_example_row)
    elif packing:
        longest = max(int(s.manifest.get("max_document_tokens", 0) or 0) for s in resolved.sources)
        pieces = grain.experimental.FlatMapIterDataset(
            documents, SplitLongDocuments(seq_len, max(1, -(-longest // seq_len))))
        rows = grain.experimental.FirstFitPackIterDataset(
            pieces, length_struct=lengths, num_packing_bins=batch_size,
            shuffle_bins=False).map(_packed_row)
    else:
        rows = grain.experimental.ConcatThenSplitIterDataset(
            documents, length_struct=lengths).map(_unpacked_row)
    return rows.batch(batch_size, drop_remainder=True)


# ------------------------------------------------------------------------------------------
# Iterators


class DataIterator(Iterator[dict[str, np.ndarray]]):
    """A grain DatasetIterator with a JSON-serialisable state tied to the pipeline it came from.

    `get_state()` returns a dict that survives `json.dumps`/`json.loads`; `set_state(state)`
    makes the iterator yield exactly what the one that produced `state` would have yielded
    next, and raises ValueError for a state from a differently configured pipeline.
    `epochs()` counts the passes through each source so far (see the module docstring); the
    counts are part of the state.
    """

    def __init__(self, dataset: grain.IterDataset, fingerprints: tuple[str, ...],
                 share_sizes: dict[str, int]):
        self._iterator = iter(dataset)
        # The first is written into states; any of them is accepted (older versions' form).
        self._fingerprint, self._accepted = fingerprints[0], frozenset(fingerprints)
        self._share_sizes = dict(share_sizes)  # source name -> records in this process's share
        self._consumed = np.zeros(len(share_sizes), np.int64)  # in source order
        self._tokens = {"real": 0, "rows": 0}  # row positions yielded, and those with a token
        # Close grain's threads/processes when this is collected or, at the latest, at exit
        # (grain's own __del__ at interpreter teardown finds its modules gone and complains).
        self._finalizer = weakref.finalize(self, self._iterator.close)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        marks = batch.pop(SOURCE_STARTS)  # [B, T]: source index + 1 at each record's start
        self._consumed += np.bincount(marks.ravel(), minlength=len(self._consumed) + 1)[1:]
        self._tokens["rows"] += int(marks.size)
        self._tokens["real"] += (int(np.count_nonzero(batch["segment_ids"]))
                                 if "segment_ids" in batch else int(marks.size))
        return batch

    def packing_efficiency(self) -> float:
        """Real tokens / row positions over the batches yielded so far (padding is the rest);
        1.0 for layouts without padding, and before the first batch."""
        return self._tokens["real"] / self._tokens["rows"] if self._tokens["rows"] else 1.0

    def epochs(self) -> dict[str, float]:
        """Per source name: records consumed by this process / records in its share."""
        return {name: int(n) / size
                for (name, size), n in zip(self._share_sizes.items(), self._consumed)}

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._fingerprint,
                "grain": json.loads(json.dumps(self._iterator.get_state())),
                "records_consumed": {name: int(n) for name, n in
                                     zip(self._share_sizes, self._consumed)},
                "tokens": dict(self._tokens)}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("pipeline") not in self._accepted:
            raise ValueError(
                f"data iterator state is from another pipeline (fingerprint "
                f"{state.get('pipeline')!r}, this one {self._fingerprint!r}): the data config, "
                f"seq_len, batch size, seed or process layout changed (or the workdir of a "
                f"checkpoint from before workdirs were relocatable moved)")
        consumed = state.get("records_consumed")
        if consumed is None or set(consumed) != set(self._share_sizes):
            raise ValueError(
                f"data iterator state counts records of sources "
                f"{None if consumed is None else sorted(consumed)}, this pipeline has "
                f"{sorted(self._share_sizes)} (a state from before epochs were counted?)")
        self._iterator.set_state(_tuples_restored(state["grain"]))
        self._consumed = np.array([consumed[name] for name in self._share_sizes], np.int64)
        # (a state written before packing efficiency was counted: it counts from here)
        self._tokens = {key: int(n) for key, n in state.get("tokens", {"real": 0, "rows": 0}
                                                             ).items()}

    def close(self) -> None:
        """Stops worker processes and threads, if any."""
        self._finalizer()


def _tuples_restored(state):
    """JSON turns tuples into lists; grain's concat-then-split compares its slices as tuples."""
    if isinstance(state, dict):
        return {key: ({k: tuple(v) for k, v in value.items()} if key == "remainder_slices"
                      else _tuples_restored(value)) for key, value in state.items()}
    if isinstance(state, list):
        return [_tuples_restored(v) for v in state]
    return state


def _fingerprints(resolved: ResolvedData, workdir: str | None, **settings) -> tuple[str, ...]:
    """The pipeline's fingerprint, then the ones it had before that this pipeline still accepts.

    A source under the workdir (the built-in corpus) is named by its path relative to the
    workdir, so a copied or moved workdir resumes; other sources by their absolute path. Older
    versions named every source by its absolute path: that fingerprint is accepted too, so
    their checkpoints resume where they were written."""
    def digest(paths):
        description = {
            "sources": [(s.name, path, s.weight, s.manifest["records"],
                         s.manifest["tokenizer"]["sha256"])
                        for s, path in zip(resolved.sources, paths)],
            **settings,
        }
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]

    absolute = [storage.abspath(s.path) for s in resolved.sources]
    relative = [_relative_to(path, workdir) for path in absolute]
    return (digest(relative), digest([s.path for s in resolved.sources]))


def _relative_to(path: str, workdir: str | None) -> str:
    """`path` relative to the workdir when it lies inside it (on the same store), else as is."""
    rel = None if workdir is None else storage.relpath(path, storage.abspath(workdir))
    return path if rel is None or rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def batch_keys(resolved: ResolvedData, packing: bool) -> tuple[str, ...]:
    """The keys of the batches this data yields (what the jitted step's shardings name)."""
    if resolved.mode == "examples":
        return ("input_ids", "segment_ids", "loss_mask")
    return ("input_ids", "segment_ids") if packing else ("input_ids",)


def make_train_iterator(data_cfg, *, seq_len: int, batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1,
                        workdir: str | None = None) -> DataIterator:
    """Infinite iterator of this process's training batches.

    Yields dict(input_ids=np.int32 [batch_size, seq_len]) and, when `data_cfg.packing`,
    segment_ids=np.int32 [batch_size, seq_len] (0 = padding, 1.. = document within the row);
    example sources add loss_mask and always segment_ids (`batch_keys`).
    Process `process_index` of `process_count` reads a disjoint share of every source's records;
    `batch_size` is the per-process batch. Each source is shuffled with a seed derived from
    `seed` and its name, afresh each epoch. Reads data_cfg.builtin / tokenizer / sources /
    packing / eval_fraction / shuffle / num_workers / prefetch / builtin_vocab_size.

    The iterator has get_state() -> JSON-serialisable dict and set_state(state): a restored
    iterator yields exactly the batches the original would have yielded next (grain
    DatasetIterator semantics), and continues the same `epochs()` counts.
    """
    resolved = resolve_data(data_cfg, workdir)
    _check_shapes(resolved, data_cfg, seq_len, batch_size, process_index, process_count)
    records, share_sizes = _mixed_records(
        resolved, split="train", eval_fraction=data_cfg.eval_fraction, shuffle=data_cfg.shuffle,
        seed=seed, process_index=process_index, process_count=process_count)
    batches = _rows_and_batches(records, resolved, packing=data_cfg.packing, seq_len=seq_len,
                                batch_size=batch_size, prefetch=data_cfg.prefetch)
    if data_cfg.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (train.py parses them)
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data_cfg.num_workers, per_worker_buffer_size=max(data_cfg.prefetch, 1)))
    elif data_cfg.prefetch > 0:
        batches = grain.experimental.ThreadPrefetchIterDataset(
            batches, prefetch_buffer_size=data_cfg.prefetch)
    fingerprints = _fingerprints(
        resolved, workdir, split="train", seq_len=seq_len, batch_size=batch_size, seed=seed,
        process_index=process_index, process_count=process_count, packing=data_cfg.packing,
        shuffle=data_cfg.shuffle, eval_fraction=data_cfg.eval_fraction,
        num_workers=data_cfg.num_workers)
    return DataIterator(batches, fingerprints, share_sizes)


def make_eval_batches(data_cfg, *, seq_len: int, batch_size: int, num_batches: int,
                      process_index: int = 0, process_count: int = 1,
                      workdir: str | None = None) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` batches of the held-out split, deterministic, same dict format.

    The held-out split is every round(1 / data.eval_fraction)-th record of every source, read in
    order (no shuffle), mixed by weight, and shared between processes like the train split.
    Raises ValueError when it cannot fill `num_batches` batches.
    """
    if data_cfg.eval_fraction == 0:
        raise ValueError("make_eval_batches: data.eval_fraction is 0, there is no held-out split")
    if num_batches <= 0:
        raise ValueError(f"make_eval_batches: num_batches must be positive, got {num_batches}")
    resolved = resolve_data(data_cfg, workdir)
    _check_shapes(resolved, data_cfg, seq_len, batch_size, process_index, process_count)
    records, _ = _mixed_records(
        resolved, split="eval", eval_fraction=data_cfg.eval_fraction, shuffle=False, seed=0,
        process_index=process_index, process_count=process_count)
    batches_iter = iter(_rows_and_batches(records, resolved, packing=data_cfg.packing,
                                          seq_len=seq_len, batch_size=batch_size,
                                          prefetch=data_cfg.prefetch))
    batches = []
    try:
        for batch in batches_iter:
            del batch[SOURCE_STARTS]
            batches.append(batch)
            if len(batches) == num_batches:
                return batches
    finally:
        batches_iter.close()
    raise ValueError(
        f"the held-out split (eval_fraction {data_cfg.eval_fraction}, sources "
        f"{[s.path for s in resolved.sources]}) yields only {len(batches)} batches of "
        f"{batch_size} x {seq_len} for process {process_index} of {process_count}, "
        f"{num_batches} asked; raise data.eval_fraction or ask fewer")
