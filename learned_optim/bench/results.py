"""What one :func:`~learned_optim.bench.evaluate.evaluate` call measured, summarised and written out."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from .report import fmt_ci, json_safe, output_files, plural, table_lines, write_json
from .stats import mean_confidence_interval
from .training import RunResult, TuningResult

__all__ = ["EvaluationResults"]


@dataclasses.dataclass
class EvaluationResults:
    """Everything one :func:`evaluate` call measured.

    Attributes:
        config: the settings (steps, seeds, grids, optimizers, tasks, command, versions).
        tuning: one :class:`TuningResult` per (tuned optimizer, task).
        runs: one :class:`RunResult` per (task, optimizer, seed).
        summary: one row per (task, optimizer): final values as ``<name>`` (mean) and
            ``<name>_ci95`` (half-width of the 95% t-interval over the seeds that did not diverge).
    """

    config: dict[str, Any]
    tuning: list[TuningResult]
    runs: list[RunResult]
    summary: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.summary:
            self.summary = self._summarize()

    @property
    def metric_names(self) -> list[str]:
        """Evaluation metrics other than the loss, in order of appearance (e.g. ``["accuracy"]``)."""
        names: dict[str, None] = {}
        for run in self.runs:
            names.update({k: None for k in run.evals if k != "loss"})
        return list(names)

    def _summarize(self) -> list[dict[str, Any]]:
        window = int(self.config.get("final_window", 10))
        split = self.config.get("eval_split", "test")
        tuned = {(t.task, t.optimizer) for t in self.tuning}
        groups: dict[tuple[str, str], list[RunResult]] = {}
        for run in self.runs:
            groups.setdefault((run.task, run.optimizer), []).append(run)
        rows = []
        for (task, optimizer), runs in groups.items():
            row: dict[str, Any] = {
                "task": task,
                "optimizer": optimizer,
                "lr": runs[0].lr,
                "lr_tuned": (task, optimizer) in tuned,
                "seeds": len(runs),
                "diverged": sum(r.diverged_at is not None for r in runs),
            }
            columns = {
                "final_train_loss": [r.final_train_loss(window) for r in runs],
                f"{split}_loss": [r.final("loss") for r in runs],
            }
            columns.update({f"{split}_{m}": [r.final(m) for r in runs] for m in self.metric_names})
            columns["time_per_step_ms"] = [1e3 * r.time_per_step for r in runs]
            columns["wall_time_s"] = [r.wall_time for r in runs]
            for name in self.flatness_names:
                columns[name] = [(r.flatness or {}).get(name, math.nan) for r in runs]
            if self.flatness_names:
                columns["converged_at"] = [math.nan if r.converged_at is None else r.converged_at for r in runs]
            for name, values in columns.items():
                row[name], row[f"{name}_ci95"] = mean_confidence_interval(values)
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ text
    def markdown(self) -> str:
        """A markdown table of the summary (mean ± 95% CI over seeds), with a note saying how it was made."""
        split = self.config.get("eval_split", "test")
        metrics = self.metric_names
        header = ["Task", "Optimizer", "lr", "Final train loss", f"{split.capitalize()} loss"]
        header += [f"{split.capitalize()} {m}" + (" (%)" if m == "accuracy" else "") for m in metrics]
        header += ["Time / step (ms)", "Wall time / run (s)", "Diverged"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.summary:
            lr = "default" if row["lr"] is None else f"{row['lr']:g}"
            cells = [
                row["task"],
                row["optimizer"],
                lr + (" (tuned)" if row["lr_tuned"] else ""),
                fmt_ci(row["final_train_loss"], row["final_train_loss_ci95"]),
                fmt_ci(row[f"{split}_loss"], row[f"{split}_loss_ci95"]),
            ]
            cells += [
                fmt_ci(row[f"{split}_{m}"], row[f"{split}_{m}_ci95"], 100.0 if m == "accuracy" else 1.0)
                for m in metrics
            ]
            cells += [
                fmt_ci(row["time_per_step_ms"], row["time_per_step_ms_ci95"], digits=3),
                fmt_ci(row["wall_time_s"], row["wall_time_s_ci95"], digits=3),
                f"{row['diverged']}/{row['seeds']}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        c = self.config
        note = (
            f"Mean ± 95% confidence interval (t-distribution) over {plural(c['seeds'], 'seed')}, "
            f"{plural(c['steps'], 'step')}; final train loss = mean minibatch loss of the last "
            f"{plural(c['final_window'], 'step')}; {split} values after the last step; wall time includes "
            f"the {split} evaluations."
        )
        if self.tuning:  # steps and seeds from the tuning records (merged results mix configs)
            tune_steps = " / ".join(str(n) for n in sorted({t.steps for t in self.tuning}))
            tune_seeds = max(len(t.seeds) for t in self.tuning)
            note += (
                f" Baseline learning rates tuned on the validation split over "
                f"{sorted({lr for t in self.tuning for lr in t.grid}, reverse=True)} "
                f"({tune_steps} steps, {plural(tune_seeds, 'separate seed')})."
            )
        if c.get("command"):
            note += f"\n\nCommand: `{c['command']}`"
        return "\n".join(lines) + "\n\n" + note + "\n" + self._flatness_markdown()

    @property
    def flatness_names(self) -> list[str]:
        """Flatness metrics measured at the point of convergence (empty unless requested)."""
        names: dict[str, None] = {}
        for run in self.runs:
            names.update(dict.fromkeys(run.flatness or {}))
        return list(names)

    def _flatness_markdown(self) -> str:
        names = self.flatness_names
        if not names:
            return ""
        options = self.config.get("flatness") or {}
        header = ["Task", "Optimizer", *names, "Converged at (step)"]
        cells = [
            [
                row["task"],
                row["optimizer"],
                *(fmt_ci(row[n], row[f"{n}_ci95"]) for n in names),
                fmt_ci(row["converged_at"], row["converged_at_ci95"], digits=4),
            ]
            for row in self.summary
        ]
        lines = ["", "Flatness at the point of convergence", "", *table_lines(header, cells)]
        note = (
            f"Point of convergence: the first step after which the training loss did not improve for "
            f"{options.get('patience', '?')} steps (the last step for runs that never stalled; those count "
            f"as missing in the last column). Hessian trace ({options.get('probes', '?')} Hutchinson probes) "
            f"and top eigenvalue on {options.get('hessian_batches', '?')} `{options.get('hessian_split', '?')}` "
            f"batches; sharpness@r = max loss increase and max_grad_norm@r = max gradient norm in the "
            f"L-infinity ball of radius r on the `{options.get('pga_split', '?')}` batch, by "
            f"{options.get('steps', '?')} steps of projected gradient ascent "
            f"(step {options.get('step_fraction', '?')} r, "
            f"Gaussian start of std {options.get('init_fraction', '?')} r). Mean ± 95% CI over seeds."
        )
        return "\n".join(lines) + "\n\n" + note + "\n"

    def card_results(self) -> dict[str, Any]:
        """The summary in the compact form a checkpoint's config.json keeps (``training.results``)."""
        split = self.config.get("eval_split", "test")
        keys = ["final_train_loss", f"{split}_loss", *(f"{split}_{m}" for m in self.metric_names)]
        rows = [
            {
                "task": r["task"],
                "optimizer": r["optimizer"],
                "lr": r["lr"],
                "diverged": r["diverged"],
                **{k: [r[k], r[f"{k}_ci95"]] for k in keys},
            }
            for r in self.summary
        ]
        return json_safe(
            {
                "command": self.config.get("command"),
                "steps": self.config["steps"],
                "seeds": self.config["seeds"],
                "format": "metric: [mean, 95% CI half-width]",
                "summary": rows,
            }
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain, strict-JSON-ready data (NaN and inf become ``null``)."""
        return json_safe(
            {
                "config": self.config,
                "summary": self.summary,
                "tuning": [dataclasses.asdict(t) for t in self.tuning],
                "runs": [dataclasses.asdict(r) for r in self.runs],
            }
        )

    # ------------------------------------------------------------------ files
    def write(self, out_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Path]:
        """Write results.json, summary.csv, curves.csv, summary.md and (``plots``) curves_<task>.png."""
        files = output_files(
            out_dir,
            {
                "json": "results.json",
                "summary_csv": "summary.csv",
                "curves_csv": "curves.csv",
                "markdown": "summary.md",
            },
        )
        out = files["json"].parent
        write_json(files["json"], self.to_dict())
        self._write_summary_csv(files["summary_csv"])
        self._write_curves_csv(files["curves_csv"])
        files["markdown"].write_text(self.markdown())
        if plots:
            from .plots import plot_curves

            for task, path in plot_curves(self, out).items():
                files[f"plot:{task}"] = path
        return files

    def _write_summary_csv(self, path: Path) -> None:
        fields = list(dict.fromkeys(k for row in self.summary for k in row))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(
                {k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
                for row in self.summary
            )

    def _write_curves_csv(self, path: Path) -> None:
        split = self.config.get("eval_split", "test")
        names = ["loss", *self.metric_names]
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["task", "optimizer", "seed", "lr", "step", "train_loss", *(f"{split}_{n}" for n in names)])
            for run in self.runs:
                at = {s: i for i, s in enumerate(run.eval_steps)}
                for step in range(len(run.train_loss) + 1):
                    train = run.train_loss[step] if step < len(run.train_loss) else math.nan
                    i = at.get(step)
                    evals = [run.evals.get(n, [])[i] if i is not None and n in run.evals else math.nan for n in names]
                    writer.writerow(
                        [
                            run.task,
                            run.optimizer,
                            run.seed,
                            run.lr,
                            step,
                            *("" if not math.isfinite(v) else repr(v) for v in (train, *evals)),
                        ]
                    )
