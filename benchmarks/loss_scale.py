r"""How a learned optimizer's result depends on the scale of the loss, beside AdamW's.

AdamW's step does not change when the loss is multiplied by a constant :math:`c` (its step
:math:`\hat m / (\sqrt{\hat v} + \epsilon)` is the same for :math:`c g` while :math:`|g| \gg \epsilon`), and users
change that scale without thinking of it: a sum-reduced loss instead of a mean, a loss divided by the gradient
accumulation steps, another batch size. A learned net's inputs carry small constants that a scale can bring into
play (``adafac_mlp``: ``feature_rms_eps`` on each feature's mean square over the tensor, which goes as :math:`g^4`
for the second-moment features, and ``factored_rsqrt_eps`` in :math:`(r + \epsilon)^{-1/2}`).

For each task of a suite ``results.json`` (``python -m learned_optim bench``), with AdamW's tuned setting from its
tuning (the suite's ``adamw`` rule: the learned optimizer keeps AdamW's lr, weight decay and schedule), both train
with the training loss multiplied by each scale; the validation and test losses are not scaled. Nothing is tuned
or chosen here: this measures a property of a given optimizer. Printed per task and scale: the mean final
validation loss of each (over the seeds; a run that diverged counts with its initial validation loss, as in the
suite), each over its own at scale 1, and the learned one over AdamW's at the same scale; then the interquartile
mean over the tasks of the last two.

    python benchmarks/loss_scale.py --optimizer pretrained/adafac-mlp-adam-magnitude-tbv-nomup-soup-all8 \
        --results benchmarks/results/bench/flagship-rerun-s18/results.json --scales 0.01 1 100 --seeds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _common import machine_header  # noqa: E402

from learned_optim.bench import stats  # noqa: E402
from learned_optim.bench.run import baseline_optimizer, learned_optimizer, train  # noqa: E402
from learned_optim.bench.suite import REFERENCE, final_value  # noqa: E402
from learned_optim.bench.tasks import Workload, get_task  # noqa: E402
from learned_optim.bench.tuning import chosen_settings  # noqa: E402


class ScaledLoss:
    """``workload`` with its training loss multiplied by ``scale``; its measurements (validation, test) unscaled."""

    def __init__(self, workload: Workload, scale: float) -> None:
        self.workload, self.scale = workload, scale

    def __getattr__(self, name: str) -> Any:
        return getattr(self.workload, name)

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return self.workload.loss(model, batch) * self.scale


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values and all(math.isfinite(v) for v in values) else math.nan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", required=True, help="learned optimizer: zoo name or checkpoint folder")
    parser.add_argument("--results", type=Path, required=True, help="a suite results.json (AdamW's tuned settings)")
    parser.add_argument("--tasks", help="comma-separated tasks (default: every task tuned in --results)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.01, 1.0, 100.0])
    parser.add_argument("--seeds", type=int, default=2, help="evaluation seeds 0..N-1")
    parser.add_argument("--steps", type=int, help="a shorter horizon than each task's (smoke runs)")
    parser.add_argument("--out", type=Path, help="write every run's final losses here (JSON)")
    args = parser.parse_args(argv)
    if 1.0 not in args.scales:
        args.scales.append(1.0)
    torch.set_num_threads(1)
    settings = chosen_settings(json.loads(args.results.read_text()), REFERENCE)
    names = args.tasks.split(",") if args.tasks else list(settings)
    learned, adamw = learned_optimizer(args.optimizer), baseline_optimizer(REFERENCE)
    print(machine_header())
    print(f"\n{learned.name} against AdamW, both at AdamW's tuned setting per task ({args.results}); "
          f"seeds 0..{args.seeds - 1}; the training loss times each scale\n")  # fmt: skip
    finals: dict[str, dict[str, dict[float, list[float]]]] = {}
    rows = []
    for name in names:
        workload = get_task(name).bind(steps=args.steps)
        chosen = settings[name]
        tick = time.perf_counter()
        finals[name] = {}
        for opt in (adamw, learned):
            setting = dataclasses.replace(chosen, optimizer=opt.name)
            finals[name][opt.name] = {
                s: [
                    final_value(train(ScaledLoss(workload, s), opt, setting, seed), "val_loss")
                    for seed in range(args.seeds)
                ]
                for s in args.scales
            }
        by = {o: {s: mean(v) for s, v in finals[name][o].items()} for o in (adamw.name, learned.name)}
        for s in sorted(args.scales):
            a, b = by[adamw.name][s], by[learned.name][s]
            rows.append((name, s, a, b, a / by[adamw.name][1.0], b / by[learned.name][1.0], b / a))
        print(f"  {name}: {chosen.describe()} ({time.perf_counter() - tick:.0f} s)", flush=True)
    print("\n| task | loss scale | AdamW val | learned val | AdamW / its scale 1 | learned / its scale 1 | "
          "learned / AdamW |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for name, s, a, b, ra, rb, rel in rows:
        print(f"| {name} | {s:g} | {a:.4g} | {b:.4g} | {ra:.3f} | {rb:.3f} | {rel:.3f} |")
    print("\nInterquartile mean over the tasks:\n\n| loss scale | AdamW / its scale 1 | learned / its scale 1 | "
          "learned / AdamW |\n|---|---|---|---|")  # fmt: skip
    for s in sorted(args.scales):
        at = [r for r in rows if r[1] == s]
        print(f"| {s:g} | " + " | ".join(f"{stats.iqm([r[i] for r in at]):.3f}" for i in (4, 5, 6)) + " |")
    if args.out:
        args.out.write_text(json.dumps({"command": sys.argv, "final_val_loss": finals}, indent=1))


if __name__ == "__main__":
    main()
