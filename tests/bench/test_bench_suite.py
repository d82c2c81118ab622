"""The suite's tuning, statistics, run store, quick selection and command-line errors."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math

import pytest
import torch

import learned_optim
from learned_optim.__main__ import main as cli_main
from learned_optim.bench import QUICK, run_suite, stats
from learned_optim.bench import run as brun
from learned_optim.bench import suite as bsuite
from learned_optim.bench import tuning as btuning
from learned_optim.bench.cli import main as bench_main
from learned_optim.bench.tasks import QUICK_STEPS_FRACTION, TASKS
from learned_optim.schedules import lr_factor


# ------------------------------------------------------------------------------------------ statistics
def test_iqm_on_hand_made_numbers():
    assert stats.iqm([1, 2, 3, 4, 100, 6, 7, 8]) == pytest.approx((3 + 4 + 6 + 7) / 4)
    assert stats.iqm([1.0, math.nan, 3.0, None]) == pytest.approx(2.0)
    assert math.isnan(stats.iqm([]))


def test_speedup_reached_not_reached_and_nonfinite():
    ref_steps, ref = [0, 25, 50, 75, 100], [5.0, 3.0, 2.0, 1.5, 1.0]
    assert stats.speedup([0, 25, 50, 75, 100], [5.0, 1.0, 0.9, 0.8, 0.7], ref_steps, ref, 100) == 4.0
    assert stats.speedup([0, 25, 50, 75, 100], [5.0, 4.0, 3.0, 2.5, 2.0], ref_steps, ref, 100) == 0.5
    assert stats.speedup(ref_steps, ref, ref_steps, ref, 100) == 1.0
    assert stats.speedup([0, 25], [5.0, None], ref_steps, ref, 100) == 0.0
    # a run that ended on a non-finite loss inside its last, incomplete window (the curve has complete windows only),
    # or on a non-finite validation loss with every training loss finite: 0 too, not the speed-up of its curve
    blown_up = stats.training_curve([5.0] * 25 + [0.5] * 45 + [math.nan], horizon=100, windows=4)
    assert blown_up[0] == [25, 50] and all(math.isfinite(v) for v in blown_up[1])
    assert stats.speedup(*blown_up, ref_steps, ref, 100, nonfinite=True) == 0.0
    assert stats.speedup(*blown_up, ref_steps, ref, 100) == 2.0  # what the curve alone would say


def test_training_curve_averages_windows_of_the_horizon():
    steps, values = stats.training_curve([4.0, 2.0, 3.0, 1.0, 1.0, 1.0], horizon=6, windows=3)
    assert steps == [2, 4, 6] and values == [3.0, 2.0, 1.0]
    steps, values = stats.training_curve([4.0, 2.0, 3.0, math.nan], horizon=6, windows=3)  # stopped early
    assert steps == [2, 4] and values[0] == 3.0 and math.isnan(values[1])
    decreasing = stats.training_curve([4.0] * 25 + [3.0] * 25 + [2.0] * 25 + [1.0] * 25, horizon=100, windows=4)
    assert stats.speedup(*decreasing, *decreasing, 100) == 1.0  # the reference against itself
    plateau = stats.training_curve([5.0] * 25 + [1.0] * 75, horizon=100, windows=4)
    assert stats.speedup(*plateau, *plateau, 100) == 2.0  # it was at its final level from step 50
    # a horizon that the windows do not divide: they still cover it, the first ending at or after horizon / windows
    # (the last 3 of 150 steps were left out, and a speed-up could reach 150 / 7 > 20)
    steps, _ = stats.training_curve([1.0] * 150, horizon=150, windows=20)
    assert len(steps) == 20 and steps[0] == 8 and steps[-1] == 150
    fast = stats.training_curve([1.0] * 150, horizon=150, windows=20)
    slow = stats.training_curve([2.0] * 149 + [1.0], horizon=150, windows=20)
    assert stats.speedup(*fast, *slow, 150) <= 20.0


def test_divergence_is_judged_on_the_training_loss():
    assert not stats.diverged([2.0] + [1.0] * 99, None)
    assert stats.diverged([2.0] + [1.0] * 94 + [3.0] * 5, None)  # the last 5% above the start
    assert stats.diverged([2.0, 1.0], 1) and stats.diverged([], 0) and not stats.diverged([], None)
    assert stats.diverged([2.0] + [1.0] * 98 + [math.nan], None)


def test_paired_outcome_on_hand_made_numbers():
    ref = [1.0, 2.0, 3.0]
    mean, half, outcome = stats.paired_outcome([0.5, 1.6, 2.4], ref)
    assert mean == pytest.approx(-0.5) and outcome == "win"
    # differences -0.5, -0.4, -0.6: sd 0.1, t(0.975, 2) = 4.303 -> half = 4.303 * 0.1 / sqrt(3)
    assert half == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert stats.paired_outcome([1.5, 2.4, 3.6], ref)[2] == "loss"
    assert stats.paired_outcome([0.0, 2.5, 3.4], ref)[2] == "tie"
    assert stats.paired_outcome([0.0], [1.0])[2] == "tie"  # one seed: no interval


def test_cosine_schedule_warms_up_and_decays_to_zero():
    steps = 200
    factors = [lr_factor("cosine", t, steps) for t in range(steps)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 189 / 190)))
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))
    assert lr_factor("constant", 7, steps) == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor("linear", 0, steps)


# ------------------------------------------------------------------------------------------ tuning
def test_tuning_picks_the_planted_best_point():
    grid = brun.FULL_GRIDS["adamw"].settings("adamw")
    planted = grid[3]
    val = {s: 1.0 + abs(math.log10(s.lr / planted.lr)) + (0.0 if s == planted else 0.01) for s in grid}
    val[grid[0]] = math.nan  # a diverged point counts as +inf

    def evaluate(setting, seed):
        return {"final": {"val_loss": None if math.isnan(val[setting]) else val[setting]}}

    result = btuning.tune("adamw", grid, evaluate, task="t", seeds=[1, 2])
    assert result.chosen == planted
    assert math.isinf(result.val_loss[0]) and result.val_loss[3] == pytest.approx(1.0)
    assert planted.describe() == "lr 0.001, wd 0.1, cosine" and result.describe().endswith("-> " + planted.describe())


def test_ladder_neighbours_continue_the_grids():
    assert [btuning.ladder_neighbour(lr, True) for lr in (3e-2, 1e-1, 3e-4)] == [0.1, 0.3, 1e-3]
    assert [btuning.ladder_neighbour(lr, False) for lr in (3e-4, 1e-4, 3e-2)] == [1e-4, 3e-5, 1e-2]
    assert btuning.ladder_neighbour(2e-3, True) == pytest.approx(2e-3 * math.sqrt(10), rel=1e-5)


@pytest.mark.parametrize(
    ("optimum", "expected_lr", "extra"), [(0.2, 0.3, 2), (0.05, 3e-2, 1), (1e-4, 1e-4, 2), (1e-6, 3e-5, 2)]
)
def test_a_winning_edge_extends_the_grid_until_the_choice_is_interior(optimum, expected_lr, extra):
    """A bowl in log-lr with its minimum at ``optimum``: the grid grows past the winning edge (both weight
    decays), at most twice per edge, and the choice is the best point tried."""
    grid = brun.FULL_GRIDS["adamw"].settings("adamw")

    def evaluate(setting, seed):
        return {"final": {"val_loss": 1.0 + abs(math.log10(setting.lr / optimum)) + setting.weight_decay}}

    result = btuning.tune("adamw", grid, evaluate, task="t", extend_edges=2)
    assert result.settings[: len(grid)] == grid and len(result.settings) == len(grid) + 2 * extra
    assert result.chosen == brun.Setting("adamw", expected_lr, 0.0, "cosine")
    assert {s.weight_decay for s in result.settings[len(grid) :]} == {0.0, 0.1}
    assert btuning.tune("adamw", grid, evaluate, task="t").settings == grid  # off by default


@pytest.mark.parametrize(
    ("best_wd", "expected_wd", "added"), [(0.3, 0.3, 2), (10.0, 1.0, 2), (0.05, 0.1, 1), (0.0, 0.0, 0)]
)
def test_a_winning_largest_weight_decay_extends_the_grid_up_the_ladder(best_wd, expected_wd, added):
    """A bowl in log-lr (minimum at 1e-2, interior) and in log-weight-decay (minimum at ``best_wd``; no decay
    costs as much as a factor 1000 off, any decay as a factor 10 when no decay is best): a win at the grid's
    largest weight decay adds 0.3, then 1, at every lr tried, until the choice is interior or the cap is hit;
    no decay winning extends nothing (there is nothing below 0)."""
    grid = brun.FULL_GRIDS["adamw"].settings("adamw")

    def evaluate(setting, seed):
        wd = setting.weight_decay
        wd_cost = abs(math.log10(wd / best_wd)) if wd and best_wd else 0.0 if wd == best_wd else 1.0 if wd else 3.0
        return {"final": {"val_loss": 1.0 + abs(math.log10(setting.lr / 1e-2)) + wd_cost}}

    result = btuning.tune("adamw", grid, evaluate, task="t", extend_edges=2)
    lrs = sorted({s.lr for s in grid})
    assert result.settings[: len(grid)] == grid and len(result.settings) == len(grid) + added * len(lrs)
    assert result.chosen == brun.Setting("adamw", 1e-2, expected_wd, "cosine")
    assert {s.weight_decay for s in result.settings[len(grid) :]} == set([0.3, 1.0][:added])


def test_both_axes_extend_and_the_grid_stays_a_product():
    """Optimum past the top lr and the top weight decay: lr grows first (at every weight decay), then weight
    decay (at every lr, the new ones included); every (lr, wd) pair tried once."""
    grid = brun.FULL_GRIDS["adamw"].settings("adamw")

    def evaluate(setting, seed):
        wd_cost = abs(math.log10(setting.weight_decay / 0.3)) if setting.weight_decay else 1.0
        return {"final": {"val_loss": 1.0 + abs(math.log10(setting.lr / 0.1)) + wd_cost}}

    result = btuning.tune("adamw", grid, evaluate, task="t", extend_edges=2)
    lrs, wds = {s.lr for s in result.settings}, {s.weight_decay for s in result.settings}
    assert lrs == {3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3} and wds == {0.0, 0.1, 0.3, 1.0}
    assert len(result.settings) == len(set(result.settings)) == len(lrs) * len(wds)
    assert result.chosen == brun.Setting("adamw", 0.1, 0.3, "cosine")


def test_the_full_suite_extends_edges_and_the_quick_one_does_not(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(brun, "train", _fake_train(calls))  # its optimum, lr 1e-2, is interior in the full grid
    assert (
        run_suite(out=tmp_path / "q", tasks=["diabetes-mlp"], quick=True, progress=False).config["edge_extensions"] == 0
    )

    def edge_train(workload, optimizer, setting, seed, flatness=None):
        record = _fake_train(calls)(workload, optimizer, setting, seed)
        loss = 1.0 + abs(math.log10(setting.lr / 0.3))  # the best lr lies past the grid's top, 3e-2
        return {**record, "final": {"val_loss": loss, "test_loss": loss}}

    monkeypatch.setattr(brun, "train", edge_train)
    full = run_suite(out=tmp_path / "f", tasks=["diabetes-mlp"], baselines=["adamw"], progress=False, seeds=1)
    (tuning,) = full.tuning
    assert tuning.chosen.lr == 0.3 and full.config["edge_extensions"] == btuning.EDGE_EXTENSIONS
    assert "lr 0.1, cosine -> " in full.tuning_markdown() and "lr 0.3, wd 0.1, cosine -> " in full.tuning_markdown()


def test_a_tiny_real_run_records_curves_and_finals():
    w = TASKS["breast-cancer-mlp"].bind(steps=20)
    record = brun.train(w, brun.baseline_optimizer("adamw"), brun.Setting("adamw", 1e-2, 0.1, "cosine"), seed=0)
    assert len(record["train_loss"]) == 20 and record["val_steps"][0] == 0 and record["val_steps"][-1] == 20
    assert record["final"]["val_loss"] < record["initial_val_loss"] and not record["diverged"]
    assert 0.5 < record["final"]["test_accuracy"] <= 1.0
    assert record["code"] == brun.code_fingerprint() and len(record["code"]) == 16  # which code made the run


def test_the_code_fingerprint_follows_the_package_source(tmp_path, monkeypatch):
    """Any change to a source file changes the fingerprint that run records carry."""
    package = tmp_path / "pkg"
    (package / "bench").mkdir(parents=True)
    (package / "csrc").mkdir()
    (package / "bench" / "run.py").write_text("x = 1\n")
    (package / "csrc" / "k.cpp").write_text("int k;\n")
    monkeypatch.setattr(brun, "__file__", str(package / "bench" / "run.py"))
    brun.code_fingerprint.cache_clear()
    try:
        before = brun.code_fingerprint()
        (package / "csrc" / "k.cpp").write_text("int k = 1;\n")
        brun.code_fingerprint.cache_clear()
        assert brun.code_fingerprint() != before
    finally:
        brun.code_fingerprint.cache_clear()


# ------------------------------------------------------------------------------------------ the suite
@pytest.mark.parametrize(
    ("name", "built_by", "grid_size"),
    [
        ("sam", "sam", 5),
        ("gsam", "gsam", 5),
        ("gam", "GAM", 5),
        ("entropy-sgd", "EntropySGD", 5),
        ("sam-adamw", "sam_adamw", 10),
    ],
)
def test_the_flatness_baselines_train_a_real_task(name, built_by, grid_size):
    """The SAM family and Entropy-SGD run in the suite's loop (their closure re-evaluates the loss): the
    training loss falls, the record is finite, and the run key names the optimizer's builder."""
    w = TASKS["breast-cancer-mlp"].bind(steps=30)
    optimizer = brun.baseline_optimizer(name)
    assert optimizer.identity["class"] == f"learned_optim.bench.baselines.{built_by}"
    grid = brun.FULL_GRIDS[name]
    assert grid.schedule == "cosine" and len(grid.settings(name)) == grid_size
    record = brun.train(w, optimizer, brun.Setting(name, grid.lr[2], 0.0, "cosine"), seed=0)
    assert record["nonfinite_at"] is None and not record["diverged"]
    assert record["train_loss"][-1] < record["train_loss"][0]
    assert math.isfinite(record["final"]["test_loss"])


