"""What an optimizee task is, for meta-training and evaluation alike.

A :class:`Task` is one concrete problem instance: initial parameters (a flat dict of tensors, so the
learned update can be applied functionally), batches of data per split, and a loss that is a pure,
differentiable function of ``(params, batch)``. A :class:`TaskFamily` samples task instances from a
seed (sizes, conditioning, noise, initialisation), which is what meta-training draws from.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["Params", "Task", "TaskFamily"]

Params = dict[str, Tensor]

#: Data splits a task can serve. "train" feeds the optimizee's gradients; "val" is held out for
#: train-by-validation meta-objectives and baseline tuning; "test" is only for reporting.
SPLITS = ("train", "val", "test")


class Task(abc.ABC):
    """One optimizee problem instance."""

    #: Short identifier, e.g. ``"quadratic"`` or ``"digits-mlp20-sigmoid"``.
    name: str = "task"

    #: Divergence guard (SPEC §2): a run whose parameters' global L2 norm exceeds this bound counts
    #: as diverged. ``None``: the task sets no bound and the trainer's own default applies.
    divergence_bound: float | None = None

    @abc.abstractmethod
    def init_params(self, generator: torch.Generator) -> Params:
        """Initial parameters theta_0 (the same distribution in meta-training and meta-testing)."""

    @abc.abstractmethod
    def batch(self, split: str, generator: torch.Generator) -> Any:
        """A batch of data from ``split`` (one of :data:`SPLITS`); fixed-data tasks return their data."""

    @abc.abstractmethod
    def loss(self, params: Mapping[str, Tensor], batch: Any) -> Tensor:
        """Scalar loss, differentiable in ``params`` (and twice, for Hessian-based regularizers)."""

    def metrics(self, params: Mapping[str, Tensor], batch: Any) -> dict[str, float]:
        """Extra evaluation metrics (e.g. ``{"accuracy": ...}``); default none."""
        return {}


class TaskFamily(abc.ABC):
    """A distribution over task instances."""

    name: str = "family"

    @abc.abstractmethod
    def sample(self, generator: torch.Generator) -> Task:
        """Draw one task instance."""
