r"""Statistics of the suite, in the style of VeLOdrome (google/learned_optimization).

* Speed-up of a run against the reference (tuned AdamW on the same task and seed), :func:`speedup`:
  with :math:`L^*` the reference's final validation loss and :math:`T` the horizon, if the run's
  validation loss first reaches :math:`L^*` at measured step :math:`s` (steps > 0 on the evaluation
  grid, every ``T/20`` steps), the speed-up is :math:`T/s \ge 1` (at most 20 by the grid's
  resolution). If it never reaches :math:`L^*`, the speed-up is :math:`s'/T < 1` with :math:`s'` the
  step at which the *reference* first reached the run's own final loss (how much earlier AdamW was
  where the run ended); a run with a non-finite loss has speed-up 0. The reference itself gets
  :math:`T/s \ge 1` by the same rule (more than 1 when its validation loss was lower earlier).
* Normalised loss: the mean over seeds of a final loss divided by the reference's mean (< 1 is better).
  A run that ended with a non-finite loss counts with its initial validation loss (no progress).
* :func:`iqm`: the interquartile mean over tasks (``scipy.stats.trim_mean(x, 0.25)``).
* :func:`paired_outcome`: per seed differences (run minus reference) of a final loss, their mean and
  95% t-interval (:func:`learned_optim.evaluate.mean_confidence_interval`); ``win`` when the interval
  lies below 0, ``loss`` above, ``tie`` when it contains 0 or cannot be formed (one seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..evaluate import mean_confidence_interval

__all__ = ["iqm", "first_reach", "speedup", "paired_outcome", "OUTCOMES", "OUTCOME_COUNTS"]

OUTCOMES = ("win", "tie", "loss")
#: Plural column names of the outcome counts.
OUTCOME_COUNTS = {"win": "wins", "tie": "ties", "loss": "losses"}


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean of the finite values (NaN when there is none)."""
    from scipy.stats import trim_mean

    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(trim_mean(finite, 0.25)) if finite else math.nan


def first_reach(steps: Sequence[int], values: Sequence[float | None], target: float) -> int | None:
    """The first step > 0 whose value is finite and <= ``target`` (``None`` if there is none)."""
    for s, v in zip(steps, values, strict=True):
        if s > 0 and v is not None and math.isfinite(v) and v <= target:
            return s
    return None


def speedup(
    steps: Sequence[int],
    values: Sequence[float | None],
    ref_steps: Sequence[int],
    ref_values: Sequence[float | None],
    horizon: int,
) -> float:
    """Speed-up of a validation curve against the reference curve (see the module docstring)."""
    target = ref_values[-1] if ref_values else None
    if target is None or not math.isfinite(target):
        return math.nan
    final = values[-1] if values else None
    if final is None or not math.isfinite(final):
        return 0.0
    reached = first_reach(steps, values, target)
    if reached is not None:
        return horizon / reached
    ref_reached = first_reach(ref_steps, ref_values, final)
    return (ref_reached if ref_reached is not None else horizon) / horizon


def paired_outcome(
    values: Sequence[float], reference: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, str]:
    """Mean and half-width of the paired differences ``values - reference`` and the outcome for ``values``."""
    if len(values) != len(reference):
        raise ValueError(f"paired values need equal lengths, got {len(values)} and {len(reference)}")
    mean, half = mean_confidence_interval([v - r for v, r in zip(values, reference, strict=True)], confidence)
    if not math.isfinite(mean) or not math.isfinite(half):
        return mean, half, "tie"
    if mean + half < 0:
        return mean, half, "win"
    if mean - half > 0:
        return mean, half, "loss"
    return mean, half, "tie"
