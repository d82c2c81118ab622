r"""Two contenders of stored suite runs compared with each other, paired by task and seed (issue 16).

The suite compares every contender with tuned AdamW; a regularized fine-tune has to be compared with its
control (the same fine-tune without the regularizer), run by run: same task, same seed, so the same
initialisation and batches. For each task this prints the mean and 95% interval of the paired differences
``A - B`` of the final test loss (and of the validation loss), the outcome for ``A`` (``win``: the whole interval
below 0), and, where the runs were measured with ``--flatness``, the ratio of the mean Hessian traces
:math:`\overline{\mathrm{tr}\,H}_A / \overline{\mathrm{tr}\,H}_B`.

    python benchmarks/paired_suite.py RESULTS.json [RESULTS.json ...] \
        --a "adafac-mlp-adam-magnitude-tbv-nomup-gsam [adamw]" --b "adafac-mlp-adam-magnitude-tbv-nomup-control [adamw]"

``--a``/``--b`` repeated give several pairs (e.g. both meta-seeds of a fine-tune and of its control), whose
paired differences are pooled per task.

Each ``RESULTS.json`` is a ``results.json`` written by ``python -m learned_optim bench``; runs are pooled over
the files (the first record of a (task, contender, seed) wins). The flatness measures are read from the run
records (``runs/<key>.json`` beside each file, or in a ``--store`` folder such as
``benchmarks/results/bench/full-runs/runs``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from learned_optim.bench.run import read_run_record
from learned_optim.bench.stats import paired_outcome

Runs = dict[tuple[str, str, int], dict]


def pooled_runs(paths: Sequence[str | Path], stores: Sequence[str | Path] = ()) -> Runs:
    """``(task, contender, seed) -> {"final": ..., "flatness": ... or None}`` over the ``results.json`` files,
    first one first; flatness from the run's stored record where one is found."""
    runs: Runs = {}
    for path in paths:
        folders = [Path(path).parent / "runs", *map(Path, stores)]
        for run in json.loads(Path(path).read_text())["runs"]:
            record = read_run_record(folders, run["key"]) or {}
            entry = {"final": run["final"], "flatness": record.get("flatness")}
            runs.setdefault((run["task"], run["contender"], int(run["seed"])), entry)
    return runs


def paired_rows(runs: Runs, pairs: Sequence[tuple[str, str]]) -> list[dict]:
    """One row per task: the paired differences over every ``(a, b)`` pair's common seeds, pooled (e.g. a
    regularized fine-tune and its control at two meta-seeds), where there are at least two pairs of runs."""
    rows = []
    for task in dict.fromkeys(t for t, _, _ in runs):
        matched = [(a, b, s) for a, b in pairs for t, c, s in runs if t == task and c == a and (task, b, s) in runs]
        if len(matched) < 2:
            continue
        row: dict = {"task": task, "seeds": len(matched)}
        for metric in ("test_loss", "val_loss"):
            va = [float(runs[task, a, s]["final"][metric]) for a, _, s in matched]
            vb = [float(runs[task, b, s]["final"][metric]) for _, b, s in matched]
            row[metric] = paired_outcome(va, vb)
        traces = [
            [(runs[task, m[side], m[2]]["flatness"] or {}).get("hessian_trace") for m in matched] for side in (0, 1)
        ]
        if all(v is not None for side in traces for v in side):
            row["trace_ratio"] = sum(traces[0]) / sum(traces[1])
        rows.append(row)
    return rows


def markdown(rows: list[dict], pairs: Sequence[tuple[str, str]]) -> str:
    named = "; ".join(f"A = `{a}`, B = `{b}`" for a, b in pairs)
    lines = [
        f"{named}; paired over seeds (same initialisation and batches), pooled over the pairs, 95% t-interval.",
        "",
        "| task | pairs of runs | test loss A - B | outcome for A | val loss A - B | outcome | trace A / B |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        (tm, th, to), (vm, vh, vo) = r["test_loss"], r["val_loss"]
        trace = f"{r['trace_ratio']:.2f}" if "trace_ratio" in r else "n/a"
        lines.append(
            f"| {r['task']} | {r['seeds']} | {tm:+.4g} ± {th:.2g} | {to} | {vm:+.4g} ± {vh:.2g} | {vo} | {trace} |"
        )
    outcomes = [r["test_loss"][2] for r in rows]
    lines += [
        "",
        f"test loss, A against B: {outcomes.count('win')} wins / {outcomes.count('tie')} ties / "
        f"{outcomes.count('loss')} losses over {len(rows)} tasks",
    ]
    flatter = [r["trace_ratio"] < 1 for r in rows if "trace_ratio" in r]
    if flatter:
        lines.append(f"A's mean Hessian trace lower than B's on {sum(flatter)} of {len(flatter)} tasks")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results.json files of `python -m learned_optim bench`")
    parser.add_argument(
        "--a", required=True, action="append", help="contender A, as named in the tables (e.g. 'NAME [adamw]')"
    )
    parser.add_argument(
        "--b", required=True, action="append", help="contender B, the reference (e.g. the control); one per --a"
    )
    parser.add_argument("--store", action="append", default=[], help="a folder of run records (repeatable)")
    args = parser.parse_args(argv)
    if len(args.a) != len(args.b):
        parser.error("give one --b for each --a (the pairs are compared run by run, then pooled)")
    pairs = list(zip(args.a, args.b, strict=True))
    runs = pooled_runs(args.results, args.store)
    contenders = sorted({c for _, c, _ in runs})
    for name in (*args.a, *args.b):
        if name not in contenders:
            parser.error(f"no runs of {name!r}; the files hold {contenders}")
    rows = paired_rows(runs, pairs)
    if not rows:
        parser.error("no task with runs of both contenders on the same seeds (two or more)")
    print(markdown(rows, pairs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
