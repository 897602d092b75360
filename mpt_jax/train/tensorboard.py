"""TensorBoard scalars with no TensorFlow, PyTorch or tensorboardX: an event file written here.

TensorBoard reads `events.out.tfevents.*` files: TFRecord framing (uint64 length, its masked
CRC-32C, the data, the data's masked CRC-32C; little-endian) around `Event` protocol buffers
(tensorflow/core/util/event.proto: wall_time = 1 double, step = 2 int64, file_version = 3
string, summary = 5; summary.proto: Summary.value = 1, Value.tag = 1, Value.simple_value = 2
float). The first event carries file_version "brain.Event:2". Scalars are all the trainer
writes, so that is all this encodes. (tensorboardX would do the same and pull PyTorch in at
import: seconds of every train.py start.)

    writer = EventWriter("runs/x/tb")
    writer.add_scalars(step, {"loss": 2.5, "lr": 1e-4})
    writer.close()

On gs:// / s3:// (no appends) the file is uploaded whole (storage.AppendLog) at most every
`remote_flush_s` seconds and at close.
"""
from __future__ import annotations

import os
import socket
import struct
import time

from mpt_jax import storage


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord frames use it."""
    c = 0xFFFFFFFF
    for byte in data:
        c = _TABLE[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    c = crc32c(data)
    return struct.pack("<I", (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def tfrecord(data: bytes) -> bytes:
    """One TFRecord frame around `data`."""
    length = struct.pack("<Q", len(data))
    return length + _masked_crc(length) + data + _masked_crc(data)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:  # wire: 0 varint, 1 fixed64, 2 bytes, 5 fixed32
    return _varint(field << 3 | wire)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int, *, file_version: str | None = None,
          scalars: dict[str, float] | None = None) -> bytes:
    """A serialized `Event`: the file's version record, or one step's scalars."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _bytes_field(3, file_version.encode("utf-8"))
    if scalars:
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode("utf-8"))
                         + _key(2, 5) + struct.pack("<f", float(value)))
            for tag, value in scalars.items())
        out += _bytes_field(5, summary)
    return out


class EventWriter:
    """Appends scalar events to a new event file in `logdir` (made if missing)."""

    def __init__(self, logdir: str, *, remote_flush_s: float = 60.0):
        storage.makedirs(logdir)
        name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
                f"{os.getpid()}")
        self.path = storage.join(logdir, name)
        self._log = storage.AppendLog(self.path, binary=True)
        self._remote = storage.is_remote(self.path)
        self._remote_flush_s = remote_flush_s
        self._flushed_at = time.monotonic()
        self._log.write(tfrecord(event(time.time(), 0, file_version="brain.Event:2")))
        self.flush()

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if not scalars:
            return
        self._log.write(tfrecord(event(time.time(), step, scalars=scalars)))
        if not self._remote or time.monotonic() - self._flushed_at >= self._remote_flush_s:
            self.flush()

    def flush(self) -> None:
        self._log.flush()
        self._flushed_at = time.monotonic()

    def close(self) -> None:
        self._log.close()
