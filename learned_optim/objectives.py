r"""Meta-objectives: how the losses of a segment become the scalar the net's weights descend.

Given the losses :math:`f_{s+1}, \dots, f_{s+L}` at the points a segment reached (on the train batches,
or on held-out val batches for train-by-validation; see :func:`learned_optim.meta.unroll.unroll`) and
the trajectory's starting loss :math:`f_0`:

* ``sum`` (reference default): :math:`\sum_t f_t`;
* ``last``: :math:`f_{s+L}`;
* ``log``: :math:`\frac1L \sum_t \log(f_t / f_0)`;
* ``log_last``: :math:`\frac1t \log(f_t / f_0)` at the segment's last global step :math:`t = s + L`
  (the step-size paper's :math:`\frac1t \log f(\theta_t)`, shifted by the constant :math:`\log f_0`).

The log objectives are computed in log space, :math:`\log f_t - \log f_0`, never as the ratio
:math:`f_t/f_0`, which overflows when losses explode (a loss of 1e30 over a starting loss of 1e-10 is
1e40, past float32's range, while both logs are ordinary numbers). Their gradient
:math:`\nabla f_t / f_t` stays bounded where :math:`\nabla f_t` itself explodes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "OBJECTIVES",
    "safe_log",
    "sum_objective",
    "last_objective",
    "log_objective",
    "log_last_objective",
    "meta_objective",
]

OBJECTIVES = ("sum", "last", "log", "log_last")


def safe_log(x: Tensor) -> Tensor:
    """:math:`\\log x` with ``x`` clamped to the smallest normal number of its dtype (a loss of exactly 0)."""
    return torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))


def _log_initial(initial_loss: float | Tensor) -> float:
    value = float(initial_loss)
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"log meta-objectives need a positive finite initial loss f_0, got {value}")
    return math.log(value)


def sum_objective(losses: Tensor) -> Tensor:
    r""":math:`\sum_t f_t`."""
    return losses.sum()


def last_objective(losses: Tensor) -> Tensor:
    r""":math:`f_{s+L}`, the loss at the segment's last point."""
    return losses[-1]


def log_objective(losses: Tensor, initial_loss: float | Tensor) -> Tensor:
    r""":math:`\frac1L\sum_{t} \big(\log f_t - \log f_0\big)` over the segment's ``L`` losses."""
    return (safe_log(losses) - _log_initial(initial_loss)).mean()


def log_last_objective(losses: Tensor, initial_loss: float | Tensor, last_step: int) -> Tensor:
    r""":math:`\frac1t\big(\log f_t - \log f_0\big)` at the segment's last global step ``t = last_step``."""
    if last_step < 1:
        raise ValueError("last_step must be >= 1")
    return (safe_log(losses[-1]) - _log_initial(initial_loss)) / last_step


def meta_objective(
    kind: str, losses: Tensor, *, initial_loss: float | Tensor | None = None, last_step: int | None = None
) -> Tensor:
    """Dispatch on ``kind`` (one of :data:`OBJECTIVES`); ``losses`` is the ``(L,)`` vector of a segment."""
    if losses.numel() == 0:
        raise ValueError("a meta-objective needs at least one loss")
    if kind == "sum":
        return sum_objective(losses)
    if kind == "last":
        return last_objective(losses)
    if kind in ("log", "log_last"):
        if initial_loss is None:
            raise ValueError(f"the {kind!r} objective needs the initial loss f_0")
        if kind == "log":
            return log_objective(losses, initial_loss)
        if last_step is None:
            raise ValueError("the 'log_last' objective needs last_step")
        return log_last_objective(losses, initial_loss, last_step)
    raise ValueError(f"unknown meta-objective {kind!r}; choose one of {OBJECTIVES}")
