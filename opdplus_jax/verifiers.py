"""Answer verifiers for rewards and eval: math (math_verify), synthetic tasks, tool calls.

`verify(response, example_or_answer, task=None)` picks a verifier, in this order:

1. a verifier registered with `register(name, fn)` (in `VERIFIERS`) under the task name;
2. the synthetic task's exact verifier (`opdplus_jax.tasks`) if the task name is registered
   there (``tool_use`` executes the JSON call);
3. a verifier registered under the example's domain; domain ``tool_use``: tool-call execution;
4. a task name that is set but matches none of these (a misspelt ``task``) is an error, unless
   the domain is ``math`` (e.g. ``{"task": "gsm8k", "domain": "math"}``): `resolve` raises a
   ValueError that names the valid tasks, and `verify` scores 0 and counts it as a failure;
5. otherwise math: `math_verify.parse` + `math_verify.verify` on the last ``\\boxed{...}`` or the
   ``#### <answer>`` line (the gold answer is parsed as ``\\boxed{<answer>}``), falling back to
   an exact comparison of the extracted answer when math_verify cannot parse either side.

Scores are 1.0 / 0.0. A verifier that raises (or returns a non-finite score) never stops
training: the exception is caught, counted in a `VerifierStats`, logged (first few at WARNING)
and the response scores 0.

Time limits: math verification (the expensive step, on untrusted model output: sympy can spend
minutes on a 17-character ``\\boxed{9^{9^{9}}}`` while holding the GIL) runs in worker processes
(`MATH_WORKERS`, a `MathWorkerPool`: fresh interpreters, never forks of the caller, started on
first use, never at import). Each math answer gets a hard wall-clock limit, `timeout_seconds`
(default `MATH_TIMEOUT_SECONDS`), in any thread: a worker that runs over is killed (and
replaced), the answer scores 0 and is counted as a timeout. `batch_verify(...,
time_budget_seconds=...)` also bounds a whole batch: answers not verified within the budget score
0 and are counted as skipped. Registered verifiers and the synthetic tasks' exact verifiers are
cheap and trusted; they run in the calling thread (no per-call limit, but the batch budget is
checked before each). Inputs are capped at `MAX_RESPONSE_CHARS` (the tail is kept).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from opdplus_jax import tasks
from opdplus_jax.registry import Registry
from opdplus_jax.tasks.base import Example, Task, answer_of, final_answer

logger = logging.getLogger(__name__)

MATH_TIMEOUT_SECONDS = 5
MATH_WORKER_STARTUP_SECONDS = 120
MAX_RESPONSE_CHARS = 10_000
BUILTIN_DOMAINS = ("math", "tool_use")
VerifierFn = Callable[[str, Any], float]
VERIFIERS: Registry[VerifierFn] = Registry("verifier")


# ---------------------------------------------------------------------------------------- stats

COUNTERS = ("calls", "failures", "timeouts", "skipped", "score_sum")


@dataclasses.dataclass
class VerifierStats:
    """Counts of verifier calls, failures, timeouts, skips and scores, overall and per verifier key.

    A call is an answer a verifier ran on: it scored, raised (a failure) or ran over its time limit
    (a timeout); failures and timeouts score 0. Answers left unverified when `batch_verify`'s time
    budget ran out score 0 and are counted as `skipped`, not as calls.

    Thread-safe. `metrics()` gives flat floats for a metrics logger; `messages` keeps the first
    `max_messages` failure / timeout messages (verifier key, exception type and text).
    """

    max_messages: int = 5
    log_limit: int = 10
    calls: int = 0
    failures: int = 0
    timeouts: int = 0
    skipped: int = 0
    score_sum: float = 0.0
    by_key: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    messages: list[str] = dataclasses.field(default_factory=list)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def _entry(self, key: str) -> dict[str, float]:
        entry = self.by_key.setdefault(key, {})
        for name in COUNTERS:
            entry.setdefault(name, 0.0 if name == "score_sum" else 0)
        return entry

    def record(self, key: str, score: float) -> None:
        with self._lock:
            e = self._entry(key)
            self.calls += 1
            self.score_sum += score
            e["calls"] += 1
            e["score_sum"] += score

    def record_failure(self, key: str, exc: BaseException) -> None:
        """An answer whose verifier raised `exc` (scored 0)."""
        self._record_problem(key, "failures", f"{key}: {type(exc).__name__}: {exc}"[:500])

    def record_timeout(self, key: str, exc: BaseException) -> None:
        """An answer whose verifier ran over its time limit (scored 0)."""
        self._record_problem(
            key, "timeouts", f"{key}: timed out: {type(exc).__name__}: {exc}"[:500]
        )

    def record_skipped(self, key: str, n: int = 1) -> None:
        """`n` answers not verified because a batch's time budget ran out (scored 0; not calls)."""
        with self._lock:
            self.skipped += n
            self._entry(key)["skipped"] += n

    def _record_problem(self, key: str, counter: str, msg: str) -> None:
        with self._lock:
            e = self._entry(key)
            self.calls += 1
            setattr(self, counter, getattr(self, counter) + 1)
            e["calls"] += 1
            e[counter] += 1
            if len(self.messages) < self.max_messages:
                self.messages.append(msg)
            n = self.failures + self.timeouts
        what = "failed" if counter == "failures" else "timed out"
        level = logging.WARNING if n <= self.log_limit else logging.DEBUG
        logger.log(level, "verifier %s (scored 0; problem %d): %s", what, n, msg)

    @property
    def failure_rate(self) -> float:
        return self.failures / self.calls if self.calls else 0.0

    @property
    def mean_score(self) -> float:
        return self.score_sum / self.calls if self.calls else 0.0

    def merge(self, other: VerifierStats) -> VerifierStats:
        """Add `other`'s counts into this object (returns self)."""
        with self._lock:
            self.calls += other.calls
            self.failures += other.failures
            self.timeouts += other.timeouts
            self.skipped += other.skipped
            self.score_sum += other.score_sum
            for key, o in other.by_key.items():
                e = self._entry(key)
                for name in COUNTERS:
                    e[name] += o.get(name, 0)
            room = self.max_messages - len(self.messages)
            self.messages.extend(other.messages[: max(room, 0)])
        return self

    def metrics(self, prefix: str = "verifier/") -> dict[str, float]:
        """Flat floats: calls, failures, failure_rate, timeouts, skipped, mean_score, and per key
        ``<key>/mean_score``, ``<key>/failures``, ``<key>/timeouts``, ``<key>/skipped``."""
        out = {
            f"{prefix}calls": float(self.calls),
            f"{prefix}failures": float(self.failures),
            f"{prefix}failure_rate": self.failure_rate,
            f"{prefix}timeouts": float(self.timeouts),
            f"{prefix}skipped": float(self.skipped),
            f"{prefix}mean_score": self.mean_score,
        }
        for key, e in sorted(self.by_key.items()):
            out[f"{prefix}{key}/mean_score"] = e["score_sum"] / e["calls"] if e["calls"] else 0.0
            for name in ("failures", "timeouts", "skipped"):
                out[f"{prefix}{key}/{name}"] = float(e.get(name, 0))
        return out


