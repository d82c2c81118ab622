r"""The learning-rate schedules a checkpoint can recommend, the benchmark runs and meta-training can follow.

The lr and its schedule stay outside the learned rule (Celo2): a schedule is a multiplier of the base lr at
each step, :func:`lr_factor`, which ``torch.optim.lr_scheduler.LambdaLR`` applies for a user, the benchmark
suite applies to every contender, and meta-training can apply inside its trajectories (``unroll.schedule``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["SCHEDULES", "WARMUP_FRACTION", "lr_factor", "group_lr_ratio", "lr_ratio"]

#: The lr schedules a checkpoint can recommend (config.json's top-level ``"schedule"``).
SCHEDULES = ("constant", "cosine")
#: The fraction of the horizon over which ``cosine`` warms up linearly.
WARMUP_FRACTION = 0.05


def lr_factor(schedule: str, step: int, steps: int) -> float:
    r"""The multiplier of the base lr at ``step`` (0-based) of ``steps``.

    ``constant``: 1. ``cosine``: :math:`(t+1)/w` for :math:`t < w = \max(1, \lfloor 0.05\,T \rfloor)`, then
    :math:`\tfrac12\bigl(1+\cos(\pi\,(t-w)/(T-w))\bigr)` (decays to 0 at the last step).
    """
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    warm = max(1, int(WARMUP_FRACTION * steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def group_lr_ratio(group: Mapping[str, Any]) -> tuple[float, float]:
    r"""A param group's largest lr so far, its current one included (from the group's ``"peak_lr"``, which
    :class:`~learned_optim.LearnedOptimizer` keeps), and its lr ratio :math:`\rho = \eta_t / \max_{s \le t}
    \eta_s` (1 while that peak is 0)."""
    lr = float(group["lr"])
    peak = max(float(group.get("peak_lr", 0.0)), lr)
    return peak, lr / peak if peak > 0 else 1.0


def lr_ratio(schedule: str, step: int, steps: int) -> float:
    r"""The lr ratio :math:`\rho_t = f(t) / \max_{s \le t} f(s)` of ``lr_factor(schedule, ., steps)`` at ``step``
    (0-based): where the schedule stands relative to the largest lr it has reached, without the horizon.

    ``constant``: 1. ``cosine``: 1 through the warm-up (the factor rises to its peak 1 at its last step), then the
    cosine factor itself. :class:`~learned_optim.LearnedOptimizer` computes the same ratio from each param group's
    lr as any scheduler sets it (:func:`group_lr_ratio`).
    """
    factor = lr_factor(schedule, step, steps)  # (checks the schedule's name)
    if schedule == "constant" or step < max(1, int(WARMUP_FRACTION * steps)):
        return 1.0
    return factor
