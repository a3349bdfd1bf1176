"""Synthetic verifiable tasks: registry, generators with disjoint splits, exact verifiers.

    from opdplus_jax import tasks
    task = tasks.get("addition", max_digits=4, teacher="math")
    train = task.generate("train", 1000, seed=0)   # list[Example], deterministic
    task.verify(response_text, train[0])            # 1.0 / 0.0

Tasks are looked up by name in the `TASKS` registry (`names()`): a new task is a `Task`
subclass registered under its `name` with `@TASKS.register`. `make_data` writes a split to
JSONL; `tokenizer` builds the character-level tokenizer that covers every task's alphabet.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from opdplus_jax.tasks.arithmetic import Addition, ModularChain, Multiplication
from opdplus_jax.tasks.base import (
    ANSWER_MARKER,
    SPLITS,
    TASKS,
    Example,
    Task,
    answer_of,
    final_answer,
    write_jsonl,
)
from opdplus_jax.tasks.sequences import ReverseString, SortList
from opdplus_jax.tasks.tool_use import TOOLS, ToolCallError, ToolUse, execute_call, parse_call

__all__ = [
    "ANSWER_MARKER",
    "SPLITS",
    "TASKS",
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
    return list(TASKS.names())


def knobs(name: str) -> dict[str, Any]:
    """The task's parameters (difficulty knobs and common ones) with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(TASKS.get(name))}


def get(name: str, **params: Any) -> Task:
    """An instance of task `name` with knob overrides; unknown names or knobs raise ValueError."""
    cls = TASKS.get(name)
    valid = knobs(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"task {name!r} has no parameter(s) {unknown}; valid: "
            + ", ".join(f"{k}={v!r}" for k, v in valid.items())
        )
    return cls(**params)