# ------------------------------------------------------------------------------------ registry


def register(name: str, fn: VerifierFn, *, overwrite: bool = False) -> None:
    """Register `fn(response_text, example) -> float` for a task name or a domain."""
    VERIFIERS.register(name, fn, overwrite=overwrite)


def unregister(name: str) -> None:
    """Remove the verifier registered under `name`, if any."""
    if name in VERIFIERS:
        VERIFIERS.unregister(name)


@functools.cache
def _task_verifier(task_cls: type[Task]) -> VerifierFn:
    return task_cls().verify


def _field(example: Any, name: str) -> Any:
    if isinstance(example, Mapping):
        return example.get(name)
    return getattr(example, name, None)


def _unknown_task(task: Any, domain: Any) -> ValueError:
    """The registry's error for an unknown task name, over tasks and verifiers together."""
    names: Registry[str] = Registry("task")
    for name in (*tasks.TASKS.names(), *VERIFIERS.names()):
        names.register(name, name, overwrite=True)
    try:
        names.get(task)
    except ValueError as e:
        message = str(e)
    else:  # not reached: resolve only calls this for a task it did not find
        message = f"unknown task {task!r}"
    where = f"the domain {domain!r} is not a verifier either" if domain else "no domain is set"
    return ValueError(
        f"{message} ({where}); fix the row's 'task', or set its domain to 'math' (or leave "
        f"'task' empty) to score it with the math verifier"
    )


