"""Curriculum over trajectory lengths (Chen et al., 2020, "Training Stronger Baselines for L2O").

Stages have total trajectory lengths ``stages`` (default 100, 200, 500, 1000, 1500, 2000, 2500, 3000),
trained in segments. The logic, exactly:

1. Training at stage ``k`` uses trajectories of ``stages[k]`` steps.
2. Every ``eval_every`` meta-epochs (trajectories, counted over the whole run) the net is evaluated on
   ``eval_runs`` fixed runs of the *next* stage's length ``stages[k + 1]`` (the last stage evaluates at
   its own length). The score is the mean over runs of the final loss (``score="final"``) or of the
   mean loss along the run (``"mean"``). Lower is better.
3. A score below the best so far (kept across stages, as in the reference) is an *improvement*: the
   net is snapshotted as the best.
4. After at least ``min_evals`` evaluations in the current stage:

   * if any of them improved: restore the best net and advance to stage ``k + 1``, resetting the
     evaluation count and the improvement flag; advancing past the last stage *completes* the
     curriculum (the reference crashed here; we finish cleanly with the best net restored);
   * otherwise: restore the best net and stop (``"no_improvement"``).

:class:`Curriculum` holds only this bookkeeping (scores in, decisions out); the trainer evaluates,
snapshots and restores. Its state is JSON-serialisable for checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .config import CurriculumConfig

__all__ = ["Decision", "Curriculum"]


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the trainer must do after an evaluation.

    ``new_best``: snapshot the current net as the best. ``action``: ``"continue"`` training at the same
    stage, ``"advance"`` (restore the best, then train at the next stage) or ``"finish"`` (restore the
    best and end the run; ``reason`` is ``"completed"`` or ``"no_improvement"``).
    """

    new_best: bool
    action: str
    reason: str | None = None
    stage: int = 0


class Curriculum:
    """Stage bookkeeping of the curriculum; feed it evaluation scores with :meth:`report`."""

    def __init__(self, config: CurriculumConfig | None = None) -> None:
        self.config = config or CurriculumConfig(enabled=True)
        self.stage = 0
        self.evals_in_stage = 0
        self.improved = False
        self.best_score = math.inf
        self.finished = False
        self.reason: str | None = None

    @property
    def num_stages(self) -> int:
        return len(self.config.stages)

    @property
    def train_length(self) -> int:
        """Trajectory length of the current stage."""
        return int(self.config.stages[self.stage])

    @property
    def eval_length(self) -> int:
        """Length of the evaluation runs: the next stage's (the last stage's own at the end)."""
        return int(self.config.stages[min(self.stage + 1, self.num_stages - 1)])

    def should_evaluate(self, meta_epochs_done: int) -> bool:
        """Whether an evaluation is due after ``meta_epochs_done`` completed meta-epochs."""
        return not self.finished and meta_epochs_done > 0 and meta_epochs_done % self.config.eval_every == 0

    def report(self, score: float) -> Decision:
        """Record an evaluation score (lower is better) and decide what happens next."""
        if self.finished:
            raise RuntimeError("the curriculum has already finished")
        stage = self.stage
        self.evals_in_stage += 1
        new_best = math.isfinite(score) and score < self.best_score
        if new_best:
            self.best_score = float(score)
            self.improved = True
        if self.evals_in_stage < self.config.min_evals:
            return Decision(new_best, "continue", stage=stage)
        if not self.improved:
            self.finished, self.reason = True, "no_improvement"
            return Decision(new_best, "finish", self.reason, stage=stage)
        self.evals_in_stage, self.improved = 0, False
        if self.stage + 1 >= self.num_stages:
            self.finished, self.reason = True, "completed"
            return Decision(new_best, "finish", self.reason, stage=stage)
        self.stage += 1
        return Decision(new_best, "advance", stage=self.stage)

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "evals_in_stage": self.evals_in_stage,
            "improved": self.improved,
            "best_score": None if math.isinf(self.best_score) else self.best_score,
            "finished": self.finished,
            "reason": self.reason,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = int(state["stage"])
        self.evals_in_stage = int(state["evals_in_stage"])
        self.improved = bool(state["improved"])
        self.best_score = math.inf if state["best_score"] is None else float(state["best_score"])
        self.finished = bool(state["finished"])
        self.reason = state["reason"]
