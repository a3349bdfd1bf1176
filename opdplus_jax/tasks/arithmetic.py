"""Arithmetic tasks with column-wise worked solutions: addition, 1-digit multiplication, mod chains.

Solutions are short step lists a small model can imitate token by token, ending in
``#### <answer>``. Examples (default knobs)::

    What is 478 + 356?       8+6+0=14 / 7+5+1=13 / 4+3+1=8 / #### 834
    What is 472 * 6?         2*6+0=12 / 7*6+1=43 / 4*6+4=28 / #### 2832
    What is ((3+5)*2) mod 7? 3+5=8; 8 mod 7=1 / 1*2=2; 2 mod 7=2 / #### 2

(" / " stands for a newline). In a column step ``x+y+c=s`` (or ``x*m+c=s``) c is the carry from
the previous column, the last digit of s is written and the rest of s carries.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import ClassVar

from opdplus_jax.tasks.base import TASKS, Example, Task, check_range

_ADDITION = re.compile(r"What is (\d+) \+ (\d+)\?")


def _number(rng: random.Random, digits: int) -> int:
    """A uniform integer with exactly `digits` digits (0-9 for one digit)."""
    return rng.randrange(10) if digits == 1 else rng.randrange(10 ** (digits - 1), 10**digits)


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


class _IntegerAnswerTask(Task):
    """A task whose answers are integers: a prediction must be one, written exactly the same."""

    def check(self, predicted: str, answer: str) -> bool:
        return _is_int(predicted) and predicted == answer


@TASKS.register
@dataclasses.dataclass(frozen=True)
class Addition(_IntegerAnswerTask):
    """a + b with a and b of `min_digits`..`max_digits` digits; one line per column."""

    name: ClassVar[str] = "addition"
    domain: ClassVar[str] = "arithmetic"

    min_digits: int = 2
    max_digits: int = 3

    def __post_init__(self) -> None:
        check_range(self.min_digits, self.max_digits, "digits", 1, 30)

    def split_key(self, prompt: str) -> str:
        """``a+b`` with the smaller operand first: a sum and its swapped twin share a split."""
        found = _ADDITION.fullmatch(prompt)
        if found is None:
            return prompt
        a, b = sorted(int(x) for x in found.groups())
        return f"{a}+{b}"

    def sample(self, rng: random.Random) -> Example:
        a = _number(rng, rng.randint(self.min_digits, self.max_digits))
        b = _number(rng, rng.randint(self.min_digits, self.max_digits))
        return self.example(f"What is {a} + {b}?", str(a + b), addition_steps(a, b))


def addition_steps(a: int, b: int) -> str:
    """Column-wise addition of non-negative a and b, right to left, then ``#### a+b``."""
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lines.append(f"{x}+{y}+{carry}={s}")
        carry = s // 10
    return "\n".join([*lines, f"#### {a + b}"])


@TASKS.register
@dataclasses.dataclass(frozen=True)
class Multiplication(_IntegerAnswerTask):
    """a * m with a of `min_digits`..`max_digits` digits and a 1-digit multiplier m."""

    name: ClassVar[str] = "multiplication"
    domain: ClassVar[str] = "arithmetic"

    min_digits: int = 2
    max_digits: int = 3
    min_multiplier: int = 2
    max_multiplier: int = 9

    def __post_init__(self) -> None:
        check_range(self.min_digits, self.max_digits, "digits", 1, 30)
        check_range(self.min_multiplier, self.max_multiplier, "multiplier", 0, 9)

    def sample(self, rng: random.Random) -> Example:
        a = _number(rng, rng.randint(self.min_digits, self.max_digits))
        m = rng.randint(self.min_multiplier, self.max_multiplier)
        return self.example(f"What is {a} * {m}?", str(a * m), multiplication_steps(a, m))


def multiplication_steps(a: int, m: int) -> str:
    """Digit-by-digit product of non-negative a by a digit m, right to left, then ``#### a*m``."""
    lines, carry = [], 0
    for ch in str(a)[::-1]:
        v = int(ch) * m + carry
        lines.append(f"{ch}*{m}+{carry}={v}")
        carry = v // 10
    return "\n".join([*lines, f"#### {a * m}"])


@TASKS.register
@dataclasses.dataclass(frozen=True)
class ModularChain(_IntegerAnswerTask):
    """A left-nested chain ((x op y) op z) mod m of +, -, * reduced each step."""

    name: ClassVar[str] = "modular"
    domain: ClassVar[str] = "arithmetic"

    min_ops: int = 2
    max_ops: int = 3
    max_operand: int = 9
    min_modulus: int = 5
    max_modulus: int = 13
    ops: str = "+-*"

    def __post_init__(self) -> None:
        check_range(self.min_ops, self.max_ops, "ops", 1, 20)
        check_range(self.min_modulus, self.max_modulus, "modulus", 2, 10**6)
        if self.max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {self.max_operand}")
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"ops must be a non-empty subset of '+-*', got {self.ops!r}")

    def sample(self, rng: random.Random) -> Example:
        k = rng.randint(self.min_ops, self.max_ops)
        m = rng.randint(self.min_modulus, self.max_modulus)
        x0 = rng.randint(0, self.max_operand)
        steps = [(rng.choice(self.ops), rng.randint(1, self.max_operand)) for _ in range(k)]
        expr = "(" * k + str(x0) + "".join(f"{op}{y})" for op, y in steps)
        lines, cur = [], x0
        for op, y in steps:
            r = cur + y if op == "+" else cur - y if op == "-" else cur * y
            lines.append(f"{cur}{op}{y}={r}; {r} mod {m}={r % m}")
            cur = r % m
        solution = "\n".join([*lines, f"#### {cur}"])
        return self.example(f"What is {expr} mod {m}?", str(cur), solution)
