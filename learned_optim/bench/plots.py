"""Plots of a suite run (matplotlib's Agg canvas directly: no global backend change)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from .evaluate import _band, _slug, _smooth

if TYPE_CHECKING:
    from .suite import SuiteResults

__all__ = ["plot_task_curves", "plot_summary"]


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
            mean, _, _ = _band([_smooth(c, max(1, steps // 50)) for c in curves])
            (line,) = ax_train.plot(range(len(mean)), mean, label=contender, lw=1.2)
            vals = [[math.nan if v is None else v for v in r["val"]["loss"]] for r in recs]
            n = max(len(v) for v in vals)
            vals = [v + [math.nan] * (n - len(v)) for v in vals]
            m, low, high = _band(vals)
            xs = recs[0]["val_steps"] + [math.nan] * (n - len(recs[0]["val_steps"]))
            ax_val.plot(xs, m, marker=".", color=line.get_color(), label=contender)
            ax_val.fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
        ax_train.set(title=f"{task}: training loss", xlabel="step", ylabel="minibatch loss (moving average)")
        ax_val.set(title=f"{task}: validation loss", xlabel="step", ylabel="validation loss")
        for ax in (ax_train, ax_val):
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        ax_train.legend(fontsize="small")
        path = Path(out_dir) / f"curves_{_slug(task)}.png"
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
