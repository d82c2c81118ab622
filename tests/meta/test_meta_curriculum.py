"""Curriculum advance/stop logic (SPEC §2) driven by scripted evaluation scores."""

from __future__ import annotations

import pytest

from learned_optim.meta.config import CurriculumConfig
from learned_optim.meta.curriculum import Curriculum


def run(scores, stages=(100, 200, 500), min_evals=3):
    cur = Curriculum(CurriculumConfig(enabled=True, stages=list(stages), min_evals=min_evals))
    trace = []
    for score in scores:
        before = (cur.stage, cur.train_length, cur.eval_length)
        decision = cur.report(score)
        trace.append((before, decision.new_best, decision.action, decision.reason))
        if cur.finished:
            break
    return cur, trace


def test_lengths_train_at_the_stage_and_evaluate_at_the_next():
    cur = Curriculum(CurriculumConfig(enabled=True, stages=[100, 200, 500]))
    assert (cur.train_length, cur.eval_length) == (100, 200)
    cur.stage = 2
    assert (cur.train_length, cur.eval_length) == (500, 500)  # the last stage evaluates at its own length


def test_evaluation_schedule_counts_meta_epochs():
    cur = Curriculum(CurriculumConfig(enabled=True, eval_every=100))
    assert [e for e in range(0, 401) if cur.should_evaluate(e)] == [100, 200, 300, 400]


def test_advance_after_min_evals_with_an_improvement_then_stop_without_one():
    cur, trace = run(
        [
            5.0,
            6.0,
            7.0,  # stage 0: first eval improves (vs inf) -> advance after 3 evals
            4.0,
            4.5,
            3.9,  # stage 1: improvements -> advance
            4.0,
            4.1,
            3.95,
        ]
    )  # stage 2: nothing beats 3.9 -> stop (not completed)
    actions = [t[2] for t in trace]
    assert actions == [
        "continue",
        "continue",
        "advance",
        "continue",
        "continue",
        "advance",
        "continue",
        "continue",
        "finish",
    ]
    assert [t[1] for t in trace] == [True, False, False, True, False, True, False, False, False]
    assert [t[0][0] for t in trace] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert cur.finished and cur.reason == "no_improvement" and cur.best_score == 3.9 and cur.stage == 2


def test_best_score_carries_across_stages():
    # stage 1's evaluations (at the longer length) must beat stage 0's best to count as improvements
    cur, trace = run([2.0, 2.5, 2.5, 3.0, 3.0, 3.0])
    assert [t[2] for t in trace] == ["continue", "continue", "advance", "continue", "continue", "finish"]
    assert cur.reason == "no_improvement" and cur.stage == 1


def test_last_stage_finishes_cleanly():
    cur, trace = run([3.0, 3.0, 3.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0], stages=(10, 20, 30))
    assert [t[2] for t in trace][-1] == "finish"
    assert cur.finished and cur.reason == "completed" and cur.stage == 2
    assert (cur.train_length, cur.eval_length) == (30, 30)
    with pytest.raises(RuntimeError, match="finished"):
        cur.report(0.5)


def test_state_round_trip():
    cur, _ = run([5.0, 4.0, 6.0, 3.0])
    clone = Curriculum(cur.config)
    clone.load_state_dict(cur.state_dict())
    assert clone.state_dict() == cur.state_dict()
    assert clone.report(2.0) == cur.report(2.0)


def test_non_finite_scores_never_improve():
    cur, trace = run([float("nan"), float("inf"), float("nan")])
    assert cur.finished and cur.reason == "no_improvement"
