r"""Tuning a contender on a task: a grid search on the validation split of the tuning seed that, in the full suite,
grows the grid past a winning edge (:func:`tune`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .run import TUNE_SEED, Setting
from .stats import mean_confidence_interval

__all__ = ["EDGE_EXTENSIONS", "Tuning", "chosen_settings", "ladder_neighbour", "tune"]

#: How many times the full suite's tuning extends a grid past an edge, per edge and axis (:func:`tune`).
EDGE_EXTENSIONS = 2


def _final_val(record: dict[str, Any]) -> float:
    v = record["final"]["val_loss"]
    return math.inf if v is None else float(v)


@dataclasses.dataclass
class Tuning:
    """One grid search: each setting's final validation loss (mean over the tuning seeds) and the choice."""

    task: str
    contender: str
    settings: list[Setting]
    val_loss: list[float]
    chosen: Setting
    seeds: list[int]

    def describe(self) -> str:
        tried = ", ".join(f"{s.describe()}: {v:.4g}" for s, v in zip(self.settings, self.val_loss, strict=True))
        return f"[tune] {self.contender} on {self.task}: {{{tried}}} -> {self.chosen.describe()}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "contender": self.contender,
            "grid": [
                {**dataclasses.asdict(s), "val_loss": v if math.isfinite(v) else None}
                for s, v in zip(self.settings, self.val_loss, strict=True)
            ],
            "chosen": dataclasses.asdict(self.chosen),
            "seeds": self.seeds,
        }


def chosen_settings(results: Mapping[str, Any], contender: str) -> dict[str, Setting]:
    """Per task, the setting ``contender``'s tuning chose, from a suite's ``results.json`` (its ``tuning`` entries,
    :meth:`Tuning.to_dict`)."""
    return {t["task"]: Setting(**t["chosen"]) for t in results["tuning"] if t["contender"] == contender}


def ladder_neighbour(lr: float, up: bool) -> float:
    """The next learning rate above (``up``) or below ``lr`` on the 1-3-10 ladder of the grids (3e-2 -> 1e-1,
    3e-4 -> 1e-4); off-ladder values move by a factor sqrt(10)."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10**exponent
    if math.isclose(mantissa, 1.0, rel_tol=1e-6):
        value = 3 * 10**exponent if up else 3 * 10 ** (exponent - 1)
    elif math.isclose(mantissa, 3.0, rel_tol=1e-6):
        value = 10 ** (exponent + 1) if up else 10**exponent
    else:
        value = lr * math.sqrt(10) if up else lr / math.sqrt(10)
    return float(f"{value:.6g}")


def tune(
    contender: str,
    settings: Sequence[Setting],
    evaluate: Callable[[Setting, int], dict[str, Any]],
    *,
    task: str,
    seeds: Sequence[int] = (TUNE_SEED,),
    extend_edges: int = 0,
) -> Tuning:
    """Pick the setting with the lowest mean final validation loss over ``seeds``.

    ``evaluate(setting, seed)`` returns a run record. A run with a non-finite loss counts as +inf; ties
    go to the earlier setting; if every setting fails, the first (smallest lr) is kept. With
    ``extend_edges`` :math:`k > 0` the grid grows past a winning edge, along each axis that the grid tunes
    (two or more values), at most :math:`k` times per edge, so that the choice is interior unless an axis
    was extended :math:`k` times:

    * lr: a choice at the smallest or largest lr tried adds :func:`ladder_neighbour` past it, at every weight
      decay and schedule tried;
    * weight decay: a choice at the largest weight decay tried adds the next one up the ladder (0.1 -> 0.3 ->
      1), at every lr and schedule tried; at the smallest, the next one down unless it is 0 (no decay).

    The lr edge is extended first; the grid stays the product of the values tried on each axis.
    """
    if not settings:
        raise ValueError(f"empty tuning grid for {contender} on {task}")
    tried: list[Setting] = []
    losses: list[float] = []

    def run(batch: Sequence[Setting]) -> None:
        for setting in dict.fromkeys(batch):
            if setting in tried:
                continue
            finals = [_final_val(evaluate(setting, seed)) for seed in seeds]
            tried.append(setting)
            losses.append(mean_confidence_interval(finals)[0] if all(math.isfinite(v) for v in finals) else math.inf)

    def extension(field: str, best: Setting) -> list[Setting] | None:
        """The settings that extend the grid past ``best``'s ``field`` value, if it sits at an edge."""
        values = sorted({getattr(s, field) for s in tried})
        value = getattr(best, field)
        if len(values) < 2 or value not in (values[0], values[-1]):
            return None
        up = value == values[-1]
        if extended[field, up] >= extend_edges or (field == "weight_decay" and not up and value == 0.0):
            return None
        extended[field, up] += 1
        new = ladder_neighbour(value, up)
        if field == "lr":
            return [dataclasses.replace(s, lr=new) for s in tried]
        return [dataclasses.replace(s, weight_decay=new) for s in tried]

    run(settings)
    extended = dict.fromkeys(((f, up) for f in ("lr", "weight_decay") for up in (False, True)), 0)
    while True:
        best = min(range(len(tried)), key=lambda i: (losses[i], i))
        if not math.isfinite(losses[best]):
            break
        batch = extension("lr", tried[best]) or extension("weight_decay", tried[best])
        if batch is None:
            break
        run(batch)
    return Tuning(task, contender, tried, losses, tried[best], list(seeds))
