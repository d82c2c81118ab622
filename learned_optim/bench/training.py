"""One training run of the evaluation harness, and the learning-rate tuning built on it.

:func:`train_run` trains one optimizer on the task of one seed and records every step's training loss,
the metrics of a fixed evaluation batch along the way and the time of a step; :func:`tune_lr` picks a
baseline's lr on the validation split, on seeds of their own (from :data:`TUNE_SEED_OFFSET`).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..optimizer import NonFiniteGradientError
from ..tasks.base import Params, Task
from .flatness import FlatnessOptions, task_flatness
from .report import plural
from .specs import EVAL_STREAM, FLATNESS_STREAM, TRAIN_STREAM, OptimizerSpec, TaskSource, seed_stream, task_instance

__all__ = ["RunResult", "train_run", "TuningResult", "tune_lr", "TUNE_SEED_OFFSET"]

#: Tuning runs use seeds ``TUNE_SEED_OFFSET + i`` so the learning rate is never chosen on evaluation seeds.
TUNE_SEED_OFFSET = 1_000_000


@dataclasses.dataclass
class RunResult:
    """One training run: an optimizer with one learning rate on the task of one seed.

    ``train_loss[t]`` is the training (minibatch) loss at step ``t`` before the ``t+1``-th update;
    ``evals[name][i]`` is metric ``name`` (``"loss"``, ``"accuracy"``, ...) on ``eval_split`` after
    ``eval_steps[i]`` updates. After a divergence (see :func:`train_run`) the run stops: the remaining
    entries are NaN and ``diverged_at`` is the first step whose loss or parameters are bad.
    ``flatness`` holds the flatness metrics at the point of convergence when they were requested
    (``converged_at``: the step it was reached, ``None`` if the run never stalled and was measured at
    its end).
    """

    task: str
    optimizer: str
    seed: int
    lr: float | None
    eval_split: str
    train_loss: list[float]
    eval_steps: list[int]
    evals: dict[str, list[float]]
    time_per_step: float
    wall_time: float
    diverged_at: int | None = None
    flatness: dict[str, float] | None = None
    converged_at: int | None = None

    def final_train_loss(self, window: int) -> float:
        """Mean training loss over the last ``window`` steps (NaN for a diverged run)."""
        if self.diverged_at is not None or not self.train_loss:
            return math.nan
        tail = self.train_loss[-max(1, window) :]
        return sum(tail) / len(tail)

    def final(self, name: str) -> float:
        """Metric ``name`` at the last evaluation (NaN for a diverged run)."""
        values = self.evals.get(name) or [math.nan]
        return math.nan if self.diverged_at is not None else values[-1]


def _as_float(value: Any) -> float:
    return float(value.item() if isinstance(value, Tensor) else value)


def _measure(task: Task, params: Params, batch: Any) -> dict[str, float]:
    with torch.no_grad():
        values = {"loss": _as_float(task.loss(params, batch))}  # the task's loss is authoritative
        values.update({k: _as_float(v) for k, v in task.metrics(params, batch).items() if k != "loss"})
    return values


def _out_of_bound(params: Params, bound: float | None) -> bool:
    """Whether the global L2 norm of ``params`` exceeds the task's divergence bound (if it sets one)."""
    if bound is None:
        return False
    with torch.no_grad():
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.float()) for p in params.values()]))
    return not bool(norm <= bound)