def resolve(example: Any = None, *, task: str | None = None) -> tuple[str, VerifierFn]:
    """The (key, verifier) that `verify` would use for this example / task name.

    Raises:
      ValueError: a task name is set but is neither a registered verifier nor a registered task,
        and the domain is neither a registered verifier nor a built-in one (`BUILTIN_DOMAINS`);
        the message names the valid task names.
    """
    task = task or _field(example, "task")
    domain = _field(example, "domain")
    if task and task in VERIFIERS:
        return task, VERIFIERS.get(task)
    if task and task in tasks.TASKS:
        return task, _task_verifier(tasks.TASKS.get(task))
    if domain and domain in VERIFIERS:
        return domain, VERIFIERS.get(domain)
    if domain == "tool_use":
        return "tool_use", _task_verifier(tasks.TASKS.get("tool_use"))
    if task and domain != "math":
        raise _unknown_task(task, domain)
    return "math", math_verifier


# ------------------------------------------------------------------------------- math answers


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, else None."""
    starts = [text.rfind(tag) for tag in ("\\boxed{", "\\fbox{")]
    start = max(starts)
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
        j += 1
    return None


def extract_answer(text: str) -> str:
    """The final answer of a response: last boxed content, else the ``####`` line, else all."""
    for found in (last_boxed(text), final_answer(text)):
        if found is not None:
            return found.strip()
    return text.strip()


def _normalize(text: str) -> str:
    return " ".join(text.strip().strip("$").strip().rstrip(".").split())


def _math_score_here(response_text: str, answer: str) -> float:
    """math_verify in this process, without a time limit (run it in a `MathWorkerPool` worker)."""
    from math_verify import parse
    from math_verify import verify as mv_verify

    text = response_text[-MAX_RESPONSE_CHARS:]
    gold_text = answer if ("\\boxed" in answer or "$" in answer) else f"\\boxed{{{answer}}}"
    if last_boxed(text) is not None:
        pred_text = text
    else:
        tail = final_answer(text)
        pred_text = text if tail is None else f"\\boxed{{{tail}}}"
    gold = parse(gold_text, parsing_timeout=None)
    pred = parse(pred_text, parsing_timeout=None)
    if gold and pred:
        return 1.0 if mv_verify(gold, pred, timeout_seconds=None) else 0.0
    return 1.0 if _normalize(extract_answer(text)) == _normalize(answer) else 0.0


# -------------------------------------------------------------------------- math worker processes


class MathTimeoutError(TimeoutError):
    """A math answer ran over its time limit; the worker process verifying it was killed."""


class MathWorkerError(RuntimeError):
    """A math worker process could not be started, did not start in time, or died."""


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling (to cross the process boundary), else a RuntimeError copy."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def math_worker_main(channel: Any) -> None:
    """Entry point of a math worker process (started by `MathWorkerPool`): answers
    ``(response_text, answer)`` requests with ``("ok", score)`` or ``("error", exception)`` until
    the parent closes the channel. `channel` is a multiprocessing Connection, or the file
    descriptor of a connected socket."""
    is_fd = isinstance(channel, int)
    conn = multiprocessing.connection.Connection(channel) if is_fd else channel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which stops us
    # Pay the import here, not inside the first answer's time limit; if it fails, every request
    # raises (and so reports) the import error.
    with contextlib.suppress(Exception):
        import math_verify  # noqa: F401
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": we have one
    conn.send(("ready", None))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the parent closed the channel or exited
            return
        if request is None:
            return
        try:
            reply: tuple[str, Any] = ("ok", _math_score_here(*request))
        except Exception as exc:
            reply = ("error", _portable(exc))
        conn.send(reply)


