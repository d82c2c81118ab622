"""The evaluation harness on tiny tasks: files and columns, confidence intervals, validation lr tuning."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

import learned_optim
from learned_optim import DMLSTM, save_pretrained
from learned_optim.bench import evaluate as ev
from learned_optim.tasks.base import Task, TaskFamily

# ------------------------------------------------------------------------------------------ tiny tasks


class TinyLogistic(Task):
    """Logistic regression on 4-d Gaussian data; minibatches of 16 for training, full val/test sets."""

    name = "tiny-logistic"

    def __init__(self, seed: int = 0, dim: int = 4):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(dim, generator=g)
        self.dim = dim
        self.data = {}
        for split in ("train", "val", "test"):
            x = torch.randn(64, dim, generator=g)
            self.data[split] = (x, (x @ w > 0).float())

    def init_params(self, generator):
        return {"w": 0.5 * torch.randn(self.dim, generator=generator), "b": torch.zeros(1)}

    def batch(self, split, generator):
        x, y = self.data[split]
        if split == "train":
            index = torch.randint(len(x), (16,), generator=generator)
            return x[index], y[index]
        return x, y

    def loss(self, params, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(x @ params["w"] + params["b"], y)

    def metrics(self, params, batch):
        x, y = batch
        return {"accuracy": float(((x @ params["w"] + params["b"] > 0).float() == y).float().mean())}


class TinyFamily(TaskFamily):
    name = "tiny-family"

    def sample(self, generator):
        return TinyLogistic(seed=int(torch.randint(1 << 30, (1,), generator=generator)))


class SplitQuadratic(Task):
    """loss = 0.5 (x - c_split)^2 from x0 = 0, with c_train = 1 and c_val = 0.25.

    One SGD step with lr gives x1 = lr, so the best *validation* lr of a grid is the one closest to
    0.25, while the best *training* lr would be 1.0.
    """

    name = "split-quadratic"
    targets = {"train": 1.0, "val": 0.25, "test": 0.25}

    def init_params(self, generator):
        return {"x": torch.zeros(1)}

    def batch(self, split, generator):
        return torch.tensor([self.targets[split]])

    def loss(self, params, batch):
        return 0.5 * ((params["x"] - batch) ** 2).sum()


pytestmark = pytest.mark.usefixtures("one_thread")  # the CLIs under test call torch.set_num_threads


@pytest.fixture
def checkpoint(tmp_path):
    """TEST FIXTURE: a freshly initialised (untrained) DM-LSTM saved as a checkpoint folder."""
    torch.manual_seed(0)
    return save_pretrained(
        DMLSTM(),
        tmp_path / "fixture-untrained",
        name="fixture-untrained",
        description="test fixture with untrained weights",
    )


# ------------------------------------------------------------------------------------------ harness
def test_tiny_run_writes_files_with_the_right_columns(tmp_path, checkpoint):
    lines = []
    results = ev.evaluate(
        [str(checkpoint), "adam", "sgd"],
        [TinyFamily()],
        steps=6,
        seeds=2,
        lr_grid=[0.1, 0.01],
        tune_steps=3,
        eval_every=2,
        progress=False,
        log=lines.append,
        command="pytest run",
    )
    files = results.write(tmp_path / "out")

    assert {k for k in files if not k.startswith("plot:")} == {"json", "summary_csv", "curves_csv", "markdown"}
    png = files["plot:tiny-family"]
    assert png.name == "curves_tiny-family.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with files["summary_csv"].open() as f:
        rows = list(csv.DictReader(f))
    stats = ["final_train_loss", "test_loss", "test_accuracy", "time_per_step_ms", "wall_time_s"]
    assert list(rows[0]) == [
        "task",
        "optimizer",
        "lr",
        "lr_tuned",
        "seeds",
        "diverged",
        *(c for s in stats for c in (s, f"{s}_ci95")),
    ]
    assert [r["optimizer"] for r in rows] == ["fixture-untrained", "adam", "sgd"]
    assert [r["lr_tuned"] for r in rows] == ["False", "True", "True"]
    assert float(rows[0]["lr"]) == 1.0  # the learned optimizer's multiplier is not tuned
    assert all(r["seeds"] == "2" and r["diverged"] == "0" for r in rows)
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 and float(r["test_accuracy_ci95"]) >= 0 for r in rows)

    with files["curves_csv"].open() as f:
        curves = list(csv.DictReader(f))
    assert list(curves[0]) == ["task", "optimizer", "seed", "lr", "step", "train_loss", "test_loss", "test_accuracy"]
    assert len(curves) == 3 * 2 * (6 + 1)  # optimizers x seeds x (steps + final evaluation)
    first = [r for r in curves if r["optimizer"] == "adam" and r["seed"] == "0"]
    assert [r["step"] for r in first] == [str(s) for s in range(7)]
    assert [bool(r["test_loss"]) for r in first] == [True, False, True, False, True, False, True]
    assert first[-1]["train_loss"] == "" and all(r["train_loss"] for r in first[:-1])

    data = json.loads(files["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert set(data) == {"config", "summary", "tuning", "runs"}
    assert data["config"]["steps"] == 6 and data["config"]["seed_list"] == [0, 1]
    assert [t["optimizer"] for t in data["tuning"]] == ["adam", "sgd"]
    assert data["tuning"][0]["grid"] == [0.1, 0.01] and data["tuning"][0]["seeds"] == [ev.TUNE_SEED_OFFSET]
    assert len(data["runs"]) == 6 and len(data["runs"][0]["train_loss"]) == 6
    assert data["config"]["optimizers"][0]["meta_trained"] is False

    # the grid and the choice are printed, one line per tuned baseline
    assert len(lines) == 2 and lines[0].startswith("[tune] adam on tiny-family: grid {0.1: ") and "-> lr = " in lines[0]

    table = files["markdown"].read_text()
    assert table.startswith(
        "| Task | Optimizer | lr | Final train loss | Test loss | Test accuracy (%) | "
        "Time / step (ms) | Wall time / run (s) | Diverged |"
    )
    assert table.count("\n| tiny-family |") == 3 and "95% confidence interval" in table and "`pytest run`" in table
    assert "tuned on the validation split over [0.1, 0.01] (3 steps, 1 separate seed)" in table
    # merged results keep the first input's config: the note must come from the tuning records themselves
    results.config["tune_steps"], results.config["tune_seeds"] = 1000, 7
    assert "(3 steps, 1 separate seed)" in results.markdown()


def test_same_init_and_batches_per_seed_for_every_optimizer(checkpoint):
    results = ev.evaluate(
        [str(checkpoint), "adam"],
        [TinyFamily()],
        steps=2,
        seeds=[3, 4],
        lr_grid=[0.1],
        tune_steps=1,
        progress=False,
        log=lambda _: None,
    )
    by = {(r.optimizer, r.seed): r for r in results.runs}
    for seed in (3, 4):  # same initial test loss and same first minibatch loss
        assert by["adam", seed].evals["loss"][0] == by["fixture-untrained", seed].evals["loss"][0]
        assert by["adam", seed].train_loss[0] == by["fixture-untrained", seed].train_loss[0]
    assert by["adam", 3].train_loss[0] != by["adam", 4].train_loss[0]
    assert by["adam", 3].time_per_step > 0 and by["adam", 3].wall_time >= 2 * by["adam", 3].time_per_step


# ------------------------------------------------------------------------------------------ statistics
def test_confidence_interval_on_known_numbers():
    mean, half = ev.mean_confidence_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # t_{0.975, 4} = 2.7764451, s = sqrt(2.5), s / sqrt(5) = sqrt(0.5)
    assert mean == 3.0 and half == pytest.approx(2.7764451052 * math.sqrt(0.5), rel=1e-9)
    mean, half = ev.mean_confidence_interval([2.0, 4.0], confidence=0.9)  # t_{0.95, 1} = 6.3137515
    assert mean == 3.0 and half == pytest.approx(6.3137515147, rel=1e-9)
    assert ev.mean_confidence_interval([1.0, math.nan, 3.0, math.inf])[0] == 2.0  # non-finite dropped
    mean, half = ev.mean_confidence_interval([7.0])
    assert mean == 7.0 and math.isnan(half)
    assert all(math.isnan(v) for v in ev.mean_confidence_interval([]))


def test_summary_reports_mean_and_t_interval_over_seeds():
    def run(seed, accuracy, diverged=None):
        return ev.RunResult(
            "t",
            "opt",
            seed,
            0.1,
            "test",
            [1.0, 0.5],
            [0, 2],
            {"loss": [2.0, 0.3], "accuracy": [0.1, accuracy]},
            0.001,
            0.01,
            diverged,
        )

    results = ev.EvaluationResults(
        {"steps": 2, "seeds": 4, "final_window": 1},
        [],
        [run(0, 0.9), run(1, 0.8), run(2, 1.0), run(3, 0.99, diverged=1)],
    )
    (row,) = results.summary
    assert row["seeds"] == 4 and row["diverged"] == 1
    assert row["test_accuracy"] == pytest.approx(0.9)
    assert row["test_accuracy_ci95"] == pytest.approx(4.3026527297 * 0.1 / math.sqrt(3), rel=1e-9)
    assert row["final_train_loss"] == 0.5 and row["time_per_step_ms"] == pytest.approx(1.0)
    assert "| t | opt | 0.1 | 0.5 ± 0 | 0.3 ± 0 | 90 ± 25 | 1 ± 0 | 0.01 ± 0 | 1/4 |" in results.markdown()


# ------------------------------------------------------------------------------------------ lr tuning
def test_grid_picks_the_best_validation_lr():
    spec = ev.resolve_optimizer("sgd", lr_grid=[0.01, 0.25, 1.0, 1e30])
    source = ev.resolve_task(SplitQuadratic())
    result = ev.tune_lr(spec, source, steps=1, seeds=[0])
    assert result.grid == [0.01, 0.25, 1.0, 1e30]
    # val loss 0.5 (lr - 0.25)^2; lr = 1e30 overflows float32 and counts as diverged
    assert result.val_loss[:3] == pytest.approx([0.5 * 0.24**2, 0.0, 0.5 * 0.75**2])
    assert result.val_loss[3] == math.inf
    assert result.chosen_lr == 0.25  # on the training split 1.0 would have won
    assert "grid {0.01: " in result.describe() and result.describe().endswith("-> lr = 0.25")

    lines = []
    results = ev.evaluate(
        ["sgd"], [SplitQuadratic()], steps=1, seeds=2, lr_grid=[0.01, 0.25, 1.0], progress=False, log=lines.append
    )
    assert [r.lr for r in results.runs] == [0.25, 0.25] and results.tuning[0].chosen_lr == 0.25
    assert results.summary[0]["test_loss"] == 0.0 and lines == [results.tuning[0].describe()]


def test_divergence_is_recorded_and_json_stays_strict(tmp_path):
    spec = ev.resolve_optimizer("sgd")
    spec.lr_grid, spec.lr = None, 1e30  # a fixed, exploding learning rate
    results = ev.evaluate([spec], [SplitQuadratic()], steps=3, seeds=2, progress=False)
    assert all(r.diverged_at == 1 for r in results.runs)  # the loss at step 1 overflows
    assert results.runs[0].train_loss[0] == 0.5 and all(math.isnan(v) for v in results.runs[0].train_loss[1:])
    assert results.summary[0]["diverged"] == 2 and math.isnan(results.summary[0]["test_loss"])
    files = results.write(tmp_path, plots=False)
    assert json.loads(files["json"].read_text())["summary"][0]["test_loss"] is None
    assert "| n/a |" in files["markdown"].read_text() and "| 2/2 |" in files["markdown"].read_text()


def test_the_tasks_divergence_bound_counts_as_divergence():
    task = SplitQuadratic()
    task.divergence_bound = 10.0
    spec = ev.resolve_optimizer("sgd")
    spec.lr_grid, spec.lr = None, 4.0  # x: 0 -> 4 -> -8 -> 28: out of bound after the third update
    (run,) = ev.evaluate([spec], [task], steps=5, seeds=1, progress=False).runs
    assert run.diverged_at == 3 and run.train_loss[:3] == [0.5, 4.5, 40.5] and math.isnan(run.train_loss[3])


def test_baseline_registry_is_pluggable():
    info = ev.BaselineInfo(
        "sgd-momentum-test", torch.optim.SGD, "SGD with momentum 0.9", lr_grid=(0.5,), defaults={"momentum": 0.9}
    )
    ev.register_baseline(info)
    try:
        with pytest.raises(ValueError, match="already registered"):
            ev.register_baseline(info)
        results = ev.evaluate(
            ["SGD-Momentum-Test"], [SplitQuadratic()], steps=1, seeds=1, progress=False, log=lambda _: None
        )
        assert results.tuning[0].grid == [0.5] and results.runs[0].lr == 0.5
    finally:
        del ev.BASELINES["sgd-momentum-test"]


# ------------------------------------------------------------------------------------------ CLI
def test_cli_bad_checkpoint_and_unknown_baseline(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    code = ev.main(
        ["--optimizer", str(tmp_path / "bad"), "--tasks", "x", "--out", str(tmp_path / "o"), "--no-progress"]
    )
    assert code == 2 and "config.json does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.main(["--baselines", "adamw-nope", "--tasks", "x", "--out", str(tmp_path / "o")])
    assert "unknown baseline" in capsys.readouterr().err
    # refused before any run: no tuning at all, an --out that cannot be written, no threads
    code = ev.main(["--baselines", "adamw", "--tasks", "quadratic", "--tune-steps", "0", "--out", str(tmp_path / "o")])
    assert code == 2 and "tune_steps must be >= 1" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    for bad in (["--out", str(tmp_path / "a-file")], ["--threads", "0", "--out", str(tmp_path / "o")]):
        with pytest.raises(SystemExit):
            ev.main(["--baselines", "adamw", "--tasks", "quadratic", *bad])
        assert "--out" in capsys.readouterr().err or bad[0] == "--threads"


def test_cli_on_a_real_task_family(tmp_path, checkpoint, capsys):
    out = tmp_path / "cli-out"
    code = ev.main(
        [
            "--optimizer",
            str(checkpoint),
            "--tasks",
            "digits-mlp20-relu",
            "--baselines",
            "adam",
            "--steps",
            "3",
            "--seeds",
            "2",
            "--lr-grid",
            "0.01,0.001",
            "--tune-steps",
            "1",
            "--out",
            str(out),
            "--no-progress",
            "--no-plots",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and "[tune] adam on digits-mlp20-relu: grid {0.01: " in printed
    assert "| digits-mlp20-relu | fixture-untrained | 1 |" in printed
    assert "Command: `python -m learned_optim evaluate --optimizer " in printed
    assert sorted(p.name for p in out.iterdir()) == ["curves.csv", "results.json", "summary.csv", "summary.md"]


def test_cli_records_results_into_the_checkpoint_card(tmp_path, checkpoint, capsys):
    """--record-card writes the table into the card's "Evaluation: <tasks>" section and the summary into
    config.json; a second evaluation of the same tasks replaces its section, other task sets stay."""
    card_path = checkpoint / "README.md"
    card_path.write_text("# card\n\n## Evaluation\n\nNot yet.\n\n## Config\n\nkept\n")
    learned_optim.hub.record_evaluation(checkpoint, ["digits-conv"], "conv table", {"steps": 7})
    for steps in ("2", "3"):
        code = ev.main(
            [
                "--optimizer",
                str(checkpoint),
                "--tasks",
                "digits-mlp20-relu",
                "--baselines",
                "",
                "--steps",
                steps,
                "--seeds",
                "2",
                "--out",
                str(tmp_path / steps),
                "--no-progress",
                "--no-plots",
                "--record-card",
                str(checkpoint),
            ]
        )
        assert code == 0
    card = (checkpoint / "README.md").read_text()
    assert card.count("## Evaluation: digits-mlp20-relu") == 1 and "--steps 3" in card and "--steps 2" not in card
    assert "## Evaluation: digits-conv\n\nconv table" in card  # sections of other task sets are kept
    assert "Not yet." not in card and "## Evaluation\n" not in card and "## Config\n\nkept" in card
    assert "| digits-mlp20-relu | fixture-untrained |" in card
    all_results = json.loads((checkpoint / "config.json").read_text())["training"]["results"]
    assert all_results["digits-conv"] == {"steps": 7}
    results = all_results["digits-mlp20-relu"]
    assert results["steps"] == 3 and results["seeds"] == 2
    (row,) = results["summary"]
    assert row["task"] == "digits-mlp20-relu" and len(row["test_accuracy"]) == 2
    assert learned_optim.load_rule(checkpoint)[0] is not None  # weights untouched and loadable
