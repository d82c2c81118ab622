r"""How sure are a contender's suite aggregates? A paired seed bootstrap, and the normalisation that the bars rest on.

The suite reports, per contender, the interquartile mean over tasks of the final validation and test loss
normalised by tuned AdamW's, and of the speed-up, as point values from 3 seeds per task. This script reads a suite
``results.json`` (and the run store, for the training curves the speed-ups come from) and prints for one contender:

* the suite's aggregates as it defines them: per task, the contender's mean over seeds over AdamW's mean
  (:math:`\bar x / \bar r`), then the IQM over tasks;
* the same with the ratio taken per seed (:math:`\overline{x/r}`), the other reasonable reading;
* a 95% percentile interval of each aggregate from a paired, stratified bootstrap: each task's seeds resampled with
  replacement, the same draw for the contender and AdamW; and the fraction of resamples meeting issue 15's bars
  (loss IQM at most 1.0, speed-up IQM at least 1.3).

With ``--against OTHER`` it compares two contenders of the same results on the same tasks and seeds instead: each
aggregate of the contender minus OTHER's, in the same paired resamples (the seeds of a task drawn once for both and
AdamW), with its 95% interval and the fraction of resamples where the contender is ahead: how sure a decision
between two nets is on those seeds.

It reads stored runs only and chooses nothing.

    python benchmarks/aggregate_uncertainty.py benchmarks/results/bench/flagship-rerun-s18/results.json \
        --contender "adafac-mlp-adam-magnitude-tbv-nomup-soup-all8 [adamw]" \
        --store benchmarks/results/bench/full-runs/runs
    python benchmarks/aggregate_uncertainty.py benchmarks/results/bench/soup-scale/stage2/results.json \
        --contender "adafac-mlp-adam-magnitude-tbv-nomup-soup-all8-x2 [adamw]" \
        --against "adafac-mlp-adam-magnitude-tbv-nomup-soup-all8 [adamw]" \
        --store benchmarks/results/bench/selection-runs/runs
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from learned_optim.bench import stats  # noqa: E402
from learned_optim.bench.run import read_run_record  # noqa: E402
from learned_optim.bench.suite import REFERENCE, final_value  # noqa: E402

#: Issue 15's bars: (aggregate, "at most" or "at least", bound).
BARS = {"val": ("at most", 1.0), "test": ("at most", 1.0), "speedup": ("at least", 1.3)}


def per_seed_values(results: dict[str, Any], contender: str, stores: Sequence[Path]) -> dict[str, np.ndarray]:
    """``(tasks, 2, seeds)`` arrays of final val and test loss (contender, AdamW) and ``(tasks, seeds)`` speed-ups,
    the runs paired by seed."""
    runs: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for run in results["runs"]:
        runs.setdefault(run["task"], {}).setdefault(run["contender"], {})[run["seed"]] = run
    tasks = [t for t, by in runs.items() if contender in by and REFERENCE in by]
    if not tasks:
        known = sorted({c for by in runs.values() for c in by})
        raise SystemExit(f"error: no task has runs of {contender!r} and {REFERENCE!r}; contenders: {known}")
    out: dict[str, list[Any]] = {"val": [], "test": [], "speedup": []}
    for task in tasks:
        seeds = sorted(set(runs[task][contender]) & set(runs[task][REFERENCE]))
        pairs = [(runs[task][contender][s], runs[task][REFERENCE][s]) for s in seeds]
        # the stored records where the store has them: the training curves, and a diverged run's final loss as the
        # suite counts it (its initial validation loss; results.json leaves it empty, read as NaN here)
        records = [[read_run_record(stores, run["key"]) for run in pair] for pair in pairs]
        stored = all(record is not None for pair in records for record in pair)
        measured = records if stored else pairs
        for name, key in (("val", "val_loss"), ("test", "test_loss")):
            out[name].append([[final_value(pair[side], key) for pair in measured] for side in (0, 1)])
        out["speedup"].append([stats.run_speedup(*pair) for pair in records] if stored else [])
    arrays = {k: np.array(v, dtype=float) for k, v in out.items() if k != "speedup"}
    if all(len(s) == len(out["speedup"][0]) > 0 for s in out["speedup"]):
        arrays["speedup"] = np.array(out["speedup"], dtype=float)
    return arrays


def aggregates(values: dict[str, np.ndarray], per_seed: bool = False) -> dict[str, float]:
    """The IQM over tasks of each measure: loss ratios of the seed means (the suite's), or the seed means of the
    ratios (``per_seed``); the speed-up's seed mean."""
    out = {}
    for name in ("val", "test"):
        mine, ref = values[name][:, 0], values[name][:, 1]
        ratio = (mine / ref).mean(axis=1) if per_seed else mine.mean(axis=1) / ref.mean(axis=1)
        out[name] = stats.iqm(ratio.tolist())
    if "speedup" in values:
        out["speedup"] = stats.iqm(values["speedup"].mean(axis=1).tolist())
    return out


def bootstrap(values: dict[str, np.ndarray], resamples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The aggregates of ``resamples`` paired, stratified resamples: each task's seeds drawn with replacement, the
    same draw for every measure and for both optimizers."""
    return paired_bootstrap([values], resamples, seed)[0]


def paired_bootstrap(
    contenders: Sequence[dict[str, np.ndarray]], resamples: int, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """:func:`bootstrap` of several contenders' values (:func:`per_seed_values`, the same tasks and seeds) with the
    same draws for all of them."""
    rng = np.random.default_rng(seed)
    shape = contenders[0]["val"].shape
    if any(values["val"].shape != shape for values in contenders):
        raise SystemExit(
            f"error: the contenders' runs differ in tasks or seeds: {[v['val'].shape for v in contenders]}"
        )
    tasks, seeds = shape[0], shape[2]
    rows = np.arange(tasks)[:, None]
    draws: list[dict[str, list[float]]] = [{name: [] for name in values} for values in contenders]
    for _ in range(resamples):
        pick = rng.integers(0, seeds, size=(tasks, seeds))
        for values, out in zip(contenders, draws, strict=True):
            drawn = {name: values[name][rows, :, pick].transpose(0, 2, 1) for name in ("val", "test")}
            if "speedup" in values:
                drawn["speedup"] = values["speedup"][rows, pick]
            for name, value in aggregates(drawn).items():
                out[name].append(value)
    return [{name: np.array(v) for name, v in out.items()} for out in draws]


LABELS = {"val": "val loss / AdamW", "test": "test loss / AdamW", "speedup": "speed-up"}


def print_comparison(contender: str, other: str, values: list[dict[str, np.ndarray]], resamples: int) -> None:
    """The table of ``--against``: each aggregate of both, their difference, its interval, how often it favours
    ``contender`` (a lower loss ratio, a higher speed-up)."""
    points = [aggregates(v) for v in values]
    draws = paired_bootstrap(values, resamples)
    tasks, seeds = values[0]["val"].shape[0], values[0]["val"].shape[2]
    print(f"{contender} against {other}: {tasks} tasks, {seeds} seeds each (paired); {resamples} resamples\n")
    print("| aggregate (IQM over tasks) | contender | other | difference | bootstrap 95% interval "
          "| resamples where the contender is ahead |\n|---|---|---|---|---|---|")  # fmt: skip
    for name, label in LABELS.items():
        if not all(name in d for d in draws):
            continue
        difference = draws[0][name] - draws[1][name]
        low, high = np.percentile(difference, [2.5, 97.5])
        ahead = (difference > 0) if name == "speedup" else (difference < 0)
        print(
            f"| {label} | {points[0][name]:.4f} | {points[1][name]:.4f} | {points[0][name] - points[1][name]:+.4f} "
            f"| [{low:+.3f}, {high:+.3f}] | {ahead.mean():.2f} |"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a suite results.json")
    parser.add_argument("--contender", required=True, help='e.g. "NAME [adamw]", as in the results\' tables')
    parser.add_argument("--store", type=Path, action="append", default=[], help="run store(s) (runs/ folders)")
    parser.add_argument("--resamples", type=int, default=5000)
    parser.add_argument("--against", default=None, help="another contender of the same results: a paired comparison")
    args = parser.parse_args(argv)
    results, stores = json.loads(args.results.read_text()), args.store or [args.results.parent / "runs"]
    values = per_seed_values(results, args.contender, stores)
    if args.against is not None:
        print_comparison(
            args.contender, args.against, [values, per_seed_values(results, args.against, stores)], args.resamples
        )
        return 0
    point, per_seed = aggregates(values), aggregates(values, per_seed=True)
    draws = bootstrap(values, args.resamples)
    tasks, seeds = values["val"].shape[0], values["val"].shape[2]
    print(f"{args.contender} against {REFERENCE}: {tasks} tasks, {seeds} seeds each; {args.resamples} resamples\n")
    print("| aggregate (IQM over tasks) | suite's value (ratio of seed means) | ratio per seed "
          "| bootstrap 95% interval | bar | resamples meeting it |\n|---|---|---|---|---|---|")  # fmt: skip
    for name, (side, bound) in BARS.items():
        if name not in draws:
            continue
        low, high = np.percentile(draws[name], [2.5, 97.5])
        meets = (draws[name] <= bound) if side == "at most" else (draws[name] >= bound)
        label = LABELS[name]
        other = f"{per_seed[name]:.4f}" if name != "speedup" else "-"
        print(
            f"| {label} | {point[name]:.4f} | {other} | [{low:.3f}, {high:.3f}] | {side} {bound} | {meets.mean():.2f} |"
        )
    if "speedup" not in draws:
        print("\n(no speed-ups: the run store with the training curves was not found; pass --store)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
