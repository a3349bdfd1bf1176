"""Tool use: answer a question by emitting one JSON function call, verified by executing it.

The response must be a single JSON object ``{"name": <tool>, "arguments": {<param>: <value>}}``
(optionally after a ``####`` marker). The verifier parses it, checks the tool exists and the
arguments match its signature exactly (names and types), runs the tool from `TOOLS` and compares
the result (as a string) with the example's answer. Any malformed call scores 0; so does a call
that runs but returns a different result. Calls that reach the right result another way (e.g.
``add`` with swapped arguments) score 1: the check is by execution, not by string.

Example (default knobs)::

    What is the sum of 3 and 14?      {"name": "add", "arguments": {"a": 3, "b": 14}}

``show_tools=True`` prefixes each prompt with the tool signatures and an instruction (about 100
more characters); off by default to keep prompts short for small models.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import string
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from opdplus_jax.tasks.base import ANSWER_MARKER, TASKS, Example, Task, answer_of

MAX_INT_ABS = 10**30  # tool arguments beyond this are rejected (no huge bigint work)
MAX_STR_LEN = 1000


class ToolCallError(ValueError):
    """A response is not a well-formed, executable call of a registered tool."""


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    params: tuple[tuple[str, type], ...]
    fn: Callable[..., Any]
    question: str  # str.format template over the parameter names
    symmetric: bool = False  # f(a, b) = f(b, a): a question and its swapped twin are one problem

    @property
    def signature(self) -> str:
        return f"{self.name}({','.join(p for p, _ in self.params)})"


_INTS = (("a", int), ("b", int))
_STR = (("s", str),)
TOOLS: dict[str, Tool] = {
    t.name: t
    for t in (
        Tool("add", _INTS, lambda a, b: a + b, "What is the sum of {a} and {b}?", True),
        Tool("sub", _INTS, lambda a, b: a - b, "What is {a} minus {b}?"),
        Tool("mul", _INTS, lambda a, b: a * b, "What is the product of {a} and {b}?", True),
        Tool("max", _INTS, lambda a, b: max(a, b), "Which is larger, {a} or {b}?", True),
        Tool("min", _INTS, lambda a, b: min(a, b), "Which is smaller, {a} or {b}?", True),
        Tool("reverse", _STR, lambda s: s[::-1], "What is '{s}' reversed?"),
        Tool("upper", _STR, lambda s: s.upper(), "What is '{s}' in upper case?"),
        Tool("length", _STR, lambda s: len(s), "How many characters are in '{s}'?"),
    )
}


# (tool, its question as a regex with the two integers captured) for every symmetric tool.
_SYMMETRIC_QUESTIONS = [
    (t, re.compile(re.escape(t.question).replace(r"\{a\}", r"(\d+)").replace(r"\{b\}", r"(\d+)")))
    for t in TOOLS.values()
    if t.symmetric
]


def _check_arg(tool: Tool, name: str, kind: type, value: Any) -> None:
    if kind is int:
        if type(value) is not int:
            raise ToolCallError(f"{tool.name}: argument {name!r} must be an integer, got {value!r}")
        if abs(value) > MAX_INT_ABS:
            raise ToolCallError(f"{tool.name}: argument {name!r} is too large")
    elif not isinstance(value, str) or len(value) > MAX_STR_LEN:
        raise ToolCallError(f"{tool.name}: argument {name!r} must be a string, got {value!r}")


def parse_call(text: str) -> tuple[Tool, dict[str, Any]]:
    """Parse a response into (tool, arguments); raises `ToolCallError` if it is not well formed."""
    pos = text.rfind(ANSWER_MARKER)
    body = (text[pos + len(ANSWER_MARKER) :] if pos >= 0 else text).strip()
    if not body.startswith("{"):
        raise ToolCallError("the call must be a JSON object starting with '{'")
    try:
        call = json.loads(body)
    except (ValueError, RecursionError) as e:  # bad JSON, huge integers, deep nesting
        raise ToolCallError(f"malformed JSON: {e}") from None
    if not isinstance(call, dict) or set(call) != {"name", "arguments"}:
        raise ToolCallError('the call must be {"name": ..., "arguments": {...}} and nothing else')
    name, args = call["name"], call["arguments"]
    if not isinstance(name, str) or name not in TOOLS:
        raise ToolCallError(f"unknown tool {name!r}; tools: {', '.join(TOOLS)}")
    tool = TOOLS[name]
    if not isinstance(args, dict) or set(args) != {p for p, _ in tool.params}:
        raise ToolCallError(f"{name}: arguments must be exactly {[p for p, _ in tool.params]}")
    for p, kind in tool.params:
        _check_arg(tool, p, kind, args[p])
    return tool, args


def execute_call(text: str) -> str:
    """Run the call in `text` and return its result as a string (`ToolCallError` if malformed)."""
    tool, args = parse_call(text)
    return str(tool.fn(**args))


def format_call(name: str, arguments: Mapping[str, Any]) -> str:
    return json.dumps({"name": name, "arguments": dict(arguments)})


@TASKS.register
@dataclasses.dataclass(frozen=True)
class ToolUse(Task):
    """Questions answered by one call of a tool in `tools` (default: all of `TOOLS`)."""

    name: ClassVar[str] = "tool_use"
    domain: ClassVar[str] = "tool_use"

    tools: tuple[str, ...] = tuple(TOOLS)
    max_int: int = 99
    min_str_len: int = 3
    max_str_len: int = 6
    show_tools: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.tools, str):  # "add,mul" from the command line
            object.__setattr__(self, "tools", tuple(t for t in self.tools.split(",") if t))
        unknown = [t for t in self.tools if t not in TOOLS]
        if not self.tools or unknown:
            raise ValueError(f"tools must be a non-empty subset of {list(TOOLS)}, got {unknown}")
        if self.max_int < 1 or not 1 <= self.min_str_len <= self.max_str_len <= MAX_STR_LEN:
            raise ValueError("need max_int >= 1 and 1 <= min_str_len <= max_str_len")

    def sample(self, rng: random.Random) -> Example:
        tool = TOOLS[rng.choice(self.tools)]
        args: dict[str, Any] = {}
        for p, kind in tool.params:
            if kind is int:
                args[p] = rng.randint(0, self.max_int)
            else:
                n = rng.randint(self.min_str_len, self.max_str_len)
                args[p] = "".join(rng.choice(string.ascii_lowercase) for _ in range(n))
        question = tool.question.format(**args)
        if self.show_tools:
            listing = " ".join(TOOLS[t].signature for t in self.tools)
            question = f"Tools: {listing}\nAnswer with one JSON call.\n{question}"
        return self.example(question, str(tool.fn(**args)), format_call(tool.name, args))

    def split_key(self, prompt: str) -> str:
        """A symmetric tool's question with its two integers in increasing order."""
        for tool, pattern in _SYMMETRIC_QUESTIONS:
            found = pattern.fullmatch(prompt)
            if found:
                a, b = sorted(int(x) for x in found.groups())
                return tool.question.format(a=a, b=b)
        return prompt

    def verify(self, response_text: str, example: Example | Mapping[str, Any] | str) -> float:
        try:
            result = execute_call(response_text)
        except ToolCallError:
            return 0.0
        return 1.0 if result == answer_of(example) else 0.0