def train_run(
    task: Task,
    init: Params,
    spec: OptimizerSpec,
    lr: float | None,
    *,
    steps: int,
    seed: int,
    task_label: str,
    eval_split: str = "test",
    eval_every: int | None = None,
    on_step: Callable[[], object] | None = None,
    flatness: FlatnessOptions | None = None,
) -> RunResult:
    """Train a copy of ``init`` (made into leaf tensors) on ``task`` with ``spec`` for ``steps`` steps.

    Training batches come from the seed's training stream, so every optimizer sees the same ones;
    evaluation uses one fixed ``eval_split`` batch of the seed, measured at step 0, every
    ``eval_every`` steps (``None``: only at the end) and after the last step. A non-finite loss or
    gradient, or parameters whose global L2 norm exceeds the task's ``divergence_bound`` (when it
    sets one), ends the run as diverged. With ``flatness``, the parameters at the point of convergence
    (the first step after which the training loss has not improved for ``flatness.patience`` steps;
    the last step if that never happens) are measured after the run (not counted in its times).
    """
    params = {k: v.detach().clone().requires_grad_(True) for k, v in init.items()}
    optimizer = spec.build(list(params.values()), lr)
    actual_lr = optimizer.param_groups[0]["lr"]
    train_gen = seed_stream(seed, TRAIN_STREAM)
    eval_batch = task.batch(eval_split, seed_stream(seed, EVAL_STREAM))
    every = eval_every if eval_every else steps
    eval_steps = sorted({*range(0, steps, max(1, every)), steps})
    evals: dict[str, list[float]] = {}
    losses: list[float] = []
    elapsed, taken, diverged_at = 0.0, 0, None
    bound = getattr(task, "divergence_bound", None)
    best_loss, stalled, converged_at, converged_params = math.inf, 0, None, None

    def record(step: int) -> bool:
        values = _measure(task, params, eval_batch)
        for name, value in values.items():
            evals.setdefault(name, []).append(value)
        return math.isfinite(values["loss"])

    start = time.perf_counter()
    for step in range(steps):
        if step in eval_steps:
            record(step)
        batch = task.batch("train", train_gen)
        first: list[Tensor] = []  # the loss of the first closure call (SAM-like optimizers call it twice)

        def closure(batch: Any = batch, first: list[Tensor] = first) -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(params, batch)
            loss.backward()
            first.append(loss.detach())
            return loss

        tick = time.perf_counter()
        try:
            optimizer.step(closure)  # type: ignore[arg-type]  # torch annotates closures as returning float
            loss = _as_float(first[0])
        except NonFiniteGradientError:
            loss = math.nan
        elapsed += time.perf_counter() - tick
        taken += 1
        if on_step is not None:
            on_step()
        if not math.isfinite(loss):
            diverged_at = step
            break
        losses.append(loss)
        if _out_of_bound(params, bound):
            diverged_at = step + 1
            break
        if flatness is not None and converged_at is None:
            best_loss, stalled = (loss, 0) if loss < best_loss else (best_loss, stalled + 1)
            if stalled >= flatness.patience:
                converged_at, converged_params = step + 1, {k: v.detach().clone() for k, v in params.items()}
    if diverged_at is None and not record(steps):
        diverged_at = steps  # the last update produced non-finite parameters
    wall = time.perf_counter() - start
    losses += [math.nan] * (steps - len(losses))
    for values in evals.values():
        values += [math.nan] * (len(eval_steps) - len(values))
    flat = None
    if flatness is not None and diverged_at is None:
        point = converged_params if converged_params is not None else params
        flat = task_flatness(task, point, flatness, seed_stream(seed, FLATNESS_STREAM))
    return RunResult(
        task_label,
        spec.label,
        seed,
        None if actual_lr is None else _as_float(actual_lr),
        eval_split,
        losses,
        eval_steps,
        evals,
        elapsed / max(1, taken),
        wall,
        diverged_at,
        flat,
        converged_at if diverged_at is None else None,
    )


@dataclasses.dataclass
class TuningResult:
    """The validation-grid search of one optimizer on one task: mean final validation loss per lr."""

    task: str
    optimizer: str
    grid: list[float]
    val_loss: list[float]
    chosen_lr: float
    seeds: list[int]
    steps: int
    wall_time: float

    def describe(self) -> str:
        """One line: the grid, each lr's validation loss and the choice."""
        tried = ", ".join(f"{lr:g}: {loss:.4g}" for lr, loss in zip(self.grid, self.val_loss, strict=True))
        return (
            f"[tune] {self.optimizer} on {self.task}: grid {{{tried}}} (final validation loss, mean of "
            f"{plural(len(self.seeds), 'seed')}, {plural(self.steps, 'step')}) -> lr = {self.chosen_lr:g}"
        )


def tune_lr(
    spec: OptimizerSpec,
    source: TaskSource,
    *,
    steps: int,
    seeds: Sequence[int],
    on_step: Callable[[], object] | None = None,
) -> TuningResult:
    """Pick the lr of ``spec.lr_grid`` with the lowest mean final *validation* loss over ``seeds``.

    A diverged run counts as an infinite loss; ties go to the earlier grid entry. If every lr diverges
    the smallest lr is chosen with a warning.
    """
    if not spec.lr_grid:
        raise ValueError(f"{spec.label} has no learning-rate grid to tune over")
    start = time.perf_counter()
    instances = [task_instance(source, seed) for seed in seeds]
    val_loss = []
    for lr in spec.lr_grid:
        finals = [
            train_run(
                task, init, spec, lr, steps=steps, seed=seed, task_label=source.label, eval_split="val", on_step=on_step
            ).final("loss")
            for seed, (task, init) in zip(seeds, instances, strict=True)
        ]
        val_loss.append(sum(finals) / len(finals) if all(math.isfinite(v) for v in finals) else math.inf)
    if all(not math.isfinite(v) for v in val_loss):
        chosen = min(spec.lr_grid)
        warnings.warn(
            f"{spec.label} diverged on {source.label} with every lr of {list(spec.lr_grid)}; "
            f"using the smallest, {chosen:g}",
            RuntimeWarning,
            stacklevel=2,
        )
    else:
        chosen = spec.lr_grid[min(range(len(val_loss)), key=lambda i: (val_loss[i], i))]
    return TuningResult(
        source.label, spec.label, list(spec.lr_grid), val_loss, chosen, list(seeds), steps, time.perf_counter() - start
    )
