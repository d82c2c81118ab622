"""``python -m learned_optim demo`` end-to-end on a tiny setting, and its error when the zoo is empty.

The checkpoints here are TEST FIXTURES: freshly initialised (untrained) nets saved to temporary folders.
They exercise the plumbing only; nothing here is, or is shipped as, a pretrained optimizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import learned_optim
from learned_optim import AdafacMLP, save_pretrained
from learned_optim.__main__ import main

TINY = ["--task", "diabetes-mlp", "--steps", "6", "--seeds", "2", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")  # the CLIs under test call torch.set_num_threads


def _fixture_checkpoint(folder: Path) -> Path:
    """TEST FIXTURE: an untrained adafac_mlp checkpoint (no 'training' record, so the demo flags it)."""
    torch.manual_seed(0)
    return save_pretrained(AdafacMLP(), folder, name="fixture-untrained", description="test fixture, untrained")


@pytest.fixture
def empty_zoo(tmp_path, monkeypatch):
    root = tmp_path / "empty-zoo"
    root.mkdir()
    monkeypatch.setattr(learned_optim.hub, "zoo_dir", lambda: root)
    return root


def test_demo_end_to_end_with_a_temporary_checkpoint(tmp_path, capsys, empty_zoo):
    checkpoint = _fixture_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "demo-out"
    assert main(["demo", "--optimizer", str(checkpoint), "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "records no meta-training" in printed  # an untrained net is never presented as pretrained
    assert "[tune] adamw on diabetes-mlp: {lr 0.0003, cosine: " in printed
    for label in ("adamw", "fixture-untrained [default]", "fixture-untrained [adamw]"):
        assert f"| diabetes-mlp | {label} | " in printed
    assert "| adam |" not in printed and "sgd-momentum" not in printed  # the demo compares with AdamW only
    for column in ("Val / AdamW", "Speed-up", "vs AdamW", "ms / step"):
        assert column in printed
    png = out / "curves_diabetes-mlp.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and str(png) in printed
    results = json.loads((out / "results.json").read_text())
    assert [row["contender"] for row in results["summary"]] == [
        "adamw",
        "fixture-untrained [default]",
        "fixture-untrained [adamw]",
    ]
    assert results["config"]["tasks"]["diabetes-mlp"]["steps"] == 6 and results["config"]["seeds"] == [0, 1]
    assert results["config"]["command"].startswith("python -m learned_optim demo --optimizer ")
    # a rerun reuses every stored run
    assert main(["demo", "--optimizer", str(checkpoint), "--out", str(out), *TINY]) == 0
    assert "runs trained 0, reused " in capsys.readouterr().out


def test_demo_defaults_to_the_first_zoo_entry_without_the_demo_optimizer(tmp_path, monkeypatch, capsys):
    zoo = tmp_path / "zoo"
    meta_trained = {"meta_training": {"command": "test fixture, untrained"}}
    for name in ("zz-second", "aa-first"):  # TEST FIXTURES in a temporary zoo
        save_pretrained(AdafacMLP(), zoo / name, name=name, training=meta_trained)
    monkeypatch.setattr(learned_optim.hub, "zoo_dir", lambda: zoo)
    args = ["demo", "--out", str(tmp_path / "out"), *TINY, "--steps", "2", "--seeds", "1", "--no-plots"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("Learned optimizer: aa-first (adafac_mlp, ")
    assert "records no meta-training" not in printed
    assert (tmp_path / "out" / "results.json").is_file() and not list((tmp_path / "out").glob("*.png"))


def test_demo_with_an_empty_zoo_explains_how_to_pass_a_checkpoint(tmp_path, capsys, empty_zoo):
    assert main(["demo", "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no pretrained optimizer is bundled" in captured.err and str(empty_zoo) in captured.err
    assert "python -m learned_optim demo --optimizer DIR" in captured.err
    assert not (tmp_path / "out").exists()


def test_demo_rejects_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["demo", "--optimizer", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "is not a learned_optim checkpoint folder" in capsys.readouterr().err


def test_top_level_cli_dispatches(capsys):
    assert main(["--help"]) == 0 and "demo" in capsys.readouterr().out
    assert main([]) == 2 and main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--help"])
    assert exit_info.value.code == 0 and "--tasks" in capsys.readouterr().out


def test_default_optimizer_prefers_the_flagship(monkeypatch):
    from learned_optim import __main__ as cli

    monkeypatch.setattr(cli.hub, "list_pretrained", lambda: [{"name": "aaa"}, {"name": cli.hub.FLAGSHIP}])
    assert cli.default_optimizer() == cli.hub.FLAGSHIP
    monkeypatch.setattr(cli.hub, "list_pretrained", lambda: [{"name": "aaa"}, {"name": "bbb"}])
    assert cli.default_optimizer() == "aaa"


def test_a_missing_optional_dependency_is_one_line_not_a_traceback(monkeypatch, capsys):
    import learned_optim.__main__ as cli

    def needs_sklearn(argv):
        raise ImportError("the embedded 'digits' data set needs scikit-learn")

    monkeypatch.setattr(cli, "demo_main", needs_sklearn)
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "needs scikit-learn" in err and "Traceback" not in err


def test_an_interrupted_command_says_what_was_kept_without_a_traceback(monkeypatch, capsys):
    """Ctrl-C in a long bench: one line saying that the finished runs are stored and reused, status 130."""
    import learned_optim.bench.cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(learned_optim.bench.cli, "main", interrupted)
    assert main(["bench", "--quick"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; the runs that finished are stored under --out" in err and "Traceback" not in err
