r"""What a net's magnitude head does on real tasks: the per-tensor factors it gives during training.

A net with ``magnitude_head_bound`` :math:`B` multiplies each tensor's step by :math:`B^{\tanh(w_\mu\cdot\bar z +
b_\mu)}` (:class:`~learned_optim.nets.adafac_mlp.AdafacMLP`). This script trains each task once with the net at
AdamW's chosen setting (rule (a), read from a ``results.json`` with AdamW's tuning), records every factor the head
gives (one per tensor per step), and prints per task the factors' quantiles over the whole run, over its first and
last tenth of steps, and the spread across the tensors of one step (the largest over the smallest factor, median
over steps): a head that only rescales the lr shows a spread near 1. It chooses nothing.

    python benchmarks/magnitude_factors.py --optimizer benchmarks/results/bench/magnitude-head/nets/magnitude-head \
        --settings-from benchmarks/results/bench/cosine-ft-soup/stage1/results.json --seed 132
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _common import machine_header  # noqa: E402

from learned_optim import LearnedOptimizer  # noqa: E402
from learned_optim.bench.run import BenchOptimizer, Setting, learned_optimizer, train  # noqa: E402
from learned_optim.bench.suite import REFERENCE  # noqa: E402
from learned_optim.bench.tasks import SELECTION_TASKS, get_task  # noqa: E402
from learned_optim.bench.tuning import chosen_settings  # noqa: E402
from learned_optim.nets.adafac_mlp import AdafacMLP  # noqa: E402


def quantiles(values: Sequence[float]) -> str:
    """Min / 10% / median / 90% / max of ``values``."""
    ordered = sorted(values)
    at = [ordered[round(q * (len(ordered) - 1))] for q in (0.0, 0.1, 0.5, 0.9, 1.0)]
    return " / ".join(f"{x:.3f}" for x in at)


def recorded_factors(workload: Any, learned: BenchOptimizer, setting: Setting, seed: int) -> list[list[float]]:
    """One run of ``learned`` on ``workload`` (:func:`~learned_optim.bench.run.train`) and the factors its net's
    magnitude head gave: one list per optimizer step that stepped a tensor, a factor per tensor (none without a
    head). The net's and the optimizer's methods are wrapped for the run only."""
    factors: list[list[float]] = []
    net_factor, optimizer_step = AdafacMLP._magnitude_factor, LearnedOptimizer.step

    def recording_factor(self: AdafacMLP, pooled: torch.Tensor | None) -> torch.Tensor | float:
        factor = net_factor(self, pooled)
        if isinstance(factor, torch.Tensor):
            factors[-1].extend(factor.detach().reshape(-1).tolist())
        return factor

    def recording_step(self: LearnedOptimizer, closure: Any = None) -> Any:
        factors.append([])
        return optimizer_step(self, closure)

    with (
        mock.patch.object(AdafacMLP, "_magnitude_factor", recording_factor),
        mock.patch.object(LearnedOptimizer, "step", recording_step),
    ):
        train(workload, learned, setting, seed)
    return [step for step in factors if step]  # not the steps that stepped no tensor (lr 0, a non-finite gradient)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", required=True, help="checkpoint folder of a net with a magnitude head")
    parser.add_argument("--settings-from", required=True, help="a results.json with AdamW's tuning of the tasks")
    parser.add_argument("--tasks", help="comma-separated tasks (default: every task the tuning covers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="a shorter horizon than each task's (smoke runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = chosen_settings(json.loads(Path(args.settings_from).read_text()), REFERENCE)
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else sorted(settings)
    learned = learned_optimizer(args.optimizer)
    print(f"{args.optimizer}, seed {args.seed}, AdamW's setting from {args.settings_from}; {machine_header()}\n")
    print(
        "| task | steps | factors | factor: min / 10% / median / 90% / max | first tenth (median) "
        "| last tenth (median) | max/min over a step's tensors (median) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in tasks:
        task = get_task(name, selection=name in SELECTION_TASKS)
        workload = task.bind(steps=args.steps or task.steps)
        factors = recorded_factors(workload, learned, settings[name], args.seed)
        if not factors:
            parser.error(f"{args.optimizer} gave no factor on {name}: it has no magnitude head")
        tenth = max(1, len(factors) // 10)
        every = [f for step in factors for f in step]
        first = statistics.median(f for step in factors[:tenth] for f in step)
        last = statistics.median(f for step in factors[-tenth:] for f in step)
        spread = statistics.median(max(step) / min(step) for step in factors)
        print(
            f"| {name} | {workload.steps} | {len(every)} | {quantiles(every)} | {first:.3f} | {last:.3f} "
            f"| {spread:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
