"""Learning-rate schedules as pure functions of the optimizer step, so a resumed run gets the same lr.

`lr_factor(step, total_steps, kind, warmup_steps)` multiplies each group's base lr. `step` is the
0-based index of the optimizer update. Warmup: (step + 1) / warmup_steps for step < warmup_steps (so
the first update already trains and the last warmup step reaches 1). After warmup, with
p = (step - warmup) / (total - warmup):
constant 1; linear 1 - p; cosine (1 + cos(pi p)) / 2.
"""
from __future__ import annotations

import math

SCHEDULERS = ("constant", "linear", "cosine")


def lr_factor(step: int, total_steps: int, kind: str = "constant", warmup_steps: int = 0) -> float:
    """Multiplier of the base learning rate at 0-based optimizer step `step` (see the module docstring)."""
    if kind not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}; got {kind!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1; got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rates(optimizer, factor: float) -> list[float]:
    """Set every param group's lr to its `initial_lr` times `factor`; return the new lrs."""
    lrs = []
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
        lrs.append(group["lr"])
    return lrs
