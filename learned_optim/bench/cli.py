"""``python -m learned_optim bench``: the benchmark suite from the command line (``--help``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..hub import CheckpointError
from .data import DataRootError
from .evaluate import parse_names
from .report import check_outputs, write_report
from .run import LR_RULES, UnknownOptimizerError
from .suite import BASELINE_NAMES, DEFAULT_BASELINES, SuiteResults, card_key, run_suite
from .tasks import QUICK, TASKS, UnknownTaskError, tasks_markdown

__all__ = ["build_parser", "main", "print_report"]

PROG = "python -m learned_optim bench"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The argument parser of the ``bench`` command."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="The benchmark suite of unseen, realistic tasks: learned optimizers against AdamW (cosine "
        "schedule, tuned lr x weight decay), Adam and SGD with momentum, tuned on validation; per-task tables, "
        "IQM aggregates normalised to AdamW, speed-ups, plots. Finished runs are stored in OUT/runs and reused.",
    )
    parser.add_argument(
        "--optimizer",
        action="append",
        default=[],
        metavar="NAME_OR_DIR",
        help="learned optimizer: zoo name, checkpoint folder or Hub repo id (repeatable)",
    )
    parser.add_argument(
        "--tasks",
        type=parse_names,
        default=None,
        help=f"comma-separated tasks (default: all; known: {', '.join(TASKS)})",
    )
    parser.add_argument(
        "--baselines",
        type=parse_names,
        default=list(DEFAULT_BASELINES),
        help=f"comma-separated baselines among {', '.join(BASELINE_NAMES)} (default {','.join(DEFAULT_BASELINES)}; "
        "adamw always runs: it is the reference)",
    )
    parser.add_argument(
        "--lr-rule",
        nargs="+",
        choices=LR_RULES,
        default=["default", "tuned"],
        help="how learned optimizers get their lr: adamw (AdamW's tuned lr, weight decay and schedule), tuned "
        "(own lr tuned on the same budget), tuned-wd (own lr and weight decay tuned on AdamW's grid), default "
        "(checkpoint's lr and schedule); several allowed "
        "(default: default tuned)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="evaluation seeds 0..N-1 (default 3; 1 with --quick)")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="first evaluation seed (default 0): --first-seed K --seeds N runs seeds K..K+N-1 (fresh runs)",
    )
    parser.add_argument(
        "--adapt-steps",
        type=int,
        default=0,
        help="also run each learned optimizer adapted to every run's model first: N steps of learned_optim.adapt "
        "on the first N*20 training steps (M-L2O's test-time adaptation), as NAME+adaptN (default 0: off)",
    )
    parser.add_argument(
        "--flatness",
        action="store_true",
        help="also measure each evaluation run's final weights: Hessian trace and top eigenvalue, PGA sharpness "
        "(learned_optim.bench.run.SUITE_FLATNESS); measured runs are separate records, trained again",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"the quick selection: {', '.join(QUICK)} at a quarter of their steps, 1 seed, small grids",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_results"), help="output folder (default bench_results)")
    parser.add_argument(
        "--baseline-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="another output folder whose stored runs (e.g. the baselines) are reused, never written (repeatable)",
    )
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the finished runs stored in OUT/runs (default); --no-resume trains everything again",
    )
    parser.add_argument(
        "--data-root", default=None, help="folder of the text corpus (default: this Python's standard library)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list", action="store_true", help="print the task table and exit")
    parser.add_argument(
        "--selection-set",
        action="store_true",
        help="run the recipe-selection set instead of the suite (other tasks, for choosing recipes; never a result, "
        "never recorded on a card)",
    )
    parser.add_argument(
        "--record-card",
        metavar="CHECKPOINT_DIR",
        action="append",
        default=[],
        help="also write the tables into that checkpoint's model card and config.json training.results (repeatable)",
    )
    return parser


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """Run the suite, print the tuning choices and the tables, write the files; 2 on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    try:
        if args.list:
            print(tasks_markdown(args.tasks, args.selection_set), end="")
            return 0
        if args.selection_set and args.record_card:
            raise ValueError("--record-card takes suite results only: the selection set's are never a result")
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        missing = [d for d in args.baseline_dir if not (Path(d) / "runs").is_dir()]
        if missing:
            raise ValueError(f"--baseline-dir {missing[0]} holds no run store (no runs/ folder in it)")
        check_outputs(args.out, plots=not args.no_plots, record_card=args.record_card)
        torch.set_num_threads(args.threads)
        results = run_suite(
            args.optimizer,
            out=args.out,
            tasks=args.tasks,
            baselines=args.baselines,
            lr_rules=args.lr_rule,
            seeds=args.seeds,
            first_seed=args.first_seed,
            quick=args.quick,
            data_root=args.data_root,
            extra_run_dirs=args.baseline_dir,
            reuse=args.resume,
            progress=not args.no_progress,
            command=f"{prog} {shlex.join(argv)}",
            flatness=args.flatness,
            adapt_steps=args.adapt_steps,
            selection=args.selection_set,
        )
    except (UnknownTaskError, UnknownOptimizerError, DataRootError, CheckpointError, ValueError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    files = write_report(
        results, args.out, plots=not args.no_plots, record_card=args.record_card, sections=[card_key(args.quick)]
    )
    print_report(results, files)
    return 0


def print_report(results: SuiteResults, files: dict[str, Path]) -> None:
    """Print the suite's tables, how many runs were trained or reused, and the files written."""
    print()
    print(results.markdown())
    print(f"runs trained {results.config['runs_trained']}, reused {results.config['runs_reused']}")
    print("wrote " + ", ".join(str(p) for p in files.values()))