# A fresh interpreter that imports only this module (not the parent's __main__, as
# multiprocessing's "spawn" would: for `opdplus-train` that is JAX and the trainer).
_WORKER_CODE = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[2]); "
    f"from {__name__} import math_worker_main; math_worker_main(int(sys.argv[1]))"
)


class _MathWorker:
    """One worker process and the parent's end of its channel."""

    def __init__(self, start_method: str) -> None:
        self.started = time.monotonic()
        self.ready = False
        self.in_flight = False
        if start_method == "subprocess":
            if not sys.executable:
                raise MathWorkerError("sys.executable is unknown: cannot start a math worker")
            parent, child = socket.socketpair()
            try:
                with child:
                    self.process: Any = subprocess.Popen(
                        [
                            sys.executable,
                            "-c",
                            _WORKER_CODE,
                            str(child.fileno()),
                            json.dumps(sys.path),
                        ],
                        pass_fds=(child.fileno(),),
                        stdin=subprocess.DEVNULL,
                    )
            except BaseException:
                parent.close()
                raise
            self.conn = multiprocessing.connection.Connection(parent.detach())
        else:
            context = multiprocessing.get_context(start_method)
            self.conn, child_conn = context.Pipe()
            self.process = context.Process(
                target=math_worker_main,
                args=(child_conn,),
                name="opdplus-math-verifier",
                daemon=True,
            )
            try:
                self.process.start()
            except BaseException:
                self.conn.close()
                raise
            finally:
                child_conn.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        if isinstance(self.process, subprocess.Popen):
            return self.process.poll() is None
        return self.process.is_alive()

    def exit_code(self) -> int | None:
        if isinstance(self.process, subprocess.Popen):
            return self.process.poll()
        return self.process.exitcode

    def _recv(self, what: str) -> Any:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.kill()
            raise MathWorkerError(
                f"the math worker process (pid {self.pid}) died {what} "
                f"(exit code {self.exit_code()})"
            ) from None
        except Exception as exc:  # a reply that cannot be unpickled
            raise MathWorkerError(f"bad reply from the math worker: {exc!r}") from None

    def wait_ready(self, deadline: float | None) -> bool:
        """True once started; False if `deadline` (monotonic) came first. MathWorkerError if the
        process died or did not start within `MATH_WORKER_STARTUP_SECONDS`."""
        if self.ready:
            return True
        give_up = self.started + MATH_WORKER_STARTUP_SECONDS
        stop = give_up if deadline is None else min(give_up, deadline)
        if not self.conn.poll(max(stop - time.monotonic(), 0.0)):
            if deadline is not None and deadline <= give_up:
                return False
            raise MathWorkerError(
                f"the math worker process did not start within {MATH_WORKER_STARTUP_SECONDS} s"
            )
        self._recv("while starting")
        self.ready = True
        return True

    def score(self, response: str, answer: str, stop_at: float) -> tuple[str, Any] | None:
        """The worker's reply for one answer, or None if it is still running at `stop_at`.

        A request that cannot be sent (not text, not picklable) raises its error with nothing
        sent; the worker stays usable."""
        request = (response[-MAX_RESPONSE_CHARS:], answer)
        try:
            self.conn.send(request)  # pickles the whole request before writing anything
        except OSError:
            self.in_flight = True  # maybe half-written: never reuse this worker
            raise MathWorkerError("the math worker process is gone (broken pipe)") from None
        self.in_flight = True
        if not self.conn.poll(max(stop_at - time.monotonic(), 0.0)):
            return None
        reply = self._recv("while verifying an answer")
        self.in_flight = False
        return reply

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()
        if isinstance(self.process, subprocess.Popen):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
        else:
            self.process.join(timeout=5)
        self.conn.close()


