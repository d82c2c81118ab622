"""The scripts of issue 5's evidence: benchmarks/generalization.py (merging evaluation tables and
replacing an entry's rows; the weight search's per-kind choice, w = 0 vs the best non-zero weight) and
benchmarks/regularizer_scale.py (the meta-gradient ratio that centres the weight grids)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from learned_optim import DMLSTM, AdafacMLP, LearnedOptimizer, save_pretrained
from learned_optim.bench import evaluate as ev
from learned_optim.bench.run import Setting, learned_optimizer
from learned_optim.bench.tasks import get_task
from learned_optim.hub import load_rule

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
pytestmark = pytest.mark.usefixtures("one_thread")  # the script's commands call torch.set_num_threads


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen():
    return _script("generalization")


def _table(folder: Path, runs: dict[str, float], seeds=(0, 1)) -> Path:
    """A ``table`` output folder with one run per (optimizer, seed); ``runs`` maps labels to test accuracy."""
    results = ev.EvaluationResults(
        {
            "steps": 2,
            "seeds": len(seeds),
            "seed_list": list(seeds),
            "eval_split": "test",
            "final_window": 1,
            "tasks": ["t"],
        },
        [],
        [
            ev.RunResult(
                "t",
                label,
                seed,
                1.0,
                "test",
                [1.0, 0.5],
                [0, 2],
                {"loss": [2.0, 0.3], "accuracy": [0.1, accuracy + 0.001 * seed]},
                0.001,
                0.01,
                None,
            )
            for label, accuracy in runs.items()
            for seed in seeds
        ],
    )
    results.write(folder, plots=False)
    return folder


def _merged_accuracy(folder: Path) -> dict[str, list[float]]:
    data = json.loads((folder / "results.json").read_text())
    out: dict[str, list[float]] = {}
    for run in data["runs"]:
        out.setdefault(run["optimizer"], []).append(run["evals"]["accuracy"][-1])
    return out


def test_merge_drop_replaces_one_entrys_rows(gen, tmp_path, capsys):
    old = _table(tmp_path / "old", {"l2o-lstm": 0.90, "l2o-lstm-hessian-ev": 0.80})
    new = _table(tmp_path / "new", {"l2o-lstm-hessian-ev": 0.95})
    out = tmp_path / "merged"
    # the same optimizer, task and seed in two inputs is refused, with the option that resolves it
    with pytest.raises(
        SystemExit, match=r"l2o-lstm-hessian-ev on t \(seed 0\) is in both .*--drop l2o-lstm-hessian-ev@"
    ):
        gen.main(["merge", str(old), str(new), "--out", str(out), "--no-plots"])
    assert (
        gen.main(["merge", str(old), str(new), "--drop", f"l2o-lstm-hessian-ev@{old}", "--out", str(out), "--no-plots"])
        == 0
    )
    merged = _merged_accuracy(out)
    assert merged["l2o-lstm-hessian-ev"] == pytest.approx([0.95, 0.951])  # the new rows, not the old ones
    assert merged["l2o-lstm"] == pytest.approx([0.90, 0.901])
    assert set(merged) == {"l2o-lstm", "l2o-lstm-hessian-ev"}
    # or keep the old rows under another label
    assert (
        gen.main(
            [
                "merge",
                str(old),
                str(new),
                "--rename",
                f"l2o-lstm-hessian-ev@{old}=l2o-lstm-hessian-ev-w0.02",
                "--out",
                str(out),
                "--no-plots",
            ]
        )
        == 0
    )
    merged = _merged_accuracy(out)
    assert merged["l2o-lstm-hessian-ev"] == pytest.approx([0.95, 0.951])
    assert merged["l2o-lstm-hessian-ev-w0.02"] == pytest.approx([0.80, 0.801])
    assert "l2o-lstm-hessian-ev-w0.02" in (out / "claims.md").read_text()  # a learned entry in the claim checks


@pytest.mark.parametrize(
    "drop, message",
    [
        ("l2o-lstm-sam@{old}", "has no runs of l2o-lstm-sam"),
        ("l2o-lstm@{elsewhere}", "is not one of the inputs"),
    ],
)
def test_merge_drop_rejects_what_it_cannot_drop(gen, tmp_path, drop, message):
    old = _table(tmp_path / "old", {"l2o-lstm": 0.90})
    with pytest.raises(SystemExit, match=message):
        gen.main(
            [
                "merge",
                str(old),
                "--drop",
                drop.format(old=old, elsewhere=tmp_path / "x"),
                "--out",
                str(tmp_path / "m"),
                "--no-plots",
            ]
        )


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--drop", "l2o-lstm", "expected LABEL@INPUT_FOLDER"),
        ("--rename", "l2o-lstm=x", "expected LABEL@INPUT_FOLDER"),
        ("--rename", "l2o-lstm@{old}", "expected LABEL@INPUT_FOLDER=NEW_LABEL"),
    ],
)
def test_merge_options_need_label_at_folder(gen, tmp_path, capsys, option, value, message):
    old = _table(tmp_path / "old", {"l2o-lstm": 0.90})
    with pytest.raises(SystemExit):
        gen.main(["merge", str(old), option, value.format(old=old), "--out", str(tmp_path / "m")])
    assert message in capsys.readouterr().err


def test_select_reports_w0_and_the_best_nonzero_weight_per_kind(gen, tmp_path, capsys):
    """Three candidates with the same (untrained) net tie on validation: the rule then keeps the smallest
    weight, i.e. w = 0 overall and 0.01 among the non-zero hessian_trace weights."""
    torch.manual_seed(0)
    net = DMLSTM()
    for name, blocks in [
        ("control", []),
        ("hessian-0.01", [{"kind": "hessian_trace", "weight": 0.01}]),
        ("hessian-0.03", [{"kind": "hessian_trace", "weight": 0.03}]),
        ("sam-3", [{"kind": "sam", "weight": 3.0}]),
    ]:
        run = tmp_path / "runs" / name
        save_pretrained(net, run / "model", name=name, description="test fixture with untrained weights")
        (run / "config.json").write_text(json.dumps({"regularizers": blocks}))
    out = tmp_path / "select.json"
    assert (
        gen.main(
            [
                "select",
                "--by-kind",
                "--runs",
                str(tmp_path / "runs" / "*"),
                "--tasks",
                "digits-mlp20-relu",
                "--steps",
                "2",
                "--seeds",
                "1",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    chosen = json.loads(out.read_text())
    assert len({c["val_accuracy"] for c in chosen["candidates"]}) == 1  # the tie the rule must break
    assert chosen["selected"]["model"].endswith("control/model")
    assert chosen["selected_by_kind"]["hessian_trace"]["model"].endswith("control/model")
    assert chosen["best_nonzero_by_kind"]["hessian_trace"]["weights"] == [0.01]
    assert chosen["best_nonzero_by_kind"]["sam"]["weights"] == [3.0]
    assert "best non-zero: " in capsys.readouterr().out


def _scale_trainer(tmp_path, weight: float):
    from learned_optim.meta import MetaTrainer

    config = {
        "name": "scale",
        "seed": 0,
        "net": {"family": "dm_lstm", "config": {"hidden_size": 4, "num_layers": 1}},
        "task": {"family": "quadratic", "kwargs": {"dim": 3, "num_instances": 4}},
        "unroll": {"trajectory_length": 6, "segment_length": 3},
        "regularizers": [{"kind": "jacobian_trace", "weight": weight, "where": "final"}],
    }
    return MetaTrainer(config, out_dir=tmp_path / f"w{weight}", progress=False)


def test_regularizer_scale_is_linear_in_the_weight_and_leaves_the_net_alone(tmp_path, capsys):
    scale = _script("regularizer_scale")
    one = _scale_trainer(tmp_path, 1.0)
    before = {k: v.detach().clone() for k, v in one.rule.state_dict().items()}
    ratios = scale.gradient_ratios(one, 3)
    # "final": the term applies once per 6-step trajectory, in its second 3-step segment; 3 trajectories ran
    assert len(ratios) == 3 and one.meta_epochs == 3 and all(r > 0 for r in ratios)
    assert all(torch.equal(v, one.rule.state_dict()[k]) for k, v in before.items())
    assert scale.gradient_ratios(_scale_trainer(tmp_path, 3.0), 3) == pytest.approx([3 * r for r in ratios], rel=1e-6)
    with pytest.raises(SystemExit):
        scale.main(["smoke"])  # a config without regularizers: nothing to measure
    assert "has no regularizers" in capsys.readouterr().err


def test_select_rule_breaks_float32_ties_towards_the_smaller_weight(gen):
    # the session-4 GAM search: w = 3 and the control had the same correct predictions, means 1.2e-8 apart
    control = {"val_accuracy": 0.9580555438995362, "weights": []}
    gam3 = {"val_accuracy": 0.9580555558204651, "weights": [3.0]}
    gam10 = {"val_accuracy": 0.9538888931274414, "weights": [10.0]}
    assert gen.best_of([gam10, gam3, control]) is control
    assert gen.best_of([gam10, gam3]) is gam3
    assert gen.best_of([{"val_accuracy": 0.9584, "weights": [3.0]}, control])["weights"] == [3.0]  # a real win
    assert gen.best_of([{"val_accuracy": float("nan"), "weights": []}, gam10]) is gam10


def test_paired_suite_compares_two_contenders_run_by_run(tmp_path, capsys):
    """benchmarks/paired_suite.py: paired differences per task (A's win when the whole interval is below 0), the
    Hessian-trace ratio from the run records, and a clear error for an unknown contender."""
    paired = _script("paired_suite")
    runs, store = [], tmp_path / "runs"
    store.mkdir()
    a_test = {"t1": [1.0, 1.1, 0.9], "t2": [2.0, 2.5, 1.5]}
    for task, values in a_test.items():
        for seed, value in enumerate(values):
            for contender, test, trace in (("A", value - 0.5, 1.0), ("B", value, 4.0)):
                if task == "t2" and contender == "A":
                    test = value + (0.3, -0.3, 0.1)[seed]  # noisy: a tie
                key = f"{task}-{contender}-{seed}"
                runs.append(
                    {
                        "task": task,
                        "contender": contender,
                        "key": key,
                        "seed": seed,
                        "final": {"val_loss": test, "test_loss": test},
                    }
                )
                (store / f"{key}.json").write_text(json.dumps({"key": key, "flatness": {"hessian_trace": trace}}))
    (tmp_path / "results.json").write_text(json.dumps({"runs": runs}))
    rows = paired.paired_rows(paired.pooled_runs([tmp_path / "results.json"]), [("A", "B")])
    assert [r["task"] for r in rows] == ["t1", "t2"]
    assert rows[0]["test_loss"][0] == pytest.approx(-0.5) and rows[0]["test_loss"][2] == "win"
    assert rows[1]["test_loss"][2] == "tie"
    assert rows[0]["trace_ratio"] == pytest.approx(0.25)
    assert paired.main([str(tmp_path / "results.json"), "--a", "A", "--b", "B"]) == 0
    assert "1 wins / 1 ties / 0 losses over 2 tasks" in capsys.readouterr().out
    pooled = paired.paired_rows(paired.pooled_runs([tmp_path / "results.json"]), [("A", "B"), ("A", "B")])
    assert pooled[0]["seeds"] == 6 and pooled[0]["test_loss"][0] == pytest.approx(-0.5)
    with pytest.raises(SystemExit):
        paired.main([str(tmp_path / "results.json"), "--a", "C", "--b", "B"])
    with pytest.raises(SystemExit):
        paired.main([str(tmp_path / "results.json"), "--a", "A", "--a", "A", "--b", "B"])


def test_loss_scale_scales_the_training_loss_only(tmp_path, capsys):
    """benchmarks/loss_scale.py: the wrapped workload's training loss is the task's times the scale and its
    measurements are the task's; AdamW's step does not depend on the scale (so its final loss at scale 10 is its
    loss at scale 1, to rounding), a learned optimizer runs at AdamW's tuned setting read from a results.json."""
    script = _script("loss_scale")
    workload = script.get_task("diabetes-mlp").bind(steps=3)
    scaled = script.ScaledLoss(workload, 10.0)
    model = workload.build_model(0)
    batch = workload.batch(torch.Generator().manual_seed(0))
    assert torch.allclose(scaled.loss(model, batch), 10.0 * workload.loss(model, batch))
    assert scaled.measure(model, "val") == workload.measure(model, "val") and scaled.steps == 3
    chosen = {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.1, "schedule": "cosine"}
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"tuning": [{"task": "diabetes-mlp", "contender": "adamw", "chosen": chosen}]}))
    flagship = Path(__file__).resolve().parents[2] / "pretrained" / "adafac-mlp-adam-magnitude-tbv-nomup-soup-all8"
    out = tmp_path / "finals.json"
    args = ["--optimizer", str(flagship), "--results", str(results), "--scales", "10", "--seeds", "1", "--steps", "3"]
    script.main([*args, "--out", str(out)])
    printed = capsys.readouterr().out
    assert "diabetes-mlp: lr 0.01, wd 0.1, cosine" in printed and "| diabetes-mlp | 10 |" in printed
    finals = json.loads(out.read_text())["final_val_loss"]["diabetes-mlp"]
    assert set(finals) == {"adamw", flagship.name}
    adamw = finals["adamw"]
    assert adamw["10.0"][0] == pytest.approx(adamw["1.0"][0], rel=1e-4)


