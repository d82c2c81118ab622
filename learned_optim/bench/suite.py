"""The suite end to end: plan, tune, evaluate, summarise, write (JSON, CSV, markdown, plots).

Python::

    from learned_optim.bench import run_suite
    results = run_suite(["rnnprop-tbv"], quick=True, out="bench-out")
    print(results.markdown())

Every contender of a task runs on the seeds ``0 .. seeds-1`` (the same initialisations and batches);
tuning uses the separate seed :data:`~learned_optim.bench.run.TUNE_SEED`. Contenders are the baselines
(``adamw`` is always there: it is the reference of the speed-ups, normalised losses and win/tie/loss
counts) and each learned optimizer under each lr rule, labelled ``"<name> [<rule>]"``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..hub import BENCH_RESULTS_PREFIX
from ..kernels import cpu_model
from . import stats
from .flatness import FlatnessOptions
from .report import fmt_ci, json_safe, output_files, table_lines, write_json
from .run import (
    BASELINE_NAMES,
    LR_RULES,
    SUITE_FLATNESS,
    SUITE_VERSION,
    TUNE_SEED,
    BenchOptimizer,
    RunStore,
    Setting,
    baseline_grids,
    baseline_optimizer,
    learned_optimizer,
)
from .tasks import QUICK, QUICK_STEPS_FRACTION, SELECTION_TASKS, TASKS, Workload, get_task
from .tuning import EDGE_EXTENSIONS, Tuning, tune

__all__ = [
    "REFERENCE",
    "BASELINE_NAMES",
    "DEFAULT_BASELINES",
    "Contender",
    "SuiteResults",
    "run_suite",
    "card_key",
    "final_value",
]

REFERENCE = "adamw"
#: The baselines the suite runs by default, among :data:`BASELINE_NAMES` (the flatness-seeking ones cost 2-20
#: gradients per step).
DEFAULT_BASELINES = ("adamw", "adam", "sgd-momentum")


@dataclasses.dataclass
class Contender:
    """An optimizer under one lr rule (``rule`` is ``None`` for a baseline, which is always tuned)."""

    label: str
    optimizer: BenchOptimizer
    rule: str | None = None


#: How tables of the recipe-selection set introduce themselves (their numbers choose recipes, never report them).
SELECTION_NOTE = "Recipe-selection set (for choosing recipes; never a result) of suite"


def card_key(quick: bool) -> str:
    """The key under which ``--record-card`` files the results (config.json ``training.results``)."""
    return f"{BENCH_RESULTS_PREFIX} v{SUITE_VERSION}" + (" (quick)" if quick else "")


def _flatness_names(records: list[dict[str, Any]]) -> list[str]:
    """The flatness measures recorded by every one of ``records`` (none if a record was not measured)."""
    if not records or any("flatness" not in r for r in records):
        return []
    return [n for n in records[0]["flatness"] if all(n in r["flatness"] for r in records)]


def final_value(record: Mapping[str, Any], name: str) -> float:
    """A final value of a run record; a run that ended non-finite counts with its initial validation loss (NaN from
    a summary without it, such as a ``results.json`` run entry)."""
    v = record["final"].get(name)
    if v is None and name.endswith("_loss"):
        v = record.get("initial_val_loss")
    return math.nan if v is None else float(v)


@dataclasses.dataclass
class SuiteResults:
    """Everything one suite run measured: config, tunings, and the evaluation records per (task, contender)."""

    config: dict[str, Any]
    tuning: list[Tuning]
    records: dict[str, dict[str, list[dict[str, Any]]]]  # task -> contender -> one record per seed
    settings: dict[str, dict[str, Setting]]  # task -> contender -> the setting it ran with

    # ------------------------------------------------------------------ summaries
    def rows(self) -> list[dict[str, Any]]:
        """One row per (task, contender): means ± 95% t-intervals over seeds, ratios to AdamW, the outcome."""
        out = []
        for task, by_contender in self.records.items():
            ref = by_contender[REFERENCE]
            ref_val = [final_value(r, "val_loss") for r in ref]
            ref_test = [final_value(r, "test_loss") for r in ref]
            for contender, recs in by_contender.items():
                row: dict[str, Any] = {"task": task, "contender": contender}
                row["setting"] = self.settings[task][contender].describe()
                row["seeds"] = len(recs)
                for name in ("val_loss", "test_loss", "test_accuracy"):
                    values = [final_value(r, name) for r in recs]
                    if name == "test_accuracy" and not all(math.isfinite(v) for v in values):
                        values = []  # a seed that ended non-finite has no accuracy: n/a, not the other seeds' mean
                    row[name], row[f"{name}_ci95"] = stats.mean_confidence_interval(values)
                for name, per_step in (("speedup", False), ("speedup_per_step", True)):
                    speed = [stats.run_speedup(r, q, per_step) for r, q in zip(recs, ref, strict=True)]
                    row[name], row[f"{name}_ci95"] = stats.mean_confidence_interval(speed)
                row["norm_val_loss"] = row["val_loss"] / stats.mean_confidence_interval(ref_val)[0]
                row["norm_test_loss"] = row["test_loss"] / stats.mean_confidence_interval(ref_test)[0]
                diff, half, outcome = stats.paired_outcome([final_value(r, "test_loss") for r in recs], ref_test)
                row["test_loss_diff"], row["test_loss_diff_ci95"], row["outcome"] = diff, half, outcome
                row["diverged"] = sum(stats.diverged(r["train_loss"], r["nonfinite_at"]) for r in recs)
                row["nonfinite"] = sum(r["nonfinite_at"] is not None for r in recs)
                row["ms_per_step"] = 1e3 * sum(r["time_per_step"] for r in recs) / len(recs)
                for name in _flatness_names(recs):
                    values = [math.nan if r["flatness"].get(name) is None else r["flatness"][name] for r in recs]
                    row[name], row[f"{name}_ci95"] = stats.mean_confidence_interval(values)
                out.append(row)
        return out

    def aggregates(self, rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """Per contender over tasks: IQMs of normalised val/test loss and of speed-up, wins/ties/losses."""
        rows = self.rows() if rows is None else rows
        out = []
        for contender in dict.fromkeys(r["contender"] for r in rows):
            mine = [r for r in rows if r["contender"] == contender]
            agg: dict[str, Any] = {"contender": contender, "tasks": len(mine)}
            for name in ("norm_val_loss", "norm_test_loss", "speedup", "speedup_per_step"):
                agg[f"iqm_{name}"] = stats.iqm([r[name] for r in mine])
            for outcome, column in stats.OUTCOME_COUNTS.items():
                agg[column] = sum(r["outcome"] == outcome for r in mine)
            agg["diverged_runs"] = sum(r["diverged"] for r in mine)
            agg["runs"] = sum(r["seeds"] for r in mine)
            out.append(agg)
        return out

    # ------------------------------------------------------------------ text
    def markdown(self) -> str:
        """The aggregate table, the per-task table and a note on how they were made."""
        rows = self.rows()
        c = self.config
        recorded = {r.get("threads") for by in self.records.values() for recs in by.values() for r in recs}
        trained_threads = " or ".join(str(t) for t in sorted(t for t in recorded if t is not None)) or "unrecorded"
        lines = [
            "| Optimizer | IQM val loss / AdamW | IQM test loss / AdamW | IQM speed-up | (per step) | W / T / L vs "
            "AdamW (test loss) | Diverged runs |",
            "|---|---|---|---|---|---|---|",
        ]
        for a in self.aggregates(rows):
            lines.append(
                f"| {a['contender']} | {a['iqm_norm_val_loss']:.3f} | {a['iqm_norm_test_loss']:.3f} | "
                f"{a['iqm_speedup']:.2f}x | {a['iqm_speedup_per_step']:.2f}x | "
                f"{a['wins']} / {a['ties']} / {a['losses']} | "
                f"{a['diverged_runs']}/{a['runs']} |"
            )
        lines += [
            "",
            "| Task | Optimizer | Setting | Val loss | Test loss | Test acc (%) | Val / AdamW | Speed-up | "
            "vs AdamW | Diverged | ms / step |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            acc = fmt_ci(r["test_accuracy"], r["test_accuracy_ci95"], 100.0)
            lines.append(
                f"| {r['task']} | {r['contender']} | {r['setting']} | {fmt_ci(r['val_loss'], r['val_loss_ci95'])} | "
                f"{fmt_ci(r['test_loss'], r['test_loss_ci95'])} | {acc} | {r['norm_val_loss']:.3f} | "
                f"{fmt_ci(r['speedup'], r['speedup_ci95'], digits=3)}x | {r['outcome']} | "
                f"{r['diverged']}/{r['seeds']} | {r['ms_per_step']:.3g} |"
            )
        note = (
            f"{SELECTION_NOTE if c.get('selection') else 'Suite'} v{c['suite_version']}"
            f"{' (quick selection)' if c['quick'] else ''}: {len(self.records)} tasks, "
            f"{len(c['seeds'])} seed(s) each ({c['seeds']}), mean ± 95% t-interval over seeds. Baselines and the "
            f"`tuned` rules were tuned on the validation split of seed {TUNE_SEED} with the full horizon. A task's "
            "loss / AdamW = the mean over seeds over AdamW's mean over seeds; IQM = interquartile mean over tasks "
            "(no interval: benchmarks/aggregate_uncertainty.py bootstraps one); speed-up = horizon / first step at "
            "which the training loss, averaged "
            "over windows of horizon/20 steps, reaches tuned AdamW's last window (< 1: AdamW's step reaching the "
            "optimizer's last window / horizon; 0: non-finite); (per step): the same with the average ending at "
            "every step instead of every window (finer than the windows' levels 20/k; noise lifts both above 1, "
            "AdamW's own included); "
            "W / T / L: paired 95% interval of the test-loss difference to AdamW below / containing / above 0. "
            "Diverged: non-finite, or a final training loss above the first step's; a non-finite run counts with "
            "its initial validation loss, and its contender's test accuracy is n/a. "
            f"torch {c['torch']}, {c['threads']} thread(s), {c['machine']}; stdlib corpus "
            f"{c['corpus_fingerprint']} (Python {c['python']}). ms / step: as each run measured it when it was "
            f"trained ({trained_threads} thread(s); a run reused from the store keeps its own)."
        )
        if c.get("command"):
            note += f"\n\nCommand: `{c['command']}`"
        return "\n".join(lines + self._flatness_lines(rows)) + "\n\n" + note + "\n"

    def _flatness_lines(self, rows: list[dict[str, Any]]) -> list[str]:
        """The flatness table (runs measured with ``flatness``): each measure's mean ± 95% interval over seeds,
        one column per measure the records hold, in the order they were measured."""
        names = list(
            dict.fromkeys(n for by in self.records.values() for recs in by.values() for n in _flatness_names(recs))
        )
        if not names:
            return []
        cells = [
            [r["task"], r["contender"], *(fmt_ci(r[n], r[f"{n}_ci95"], digits=3) if n in r else "" for n in names)]
            for r in rows
        ]
        title = "Flatness at the final weights (Hessian on training batches, PGA sharpness on a validation batch):"
        return ["", title, "", *table_lines(["Task", "Optimizer", *names], cells)]

    def tuning_markdown(self) -> str:
        """Every grid with its validation losses and the chosen setting."""
        lines = ["| Task | Contender | Grid: setting -> final val loss | Chosen |", "|---|---|---|---|"]
        for t in self.tuning:
            grid = "; ".join(f"{s.describe()} -> {v:.4g}" for s, v in zip(t.settings, t.val_loss, strict=True))
            lines.append(f"| {t.task} | {t.contender} | {grid} | {t.chosen.describe()} |")
        return "\n".join(lines) + "\n"

    def card_results(self) -> dict[str, Any]:
        """Compact results for a checkpoint's config.json (``training.results``)."""
        rows = self.rows()
        keep = ("task", "contender", "setting", "val_loss", "test_loss", "test_accuracy", "speedup", "outcome")
        return json_safe(
            {
                "command": self.config.get("command"),
                "suite_version": self.config["suite_version"],
                "quick": self.config["quick"],
                "seeds": len(self.config["seeds"]),
                "aggregates": self.aggregates(rows),
                "summary": [{k: r[k] for k in keep} for r in rows],
            }
        )

    def to_dict(self) -> dict[str, Any]:
        rows = self.rows()
        return json_safe(
            {
                "config": self.config,
                "aggregates": self.aggregates(rows),
                "summary": rows,
                "tuning": [t.to_dict() for t in self.tuning],
                "runs": [
                    {"task": task, "contender": contender, "key": r["key"], "seed": r["seed"], "final": r["final"]}
                    for task, by in self.records.items()
                    for contender, recs in by.items()
                    for r in recs
                ],
            }
        )

    # ------------------------------------------------------------------ files
    def write(self, out_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Path]:
        """results.json, summary.csv, aggregates.csv, summary.md, tuning.md, curves_<task>.png, summary.png."""
        names = {
            "json": "results.json",
            "summary_csv": "summary.csv",
            "aggregates_csv": "aggregates.csv",
            "markdown": "summary.md",
            "tuning": "tuning.md",
        }
        files = output_files(out_dir, names)
        out = files["json"].parent
        data = self.to_dict()
        write_json(files["json"], data)
        _write_csv(files["summary_csv"], data["summary"])
        _write_csv(files["aggregates_csv"], data["aggregates"])
        files["markdown"].write_text(self.markdown())
        files["tuning"].write_text(self.tuning_markdown())
        if plots:
            from .plots import plot_summary, plot_task_curves

            for task, path in plot_task_curves(self, out).items():
                files[f"plot:{task}"] = path
            files["plot:summary"] = plot_summary(self, out)
        return files


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)