class MathWorkerPool:
    """Worker processes that run math_verify, so that no input can hold the caller's GIL or run
    past its time limit.

    Workers are started on first use, reused across calls, one per thread verifying at the same
    time. `start_method` "subprocess" (the default on POSIX) runs a fresh interpreter that
    imports only this module; "spawn" / "forkserver" (the default elsewhere: "spawn") use
    multiprocessing, which also imports the parent's ``__main__`` module in each worker. "fork" is
    refused: forking a multithreaded process (JAX is one) can deadlock. A worker that runs over an
    answer's limit is killed and a replacement is started in the background. `close()` stops all
    workers; it also runs at interpreter exit.
    """

    def __init__(self, start_method: str | None = None) -> None:
        if start_method is None:
            start_method = "subprocess" if os.name == "posix" else "spawn"
        if start_method not in ("subprocess", "spawn", "forkserver"):
            raise ValueError(
                f"unknown start_method {start_method!r}; valid: subprocess, spawn, forkserver "
                f"(not fork: forking a multithreaded process such as one running JAX is unsafe)"
            )
        self.start_method = start_method
        self._lock = threading.Lock()
        self._idle: list[_MathWorker] = []
        self._workers: set[_MathWorker] = set()
        self._hooks_installed = False
        self._exiting = False

    @property
    def num_workers(self) -> int:
        """Worker processes started and not yet stopped (idle or busy)."""
        with self._lock:
            return len(self._workers)

    def pids(self) -> list[int]:
        """Process ids of the workers started and not yet stopped."""
        with self._lock:
            return sorted(worker.pid for worker in self._workers)

    def warm_up(self) -> None:
        """Start a worker now and wait until it is ready, so that the first math answer (and its
        time budget) does not wait for it. Raises MathWorkerError if it cannot start."""
        worker = self._acquire()
        try:
            worker.wait_ready(None)
        except BaseException:
            self._release(worker, broken=True, replace=False)
            raise
        self._release(worker, broken=False)

    def _start(self) -> _MathWorker:
        """A new worker (the caller holds the lock); installs the exit hooks on first use."""
        if not self._hooks_installed:
            atexit.register(self._at_exit)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=self._forget)
            self._hooks_installed = True
        worker = _MathWorker(self.start_method)
        self._workers.add(worker)
        return worker

    def _acquire(self) -> _MathWorker:
        with self._lock:
            if self._exiting:
                raise MathWorkerError("the interpreter is exiting; math workers are stopped")
            while self._idle:
                worker = self._idle.pop()
                if worker.alive():
                    return worker
                self._workers.discard(worker)
                worker.kill()
            return self._start()

    def _release(self, worker: _MathWorker, *, broken: bool, replace: bool = True) -> None:
        """Return a worker after use; a broken (busy, dead) one is killed and, with `replace`,
        replaced."""
        if broken:
            worker.kill()
        with self._lock:
            if worker not in self._workers:  # stopped by close() meanwhile
                if not broken:
                    worker.kill()
                return
            if broken:
                self._workers.discard(worker)
                if replace and not self._exiting:
                    try:  # starts while the caller goes on
                        self._idle.append(self._start())
                    except Exception as exc:  # the next _acquire tries again and reports it
                        logger.warning("cannot start a math worker process: %r", exc)
            else:
                self._idle.append(worker)

    def score_many(
        self,
        items: Sequence[tuple[str, str]],
        *,
        timeout_seconds: float = MATH_TIMEOUT_SECONDS,
        deadline: float | None = None,
    ) -> list[tuple[str, Any]]:
        """Math scores of (response_text, answer) pairs, each within `timeout_seconds` of wall
        clock, all before `deadline` (a `time.monotonic()` value) if given.

        Returns one (status, value) per item: ("ok", 1.0 / 0.0); ("error", exception) if
        math_verify raised or a worker could not start or died; ("timeout", MathTimeoutError);
        ("skipped", None) if the deadline came before the item was verified.
        """
        results: list[tuple[str, Any]] = []
        worker: _MathWorker | None = None
        pool_error: BaseException | None = None  # a worker cannot start: fail the rest fast
        try:
            for response, answer in items:
                if deadline is not None and time.monotonic() >= deadline:
                    results.append(("skipped", None))
                    continue
                if pool_error is not None:
                    results.append(("error", pool_error))
                    continue
                try:
                    if worker is None:
                        worker = self._acquire()
                    if not worker.wait_ready(deadline):
                        results.append(("skipped", None))
                        continue
                except Exception as exc:  # MathWorkerError, or the process could not start
                    if worker is not None:
                        self._release(worker, broken=True, replace=False)
                        worker = None
                    pool_error = exc
                    results.append(("error", exc))
                    continue
                limit = time.monotonic() + timeout_seconds
                stop = limit if deadline is None else min(limit, deadline)
                try:
                    reply = worker.score(response, answer, stop)
                except MathWorkerError as exc:  # died on this answer (e.g. out of memory)
                    self._release(worker, broken=True)
                    worker = None
                    results.append(("error", exc))
                    continue
                except Exception as exc:  # a request that cannot be sent; nothing was sent
                    results.append(("error", exc))
                    continue
                if reply is None:  # still running: kill it rather than wait
                    self._release(worker, broken=True)
                    worker = None
                    if stop < limit:
                        results.append(("skipped", None))
                    else:
                        results.append(
                            (
                                "timeout",
                                MathTimeoutError(
                                    f"math verification ran over {timeout_seconds:g} s; its "
                                    f"worker process was killed"
                                ),
                            )
                        )
                    continue
                results.append(reply)
        finally:
            if worker is not None:
                self._release(worker, broken=worker.in_flight)
        return results

    def close(self) -> None:
        """Stop every worker (busy ones too: their answers become failures). Later calls start
        new workers."""
        with self._lock:
            workers = list(self._workers)
            self._workers.clear()
            self._idle.clear()
        for worker in workers:
            worker.kill()

    def _at_exit(self) -> None:
        self._exiting = True
        self.close()

    def _forget(self) -> None:
        """In a forked child: the workers belong to the parent; start afresh."""
        self._lock = threading.Lock()
        self._idle, self._workers = [], set()


