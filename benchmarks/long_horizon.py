r"""A learned optimizer against AdamW at K times the suite's horizon, both at AdamW's setting tuned at the suite's.

Celo2's independent evaluation found a late loss spike on a 138M language model (``SPEC.md`` §7): a learned rule
meta-trained on short unrolls may stay stable for the suite's 500-5,000 steps and not for ten times that. This
script runs, per task and seed, AdamW and the learned optimizer for ``--factor`` times the task's horizon, both with
AdamW's lr, weight decay and warm-up + cosine schedule as tuned at the suite's horizon (read from a suite
``results.json``: rule (a), a user who swaps the class, carried to a horizon nobody tuned for), and prints per task:

* final validation loss (mean over seeds) and its ratio to AdamW's; the paired 95% outcome on the test loss;
* the speed-up against AdamW on the same seed (:func:`learned_optim.bench.stats.run_speedup`, the suite's);
* **late rise**: the largest share of its progress that the training loss, averaged over the suite's windows of
  horizon/20 steps, gave back after the first tenth of the run: :math:`\max_w (L_w - \min_{v<w} L_v) / (L_1 -
  \min_{v<w} L_v)` over the windows :math:`w` past the first tenth (0: it never went back up by a window; 1: back to
  where it started; a late spike shows here, and so does minibatch noise: AdamW's value on the same seeds is the
  noise level to read it against);
* diverged runs (the suite's definition).

Runs are stored in ``OUT/runs`` like the suite's (:class:`~learned_optim.bench.run.RunStore`, keyed by the task at its
longer horizon), so an interrupted probe resumes. It chooses nothing.

    python benchmarks/long_horizon.py --optimizer pretrained/adafac-mlp-adam-magnitude-tbv-nomup-soup-all8 \
        --tasks stdlib-transformer-lm,shapes-cnn --factor 10 --seeds 3 \
        --settings-from benchmarks/results/bench/suite-seeds-0-11/results.json \
        --out benchmarks/results/bench/long-horizon-x10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _common import machine_header  # noqa: E402

from learned_optim.bench import stats  # noqa: E402
from learned_optim.bench.run import RunStore, Setting, baseline_optimizer, learned_optimizer  # noqa: E402
from learned_optim.bench.suite import REFERENCE, final_value  # noqa: E402
from learned_optim.bench.tasks import get_task  # noqa: E402
from learned_optim.bench.tuning import chosen_settings  # noqa: E402

#: Windows of the training curve the late rise is read from, and the share of the run before it counts.
RISE_WINDOWS, RISE_AFTER = 20, 0.1


def late_rise(train_loss: Sequence[float | None], horizon: int) -> float:
    r"""The largest share of its progress the windowed training loss gave back after the first :data:`RISE_AFTER` of
    the run: :math:`\max_{w} (L_w - \min_{v < w} L_v) / (L_1 - \min_{v < w} L_v)` over windows of ``horizon /
    RISE_WINDOWS`` steps past that point, :math:`L_1` the first window's (NaN for a non-finite window). Read against
    the progress made rather than the lowest loss, which near a loss of 0 turns minibatch noise into rises of 10x."""
    steps, values = stats.training_curve(train_loss, horizon, RISE_WINDOWS)
    rise, lowest = 0.0, math.inf
    for end, value in zip(steps, values, strict=True):
        if not math.isfinite(value):
            return math.nan
        if end > RISE_AFTER * horizon and values[0] > lowest:
            rise = max(rise, (value - lowest) / (values[0] - lowest))
        lowest = min(lowest, value)
    return rise


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", required=True, help="learned optimizer: zoo name or checkpoint folder")
    parser.add_argument("--tasks", required=True, help="comma-separated suite tasks")
    parser.add_argument("--factor", type=int, default=10, help="times the task's horizon (default 10)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--settings-from", required=True, help="a suite results.json with AdamW's tuning")
    parser.add_argument("--out", required=True, help="folder for runs/ and the tables")
    parser.add_argument(
        "--baseline-dir", action="append", default=[], help="another output folder whose runs are reused, never written"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, help="a shorter horizon than each task's, before the factor (smoke runs)")
    parser.add_argument(
        "--lr-scale", type=float, default=1.0, help="the learned optimizer's lr as this times AdamW's (a diagnostic)"
    )
    args = parser.parse_args(argv)
    if args.factor < 1 or args.seeds < 1 or not args.lr_scale > 0:
        parser.error("--factor and --seeds must be at least 1, --lr-scale above 0")
    torch.set_num_threads(args.threads)
    settings = chosen_settings(json.loads(Path(args.settings_from).read_text()), REFERENCE)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    missing = [t for t in tasks if t not in settings]
    if missing:
        parser.error(f"{args.settings_from} has no AdamW tuning for {missing}; it has {sorted(settings)}")
    store = RunStore(args.out, extra=args.baseline_dir)
    adamw, learned = baseline_optimizer(REFERENCE), learned_optimizer(args.optimizer)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    rows, lines = [], []
    for name in tasks:
        task = get_task(name)
        workload = task.bind(steps=(args.steps or task.steps) * args.factor)
        chosen = settings[name]
        records: dict[str, list[dict[str, Any]]] = {}
        used: dict[str, Setting] = {}
        for label, optimizer in ((REFERENCE, adamw), (learned.name, learned)):
            lr = chosen.lr * (args.lr_scale if optimizer is learned else 1.0)
            used[label] = dataclasses.replace(chosen, optimizer=label, lr=lr)
            records[label] = [store.run(workload, optimizer, used[label], seed) for seed in seeds]
            print(f"{name} x{args.factor}: {label} done ({store.trained} trained, {store.reused} reused)", flush=True)
        reference = records[REFERENCE]
        for label, runs in records.items():
            val, ref_val = ([final_value(r, "val_loss") for r in x] for x in (runs, reference))
            test, ref_test = ([final_value(r, "test_loss") for r in x] for x in (runs, reference))
            _, _, outcome = stats.paired_outcome(test, ref_test)
            row = {
                "task": name,
                "contender": label,
                "steps": workload.steps,
                "setting": used[label].describe(),
                "val_loss": statistics.fmean(val),
                "val_ratio": statistics.fmean(val) / statistics.fmean(ref_val),
                "test_outcome": outcome,
                "speedup": statistics.fmean(stats.run_speedup(r, ref) for r, ref in zip(runs, reference, strict=True)),
                "late_rise": [round(late_rise(r["train_loss"], r["steps"]), 4) for r in runs],
                "diverged": sum(bool(r["diverged"]) for r in runs),
            }
            rows.append(row)
            lines.append(
                f"| {name} | {label} | {workload.steps} | {row['setting']} | {row['val_loss']:.4g} | "
                f"{row['val_ratio']:.3f} | {outcome} | {row['speedup']:.2f}x | "
                f"{' / '.join(f'{x:.3f}' for x in row['late_rise'])} | {row['diverged']}/{len(runs)} |"
            )
    header = [
        f"Horizon x{args.factor}, seeds {seeds.start}-{seeds.stop - 1}, AdamW's setting tuned at x1 "
        f"({args.settings_from}); {machine_header()}",
        "",
        "| task | contender | steps | setting | val loss | val / AdamW | test (paired) | speed-up | late rise per "
        "seed | diverged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    table = "\n".join([*header, *lines])
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"factor": args.factor, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
