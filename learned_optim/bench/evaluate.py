"""Meta-test harness: learned optimizers against learning-rate-tuned baselines on unseen tasks.

For every task and seed, each optimizer starts from the *same* initial parameters and sees the *same*
sequence of training batches; it trains for ``steps`` steps while the harness records the training
loss of every step, the test loss and test metrics (e.g. accuracy) every ``eval_every`` steps, and the
wall time of a step (forward, backward and update; fetching batches and evaluation excluded).

Baselines (``adam``, ``sgd``, and whatever else is in :data:`BASELINES`) get their learning rate tuned
first: each learning rate of a grid (``1e-1 ... 1e-5`` by default, the grid of the generalization
paper) trains on separate tuning seeds and the one with the lowest final *validation* loss is kept; the
grid and the choice are printed and recorded. A learned optimizer runs with the step multiplier its
checkpoint records (``1.0`` unless it says otherwise, or unless ``learned_lr`` is given), untuned.

Optionally (``flatness=FlatnessOptions()``, ``--flatness``), every evaluation run also measures the
flatness of the loss at its point of convergence (see :class:`learned_optim.bench.flatness.FlatnessOptions`):
Hessian trace and top eigenvalue, PGA sharpness and max gradient norm in L-infinity balls.

Final values are reported as mean ± the half-width of a 95% confidence interval from the
t-distribution over seeds (:func:`mean_confidence_interval`). :meth:`EvaluationResults.write` saves
``results.json``, ``summary.csv``, ``curves.csv``, ``summary.md`` (a markdown table for model cards)
and one ``curves_<task>.png`` per task.

Python::

    from learned_optim.bench.evaluate import evaluate
    results = evaluate(["l2o-lstm", "adam", "sgd"], ["digits-mlp20-relu"], steps=1000, seeds=10)
    results.write("eval-out"); print(results.markdown())

Command line (``python -m learned_optim evaluate`` is the same command)::

    python -m learned_optim.bench.evaluate --optimizer l2o-lstm --optimizer path/to/folder \\
        --tasks digits-mlp20-relu,digits-conv --steps 1000 --seeds 10 --out DIR
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import re
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..hub import CheckpointError, from_pretrained, load_rule_from_dir, record_evaluation, resolve_checkpoint
from ..optimizer import NonFiniteGradientError
from ..tasks.base import Params, Task, TaskFamily
from .baselines import BASELINES, DEFAULT_LR_GRID, BaselineInfo, register_baseline
from .flatness import FlatnessOptions, task_flatness

__all__ = [
    "DEFAULT_LR_GRID",
    "BaselineInfo",
    "BASELINES",
    "register_baseline",
    "OptimizerSpec",
    "resolve_optimizer",
    "TaskSource",
    "resolve_task",
    "RunResult",
    "TuningResult",
    "EvaluationResults",
    "evaluate",
    "tune_lr",
    "mean_confidence_interval",
    "plot_curves",
    "train_run",
    "parse_float_list",
    "build_parser",
    "main",
]

#: Tuning runs use seeds ``TUNE_SEED_OFFSET + i`` so the learning rate is never chosen on evaluation seeds.
TUNE_SEED_OFFSET = 1_000_000
#: Random streams derived from one seed (see :func:`_generator`).
_TASK_STREAM, _TRAIN_STREAM, _EVAL_STREAM, _FLATNESS_STREAM, _N_STREAMS = 0, 1, 2, 3, 4


# ------------------------------------------------------------------------------------------ optimizers
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


# ------------------------------------------------------------------------------------------ tasks
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


def _generator(seed: int, stream: int) -> torch.Generator:
    """An independent, reproducible random stream ``stream`` of ``seed`` (CPU generator)."""
    return torch.Generator().manual_seed(seed * _N_STREAMS + stream)


def _instance(source: TaskSource, seed: int) -> tuple[Task, Params]:
    generator = _generator(seed, _TASK_STREAM)
    task = source.instance(generator)
    return task, task.init_params(generator)


# ------------------------------------------------------------------------------------------ one run
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
    train_gen = _generator(seed, _TRAIN_STREAM)
    eval_batch = task.batch(eval_split, _generator(seed, _EVAL_STREAM))
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
        flat = task_flatness(task, point, flatness, _generator(seed, _FLATNESS_STREAM))
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


# ------------------------------------------------------------------------------------------ lr tuning
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
            f"{_count(len(self.seeds), 'seed')}, {_count(self.steps, 'step')}) -> lr = {self.chosen_lr:g}"
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
    instances = [_instance(source, seed) for seed in seeds]
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


# ------------------------------------------------------------------------------------------ statistics
def mean_confidence_interval(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the two-sided t-distribution confidence interval of the mean.

    ``half = t_{(1+confidence)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation.
    Non-finite values are dropped; with no value both are NaN, with one value the half-width is NaN.
    """
    finite = [float(v) for v in values if math.isfinite(float(v))]
    n = len(finite)
    if n == 0:
        return math.nan, math.nan
    mean = sum(finite) / n
    if n == 1:
        return mean, math.nan
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    return mean, _t_quantile((1.0 + confidence) / 2.0, n - 1) * std / math.sqrt(n)


