"""Answer verifiers for rewards and eval: math (math_verify), synthetic tasks, tool calls.

`verify(response, example_or_answer, task=None)` picks a verifier, in this order:

1. a verifier registered with `register(name, fn)` (in `VERIFIERS`) under the task name;
2. the synthetic task's exact verifier (`opdplus_jax.tasks`) if the task name is registered
   there (``tool_use`` executes the JSON call);
3. a verifier registered under the example's domain; domain ``tool_use``: tool-call execution;
4. otherwise math: `math_verify.parse` + `math_verify.verify` on the last ``\\boxed{...}`` or the
   ``#### <answer>`` line (the gold answer is parsed as ``\\boxed{<answer>}``), falling back to
   an exact comparison of the extracted answer when math_verify cannot parse either side.

Scores are 1.0 / 0.0. A verifier that raises (or returns a non-finite score) never stops
training: the exception is caught, counted in a `VerifierStats`, logged (first few at WARNING)
and the response scores 0.

Threads: math_verify's timeouts use ``signal.alarm``, which only works in the main thread. Here
the timeout (`MATH_TIMEOUT_SECONDS`) applies in the main thread only; in any other thread the
math_verify calls run with ``parsing_timeout=None`` / ``timeout_seconds=None`` (no timeout), and
inputs are capped at `MAX_RESPONSE_CHARS` (the tail is kept) to bound the work.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from opdplus_jax import tasks
from opdplus_jax.registry import Registry
from opdplus_jax.tasks.base import Example, Task, answer_of, final_answer

logger = logging.getLogger(__name__)

MATH_TIMEOUT_SECONDS = 5
MAX_RESPONSE_CHARS = 10_000
VerifierFn = Callable[[str, Any], float]
VERIFIERS: Registry[VerifierFn] = Registry("verifier")


# ---------------------------------------------------------------------------------------- stats


@dataclasses.dataclass
class VerifierStats:
    """Counts of verifier calls, failures (exceptions) and scores, overall and per verifier key.

    Thread-safe. `metrics()` gives flat floats for a metrics logger; `messages` keeps the first
    `max_messages` failure messages (verifier key, exception type and text).
    """

    max_messages: int = 5
    log_limit: int = 10
    calls: int = 0
    failures: int = 0
    score_sum: float = 0.0
    by_key: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    messages: list[str] = dataclasses.field(default_factory=list)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def _entry(self, key: str) -> dict[str, float]:
        return self.by_key.setdefault(key, {"calls": 0, "failures": 0, "score_sum": 0.0})

    def record(self, key: str, score: float) -> None:
        with self._lock:
            e = self._entry(key)
            self.calls += 1
            self.score_sum += score
            e["calls"] += 1
            e["score_sum"] += score

    def record_failure(self, key: str, exc: BaseException) -> None:
        msg = f"{key}: {type(exc).__name__}: {exc}"[:500]
        with self._lock:
            e = self._entry(key)
            self.calls += 1
            self.failures += 1
            e["calls"] += 1
            e["failures"] += 1
            if len(self.messages) < self.max_messages:
                self.messages.append(msg)
            n = self.failures
        if n <= self.log_limit:
            logger.warning("verifier failed (scored 0; failure %d): %s", n, msg)
        else:
            logger.debug("verifier failed (scored 0; failure %d): %s", n, msg)

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
            self.score_sum += other.score_sum
            for key, o in other.by_key.items():
                e = self._entry(key)
                for k in e:
                    e[k] += o[k]
            room = self.max_messages - len(self.messages)
            self.messages.extend(other.messages[: max(room, 0)])
        return self

    def metrics(self, prefix: str = "verifier/") -> dict[str, float]:
        """Flat floats: calls, failures, failure_rate, mean_score, and per key mean/failures."""
        out = {
            f"{prefix}calls": float(self.calls),
            f"{prefix}failures": float(self.failures),
            f"{prefix}failure_rate": self.failure_rate,
            f"{prefix}mean_score": self.mean_score,
        }
        for key, e in sorted(self.by_key.items()):
            out[f"{prefix}{key}/mean_score"] = e["score_sum"] / e["calls"] if e["calls"] else 0.0
            out[f"{prefix}{key}/failures"] = float(e["failures"])
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


def resolve(example: Any = None, *, task: str | None = None) -> tuple[str, VerifierFn]:
    """The (key, verifier) that `verify` would use for this example / task name."""
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


def _timeout(seconds: int | None) -> int | None:
    """`seconds` in the main thread; None elsewhere (signal.alarm only works in the main thread)."""
    if threading.current_thread() is threading.main_thread():
        return seconds
    return None


def math_score(
    response_text: str, answer: str, *, timeout_seconds: int | None = MATH_TIMEOUT_SECONDS
) -> float:
    """1.0 if math_verify finds the response's final answer equal to `answer`, else 0.0."""
    from math_verify import parse
    from math_verify import verify as mv_verify

    timeout = _timeout(timeout_seconds)
    text = response_text[-MAX_RESPONSE_CHARS:]
    gold_text = answer if ("\\boxed" in answer or "$" in answer) else f"\\boxed{{{answer}}}"
    if last_boxed(text) is not None:
        pred_text = text
    else:
        tail = final_answer(text)
        pred_text = text if tail is None else f"\\boxed{{{tail}}}"
    gold = parse(gold_text, parsing_timeout=timeout)
    pred = parse(pred_text, parsing_timeout=timeout)
    if gold and pred:
        return 1.0 if mv_verify(gold, pred, timeout_seconds=timeout) else 0.0
    return 1.0 if _normalize(extract_answer(text)) == _normalize(answer) else 0.0


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
) -> float:
    """Score one response (1.0 / 0.0). Never raises for a verifier error: it scores 0 and is
    counted in `stats` (if given) and logged. `task` overrides the example's task field."""
    key, fn = resolve(example_or_answer, task=task)
    try:
        score = float(fn(response_text, example_or_answer))
        if not math.isfinite(score):
            raise ValueError(f"verifier returned a non-finite score {score}")
    except Exception as exc:  # a verifier bug must not stop training
        if stats is None:
            logger.warning("verifier failed (scored 0): %s: %s: %s", key, type(exc).__name__, exc)
        else:
            stats.record_failure(key, exc)
        return 0.0
    if stats is not None:
        stats.record(key, score)
    return score


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


def batch_verify(
    responses: Sequence[str],
    examples: Sequence[Any] | Mapping[str, Sequence[Any]],
    *,
    task: str | None = None,
    stats: VerifierStats | None = None,
) -> tuple[np.ndarray, VerifierStats]:
    """Scores float32 [B] of B responses against B examples (a list of `Example`s / record dicts /
    answer strings, or a batch dict with an ``answer`` column and optional ``task``/``domain``).

    Returns (scores, stats); `stats` is updated in place if given, else a fresh one.
    """
    stats = VerifierStats() if stats is None else stats
    rows = _rows(examples, len(responses))
    scores = np.array(
        [verify(r, ex, task=task, stats=stats) for r, ex in zip(responses, rows, strict=True)],
        dtype=np.float32,
    )
    return scores, stats
