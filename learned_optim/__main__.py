"""Command line of learned_optim.

``python -m learned_optim demo``
    The README's main job: on a task of the benchmark suite that no zoo entry was meta-trained or selected on
    (:data:`DEMO_TASK`), train fresh models with the flagship learned optimizer (its default lr and schedule, and
    AdamW's tuned ones) and with AdamW tuned on the validation split; print the comparison and save plots and the
    results (JSON, CSV, markdown). A few minutes on two CPU cores.

``python -m learned_optim evaluate ...``
    The meta-test harness of :mod:`learned_optim.bench.evaluate` (``--help`` for its options).

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
]

#: The demo's task: one of the benchmark suite's (:mod:`learned_optim.bench.tasks`), none of which any zoo
#: entry was meta-trained or selected on.
DEMO_TASK = "shapes-cnn"
#: How the demo sets the learned optimizer's lr: its checkpoint's default lr and schedule (no tuning at
#: all), and AdamW's tuned lr, weight decay and schedule (a user who swaps the class).
DEMO_LR_RULES = ("default", "adamw")

_USAGE = """usage: python -m learned_optim {demo,evaluate,bench} [options]

commands:
  demo        train a model of the benchmark suite with the best pretrained learned optimizer and
              with tuned AdamW, print a comparison table, save plots and JSON
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


def default_optimizer() -> str:
    """The demo's optimizer when none is given: the flagship (:data:`learned_optim.hub.FLAGSHIP`, whatever it does
    on the demo task) if bundled, else the first zoo entry."""
    names = [entry["name"] for entry in hub.list_pretrained()]
    if not names:
        raise NoPretrainedOptimizerError(_no_zoo_message())
    return hub.FLAGSHIP if hub.FLAGSHIP in names else names[0]


def build_demo_parser() -> argparse.ArgumentParser:
    """Options of ``demo``; ``--steps`` is hidden (for tests)."""
    parser = argparse.ArgumentParser(
        prog="python -m learned_optim demo",
        description="Train a model of the benchmark suite (a task no zoo entry was meta-trained on) with a "
        "pretrained learned optimizer and with AdamW tuned on the validation split (lr x weight decay, cosine "
        "schedule with warm-up); print the comparison, save plots and JSON.",
    )
    parser.add_argument(
        "--optimizer",
        default=None,
        metavar="NAME_OR_DIR",
        help=f"zoo name, checkpoint folder or Hub repo id (default: {hub.FLAGSHIP})",
    )
    parser.add_argument("--task", default=DEMO_TASK, help=f"a task of the benchmark suite (default {DEMO_TASK})")
    parser.add_argument("--seeds", type=int, default=3, help="evaluation seeds (default 3)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("learned_optim_demo"),
        help="folder for the plots, JSON, CSV, markdown and the run store (default ./learned_optim_demo)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the suite's models are small, and more threads only "
        "add synchronisation, which is very slow when the cores are shared)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def demo_main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status (2 with a message on stderr when no optimizer is available)."""
    from .bench.cli import print_report
    from .bench.data import DataRootError
    from .bench.report import check_outputs
    from .bench.run import UnknownOptimizerError, learned_optimizer
    from .bench.suite import run_suite
    from .bench.tasks import UnknownTaskError

    argv = list(sys.argv[2:] if argv is None else argv)
    args = build_demo_parser().parse_args(argv)
    prog = "python -m learned_optim demo"
    try:
        name = args.optimizer or default_optimizer()
        learned = learned_optimizer(name)
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        check_outputs(args.out, plots=not args.no_plots)
        torch.set_num_threads(args.threads)
        assert learned.path is not None
        config = hub.read_config(learned.path)
        print(f"Learned optimizer: {learned.name} ({config.get('family')}, {learned.path})")
        if not hub.records_meta_training(config):
            print(
                f"NOTE: {learned.name} records no meta-training in its config.json; if its weights are untrained, "
                "the comparison below says nothing about learned optimizers."
            )
        print(
            f"Task: {args.task} (benchmark suite), {args.seeds} seeds; AdamW tuned on the validation split; "
            f"{learned.name} with its default lr and schedule (no tuning) and with AdamW's tuned ones."
        )
        results = run_suite(
            [name],
            out=args.out,
            tasks=[args.task],
            baselines=("adamw",),
            lr_rules=DEMO_LR_RULES,
            seeds=args.seeds,
            steps=args.steps,
            progress=not args.no_progress,
            command=f"{prog} {shlex.join(argv)}".strip(),
        )
    except (NoPretrainedOptimizerError, UnknownOptimizerError, UnknownTaskError, DataRootError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    print_report(results, results.write(args.out, plots=not args.no_plots))
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
            from .bench.evaluate import main as evaluate_main

            return evaluate_main(rest, prog="python -m learned_optim evaluate")
        if command == "bench":
            from .bench.cli import main as bench_main

            return bench_main(rest)
    except ImportError as e:  # an optional dependency of the command is missing: one line, no traceback
        print(f"python -m learned_optim {command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        stored = (  # (the suite stores each run as it finishes)
            "; the runs that finished are stored under --out and the same command reuses them"
            if command in ("bench", "demo")
            else ""
        )
        print(f"\npython -m learned_optim {command}: interrupted{stored}", file=sys.stderr)
        return 130
    print(f"python -m learned_optim: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
