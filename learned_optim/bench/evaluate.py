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
t-distribution over seeds (:func:`~learned_optim.bench.stats.mean_confidence_interval`).
:meth:`EvaluationResults.write` saves
``results.json``, ``summary.csv``, ``curves.csv``, ``summary.md`` (a markdown table for model cards)
and one ``curves_<task>.png`` per task.

Python::

    from learned_optim.bench.evaluate import evaluate
    results = evaluate(["l2o-lstm", "adam", "sgd"], ["digits-mlp20-relu"], steps=1000, seeds=10)
    results.write("eval-out"); print(results.markdown())

Command line (``python -m learned_optim evaluate`` is the same command)::

    python -m learned_optim.bench.evaluate --optimizer l2o-lstm --optimizer path/to/folder \\
        --tasks digits-mlp20-relu,digits-conv --steps 1000 --seeds 10 --out DIR

The harness by job: :mod:`~learned_optim.bench.specs` (what runs: optimizer specs, task sources, seeded
streams), :mod:`~learned_optim.bench.training` (one run; lr tuning), :mod:`~learned_optim.bench.stats`,
:mod:`~learned_optim.bench.results` (summary, tables, files), :mod:`~learned_optim.bench.plots`; this module
runs them all (:func:`evaluate`) and is the ``evaluate`` command.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..hub import CheckpointError
from ..tasks.base import Task, TaskFamily
from .baselines import BASELINES, DEFAULT_LR_GRID, BaselineInfo, register_baseline
from .flatness import FlatnessOptions
from .plots import plot_curves
from .report import check_outputs, write_report
from .results import EvaluationResults
from .specs import OptimizerSpec, TaskSource, resolve_optimizer, resolve_task, task_instance
from .stats import mean_confidence_interval
from .training import TUNE_SEED_OFFSET, RunResult, TuningResult, train_run, tune_lr

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
    "parse_names",
    "build_parser",
    "main",
]


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
    if tune_steps < 1:
        raise ValueError(f"tune_steps must be >= 1, got {tune_steps}")
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
                task, init = task_instance(source, seed)
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


def parse_names(text: str) -> list[str]:
    """``"a, b,"`` -> ``["a", "b"]`` (an argparse type)."""
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
        type=parse_names,
        default=["adam", "sgd"],
        help=f"comma-separated baselines, tuned on the validation split (known: "
        f"{', '.join(BASELINES)}; default adam,sgd; '' for none)",
    )
    parser.add_argument(
        "--tasks",
        type=parse_names,
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
        help="lr of the learned optimizers (default: the checkpoint's: a real learning rate for adafac_mlp, 1e-3 "
        "or 3e-3; a multiplier of the learned step, 1.0, for the older families)",
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
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        check_outputs(args.out, plots=not args.no_plots, record_card=args.record_card)
    except ValueError as err:
        parser.error(str(err))
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
    files = write_report(results, args.out, plots=not args.no_plots, record_card=args.record_card, sections=args.tasks)
    print()
    print(results.markdown())
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m learned_optim.bench.evaluate"))
