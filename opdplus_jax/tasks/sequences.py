"""List and string tasks: sorting a list of integers, reversing a string.

Examples (default knobs; " / " stands for a newline)::

    Sort ascending: 42 7 19 7    7 = 7 < 19 < 42 / #### 7 7 19 42
    Reverse: planet              t e n a l p / #### tenalp

The sorting step is the ordered chain with its comparisons; the reversal step spells the string
backwards one character at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import string
from typing import ClassVar

from opdplus_jax.tasks.base import TASKS, Example, Task, check_range


@TASKS.register
@dataclasses.dataclass(frozen=True)
class SortList(Task):
    """Sort `min_len`..`max_len` integers in [0, `max_value`] ascending (duplicates allowed)."""

    name: ClassVar[str] = "sort"
    domain: ClassVar[str] = "lists"

    min_len: int = 3
    max_len: int = 6
    max_value: int = 99

    def __post_init__(self) -> None:
        check_range(self.min_len, self.max_len, "len", 1, 1000)
        if self.max_value < 1:
            raise ValueError(f"max_value must be >= 1, got {self.max_value}")

    def sample(self, rng: random.Random) -> Example:
        xs = [
            rng.randint(0, self.max_value) for _ in range(rng.randint(self.min_len, self.max_len))
        ]
        ys = sorted(xs)
        chain = str(ys[0]) + "".join(
            f" {'=' if b == a else '<'} {b}" for a, b in itertools.pairwise(ys)
        )
        answer = " ".join(map(str, ys))
        prompt = "Sort ascending: " + " ".join(map(str, xs))
        return self.example(prompt, answer, f"{chain}\n#### {answer}")


@TASKS.register
@dataclasses.dataclass(frozen=True)
class ReverseString(Task):
    """Reverse a string of `min_len`..`max_len` characters drawn from `alphabet`."""

    name: ClassVar[str] = "reverse"
    domain: ClassVar[str] = "strings"

    min_len: int = 3
    max_len: int = 8
    alphabet: str = string.ascii_lowercase

    def __post_init__(self) -> None:
        check_range(self.min_len, self.max_len, "len", 1, 1000)
        if not self.alphabet or any(c.isspace() or not c.isprintable() for c in self.alphabet):
            raise ValueError("alphabet must be non-empty printable characters without whitespace")

    def sample(self, rng: random.Random) -> Example:
        n = rng.randint(self.min_len, self.max_len)
        s = "".join(rng.choice(self.alphabet) for _ in range(n))
        return self.example(f"Reverse: {s}", s[::-1], " ".join(s[::-1]) + f"\n#### {s[::-1]}")

    def check(self, predicted: str, answer: str) -> bool:
        return predicted == answer
