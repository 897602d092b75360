"""Streaming file formats for the converter: safetensors read/write and our orbax param arrays.

Why not `safetensors.safe_open`: it memory-maps the whole file, and every page a read touches stays
mapped, so the process's resident set grows to the size of the checkpoint (13.3 GB for MPT-7B)
even though only one tensor is live at a time. Here a header is parsed once and each tensor is
`readinto` a fresh numpy buffer at its offset; the writer lays out a header from the known shapes
and then appends tensors one by one. Both check everything a corrupt file can get wrong (size,
header length, JSON, dtype, offsets) and raise `ConversionError` naming the file.

Our checkpoints' `params/` directory is what `ocp.StandardCheckpointer().save(dir, pure_dict)`
restores: `_METADATA` (the tree), `_CHECKPOINT_METADATA`, and one zarr array per leaf named by
the leaf's dotted path. The converter writes that layout directly with tensorstore (no OCDBT,
uncompressed, chunks of one layer for layer-stacked arrays) so that a stacked array is written
slice by slice and never held whole; orbax's own save would need the whole pytree in memory.
Reading handles both that layout and orbax's default OCDBT one (the trainer's checkpoints).
"""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Iterable, NamedTuple

import ml_dtypes
import numpy as np
import tensorstore as ts

from mpt_jax import storage


# No fsync per chunk (the directory is renamed into place when complete) and no chunk cache.
_CONTEXT = ts.Context({"file_io_sync": False, "cache_pool": {"total_bytes_limit": 0}})


class ConversionError(ValueError):
    """Bad input for the converter; the message names the file and the problem."""