def test_aggregate_uncertainty_reads_a_suite_and_resamples_seeds_in_pairs(tmp_path, capsys):
    """benchmarks/aggregate_uncertainty.py: the suite's aggregates (IQM over tasks of the ratio of seed means), the
    per-seed reading, and a paired seed bootstrap that is reproducible and spans the point value; without a run store
    it says the speed-ups are missing."""
    script = _script("aggregate_uncertainty")
    runs = []
    for t in range(4):
        for seed in range(3):
            for contender, val in (("adamw", 1.0 + seed), ("me [adamw]", (1.0 + seed) * (0.9 + 0.05 * t) + 0.1 * seed)):
                final = {"val_loss": val, "test_loss": 2 * val}
                runs.append({"task": f"t{t}", "contender": contender, "key": f"{t}{seed}{contender}", "seed": seed,
                             "final": final})  # fmt: skip
    results = {"runs": runs}
    values = script.per_seed_values(results, "me [adamw]", [tmp_path / "no-store"])
    assert values["val"].shape == (4, 2, 3) and "speedup" not in values
    ratios = [values["val"][t, 0].mean() / values["val"][t, 1].mean() for t in range(4)]
    assert script.aggregates(values)["val"] == pytest.approx(sorted(ratios)[1] / 2 + sorted(ratios)[2] / 2)
    per_seed = [(values["val"][t, 0] / values["val"][t, 1]).mean() for t in range(4)]
    assert script.aggregates(values, per_seed=True)["val"] == pytest.approx(
        sorted(per_seed)[1] / 2 + sorted(per_seed)[2] / 2
    )
    draws = script.bootstrap(values, 200)
    assert (draws["val"] == script.bootstrap(values, 200)["val"]).all()
    assert draws["val"].min() <= script.aggregates(values)["val"] <= draws["val"].max()
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert script.main([str(path), "--contender", "me [adamw]", "--resamples", "50"]) == 0
    printed = capsys.readouterr().out
    assert "| val loss / AdamW |" in printed and "no speed-ups" in printed
    with pytest.raises(SystemExit, match="no task has runs of 'you'"):
        script.main([str(path), "--contender", "you"])
    # with the run store: speed-ups, and a diverged run's loss as the suite counts it (its initial validation loss)
    store = tmp_path / "runs"
    store.mkdir()
    for run in runs:
        diverged = run["key"] == "00me [adamw]"
        record = {"key": run["key"], "final": {**run["final"], **({"val_loss": None} if diverged else {})},
                  "initial_val_loss": 5.0, "train_loss": [2.0] * 19 + [1.0], "steps": 20,
                  "nonfinite_at": 7 if diverged else None}  # fmt: skip
        (store / f"{run['key']}.json").write_text(json.dumps(record))
    stored = script.per_seed_values(results, "me [adamw]", [store])
    assert stored["val"][0, 0, 0] == 5.0 and stored["speedup"].shape == (4, 3)
    assert stored["speedup"][0, 0] == 0.0 and stored["speedup"][1, 0] == 1.0  # diverged: 0; the same curve: 1
    # two contenders paired: the same resamples for both, the difference of each aggregate and who is ahead
    for t in range(4):
        for seed in range(3):
            final = {"val_loss": 1.0 + seed + 0.5, "test_loss": 2.0}
            runs.append({"task": f"t{t}", "contender": "worse [adamw]", "key": f"w{t}{seed}", "seed": seed,
                         "final": final})  # fmt: skip
    path.write_text(json.dumps(results))
    me, worse = (
        script.per_seed_values(results, name, [tmp_path / "no-store"]) for name in ("me [adamw]", "worse [adamw]")
    )
    paired = script.paired_bootstrap([me, worse], 100)
    assert (paired[0]["val"] == script.bootstrap(me, 100)["val"]).all()  # the same draws as alone
    assert script.main([str(path), "--contender", "me [adamw]", "--against", "worse [adamw]", "--resamples", "50"]) == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("| val loss / AdamW |"))
    assert row.endswith("| 1.00 |") and "paired" in printed
    short = {**worse, "val": worse["val"][:, :, :2], "test": worse["test"][:, :, :2]}
    with pytest.raises(SystemExit, match="differ in tasks or seeds"):
        script.paired_bootstrap([me, short], 10)


