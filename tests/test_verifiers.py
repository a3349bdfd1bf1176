"""Verifiers: math_verify answers, dispatch by task/domain, failure counting, threads."""

import logging
import threading

import numpy as np
import pytest

from opdplus_jax import tasks, verifiers
from opdplus_jax.verifiers import VerifierStats, batch_verify, verify


@pytest.fixture
def registered():
    names = []

    def register(name, fn):
        verifiers.register(name, fn)
        names.append(name)

    yield register
    for name in names:
        verifiers.unregister(name)


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("so the answer is \\boxed{1/2}", "0.5", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("steps ... #### 0.5", "\\frac{1}{2}", 1.0),
        ("#### 42", "42", 1.0),
        ("3 + 4 = 7, so \\boxed{42}", "42", 1.0),
        ("\\boxed{1+x^2}", "x^2+1", 1.0),
        ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", 1.0),
        ("#### 41", "42", 0.0),
        ("\\boxed{1/3}", "0.5", 0.0),
        ("no final answer here", "42", 0.0),
        ("#### foo bar", "foo bar", 1.0),  # math_verify cannot parse: exact fallback
        ("#### foo baz", "foo bar", 0.0),
        ("", "42", 0.0),
    ],
)
def test_math(response, answer, expected):
    assert verify(response, answer) == expected
    assert verify(response, {"answer": answer, "domain": "math"}) == expected


def test_last_boxed_and_extract():
    assert verifiers.last_boxed("\\boxed{1} then \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert verifiers.last_boxed("\\boxed{unclosed") is None
    assert verifiers.extract_answer("work\n#### 12") == "12"
    assert verifiers.extract_answer(" plain ") == "plain"


def test_math_in_a_worker_thread():
    stats = VerifierStats()
    out = []

    def run():
        out.append(verify("\\boxed{1/2}", "0.5", stats=stats))
        out.append(verify("\\boxed{1/3}", "0.5", stats=stats))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert out == [1.0, 0.0] and stats.failures == 0 and stats.calls == 2


def test_dispatch():
    assert verifiers.resolve(task="addition")[0] == "addition"
    assert verifiers.resolve({"answer": "7", "domain": "tool_use"})[0] == "tool_use"
    assert verifiers.resolve({"answer": "7", "task": "gsm8k", "domain": "math"})[0] == "math"
    assert verifiers.resolve("7")[0] == "math"
    for name in tasks.names():
        for ex in tasks.get(name).generate("test", 20, seed=1):
            assert verify(ex.solution, ex) == 1.0
            assert verify(ex.solution, ex.answer, task=name) == 1.0
    call = '{"name": "mul", "arguments": {"a": 6, "b": 7}}'
    assert verify(call, {"answer": "42", "domain": "tool_use"}) == 1.0
    assert verify(call, {"answer": "42", "task": "tool_use"}) == 1.0
    # The sort verifier is exact: "1 2 3" is not the number 3.
    assert verify("#### 1 2 3", {"answer": "1 2 3", "task": "sort"}) == 1.0
    assert verify("#### 3", {"answer": "1 2 3", "task": "sort"}) == 0.0


def test_raising_verifier_is_counted_not_raised(registered, caplog):
    def boom(response, example):
        raise RuntimeError("verifier bug")

    register = registered
    register("boom", boom)
    register("nan_domain", lambda r, e: float("nan"))
    stats = VerifierStats(max_messages=2)
    examples = [
        {"answer": "1", "task": "boom"},
        {"answer": "1", "task": "other", "domain": "nan_domain"},
        {"answer": "5", "task": "addition"},
        {"answer": "1", "task": "boom"},
        {"answer": "1", "task": "boom"},
    ]
    with caplog.at_level(logging.WARNING, logger="opdplus_jax.verifiers"):
        scores, out = batch_verify(["x", "y", "#### 5", "z", "w"], examples, stats=stats)
    assert out is stats
    np.testing.assert_array_equal(scores, [0, 0, 1, 0, 0])
    assert scores.dtype == np.float32
    assert (stats.calls, stats.failures) == (5, 4)
    assert stats.failure_rate == 0.8 and stats.mean_score == 0.2
    assert len(stats.messages) == 2 and "RuntimeError: verifier bug" in stats.messages[0]
    assert "non-finite" in stats.messages[1]
    assert "verifier bug" in caplog.text
    m = stats.metrics()
    assert m["verifier/boom/failures"] == 3 and m["verifier/addition/mean_score"] == 1.0
    assert verify("x", {"answer": "1", "task": "boom"}) == 0.0  # no stats given: still no raise
    with pytest.raises(ValueError, match="already registered"):
        verifiers.register("boom", boom)


def test_batch_verify_inputs():
    batch = {"answer": ["5", "7"], "task": ["addition", "tool_use"], "index": np.arange(2)}
    call = '{"name": "add", "arguments": {"a": 3, "b": 4}}'
    scores, stats = batch_verify(["#### 5", call], batch)
    np.testing.assert_array_equal(scores, [1, 1])
    merged = VerifierStats().merge(stats).merge(stats)
    assert merged.calls == 4 and merged.by_key["tool_use"]["calls"] == 2
    with pytest.raises(ValueError, match="2 responses but 1 examples"):
        batch_verify(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="no 'answer' column"):
        batch_verify(["a"], {"prompt": ["p"]})