def test_muon_adamw_is_tuned_exactly_like_adamw_and_trains_a_real_task():
    """Plain Muon (with AdamW beside it) is a suite baseline on AdamW's grids and schedule, its run key names its
    class, the suite's lr and weight decay reach it, and it trains a real task: the loss falls, the record is finite."""
    optimizer = brun.baseline_optimizer("muon-adamw")
    assert optimizer.identity == {"class": "learned_optim.bench.baselines.MuonAdamW"}
    assert brun.FULL_GRIDS["muon-adamw"] is brun.ADAMW_FULL_GRID is brun.FULL_GRIDS["adamw"]
    assert brun.QUICK_GRIDS["muon-adamw"] is brun.ADAMW_QUICK_GRID is brun.QUICK_GRIDS["adamw"]
    built = optimizer.build([torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(3))], 3e-3, 0.1)
    assert type(built).__name__ == "MuonAdamW"
    assert built.defaults["lr"] == 3e-3 and built.defaults["weight_decay"] == 0.1
    w = TASKS["breast-cancer-mlp"].bind(steps=30)
    grid = brun.FULL_GRIDS["muon-adamw"]
    record = brun.train(w, optimizer, brun.Setting("muon-adamw", grid.lr[2], 0.1, "cosine"), seed=0)
    assert record["nonfinite_at"] is None and not record["diverged"]
    assert record["train_loss"][-1] < record["train_loss"][0]
    assert math.isfinite(record["final"]["test_loss"])


