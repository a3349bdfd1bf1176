"""The optimizer of every training loop (OPD and SFT): clip -> AdamW on a schedule -> accumulation.

`make_optimizer(total_steps, learning_rate=..., ...)` takes plain values; `from_config` reads the
fields of a config's `optimizer` block (`OPTIMIZER_FIELDS`). Equal settings return the same optax
object: the jitted steps take the optimizer as a static argument, so runs with equal settings in
one process (sweeps, tests, the demo's SFT stages) share their compilation.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import optax

OPTIMIZER_FIELDS = (
    "learning_rate",
    "schedule",
    "warmup_steps",
    "weight_decay",
    "b1",
    "b2",
    "grad_clip",
    "grad_accum",
)
SCHEDULES = ("cosine", "constant")


def from_config(cfg: Any, total_steps: int) -> optax.GradientTransformation:
    """The optimizer of a config's `optimizer` block (any object with `OPTIMIZER_FIELDS`)."""
    return make_optimizer(total_steps, **{k: getattr(cfg, k) for k in OPTIMIZER_FIELDS})


@functools.lru_cache(maxsize=64)
def make_optimizer(
    total_steps: int,
    *,
    learning_rate: float,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    grad_clip: float | None = 1.0,
    grad_accum: int = 1,
) -> optax.GradientTransformation:
    """optax chain: global-norm clip (None = off), AdamW on a schedule, gradient accumulation.

    `schedule`: "cosine" warms up linearly from 0 over `warmup_steps` (at least 1) and decays to 0
    at `total_steps` optimizer updates; "constant" warms up, then holds `learning_rate`.
    `grad_accum` > 1 sums that many calls' gradients into one update (`optax.MultiSteps`).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule must be 'cosine' or 'constant', got {schedule!r}")
    check = {
        "learning_rate": (learning_rate, 0.0 < learning_rate < math.inf, "a finite number > 0"),
        "weight_decay": (weight_decay, 0.0 <= weight_decay < math.inf, "a finite number >= 0"),
        "b1": (b1, 0.0 <= b1 < 1.0, "in [0, 1)"),
        "b2": (b2, 0.0 <= b2 < 1.0, "in [0, 1)"),
        "grad_clip": (
            grad_clip,
            grad_clip is None or 0.0 < grad_clip < math.inf,
            "None (off) or a finite number > 0",
        ),
    }
    for name, (value, ok, want) in check.items():
        if not ok:  # NaN fails every comparison above
            raise ValueError(f"optimizer.{name} must be {want}; got {value!r}")
    for name, value, minimum in (("warmup_steps", warmup_steps, 0), ("grad_accum", grad_accum, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"optimizer.{name} must be an int >= {minimum}; got {value!r}")
    warmup = max(warmup_steps, 1)
    if schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup, max(total_steps, warmup + 1)
        )
    else:
        lr = optax.join_schedules(
            [
                optax.linear_schedule(0.0, learning_rate, warmup),
                optax.constant_schedule(learning_rate),
            ],
            [warmup],
        )
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip is not None else []
    parts.append(optax.adamw(lr, b1=b1, b2=b2, weight_decay=weight_decay))
    opt = optax.chain(*parts)
    return optax.MultiSteps(opt, grad_accum) if grad_accum > 1 else opt
