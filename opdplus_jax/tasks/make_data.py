"""Write a task split to JSONL (or Parquet, by extension).

    python -m opdplus_jax.tasks.make_data --task addition --split train --n 1000 --out train.jsonl
    python -m opdplus_jax.tasks.make_data --task addition,tool_use --split test --n 200 \\
        --param max_digits=4 --param tool_use.show_tools=true \\
        --teacher addition=math,tool_use=tools --out test.jsonl

Fields per line: prompt, answer, solution, task, domain, teacher. With several tasks, `--n` is per
task and the examples are interleaved by a seeded shuffle. `--param k=v` sets a knob on every
task that has it (an error if none has it); `--param task.k=v` sets it on one task.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Sequence
from typing import Any

from opdplus_jax import tasks
from opdplus_jax.tasks.base import Example, write_jsonl


def _coerce(text: str, default: Any, where: str) -> Any:
    """Parse a command-line value to the type of the knob's default."""
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return text.lower() in ("true", "1")
        if isinstance(default, int | float):
            return type(default)(text)
        if isinstance(default, tuple):
            return tuple(p for p in text.split(",") if p)
    except ValueError as e:
        raise ValueError(f"--param {where}: {e}") from None
    return None if default is None and text.lower() == "none" else text


def parse_params(items: Sequence[str], task_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["k=v", "task.k=v"]`` -> per-task knob dicts (checked against each task's knobs)."""
    out: dict[str, dict[str, Any]] = {t: {} for t in task_names}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--param {item!r}: expected key=value")
        scope, dot, knob = key.rpartition(".")
        targets = [scope] if dot else [t for t in task_names if knob in tasks.knobs(t)]
        if dot and scope not in out:
            raise ValueError(f"--param {item!r}: task {scope!r} is not among {list(task_names)}")
        if not targets:
            raise ValueError(f"--param {item!r}: no task among {list(task_names)} has {knob!r}")
        for t in targets:
            if knob not in tasks.knobs(t):
                raise ValueError(f"--param {item!r}: task {t!r} has no knob {knob!r}")
            out[t][knob] = _coerce(raw, tasks.knobs(t)[knob], item)
    return out


def parse_teachers(spec: str | None, task_names: Sequence[str]) -> dict[str, str | None]:
    """``"name"`` (every task) or ``"task=name,task=name"`` -> teacher per task."""
    if not spec:
        return dict.fromkeys(task_names)
    if "=" not in spec:
        return dict.fromkeys(task_names, spec)
    mapping = dict(part.split("=", 1) for part in spec.split(","))
    unknown = set(mapping) - set(task_names)
    if unknown:
        raise ValueError(f"--teacher names tasks {sorted(unknown)} not among {list(task_names)}")
    return {t: mapping.get(t) for t in task_names}


def make_examples(
    task_names: Sequence[str],
    split: str,
    n: int,
    seed: int = 0,
    params: dict[str, dict[str, Any]] | None = None,
    teachers: dict[str, str | None] | None = None,
) -> list[Example]:
    """`n` examples of each task; several tasks are interleaved by a shuffle seeded by `seed`."""
    out: list[Example] = []
    for name in task_names:
        knobs = dict((params or {}).get(name, {}))
        if (teachers or {}).get(name):
            knobs["teacher"] = teachers[name]
        out += tasks.get(name, **knobs).generate(split, n, seed)
    if len(task_names) > 1:
        random.Random(seed).shuffle(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--task", required=True, help=f"one or more of: {', '.join(tasks.names())}")
    parser.add_argument("--split", required=True, choices=tasks.SPLITS)
    parser.add_argument("--n", type=int, required=True, help="examples per task")
    parser.add_argument("--out", required=True, help="output .jsonl or .parquet file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher", default=None, help="teacher id, or task=id,task=id")
    parser.add_argument("--param", action="append", default=[], help="knob k=v or task.k=v")
    args = parser.parse_args(argv)
    names = [t.strip() for t in args.task.split(",") if t.strip()]
    try:
        for name in names:
            tasks.knobs(name)  # unknown task names fail here with the list of valid ones
        examples = make_examples(
            names,
            args.split,
            args.n,
            args.seed,
            parse_params(args.param, names),
            parse_teachers(args.teacher, names),
        )
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    if args.out.endswith((".parquet", ".pq")):
        from opdplus_jax.data.records import write_parquet

        if os.path.dirname(args.out):
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
        write_parquet(examples, args.out)
    else:
        write_jsonl(examples, args.out)
    print(f"wrote {len(examples)} {args.split} examples of {', '.join(names)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
