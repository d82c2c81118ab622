"""Plots of an evaluation and of a suite run (matplotlib's Agg canvas directly: no global backend change)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from .report import slug
from .stats import mean_confidence_interval

if TYPE_CHECKING:
    from .results import EvaluationResults
    from .suite import SuiteResults

__all__ = ["plot_curves", "plot_task_curves", "plot_summary"]


def band(curves: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Pointwise mean and 95% t-interval over runs (non-finite values dropped)."""
    mean, low, high = [], [], []
    for values in zip(*curves, strict=True):
        m, h = mean_confidence_interval(values)
        h = 0.0 if not math.isfinite(h) else h
        mean.append(m)
        low.append(m - h)
        high.append(m + h)
    return mean, low, high


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (over finite values) for plotting noisy minibatch losses."""
    out = []
    for i in range(len(values)):
        tail = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(sum(tail) / len(tail) if tail else math.nan)
    return out


def plot_curves(results: EvaluationResults, out_dir: str | Path) -> dict[str, Path]:
    """One PNG per task: the training loss and each test metric against steps, with 95% bands over seeds.

    The minibatch training loss is smoothed by a trailing moving average over ``steps // 50`` steps and,
    when positive, drawn on a log scale as the geometric mean over seeds (the band is the 95% t-interval
    of the mean log-loss); test metrics are arithmetic means with their 95% t-interval. Uses
    matplotlib's Agg canvas directly, so no global backend is changed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    split = results.config.get("eval_split", "test")
    names = ["loss", *results.metric_names]
    paths = {}
    for task in dict.fromkeys(r.task for r in results.runs):
        runs = [r for r in results.runs if r.task == task]
        fig = Figure(figsize=(5.0 * (1 + len(names)), 4.0), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 1 + len(names), squeeze=False)[0]
        steps = max(len(r.train_loss) for r in runs)
        window = max(1, steps // 50)
        log_scale = all(v > 0 for r in runs for v in r.train_loss if math.isfinite(v))
        for optimizer in dict.fromkeys(r.optimizer for r in runs):
            mine = [r for r in runs if r.optimizer == optimizer]
            label = f"{optimizer} (lr {mine[0].lr:g})" if mine[0].lr is not None else optimizer
            smoothed = [smooth(r.train_loss, window) for r in mine]
            if log_scale:  # geometric mean and a multiplicative band: the mean of log-losses and its 95% CI
                logs = band([[math.log(v) for v in curve] for curve in smoothed])
                mean, low, high = ([math.exp(v) for v in c] for c in logs)
            else:
                mean, low, high = band(smoothed)
            (line,) = axes[0].plot(range(len(mean)), mean, label=label)
            axes[0].fill_between(range(len(mean)), low, high, color=line.get_color(), alpha=0.2)
            for ax, name in zip(axes[1:], names, strict=True):
                mean, low, high = band([r.evals.get(name, []) for r in mine])
                ax.plot(mine[0].eval_steps, mean, marker=".", color=line.get_color(), label=label)
                ax.fill_between(mine[0].eval_steps, low, high, color=line.get_color(), alpha=0.2)
        average = "geometric mean" if log_scale else "mean"
        axes[0].set(
            title=f"{task}: training loss",
            xlabel="step",
            yscale="log" if log_scale else "linear",
            ylabel=f"minibatch loss ({average}, moving avg {window})",
        )
        for ax, name in zip(axes[1:], names, strict=True):
            ax.set(title=f"{task}: {split} {name}", xlabel="step", ylabel=f"{split} {name}")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize="small")
        path = Path(out_dir) / f"curves_{slug(task)}.png"
        fig.savefig(path, dpi=100)
        paths[task] = path
    return paths


def _figure(width: float, height: float, columns: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, columns, squeeze=False)[0]


def plot_task_curves(results: SuiteResults, out_dir: str | Path) -> dict[str, Path]:
    """One PNG per task: the training loss (trailing moving average over ``steps // 50`` steps, mean over
    seeds) and the validation loss at its measured steps (mean and 95% band over seeds), per contender."""
    paths = {}
    for task, by_contender in results.records.items():
        fig, (ax_train, ax_val) = _figure(11.0, 4.0, 2)
        for contender, recs in by_contender.items():
            curves = [[math.nan if v is None else v for v in r["train_loss"]] for r in recs]
            steps = max(len(c) for c in curves)
            curves = [c + [math.nan] * (steps - len(c)) for c in curves]
            mean, _, _ = band([smooth(c, max(1, steps // 50)) for c in curves])
            (line,) = ax_train.plot(range(len(mean)), mean, label=contender, lw=1.2)
            vals = [[math.nan if v is None else v for v in r["val"]["loss"]] for r in recs]
            n = max(len(v) for v in vals)
            vals = [v + [math.nan] * (n - len(v)) for v in vals]
            m, low, high = band(vals)
            xs = recs[0]["val_steps"] + [math.nan] * (n - len(recs[0]["val_steps"]))
            ax_val.plot(xs, m, marker=".", color=line.get_color(), label=contender)
            ax_val.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
        ax_train.set(title=f"{task}: training loss", xlabel="step", ylabel="minibatch loss (moving average)")
        ax_val.set(title=f"{task}: validation loss", xlabel="step", ylabel="validation loss")
        for ax in (ax_train, ax_val):
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        ax_train.legend(fontsize="small")
        path = Path(out_dir) / f"curves_{slug(task)}.png"
        fig.savefig(path, dpi=90)
        paths[task] = path
    return paths


def plot_summary(results: SuiteResults, out_dir: str | Path) -> Path:
    """summary.png: per task, each contender's final validation loss / AdamW's and its speed-up (log scales)."""
    rows = results.rows()
    tasks = list(results.records)
    contenders = list(dict.fromkeys(r["contender"] for r in rows))
    fig, (ax_loss, ax_speed) = _figure(13.0, 5.0, 2)
    for i, contender in enumerate(contenders):
        mine = {r["task"]: r for r in rows if r["contender"] == contender}
        offset = (i - (len(contenders) - 1) / 2) * 0.8 / max(1, len(contenders))
        xs = [k + offset for k, t in enumerate(tasks) if t in mine]
        ax_loss.scatter(xs, [mine[t]["norm_val_loss"] for t in tasks if t in mine], label=contender, s=18)
        ax_speed.scatter(xs, [max(mine[t]["speedup"], 1e-2) for t in tasks if t in mine], label=contender, s=18)
    for ax, title in ((ax_loss, "final validation loss / tuned AdamW's"), (ax_speed, "speed-up vs tuned AdamW")):
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right", fontsize="small")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize="small")
    path = Path(out_dir) / "summary.png"
    fig.savefig(path, dpi=90)
    return path
