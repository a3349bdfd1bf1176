"""Task protocol, `Example` records, final-answer extraction and seeded disjoint splits.

Every synthetic task draws random problems from a seeded generator. A problem belongs to the
``test`` split iff a stable hash (BLAKE2b) of ``"<task>|<prompt>"`` falls below
``test_fraction``; the partition depends on the problem only, never on the seed, so no test
problem can appear in any train set, whatever the seeds and sizes. A task whose problems have
equivalent spellings hashes a canonical one (`Task.split_key`): ``12 + 34`` and ``34 + 12`` fall
in the same split, so a held-out sum is never seen with its operands swapped. Within one
``generate`` call problems are unique unless ``unique=False`` (small problem spaces would
otherwise run out).

Worked solutions end with a final line ``#### <answer>``; `final_answer` extracts it. Task
classes are registered in `TASKS` under their `name` (``@TASKS.register`` on the class).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import os
import random
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from opdplus_jax.registry import Registry

SPLITS = ("train", "test")
ANSWER_MARKER = "####"
JSONL_FIELDS = ("prompt", "answer", "solution", "task", "domain", "teacher")
TASKS: Registry[type[Task]] = Registry("task")  # task classes by name


@dataclasses.dataclass(frozen=True)
class Example:
    """One problem: the user message, its final answer and worked solution (SFT target)."""

    prompt: str
    answer: str
    solution: str
    task: str
    domain: str
    teacher: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in JSONL_FIELDS}


def answer_of(example: Example | Mapping[str, Any] | str) -> str:
    """The reference answer of an `Example`, a record mapping (``"answer"`` key) or a string."""
    if isinstance(example, str):
        return example
    if isinstance(example, Mapping):
        if "answer" not in example:
            raise ValueError(f"example has no 'answer' field (fields: {sorted(example)})")
        return str(example["answer"])
    return str(example.answer)


def final_answer(text: str, marker: str = ANSWER_MARKER) -> str | None:
    """Text after the last `marker` up to the end of its line, stripped; None if absent."""
    pos = text.rfind(marker)
    if pos < 0:
        return None
    return text[pos + len(marker) :].split("\n", 1)[0].strip()


def stable_unit(key: str) -> float:
    """A uniform number in [0, 1) from a stable 64-bit hash of `key` (same on every machine)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def seeded_rng(*parts: Any) -> random.Random:
    """A `random.Random` seeded from a stable hash of `parts` (independent of PYTHONHASHSEED)."""
    key = "|".join(str(p) for p in parts)
    return random.Random(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest()))


def check_range(lo: int, hi: int, what: str, floor: int, ceil: int) -> None:
    """Validate the knobs ``min_<what>`` = lo and ``max_<what>`` = hi: floor <= lo <= hi <= ceil."""
    if not floor <= lo <= hi <= ceil:
        raise ValueError(f"need {floor} <= min_{what} <= max_{what} <= {ceil}, got {lo}, {hi}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task(abc.ABC):
    """A synthetic verifiable task. Subclasses are frozen dataclasses whose fields are knobs.

    Subclasses set `name` and `domain`, implement `sample` (one random `Example`) and may
    override `check` (exact comparison of an extracted answer). Knobs common to every task:
    `teacher` (id written into each example), `test_fraction` (share of the problem space in the
    test split), `unique` (no repeated problem within one `generate` call).
    """

    name: ClassVar[str]
    domain: ClassVar[str]

    teacher: str | None = None
    test_fraction: float = 0.1
    unique: bool = True

    @abc.abstractmethod
    def sample(self, rng: random.Random) -> Example:
        """One random problem with its worked solution (split membership is decided later)."""

    def check(self, predicted: str, answer: str) -> bool:
        """Exact comparison of an extracted final answer with the reference (whitespace-normed)."""
        return " ".join(predicted.split()) == " ".join(answer.split())

    def verify(self, response_text: str, example: Example | Mapping[str, Any] | str) -> float:
        """1.0 if the response's ``#### <answer>`` line matches the reference exactly, else 0.0."""
        predicted = final_answer(response_text)
        if predicted is None:
            return 0.0
        return 1.0 if self.check(predicted, answer_of(example)) else 0.0

    def split_key(self, prompt: str) -> str:
        """The problem `prompt` poses, spelled canonically: prompts that pose the same problem
        (e.g. a sum with its operands swapped) must share it. The prompt itself by default."""
        return prompt

    def split_of(self, prompt: str) -> str:
        """``"test"`` or ``"train"``: a fixed function of the problem (seed-independent)."""
        key = f"{self.name}|{self.split_key(prompt)}"
        return "test" if stable_unit(key) < self.test_fraction else "train"

    def generate(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """`n` examples of `split` (train/test); same (knobs, split, n, seed) => same list."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        rng = seeded_rng(self.name, split, seed)
        out: list[Example] = []
        seen: set[str] = set()
        attempts, max_attempts = 0, 200 * n + 1000
        while len(out) < n:
            attempts += 1
            if attempts > max_attempts:
                raise ValueError(
                    f"task {self.name!r}: found only {len(out)} unique {split} problems of the "
                    f"{n} requested after {max_attempts} draws; raise the difficulty knobs "
                    f"(e.g. more digits or longer inputs) or pass unique=False"
                )
            ex = self.sample(rng)
            if self.split_of(ex.prompt) != split or (self.unique and ex.prompt in seen):
                continue
            seen.add(ex.prompt)
            out.append(dataclasses.replace(ex, teacher=self.teacher) if self.teacher else ex)
        return out

    def example(self, prompt: str, answer: str, solution: str) -> Example:
        return Example(prompt, answer, solution, self.name, self.domain, self.teacher)


def write_jsonl(examples: Iterable[Example | Mapping[str, Any]], path: str | os.PathLike) -> int:
    """Write examples as JSON lines with fields prompt, answer, solution, task, domain, teacher."""
    count = 0
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            row = ex.to_dict() if isinstance(ex, Example) else {k: ex.get(k) for k in JSONL_FIELDS}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count
