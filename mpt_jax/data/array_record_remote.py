"""Random access to ArrayRecord shards through byte-range reads, so shards on s3:// and gs://
(or local disk) are read in place. array_record's own reader (0.8.6) returns 0 records for an
s3:// path, silently, and failed on a 5 MB gs:// shard in the GCS emulator ("Failed to read
RiegeliPostscript"); the data pipeline reads every bucket's shards with this module.

Only the layout `mpt_jax.data.prepare` writes is read (ArrayRecordWriter options
"group_size:1,uncompressed"): each record is its own uncompressed riegeli simple chunk. The
facts used (riegeli doc/riegeli_records_file_format.md, riegeli/records/block.h,
riegeli/chunk_encoding/chunk.h and simple_decoder.cc; array_record cpp/layout.proto,
array_record_writer.cc, array_record_reader.cc):

- The file is 64 KiB blocks, each starting with a 24-byte block header (hash, distance back to
  the start of the chunk it interrupts, distance on to that chunk's end). A chunk is a 40-byte
  header (hash, data_size, data hash, chunk_type | num_records << 8, decoded_data_size) then
  its data; both may be interrupted by block headers, which the chunk's logical bytes skip.
- A simple chunk's data: compression byte, varint size of the sizes buffer, the record sizes
  as varints, then the concatenated records.
- The file starts with the fixed 64-byte signature chunk. Its last 64 KiB block holds the
  RiegeliPostscript chunk (3 copies of {footer_offset, magic}); at footer_offset, the footer
  chunk: a RiegeliFooterMetadata record, then one ArrayRecordFooter {chunk_offset,
  decoded_data_size, num_records} per data chunk. The footer is compressed like the records.

A file's footer is read once (when first needed; all files' at once, in parallel, since len()
needs them all) and its chunk offsets kept as an int64 array; a record then costs one range
read of its chunk, and `__getitems__` coalesces nearby chunks into shared reads.

Validated, structurally, with a one-line ValueError naming the file: the signature, the
postscript magic, the footer's metadata against its records, that every chunk ends exactly
where the next begins (chunk sizes from the footer, and again from each chunk's own header
when it is read), every block header a read crosses against its chunk, chunk type,
compression, varints and every size and bound. A truncated file fails these. Not verified:
riegeli's HighwayHash header and data hashes (pure-Python HighwayHash would cost more than the
read; object stores checksum their transfers), so a flipped bit inside a record's bytes, one
that leaves every size intact, is returned as read.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import operator
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mpt_jax import storage

BLOCK_SIZE = 1 << 16
BLOCK_HEADER_SIZE = 24
USABLE_BLOCK_SIZE = BLOCK_SIZE - BLOCK_HEADER_SIZE
CHUNK_HEADER_SIZE = 40
# The first 64 bytes of every riegeli/records file: block header + file signature chunk header.
SIGNATURE = bytes.fromhex(
    "83af70d10d884a3f0000000000000000"
    "400000000000000091bac23c9287e1a9"
    "0000000000000000e19f13c0e9b1c372"
    "73000000000000000000000000000000")
POSTSCRIPT_MAGIC = 0x71930E704FDAE05E
ARRAY_RECORD_VERSION = 1
SIMPLE_CHUNK, TRANSPOSED_CHUNK = ord("r"), ord("t")
COMPRESSIONS = {ord("b"): "brotli", ord("z"): "zstd", ord("s"): "snappy"}
# Footer protos: ArrayRecordFooter fields 1-3 as (tag, varint) pairs, the writer's order.
_FOOTER_TAGS = np.array([1 << 3, 2 << 3, 3 << 3], np.uint64)

# Chunks at most this far apart are fetched in one read in __getitems__: the bytes between
# cost less than another request's latency. A read is cut at _MAX_READ so large batches still
# spread over the read threads.
_COALESCE_GAP = 256 << 10
_MAX_READ = 8 << 20
_READ_THREADS = 16
_SUPPORTED = ("the remote reader reads the uncompressed shards mpt_jax.data.prepare writes "
              "(ArrayRecordWriter options 'group_size:1,uncompressed')")


class _FormatError(Exception):
    """What is wrong with the file, without its path (added by `_Shard`)."""


# ---------------------------------------------------------------------------------------------
# riegeli positions (riegeli/records/block.h), for ints and numpy int64 arrays alike
# ---------------------------------------------------------------------------------------------
def _remaining_in_block(pos):
    return (-pos) % BLOCK_SIZE


def _is_possible_chunk_boundary(pos):
    return _remaining_in_block(pos) < USABLE_BLOCK_SIZE


def _chunk_end(begin, data_size, num_records):
    """The position after a chunk beginning at `begin` (block.h ChunkEnd)."""
    length = CHUNK_HEADER_SIZE + data_size
    overhead_blocks = (length + (begin + USABLE_BLOCK_SIZE - 1) % BLOCK_SIZE) // USABLE_BLOCK_SIZE
    after_data = begin + length + overhead_blocks * BLOCK_HEADER_SIZE
    pos = begin + num_records
    maximum = np.maximum if isinstance(begin, np.ndarray) else max
    min_end = pos + maximum(_remaining_in_block(pos) - (USABLE_BLOCK_SIZE - 1), 0)
    return maximum(after_data, min_end)


# ---------------------------------------------------------------------------------------------
# varints and protobuf fields
# ---------------------------------------------------------------------------------------------
def _varint(buf, pos: int) -> tuple[int, int]:
    """-> (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise _FormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise _FormatError("varint longer than 10 bytes")


def _varints(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All the varints in `buf` (uint8), back to back -> (values uint64, end of each)."""
    if len(buf) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    last = buf < 0x80
    if not last[-1]:
        raise _FormatError("truncated varint")
    ends = np.flatnonzero(last) + 1
    starts = np.concatenate(([0], ends[:-1]))
    lengths = ends - starts
    if lengths.max() > 10:
        raise _FormatError("varint longer than 10 bytes")
    shifts = (np.arange(len(buf)) - np.repeat(starts, lengths)) * 7
    parts = (buf & 0x7F).astype(np.uint64) << shifts.astype(np.uint64)
    return np.bitwise_or.reduceat(parts, starts), ends


def _proto_fields(buf) -> dict[int, int | memoryview]:
    """A protobuf message's varint and length-delimited fields by number (last one wins)."""
    fields, pos = {}, 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            fields[number], pos = _varint(buf, pos)
        elif wire_type == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise _FormatError("truncated protobuf field")
            fields[number], pos = buf[pos:pos + length], pos + length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise _FormatError(f"protobuf wire type {wire_type}")
    if pos != len(buf):
        raise _FormatError("truncated protobuf field")
    return fields


# ---------------------------------------------------------------------------------------------
# chunks
# ---------------------------------------------------------------------------------------------
def _decode_chunk(begin: int, phys: memoryview, end: int | None):
    """The chunk at file position `begin`, from physical bytes `phys` starting there ->
    (chunk_type, num_records, decoded_data_size, data). `end`: where the chunk must end (the
    next chunk's begin); None: where its header says, within `phys`."""
    stop = begin + len(phys)
    pieces, block_headers = [], []
    pos = begin
    boundary = begin + _remaining_in_block(begin)
    while boundary < stop:
        if boundary + BLOCK_HEADER_SIZE > stop:
            raise _FormatError(f"chunk at offset {begin} ends inside the block header at "
                               f"{boundary}")
        pieces.append(phys[pos - begin:boundary - begin])
        block_headers.append((boundary, *struct.unpack_from("<8xQQ", phys, boundary - begin)))
        pos = boundary + BLOCK_HEADER_SIZE
        boundary += BLOCK_SIZE
    pieces.append(phys[pos - begin:])
    logical = pieces[0] if len(pieces) == 1 else memoryview(b"".join(pieces))
    if len(logical) < CHUNK_HEADER_SIZE:
        raise _FormatError(f"chunk at offset {begin}: truncated chunk header")
    data_size, type_and_count, decoded_size = struct.unpack_from("<8xQ8xQQ", logical)
    chunk_type, num_records = type_and_count & 0xFF, type_and_count >> 8
    if CHUNK_HEADER_SIZE + data_size > len(logical) or num_records > len(phys):
        raise _FormatError(f"chunk at offset {begin}: its header's sizes run past the "
                           f"{len(phys)} bytes there")
    chunk_end = _chunk_end(begin, data_size, num_records)
    if end is not None and chunk_end != end:
        raise _FormatError(f"chunk at offset {begin}: its header puts its end at {chunk_end}, "
                           f"the footer at {end}")
    if chunk_end > stop:
        raise _FormatError(f"chunk at offset {begin}: its header puts its end at {chunk_end}, "
                           f"past the {stop - begin} bytes there")
    for at, previous_chunk, next_chunk in block_headers:
        if at < chunk_end and (previous_chunk != at - begin or next_chunk != chunk_end - at):
            raise _FormatError(f"block header at offset {at} does not match the chunk at "
                               f"offset {begin}")
    return chunk_type, num_records, decoded_size, logical[CHUNK_HEADER_SIZE:
                                                          CHUNK_HEADER_SIZE + data_size]


def _simple_chunk(chunk_type: int, decoded_size: int, data: memoryview, what: str):
    """A simple, uncompressed chunk's (sizes buffer, values buffer)."""
    if chunk_type == TRANSPOSED_CHUNK:
        raise _FormatError(f"{what} is a transposed chunk; {_SUPPORTED}")
    if chunk_type != SIMPLE_CHUNK:
        raise _FormatError(f"{what} has chunk type {chunk_type:#x}, not a simple chunk ('r')")
    if len(data) == 0:
        raise _FormatError(f"{what}: empty chunk data")
    if data[0] != 0:
        name = COMPRESSIONS.get(data[0], f"unknown compression type {data[0]:#x}")
        raise _FormatError(f"{what} is compressed ({name}); {_SUPPORTED}")
    sizes_size, pos = _varint(data, 1)
    if pos + sizes_size > len(data):
        raise _FormatError(f"{what}: its sizes run past its data")
    values = data[pos + sizes_size:]
    if len(values) != decoded_size:
        raise _FormatError(f"{what}: {len(values)} bytes of records, its header says "
                           f"{decoded_size}")
    return data[pos:pos + sizes_size], values


def _check_writer_options(options: str) -> None:
    """Options the footer records that mean another layout, said plainly (the structural
    checks would refuse such a file too, less clearly)."""
    parsed = dict(o.split(":", 1) if ":" in o else (o, "") for o in options.split(",") if o)
    if parsed.get("transpose") == "true":
        unsupported = "transposed chunks"
    elif parsed.get("group_size", "1") != "1":
        unsupported = f"group_size {parsed['group_size']}"
    elif parsed.get("pad_to_block_boundary") == "true":
        unsupported = "chunks padded to block boundaries"
    else:
        return
    raise _FormatError(f"written with {unsupported} (writer options {options!r}); {_SUPPORTED}")


class _Shard:
    """One file: its path and, once `load`ed, `bounds` (int64, num_records + 1): record i's
    chunk occupies file bytes [bounds[i], bounds[i + 1])."""

    def __init__(self, path: str):
        self.path = path
        self.bounds: np.ndarray | None = None
        self._fs = storage.filesystem(path) if storage.is_remote(path) else None

    def read(self, start: int, end: int) -> bytes:
        if self._fs is not None:
            fs, inner = self._fs
            data = storage.retrying(self.path, lambda: fs.cat_file(inner, start=start, end=end),
                                    what="reading")
        else:
            with storage.errors(self.path, "reading"), open(self.path, "rb") as fh:
                data = os.pread(fh.fileno(), end - start, start)
        if len(data) != end - start:
            raise ValueError(f"{self.path}: truncated: {len(data)} of the {end - start} bytes "
                             f"at offset {start} are there")
        return data

    def load(self) -> None:
        try:
            self.bounds = self._load()
        except _FormatError as e:
            raise ValueError(f"{self.path}: {e}") from None

    def record(self, index: int, phys: memoryview) -> bytes:
        """Record `index` from its chunk's physical bytes."""
        begin = int(self.bounds[index])
        try:
            chunk_type, num_records, decoded_size, data = _decode_chunk(
                begin, phys, int(self.bounds[index + 1]))
            what = f"chunk at offset {begin}"
            sizes, values = _simple_chunk(chunk_type, decoded_size, data, what)
            size, pos = _varint(sizes, 0)
            if num_records != 1 or pos != len(sizes) or size != decoded_size:
                raise _FormatError(f"{what}: holds {num_records} records, sizes do not match")
        except _FormatError as e:
            raise ValueError(f"{self.path}: {e}") from None
        return bytes(values)

    @staticmethod
    def _footer_offset(postscript_at: int, block: bytes) -> int:
        chunk_type, _, decoded_size, data = _decode_chunk(postscript_at, memoryview(block), None)
        sizes, values = _simple_chunk(chunk_type, decoded_size, data, "its chunk")
        sizes, _ = _varints(np.frombuffer(sizes, np.uint8))
        first = int(sizes[0]) if len(sizes) else 0
        if not len(sizes) or (sizes != first).any() or values != bytes(values[:first]) * len(sizes):
            raise _FormatError("not identical copies of one record")
        postscript = _proto_fields(values[:first])
        if postscript.get(2) != POSTSCRIPT_MAGIC or not isinstance(postscript.get(1), int):
            raise _FormatError("no ArrayRecord magic")
        footer_at = postscript[1]
        if not (len(SIGNATURE) <= footer_at < postscript_at
                and _is_possible_chunk_boundary(footer_at)):
            raise _FormatError(f"footer offset {footer_at} is out of bounds")
        return footer_at

    def _load(self) -> np.ndarray:
        with storage.errors(self.path, "reading"):
            size = storage.size(self.path)
        if size < 2 * BLOCK_SIZE or size % BLOCK_SIZE:
            raise _FormatError(f"size {size} is not a whole number (>= 2) of 64 KiB blocks, as "
                               "ArrayRecordWriter writes: truncated, or not an ArrayRecord file")
        if self.read(0, len(SIGNATURE)) != SIGNATURE:
            raise _FormatError("no riegeli/records file signature at its start")

        postscript_at = size - BLOCK_SIZE
        try:
            footer_at = self._footer_offset(postscript_at, self.read(postscript_at, size))
        except _FormatError as e:
            raise _FormatError(f"no ArrayRecord postscript in its last 64 KiB block ({e}): "
                               "truncated, or not an ArrayRecord file") from None
        chunk_type, num_records, decoded_size, data = _decode_chunk(
            footer_at, memoryview(self.read(footer_at, postscript_at)), None)
        what = f"footer chunk at offset {footer_at}"
        sizes, values = _simple_chunk(chunk_type, decoded_size, data, what)
        sizes, _ = _varints(np.frombuffer(sizes, np.uint8))
        if num_records == 0 or len(sizes) != num_records or int(sizes.sum()) != decoded_size:
            raise _FormatError(f"{what}: record sizes do not match its header")
        meta = _proto_fields(values[:int(sizes[0])]).get(1)
        meta = _proto_fields(meta) if isinstance(meta, memoryview) else {}
        if meta.get(1) != ARRAY_RECORD_VERSION:
            raise _FormatError(f"{what}: no ArrayRecord footer metadata of version "
                               f"{ARRAY_RECORD_VERSION} (got {meta.get(1)!r})")
        if isinstance(meta.get(4), memoryview):
            _check_writer_options(bytes(meta[4]).decode("utf-8", "replace"))
        num_chunks = num_records - 1
        if meta.get(2) != num_chunks:
            raise _FormatError(f"{what}: its metadata counts {meta.get(2)} chunks, it indexes "
                               f"{num_chunks}")

        body = np.frombuffer(values[int(sizes[0]):], np.uint8)
        fields, ends = _varints(body)
        if (len(fields) != 6 * num_chunks
                or not (fields[0::2].reshape(-1, 3) == _FOOTER_TAGS).all()
                or not (ends[5::6] == np.cumsum(sizes[1:])).all()):
            raise _FormatError(f"{what}: chunk index entries are not the ArrayRecordFooter "
                               "protos ArrayRecordWriter writes")
        offsets, decoded_sizes, counts = fields[1::6], fields[3::6], fields[5::6]
        if (counts != 1).any():
            raise _FormatError(f"chunks of {int(counts.max())} records (written with group_size "
                               f"> 1); {_SUPPORTED}")
        if meta.get(3) != num_chunks:
            raise _FormatError(f"{what}: its metadata counts {meta.get(3)} records, its chunks "
                               f"{num_chunks}")
        if num_chunks and (offsets.max() >= footer_at or decoded_sizes.max() >= footer_at):
            raise _FormatError(f"{what}: a chunk offset or size is past the footer")
        bounds = np.append(offsets.astype(np.int64), footer_at)
        if num_chunks and (bounds[0] < len(SIGNATURE)
                           or not _is_possible_chunk_boundary(int(bounds[0]))):
            raise _FormatError(f"{what}: first chunk offset {bounds[0]} is invalid")
        # An uncompressed one-record simple chunk: compression byte, size of the sizes (1 byte:
        # a varint is at most 10), the size varint, the record.
        decoded_sizes = decoded_sizes.astype(np.int64)
        size_varint = 1 + sum((decoded_sizes >> (7 * k) > 0).astype(np.int64)
                              for k in range(1, 10))
        ends = _chunk_end(bounds[:-1], 2 + size_varint + decoded_sizes, 1)
        bad = np.flatnonzero(ends != bounds[1:])
        if len(bad):
            i = int(bad[0])
            raise _FormatError(f"chunk {i} at offset {bounds[i]} would end at {ends[i]} but the "
                               f"next chunk begins at {bounds[i + 1]}: not one-record uncompressed "
                               "simple chunks, or a corrupt footer")
        return bounds


class RemoteArrayRecordSource:
    """grain RandomAccessDataSource over ArrayRecord files (local, gs://, s3://), records in
    file order, keys 0 <= key < len (IndexError otherwise, negative ones too, as a data source
    key is a position); thread-safe. Footers are read on first use; pickling keeps only the
    paths (a worker process reads the footers again rather than receiving every chunk
    offset)."""

    def __init__(self, paths: str | list[str]):
        self._paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self._paths = [os.fspath(p) for p in self._paths]
        self._lock = threading.Lock()
        self._shards: list[_Shard] | None = None
        self._starts: list[int] | None = None  # first record index of each file, then the total
        self._pool: ThreadPoolExecutor | None = None

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    def __getstate__(self):
        return {"paths": self._paths}

    def __setstate__(self, state):
        self.__init__(state["paths"])

    def __repr__(self):
        digest = hashlib.sha1("\n".join(self._paths).encode()).hexdigest()
        return f"RemoteArrayRecordSource({len(self._paths)} files, hash_of_paths={digest})"

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(_READ_THREADS,
                                                thread_name_prefix="array_record_remote")
            return self._pool

    def _index(self) -> tuple[list[_Shard], list[int]]:
        if self._starts is None:
            with self._lock:
                if self._starts is None:
                    shards = [_Shard(p) for p in self._paths]
                    if len(shards) > 1:
                        with ThreadPoolExecutor(min(_READ_THREADS, len(shards))) as pool:
                            list(pool.map(_Shard.load, shards))
                    else:
                        for shard in shards:
                            shard.load()
                    self._shards = shards
                    self._starts = list(itertools.accumulate(
                        (len(s.bounds) - 1 for s in shards), initial=0))
        return self._shards, self._starts

    def __len__(self) -> int:
        return self._index()[1][-1]

    def __getitem__(self, index: int) -> bytes:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices) -> list[bytes]:
        shards, starts = self._index()
        total = starts[-1]
        keys = [operator.index(i) for i in indices]
        wanted: dict[tuple[int, int], list[int]] = {}  # (file, record in file) -> output slots
        for slot, key in enumerate(keys):
            if not 0 <= key < total:
                raise IndexError(f"record index {key} out of range for {total} records")
            file = bisect.bisect_right(starts, key) - 1
            wanted.setdefault((file, key - starts[file]), []).append(slot)

        reads = []  # [file, start, end, [records in file]]: coalesced range reads
        for file, record in sorted(wanted):
            bounds = shards[file].bounds
            begin, end = int(bounds[record]), int(bounds[record + 1])
            if (reads and reads[-1][0] == file and begin - reads[-1][2] <= _COALESCE_GAP
                    and end - reads[-1][1] <= _MAX_READ):
                reads[-1][2] = end
                reads[-1][3].append(record)
            else:
                reads.append([file, begin, end, [record]])

        def run(read):
            file, start, end, records = read
            shard = shards[file]
            buf = memoryview(shard.read(start, end))
            return [((file, record), shard.record(record, buf[
                int(shard.bounds[record]) - start:int(shard.bounds[record + 1]) - start]))
                for record in records]

        remote = any(storage.is_remote(shards[read[0]].path) for read in reads)
        results = (self._executor().map(run, reads) if remote and len(reads) > 1
                   else map(run, reads))
        out: list[bytes] = [b""] * len(keys)
        for done in results:
            for where, value in done:
                for slot in wanted[where]:
                    out[slot] = value
        return out
