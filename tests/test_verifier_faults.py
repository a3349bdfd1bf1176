"""Verifier faults: a hard time bound on math verification in any thread, a total time budget per
batch, timeouts / skips counted, unknown task names reported instead of silently using math."""

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from opdplus_jax import verifiers
from opdplus_jax.verifiers import VerifierStats, batch_verify, verify

HUGE_POWER = "\\boxed{9^{9^{9}}}"  # math_verify / sympy evaluate 9**387420489 holding the GIL
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _in_thread(fn):
    """Run fn() in a worker thread: (result, wall seconds, ticks the main thread made meanwhile)."""
    out = []
    t0 = time.monotonic()
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    ticks = 0
    while thread.is_alive() and time.monotonic() - t0 < 60:
        time.sleep(0.05)  # needs the GIL back after each sleep
        ticks += 1
    thread.join(timeout=60)
    assert out, "the verifier thread did not finish"
    return out[0], time.monotonic() - t0, ticks


def test_pathological_math_in_a_worker_thread_is_bounded_and_counted():
    stats = VerifierStats()
    assert verify("\\boxed{1/2}", "0.5", stats=stats) == 1.0  # main thread (starts the worker)
    score, wall, ticks = _in_thread(lambda: verify(HUGE_POWER, "1", stats=stats, timeout_seconds=2))
    assert score == 0.0 and wall < 10
    assert ticks >= 10  # the caller's process kept the GIL free while the worker was busy
    assert (stats.calls, stats.timeouts, stats.failures) == (2, 1, 0)
    assert any("timed out" in m for m in stats.messages)
    m = stats.metrics()
    assert m["verifier/timeouts"] == 1.0 and m["verifier/math/timeouts"] == 1.0
    # The killed worker is replaced: math still verifies, in a thread and in the main thread.
    score, _, _ = _in_thread(lambda: verify("#### 0.5", "\\frac{1}{2}", stats=stats))
    assert score == 1.0
    assert verify("\\boxed{1+x^2}", "x^2+1", stats=stats) == 1.0
    assert verify("\\boxed{1/3}", "0.5", stats=stats) == 0.0
    assert (stats.calls, stats.timeouts, stats.failures) == (5, 1, 0)


def test_pathological_math_in_the_main_thread_is_counted_as_a_timeout():
    stats = VerifierStats()
    t0 = time.monotonic()
    assert (
        verify(HUGE_POWER, {"answer": "1", "domain": "math"}, stats=stats, timeout_seconds=2) == 0
    )
    assert time.monotonic() - t0 < 10
    assert stats.timeouts == 1 and stats.by_key["math"]["timeouts"] == 1
    assert stats.mean_score == 0.0 and stats.failures == 0
    with pytest.raises(TimeoutError):
        verifiers.math_score(HUGE_POWER, "1", timeout_seconds=1)


def test_batch_time_budget_caps_wall_time_and_counts_skips():
    stats = VerifierStats()
    responses = [HUGE_POWER, "#### 5", "\\boxed{1/2}", HUGE_POWER, "#### 7"]
    examples = [
        {"answer": "1"},
        {"answer": "5", "task": "addition"},  # in-process verifiers run first, then math
        {"answer": "0.5"},
        {"answer": "1"},
        {"answer": "7", "domain": "math"},
    ]
    verify("#### 1", "1")  # start the worker outside the timed part
    t0 = time.monotonic()
    scores, _ = batch_verify(
        responses, examples, stats=stats, timeout_seconds=60, time_budget_seconds=2
    )
    assert time.monotonic() - t0 < 10
    np.testing.assert_array_equal(scores, [0, 1, 0, 0, 0])
    assert (stats.calls, stats.skipped, stats.timeouts) == (1, 4, 0)
    m = stats.metrics()
    assert m["verifier/skipped"] == 4.0 and m["verifier/math/skipped"] == 4.0
    assert m["verifier/addition/skipped"] == 0.0 and m["verifier/mean_score"] == 1.0
    # A budget the batch fits in changes nothing; a spent budget skips everything.
    scores, fits = batch_verify(
        ["\\boxed{1/2}", "#### 5", "#### 7"], ["0.5", "5", "8"], time_budget_seconds=60
    )
    np.testing.assert_array_equal(scores, [1, 1, 0])
    assert (fits.calls, fits.skipped, fits.timeouts) == (3, 0, 0)
    scores, spent = batch_verify(
        ["#### 5", "#### 5"], [{"answer": "5", "task": "addition"}, "5"], time_budget_seconds=0
    )
    np.testing.assert_array_equal(scores, [0, 0])
    assert (spent.calls, spent.skipped) == (0, 2)
    assert spent.by_key["addition"]["skipped"] == 1 and spent.by_key["math"]["skipped"] == 1
    merged = VerifierStats().merge(stats).merge(spent)
    assert merged.skipped == 6 and merged.by_key["math"]["skipped"] == 5


