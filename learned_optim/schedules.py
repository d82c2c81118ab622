r"""The learning-rate schedules a checkpoint can recommend, the benchmark runs and meta-training can follow.

The lr and its schedule stay outside the learned rule (Celo2): a schedule is a multiplier of the base lr at
each step, :func:`lr_factor`, which ``torch.optim.lr_scheduler.LambdaLR`` applies for a user, the benchmark
suite applies to every contender, and meta-training can apply inside its trajectories (``unroll.schedule``).
"""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "WARMUP_FRACTION", "lr_factor"]

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