# ------------------------------------------------------------------------------------------ run
def run_suite(
    optimizers: Sequence[str] = (),
    *,
    out: str | os.PathLike,
    tasks: Sequence[str] | None = None,
    baselines: Sequence[str] = DEFAULT_BASELINES,
    lr_rules: Sequence[str] = ("default", "tuned"),
    seeds: int | None = None,
    first_seed: int = 0,
    quick: bool = False,
    steps: int | None = None,
    data_root: str | None = None,
    extra_run_dirs: Sequence[str | os.PathLike] = (),
    reuse: bool = True,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
    flatness: FlatnessOptions | bool | None = None,
    adapt_steps: int = 0,
    selection: bool = False,
) -> SuiteResults:
    """Run (or reuse from ``out``'s run store) the suite for the baselines and ``optimizers``.

    Args:
        optimizers: learned optimizers (zoo names, checkpoint folders, Hub ids).
        out: output folder; its ``runs/`` holds one JSON record per finished run (reused on a rerun).
        tasks: task names (default: all of :data:`~learned_optim.bench.tasks.TASKS`, or
            :data:`~learned_optim.bench.tasks.QUICK` with ``quick``).
        baselines: among :data:`BASELINE_NAMES` (``adamw`` always runs: the reference); default
            :data:`DEFAULT_BASELINES`.
        lr_rules: for the learned optimizers, among :data:`~learned_optim.bench.run.LR_RULES` (``adamw``,
            ``tuned``, ``tuned-wd``, ``default``; see :mod:`learned_optim.bench.run`).
        seeds: how many evaluation seeds (default 3, or 1 with ``quick``): ``first_seed .. first_seed+seeds-1``.
        first_seed: the first evaluation seed (default 0; a later block of seeds gives fresh runs of every
            contender, e.g. to decide on seeds nobody has seen; the tuning seed is never an evaluation seed).
        quick: the quick selection: :data:`QUICK` tasks at :data:`QUICK_STEPS_FRACTION` of their steps,
            1 seed, the small grids :data:`~learned_optim.bench.run.QUICK_GRIDS`.
        steps: the horizon of every task (default: each task's own, a quarter of it with ``quick``); for
            smoke runs and tests (runs of another horizon are different runs in the store).
        data_root: folder of the text corpus (default: this Python's standard library).
        extra_run_dirs: more output folders whose run records may be reused (never written).
        reuse: reuse stored records (``False`` retrains and overwrites).
        flatness: measure the flatness of every evaluation run's final weights
            (:class:`~learned_optim.bench.flatness.FlatnessOptions`; ``True`` for
            :data:`~learned_optim.bench.run.SUITE_FLATNESS`). Tuning runs are not measured; measured runs are
            separate records, so stored runs without the measures are trained again.
        adapt_steps: also run every learned optimizer adapted to each run's model first, ``adapt_steps`` steps of
            :func:`learned_optim.adapt` (:func:`~learned_optim.bench.run.adapt_before_training`), as the
            contender ``<name>+adapt<steps>`` beside the unadapted one.
        selection: run the recipe-selection set (:data:`~learned_optim.bench.tasks.SELECTION_TASKS`, all of it
            by default) instead of the suite: for choosing recipes, never reported as a result (not with ``quick``).
    """
    from tqdm.auto import tqdm

    if selection and quick:
        raise ValueError("the selection set has no quick variant: drop --quick (it runs in a few minutes)")
    if tasks is not None and not list(tasks):
        raise ValueError("no task given: name one or more tasks, or leave the option out for the default set")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    task_names = (
        list(dict.fromkeys(tasks)) if tasks else list(SELECTION_TASKS if selection else QUICK if quick else TASKS)
    )
    bench_tasks = [get_task(n, selection) for n in task_names]
    rules = list(dict.fromkeys(lr_rules))
    bad = [r for r in rules if r not in LR_RULES]
    if bad:
        raise ValueError(f"unknown lr rule(s) {bad}; known: {', '.join(LR_RULES)}")
    names = list(dict.fromkeys([REFERENCE, *baselines]))
    base = {n: baseline_optimizer(n) for n in names}
    learned = [learned_optimizer(o) for o in optimizers]
    learned += [learned_optimizer(o, adapt_steps) for o in optimizers if adapt_steps]
    if len({o.name for o in learned}) != len(learned):
        raise ValueError(f"learned optimizers must have distinct names, got {[o.name for o in learned]}")
    n_seeds = (1 if quick else 3) if seeds is None else int(seeds)
    if n_seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {n_seeds}")
    seed_list = list(range(first_seed, first_seed + n_seeds))
    if first_seed < 0 or TUNE_SEED in seed_list:
        raise ValueError(f"evaluation seeds must be >= 0 and exclude the tuning seed {TUNE_SEED}, got {seed_list}")
    flat = SUITE_FLATNESS if flatness is True else (flatness or None)
    grids = baseline_grids(names, quick)
    extend = 0 if quick else EDGE_EXTENSIONS
    workloads: list[Workload] = [
        t.bind(data_root, steps or (max(1, round(t.steps * QUICK_STEPS_FRACTION)) if quick else None))
        for t in bench_tasks
    ]
    contenders = [Contender(n, o) for n, o in base.items()]
    contenders += [Contender(f"{o.name} [{r}]", o, r) for o in learned for r in rules]

    def planned_runs() -> int:
        per = sum(len(grids[n].settings(n)) for n in names) + len(contenders) * n_seeds
        per += sum(
            len(o.tuned_grid(grids[REFERENCE], r, quick)) for o in learned for r in rules if r.startswith("tuned")
        )
        return per

    planned = {w.name: w.steps * planned_runs() for w in workloads}  # steps per task, grid extensions aside
    store = RunStore(out, extra=extra_run_dirs, reuse=reuse)
    tunings: list[Tuning] = []
    records: dict[str, dict[str, list[dict[str, Any]]]] = {}
    settings: dict[str, dict[str, Setting]] = {}
    with tqdm(
        total=sum(planned.values()), disable=not progress, unit="step", dynamic_ncols=True, mininterval=1.0
    ) as bar:
        say = log or bar.write

        def advance(task: str, steps: int) -> None:
            planned[task] -= steps
            if planned[task] < 0 and bar.total is not None:  # a grid extended past an edge: runs not planned
                bar.total += steps
            bar.update(steps)

        for w in workloads:

            def runner(
                opt: BenchOptimizer, w: Workload = w, flatness: FlatnessOptions | None = None
            ) -> Callable[[Setting, int], dict[str, Any]]:
                return lambda setting, seed: store.run(
                    w, opt, setting, seed, functools.partial(advance, w.name), flatness
                )

            chosen: dict[str, Setting] = {}
            for name, opt in base.items():
                bar.set_description(f"{w.name} | tuning {name}")
                result = tune(name, grids[name].settings(name), runner(opt), task=w.name, extend_edges=extend)
                tunings.append(result)
                say(result.describe())
                chosen[name] = result.chosen
            for c in contenders[len(base) :]:
                o = c.optimizer
                assert c.rule is not None  # every learned contender has a rule
                if c.rule == "adamw":
                    ref = chosen[REFERENCE]
                    chosen[c.label] = Setting(o.name, ref.lr, ref.weight_decay, ref.schedule)
                elif c.rule == "default":
                    chosen[c.label] = o.default_setting()
                else:
                    bar.set_description(f"{w.name} | tuning {c.label}")
                    grid = o.tuned_grid(grids[REFERENCE], c.rule, quick)
                    result = tune(c.label, grid, runner(o), task=w.name, extend_edges=extend)
                    tunings.append(result)
                    say(result.describe())
                    chosen[c.label] = result.chosen
            records[w.name] = {}
            for c in contenders:
                bar.set_description(f"{w.name} | {c.label}")
                records[w.name][c.label] = [runner(c.optimizer, flatness=flat)(chosen[c.label], s) for s in seed_list]
            settings[w.name] = chosen
    config = {
        "suite_version": SUITE_VERSION,
        "quick": quick,
        "selection": selection,
        "tasks": {w.name: {**w.config, "config_hash": w.config_hash} for w in workloads},
        "contenders": [
            {"label": c.label, "optimizer": c.optimizer.name, "rule": c.rule, "identity": c.optimizer.identity}
            for c in contenders
        ],
        "grids": {n: dataclasses.asdict(grids[n]) for n in names},
        "seeds": seed_list,
        "tune_seed": TUNE_SEED,
        "edge_extensions": extend,
        "flatness": None if flat is None else dataclasses.asdict(flat),
        "adapt_steps": adapt_steps,
        "lr_rules": rules,
        # the text corpus the tasks read (each lm task binds its own, the same for all tasks of a run)
        "corpus_fingerprint": next((w.splits.fingerprint for w in workloads if w.task.uses_data_root), None),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": cpu_model(),
        "runs_trained": store.trained,
        "runs_reused": store.reused,
        "command": command,
    }
    return SuiteResults(config, tunings, records, settings)
