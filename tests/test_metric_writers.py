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


def test_a_torn_last_line_is_ignored_and_cut_off_on_reopening(tmp_path):
    log = tmp_path / "metrics.jsonl"
    with MetricWriter(str(tmp_path), tensorboard=False) as w:
        w.write(10, loss=0.5)
        w.write(20, loss=0.25)
    with open(log, "a") as fh:
        fh.write('{"step": 30, "lo')  # killed in the middle of an append
    assert read_jsonl(str(log)) == [{"step": 10, "loss": 0.5}, {"step": 20, "loss": 0.25}]
    with MetricWriter(str(tmp_path), tensorboard=False) as w:
        w.write(30, loss=0.125)
    assert read_jsonl(str(log)) == [{"step": 10, "loss": 0.5}, {"step": 20, "loss": 0.25}, {"step": 30, "loss": 0.125}]
    assert log.read_text().count("\n") == 3
    with open(log, "a") as fh:
        fh.write("garbage\n{\"step\": 40}\n")  # damage in the middle is reported, with the line
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 4: not a JSON record"):
        read_jsonl(str(log))


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """Killed after logging step 30 but before its checkpoint: resuming from step 20 re-runs 20-30 and the log keeps
    one record per step; records of one step from several writes are merged."""
    import jax
    import optax
    from flax import nnx

    from jaxgen.losses import flow_matching_loss
    from jaxgen.models import MLPField
    from jaxgen.training import MetricLogger, Trainer

    with MetricWriter(str(tmp_path), tensorboard=False) as w:
        for step in (10, 20, 30):
            w.write(step, loss=1.0)
    tr = Trainer(MLPField(2, width=8, hidden_layers=1, rngs=nnx.Rngs(0)), flow_matching_loss("linear"),
                 optax.sgd(0.01), data=lambda key: {"x": jax.random.normal(key, (16, 2))})
    state = tr.init(0)._replace(step=jax.numpy.asarray(20, jax.numpy.int32))
    with MetricWriter(str(tmp_path), tensorboard=False) as w:
        tr.fit(state, until_step=40, chunk=10, callbacks=[MetricLogger(w)], progress=False)
        w.write(40, accuracy=0.9)
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    assert records[2]["loss"] != 1.0 and records[3]["accuracy"] == 0.9 and "loss" in records[3]
    assert (tmp_path / "metrics.jsonl").read_text().count('"step": 30') == 1
