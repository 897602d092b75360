"""The TensorBoard event writer (mpt_jax/train/tensorboard.py): its files parse with
tensorboardX's own protocol buffers and CRC-32C (google-crc32c) checks out on every frame."""
import glob
import os
import struct

import pytest

from mpt_jax.train import tensorboard


def _frames(path):
    import google_crc32c

    def masked(data):
        c = google_crc32c.value(data)
        return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    with open(path, "rb") as fh:
        raw = fh.read()
    out, i = [], 0
    while i < len(raw):
        head = raw[i:i + 8]
        (n,) = struct.unpack("<Q", head)
        (head_crc,) = struct.unpack("<I", raw[i + 8:i + 12])
        data = raw[i + 12:i + 12 + n]
        (data_crc,) = struct.unpack("<I", raw[i + 12 + n:i + 16 + n])
        assert head_crc == masked(head) and data_crc == masked(data)
        out.append(data)
        i += 16 + n
    return out


def test_crc32c_check_value():
    assert tensorboard.crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value
    assert tensorboard.crc32c(b"") == 0


def test_event_file_parses_as_tensorboard_events(tmp_path):
    from tensorboardX.proto import event_pb2

    logdir = str(tmp_path / "tb")
    writer = tensorboard.EventWriter(logdir)
    writer.add_scalars(1, {"loss": 2.5, "lr": 1e-4})
    writer.add_scalars(300, {"data_epochs/a": 0.125})
    writer.add_scalars(301, {})
    writer.close()
    (path,) = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    events = [event_pb2.Event.FromString(f) for f in _frames(path)]
    assert events[0].file_version == "brain.Event:2"
    got = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]
    assert got == [(1, "loss", 2.5), (1, "lr", pytest.approx(1e-4)),
                   (300, "data_epochs/a", 0.125)]
    assert all(e.wall_time > 1e9 for e in events)


def test_negative_step_is_refused():
    with pytest.raises(ValueError, match="step must be >= 0"):
        tensorboard.event(0.0, -1, scalars={"x": 1.0})