def test_long_horizon_late_rise_reads_the_windowed_training_curve():
    """benchmarks/long_horizon.py's late rise: 0 for a curve that only falls, the rise of a late window above the
    lowest earlier one as a share of the progress down to it (a spike), nothing from the first tenth of the run, NaN
    for a non-finite run."""
    script = _script("long_horizon")
    falling = [1.0 / (t + 1) for t in range(200)]
    assert script.late_rise(falling, 200) == 0.0
    spiked = [*falling[:150], *(3 * falling[150] for _ in range(10)), *falling[160:]]  # a flat window at 3x step 150
    first, lowest = sum(falling[:10]) / 10, sum(falling[140:150]) / 10  # windows of 10 steps (200 / 20)
    assert script.late_rise(spiked, 200) == pytest.approx((3 * falling[150] - lowest) / (first - lowest))
    early = [5.0 if 5 <= t < 10 else 1.0 for t in range(200)]  # a rise within the first tenth only
    assert script.late_rise(early, 200) == 0.0
    assert math.isnan(script.late_rise([*falling[:100], math.nan, *falling[101:]], 200))


def test_long_horizon_runs_both_at_adamws_setting_over_the_longer_horizon(tmp_path, capsys):
    """benchmarks/long_horizon.py end to end: AdamW and the flagship at AdamW's chosen setting (read from a
    results.json), ``factor`` times the horizon, stored runs reused by a second call; an untuned task is refused."""
    script = _script("long_horizon")
    chosen = {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.1, "schedule": "cosine"}
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"tuning": [{"task": "diabetes-mlp", "contender": "adamw", "chosen": chosen}]}))
    flagship = Path(__file__).resolve().parents[2] / "pretrained" / "adafac-mlp-adam-magnitude-tbv-nomup-soup-all8"
    args = ["--optimizer", str(flagship), "--tasks", "diabetes-mlp", "--factor", "3", "--seeds", "2", "--steps", "10"]
    args += ["--settings-from", str(results), "--out", str(tmp_path / "out")]
    script.main(args)
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [r["contender"] for r in rows] == ["adamw", flagship.name]
    assert all(r["steps"] == 30 and r["setting"] == "lr 0.01, wd 0.1, cosine" for r in rows)
    assert rows[0]["val_ratio"] == 1.0 and len(rows[1]["late_rise"]) == 2
    assert "(4 trained, 0 reused)" in capsys.readouterr().out
    script.main(args)
    assert "(0 trained, 4 reused)" in capsys.readouterr().out
    script.main([*args[:-1], str(tmp_path / "elsewhere"), "--baseline-dir", str(tmp_path / "out")])
    assert "(0 trained, 4 reused)" in capsys.readouterr().out and not (tmp_path / "elsewhere" / "runs").exists()
    script.main([*args, "--lr-scale", "0.5"])  # the learned optimizer's lr only: AdamW's runs reused, its runs new
    assert "(2 trained, 2 reused)" in capsys.readouterr().out
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["lr 0.01, wd 0.1, cosine", "lr 0.005, wd 0.1, cosine"]
    with pytest.raises(SystemExit):
        script.main([*args[:4], "breast-cancer-mlp", *args[5:]])
    with pytest.raises(SystemExit):
        script.main([*args, "--lr-scale", "0"])


