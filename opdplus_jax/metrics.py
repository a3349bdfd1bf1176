"""Training metrics: a JSONL log (always), TensorBoard events (optional), timers, progress bars.

Files under `workdir`:

    metrics.jsonl             one JSON object per line: {"step": s, "split": "train", "loss": ...}
                              non-finite values are written as null (and counted on the writer)
    tensorboard/<split>/      event files, when tensorboardX or tensorboard is installed

Resuming: a writer opened on an existing workdir appends; call `truncate_after(step)` with the
restored checkpoint step so that lines logged after that checkpoint (by the run that crashed)
are dropped and TensorBoard hides its events from later steps (`purge_step`). Only process 0
writes on a multi-host run.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("step", "split")


# --------------------------------------------------------------------------------------------
# Value conversion.
# --------------------------------------------------------------------------------------------


def _to_scalar(value: Any) -> bool | int | float | str | None:
    """Python/numpy/jax scalar (or size-1 array) -> bool, int, float or str.

    Raises TypeError for anything else (e.g. a vector)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value
    if hasattr(value, "__array__") or isinstance(value, np.generic):
        arr = np.asarray(value)
        if arr.size != 1:
            raise TypeError(f"expected a scalar, got an array of shape {arr.shape}")
        item = arr.reshape(()).item()
        if isinstance(item, bool):
            return item
        if isinstance(item, int):
            return item
        if isinstance(item, float):
            return item
        raise TypeError(f"unsupported scalar dtype {arr.dtype}")
    raise TypeError(f"unsupported metric value type {type(value).__name__}")


# --------------------------------------------------------------------------------------------
# TensorBoard backends.
# --------------------------------------------------------------------------------------------


class _TensorBoardX:
    name = "tensorboardX"

    def __init__(self, logdir: str, purge_step: int | None):
        import tensorboardX

        self._w = tensorboardX.SummaryWriter(logdir=logdir, purge_step=purge_step)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, v in values.items():
            self._w.add_scalar(tag, v, global_step=step)

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class _TensorBoard:
    """The `tensorboard` package's own event-file writer (no TensorFlow needed)."""

    name = "tensorboard"

    def __init__(self, logdir: str, purge_step: int | None):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._pb = event_pb2
        self._w = EventFileWriter(logdir)
        if purge_step is not None:  # TensorBoard hides earlier-written events with step >= this
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._w.add_event(
                event_pb2.Event(wall_time=time.time(), step=purge_step, session_log=start)
            )

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        from tensorboard.compat.proto import summary_pb2

        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in values.items()]
        )
        self._w.add_event(self._pb.Event(wall_time=time.time(), step=step, summary=summary))

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def _tensorboard_backend() -> type | None:
    for backend, module in ((_TensorBoardX, "tensorboardX"), (_TensorBoard, "tensorboard")):
        try:
            __import__(module)
        except Exception:
            continue
        return backend
    return None


# --------------------------------------------------------------------------------------------
# Writer.
# --------------------------------------------------------------------------------------------