def test_adamw_default_is_untuned_adamw_at_torchs_defaults():
    """The untuned reference is AdamW itself (the same run identity) at torch.optim.AdamW's own default lr and weight
    decay with AdamW's schedule, on a one-setting grid that tuning never extends."""
    optimizer = brun.baseline_optimizer("adamw-default")
    assert optimizer.identity == brun.baseline_optimizer("adamw").identity
    torch_defaults = inspect.signature(torch.optim.AdamW).parameters
    want = [
        brun.Setting("adamw-default", torch_defaults["lr"].default, torch_defaults["weight_decay"].default, "cosine")
    ]
    for grids in (brun.FULL_GRIDS, brun.QUICK_GRIDS):
        assert grids["adamw-default"].settings("adamw-default") == want
        assert grids["adamw-default"].schedule == grids["adamw"].schedule
    tried = []
    result = btuning.tune(
        "adamw-default", want, lambda s, seed: tried.append(s) or {"final": {"val_loss": 1.0}}, task="t", extend_edges=2
    )
    assert tried == want and result.chosen == want[0]


def test_adamw_flagship_default_is_untuned_adamw_at_the_flagships_defaults():
    """The flagship's rule-(c) counterpart is AdamW itself at the lr, weight decay and schedule a user who passes none
    gets from the flagship (from_pretrained's defaults), on a one-setting grid."""
    import learned_optim

    assert brun.baseline_optimizer("adamw-flagship-default").identity == brun.baseline_optimizer("adamw").identity
    opt = learned_optim.from_pretrained(learned_optim.FLAGSHIP, [torch.nn.Parameter(torch.zeros(2, 2))])
    flagship = brun.learned_optimizer(learned_optim.FLAGSHIP)
    want = [brun.Setting("adamw-flagship-default", opt.defaults["lr"], opt.defaults["weight_decay"], "cosine")]
    assert flagship.default_schedule == "cosine"
    for quick in (False, True):
        grids = brun.baseline_grids(["adamw", "adamw-flagship-default"], quick)
        assert grids["adamw-flagship-default"].settings("adamw-flagship-default") == want