def test_concurrent_threads_each_get_a_worker():
    results = {}

    def run(i):
        results[i] = verify(f"\\boxed{{{i}/2}}", str(i / 2), timeout_seconds=30)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}


def _run_python(code, timeout=120):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")


@needs_proc
def test_import_starts_no_process_and_exit_does_not_hang():
    out = _run_python(
        """
        import os, threading, time

        def children():
            found = []
            for name in os.listdir("/proc"):
                try:
                    with open(f"/proc/{name}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if ppid == os.getpid():
                    found.append(int(name))
            return found

        import opdplus_jax.verifiers as v
        assert children() == [] and v.MATH_WORKERS.num_workers == 0, "import started a process"
        assert v.verify("#### 3", {"answer": "3", "task": "addition"}) == 1.0
        assert children() == [], "a cheap verifier started a process"
        assert v.verify("\\\\boxed{1/2}", "0.5") == 1.0
        assert children() == v.MATH_WORKERS.pids() != []
        busy = threading.Thread(
            target=v.verify, args=("\\\\boxed{9^{9^{9}}}", "1"),
            kwargs={"timeout_seconds": 600}, daemon=True,
        )
        busy.start()
        time.sleep(1)
        print("pids", *children(), flush=True)
        """
    )
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split("pids", 1)[1].split()]
    assert pids  # the math worker(s) ran in their own process(es) ...
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(_running(pid) for pid in pids)  # ... and are gone after the exit


@needs_proc
def test_pool_close_and_restart():
    assert verify("\\boxed{2}", "2") == 1.0
    pids = verifiers.MATH_WORKERS.pids()
    assert verifiers.MATH_WORKERS.num_workers == len(pids) >= 1
    assert all(_running(pid) for pid in pids)
    verifiers.MATH_WORKERS.close()
    assert verifiers.MATH_WORKERS.num_workers == 0
    assert not any(_running(pid) for pid in pids)
    assert verify("\\boxed{2}", "2") == 1.0  # started again on demand
    verifiers.MATH_WORKERS.close()
    verifiers.MATH_WORKERS.warm_up()
    assert verifiers.MATH_WORKERS.num_workers == 1


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_multiprocessing_workers(start_method):
    pool = verifiers.MathWorkerPool(start_method)
    try:
        items = [("\\boxed{1/2}", "0.5"), (HUGE_POWER, "1"), ("#### 3", "3"), ("#### 4", "3")]
        t0 = time.monotonic()
        results = pool.score_many(items, timeout_seconds=2)
        assert time.monotonic() - t0 < 30  # includes starting two workers
        assert [status for status, _ in results] == ["ok", "timeout", "ok", "ok"]
        assert [results[i][1] for i in (0, 2, 3)] == [1.0, 1.0, 0.0]
        assert isinstance(results[1][1], verifiers.MathTimeoutError)
        assert [p.name for p in multiprocessing.active_children()].count(
            "opdplus-math-verifier"
        ) == pool.num_workers
    finally:
        pool.close()
    assert pool.num_workers == 0
    with pytest.raises(ValueError, match="not fork"):
        verifiers.MathWorkerPool("fork")


