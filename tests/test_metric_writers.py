"""MetricWriter: JSON lines always (appending across restarts), TensorBoard event files that TensorBoard can read."""

import glob
import struct

import numpy as np
import pytest
import jax.numpy as jnp

from jaxgen.training import MetricWriter, read_jsonl


def _tfrecord_events(path):
    """Parse a TensorBoard event file (TFRecord framing: u64 length, u32 crc, data, u32 crc)."""
    from tensorboardX.proto import event_pb2

    data, events, i = open(path, "rb").read(), [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[i + 12:i + 12 + n])
        events.append(event)
        i += 12 + n + 4
    return events


def test_jsonl_appends_and_tensorboard_scalars_round_trip(tmp_path):
    with MetricWriter(str(tmp_path), tensorboard=True) as w:
        assert w.tensorboard
        w.write(10, loss=jnp.float32(0.5), seconds=1)
        w.write(20, loss=np.float64(0.25))
    with MetricWriter(str(tmp_path), tensorboard=False) as w:  # a resumed run appends
        w.write(30, loss=float("nan"))
    assert read_jsonl(str(tmp_path / "metrics.jsonl")) == [
        {"step": 10, "loss": 0.5, "seconds": 1.0}, {"step": 20, "loss": 0.25}, {"step": 30, "loss": "nan"}]
    (events_file,) = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    scalars = [(e.step, v.tag, v.simple_value) for e in _tfrecord_events(events_file) for v in e.summary.value]
    assert scalars == [(10, "loss", 0.5), (10, "seconds", 1.0), (20, "loss", 0.25)]


def test_bad_metric_values_and_options(tmp_path):
    w = MetricWriter(str(tmp_path), tensorboard=False)
    with pytest.raises(TypeError, match="metric 'loss' must be a real number"):
        w.write(1, loss="low")
    with pytest.raises(ValueError, match="tensorboard must be"):
        MetricWriter(str(tmp_path), tensorboard="yes")