def test_a_new_default_lr_or_weight_decay_keeps_the_run_identity(tmp_path):
    """Runs pass their own lr and weight decay, so changing a checkpoint's default of them after training (meta
    reconfigure --optimizer) keeps its run identity (the stored runs are reused) while its default rule follows the new
    values; another default (nonfinite) or a net setting makes a new identity."""
    from learned_optim.hub import reconfigure_checkpoint, save_pretrained

    folder = save_pretrained(learned_optim.AdafacMLP(), tmp_path / "net", name="net")
    before = brun.learned_optimizer(str(folder))
    reconfigure_checkpoint(folder, {}, optimizer={"lr": 0.01, "weight_decay": 0.3})
    after = brun.learned_optimizer(str(folder))
    assert after.identity == before.identity
    assert (after.default_lr, after.default_weight_decay) == (0.01, 0.3) != (before.default_lr, 0.0)
    reconfigure_checkpoint(folder, {}, optimizer={"nonfinite": "skip"})
    assert brun.learned_optimizer(str(folder)).identity != before.identity
    reconfigure_checkpoint(folder, {"second_moment_decay": 0.95})
    assert brun.learned_optimizer(str(folder)).identity["config"] != after.identity["config"]


def test_the_suite_runs_the_cheap_baselines_unless_asked():
    assert inspect.signature(run_suite).parameters["baselines"].default == bsuite.DEFAULT_BASELINES
    assert bsuite.DEFAULT_BASELINES == ("adamw", "adam", "sgd-momentum")
    assert set(bsuite.DEFAULT_BASELINES) < set(bsuite.BASELINE_NAMES)
    with pytest.raises(brun.UnknownOptimizerError, match="sam, gsam, gam, entropy-sgd, sam-adamw, muon-adamw"):
        brun.baseline_optimizer("lion")


