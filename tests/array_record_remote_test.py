"""mpt_jax.data.array_record_remote against files written by array_record's own writer, read
locally and from moto's S3 server on 127.0.0.1 (started here on a free port, stopped after)."""
from __future__ import annotations

import os
import pickle
import random

import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from emulators import S3_ENV, fresh_filesystems, s3_server

from mpt_jax.data.array_record_remote import BLOCK_SIZE, RemoteArrayRecordSource

# mpt_jax.data.prepare.ARRAY_RECORD_OPTIONS (not imported: prepare pulls in the tokenizers)
OPTIONS = "group_size:1,uncompressed"
BUCKET = "shards"


def _write(path, records, options=OPTIONS):
    writer = ArrayRecordWriter(str(path), options)
    for record in records:
        writer.write(record)
    writer.close()
    return str(path)


def _records(sizes, seed=0):
    rng = random.Random(seed)
    return [rng.randbytes(n) for n in sizes]


def _one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


# Sizes around the 64 KiB block: 0, 1, varint-length edges, records that fill a block to a few
# bytes either side, and ones spanning several blocks.
SIZES = [0, 1, 2, 127, 128, 300, 16383, 16384, BLOCK_SIZE - 130, BLOCK_SIZE - 64, BLOCK_SIZE - 1,
         BLOCK_SIZE, BLOCK_SIZE + 1, 70_000, 3, 250_000, 0, 5, 3 * BLOCK_SIZE + 17, 9]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three files in order: mixed sizes, an empty one, and 10000 small records (their footer
    is over 64 KiB: it spans a block boundary)."""
    root = tmp_path_factory.mktemp("shards")
    contents = [_records(SIZES), [], _records([i % 23 for i in range(10_000)], seed=1)]
    paths = [_write(root / f"part-{i}.array_record", c) for i, c in enumerate(contents)]
    return paths, contents


def test_reads_every_record_like_array_record(files):
    paths, contents = files
    for path, records in zip(paths, contents):
        assert (list(ArrayRecordReader(path).read_all()) if records else []) == records
        src = RemoteArrayRecordSource([path])
        assert len(src) == len(records)
        assert [src[i] for i in range(len(src))] == records
        assert src.__getitems__(range(len(src))) == records


def test_footer_spanning_blocks(files):
    paths, contents = files
    src = RemoteArrayRecordSource(paths[2])
    assert len(src) == 10_000
    (shard,) = src._index()[0]
    footer_at = int(shard.bounds[-1])
    assert os.path.getsize(paths[2]) - BLOCK_SIZE - footer_at > BLOCK_SIZE
    assert src.__getitems__([9_999, 0, 5_000]) == [contents[2][i] for i in (9_999, 0, 5_000)]


def test_chunk_ends_around_a_block_header(tmp_path):
    """The first chunk (at offset 64) ends anywhere from 40 bytes before the first block
    boundary to 40 after its header, so the next chunk, and its header, begin there or are cut
    by the block header."""
    for n in range(BLOCK_SIZE - 64 - 45 - 40 - 24, BLOCK_SIZE - 64 - 45 + 40, 3):
        records = _records([n, 50, 0, 7], seed=n)
        src = RemoteArrayRecordSource([_write(tmp_path / f"{n}.array_record", records)])
        assert src.__getitems__(range(4)) == records, n


def test_files_in_order_and_random_batches(files):
    paths, contents = files
    everything = [r for c in contents for r in c]
    src = RemoteArrayRecordSource(paths)
    assert len(src) == len(everything)
    rng = random.Random(3)
    for _ in range(5):
        keys = [rng.randrange(len(everything)) for _ in range(300)] + [0, 0, len(everything) - 1]
        rng.shuffle(keys)
        assert src.__getitems__(keys) == [everything[k] for k in keys]
    assert src[len(SIZES)] == everything[len(SIZES)]  # the first record of the third file
    for bad in (len(everything), -1):
        with pytest.raises(IndexError):
            src[bad]
        with pytest.raises(IndexError):
            src.__getitems__([0, bad])


def test_pickles_without_its_index(files):
    paths, contents = files
    src = RemoteArrayRecordSource(paths)
    assert src[3] == contents[0][3]
    state = pickle.dumps(src)
    assert len(state) < 1000
    copy = pickle.loads(state)
    assert len(copy) == len(src) and copy[3] == contents[0][3]
    assert repr(copy) == repr(src) and repr(src).startswith("RemoteArrayRecordSource(3 files")


@pytest.mark.parametrize("options,match", [
    ("group_size:1", r"is compressed \(zstd\)"),
    ("group_size:1,snappy", r"is compressed \(snappy\)"),
    ("group_size:1,brotli:6", r"is compressed \(brotli\)"),
    ("group_size:4,uncompressed", r"group_size 4"),
    ("group_size:1,transpose:true,uncompressed", r"transposed"),
    ("group_size:1,uncompressed,pad_to_block_boundary:true", r"padded to block boundaries"),
])
def test_other_layouts_are_refused(tmp_path, options, match):
    path = _write(tmp_path / "other.array_record", _records([100] * 10), options)
    message = _one_line_error(lambda: len(RemoteArrayRecordSource([path])), match)
    assert message.startswith(path + ": ")


def _damaged(tmp_path, name, edit):
    """A copy of a good file, edited (bytes -> bytes)."""
    good = tmp_path / "good.array_record"
    if not good.exists():
        _write(good, _records([10, BLOCK_SIZE + 100, 20, 0, 30]))
    path = tmp_path / name
    path.write_bytes(edit(good.read_bytes()))
    return str(path)


@pytest.mark.parametrize("name,edit,match", [
    ("last-byte", lambda b: b[:-1], "not a whole number"),
    ("last-block", lambda b: b[:-BLOCK_SIZE], "postscript|footer"),
    ("half", lambda b: b[:len(b) // 2], "not a whole number"),
    ("empty", lambda b: b"", "not a whole number"),
    ("signature", lambda b: b"\x00" + b[1:], "signature"),
    # the postscript's data: its first and its last copy of {footer_offset, magic}
    ("postscript-1", lambda b: b[:-BLOCK_SIZE + 72] + bytes(8) + b[-BLOCK_SIZE + 80:],
     "postscript"),
    ("postscript-3", lambda b: b[:-BLOCK_SIZE + 105] + bytes(5) + b[-BLOCK_SIZE + 110:],
     "postscript"),
    # the first data chunk's data_size, 8 bytes into its header at offset 64
    ("chunk-size", lambda b: b[:72] + b"\x09" + b[73:], "chunk at offset 64"),
])
def test_damaged_files_fail_in_one_line(tmp_path, name, edit, match):
    path = _damaged(tmp_path, name, edit)
    src = RemoteArrayRecordSource([path])
    if name == "chunk-size":  # not the footer: found when the record is read
        assert len(src) == 5 and src[2] == _records([10, BLOCK_SIZE + 100, 20, 0, 30])[2]
        _one_line_error(lambda: src[0], match)
    else:
        _one_line_error(lambda: len(src), match)


def test_missing_file(tmp_path):
    path = str(tmp_path / "missing.array_record")
    message = _one_line_error(lambda: len(RemoteArrayRecordSource([path])),
                              "no such file")
    assert message.startswith(path)


# ---------------------------------------------------------------------------------------------
# S3 (moto)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_files(files, tmp_path_factory):
    """`files` uploaded to s3://shards/, plus a compressed one."""
    import boto3

    paths, contents = files
    compressed = _write(tmp_path_factory.mktemp("zstd") / "z.array_record", [b"x" * 100] * 3,
                        "group_size:1,zstd:3")
    with s3_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        for k, v in {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(k, v)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        for path in [*paths, compressed]:
            client.upload_file(path, BUCKET, f"data/{os.path.basename(path)}")
        fresh_filesystems()
        yield [f"s3://{BUCKET}/data/{os.path.basename(p)}" for p in paths], contents
    fresh_filesystems()


def test_s3(s3_files):
    paths, contents = s3_files
    everything = [r for c in contents for r in c]
    src = RemoteArrayRecordSource(paths)
    assert len(src) == len(everything)
    rng = random.Random(4)
    keys = rng.sample(range(len(everything)), 500) + list(range(len(SIZES)))
    assert src.__getitems__(keys) == [everything[k] for k in keys]
    assert src[len(everything) - 1] == everything[-1]

    _one_line_error(lambda: len(RemoteArrayRecordSource([f"s3://{BUCKET}/data/z.array_record"])),
                    r"^s3://shards/data/z.array_record: footer chunk at offset \d+ is compressed "
                    r"\(zstd\)")
    _one_line_error(lambda: len(RemoteArrayRecordSource([f"s3://{BUCKET}/data/nope"])),
                    "no such file")


def test_s3_through_grain_threads(s3_files):
    import grain

    paths, contents = s3_files
    src = pickle.loads(pickle.dumps(RemoteArrayRecordSource(paths[:1])))
    ds = grain.MapDataset.source(src).to_iter_dataset(grain.ReadOptions(num_threads=4))
    assert list(ds) == contents[0]
    # grain reads a batch's records one __getitem__ each: 10000 requests would take moto
    # minutes, so a shuffled sample (one in 50) of all three files
    def sample(source):
        return grain.MapDataset.source(source).shuffle(seed=5)[::50].batch(16, batch_fn=list)

    ds = sample(RemoteArrayRecordSource(paths)).to_iter_dataset(grain.ReadOptions(num_threads=4))
    assert list(ds) == list(sample([r for c in contents for r in c]))
