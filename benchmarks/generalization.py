r"""Do flatness-regularized learned optimizers generalize better? The evidence table, and the lambda search.

Three commands (run from the repository root):

``python benchmarks/generalization.py table [--quick] [--out DIR]``
    Trains unseen optimizees (digits MLP-20-ReLU, a deeper MLP, the papers' Conv; Fashion-MNIST /
    CIFAR-10 Conv too when ``--data-root`` holds them) with vanilla ``l2o-lstm``, the fine-tuning control
    ``l2o-lstm-control``, every regularized ``l2o-lstm-*`` entry that exists, learning-rate-tuned Adam and
    SGD, SAM and GSAM (``pytorch_optimizer``), GAM and Entropy-SGD, for 10 seeds (95% t-intervals):
    test accuracy, final training loss, time per step, and flatness at the point of convergence
    (Hessian trace and top eigenvalue, PGA sharpness, max gradient norm; ``learned_optim.bench.flatness``).
    Writes the harness's files (``results.json``, ``summary.csv``, ``summary.md``, curves) and
    ``claims.md``: the papers' claims, each checked with paired (same seed, same initialisation, same
    batches) differences and their 95% intervals.

``python benchmarks/generalization.py merge DIR1 DIR2 --out DIR``
    Combines ``table`` outputs made with the same steps and seeds (e.g. baselines and learned optimizers
    evaluated in separate processes: a seed fixes the initialisation and the batches) and redoes
    ``claims.md``; ``--seeds N`` keeps seeds 0..N-1 of every input. An optimizer may come from only one
    input per task and seed; ``--drop LABEL@DIR`` leaves out an input's rows of one optimizer and
    ``--rename LABEL@DIR=NEW`` shows them as ``NEW`` (e.g. the rows of an entry re-shipped with new weights,
    whose new rows another input holds, as ``LABEL-w<old weight>``). ``table`` and ``merge`` take
    ``--record-card CHECKPOINT_DIR`` (repeatable), like ``python -m learned_optim evaluate``.

``python benchmarks/generalization.py select --runs 'runs/search/l2o-lstm-hessian-*' --out FILE``
    The lambda search of the regularized configs: evaluates every candidate run's ``model/`` on the
    *validation* split of digits MLP-20-sigmoid and MLP-20-ReLU (5 seeds, 1000 steps) and keeps the
    one with the best mean validation accuracy (ties: the smaller weight). Test data is never looked at.
    ``--runs`` repeats; with ``--by-kind`` the candidates of several regularizers are evaluated in one
    process and one is kept per regularizer kind, runs without a (non-zero) regularizer competing in
    every group as its ``w = 0`` point; each kind's best non-zero weight is reported too (what the zoo
    ships, with a note in its card, when ``w = 0`` wins).

An optimizer that is neither in the zoo nor a folder (``runs/<name>/model`` is tried too) is skipped
with the command that makes it. Everything uses 1 torch thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from learned_optim.bench.evaluate import (
    EvaluationResults,
    RunResult,
    TuningResult,
    evaluate,
    mean_confidence_interval,
    resolve_optimizer,
)
from learned_optim.bench.flatness import FlatnessOptions
from learned_optim.hub import CheckpointError, record_evaluation, resolve_checkpoint

VANILLA = "l2o-lstm"
CONTROL = "l2o-lstm-control"
REGULARIZED = [
    "l2o-lstm-hessian",
    "l2o-lstm-hessian-ev",
    "l2o-lstm-jacobian",
    "l2o-lstm-entropy",
    "l2o-lstm-sam",
    "l2o-lstm-gsam",
    "l2o-lstm-gam",
]
BASELINES = ["adam", "sgd", "sam", "gsam", "gam", "entropy-sgd"]
TASKS = ["digits-mlp20-relu", "digits-mlp20x20x20-relu", "digits-conv"]
SELECT_TASKS = ["digits-mlp20-sigmoid", "digits-mlp20-relu"]


def find_optimizer(name: str) -> str | None:
    """A zoo name, a folder, or ``runs/<name>/model``; ``None`` when the optimizer does not exist yet."""
    for candidate in (name, f"runs/{name}/model"):
        try:
            resolve_checkpoint(candidate, local_files_only=True)
            return candidate
        except (CheckpointError, OSError, ValueError, ImportError):
            continue
    return None


def data_tasks(data_root: str | None) -> list[Any]:
    """Fashion-MNIST / CIFAR-10 Conv tasks when their files are under ``data_root`` (no download)."""
    if not data_root:
        return []
    from learned_optim.bench.evaluate import TaskSource
    from learned_optim.tasks import make_family

    tasks = []
    for dataset in ("fashion-mnist", "cifar10"):
        try:
            tasks.append(TaskSource(f"{dataset}-conv", make_family("conv", dataset=dataset, data_root=data_root)))
        except Exception as err:  # missing files: say so and go on
            print(f"[skip] {dataset}: {err}", file=sys.stderr)
    return tasks


# ------------------------------------------------------------------------------------------ claims
def paired(results: EvaluationResults, task: str, a: str, b: str, metric: str) -> tuple[float, float, int]:
    """Mean and 95% half-width of ``metric(a) - metric(b)`` over seeds where both ran (same seed = same
    initialisation and batches). ``metric``: ``accuracy``, ``train_loss`` or a flatness key."""

    def value(run) -> float:
        if metric == "accuracy":
            return run.final("accuracy")
        if metric == "train_loss":
            return run.final_train_loss(int(results.config.get("final_window", 10)))
        return (run.flatness or {}).get(metric, math.nan)

    by = {(r.optimizer, r.seed): r for r in results.runs if r.task == task}
    diffs = [value(by[(a, s)]) - value(by[(b, s)]) for (o, s) in by if o == a and (b, s) in by]
    diffs = [d for d in diffs if math.isfinite(d)]
    mean, half = mean_confidence_interval(diffs)
    return mean, half, len(diffs)


def verdict(mean: float, half: float, better: str) -> str:
    """``holds`` if the interval is entirely on the ``better`` side of 0, ``contradicted`` if entirely on the other."""
    if not math.isfinite(mean) or not math.isfinite(half):
        return "n/a"
    low, high = mean - half, mean + half
    good, bad = (low > 0, high < 0) if better == "higher" else (high < 0, low > 0)
    return "holds" if good else "contradicted" if bad else "not resolved"


def _control_for(name: str, learned: Sequence[str]) -> str | None:
    """The control of a regularized entry: ``l2o-lstm-control`` with the same ``-seedN`` suffix, if present."""
    match = re.search(r"-seed\d+$", name)
    control = CONTROL + (match.group(0) if match else "")
    return control if control in learned else None


def claims_markdown(results: EvaluationResults, learned: Sequence[str]) -> str:
    rows = {(r["task"], r["optimizer"]): r for r in results.summary}
    tasks = list(dict.fromkeys(r["task"] for r in results.summary))
    lines = [
        "# Claims of the flatness-regularized L2O papers, checked",
        "",
        "Paired differences over optimizee seeds (same initialisation and batches), mean ± 95% t-interval, "
        "of each regularized optimizer against vanilla `l2o-lstm` and against its control (the same fine-tune "
        "without the regularizer, same meta-training seed). `holds`: the interval excludes 0 on the claimed "
        "side; `contradicted`: it excludes 0 on the other side; `not resolved`: it contains 0. The intervals "
        "cover optimizee seeds only: each learned optimizer is one meta-training run.",
        "",
    ]
    regularized = [o for o in learned if o != VANILLA and "control" not in o]
    checks = [
        (
            "accuracy",
            "higher",
            "Test accuracy (claim: regularized > vanilla; the generalization paper's "
            "Conv-MNIST: 92.74 -> 97.34 Hessian, 97.87 entropy)",
        ),
        ("hessian_trace", "lower", "Hessian trace at the point of convergence (claim: flatter minima)"),
        ("sharpness@0.01", "lower", "PGA sharpness, radius 0.01 (the SAM/GSAM property)"),
        ("max_grad_norm@0.01", "lower", "Max gradient norm, radius 0.01 (the GAM property)"),
    ]

    def cell(task: str, opt: str, ref: str | None, metric: str, better: str) -> str:
        if ref is None or ref not in learned:
            return "-"
        mean, half, n = paired(results, task, opt, ref, metric)
        if not math.isfinite(mean):
            return "n/a"
        scale, unit = (100.0, " pp") if metric == "accuracy" else (1.0, "")
        text = f"{mean * scale:+.3g}{unit}" + (f" ± {half * scale:.2g}" if math.isfinite(half) else "")
        return f"{text} ({verdict(mean, half, better)})"

    for metric, better, title in checks:
        lines += [f"## {title}", "", f"| Task | Optimizer | Δ vs {VANILLA} | Δ vs its control |", "|---|---|---|---|"]
        for task in tasks:
            for opt in regularized:
                lines.append(
                    f"| {task} | {opt} | {cell(task, opt, VANILLA, metric, better)} | "
                    f"{cell(task, opt, _control_for(opt, learned), metric, better)} |"
                )
        lines.append("")
    lines += [
        "## Cost per step (claim: a regularized learned optimizer costs what vanilla L2O costs, much less "
        "than SAM's two passes)",
        "",
    ]
    if results.config.get("merged_from"):
        lines += [
            "Merged results: rows measured in different processes ran under different CPU load, so their "
            "times are not comparable; compare times within one `table` run only.",
            "",
        ]
    lines += ["| Task | Optimizer | ms / step | ratio to vanilla |", "|---|---|---|---|"]
    for task in tasks:
        base = rows.get((task, VANILLA), {}).get("time_per_step_ms", math.nan)
        for (t, opt), row in rows.items():
            if t == task:
                ms = row["time_per_step_ms"]
                lines.append(
                    f"| {task} | {opt} | {ms:.3g} | {ms / base:.2f} |"
                    if math.isfinite(base)
                    else f"| {task} | {opt} | {ms:.3g} | n/a |"
                )
    command = results.config.get("command")
    return "\n".join(lines) + (f"\n\nCommand: `{command}`\n" if command else "\n")


def _nan(value: Any) -> Any:
    """``null`` back to NaN inside the lists/dicts of a results.json (strict JSON has no NaN)."""
    if value is None:
        return math.nan
    if isinstance(value, list):
        return [_nan(v) for v in value]
    if isinstance(value, dict):
        return {k: _nan(v) for k, v in value.items()}
    return value


def load_results(folder: str | Path) -> EvaluationResults:
    """An :class:`EvaluationResults` back from the ``results.json`` that ``write`` produced."""
    data = json.loads((Path(folder) / "results.json").read_text())
    runs = []
    for run in data["runs"]:
        for key in ("train_loss", "evals", "flatness"):
            if run.get(key) is not None:
                run[key] = _nan(run[key])
        runs.append(RunResult(**run))
    tuning = [
        TuningResult(**{**t, "val_loss": [math.inf if v is None else v for v in t["val_loss"]]}) for t in data["tuning"]
    ]
    return EvaluationResults(data["config"], tuning, runs)


def _label_at_folder(value: str) -> tuple[str, str]:
    label, at, folder = value.rpartition("@")
    if not (label and at and folder):
        raise argparse.ArgumentTypeError(f"expected LABEL@INPUT_FOLDER, got {value!r}")
    return label, folder


def _renaming(value: str) -> tuple[tuple[str, str], str]:
    where, eq, new = value.rpartition("=")
    if not (where and eq and new):
        raise argparse.ArgumentTypeError(f"expected LABEL@INPUT_FOLDER=NEW_LABEL, got {value!r}")
    return _label_at_folder(where), new


def merge(args: argparse.Namespace) -> int:
    """Combine the results of several ``table`` runs made with the same steps/seeds (e.g. baselines
    and learned optimizers evaluated separately: same seeds mean same initialisations and batches)."""
    parts = [load_results(folder) for folder in args.inputs]
    if args.seeds is not None:  # keep seeds 0..N-1 of every input (e.g. a Conv run with fewer seeds)
        keep = list(range(args.seeds))
        for part in parts:
            missing = sorted(set(keep) - set(part.config["seed_list"]))
            if missing:
                raise SystemExit(f"--seeds {args.seeds}: an input lacks seeds {missing}")
            part.runs[:] = [r for r in part.runs if r.seed in keep]
            part.config.update(seeds=len(keep), seed_list=keep)
    keys = ("steps", "seed_list", "eval_split", "final_window")
    for part in parts[1:]:
        differing = [k for k in keys if part.config.get(k) != parts[0].config.get(k)]
        if differing:
            raise SystemExit(f"cannot merge runs whose {differing} differ")
    inputs = [Path(folder) for folder in args.inputs]

    def runs_of(label: str, folder: str, option: str) -> tuple[EvaluationResults, list[RunResult]]:
        if Path(folder) not in inputs:
            raise SystemExit(f"{option} {label}@{folder}: {folder} is not one of the inputs")
        part = parts[inputs.index(Path(folder))]
        runs = [r for r in part.runs if r.optimizer == label]
        if not runs:
            raise SystemExit(f"{option} {label}@{folder}: {folder} has no runs of {label}")
        return part, runs

    for label, folder in args.drop:  # e.g. a re-shipped entry whose old rows a newer input replaces
        part, _ = runs_of(label, folder, "--drop")
        part.runs[:] = [r for r in part.runs if r.optimizer != label]
    for (label, folder), new in args.rename:  # e.g. keep a re-shipped entry's old rows under their weight
        part, runs = runs_of(label, folder, "--rename")
        for run in runs:
            run.optimizer = new
        for spec in part.config.get("optimizers", []):
            if spec.get("label") == label:
                spec["label"] = new
    origin: dict[tuple[str, str, int], str] = {}
    for folder, part in zip(args.inputs, parts, strict=True):
        for r in part.runs:
            key = (r.task, r.optimizer, r.seed)
            if key in origin:
                raise SystemExit(
                    f"{r.optimizer} on {r.task} (seed {r.seed}) is in both {origin[key]} and {folder}; "
                    f"keep one with --drop {r.optimizer}@{origin[key]}"
                )
            origin[key] = folder
    config = dict(
        parts[0].config,
        command=" ".join(["python", "benchmarks/generalization.py", *sys.argv[1:]]),
        merged_from=[str(f) for f in args.inputs],
    )
    config["tasks"] = list(dict.fromkeys(t for p in parts for t in p.config["tasks"]))
    results = EvaluationResults(config, [t for p in parts for t in p.tuning], [r for p in parts for r in p.runs])
    optimizers = list(dict.fromkeys(r.optimizer for r in results.runs))
    learned = [o for o in optimizers if o.startswith(VANILLA) or o in args.learned]  # learned entries by label
    return write_report(args, results, learned)


def write_report(args: argparse.Namespace, results: EvaluationResults, learned: Sequence[str]) -> int:
    """The harness's files in ``args.out``, the cards of ``args.record_card``, and ``claims.md`` over ``learned``."""
    files = results.write(args.out, plots=not args.no_plots)
    record_cards(args.record_card, results)
    claims = claims_markdown(results, learned)
    (Path(args.out) / "claims.md").write_text(claims)
    print(results.markdown())
    print(claims)
    print("wrote " + ", ".join(str(p) for p in [*files.values(), Path(args.out) / "claims.md"]))
    return 0


