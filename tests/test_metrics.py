"""Tests for opdplus_jax.metrics: JSONL log, non-finite values, resume, timers, TensorBoard."""

import glob
import importlib.util
import json
import logging
import math
import os
import struct
import time

import jax.numpy as jnp
import numpy as np
import pytest

from opdplus_jax import metrics

HAS_TB = any(importlib.util.find_spec(m) for m in ("tensorboardX", "tensorboard"))


def test_jsonl_round_trip(tmp_path):
    with metrics.MetricWriter(tmp_path, tensorboard=False) as w:
        w.write(1, {"loss": jnp.float32(0.5), "n": np.int64(3), "ok": np.bool_(True), "lr": 1e-3})
        w.write(1, {"reward": jnp.asarray([0.25])}, split="eval")
        w.write(2, {"loss": 0.25, "name": "x"})
    records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    assert records == [
        {"step": 1, "split": "train", "loss": 0.5, "n": 3, "ok": True, "lr": 1e-3},
        {"step": 1, "split": "eval", "reward": 0.25},
        {"step": 2, "split": "train", "loss": 0.25, "name": "x"},
    ]
    assert metrics.read_jsonl(tmp_path, split="eval") == [records[1]]
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # every line is standalone JSON


def test_nonfinite_and_bad_values_never_crash(tmp_path, caplog):
    with (
        caplog.at_level(logging.WARNING, logger="opdplus_jax.metrics"),
        metrics.MetricWriter(tmp_path, tensorboard=False) as w,
    ):
        w.write(1, {"a": float("nan"), "b": jnp.inf, "c": np.float32(-np.inf), "d": 1.0})
        w.write(2, {"a": jnp.nan, "vec": jnp.ones(3), "obj": object(), "step": 7})
        assert w.nonfinite == {"a": 2, "b": 1, "c": 1}
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    records = metrics.read_jsonl(tmp_path)
    assert records == [
        {"step": 1, "split": "train", "a": None, "b": None, "c": None, "d": 1.0},
        {"step": 2, "split": "train", "a": None},
    ]
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "vec" in messages and "obj" in messages and "reserved" in messages


def test_append_and_truncate_after_resume(tmp_path):
    with metrics.MetricWriter(tmp_path, tensorboard=False) as w:
        for step in range(1, 7):
            w.write(step, {"loss": 1.0 / step})
            if step % 3 == 0:
                w.write(step, {"acc": 0.1 * step}, split="eval")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "split": "tr')  # the crashed run's last line, cut off
    # Resume from the checkpoint at step 4: steps 5, 6 and the broken line disappear.
    with metrics.MetricWriter(tmp_path, tensorboard=False) as w:
        assert w.truncate_after(4) == 3
        for step in range(5, 8):
            w.write(step, {"loss": 2.0})
    records = metrics.read_jsonl(tmp_path)
    steps = [(r["step"], r["split"]) for r in records]
    kept = [(1, "train"), (2, "train"), (3, "train"), (3, "eval"), (4, "train")]
    assert steps == [*kept, (5, "train"), (6, "train"), (7, "train")]
    assert [r["loss"] for r in records if r["step"] >= 5] == [2.0, 2.0, 2.0]


def test_disabled_writer_writes_nothing(tmp_path):
    w = metrics.MetricWriter(tmp_path / "run", enabled=False)
    w.write(1, {"loss": 1.0})
    assert w.truncate_after(0) == 0
    w.close()
    assert not os.path.exists(tmp_path / "run")


def test_timer_sums_and_resets():
    timer = metrics.Timer()
    for _ in range(3):
        with timer("a"):
            time.sleep(0.01)
    with timer("b"):
        pass
    with pytest.raises(RuntimeError), timer("b"):
        raise RuntimeError
    summary = timer.summary()
    assert set(summary) == {"time/a", "time/b"}
    assert 0.03 <= summary["time/a"] < 1.0
    assert 0.0 <= summary["time/b"] < summary["time/a"]
    assert timer.counts() == {"a": 3, "b": 2}
    assert timer.total() == pytest.approx(summary["time/a"] + summary["time/b"])
    timer.reset()
    assert timer.summary() == {} and timer.total() == 0.0


def test_progress_and_format_line(monkeypatch):
    monkeypatch.setenv("CI", "true")
    bar = metrics.progress(10, "train")
    assert bar.disable
    bar.update(3)
    bar.close()
    monkeypatch.delenv("CI")
    bar = metrics.progress(10, "train", disable=False, initial=4)
    assert not bar.disable and bar.n == 4
    bar.close()
    line = metrics.format_line(
        12, {"loss": 0.123456, "time/rollout": jnp.float32(1.25), "tiny": 1e-6, "x": math.nan}
    )
    assert line == "step 12 | loss 0.1235 | time/rollout 1.25 | tiny 1.000e-06 | x nan"
    assert metrics.format_line(3, {"a": 1, "b": 2.0}, keys=("b", "missing")) == "step 3 | b 2"


def _read_events(path):
    """Scalars (tag, step, value) and purge markers (step) from a TFRecord event file."""
    try:
        from tensorboard.compat.proto import event_pb2
    except ImportError:
        from tensorboardX.proto import event_pb2
    scalars, starts = [], []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
        if event.HasField("summary"):
            scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
        if event.HasField("session_log") and event.session_log.status == 1:
            starts.append(event.step)
    return scalars, starts


@pytest.mark.skipif(not HAS_TB, reason="neither tensorboardX nor tensorboard is installed")
def test_tensorboard_event_files(tmp_path):
    with metrics.MetricWriter(tmp_path) as w:
        assert w.tensorboard_active
        w.write(1, {"loss": 0.5, "name": "x"})
        w.write(2, {"loss": 0.25}, split="train")
        w.write(2, {"acc": 0.75}, split="eval")
        w.flush()
    train = glob.glob(str(tmp_path / "tensorboard" / "train" / "events.out.tfevents.*"))
    evals = glob.glob(str(tmp_path / "tensorboard" / "eval" / "events.out.tfevents.*"))
    assert len(train) == 1 and len(evals) == 1
    assert _read_events(train[0])[0] == [("loss", 1, 0.5), ("loss", 2, 0.25)]
    assert _read_events(evals[0])[0] == [("acc", 2, 0.75)]
    # On resume TensorBoard is told to hide the crashed run's events after the checkpoint.
    time.sleep(1.1)  # event file names carry a timestamp in seconds
    with metrics.MetricWriter(tmp_path) as w:
        w.truncate_after(1)
        w.write(2, {"loss": 0.125})
    newest = max(glob.glob(str(tmp_path / "tensorboard" / "train" / "*")), key=os.path.getmtime)
    scalars, starts = _read_events(newest)
    assert starts == [2] and scalars == [("loss", 2, 0.125)]


def test_write_config_records_and_keeps_a_changed_one(tmp_path, caplog):
    from ml_collections import config_dict

    c = config_dict.ConfigDict({"train": {"num_steps": 2}, "name": "a"})
    path = metrics.write_config(c, tmp_path)
    with open(path) as f:
        assert json.load(f) == {"name": "a", "train": {"num_steps": 2}}
    metrics.write_config(c, tmp_path)  # same config: nothing kept aside
    assert sorted(os.listdir(tmp_path)) == ["config.json"]
    c.train.num_steps = 4
    with caplog.at_level(logging.WARNING, logger="opdplus_jax.metrics"):
        metrics.write_config(c, tmp_path)
    assert "config.1.json" in caplog.text
    with open(tmp_path / "config.1.json") as f:
        assert json.load(f)["train"]["num_steps"] == 2
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["train"]["num_steps"] == 4