def _fake_train(calls):
    def train(workload, optimizer, setting, seed, flatness=None):
        calls.append((workload.name, workload.steps, setting, seed))
        # a deterministic fake: lower lr*10 distance to 1e-2 is better, learned optimizers slightly worse
        loss = 1.0 + abs(math.log10(setting.lr / 1e-2)) + (0.1 if optimizer.kind == "learned" else 0.0)
        steps = [0, workload.steps // 2, workload.steps]
        return {
            "task": workload.name,
            "optimizer": setting.optimizer,
            "setting": {},
            "seed": seed,
            "steps": workload.steps,
            "train_loss": [loss] * workload.steps,
            "val_steps": steps,
            "val": {"loss": [3.0, 2.0, loss]},
            "initial_val_loss": 3.0,
            "final": {"val_loss": loss, "test_loss": loss + 0.01 * seed},
            "nonfinite_at": None,
            "diverged": False,
            "time_per_step": 1e-3,
            **({"flatness": {"hessian_trace": 10.0 * loss + seed, "sharpness@0.01": loss}} if flatness else {}),
        }

    return train


def test_quick_runs_exactly_the_quick_selection_and_reuses_stored_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(brun, "train", _fake_train(calls))
    results = run_suite(["l2o-mlp"], out=tmp_path, quick=True, progress=False, lr_rules=["default", "tuned", "adamw"])
    assert list(results.records) == list(QUICK)
    assert {(name, steps) for name, steps, _, _ in calls} == {
        (n, max(1, round(TASKS[n].steps * QUICK_STEPS_FRACTION))) for n in QUICK
    }
    assert {seed for *_, seed in calls} == {0, brun.TUNE_SEED}
    per_task = len(calls) // len(QUICK)
    # grids 4 + 2 + 2 and l2o-mlp's 2 multipliers; evaluation: 3 baselines + 3 rules, 1 seed, minus the
    # duplicates that the store answers (the tuned rule choosing a point already run is not retrained)
    assert 10 < per_task <= 16
    rows = results.rows()
    assert {r["contender"] for r in rows} == {
        "adamw",
        "adam",
        "sgd-momentum",
        "l2o-mlp [default]",
        "l2o-mlp [tuned]",
        "l2o-mlp [adamw]",
    }
    assert all(r["setting"] == "lr 0.01, cosine" for r in rows if r["contender"] == "adamw")
    files = results.write(tmp_path, plots=False)
    assert files["markdown"].read_text().startswith("| Optimizer | IQM val loss / AdamW")
    calls.clear()
    again = run_suite(["l2o-mlp"], out=tmp_path, quick=True, progress=False, lr_rules=["default", "tuned", "adamw"])
    assert calls == [] and again.config["runs_trained"] == 0 and again.rows() == rows


def test_a_run_that_ended_non_finite_has_speedup_zero_in_the_rows(tmp_path, monkeypatch):
    """The rows pass a run's non-finite end to the speed-up: its training curve can stay finite (the non-finite value
    in the last, incomplete window, or a non-finite validation loss), and the speed-up must still be 0."""
    monkeypatch.setattr(brun, "train", _fake_train([]))
    results = run_suite(
        ["l2o-mlp"], out=tmp_path, tasks=["diabetes-mlp"], quick=True, progress=False, lr_rules=["adamw"]
    )
    (row,) = [r for r in results.rows() if r["contender"] == "l2o-mlp [adamw]"]
    assert row["speedup"] > 0
    (record,) = results.records["diabetes-mlp"]["l2o-mlp [adamw]"]
    record["nonfinite_at"] = record["steps"] - 1  # every training loss of its curve finite
    (row,) = [r for r in results.rows() if r["contender"] == "l2o-mlp [adamw]"]
    assert row["speedup"] == 0.0


def test_a_later_block_of_evaluation_seeds_runs_fresh_and_keeps_the_tuning(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(brun, "train", _fake_train(calls))
    first = run_suite(out=tmp_path, tasks=["diabetes-mlp"], quick=True, progress=False, seeds=2)
    calls.clear()
    later = run_suite(out=tmp_path, tasks=["diabetes-mlp"], quick=True, progress=False, seeds=2, first_seed=5)
    assert first.config["seeds"] == [0, 1] and later.config["seeds"] == [5, 6]
    assert {seed for *_, seed in calls} == {5, 6}  # the tuning runs are reused, the evaluation runs are new
    assert [t.chosen for t in later.tuning] == [t.chosen for t in first.tuning]
    with pytest.raises(ValueError, match="exclude the tuning seed"):
        run_suite(out=tmp_path, tasks=["diabetes-mlp"], quick=True, progress=False, first_seed=brun.TUNE_SEED)


def test_run_records_are_compressed_deterministic_and_plain_ones_still_read(tmp_path):
    """Records are written as gzip JSON with a fixed header time (the same record is the same bytes, so a rerun
    leaves git clean); the plain .json records of earlier versions are read, the folder written first."""
    import gzip
    import json

    store = brun.RunStore(tmp_path / "a", extra=[tmp_path / "b"])
    record = {"key": "k1", "final": {"val_loss": 0.5}}
    store.put(record)
    path = tmp_path / "a" / "runs" / "k1.json.gz"
    first = path.read_bytes()
    assert json.loads(gzip.decompress(first)) == record
    store.put(record)
    assert path.read_bytes() == first and not list((tmp_path / "a" / "runs").glob("*.json"))
    (tmp_path / "b" / "runs").mkdir(parents=True)
    (tmp_path / "b" / "runs" / "k2.json").write_text(json.dumps({"key": "k2"}))
    (tmp_path / "b" / "runs" / "k1.json").write_text(json.dumps({"key": "k1", "final": "older"}))
    assert store.get("k2") == {"key": "k2"} and store.get("k1") == record and store.get("k3") is None
    assert brun.RunStore(tmp_path / "a", reuse=False).get("k1") is None


def test_flatness_is_measured_on_the_evaluation_runs_only_and_tabled(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(brun, "train", _fake_train(calls))
    plain = run_suite(out=tmp_path, tasks=["diabetes-mlp"], quick=True, progress=False)
    assert "Flatness" not in plain.markdown() and plain.config["flatness"] is None
    calls.clear()
    measured = run_suite(out=tmp_path, tasks=["diabetes-mlp"], quick=True, progress=False, flatness=True)
    # the tuning runs are reused; the 3 evaluation runs (one seed) are new records that carry the measures
    assert len(calls) == 3 and {seed for *_, seed in calls} == {0}
    assert measured.config["flatness"]["hvp_mode"] == "reverse"
    row = next(r for r in measured.rows() if r["contender"] == "adamw")
    assert row["hessian_trace"] == pytest.approx(10.0 * row["val_loss"]) and "sharpness@0.01" in row
    text = measured.markdown()
    assert "Flatness at the final weights" in text and "| hessian_trace | sharpness@0.01 |" in text


def test_a_real_run_measures_flatness_at_its_final_weights():
    w = TASKS["breast-cancer-mlp"].bind(steps=10)
    adamw, setting = brun.baseline_optimizer("adamw"), brun.Setting("adamw", 1e-2, 0.0, "cosine")
    options = dataclasses.replace(brun.SUITE_FLATNESS, probes=2, iters=3, radii=(0.01,))
    record = brun.train(w, adamw, setting, seed=0, flatness=options)
    flat = record["flatness"]
    assert set(flat) == {"hessian_trace", "hessian_eigenvalue", "sharpness@0.01"}
    assert flat["hessian_eigenvalue"] > 0 and flat["sharpness@0.01"] >= 0 and math.isfinite(flat["hessian_trace"])
    assert brun.RunStore.key(w, adamw, setting, 0, options) != brun.RunStore.key(w, adamw, setting, 0)


@pytest.mark.parametrize("name", ["digits-resnet-bn", "shapes-autoencoder-bf16"])
def test_the_functional_loss_is_the_eval_mode_full_precision_objective(name):
    """FunctionalWorkload's loss at the model's own weights is the workload's loss in eval mode (BatchNorm on
    running statistics), computed in float32 even for a bf16-autocast task; buffers are left alone."""
    w = TASKS[name].bind(steps=10)
    model = w.build_model(0)
    functional = w.functional(model)
    batch = functional.batch("val", torch.Generator().manual_seed(0))
    assert len(batch[0]) == w.task.batch_size
    before = {k: b.clone() for k, b in model.named_buffers()}
    with torch.no_grad():
        expected = w.score(model(batch[0]).float(), *batch)[0]
    torch.testing.assert_close(functional.loss(functional.params(), batch), expected)
    assert all(torch.equal(before[k], b) for k, b in model.named_buffers())


def test_an_adapted_contender_adapts_then_trains_from_the_same_start_on_the_same_batches():
    w = TASKS["breast-cancer-mlp"].bind(steps=8)
    plain, adapted = (
        brun.learned_optimizer("adafac-mlp-adam-magnitude-tbv"),
        brun.learned_optimizer("adafac-mlp-adam-magnitude-tbv", adapt_steps=2),
    )
    assert adapted.name == "adafac-mlp-adam-magnitude-tbv+adapt2" and adapted.identity["adapt"]["steps"] == 2
    assert {k: v for k, v in adapted.identity.items() if k != "adapt"} == plain.identity
    setting = brun.Setting(plain.name, 1e-3, 0.0, "cosine")
    a, p = brun.train(w, adapted, setting, seed=0), brun.train(w, plain, setting, seed=0)
    assert len(a["adaptation"]["meta_losses"]) == 2 and a["adaptation"]["skipped_steps"] == 0
    assert "adaptation" not in p
    # adapt() left the model and the run's batch stream alone: the first training loss is the same
    assert a["train_loss"][0] == p["train_loss"][0] and a["initial_val_loss"] == p["initial_val_loss"]
    assert a["train_loss"][1:] != p["train_loss"][1:]  # ... and the adapted net steps differently
    with pytest.raises(ValueError, match="adapt_steps"):
        brun.learned_optimizer("adafac-mlp-adam-magnitude-tbv", adapt_steps=-1)


def test_adapt_steps_adds_an_adapted_contender_per_learned_optimizer(tmp_path, monkeypatch):
    monkeypatch.setattr(brun, "train", _fake_train([]))
    results = run_suite(
        ["l2o-mlp"], out=tmp_path, tasks=["diabetes-mlp"], quick=True, progress=False, lr_rules=["adamw"], adapt_steps=3
    )
    labels = [r["contender"] for r in results.rows()]
    assert "l2o-mlp [adamw]" in labels and "l2o-mlp+adapt3 [adamw]" in labels and results.config["adapt_steps"] == 3


def test_the_selection_set_runs_apart_and_says_it_is_no_result(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(brun, "train", _fake_train(calls))
    results = run_suite(["l2o-mlp"], out=tmp_path, selection=True, progress=False, lr_rules=["adamw"], seeds=1)
    assert results.config["selection"] and {c[0] for c in calls} == set(bsuite.SELECTION_TASKS)
    assert "never a result" in results.markdown()
    assert not run_suite(out=tmp_path, tasks=["diabetes-mlp"], progress=False, seeds=1).config["selection"]


def test_cli_record_card_and_list_pretrained(tmp_path, monkeypatch, capsys):
    import shutil

    from learned_optim import hub

    monkeypatch.setattr(brun, "train", _fake_train([]))
    card = tmp_path / "ckpt"
    shutil.copytree(hub.zoo_dir() / "l2o-mlp", card)
    code = bench_main(
        ["--optimizer", str(card), "--quick", "--tasks", "diabetes-mlp", "--out", str(tmp_path / "o"), "--no-plots"]
        + ["--no-progress", "--record-card", str(card)]
    )
    assert code == 0
    assert "## Evaluation: bench suite v1 (quick)" in (card / "README.md").read_text()
    assert "bench suite v1 (quick)" in hub.read_config(card)["training"]["results"]
    assert "IQM val loss" in capsys.readouterr().out
    monkeypatch.setattr(hub, "zoo_dir", lambda: tmp_path)
    (entry,) = [e for e in hub.list_pretrained() if e["name"] == "ckpt"]
    assert [a["contender"] for a in entry["suite"]["bench suite v1 (quick)"]][0] == "adamw"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tasks", "nosuch"], "unknown task 'nosuch'; known: diabetes-mlp"),
        (["--optimizer", "nosuch-optimizer"], "cannot load optimizer 'nosuch-optimizer'"),
        (["--tasks", "stdlib-gru-lm", "--data-root", "/nonexistent-root"], "data root '/nonexistent-root'"),
        (["--baselines", "adagrad"], "unknown baseline 'adagrad'"),
        (["--selection-set", "--tasks", "diabetes-mlp"], "unknown selection-set task 'diabetes-mlp'; known: select-"),
        (["--selection-set", "--quick"], "the selection set has no quick variant"),
        (["--selection-set", "--record-card", "x"], "--record-card takes suite results only"),
    ],
)
def test_bad_input_is_one_line_error(argv, message, tmp_path, capsys):
    assert bench_main([*argv, "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_evaluate_unknown_task_is_one_line_error(tmp_path, capsys):
    assert cli_main(["evaluate", "--tasks", "nosuch", "--out", str(tmp_path), "--baselines", "adam"]) == 2
    err = capsys.readouterr().err
    assert "unknown task family 'nosuch'; registered:" in err and len(err.strip().splitlines()) == 1


def test_bench_command_is_dispatched(capsys):
    assert cli_main(["bench", "--list", "--tasks", "copy-gru"]) == 0
    assert "`copy-gru` | sequence" in capsys.readouterr().out


def test_learned_tuned_grid_is_relative_to_a_multiplier_default():
    opt = brun.learned_optimizer("l2o-mlp")
    grid = opt.tuned_grid(brun.FULL_GRIDS["adamw"])
    assert [s.lr for s in grid] == [0.1, 0.3, 1.0] and opt.default_setting().lr == 1.0
    real = brun.BenchOptimizer("x", "learned", lambda *a: None, {}, default_lr=1e-3)
    assert [s.lr for s in real.tuned_grid(brun.FULL_GRIDS["adamw"])] == list(brun.FULL_GRIDS["adamw"].lr)


def test_the_tuned_wd_rule_tunes_on_adamws_whole_grid():
    """``tuned`` keeps the checkpoint's weight decay; ``tuned-wd`` tunes lr x weight decay as AdamW is tuned."""
    adamw = brun.FULL_GRIDS["adamw"]
    real = brun.BenchOptimizer("x", "learned", lambda *a: None, {}, default_lr=1e-3, default_schedule="cosine")
    assert {s.weight_decay for s in real.tuned_grid(adamw)} == {0.0}
    both = real.tuned_grid(adamw, "tuned-wd")
    assert {(s.lr, s.weight_decay) for s in both} == set(itertools.product(adamw.lr, adamw.weight_decay))
    assert {s.schedule for s in both} == {"cosine"} and {s.optimizer for s in both} == {"x"}
    multiplier = brun.learned_optimizer("l2o-mlp").tuned_grid(adamw, "tuned-wd")
    assert {(s.lr, s.weight_decay) for s in multiplier} == set(itertools.product((0.1, 0.3, 1.0), adamw.weight_decay))
    with pytest.raises(ValueError, match="tunes nothing"):
        real.tuned_grid(adamw, "adamw")


def test_the_tuned_wd_rule_finds_a_weight_decay_past_the_grid_in_the_full_suite(tmp_path, monkeypatch):
    calls = []

    def wd_train(workload, optimizer, setting, seed, flatness=None):
        record = _fake_train(calls)(workload, optimizer, setting, seed)
        loss = 1.0 + abs(math.log10(setting.lr / 1e-2)) + abs(math.log10((setting.weight_decay + 1e-3) / 0.3))
        return {**record, "final": {"val_loss": loss, "test_loss": loss}}

    monkeypatch.setattr(brun, "train", wd_train)
    import tqdm.auto

    bars = []

    class Recorded(tqdm.auto.tqdm):
        def close(self):
            bars.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorded)
    results = run_suite(
        ["l2o-lstm"],  # a multiplier default (lr grid 0.1-1): both axes grow past their winning edges
        out=tmp_path,
        tasks=["diabetes-mlp"],
        baselines=["adamw"],
        progress=True,
        seeds=1,
        lr_rules=["tuned", "tuned-wd"],
    )
    done, total = bars[0]  # (closed once by the suite, again when collected)
    assert done == total > TASKS["diabetes-mlp"].steps  # the progress bar's total grows with the extended grids
    chosen = {t.contender: t.chosen for t in results.tuning}
    assert chosen["adamw"].weight_decay == chosen["l2o-lstm [tuned-wd]"].weight_decay == 0.3
    assert chosen["l2o-lstm [tuned]"].weight_decay == 0.0 and chosen["l2o-lstm [tuned-wd]"].lr == 0.01
    assert {r["contender"] for r in results.rows()} >= {"l2o-lstm [tuned]", "l2o-lstm [tuned-wd]"}


def test_unused_torch_state_untouched():
    state = torch.random.get_rng_state()
    TASKS["diabetes-mlp"].bind(steps=5).build_model(0)
    assert torch.equal(state, torch.random.get_rng_state())


def test_learned_identity_ignores_descriptions_but_not_the_step(tmp_path):
    """Stored runs stay valid when a card or description changes, and not when the net or its defaults do."""
    import json
    import shutil

    from learned_optim.bench.run import learned_optimizer
    from learned_optim.hub import resolve_checkpoint

    folder = tmp_path / "ckpt"
    shutil.copytree(resolve_checkpoint("l2o-mlp"), folder)
    before = learned_optimizer(str(folder)).identity
    config = json.loads((folder / "config.json").read_text())
    config["description"], config["research"] = "another text", "another note"
    (folder / "config.json").write_text(json.dumps(config))
    assert learned_optimizer(str(folder)).identity == before
    config["optimizer"] = {**config.get("optimizer", {}), "lr": 0.5}
    (folder / "config.json").write_text(json.dumps(config))
    assert learned_optimizer(str(folder)).identity != before


def _flip_byte(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def test_a_damaged_or_misplaced_run_record_is_passed_over_with_a_warning(tmp_path):
    """A record file that cannot be read (cut short, empty, not JSON, foreign JSON) or that holds another run's
    record (copied or renamed under the wrong key) is not reused: the run is looked up further, else trained again;
    the warning names the file. It aborted the bench, or silently changed a row."""
    import gzip
    import json

    store = brun.RunStore(tmp_path / "a", extra=[tmp_path / "b"])
    good = {"key": "k1", "final": {"val_loss": 0.5}}
    brun.RunStore(tmp_path / "b").put(good)  # a sound copy further along the lookup
    runs = tmp_path / "a" / "runs"
    runs.mkdir(parents=True)
    damaged = {
        "cut short": gzip.compress(json.dumps(good).encode())[:20],
        "a byte flipped in the compressed body": _flip_byte(gzip.compress(json.dumps(good).encode()), 10),  # zlib
        "empty": b"",
        "not JSON": gzip.compress(b"not json"),
        "foreign JSON": gzip.compress(b"[1, 2]"),
        "another run's record": gzip.compress(json.dumps({"key": "k9", "final": {"val_loss": 9.0}}).encode()),
    }
    for what, data in damaged.items():
        (runs / "k1.json.gz").write_bytes(data)
        with pytest.warns(UserWarning, match=r"ignoring .*a/runs/k1\.json\.gz"):
            assert store.get("k1") == good, what
        with pytest.warns(UserWarning):
            assert brun.RunStore(tmp_path / "a").get("k1") is None, what


def test_a_checkpoint_without_a_recorded_lr_runs_at_its_nets_default_lr(tmp_path):
    """The `default` and `tuned` rules take a checkpoint's lr from its config, else its family's default lr, as
    from_pretrained does (they took 1.0: AdafacMLP at 1000x its lr, and a multiplier grid); a null schedule is
    constant and an unknown one is refused when the checkpoint is read."""
    import json

    from learned_optim import AdafacMLP, save_pretrained

    folder = save_pretrained(AdafacMLP(), tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    assert config["optimizer"] == {} and "schedule" not in config
    opt = brun.learned_optimizer(str(folder))
    assert opt.default_setting().lr == AdafacMLP.default_lr == 1e-3
    assert [s.lr for s in opt.tuned_grid(brun.FULL_GRIDS["adamw"])] == list(brun.FULL_GRIDS["adamw"].lr)
    (folder / "config.json").write_text(json.dumps({**config, "schedule": None}))
    assert brun.learned_optimizer(str(folder)).default_setting().schedule == "constant"
    (folder / "config.json").write_text(json.dumps({**config, "schedule": "linear"}))
    with pytest.raises(brun.UnknownOptimizerError, match="schedule must be one of"):
        brun.learned_optimizer(str(folder))


def test_a_seed_that_ended_non_finite_makes_its_contenders_test_accuracy_not_available(tmp_path, monkeypatch):
    """A non-finite run has no test accuracy: its contender's accuracy is n/a, not the mean of the seeds that
    survived (which could rank a contender that diverged on most seeds above one that did not)."""
    calls = []
    fake = _fake_train(calls)

    def train(workload, optimizer, setting, seed, flatness=None):
        record = fake(workload, optimizer, setting, seed, flatness)
        record["final"]["test_accuracy"] = 0.9
        if optimizer.kind == "learned" and seed == 1:  # this seed ends non-finite: no final values
            record.update(nonfinite_at=3, final={"val_loss": None})
        return record

    monkeypatch.setattr(brun, "train", train)
    results = run_suite(["l2o-mlp"], out=tmp_path, tasks=["diabetes-mlp"], quick=True, seeds=2, progress=False)
    rows = {r["contender"]: r for r in results.rows()}
    learned = next(r for name, r in rows.items() if "l2o-mlp" in name)
    assert math.isnan(learned["test_accuracy"]) and rows["adamw"]["test_accuracy"] == pytest.approx(0.9)
    assert "n/a" in results.markdown()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "{file}"], "exists and is not a folder"),
        (["--record-card", "{tmp}"], "config.json does not exist"),
        (["--baseline-dir", "{tmp}/typo"], "holds no run store"),
        (["--tasks", ","], "no task given"),
        (["--no-matplotlib"], "the plots need matplotlib"),
    ],
)
def test_bench_refuses_bad_outputs_and_options_before_any_run(tmp_path, monkeypatch, capsys, args, message):
    """An unusable --out, a --record-card folder that is no checkpoint, a --baseline-dir without runs, an empty task
    list and plots without matplotlib are refused with one line and status 2 before anything is trained (they
    failed after the whole suite, or silently retrained or ran the default tasks)."""
    from learned_optim.bench import report

    calls = []
    monkeypatch.setattr(brun, "train", _fake_train(calls))
    if args == ["--no-matplotlib"]:
        monkeypatch.setattr(report.importlib.util, "find_spec", lambda name: None)
        args = []
    (tmp_path / "file").write_text("")
    args = [a.format(file=tmp_path / "file", tmp=tmp_path) for a in args]
    out = ["--out", str(tmp_path / "out")] if "--out" not in args else []
    base = ["--optimizer", "l2o-mlp", "--quick", "--no-progress", *out]
    tasks = [] if "--tasks" in args else ["--tasks", "diabetes-mlp"]
    assert bench_main([*base, *tasks, *args]) == 2
    assert message in capsys.readouterr().err and not calls


def test_the_table_note_gives_the_threads_the_runs_were_trained_with(tmp_path, monkeypatch):
    """Reused runs keep their own time per step, measured with their own thread count: the note says which (it
    gave the current process's only)."""
    calls = []
    fake = _fake_train(calls)
    monkeypatch.setattr(brun, "train", lambda w, o, s, seed, f=None: {**fake(w, o, s, seed, f), "threads": seed + 1})
    results = run_suite(["l2o-mlp"], out=tmp_path, tasks=["diabetes-mlp"], quick=True, seeds=2, progress=False)
    assert "when it was trained (1 or 2 thread(s); a run reused from the store keeps its own)" in results.markdown()


def test_the_per_step_curve_is_the_windows_average_at_every_step():
    losses = [4.0, 2.0, 3.0, 1.0, 1.0, 1.0]
    steps, values = stats.sliding_training_curve(losses, horizon=6, windows=3)
    assert steps == [2, 3, 4, 5, 6] and values == [3.0, 2.5, 2.0, 1.0, 1.0]
    coarse = stats.training_curve(losses, horizon=6, windows=3)
    assert values[-1] == coarse[1][-1] and [values[steps.index(s)] for s in coarse[0]] == coarse[1]
    steps, values = stats.sliding_training_curve([4.0, 2.0, math.nan, 1.0, 1.0], horizon=6, windows=3)
    assert steps == [2, 3, 4, 5] and values[0] == 3.0 and math.isnan(values[1]) and math.isnan(values[2])
    assert values[3] == 1.0 and stats.sliding_training_curve([1.0], horizon=6, windows=3) == ([], [])
    # a run at the reference's final level from step 18: the 20 windows of 5 steps credit it at the end of the first
    # window wholly there (100 / 25), the per-step curve where its 5-step average first gets there (100 / 22)
    reference = {"train_loss": [5.0] * 75 + [1.0] * 25, "steps": 100, "nonfinite_at": None}
    record = {"train_loss": [5.0] * 17 + [1.0] * 83, "steps": 100, "nonfinite_at": None}
    assert stats.run_speedup(record, reference) == 4.0
    assert stats.run_speedup(record, reference, per_step=True) == 100 / 22
    # on a plateau the reference is at its final level before the end: above 1 against itself, at both resolutions
    assert stats.run_speedup(reference, reference, per_step=True) == stats.run_speedup(reference, reference) == 1.25
    blown_up = {"train_loss": [5.0] * 20 + [math.nan], "steps": 100, "nonfinite_at": 20}
    assert stats.run_speedup(blown_up, reference, per_step=True) == 0.0