MATH_WORKERS = MathWorkerPool()


def _check_seconds(name: str, value: float, *, allow_zero: bool) -> float:
    value = float(value)
    if not (math.isfinite(value) and (value > 0 or (allow_zero and value == 0))):
        need = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number of seconds {need}, got {value!r}")
    return value


def math_score(response_text: str, answer: str, *, timeout_seconds: float | None = None) -> float:
    """1.0 if math_verify finds the response's final answer equal to `answer`, else 0.0.

    Runs in a `MATH_WORKERS` process with a hard wall-clock limit of `timeout_seconds` (default
    `MATH_TIMEOUT_SECONDS`), from any thread. Raises MathTimeoutError (a TimeoutError) past the
    limit, MathWorkerError if no worker could run it, or math_verify's own exception.
    """
    limit = _check_seconds(
        "timeout_seconds",
        MATH_TIMEOUT_SECONDS if timeout_seconds is None else timeout_seconds,
        allow_zero=False,
    )
    ((status, value),) = MATH_WORKERS.score_many([(response_text, answer)], timeout_seconds=limit)
    if status != "ok":
        raise value
    return float(value)


def math_verifier(response_text: str, example: Any) -> float:
    return math_score(response_text, answer_of(example))


def exact_verifier(response_text: str, example: Any) -> float:
    """Exact (whitespace-normalised) match of the extracted final answer."""
    return (
        1.0 if _normalize(extract_answer(response_text)) == _normalize(answer_of(example)) else 0.0
    )


# --------------------------------------------------------------------------------- entry points


def verify(
    response_text: str,
    example_or_answer: Example | Mapping[str, Any] | str,
    *,
    task: str | None = None,
    stats: VerifierStats | None = None,
    timeout_seconds: float | None = None,
) -> float:
    """Score one response (1.0 / 0.0). Never raises for a verifier error, a timeout or an
    unknown task: it scores 0 and is counted in `stats` (if given) and logged. `task` overrides
    the example's task field; `timeout_seconds` bounds a math answer (see `batch_verify`)."""
    scores, _ = batch_verify(
        [response_text],
        [example_or_answer],
        task=task,
        stats=stats,
        timeout_seconds=timeout_seconds,
    )
    return float(scores[0])


