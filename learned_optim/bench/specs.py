"""What the evaluation harness runs on what: optimizer specs, task sources and a run's seeded random streams.

A name becomes an :class:`OptimizerSpec` (:func:`resolve_optimizer`: a baseline of
:data:`~learned_optim.bench.baselines.BASELINES` with its lr grid, or a learned optimizer from the zoo, a
checkpoint folder or the Hub) and a :class:`TaskSource` (:func:`resolve_task`). Every random draw of a run
comes from one of :data:`NUM_STREAMS` independent streams of its seed (:func:`seed_stream`), so every
optimizer of a seed starts from the same parameters (:func:`task_instance`) and sees the same batches.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..hub import from_pretrained, load_rule_from_dir, resolve_checkpoint
from ..tasks.base import Params, Task, TaskFamily
from .baselines import BASELINES

__all__ = [
    "OptimizerSpec",
    "resolve_optimizer",
    "TaskSource",
    "resolve_task",
    "seed_stream",
    "task_instance",
    "TASK_STREAM",
    "TRAIN_STREAM",
    "EVAL_STREAM",
    "FLATNESS_STREAM",
]

#: Random streams derived from one seed (see :func:`seed_stream`).
TASK_STREAM, TRAIN_STREAM, EVAL_STREAM, FLATNESS_STREAM, NUM_STREAMS = 0, 1, 2, 3, 4


@dataclasses.dataclass
class OptimizerSpec:
    """One optimizer under evaluation.

    Attributes:
        label: its name in tables, files and plots.
        build: ``build(params, lr)`` returns the optimizer; ``lr=None`` means its own default.
        lr: fixed learning rate (multiplier, for a learned optimizer); ignored when ``lr_grid`` is set.
        lr_grid: learning rates to tune over on the validation split, or ``None`` for no tuning.
        kind: ``"baseline"`` or ``"learned"``.
        info: JSON-serialisable description recorded in the results (source, family, ...).
    """

    label: str
    build: Callable[[list[Tensor], float | None], Optimizer]
    lr: float | None = None
    lr_grid: tuple[float, ...] | None = None
    kind: str = "baseline"
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def _build_learned(path: str, params: list[Tensor], lr: float | None) -> Optimizer:
    kwargs: dict[str, Any] = {} if lr is None else {"lr": lr}
    return from_pretrained(path, params, **kwargs)


def resolve_optimizer(
    spec: str | OptimizerSpec, *, lr_grid: Sequence[float] | None = None, learned_lr: float | None = None
) -> OptimizerSpec:
    """Turn a name into an :class:`OptimizerSpec`.

    A name in :data:`BASELINES` is that baseline, tuned over ``lr_grid`` (default: its own grid);
    anything else is a learned optimizer: a zoo name, a checkpoint folder or a Hub repo id, loaded
    with :func:`learned_optim.from_pretrained` (prefix a folder that shares a baseline's name with
    ``./``). The checkpoint is loaded once here so a bad one fails before any training. A learned
    optimizer runs with ``learned_lr`` if given, else with the lr its checkpoint records (1.0 unless set).
    """
    if isinstance(spec, OptimizerSpec):
        return spec
    baseline = BASELINES.get(str(spec).lower())
    if baseline is not None:
        grid = tuple(float(lr) for lr in (lr_grid if lr_grid is not None else baseline.lr_grid))
        if not grid:
            raise ValueError(f"the learning-rate grid of {baseline.name!r} is empty")
        return OptimizerSpec(
            baseline.name,
            baseline.build,  # type: ignore[arg-type]  # a baseline always has a grid, so build never gets lr=None
            lr_grid=grid,
            kind="baseline",
            info={"source": baseline.name, "description": baseline.description},
        )
    folder = resolve_checkpoint(spec)
    rule, config = load_rule_from_dir(folder)
    label = str(spec) if not Path(spec).is_dir() else (config.get("name") or Path(spec).resolve().name)
    return OptimizerSpec(
        label,
        functools.partial(_build_learned, str(folder)),
        lr=learned_lr,
        kind="learned",
        info={
            "source": str(spec),
            "path": str(folder),
            "family": rule.family,
            "name": config.get("name"),
            "meta_trained": bool(config.get("training")),
        },
    )


@dataclasses.dataclass
class TaskSource:
    """A named way to get the task instance of a seed (a fixed task, or a family sampled per seed)."""

    label: str
    source: Task | TaskFamily

    def instance(self, generator: torch.Generator) -> Task:
        """The task of a seed: the fixed task itself, or a fresh sample of the family."""
        if isinstance(self.source, TaskFamily):
            return self.source.sample(generator)
        return self.source


def resolve_task(task: str | Task | TaskFamily | TaskSource) -> TaskSource:
    """A task name (built with :func:`learned_optim.tasks.make_family`), a family or a task."""
    if isinstance(task, TaskSource):
        return task
    if isinstance(task, (Task, TaskFamily)):
        return TaskSource(getattr(task, "name", type(task).__name__), task)
    if isinstance(task, str):
        try:
            from ..tasks import make_family
        except ImportError as err:
            raise ImportError(
                f"cannot build task {task!r}: learned_optim.tasks.make_family is not "
                f"available ({err}); pass Task or TaskFamily objects instead"
            ) from None
        return TaskSource(task, make_family(task))
    raise TypeError(f"a task must be a name, a Task or a TaskFamily, got {type(task).__name__}")


def seed_stream(seed: int, stream: int) -> torch.Generator:
    """An independent, reproducible random stream ``stream`` of ``seed`` (CPU generator)."""
    return torch.Generator().manual_seed(seed * NUM_STREAMS + stream)


def task_instance(source: TaskSource, seed: int) -> tuple[Task, Params]:
    """The task of ``seed`` and its initial parameters (from the seed's task stream)."""
    generator = seed_stream(seed, TASK_STREAM)
    task = source.instance(generator)
    return task, task.init_params(generator)