def test_magnitude_factors_records_the_heads_factor_of_every_tensor_at_every_step(tmp_path, capsys):
    """benchmarks/magnitude_factors.py: a head of bias b alone gives every tensor B^tanh(b) at every step; the wrapped
    methods are restored after the run; a net without a head is refused."""
    script = _script("magnitude_factors")
    chosen = {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.1, "schedule": "cosine"}
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"tuning": [{"task": "diabetes-mlp", "contender": "adamw", "chosen": chosen}]}))
    rule = AdafacMLP(magnitude_head_bound=2.0, step_magnitude="adam", mup=False).requires_grad_(False)
    rule.magnitude_head.bias.fill_(0.5)
    save_pretrained(rule, tmp_path / "net", name="head-net", description="a net with a magnitude head")
    save_pretrained(AdafacMLP(), tmp_path / "plain", name="plain-net", description="a net without one")
    args = ["--optimizer", str(tmp_path / "net"), "--settings-from", str(results), "--tasks", "diabetes-mlp"]
    task = get_task("diabetes-mlp").bind(steps=10)
    before = AdafacMLP.__dict__["_magnitude_factor"], LearnedOptimizer.__dict__["step"]
    factors = script.recorded_factors(task, learned_optimizer(str(tmp_path / "net")), Setting(**chosen), 0)
    assert (AdafacMLP.__dict__["_magnitude_factor"], LearnedOptimizer.__dict__["step"]) == before
    tensors = len(list(task.build_model(0).parameters()))
    assert len(factors) == 10 and all(len(step) == tensors for step in factors)
    assert all(math.isclose(f, 2.0 ** math.tanh(0.5), rel_tol=1e-6) for step in factors for f in step)
    script.main([*args, "--steps", "10"])
    row = capsys.readouterr().out.splitlines()[-1]
    factor = 2.0 ** math.tanh(0.5)
    assert row.startswith(f"| diabetes-mlp | 10 | {10 * tensors} | ") and f"{factor:.3f} | 1.000 |" in row
    with pytest.raises(SystemExit):
        script.main([*args[:1], str(tmp_path / "plain"), *args[2:], "--steps", "5"])