def record_cards(folders: Sequence[str], results: EvaluationResults) -> None:
    """Write the measured table into each checkpoint folder's card and config (``evaluate --record-card``)."""
    for folder in folders:
        record_evaluation(folder, results.config["tasks"], results.markdown(), results.card_results())
        print(f"recorded the evaluation in {folder}/README.md")


# ------------------------------------------------------------------------------------------ commands
def table(args: argparse.Namespace) -> int:
    specs = []
    for name in ([] if args.no_zoo else [VANILLA, CONTROL, *REGULARIZED]) + args.optimizer:
        name, _, path = name.partition("=")  # --optimizer LABEL=FOLDER
        found = find_optimizer(path or name)
        if found is None:
            print(
                f"[skip] {name}: not in the zoo nor runs/{name}/model; make it with "
                f"`python -m learned_optim.meta train {name} --out runs/{name}`",
                file=sys.stderr,
            )
            continue
        spec = resolve_optimizer(found)
        spec.label = name
        specs.append(spec)
    learned = [spec.label for spec in specs]
    tasks = [*args.tasks, *data_tasks(args.data_root)]
    steps, seeds = (300, 3) if args.quick else (args.steps, args.seeds)
    options = FlatnessOptions(
        patience=args.patience, probes=20 if not args.quick else 5, iters=20 if not args.quick else 5
    )
    results = evaluate(
        [*specs, *args.baselines],
        tasks,
        steps,
        seeds,
        tune_steps=args.tune_steps,
        flatness=None if args.no_flatness else options,
        progress=not args.no_progress,
        command=" ".join(["python", "benchmarks/generalization.py", *sys.argv[1:]]),
    )
    return write_report(args, results, learned)


