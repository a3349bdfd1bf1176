"""Fault-injection points: where the reliability tests kill the training process.

`point(phase)` does nothing unless the environment variable `OPDPLUS_KILL_AT` is set, e.g.
`OPDPLUS_KILL_AT=update:3` (SIGKILL this process the 3rd time it reaches the `update` point) or
`save:1,export:1` (whichever comes first). The trainer marks its phases: `rollout` and `update`
(after each), `save` (while an asynchronous checkpoint save is being written), `metrics` (after a
metrics row), `eval` (after an evaluation) and `export` (between the weights and the tokenizer
files of the Hugging Face export). Counts are per process. A SIGKILL leaves no chance to clean
up, which is the point: a restarted run must lose nothing.
"""

from __future__ import annotations

import collections
import os
import signal

ENV = "OPDPLUS_KILL_AT"
PHASES = ("rollout", "update", "save", "metrics", "eval", "export")
_reached: collections.Counter[str] = collections.Counter()


def parse(spec: str) -> dict[str, int]:
    """`"update:3,save:1"` -> {"update": 3, "save": 1}; ValueError naming the bad part."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        phase, sep, count = part.partition(":")
        if phase not in PHASES or not sep or not count.isdigit() or int(count) < 1:
            raise ValueError(
                f"{ENV}: {part!r} is not PHASE:N with PHASE in {PHASES} and N >= 1 (e.g. update:3)"
            )
        out[phase] = int(count)
    return out


def point(phase: str) -> None:
    """Kill this process with SIGKILL if `OPDPLUS_KILL_AT` asks for this phase's visit."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    _reached[phase] += 1
    if parse(spec).get(phase) == _reached[phase]:
        os.kill(os.getpid(), signal.SIGKILL)
