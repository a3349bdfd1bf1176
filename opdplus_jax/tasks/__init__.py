"""Synthetic verifiable tasks: registry, generators with disjoint splits, exact verifiers.

    from opdplus_jax import tasks
    task = tasks.get("addition", max_digits=4, teacher="math")
    train = task.generate("train", 1000, seed=0)   # list[Example], deterministic
    task.verify(response_text, train[0])            # 1.0 / 0.0

Registered names: see `names()`. `make_data` writes a split to JSONL; `tokenizer` builds the
character-level tokenizer that covers every task's alphabet.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from opdplus_jax.tasks.arithmetic import Addition, ModularChain, Multiplication
from opdplus_jax.tasks.base import (
    ANSWER_MARKER,
    SPLITS,
    Example,
    Task,
    answer_of,
    final_answer,
    write_jsonl,
)
from opdplus_jax.tasks.sequences import ReverseString, SortList
from opdplus_jax.tasks.tool_use import TOOLS, ToolCallError, ToolUse, execute_call, parse_call

_REGISTRY: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (Addition, Multiplication, ModularChain, SortList, ReverseString, ToolUse)
}

__all__ = [
    "ANSWER_MARKER",
    "SPLITS",
    "TOOLS",
    "Addition",
    "Example",
    "ModularChain",
    "Multiplication",
    "ReverseString",
    "SortList",
    "Task",
    "ToolCallError",
    "ToolUse",
    "answer_of",
    "execute_call",
    "final_answer",
    "get",
    "knobs",
    "names",
    "parse_call",
    "write_jsonl",
]


def names() -> list[str]:
    """Registered task names, sorted."""
    return sorted(_REGISTRY)


def _task_class(name: str) -> type[Task]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(names())}")
    return _REGISTRY[name]


def knobs(name: str) -> dict[str, Any]:
    """The task's parameters (difficulty knobs and common ones) with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(_task_class(name))}


def get(name: str, **params: Any) -> Task:
    """An instance of task `name` with knob overrides; unknown names or knobs raise ValueError."""
    cls = _task_class(name)
    valid = knobs(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"task {name!r} has no parameter(s) {unknown}; valid: "
            + ", ".join(f"{k}={v!r}" for k, v in valid.items())
        )
    return cls(**params)