@functools.lru_cache(maxsize=256)
def _t_quantile(q: float, dof: int) -> float:
    """Quantile ``q`` of Student's t-distribution with ``dof`` degrees of freedom (scipy)."""
    from scipy.stats import t as student_t

    return float(student_t.ppf(q, dof))


# ------------------------------------------------------------------------------------------ results
def _json_safe(value: Any) -> Any:
    """NaN/inf become ``null`` (strict JSON); containers are converted recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "task"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _fmt(mean: float, half: float, scale: float = 1.0, digits: int = 4) -> str:
    if not math.isfinite(mean):
        return "n/a"
    text = f"{mean * scale:.{digits}g}"
    return text if not math.isfinite(half) else f"{text} ± {half * scale:.2g}"


@dataclasses.dataclass
class EvaluationResults:
    """Everything one :func:`evaluate` call measured.

    Attributes:
        config: the settings (steps, seeds, grids, optimizers, tasks, command, versions).
        tuning: one :class:`TuningResult` per (tuned optimizer, task).
        runs: one :class:`RunResult` per (task, optimizer, seed).
        summary: one row per (task, optimizer): final values as ``<name>`` (mean) and
            ``<name>_ci95`` (half-width of the 95% t-interval over the seeds that did not diverge).
    """

    config: dict[str, Any]
    tuning: list[TuningResult]
    runs: list[RunResult]
    summary: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.summary:
            self.summary = self._summarize()

    @property
    def metric_names(self) -> list[str]:
        """Evaluation metrics other than the loss, in order of appearance (e.g. ``["accuracy"]``)."""
        names: dict[str, None] = {}
        for run in self.runs:
            names.update({k: None for k in run.evals if k != "loss"})
        return list(names)

    def _summarize(self) -> list[dict[str, Any]]:
        window = int(self.config.get("final_window", 10))
        split = self.config.get("eval_split", "test")
        tuned = {(t.task, t.optimizer) for t in self.tuning}
        groups: dict[tuple[str, str], list[RunResult]] = {}
        for run in self.runs:
            groups.setdefault((run.task, run.optimizer), []).append(run)
        rows = []
        for (task, optimizer), runs in groups.items():
            row: dict[str, Any] = {
                "task": task,
                "optimizer": optimizer,
                "lr": runs[0].lr,
                "lr_tuned": (task, optimizer) in tuned,
                "seeds": len(runs),
                "diverged": sum(r.diverged_at is not None for r in runs),
            }
            columns = {
                "final_train_loss": [r.final_train_loss(window) for r in runs],
                f"{split}_loss": [r.final("loss") for r in runs],
            }
            columns.update({f"{split}_{m}": [r.final(m) for r in runs] for m in self.metric_names})
            columns["time_per_step_ms"] = [1e3 * r.time_per_step for r in runs]
            columns["wall_time_s"] = [r.wall_time for r in runs]
            for name in self.flatness_names:
                columns[name] = [(r.flatness or {}).get(name, math.nan) for r in runs]
            if self.flatness_names:
                columns["converged_at"] = [math.nan if r.converged_at is None else r.converged_at for r in runs]
            for name, values in columns.items():
                row[name], row[f"{name}_ci95"] = mean_confidence_interval(values)
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ text
    def markdown(self) -> str:
        """A markdown table of the summary (mean ± 95% CI over seeds), with a note saying how it was made."""
        split = self.config.get("eval_split", "test")
        metrics = self.metric_names
        header = ["Task", "Optimizer", "lr", "Final train loss", f"{split.capitalize()} loss"]
        header += [f"{split.capitalize()} {m}" + (" (%)" if m == "accuracy" else "") for m in metrics]
        header += ["Time / step (ms)", "Wall time / run (s)", "Diverged"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.summary:
            lr = "default" if row["lr"] is None else f"{row['lr']:g}"
            cells = [
                row["task"],
                row["optimizer"],
                lr + (" (tuned)" if row["lr_tuned"] else ""),
                _fmt(row["final_train_loss"], row["final_train_loss_ci95"]),
                _fmt(row[f"{split}_loss"], row[f"{split}_loss_ci95"]),
            ]
            cells += [
                _fmt(row[f"{split}_{m}"], row[f"{split}_{m}_ci95"], 100.0 if m == "accuracy" else 1.0) for m in metrics
            ]
            cells += [
                _fmt(row["time_per_step_ms"], row["time_per_step_ms_ci95"], digits=3),
                _fmt(row["wall_time_s"], row["wall_time_s_ci95"], digits=3),
                f"{row['diverged']}/{row['seeds']}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        c = self.config
        note = (
            f"Mean ± 95% confidence interval (t-distribution) over {_count(c['seeds'], 'seed')}, "
            f"{_count(c['steps'], 'step')}; final train loss = mean minibatch loss of the last "
            f"{_count(c['final_window'], 'step')}; {split} values after the last step; wall time includes "
            f"the {split} evaluations."
        )
        if self.tuning:  # steps and seeds from the tuning records (merged results mix configs)
            tune_steps = " / ".join(str(n) for n in sorted({t.steps for t in self.tuning}))
            tune_seeds = max(len(t.seeds) for t in self.tuning)
            note += (
                f" Baseline learning rates tuned on the validation split over "
                f"{sorted({lr for t in self.tuning for lr in t.grid}, reverse=True)} "
                f"({tune_steps} steps, {_count(tune_seeds, 'separate seed')})."
            )
        if c.get("command"):
            note += f"\n\nCommand: `{c['command']}`"
        return "\n".join(lines) + "\n\n" + note + "\n" + self._flatness_markdown()

    @property
    def flatness_names(self) -> list[str]:
        """Flatness metrics measured at the point of convergence (empty unless requested)."""
        names: dict[str, None] = {}
        for run in self.runs:
            names.update(dict.fromkeys(run.flatness or {}))
        return list(names)

    def _flatness_markdown(self) -> str:
        names = self.flatness_names
        if not names:
            return ""
        options = self.config.get("flatness") or {}
        header = ["Task", "Optimizer", *names, "Converged at (step)"]
        lines = [
            "",
            "Flatness at the point of convergence",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for row in self.summary:
            cells = [
                row["task"],
                row["optimizer"],
                *(_fmt(row[n], row[f"{n}_ci95"]) for n in names),
                _fmt(row["converged_at"], row["converged_at_ci95"], digits=4),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        note = (
            f"Point of convergence: the first step after which the training loss did not improve for "
            f"{options.get('patience', '?')} steps (the last step for runs that never stalled; those count "
            f"as missing in the last column). Hessian trace ({options.get('probes', '?')} Hutchinson probes) "
            f"and top eigenvalue on {options.get('hessian_batches', '?')} `{options.get('hessian_split', '?')}` "
            f"batches; sharpness@r = max loss increase and max_grad_norm@r = max gradient norm in the "
            f"L-infinity ball of radius r on the `{options.get('pga_split', '?')}` batch, by "
            f"{options.get('steps', '?')} steps of projected gradient ascent "
            f"(step {options.get('step_fraction', '?')} r, "
            f"Gaussian start of std {options.get('init_fraction', '?')} r). Mean ± 95% CI over seeds."
        )
        return "\n".join(lines) + "\n\n" + note + "\n"

    def card_results(self) -> dict[str, Any]:
        """The summary in the compact form a checkpoint's config.json keeps (``training.results``)."""
        split = self.config.get("eval_split", "test")
        keys = ["final_train_loss", f"{split}_loss", *(f"{split}_{m}" for m in self.metric_names)]
        rows = [
            {
                "task": r["task"],
                "optimizer": r["optimizer"],
                "lr": r["lr"],
                "diverged": r["diverged"],
                **{k: [r[k], r[f"{k}_ci95"]] for k in keys},
            }
            for r in self.summary
        ]
        return _json_safe(
            {
                "command": self.config.get("command"),
                "steps": self.config["steps"],
                "seeds": self.config["seeds"],
                "format": "metric: [mean, 95% CI half-width]",
                "summary": rows,
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain, strict-JSON-ready data (NaN and inf become ``null``)."""
        return _json_safe(
            {
                "config": self.config,
                "summary": self.summary,
                "tuning": [dataclasses.asdict(t) for t in self.tuning],
                "runs": [dataclasses.asdict(r) for r in self.runs],
            }
        )

    # ------------------------------------------------------------------ files
    def write(self, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
        """Write results.json, summary.csv, curves.csv, summary.md and (``plots``) curves_<task>.png."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {
            "json": out / "results.json",
            "summary_csv": out / "summary.csv",
            "curves_csv": out / "curves.csv",
            "markdown": out / "summary.md",
        }
        files["json"].write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        self._write_summary_csv(files["summary_csv"])
        self._write_curves_csv(files["curves_csv"])
        files["markdown"].write_text(self.markdown())
        if plots:
            for task, path in plot_curves(self, out).items():
                files[f"plot:{task}"] = path
        return files

    def _write_summary_csv(self, path: Path) -> None:
        fields = list(dict.fromkeys(k for row in self.summary for k in row))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(
                {k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
                for row in self.summary
            )

    def _write_curves_csv(self, path: Path) -> None:
        split = self.config.get("eval_split", "test")
        names = ["loss", *self.metric_names]
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["task", "optimizer", "seed", "lr", "step", "train_loss", *(f"{split}_{n}" for n in names)])
            for run in self.runs:
                at = {s: i for i, s in enumerate(run.eval_steps)}
                for step in range(len(run.train_loss) + 1):
                    train = run.train_loss[step] if step < len(run.train_loss) else math.nan
                    i = at.get(step)
                    evals = [run.evals.get(n, [])[i] if i is not None and n in run.evals else math.nan for n in names]
                    writer.writerow(
                        [
                            run.task,
                            run.optimizer,
                            run.seed,
                            run.lr,
                            step,
                            *("" if not math.isfinite(v) else repr(v) for v in (train, *evals)),
                        ]
                    )


def _band(curves: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Pointwise mean and 95% t-interval over runs (non-finite values dropped)."""
    mean, low, high = [], [], []
    for values in zip(*curves, strict=True):
        m, h = mean_confidence_interval(values)
        h = 0.0 if not math.isfinite(h) else h
        mean.append(m)
        low.append(m - h)
        high.append(m + h)
    return mean, low, high


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (over finite values) for plotting noisy minibatch losses."""
    out = []
    for i in range(len(values)):
        tail = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(sum(tail) / len(tail) if tail else math.nan)
    return out


def plot_curves(results: EvaluationResults, out_dir: str | Path) -> dict[str, Path]:
    """One PNG per task: the training loss and each test metric against steps, with 95% bands over seeds.

    The minibatch training loss is smoothed by a trailing moving average over ``steps // 50`` steps and,
    when positive, drawn on a log scale as the geometric mean over seeds (the band is the 95% t-interval
    of the mean log-loss); test metrics are arithmetic means with their 95% t-interval. Uses
    matplotlib's Agg canvas directly, so no global backend is changed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    split = results.config.get("eval_split", "test")
    names = ["loss", *results.metric_names]
    paths = {}
    for task in dict.fromkeys(r.task for r in results.runs):
        runs = [r for r in results.runs if r.task == task]
        fig = Figure(figsize=(5.0 * (1 + len(names)), 4.0), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 1 + len(names), squeeze=False)[0]
        steps = max(len(r.train_loss) for r in runs)
        window = max(1, steps // 50)
        log_scale = all(v > 0 for r in runs for v in r.train_loss if math.isfinite(v))
        for optimizer in dict.fromkeys(r.optimizer for r in runs):
            mine = [r for r in runs if r.optimizer == optimizer]
            label = f"{optimizer} (lr {mine[0].lr:g})" if mine[0].lr is not None else optimizer
            smoothed = [_smooth(r.train_loss, window) for r in mine]
            if log_scale:  # geometric mean and a multiplicative band: the mean of log-losses and its 95% CI
                logs = _band([[math.log(v) for v in curve] for curve in smoothed])
                mean, low, high = ([math.exp(v) for v in c] for c in logs)
            else:
                mean, low, high = _band(smoothed)
            (line,) = axes[0].plot(range(len(mean)), mean, label=label)
            axes[0].fill_between(range(len(mean)), low, high, color=line.get_color(), alpha=0.2)
            for ax, name in zip(axes[1:], names, strict=True):
                mean, low, high = _band([r.evals.get(name, []) for r in mine])
                ax.plot(mine[0].eval_steps, mean, marker=".", color=line.get_color(), label=label)
                ax.fill_between(mine[0].eval_steps, low, high, color=line.get_color(), alpha=0.2)
        average = "geometric mean" if log_scale else "mean"
        axes[0].set(
            title=f"{task}: training loss",
            xlabel="step",
            yscale="log" if log_scale else "linear",
            ylabel=f"minibatch loss ({average}, moving avg {window})",
        )
        for ax, name in zip(axes[1:], names, strict=True):
            ax.set(title=f"{task}: {split} {name}", xlabel="step", ylabel=f"{split} {name}")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize="small")
        path = Path(out_dir) / f"curves_{_slug(task)}.png"
        fig.savefig(path, dpi=100)
        paths[task] = path
    return paths


# ------------------------------------------------------------------------------------------ evaluate
def evaluate(
    optimizers: Sequence[str | OptimizerSpec],
    tasks: Sequence[str | Task | TaskFamily | TaskSource],
    steps: int,
    seeds: int | Sequence[int],
    *,
    lr_grid: Sequence[float] | None = None,
    tune_steps: int | None = None,
    tune_seeds: int = 1,
    eval_every: int | None = None,
    eval_split: str = "test",
    learned_lr: float | None = None,
    final_window: int = 10,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
    flatness: FlatnessOptions | bool | None = None,
) -> EvaluationResults:
    """Run every optimizer on every task for ``steps`` steps and ``seeds`` seeds.

    Args:
        optimizers: baseline names (:data:`BASELINES`), zoo names, checkpoint folders, Hub repo ids
            or :class:`OptimizerSpec` objects.
        tasks: task family names for :func:`learned_optim.tasks.make_family`, ``TaskFamily``
            objects (a task sampled per seed) or ``Task`` objects.
        steps: training steps per run.
        seeds: number of seeds (``0 .. seeds-1``) or the explicit seeds. Within a seed every optimizer
            starts from the same parameters and sees the same batches.
        lr_grid: grid for every baseline (default: each baseline's own, :data:`DEFAULT_LR_GRID`).
        tune_steps: steps of each tuning run (default ``steps``).
        tune_seeds: tuning seeds per (baseline, task), taken from ``TUNE_SEED_OFFSET`` on.
        eval_every: steps between evaluations (default ``steps // 20``).
        eval_split: split of the reported evaluation (``"test"``; tuning always uses ``"val"``).
        learned_lr: step multiplier of learned optimizers (default: the checkpoint's, i.e. 1.0).
        final_window: the final training loss is the mean minibatch loss of this many last steps.
        progress: show a tqdm progress bar (stderr).
        log: where the tuning lines go (default: ``tqdm.write`` to stdout).
        command: the command line to quote in the markdown note.
        flatness: measure flatness at each evaluation run's point of convergence
            (:class:`~learned_optim.bench.flatness.FlatnessOptions`; ``True`` for the defaults).
    """
    from tqdm.auto import tqdm

    if flatness is True:
        flatness = FlatnessOptions()
    elif flatness is False:
        flatness = None

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise ValueError("at least one seed is needed")
    if not optimizers or not tasks:
        raise ValueError("at least one optimizer and one task are needed")
    if tune_seeds < 1:
        raise ValueError(f"tune_seeds must be >= 1, got {tune_seeds}")
    if isinstance(optimizers, (str, OptimizerSpec)):
        optimizers = [optimizers]
    if isinstance(tasks, (str, Task, TaskFamily, TaskSource)):
        tasks = [tasks]
    specs = [resolve_optimizer(o, lr_grid=lr_grid, learned_lr=learned_lr) for o in optimizers]
    for spec in specs:  # e.g. a zoo entry and a folder holding a checkpoint of the same name
        if spec.kind == "learned" and [s.label for s in specs].count(spec.label) > 1:
            spec.label = spec.info["source"]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"optimizer labels must be unique, got {labels}")
    sources = [resolve_task(t) for t in tasks]
    tune_steps = steps if tune_steps is None else tune_steps
    eval_every = max(1, steps // 20) if eval_every is None else eval_every
    tune_seed_list = [TUNE_SEED_OFFSET + i for i in range(tune_seeds)]
    tuned_specs = [s for s in specs if s.lr_grid]
    total = len(sources) * (
        sum(len(s.lr_grid or ()) for s in tuned_specs) * tune_seeds * tune_steps + len(specs) * len(seed_list) * steps
    )
    config = {
        "steps": steps,
        "seeds": len(seed_list),
        "seed_list": seed_list,
        "tasks": [s.label for s in sources],
        "optimizers": [{"label": s.label, "kind": s.kind, "lr": s.lr, "lr_grid": s.lr_grid, **s.info} for s in specs],
        "tune_steps": tune_steps,
        "tune_seeds": tune_seeds,
        "tune_seed_list": tune_seed_list,
        "tune_split": "val",
        "eval_split": eval_split,
        "eval_every": eval_every,
        "final_window": final_window,
        "confidence": 0.95,
        "command": command,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "flatness": dataclasses.asdict(flatness) if flatness is not None else None,
    }
    tuning: list[TuningResult] = []
    runs: list[RunResult] = []
    with tqdm(total=total, disable=not progress, unit="step", dynamic_ncols=True, mininterval=0.5) as bar:
        say = log or bar.write
        tick = lambda: bar.update(1)  # noqa: E731
        for source in sources:
            lrs: dict[str, float | None] = {}
            for spec in specs:
                if spec.lr_grid:
                    bar.set_description(f"{source.label} | tuning {spec.label}")
                    result = tune_lr(spec, source, steps=tune_steps, seeds=tune_seed_list, on_step=tick)
                    tuning.append(result)
                    say(result.describe())
                    lrs[spec.label] = result.chosen_lr
                else:
                    lrs[spec.label] = spec.lr
            for seed in seed_list:
                task, init = _instance(source, seed)
                for spec in specs:
                    bar.set_description(f"{source.label} | {spec.label} | seed {seed}")
                    runs.append(
                        train_run(
                            task,
                            init,
                            spec,
                            lrs[spec.label],
                            steps=steps,
                            seed=seed,
                            task_label=source.label,
                            eval_split=eval_split,
                            eval_every=eval_every,
                            on_step=tick,
                            flatness=flatness,
                        )
                    )
    return EvaluationResults(config, tuning, runs)


# ------------------------------------------------------------------------------------------ CLI
def parse_float_list(text: str) -> list[float]:
    """``"1e-1,1e-2"`` -> ``[0.1, 0.01]`` (an argparse type)."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser(prog: str = "python -m learned_optim evaluate") -> argparse.ArgumentParser:
    """The argument parser of the ``evaluate`` command."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Evaluate learned optimizers against learning-rate-tuned baselines on unseen tasks: "
        "curves, final values with 95% confidence intervals, JSON/CSV/PNG/markdown outputs.",
    )
    parser.add_argument(
        "--optimizer",
        action="append",
        default=[],
        metavar="NAME_OR_DIR",
        help="learned optimizer: zoo name, checkpoint folder or Hub repo id (repeatable)",
    )
    parser.add_argument(
        "--baselines",
        type=_names,
        default=["adam", "sgd"],
        help=f"comma-separated baselines, tuned on the validation split (known: "
        f"{', '.join(BASELINES)}; default adam,sgd; '' for none)",
    )
    parser.add_argument(
        "--tasks",
        type=_names,
        required=True,
        help="comma-separated task family names, e.g. digits-mlp20-relu,digits-conv "
        "(all: learned_optim.tasks.TASK_FAMILIES)",
    )
    parser.add_argument("--steps", type=int, default=1000, help="training steps per run (default 1000)")
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (default 10)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--lr-grid",
        type=parse_float_list,
        default=None,
        help=f"baseline learning-rate grid (default {','.join(f'{v:g}' for v in DEFAULT_LR_GRID)})",
    )
    parser.add_argument("--tune-steps", type=int, default=None, help="steps per tuning run (default: --steps)")
    parser.add_argument("--tune-seeds", type=int, default=1, help="seeds per tuning run (default 1)")
    parser.add_argument(
        "--eval-every", type=int, default=None, help="steps between test evaluations (default steps/20)"
    )
    parser.add_argument(
        "--learned-lr",
        type=float,
        default=None,
        help="step multiplier of the learned optimizers (default: the checkpoint's, 1.0)",
    )
    parser.add_argument("--final-window", type=int, default=10, help="final train loss = mean of the last N steps")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's). 1 is much faster for small models "
        "when the CPU cores are shared with other work",
    )
    parser.add_argument(
        "--flatness",
        action="store_true",
        help="also measure flatness (Hessian trace/top eigenvalue, PGA sharpness, max gradient norm) "
        "at each run's point of convergence (learned_optim.bench.flatness.FlatnessOptions)",
    )
    parser.add_argument(
        "--flatness-patience",
        type=int,
        default=100,
        help="point of convergence: the training loss has not improved for this many steps (default 100)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--record-card",
        metavar="CHECKPOINT_DIR",
        action="append",
        default=[],
        help="also write the table into that checkpoint's model card (section 'Evaluation: "
        "<tasks>') and the summary into its config.json training.results (repeatable)",
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m learned_optim evaluate") -> int:
    """The ``evaluate`` command: run, print the tuning choices and the markdown table, write the files."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    optimizers = [*args.optimizer, *args.baselines]
    if not optimizers:
        parser.error("nothing to evaluate: give --optimizer and/or --baselines")
    unknown = [b for b in args.baselines if b.lower() not in BASELINES]
    if unknown:
        parser.error(f"unknown baseline(s) {unknown}; known: {sorted(BASELINES)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        results = evaluate(
            optimizers,
            args.tasks,
            args.steps,
            args.seeds,
            lr_grid=args.lr_grid,
            tune_steps=args.tune_steps,
            tune_seeds=args.tune_seeds,
            eval_every=args.eval_every,
            learned_lr=args.learned_lr,
            final_window=args.final_window,
            progress=not args.no_progress,
            command=f"{prog} {shlex.join(argv)}",
            flatness=FlatnessOptions(patience=args.flatness_patience) if args.flatness else None,
        )
    except (CheckpointError, ValueError, ImportError, KeyError) as err:  # KeyError: unknown task name
        print(f"{prog}: error: {err.args[0] if isinstance(err, KeyError) else err}", file=sys.stderr)
        return 2
    files = results.write(args.out, plots=not args.no_plots)
    for checkpoint in args.record_card:
        record_evaluation(checkpoint, args.tasks, results.markdown(), results.card_results())
        files[f"card:{checkpoint}"] = Path(checkpoint) / "README.md"
    print()
    print(results.markdown())
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m learned_optim.bench.evaluate"))
