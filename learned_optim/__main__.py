"""Command line of learned_optim.

``python -m learned_optim demo``
    The README's main job: on the embedded scikit-learn digits, train a fresh model with a pretrained
    zoo optimizer and with Adam (its learning rate tuned on a small validation grid), print a comparison
    table and save a plot and the results (JSON, CSV, markdown). A few minutes on two CPU cores.

``python -m learned_optim evaluate ...``
    The meta-test harness of :mod:`learned_optim.evaluate` (``--help`` for its options).

``python -m learned_optim bench ...``
    The benchmark suite of unseen, realistic tasks, :mod:`learned_optim.bench` (``--help`` for its options).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import hub

__all__ = [
    "main",
    "demo_main",
    "build_demo_parser",
    "DEMO_TASK",
    "NoPretrainedOptimizerError",
    "default_optimizer",
    "DEMO_OPTIMIZER",
]

#: Task family of the demo: an unseen optimizee for optimizers meta-trained on the sigmoid MLP.
DEMO_TASK = "digits-mlp20-relu"
#: Adam's learning-rate grid in the demo (a small version of the evaluation grid).
DEMO_LR_GRID = (1e-1, 1e-2, 1e-3, 1e-4)

_USAGE = """usage: python -m learned_optim {demo,evaluate,bench} [options]

commands:
  demo        train a fresh digits model with a pretrained learned optimizer and with tuned Adam,
              print a comparison table, save a plot and JSON
  evaluate    evaluate optimizers against learning-rate-tuned baselines on unseen tasks
  bench       the benchmark suite: unseen realistic tasks against tuned AdamW, Adam and SGD

'python -m learned_optim COMMAND --help' describes a command's options.
"""


class NoPretrainedOptimizerError(RuntimeError):
    """The demo was asked for the default zoo optimizer but the zoo holds none."""


def _no_zoo_message() -> str:
    return (
        "no pretrained optimizer is bundled with this installation of learned_optim: the zoo folder "
        f"{hub.zoo_dir()} holds no checkpoint (learned_optim.list_pretrained() is empty), and the demo never "
        "substitutes an untrained net.\n"
        "Pass a checkpoint folder (config.json + model.safetensors, as written by save_pretrained or by a "
        "meta-training run) or a Hugging Face Hub repo id:\n"
        "    python -m learned_optim demo --optimizer DIR"
    )


#: The zoo entry the demo prefers: the one with the best measured results on the demo task (see its card).
DEMO_OPTIMIZER = "rnnprop-tbv"


def default_optimizer() -> str:
    """The demo's optimizer when none is given: :data:`DEMO_OPTIMIZER` if bundled, else the first zoo entry."""
    names = [entry["name"] for entry in hub.list_pretrained()]
    if not names:
        raise NoPretrainedOptimizerError(_no_zoo_message())
    return DEMO_OPTIMIZER if DEMO_OPTIMIZER in names else names[0]


def build_demo_parser() -> argparse.ArgumentParser:
    """Options of ``demo``; ``--steps``, ``--seeds``, ``--tune-steps`` and ``--lr-grid`` are hidden (for tests)."""
    from .evaluate import parse_float_list

    parser = argparse.ArgumentParser(
        prog="python -m learned_optim demo",
        description="Train a fresh model on the embedded digits with a pretrained learned optimizer and with "
        "Adam tuned on a validation grid; print a comparison table, save a plot and JSON.",
    )
    parser.add_argument(
        "--optimizer",
        default=None,
        metavar="NAME_OR_DIR",
        help=f"zoo name, checkpoint folder or Hub repo id (default: {DEMO_OPTIMIZER})",
    )
    parser.add_argument("--task", default=DEMO_TASK, help=f"task family to train (default {DEMO_TASK})")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("learned_optim_demo"),
        help="folder for the plot, JSON, CSV and markdown (default ./learned_optim_demo)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the demo's models are tiny, and more threads only "
        "add synchronisation, which is very slow when the cores are shared)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--steps", type=int, default=1000, help=argparse.SUPPRESS)
    parser.add_argument("--seeds", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--tune-steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lr-grid", type=parse_float_list, default=list(DEMO_LR_GRID), help=argparse.SUPPRESS)
    return parser


def demo_main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status (2 with a message on stderr when no optimizer is available)."""
    from .evaluate import evaluate, resolve_optimizer

    argv = list(sys.argv[2:] if argv is None else argv)
    args = build_demo_parser().parse_args(argv)
    try:
        name = args.optimizer or default_optimizer()
        learned = resolve_optimizer(name)
    except (NoPretrainedOptimizerError, hub.CheckpointError) as err:
        print(f"python -m learned_optim demo: error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(f"Learned optimizer: {learned.label} ({learned.info['family']}, {learned.info['path']})")
    if not learned.info["meta_trained"]:
        print(
            f"NOTE: {learned.label} records no meta-training in its config.json; if its weights are untrained, "
            "the comparison below says nothing about learned optimizers."
        )
    tune_steps = args.tune_steps or args.steps
    print(
        f"Task: {args.task}, {args.steps} steps, {args.seeds} seeds; Adam's lr tuned on the validation split "
        f"over {[float(v) for v in args.lr_grid]} ({tune_steps} steps each)."
    )
    results = evaluate(
        [learned, "adam"],
        [args.task],
        args.steps,
        args.seeds,
        lr_grid=args.lr_grid,
        tune_steps=tune_steps,
        progress=not args.no_progress,
        command="python -m learned_optim demo " + shlex.join(argv),
    )
    files = results.write(args.out)
    print()
    print(results.markdown())
    for tuning in results.tuning:
        print(
            f"{tuning.optimizer}'s learning-rate search took {tuning.wall_time:.1f} s more; "
            f"the learned optimizer ran untuned."
        )
    plots = [str(p) for k, p in files.items() if k.startswith("plot:")]
    print(
        f"Plot: {', '.join(plots)}\nResults: {files['json']} (also {files['summary_csv'].name}, "
        f"{files['curves_csv'].name}, {files['markdown'].name})"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``demo``, ``evaluate`` and ``bench``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "demo":
            return demo_main(rest)
        if command == "evaluate":
            from .evaluate import main as evaluate_main

            return evaluate_main(rest, prog="python -m learned_optim evaluate")
        if command == "bench":
            from .bench.cli import main as bench_main

            return bench_main(rest)
    except ImportError as e:  # an optional dependency of the command is missing: one line, no traceback
        print(f"python -m learned_optim {command}: {e}", file=sys.stderr)
        return 2
    print(f"python -m learned_optim: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