def test_untrained_control_writes_the_recipes_net_before_meta_training_with_net_settings_changed(tmp_path, capsys):
    """The control is the recipe's hand-built (Adam-init) net; ``--net`` changes a setting the weights do not depend
    on (the orthogonalised direction here), and the name and description say so."""
    script = _script("untrained_control")
    plain = script.main(["adafac-mlp-adam-magnitude-tbv-nomup", "--out", str(tmp_path / "plain")])
    changed = script.main(
        ["adafac-mlp-adam-magnitude-tbv-nomup", "--net", "newton_schulz_steps=5", "--out", str(tmp_path / "ns")]
    )
    configs = [json.loads((folder / "config.json").read_text()) for folder in (plain, changed)]
    assert configs[0]["net"]["newton_schulz_steps"] == 0 and configs[1]["net"]["newton_schulz_steps"] == 5
    assert {k: v for k, v in configs[0]["net"].items() if k != "newton_schulz_steps"} == {
        k: v for k, v in configs[1]["net"].items() if k != "newton_schulz_steps"
    }
    assert configs[1]["name"] == "adafac-mlp-adam-magnitude-tbv-nomup-untrained-newton_schulz_steps-5"
    assert "newton_schulz_steps=5" in configs[1]["description"] and configs[1]["schedule"] == "cosine"
    weights = [load_file(folder / "model.safetensors") for folder in (plain, changed)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # the Adam init: seed-free
    momentum = script.main(
        ["adafac-mlp-adam-magnitude-tbv-nomup", "--net", "init=momentum", "--out", str(tmp_path / "m")]
    )
    rule = load_rule(str(momentum))[0]
    assert rule.config.init == "momentum"
    first = load_file(momentum / "model.safetensors")["mlp.0.weight"]
    assert first[0, rule.momentum_feature_index] == 1.0 and first[0, rule.adam_feature_index] == 0.0


def test_suite_iteration_time_times_adamw_and_each_learned_optimizer_with_its_variant(tmp_path, capsys, monkeypatch):
    """One row per optimizer and task: AdamW (1.00x), the checkpoint, and its variant with a net setting changed
    (the same weights, reconfigured), with the machine's lscpu line."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    script = _script("suite_iteration_time")
    torch.manual_seed(0)
    folder = save_pretrained(AdafacMLP(newton_schulz_steps=2), tmp_path / "ns", name="ns-net")
    script.main(["--tasks", "breast-cancer-mlp", "--optimizer", str(folder), "--net", "newton_schulz_dtype=bfloat16",
                 "--repeats", "1"])  # fmt: skip
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| breast-cancer-mlp")]
    assert [r[2] for r in rows] == ["adamw", "ns", "ns [newton_schulz_dtype=bfloat16]"]
    assert rows[0][4].startswith("1.00x") and all(float(r[3]) > 0 for r in rows)
    assert "lscpu" in out


def test_newton_schulz_dtype_times_float32_against_bfloat16_and_the_two_float32_routes(capsys, monkeypatch):
    """A row per size: float32 and bfloat16 times with what ``auto`` takes; with ``--routes``, the direct iteration
    and the Gram route in float32 with the route ``takes_gram_route`` takes (direct on a small matrix, the Gram
    matrix on a batch whose products it saves)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    script = _script("newton_schulz_dtype")
    script.main(["--steps", "3", "--sizes", "64x128", "--repeats", "1"])
    row = next(line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 64 x 128"))
    assert float(row[1]) > 0 and float(row[2]) > 0 and row[4] == "float32"
    script.main(["--routes", "--steps", "3", "--sizes", "10x96", "4x32x128", "--repeats", "1"])
    rows = {r[0].strip("| "): r for r in (line.split(" | ") for line in capsys.readouterr().out.splitlines())}
    assert rows["10x96"][4].strip(" |") == "direct" and rows["4x32x128"][4].strip(" |") == "gram"
    assert all(float(rows[k][1]) > 0 and float(rows[k][2]) > 0 for k in ("10x96", "4x32x128"))


def test_suite_iteration_time_step_only_times_the_step_alone(tmp_path, capsys, monkeypatch):
    """With ``--step-only``: the step alone on one backward's gradient (a row per optimizer, the per-step time of
    ``STEP_ONLY_CALLS`` steps in a row; the model is never run again), and never with ``--speedups``."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    script = _script("suite_iteration_time")
    folder = save_pretrained(AdafacMLP(newton_schulz_steps=2), tmp_path / "ns", name="ns-net")
    losses = []
    workload = script.get_task("breast-cancer-mlp").bind()
    original = type(workload).loss

    def counted(self, *args, **kwargs):
        losses.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(workload), "loss", counted)
    script.main(["--tasks", "breast-cancer-mlp", "--optimizer", str(folder), "--repeats", "2", "--step-only"])
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| breast-cancer-mlp")]
    assert [r[2] for r in rows] == ["adamw", "ns"] and "ms / step" in out
    assert rows[0][4].startswith("1.00x") and all(float(r[3]) > 0 for r in rows)
    assert len(losses) == 2  # one backward per optimizer, none in the timed steps
    with pytest.raises(SystemExit):
        script.main(["--tasks", "breast-cancer-mlp", "--optimizer", str(folder), "--step-only", "--speedups",
                     str(tmp_path / "results.json"), "--contender", "ns-net [adamw]"])  # fmt: skip


def test_suite_iteration_time_alone_times_each_optimizer_in_a_process_of_its_own(tmp_path, capsys, monkeypatch):
    """With ``--alone``: each optimizer's loop in a fresh process (the script with ``--alone-run``), its mean time and
    page faults per call; the child prints one JSON line; never with ``--speedups``."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    script = _script("suite_iteration_time")
    folder = save_pretrained(AdafacMLP(newton_schulz_steps=2), tmp_path / "ns", name="ns-net")
    script.main(["--tasks", "breast-cancer-mlp", "--optimizer", str(folder), "--alone", "2", "--step-only"])
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| breast-cancer-mlp")]
    assert [r[2] for r in rows] == ["adamw", "ns"] and "page faults / step" in out and "alone" in out
    assert rows[0][5].startswith("1.00x") and all(float(r[3]) > 0 and float(r[4]) >= 0 for r in rows)
    script.main(["--tasks", "breast-cancer-mlp", "--optimizer", str(folder), "--alone", "1", "--alone-run",
                 "breast-cancer-mlp", "ns"])  # fmt: skip
    child = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert child["seconds"] > 0 and child["faults"] >= 0
    with pytest.raises(SystemExit):
        script.main(["--tasks", "breast-cancer-mlp", "--optimizer", str(folder), "--alone", "2", "--speedups",
                     str(tmp_path / "results.json"), "--contender", "ns-net [adamw]"])  # fmt: skip


def test_suite_iteration_time_estimates_the_speed_up_in_time_from_a_suites_step_speed_ups(
    tmp_path, capsys, monkeypatch
):
    """With ``--speedups``: per task the suite's step speed-up, the iteration ratio measured here and their quotient,
    with the IQM over tasks; a contender or task the results lack, or the option without its partner, is refused."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    script = _script("suite_iteration_time")
    folder = save_pretrained(AdafacMLP(newton_schulz_steps=2), tmp_path / "ns", name="ns-net")
    tasks = ["breast-cancer-mlp", "noisy-labels-mlp"]
    summary = [
        {"task": task, "contender": contender, "speedup": speedup}
        for task, speedup in zip(tasks, (1.5, 3.0), strict=True)
        for contender in ("adamw", "ns-net [adamw]")
    ]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"summary": summary}))
    script.main(["--tasks", *tasks, "--optimizer", str(folder), "--repeats", "1", "--speedups", str(results),
                 "--contender", "ns-net [adamw]"])  # fmt: skip
    out = capsys.readouterr().out
    timing, estimating = out.split("Speed-up in time")
    timed = {r[0]: r for r in (line.strip(" |").split(" | ") for line in timing.splitlines()) if r[2:3] == ["ns"]}
    estimates = [line.strip(" |").split(" | ") for line in estimating.splitlines()]
    estimates = {r[0]: r for r in estimates if len(r) == 4 and r[0] in (*tasks, "IQM over tasks")}
    for task, speedup in zip(tasks, (1.5, 3.0), strict=True):
        ratio = float(timed[task][4].rstrip("x"))
        assert estimates[task][1] == f"{speedup:.2f}x" and estimates[task][2] == f"{ratio:.2f}x"
        assert float(estimates[task][3].rstrip("x")) == pytest.approx(speedup / ratio, rel=0.02)
    assert "IQM over tasks" in estimates
    with pytest.raises(SystemExit, match="no contender 'other'"):
        script.main(
            ["--tasks", tasks[0], "--optimizer", str(folder), "--speedups", str(results), "--contender", "other"]
        )
    with pytest.raises(SystemExit, match="has no 'ns-net \\[adamw\\]' on copy-gru"):
        script.main(["--tasks", "copy-gru", "--optimizer", str(folder), "--repeats", "1", "--speedups", str(results),
                     "--contender", "ns-net [adamw]"])  # fmt: skip
    with pytest.raises(SystemExit):
        script.main(["--tasks", tasks[0], "--optimizer", str(folder), "--speedups", str(results)])
    with pytest.raises(SystemExit):  # a baseline's name without --baseline: its own timings are not taken
        script.main(["--tasks", tasks[0], "--optimizer", str(folder), "--speedups", str(results), "--contender",
                     "muon-adamw"])  # fmt: skip
    # a suite baseline's own timings: muon-adamw's speed-up over its measured iteration ratio
    summary.append({"task": tasks[0], "contender": "muon-adamw", "speedup": 2.0})
    results.write_text(json.dumps({"summary": summary}))
    script.main(["--tasks", tasks[0], "--baseline", "muon-adamw", "--repeats", "1", "--speedups", str(results),
                 "--contender", "muon-adamw"])  # fmt: skip
    timing, estimating = capsys.readouterr().out.split("Speed-up in time")
    muon = next(r for r in (line.strip(" |").split(" | ") for line in timing.splitlines()) if r[2:3] == ["muon-adamw"])
    row = next(line.strip(" |").split(" | ") for line in estimating.splitlines() if line.startswith(f"| {tasks[0]}"))
    assert row[2] == muon[4] and float(row[3].rstrip("x")) == pytest.approx(2.0 / float(muon[4].rstrip("x")), rel=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_suite_iteration_time_on_cuda(tmp_path, capsys, monkeypatch):
    """``--device cuda``: the model, its batch and the optimizers on the GPU, timed by the synchronised wall clock."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    script = _script("suite_iteration_time")
    folder = save_pretrained(AdafacMLP(newton_schulz_steps=3), tmp_path / "ns", name="ns-net")
    script.main(["--device", "cuda", "--tasks", "breast-cancer-mlp", "--optimizer", str(folder), "--repeats", "1"])
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| breast-cancer-mlp")]
    assert [r[2] for r in rows] == ["adamw", "ns"] and all(float(r[3]) > 0 for r in rows)
    assert "wall, synchronised" in out and "GPU" in out


def test_suite_iteration_time_times_a_suite_baseline_and_refuses_an_unknown_one(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    script = _script("suite_iteration_time")
    script.main(["--tasks", "breast-cancer-mlp", "--baseline", "muon-adamw", "--repeats", "1"])
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| breast-cancer-mlp")]
    assert [r[2] for r in rows] == ["adamw", "muon-adamw"] and float(rows[1][3]) > 0
    with pytest.raises(SystemExit, match="unknown baseline 'lion'"):
        script.main(["--tasks", "breast-cancer-mlp", "--baseline", "lion", "--repeats", "1"])