def best_of(group: Sequence[dict]) -> dict:
    """The selection rule: the best mean validation accuracy, ties going to the smaller (summed) weight.

    Per-run accuracies are float32, so two candidates with the same number of correct predictions can
    have means that differ by ~1e-8; means within 1e-6 (far below one prediction in a 10-run mean) tie.
    """
    return max(
        group,
        key=lambda s: (
            round(s["val_accuracy"], 6) if math.isfinite(s["val_accuracy"]) else -math.inf,
            -sum(w or 0 for w in s["weights"]),
        ),
    )


def select(args: argparse.Namespace) -> int:
    candidates = []
    for run in sorted({r for pattern in args.runs for r in glob.glob(pattern)}):
        model = Path(run) / "model"
        if not (model / "config.json").is_file():
            print(f"[skip] {run}: no model/ (unfinished run)", file=sys.stderr)
            continue
        config = json.loads((Path(run) / "config.json").read_text())
        blocks = config.get("regularizers", [])
        spec = resolve_optimizer(str(model))
        spec.label = Path(run).name
        candidates.append(
            (spec, [b.get("weight") for b in blocks], tuple(sorted({b["kind"] for b in blocks if b.get("weight")})))
        )
    if not candidates:
        print(f"no finished runs match {args.runs!r}", file=sys.stderr)
        return 2
    results = evaluate(
        [spec for spec, _, _ in candidates],
        args.tasks,
        args.steps,
        args.seeds,
        eval_split="val",
        progress=not args.no_progress,
    )
    scores = []
    for spec, weights, kinds in candidates:
        model = spec.info["path"]
        accs = [r.final("accuracy") for r in results.runs if r.optimizer == spec.label]
        mean, half = mean_confidence_interval(accs)
        scores.append(
            {
                "model": model,
                "weights": weights,
                "kinds": list(kinds),
                "val_accuracy": mean,
                "ci95": half,
                "runs": len(accs),
            }
        )

    best = best_of(scores)
    out = {
        "selected": best,
        "candidates": scores,
        "tasks": args.tasks,
        "steps": args.steps,
        "seeds": args.seeds,
        "split": "val",
        "rule": "best mean validation accuracy over tasks and seeds; ties: smaller weight",
    }
    if args.by_kind:
        groups = sorted({tuple(s["kinds"]) for s in scores if s["kinds"]})
        out["selected_by_kind"] = {
            "+".join(g): best_of([s for s in scores if tuple(s["kinds"]) in (g, ())]) for g in groups
        }
        # the zoo's convention when w = 0 wins: ship the kind's best non-zero weight (and say so in its card)
        out["best_nonzero_by_kind"] = {
            "+".join(g): best_of([s for s in scores if tuple(s["kinds"]) == g]) for g in groups
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for s in scores:
        print(
            f"{s['model']}: weights {s['weights']}  val accuracy {100 * s['val_accuracy']:.2f} ± "
            f"{100 * s['ci95']:.2f} ({s['runs']} runs)"
        )
    for kind, chosen in out.get("selected_by_kind", {}).items():
        nonzero = out["best_nonzero_by_kind"][kind]
        print(
            f"selected for {kind}: {chosen['model']} (weights {chosen['weights']}); "
            f"best non-zero: {nonzero['model']} (weights {nonzero['weights']})"
        )
    print(f"selected: {best['model']} (weights {best['weights']}); wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table", help="the evidence table and claims.md")
    t.add_argument(
        "--optimizer",
        action="append",
        default=[],
        help="extra learned optimizer: zoo name, folder, or LABEL=FOLDER (repeatable)",
    )
    t.add_argument("--baselines", type=lambda s: [v for v in s.split(",") if v], default=BASELINES)
    t.add_argument("--tasks", type=lambda s: [v for v in s.split(",") if v], default=TASKS)
    t.add_argument("--data-root", default=None, help="folder holding Fashion-MNIST / CIFAR-10 (never downloaded)")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--seeds", type=int, default=10)
    t.add_argument("--tune-steps", type=int, default=None, help="steps of each baseline tuning run (default --steps)")
    t.add_argument("--patience", type=int, default=100, help="point of convergence: no improvement for N steps")
    t.add_argument("--quick", action="store_true", help="300 steps, 3 seeds, 5 probes: a smoke run of the pipeline")
    t.add_argument("--no-flatness", action="store_true")
    t.add_argument("--no-zoo", action="store_true", help="only the --optimizer entries and the baselines")
    t.add_argument("--out", default="benchmarks/results/generalization")
    s = sub.add_parser("select", help="lambda search: pick the candidate with the best validation accuracy")
    s.add_argument(
        "--runs",
        required=True,
        action="append",
        help="glob of run folders (each with model/ and config.json); repeatable",
    )
    s.add_argument(
        "--by-kind",
        action="store_true",
        help="one selection per regularizer kind; runs without a regularizer compete in every group",
    )
    s.add_argument("--tasks", type=lambda v: [x for x in v.split(",") if x], default=SELECT_TASKS)
    s.add_argument("--steps", type=int, default=1000)
    s.add_argument("--seeds", type=int, default=5)
    s.add_argument("--out", required=True)
    m = sub.add_parser("merge", help="combine several table outputs (same steps and seeds) and redo claims.md")
    m.add_argument("inputs", nargs="+", help="output folders of `table`")
    m.add_argument(
        "--learned",
        type=lambda v: [x for x in v.split(",") if x],
        default=[],
        help="labels of learned optimizers not starting with l2o-lstm",
    )
    m.add_argument("--seeds", type=int, default=None, help="keep seeds 0..N-1 of every input")
    m.add_argument(
        "--drop",
        metavar="LABEL@INPUT",
        action="append",
        default=[],
        type=_label_at_folder,
        help="leave out the runs of optimizer LABEL from input folder INPUT (repeatable); an optimizer "
        "may appear in only one input per task and seed",
    )
    m.add_argument(
        "--rename",
        metavar="LABEL@INPUT=NEW",
        action="append",
        default=[],
        type=_renaming,
        help="show the runs of optimizer LABEL from input folder INPUT as NEW (repeatable)",
    )
    m.add_argument("--out", required=True)
    for p in (t, s, m):
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--no-progress", action="store_true")
    for p in (t, m):
        p.add_argument("--no-plots", action="store_true")
        p.add_argument(
            "--record-card",
            metavar="CHECKPOINT_DIR",
            action="append",
            default=[],
            help="write the table into that checkpoint's card and config.json (repeatable)",
        )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return {"table": table, "select": select, "merge": merge}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