# safetensors dtype names <-> numpy
ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NP_TO_ST = {v: k for k, v in ST_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class TensorInfo(NamedTuple):
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Parses and checks one safetensors file's header: {name: TensorInfo}, __metadata__."""
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    size = storage.size(str(path))
    with storage.errors(str(path), "reading"), _open_rb(path) as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path}: truncated file ({size} bytes, no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise ConversionError(
                f"{path}: bad safetensors header (header length {n} exceeds file size {size})")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"{path}: bad safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: bad safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    out: dict[str, TensorInfo] = {}
    end_max = 0
    for name, h in header.items():
        try:
            dtype = ST_DTYPES[h["dtype"]]
            shape = tuple(int(s) for s in h["shape"])
            begin, end = (int(o) for o in h["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(
                f"{path}: bad safetensors header entry for {name!r}: {h!r}") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise ConversionError(
                f"{path}: bad safetensors header: {name!r} offsets [{begin}, {end}) do not hold "
                f"{h['dtype']} {list(shape)}")
        end_max = max(end_max, end)
        out[name] = TensorInfo(path, dtype, shape, 8 + n + begin, nbytes)
    if 8 + n + end_max > size:
        raise ConversionError(
            f"{path}: truncated file ({size} bytes; the header needs {8 + n + end_max})")
    return out, meta


def _open_rb(path):
    """Unbuffered locally (readinto fills the caller's array directly); on gs:// / s3:// a
    ranged-read file, fetched in blocks as the reads ask."""
    if storage.is_remote(path):
        return storage.open_file(str(path), "rb")
    return open(path, "rb", buffering=0)


def read_tensor(info: TensorInfo, name: str) -> np.ndarray:
    out = np.empty(info.shape, info.dtype)
    with storage.errors(str(info.file), f"reading {name!r}"), _open_rb(info.file) as fh:
        fh.seek(info.start)
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = 0
        while got < info.nbytes:
            k = fh.readinto(view[got:])
            if not k:
                raise ConversionError(f"{info.file}: truncated file while reading {name!r}")
            got += k
    return out


def scan_source(src: Path) -> tuple[dict[str, TensorInfo], list[Path]]:
    """All tensors of an HF-layout directory: sharded (model.safetensors.index.json) or not."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ConversionError(f"{index}: not a valid safetensors index ({e!r})") from None
    else:
        files = sorted(p.name for p in src.glob("*.safetensors"))
        weight_map = None
        if not files:
            raise ConversionError(f"{src}: no *.safetensors files (and no "
                                  "model.safetensors.index.json)")
    tensors: dict[str, TensorInfo] = {}
    paths = []
    for fname in files:
        path = src / fname
        infos, _ = read_header(path)
        paths.append(path)
        for name, info in infos.items():
            if name in tensors:
                raise ConversionError(f"{path}: tensor {name!r} also in {tensors[name].file}")
            tensors[name] = info
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in tensors:
                raise ConversionError(f"{src / fname}: missing tensor {name!r} listed in {index}")
            if tensors[name].file.name != fname:
                raise ConversionError(
                    f"{index}: {name!r} is listed in {fname} but found in {tensors[name].file}")
    return tensors, paths


class SafetensorsWriter:
    """Writes one safetensors file whose tensor list is known up front, tensor by tensor."""

    def __init__(self, path: Path, entries: list[tuple[str, np.dtype, tuple[int, ...]]]):
        header: dict = {"__metadata__": {"format": "pt"}}
        off = 0
        self.order = []
        for name, dtype, shape in entries:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": NP_TO_ST[np.dtype(dtype)], "shape": list(shape),
                            "data_offsets": [off, off + nbytes]}
            self.order.append((name, np.dtype(dtype), tuple(shape)))
            off += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        # on gs:// / s3:// an upload in parts, published whole when closed
        self.path = path
        self.fh = storage.open_file(str(path), "wb")
        self.fh.write(struct.pack("<Q", len(raw)) + raw)
        self.next = 0

    def write(self, name: str, arr: np.ndarray) -> None:
        want, dtype, shape = self.order[self.next]
        if name != want or arr.dtype != dtype or arr.shape != shape:
            raise AssertionError(f"writer expected {want} {dtype} {shape}, got {name} "
                                 f"{arr.dtype} {arr.shape}")
        self.fh.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.order):
            raise AssertionError(f"{self.path}: {len(self.order) - self.next} tensors unwritten")
        self.fh.close()


# ---------------------------------------------------------------------------------------------
# Our orbax params directory
# ---------------------------------------------------------------------------------------------
def leaf_name(path: tuple[str, ...]) -> str:
    return ".".join(path)


class ParamsWriter:
    """Writes an orbax-restorable `params/` directory array by array, slice by slice.

    Leaves in `transposed` are chunked in Fortran order: the bytes of a layer's `[in, out]`
    chunk are then exactly torch's `[out, in]` row-major tensor, so import and export copy
    bytes instead of transposing (a strided transpose runs at ~100 MB/s on a small CPU box).
    Readers (orbax, tensorstore) see an ordinary `[L, in, out]` array either way."""

    def __init__(self, directory: Path, leaves: dict[tuple[str, ...], tuple[tuple, np.dtype]],
                 stacked: Iterable[tuple[str, ...]], transposed: Iterable[tuple[str, ...]]):
        self.dir = directory
        storage.makedirs(str(directory))
        stacked, transposed = set(stacked), set(transposed)
        self.arrays = {}
        self.pending: list = []
        for path, (shape, dtype) in leaves.items():
            chunks = (1,) + tuple(shape[1:]) if path in stacked else tuple(shape)
            spec = {"driver": "zarr",
                    "kvstore": storage.tensorstore_kvstore(str(directory / leaf_name(path))),
                    "metadata": {"shape": list(shape), "chunks": list(chunks),
                                 "dtype": _zarr_dtype(dtype), "compressor": None,
                                 "order": "F" if path in transposed else "C"}}
            self.arrays[path] = ts.open(spec, create=True, open=False, context=_CONTEXT).result()
        self.leaves = leaves
        self.transposed = transposed

    def write(self, path: tuple[str, ...], index, value: np.ndarray) -> None:
        """Writes `value` (torch layout: `[out, in]` for transposed leaves) at `index` (None =
        the whole array, int = one layer), asynchronously with a bounded number in flight."""
        arr = self.arrays[path] if index is None else self.arrays[path][index]
        if path in self.transposed:
            value = value.T  # a view; F-order chunks make this a plain copy
        self.pending.append(arr.write(value))
        while len(self.pending) > 2:
            self.pending.pop(0).result()

    def close(self) -> None:
        for f in self.pending:
            f.result()
        tree = {}
        for path in self.leaves:
            tree[str(path)] = {
                "key_metadata": [{"key": k, "key_type": 2} for k in path],
                "value_metadata": {"value_type": "np.ndarray", "skip_deserialize": False},
            }
        meta = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
                "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
        (self.dir / "_METADATA").write_text(json.dumps(meta))
        now = time.time_ns()
        (self.dir / "_CHECKPOINT_METADATA").write_text(json.dumps({
            "item_handlers": "orbax.checkpoint._src.handlers.standard_checkpoint_handler."
                             "StandardCheckpointHandler",
            "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now,
            "commit_timestamp_nsecs": now, "custom_metadata": {}}))


def _zarr_dtype(dtype) -> str:
    dtype = np.dtype(dtype)
    return "bfloat16" if dtype == np.dtype(ml_dtypes.bfloat16) else dtype.str


class ParamsReader:
    """Reads leaves (or one layer of a leaf) of an orbax `params/` directory: our converter's
    layout or orbax's default (OCDBT, zarr or zarr3) as the trainer writes it."""

    def __init__(self, directory: Path):
        self.dir = directory
        meta_path = directory / "_METADATA"
        if not meta_path.is_file():
            raise ConversionError(f"{meta_path}: file not found (not an orbax checkpoint)")
        try:
            meta = json.loads(meta_path.read_text())
            tree = meta["tree_metadata"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{meta_path}: not valid orbax metadata ({e!r})") from None
        self.paths = [tuple(k["key"] for k in v["key_metadata"]) for v in tree.values()]
        self.use_ocdbt = bool(meta.get("use_ocdbt", True))
        self.driver = "zarr3" if meta.get("use_zarr3", False) else "zarr"
        self._open = {}

    def array(self, path: tuple[str, ...]):
        if path not in self._open:
            name = leaf_name(path)
            if self.use_ocdbt:
                kv = {"driver": "ocdbt",
                      "base": storage.tensorstore_kvstore(str(self.dir) + "/"), "path": name}
            else:
                kv = storage.tensorstore_kvstore(str(self.dir / name))
            try:
                # A missing chunk is an error, not zeros: both writers store every chunk
                # (orbax: store_data_equal_to_fill_value; ours: zarr without a fill value).
                self._open[path] = ts.open({"driver": self.driver, "kvstore": kv,
                                            "fill_missing_data_reads": False},
                                           open=True, read=True, context=_CONTEXT).result()
            except ValueError as e:
                raise ConversionError(f"{self.dir / name}: cannot open array ({e})") from None
        return self._open[path]

    def shape_dtype(self, path) -> tuple[tuple[int, ...], np.dtype]:
        a = self.array(path)
        return tuple(a.shape), np.dtype(a.dtype.numpy_dtype)

    def read(self, path, index=None, transpose: bool = False) -> np.ndarray:
        """The leaf (or its layer `index`), transposed to torch's layout if asked."""
        a = self.array(path)
        if index is not None:
            a = a[index]
        try:
            return np.asarray((a.T if transpose else a).read().result())
        except ValueError as e:
            raise ConversionError(f"{self.dir / leaf_name(path)}: cannot read ({e})") from None