def test_worker_errors_and_deaths_are_counted_failures():
    # An exception inside the worker comes back as the item's error; the worker survives.
    ((status, value),) = verifiers.MATH_WORKERS.score_many([("\\boxed{1}", None)])
    assert status == "error" and isinstance(value, TypeError)
    # A response that is not text is a counted failure, in a batch that goes on.
    scores, stats = batch_verify([None, "#### 2", "\\boxed{3}"], ["1", "2", "3"])
    np.testing.assert_array_equal(scores, [0, 1, 1])
    assert stats.failures == 1 and "TypeError" in stats.messages[0]
    # A worker killed mid-answer (e.g. by the OOM killer): a failure, then a fresh worker.
    stats = VerifierStats()
    assert verify("\\boxed{1}", "1", stats=stats) == 1.0
    out = []
    thread = threading.Thread(
        target=lambda: out.append(verify(HUGE_POWER, "1", stats=stats, timeout_seconds=60))
    )
    thread.start()
    time.sleep(1.5)
    for pid in verifiers.MATH_WORKERS.pids():
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=30)
    assert out == [0.0]
    assert (stats.calls, stats.failures, stats.timeouts) == (2, 1, 0)
    assert "MathWorkerError" in stats.messages[0] and "died" in stats.messages[0]
    assert verify("\\boxed{1}", "1", stats=stats) == 1.0
    with pytest.raises(ValueError, match="timeout_seconds must be"):
        verify("\\boxed{1}", "1", timeout_seconds=0)
    with pytest.raises(ValueError, match="time_budget_seconds must be"):
        batch_verify(["x"], ["1"], time_budget_seconds=-1)


# ------------------------------------------------------------------------- unknown task names


def test_misspelt_task_is_a_counted_error_not_math():
    stats = VerifierStats()
    with pytest.raises(ValueError, match=r"unknown task 'additon'.*addition"):
        verifiers.resolve({"answer": "5", "task": "additon"})
    assert verify("#### 5", {"answer": "5", "task": "additon"}, stats=stats) == 0.0
    assert verify("#### 5", "5", task="additon", stats=stats) == 0.0
    assert (stats.calls, stats.failures) == (2, 2)
    assert stats.by_key["additon"]["failures"] == 2
    message = stats.messages[0]
    assert "unknown task 'additon'" in message and "did you mean 'addition'" in message
    assert "valid names" in message and "sort" in message
    # An unknown task with an unknown domain is still an error; a known domain decides.
    scores, batch_stats = batch_verify(
        ["#### 5", "#### 5", "#### 5", "#### 5"],
        [
            {"answer": "5", "task": "gsm8k", "domain": "science"},
            {"answer": "5", "task": "gsm8k", "domain": "math"},
            {"answer": "5", "domain": "science"},  # no task: math, as before
            {"answer": "5"},
        ],
    )
    np.testing.assert_array_equal(scores, [0, 1, 1, 1])
    assert batch_stats.failures == 1 and "unknown task 'gsm8k'" in batch_stats.messages[0]


@pytest.mark.skipif(os.name != "posix", reason="the subprocess workers are POSIX-only")
def test_workers_that_cannot_start_fail_the_batch_fast(monkeypatch):
    items = [("\\boxed{1}", "1")] * 3
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    pool = verifiers.MathWorkerPool("subprocess")
    results = pool.score_many(items)
    assert [status for status, _ in results] == ["error"] * 3
    assert isinstance(results[0][1], FileNotFoundError) and pool.num_workers == 0
    monkeypatch.setattr(sys, "executable", "/bin/false")  # starts, exits at once
    t0 = time.monotonic()
    results = pool.score_many(items)
    assert time.monotonic() - t0 < 10 and pool.num_workers == 0
    assert [status for status, _ in results] == ["error"] * 3
    assert "died while starting" in str(results[0][1])
    pool.close()