def _rows(examples: Sequence[Any] | Mapping[str, Sequence[Any]], n: int) -> list[Any]:
    """Per-row examples from a list, or from a batch dict of columns (e.g. a pipeline batch)."""
    if isinstance(examples, Mapping):
        cols = {k: v for k, v in examples.items() if k in ("answer", "task", "domain", "teacher")}
        if "answer" not in cols:
            raise ValueError(f"batch has no 'answer' column (columns: {sorted(examples)})")
        if any(len(v) != n for v in cols.values()):
            raise ValueError(f"batch columns and {n} responses differ in length")
        return [{k: cols[k][i] for k in cols} for i in range(n)]
    if len(examples) != n:
        raise ValueError(f"{n} responses but {len(examples)} examples")
    return list(examples)


def _score_in_process(
    key: str, fn: VerifierFn, response: str, example: Any, stats: VerifierStats
) -> float:
    try:
        score = float(fn(response, example))
        if not math.isfinite(score):
            raise ValueError(f"verifier returned a non-finite score {score}")
    except TimeoutError as exc:  # e.g. a registered verifier that calls math_score
        stats.record_timeout(key, exc)
        return 0.0
    except Exception as exc:  # a verifier bug must not stop training
        stats.record_failure(key, exc)
        return 0.0
    stats.record(key, score)
    return score


def batch_verify(
    responses: Sequence[str],
    examples: Sequence[Any] | Mapping[str, Sequence[Any]],
    *,
    task: str | None = None,
    stats: VerifierStats | None = None,
    timeout_seconds: float | None = None,
    time_budget_seconds: float | None = None,
) -> tuple[np.ndarray, VerifierStats]:
    """Scores float32 [B] of B responses against B examples (a list of `Example`s / record dicts /
    answer strings, or a batch dict with an ``answer`` column and optional ``task``/``domain``).

    Time limits: each math answer is verified in a worker process (`MATH_WORKERS`) with a hard
    limit of `timeout_seconds` (default `MATH_TIMEOUT_SECONDS`); one that runs over scores 0 and
    is counted as a timeout. `time_budget_seconds`, if given, bounds the whole call: the cheap
    in-process verifiers (tasks, registered verifiers) run first, then the math answers in order,
    and answers not verified within the budget score 0 and are counted as skipped.

    Returns (scores, stats); `stats` is updated in place if given, else a fresh one.
    """
    start = time.monotonic()
    limit = _check_seconds(
        "timeout_seconds",
        MATH_TIMEOUT_SECONDS if timeout_seconds is None else timeout_seconds,
        allow_zero=False,
    )
    deadline = None
    if time_budget_seconds is not None:
        deadline = start + _check_seconds(
            "time_budget_seconds", time_budget_seconds, allow_zero=True
        )
    stats = VerifierStats() if stats is None else stats
    rows = _rows(examples, len(responses))
    scores = np.zeros(len(rows), dtype=np.float32)
    math_rows: list[tuple[int, str, str, str]] = []  # (index, key, response, answer)
    for i, (response, row) in enumerate(zip(responses, rows, strict=True)):
        try:
            key, fn = resolve(row, task=task)
        except ValueError as exc:  # an unknown task name: an error, never silently math
            stats.record_failure(str(task or _field(row, "task")), exc)
            continue
        if fn is math_verifier:
            try:
                math_rows.append((i, key, response, answer_of(row)))
            except Exception as exc:
                stats.record_failure(key, exc)
            continue
        if deadline is not None and time.monotonic() >= deadline:
            stats.record_skipped(key)
            continue
        scores[i] = _score_in_process(key, fn, response, row, stats)
    if math_rows:
        results = MATH_WORKERS.score_many(
            [(response, answer) for _, _, response, answer in math_rows],
            timeout_seconds=limit,
            deadline=deadline,
        )
        for (i, key, _, _), (status, value) in zip(math_rows, results, strict=True):
            if status == "ok":
                scores[i] = value
                stats.record(key, float(value))
            elif status == "timeout":
                stats.record_timeout(key, value)
            elif status == "skipped":
                stats.record_skipped(key)
            else:
                stats.record_failure(key, value)
    return scores, stats