class MetricWriter:
    """Writes scalar metrics to `workdir/metrics.jsonl` and, if available, TensorBoard.

    Args:
      workdir: run directory (created if missing); an existing metrics.jsonl is appended to.
      tensorboard: also write TensorBoard event files when tensorboardX/tensorboard is importable.
      enabled: write anything at all; default: only on process 0 of a multi-host run.
    """

    def __init__(
        self, workdir: str | os.PathLike, *, tensorboard: bool = True, enabled: bool | None = None
    ):
        if enabled is None:
            import jax

            enabled = jax.process_index() == 0
        self.enabled = enabled
        self.workdir = os.fspath(workdir)
        self.path = os.path.join(self.workdir, JSONL_NAME)
        self.nonfinite: collections.Counter[str] = collections.Counter()
        self._warned: set[str] = set()
        self._tb_backend = _tensorboard_backend() if tensorboard else None
        self._tb: dict[str, Any] = {}
        self._purge_step: int | None = None
        self._file = None
        if not enabled:
            return
        os.makedirs(self.workdir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        if self._tb_backend is not None:
            tb = f"TensorBoard ({self._tb_backend.name}) in {self.tensorboard_dir}"
        elif tensorboard:
            tb = "TensorBoard off (install tensorboardX or tensorboard)"
        else:
            tb = "TensorBoard off"
        logger.info("metrics: JSONL %s; %s", self.path, tb)

    @property
    def tensorboard_dir(self) -> str:
        return os.path.join(self.workdir, TENSORBOARD_DIR)

    @property
    def tensorboard_active(self) -> bool:
        return self.enabled and self._tb_backend is not None

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)

    def write(self, step: int, scalars: Mapping[str, Any], split: str = "train") -> None:
        """Logs `scalars` at `step`. Values: python/numpy/jax scalars (converted to float/int);
        non-finite floats are written as null in JSON (and counted in `self.nonfinite`);
        non-scalar values are dropped with a warning. Never raises for a bad value."""
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricWriter is closed")
        step = int(step)
        record: dict[str, Any] = {"step": step, "split": split}
        numeric: dict[str, float] = {}
        for key, value in scalars.items():
            key = str(key)
            if key in _RESERVED:
                self._warn_once(f"reserved:{key}", "metric name '%s' is reserved; dropped", key)
                continue
            try:
                v = _to_scalar(value)
            except TypeError as e:
                self._warn_once(f"type:{key}", "metric '%s' dropped: %s", key, e)
                continue
            if isinstance(v, float) and not math.isfinite(v):
                self.nonfinite[key] += 1
                self._warn_once(f"nonfinite:{key}", "metric '%s' is %s at step %d", key, v, step)
                record[key] = None
                numeric[key] = v
                continue
            record[key] = v
            if isinstance(v, (bool, int, float)):
                numeric[key] = float(v)
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tb_backend is not None and numeric:
            self._tensorboard(split).scalars(step, numeric)

    def _tensorboard(self, split: str) -> Any:
        if split not in self._tb:
            logdir = os.path.join(self.tensorboard_dir, split)
            os.makedirs(logdir, exist_ok=True)
            self._tb[split] = self._tb_backend(logdir, self._purge_step)
        return self._tb[split]

    def truncate_after(self, step: int) -> int:
        """Drops JSONL records with step > `step` (call on resume from checkpoint `step`) and
        makes TensorBoard hide events after it. Returns the number of records dropped."""
        if not self.enabled:
            return 0
        step = int(step)
        self._file.close()
        kept, dropped, bad = [], 0, 0
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec_step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):
                    bad += 1  # e.g. a line cut off by a crash
                    continue
                if rec_step > step:
                    dropped += 1
                else:
                    kept.append(line if line.endswith("\n") else line + "\n")
        if dropped or bad:
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
            logger.info(
                "metrics: resumed at step %d, dropped %d later and %d unreadable lines from %s",
                step,
                dropped,
                bad,
                self.path,
            )
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        self._purge_step = step + 1
        for tb in self._tb.values():  # reopen so that the purge marker is written
            tb.close()
        self._tb.clear()
        return dropped

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        for tb in self._tb.values():
            tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for tb in self._tb.values():
            tb.close()
        self._tb.clear()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike, *, split: str | None = None) -> list[dict]:
    """Records of a metrics.jsonl file (or of `path/metrics.jsonl` for a run directory), in file
    order; null values read back as None. Unreadable lines (a crash mid-write) are skipped with
    a warning. `split` keeps only records of that split."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, JSONL_NAME)
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                logger.warning("%s:%d: unreadable line skipped", path, lineno)
                continue
            if split is None or record.get("split") == split:
                out.append(record)
    return out


# --------------------------------------------------------------------------------------------
# Timer, progress bar, one-line summaries.
# --------------------------------------------------------------------------------------------


def write_config(config: Any, workdir: str | os.PathLike) -> str:
    """Writes `workdir/config.json`, the run's full `ConfigDict`. A resumed run with a different
    config keeps the previous file as `config.<n>.json` and warns. Only process 0 of a multi-host
    run writes (the others return the path)."""
    import jax

    workdir = os.fspath(workdir)
    path = os.path.join(workdir, "config.json")
    if jax.process_index() != 0:
        return path
    text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
        if old == text:
            return path
        n = 1
        while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
            n += 1
        os.replace(path, os.path.join(workdir, f"config.{n}.json"))
        logger.warning("%s: the config differs from the previous run's (kept as config.%d.json)",
                       workdir, n)  # fmt: skip
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


class Timer:
    """Accumulates wall-clock seconds per name: `with timer("rollout"): ...`.

    JAX dispatches asynchronously: block on the results inside the block
    (`jax.block_until_ready`) for the time to mean anything.
    """

    def __init__(self) -> None:
        self._totals: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self._totals[name] = self._totals.get(name, 0.0) + elapsed
            self._counts[name] = self._counts.get(name, 0) + 1

    def summary(self) -> dict[str, float]:
        """{"time/<name>": total seconds since the last reset}."""
        return {f"time/{k}": v for k, v in self._totals.items()}

    def total(self) -> float:
        """Sum of all names' seconds since the last reset (nested timers count twice)."""
        return sum(self._totals.values())

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def reset(self) -> None:
        self._totals.clear()
        self._counts.clear()


def _is_interactive() -> bool:
    if os.environ.get("CI"):
        return False
    try:
        return sys.stdout.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress(total: int | None, desc: str = "", *, disable: bool | None = None, **kwargs: Any):
    """A tqdm bar. `disable=None`: off when stdout/stderr is not a terminal or CI is set;
    `disable=False` forces it on. Extra keyword arguments go to tqdm (e.g. `initial=step`)."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = not _is_interactive()
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(total=total, desc=desc, disable=disable, **kwargs)


def _fmt(value: Any) -> str:
    try:
        v = _to_scalar(value)
    except TypeError:
        return "?"
    if isinstance(v, bool) or not isinstance(v, float):
        return str(v)
    if v != 0 and math.isfinite(v) and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4g}"


def format_line(step: int, scalars: Mapping[str, Any], keys: Sequence[str] | None = None) -> str:
    """'step 12 | loss 0.1234 | reward 0.5 | time/rollout 1.25'. `keys` selects and orders the
    entries (missing ones are left out); None shows all in the mapping's order."""
    names = list(scalars) if keys is None else [k for k in keys if k in scalars]
    parts = [f"step {int(step)}"] + [f"{k} {_fmt(scalars[k])}" for k in names]
    return " | ".join(parts)
