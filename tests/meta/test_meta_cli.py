"""``python -m learned_optim.meta train``: smoke runs, a real kill + --resume, bundled configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import learned_optim
from learned_optim.meta.cli import CONFIG_DIR, main
from learned_optim.meta.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_smoke_config_produces_a_loadable_zoo_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "smoke", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    assert "optimizer written to" in capsys.readouterr().out
    rule, config = learned_optim.load_rule(out / "model")
    assert config["name"] == "smoke" and rule.family == "dm_lstm"
    command = config["training"]["meta_training"]["command"]
    assert command == f"python -m learned_optim.meta train smoke --out {out} --no-progress --device cpu"
    assert command in (out / "model" / "README.md").read_text()
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert events[0] == "start" and events[-1] == "finish" and "eval" in events
    model = torch.nn.Linear(3, 1)
    opt = learned_optim.from_pretrained(out / "model", model.parameters())
    model(torch.ones(2, 3)).sum().backward()
    opt.step()


def test_recommended_schedule_reaches_the_zoo_folder(tmp_path, capsys):
    """The config's ``schedule`` is written as config.json's top-level "schedule" (what ``bench --lr-rule default``
    follows); none is recorded when it is unset; an unknown one is refused before training."""
    out = tmp_path / "run"
    args = ["train", "smoke", "--out", str(out), "--no-progress", "--set", "meta_epochs=1"]
    assert main([*args, "--set", "curriculum.enabled=false", "--set", "schedule=cosine"]) == 0
    assert learned_optim.load_rule(out / "model")[1]["schedule"] == "cosine"
    assert main([*args, "--out", str(tmp_path / "plain"), "--set", "curriculum.enabled=false"]) == 0
    assert "schedule" not in learned_optim.load_rule(tmp_path / "plain" / "model")[1]
    assert main([*args, "--out", str(tmp_path / "bad"), "--set", "schedule=linear"]) == 2
    assert "schedule must be one of constant, cosine" in capsys.readouterr().err
    with pytest.raises(ValueError, match="schedule must be one of"):
        learned_optim.save_pretrained(learned_optim.load_rule(out / "model")[0], tmp_path / "x", schedule="step")


def test_cli_reports_config_errors(tmp_path, capsys):
    assert main(["train", "smoke", "--out", str(tmp_path), "--set", "unroll.segmnt_length=3"]) == 2
    assert "segmnt_length" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train"])


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    overrides = ["--set", "meta_epochs=60", "--set", "curriculum.enabled=false", "--set", "checkpoint_every=7"]
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "learned_optim.meta", "train", "smoke", "--out", str(out), "--no-progress", *overrides],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not list((out / "checkpoint").glob("state-*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "model").exists()
    assert main(["train", "smoke", "--out", str(out), "--no-progress", "--resume", *overrides]) == 0

    reference = tmp_path / "reference"
    assert main(["train", "smoke", "--out", str(reference), "--no-progress", *overrides]) == 0
    a, b = (
        load_file(str(out / "model" / "model.safetensors")),
        load_file(str(reference / "model" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    meta_steps = [r["meta_step"] for r in steps if r["event"] == "meta_step"]
    assert meta_steps == list(range(1, 121))  # the log was rewound to the checkpoint: no duplicates


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_bundled_configs_are_valid(path):
    config = load_config(path)
    assert config.expected_time and config.description
    from learned_optim.tasks import TASK_FAMILIES

    assert config.task.family in TASK_FAMILIES
    if path.stem != "smoke":
        assert config.unroll.segment_length == 20 and config.num_threads == 1
    if config.init_from is not None:  # a fine-tuning recipe: its parent (a zoo entry) gives the architecture
        rule, _ = learned_optim.load_rule(config.init_from)
    else:
        rule = learned_optim.build_rule(config.net.family, config.net.config)
    name, lr = config.meta_optimizer.resolved(rule.family)
    default_name, default_lr = {
        "dm_lstm": ("adam", 1e-3),
        "rnnprop": ("adam", 1e-3),
        "mlp": ("rmsprop", 1e-2),
        "adafac_mlp": ("adam", 1e-3),
    }[rule.family]
    assert name == default_name and lr == (default_lr if config.meta_optimizer.lr is None else config.meta_optimizer.lr)


def test_config_base_is_merged_section_by_section(tmp_path):
    """``base:`` reads the parent config and merges the file over it: sections key by key, lists replaced."""
    (tmp_path / "parent.yaml").write_text((CONFIG_DIR / "smoke.yaml").read_text())
    parent = load_config(tmp_path / "parent.yaml")
    (tmp_path / "child.yaml").write_text(
        "base: parent.yaml\nname: child\nunroll: {segment_length: 5}\n"
        "regularizers: [{kind: sam, weight: 2, where: segment_end, rho: 0.05}]\n"
    )
    child = load_config(tmp_path / "child.yaml", ["seed=7"])
    assert child.name == "child" and child.seed == 7
    assert child.unroll.segment_length == 5
    assert child.unroll.trajectory_length == parent.unroll.trajectory_length  # the rest of the section kept
    assert child.task == parent.task and child.net == parent.net
    assert child.regularizers == [{"kind": "sam", "weight": 2, "where": "segment_end", "rho": 0.05}]


def test_config_base_by_bundled_name_and_errors(tmp_path):
    variant = load_config(CONFIG_DIR / "adafac-mlp-adam-magnitude-tbv-nomup-sam.yaml")
    control = load_config(CONFIG_DIR / "adafac-mlp-adam-magnitude-tbv-nomup-control.yaml")
    assert variant.regularizers and not control.regularizers
    assert variant.to_dict() | {"name": None, "description": None, "regularizers": None} == control.to_dict() | {
        "name": None,
        "description": None,
        "regularizers": None,
    }
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="loops"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: [smoke]\n")
    with pytest.raises(ValueError, match="'base' must be"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: no-such-config\n")
    with pytest.raises(FileNotFoundError, match="no-such-config"):
        load_config(tmp_path / "d.yaml")


def test_an_interrupted_meta_training_says_how_to_resume(tmp_path, capsys, monkeypatch):
    """Ctrl-C: one line naming --resume and the run folder, status 130, no traceback."""
    from learned_optim.meta import trainer

    def interrupted(self, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.MetaTrainer, "train", interrupted)
    out = tmp_path / "run"
    assert main(["train", "smoke", "--out", str(out), "--no-progress", "--device", "cpu"]) == 130
    assert f"--resume goes on from the last checkpoint in {out}" in capsys.readouterr().err
