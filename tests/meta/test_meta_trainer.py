"""MetaTrainer: reproducibility, resume after interruption, curriculum/imitation wiring, init_from, zoo output."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import learned_optim
from learned_optim.meta.config import MetaTrainConfig, load_config
from learned_optim.meta.trainer import MetaTrainer
from learned_optim.tasks.base import Task, TaskFamily


class TinyQuadTask(Task):
    """Noisy least squares mean((Wx - y)^2) with fresh noise per batch, so the batch RNG matters."""

    name = "tiny-quad"

    def __init__(self, W, y):
        self.W, self.y = W, y

    def init_params(self, generator):
        return {"x": 0.1 * torch.randn(self.W.shape[1], generator=generator), "b": torch.zeros(1)}

    def batch(self, split, generator):
        noise = 0.05 * torch.randn(self.y.shape, generator=generator)
        return {"W": self.W, "y": self.y + noise}

    def loss(self, params, batch):
        return (batch["W"] @ params["x"] + params["b"] - batch["y"]).square().mean()


class TinyQuadFamily(TaskFamily):
    name = "tiny-quad"

    def __init__(self, dim: int = 4):
        self.dim = dim

    def sample(self, generator):
        W = torch.randn(8, self.dim, generator=generator) / self.dim**0.5
        return TinyQuadTask(W, torch.randn(8, generator=generator))


def tiny_config(**changes) -> MetaTrainConfig:
    data = {
        "name": "tiny",
        "seed": 3,
        "net": {"family": "dm_lstm", "config": {"hidden_size": 4, "num_layers": 1}},
        "task": {"family": f"{__name__}:TinyQuadFamily", "kwargs": {"dim": 4}},
        "unroll": {"trajectory_length": 6, "segment_length": 3},
        "meta_epochs": 4,
        "checkpoint_every": 3,
    }
    for key, value in changes.items():
        node = data
        *heads, last = key.split("__")
        for head in heads:
            node = node.setdefault(head, {})
        node[last] = value
    return MetaTrainConfig.from_dict(data)


def weights_of(folder):
    return load_file(str(folder / "model.safetensors"))


def meta_records(out_dir):
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records if r["event"] in ("meta_step", "eval")]


def test_training_writes_a_loadable_zoo_folder_log_and_checkpoint(tmp_path):
    trainer = MetaTrainer(tiny_config(), out_dir=tmp_path / "run", progress=False, command="python -m test")
    before = {k: v.clone() for k, v in trainer.rule.state_dict().items()}
    folder = trainer.train()
    assert folder == tmp_path / "run" / "model"
    assert trainer.meta_steps == 8 and trainer.meta_epochs == 4 and trainer.finish_reason == "meta_epochs"
    assert any(not torch.equal(before[k], v) for k, v in trainer.rule.state_dict().items())
    rule, config = learned_optim.load_rule(folder)
    assert rule.family == "dm_lstm" and rule.config.hidden_size == 4
    meta = config["training"]["meta_training"]
    assert meta["command"] == "python -m test" and meta["wall_time_seconds"] >= 0
    assert meta["config"]["task"]["family"].endswith(":TinyQuadFamily")
    assert meta["metrics"]["meta_steps"] == 8
    card = (folder / "README.md").read_text()
    assert "python -m test" in card and "Wall time" in card and "Final meta-training metrics" in card
    records = meta_records(tmp_path / "run")
    assert [r["meta_step"] for r in records] == list(range(1, 9))
    assert {"meta_loss", "grad_norm", "objective", "loss_last", "trajectory_step"} <= set(records[0])
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoint").iterdir()) == [
        "state-000000008.json",
        "state-000000008.safetensors",
    ]
    # the run folder is not the checkpoint, and says where that is
    with pytest.raises(learned_optim.CheckpointError, match=r"meta-training run's folder; its net is .*run/model"):
        learned_optim.load_rule(tmp_path / "run")
    # a finished run is never silently overwritten, and resuming it writes nothing
    with pytest.raises(FileExistsError, match="resume"):
        MetaTrainer(tiny_config(), out_dir=tmp_path / "run", progress=False).train()
    written = {p: p.read_bytes() for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()}
    with pytest.warns(UserWarning, match=r"finished \(meta_epochs\) after 8 meta-steps.*Nothing was trained"):
        again = MetaTrainer(tiny_config(), out_dir=tmp_path / "run", progress=False).train(resume=True)
    assert again == folder
    assert {p: p.read_bytes() for p in sorted((tmp_path / "run").rglob("*")) if p.is_file()} == written
    # the result drives the runtime optimizer
    x = torch.nn.Parameter(torch.ones(3))
    opt = learned_optim.from_pretrained(folder, [x])
    x.square().sum().backward()
    opt.step()
    assert not torch.equal(x.detach(), torch.ones(3))


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    a = MetaTrainer(tiny_config(meta_epochs=2), out_dir=tmp_path / "a", progress=False).train()
    b = MetaTrainer(tiny_config(meta_epochs=2), out_dir=tmp_path / "b", progress=False).train()
    c = MetaTrainer(tiny_config(meta_epochs=2, seed=4), out_dir=tmp_path / "c", progress=False).train()
    wa, wb, wc = weights_of(a), weights_of(b), weights_of(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


@pytest.mark.parametrize("stop_after", [4, 8])
def test_resume_after_interruption_reproduces_the_uninterrupted_run(tmp_path, stop_after):
    # curriculum + imitation on, so their states, the best-net snapshot and both meta-optimizers
    # go through the checkpoint too
    changes = dict(
        curriculum__enabled=True,
        curriculum__stages=[3, 6],
        curriculum__eval_every=1,
        curriculum__eval_runs=2,
        curriculum__min_evals=3,
        imitation__enabled=True,
        imitation__probabilities=[0.5],
        meta_epochs=6,
    )
    full = MetaTrainer(tiny_config(**changes), out_dir=tmp_path / "full", progress=False)
    full_folder = full.train()
    assert full.meta_steps > 8

    first = MetaTrainer(tiny_config(**changes), out_dir=tmp_path / "cut", progress=False)
    assert first.train(stop_after=stop_after) is None  # "killed" after stop_after meta-steps
    assert first.meta_steps == stop_after
    second = MetaTrainer(tiny_config(**changes), out_dir=tmp_path / "cut", progress=False)
    assert second.load_checkpoint()
    assert second.meta_steps == stop_after // 3 * 3  # lost at most one checkpoint interval
    third = MetaTrainer(tiny_config(**changes), out_dir=tmp_path / "cut", progress=False, command="resumed")
    cut_folder = third.train(resume=True)

    assert third.meta_steps == full.meta_steps and third.finish_reason == full.finish_reason
    wf, wc = weights_of(full_folder), weights_of(cut_folder)
    assert all(torch.equal(wf[k], wc[k]) for k in wf)
    assert meta_records(tmp_path / "full") == meta_records(tmp_path / "cut")
    modes = {r.get("mode") for r in meta_records(tmp_path / "full") if r["event"] == "meta_step"}
    assert modes == {"unroll", "imitation"}
    assert any(r["event"] == "eval" for r in meta_records(tmp_path / "full"))
    meta = json.loads((cut_folder / "config.json").read_text())["training"]["meta_training"]
    assert meta["resumed_with"] == ["resumed"]


def test_a_run_without_checkpoints_is_never_overwritten_silently(tmp_path):
    """A finished run whose checkpoints are gone is refused, with or without resume (training again would overwrite
    its net); the log of a run stopped before its first checkpoint is kept when training starts again, and a resume
    that finds no checkpoint says so."""
    finished = tmp_path / "finished"
    folder = MetaTrainer(tiny_config(meta_epochs=1), out_dir=finished, progress=False).train()
    shutil.rmtree(finished / "checkpoint")
    weights, log = (folder / "model.safetensors").read_bytes(), (finished / "log.jsonl").read_text()
    for resume in (False, True):
        with pytest.raises(FileExistsError, match="finished run's net"):
            MetaTrainer(tiny_config(meta_epochs=1), out_dir=finished, progress=False).train(resume=resume)
    assert (folder / "model.safetensors").read_bytes() == weights and (finished / "log.jsonl").read_text() == log

    stopped = tmp_path / "stopped"
    MetaTrainer(tiny_config(), out_dir=stopped, progress=False).train(stop_after=2)  # before the first checkpoint
    assert not list((stopped / "checkpoint").glob("state-*.json"))
    first_log = (stopped / "log.jsonl").read_text()
    with pytest.warns(UserWarning, match="no complete checkpoint.*earlier log is kept"):
        MetaTrainer(tiny_config(), out_dir=stopped, progress=False).train(resume=True)
    (kept,) = stopped.glob("log-before-*.jsonl")
    assert kept.read_text() == first_log and (stopped / "model" / "config.json").exists()


def test_a_corrupt_trainer_checkpoint_is_a_clear_error(tmp_path):
    """A truncated checkpoint (its tensors or its JSON) stops a resume with a ValueError naming the file."""
    MetaTrainer(tiny_config(), out_dir=tmp_path, progress=False).train(stop_after=3)
    (state,) = (tmp_path / "checkpoint").glob("state-*.json")
    tensors = state.with_suffix(".safetensors")
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{tensors.name}: the trainer checkpoint's tensors are not readable"):
        MetaTrainer(tiny_config(), out_dir=tmp_path, progress=False).train(resume=True)
    state.write_text(state.read_text()[:50])
    with pytest.raises(ValueError, match=f"{state.name}: the trainer checkpoint is not valid JSON"):
        MetaTrainer(tiny_config(), out_dir=tmp_path, progress=False).train(resume=True)


def test_resume_refuses_a_changed_config(tmp_path):
    MetaTrainer(tiny_config(), out_dir=tmp_path, progress=False).train(stop_after=3)
    with pytest.raises(ValueError, match="segment_length"):
        MetaTrainer(tiny_config(unroll__segment_length=2), out_dir=tmp_path, progress=False).train(resume=True)


def test_resume_refuses_another_number_of_processes(tmp_path):
    """Each rank's task stream follows from the world size: a run checkpointed on 2 processes resumed on 1 (or the
    other way round) would continue another run, so it is refused (ranks simulated with rank=, world_size=)."""
    MetaTrainer(tiny_config(), out_dir=tmp_path / "two", progress=False, rank=0, world_size=2).train(stop_after=3)
    with pytest.raises(ValueError, match="checkpointed on 2 process.*this launch has 1.*--nproc-per-node 2"):
        MetaTrainer(tiny_config(), out_dir=tmp_path / "two", progress=False).train(resume=True)
    MetaTrainer(tiny_config(), out_dir=tmp_path / "one", progress=False).train(stop_after=3)
    with pytest.raises(ValueError, match="checkpointed on 1 process and this launch has 2"):
        MetaTrainer(tiny_config(), out_dir=tmp_path / "one", progress=False, rank=0, world_size=2).train(resume=True)
    MetaTrainer(tiny_config(), out_dir=tmp_path / "one", progress=False).train(resume=True)  # the same count resumes


def test_curriculum_run_finishes_cleanly_with_the_best_net(tmp_path):
    config = tiny_config(
        curriculum__enabled=True,
        curriculum__stages=[3, 6],
        curriculum__eval_every=1,
        curriculum__eval_runs=1,
        curriculum__min_evals=1,
        meta_epochs=50,
    )
    trainer = MetaTrainer(config, out_dir=tmp_path, progress=False)
    trainer.train()
    assert trainer.finish_reason in ("curriculum_completed", "curriculum_no_improvement")
    assert trainer.meta_epochs < 50
    evals = [r for r in meta_records(tmp_path) if r["event"] == "eval"]
    assert evals[0]["eval_length"] == 6 and evals[-1]["action"] == "finish"
    best = trainer.curriculum.best_score
    assert trainer.evaluate(evals[-1]["eval_length"], 1) == pytest.approx(best)  # the best net is shipped


def test_init_from_fine_tunes_a_folder_keeping_its_architecture(tmp_path):
    parent = MetaTrainer(tiny_config(name="parent", meta_epochs=1), out_dir=tmp_path / "parent", progress=False).train()
    child_config = tiny_config(name="child", meta_epochs=1, init_from=str(parent), net__family=None, net__config={})
    child = MetaTrainer(child_config, out_dir=tmp_path / "child", progress=False)
    parent_weights = weights_of(parent)
    assert all(torch.equal(parent_weights[k], v) for k, v in child.rule.state_dict().items())
    folder = child.train()
    config = json.loads((folder / "config.json").read_text())
    assert config["net"] == {**learned_optim.load_rule(parent)[0].config.to_dict()}
    assert config["training"]["parent"]["init_from"] == str(parent)
    assert config["training"]["parent"]["name"] == "parent"
    assert "Fine-tuned from" in (folder / "README.md").read_text()
    with pytest.raises(ValueError, match="architecture"):
        MetaTrainer(tiny_config(init_from=str(parent), net__family="rnnprop"), out_dir=tmp_path / "x", progress=False)


def test_init_from_may_change_settings_the_parents_weights_do_not_depend_on(tmp_path):
    """A fine-tune at another second-moment decay: the parent's weights, the new setting in the net and in the
    parent record; a setting that changes a weight's shape is refused."""
    adafac = {"net__family": "adafac_mlp", "net__config": {"hidden_size": 4}}
    parent = MetaTrainer(tiny_config(name="parent", meta_epochs=1, **adafac), out_dir=tmp_path / "p", progress=False)
    folder = parent.train()
    child_config = tiny_config(
        name="child", meta_epochs=1, init_from=str(folder), net__family=None, net__config={"second_moment_decay": 0.95}
    )
    child = MetaTrainer(child_config, out_dir=tmp_path / "child", progress=False)
    assert child.rule.config.second_moment_decay == 0.95 and child.rule.config.hidden_size == 4
    assert all(torch.equal(weights_of(folder)[k], v) for k, v in child.rule.state_dict().items())
    config = json.loads((child.train() / "config.json").read_text())
    assert config["net"]["second_moment_decay"] == 0.95
    assert config["training"]["parent"]["net_overrides"] == {"second_moment_decay": 0.95}
    same = tiny_config(init_from=str(folder), net__family=None, net__config={"hidden_size": 4})
    assert "net_overrides" not in MetaTrainer(same, out_dir=tmp_path / "same", progress=False).parent
    for bad, message in (({"hidden_size": 8}, "change the net's weights"), ({"hidden_sise": 4}, "has no field")):
        with pytest.raises(ValueError, match=message):
            MetaTrainer(
                tiny_config(init_from=str(folder), net__family=None, net__config=bad),
                out_dir=tmp_path / "x",
                progress=False,
            )


def test_meta_optimizer_defaults_follow_the_net_family(tmp_path):
    lstm = MetaTrainer(tiny_config(), out_dir=tmp_path / "a", progress=False)
    assert isinstance(lstm.meta_optimizer, torch.optim.Adam) and lstm.meta_lr == 1e-3
    mlp = MetaTrainer(
        tiny_config(net__family="mlp", net__config={"hidden_size": 4}), out_dir=tmp_path / "b", progress=False
    )
    assert isinstance(mlp.meta_optimizer, torch.optim.RMSprop) and mlp.meta_lr == 1e-2
    clipped = MetaTrainer(
        tiny_config(meta_optimizer__grad_clip=1e-9, meta_optimizer__name="sgd", meta_optimizer__lr=0.1),
        out_dir=tmp_path / "c",
        progress=False,
    )
    before = {k: v.clone() for k, v in clipped.rule.state_dict().items()}
    metrics = clipped.step()
    change = max(float((v - before[k]).abs().max()) for k, v in clipped.rule.state_dict().items())
    assert metrics["grad_norm"] > 1e-9 and change <= 0.1 * 1e-9 * 1.01


def test_train_by_validation_and_log_objective_config(tmp_path):
    trainer = MetaTrainer(
        tiny_config(objective__kind="log", objective__split="val", meta_epochs=1), out_dir=tmp_path, progress=False
    )
    metrics = trainer.step()
    assert metrics["objective"] < 1.0 and metrics["meta_split_loss_last"] > 0


def test_config_files_and_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(tiny_config().to_dict()))
    config = load_config(path, ["unroll.segment_length=2", "meta_optimizer.grad_clip=1.5", "curriculum.stages=[4, 8]"])
    assert config.unroll.segment_length == 2 and config.meta_optimizer.grad_clip == 1.5
    assert config.curriculum.stages == [4, 8]
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("name: y\nnet: {family: rnnprop}\nunroll: {segment_length: 5}\n")
    assert load_config(yaml_path).unroll.segment_length == 5
    with pytest.raises(ValueError, match="segmnt_length"):
        load_config(path, ["unroll.segmnt_length=2"])
    with pytest.raises(ValueError, match="kind"):
        load_config(path, ["objective.kind=median"])
    with pytest.raises(ValueError, match="meta_epochs must be int"):
        load_config(path, ["meta_epochs=many"])
    # YAML 1.2's floats (PyYAML's 1.1 reads 1e-4 as a string), in overrides and in files
    assert load_config(path, ["meta_optimizer.lr=1e-4"]).meta_optimizer.lr == 1e-4
    yaml_path.write_text("name: y\nnet: {family: rnnprop}\nmeta_optimizer: {lr: 3e-4}\n")
    assert load_config(yaml_path).meta_optimizer.lr == 3e-4
    assert load_config(path, ["name=1e3x"]).name == "1e3x"
    # a whole section replaced by a scalar, malformed YAML: clear errors before any run
    for override in ("unroll=5", "curriculum=true"):
        with pytest.raises(ValueError, match=f"config.{override.split('=')[0]} is a section of fields"):
            load_config(path, [override])
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(path, ["curriculum.stages=[4, 8"])
    yaml_path.write_text("name: y\nnet: {family: rnnprop\n")
    with pytest.raises(ValueError, match="c.yaml is not valid YAML"):
        load_config(yaml_path)


def test_eval_kwargs_build_the_evaluation_family(tmp_path):
    trainer = MetaTrainer(tiny_config(task__eval_kwargs={"dim": 6}), out_dir=tmp_path, progress=False)
    assert trainer.family.dim == 4 and trainer.eval_family.dim == 6
    assert trainer.evaluate(3, 2) > 0


def test_float64_run(tmp_path):
    trainer = MetaTrainer(tiny_config(dtype="float64", meta_epochs=1), out_dir=tmp_path, progress=False)
    assert trainer.rule.compute_dtype == torch.float64
    metrics = trainer.step()
    assert trainer.trajectory.params["x"].dtype == torch.float64 and metrics["grad_norm"] > 0


def test_checkpointed_random_state_includes_each_cuda_device(monkeypatch):
    """A CUDA run draws from the devices' generators too (global randn on the device): they are saved once CUDA is
    initialised and restored on resume, per device index (mocked here: the logic, not a GPU)."""
    from learned_optim.meta.checkpoint import rng_from_tensors, rng_to_tensors

    states = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5], dtype=torch.uint8)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # resumed on a machine with one device
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.__setitem__(device, state))
    tensors, meta = rng_to_tensors({})
    assert torch.equal(tensors["rng.cuda.0"], states[0]) and torch.equal(tensors["rng.cuda.1"], states[1])
    rng_from_tensors(tensors, meta, {})
    assert list(restored) == [0] and torch.equal(restored[0], states[0])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("meta_optimizer.lr=.inf", "meta_optimizer.lr must be positive and finite"),
        ("unroll.lr=.inf", "unroll.lr must be positive and finite"),
        ("unroll.lr_range=[1.0,.inf]", "lr_range must be"),
        ("estimator.sigma=.inf", "sigma positive and finite"),
        ("maml.inner_lr=.inf", "inner_lr must be positive and finite"),
        ("unroll.diverged_loss_factor=.inf", "diverged_loss_factor must be finite"),
        ("unroll.weight_decay=-0.1", "weight_decay and weight_decays must be finite and >= 0"),
        ("unroll.weight_decays=[0.1,.inf]", "weight_decay and weight_decays must be finite and >= 0"),
        ("unroll.weight_decays=[]", "a non-empty list"),
        ("regularizers=[{kind: sam, weight: 1, rho: .inf}]", "rho must be positive and finite"),
        ("regularizers=[{kind: gsam, weight: 1, alpha: .inf}]", "finite alpha"),
        ("regularizers=[{kind: local_entropy, weight: 1, lr: -0.1}]", "finite lr > 0"),
        ("imitation.teacher_betas=[0.9]", "teacher_betas must be two values"),
        ("imitation.teacher_lr=-1", "teacher_lr, teacher_eps and lr must be positive"),
    ],
)
def test_config_values_out_of_range_or_infinite_are_refused_at_load(override, message):
    from learned_optim.meta.config import resolve_config_path

    with pytest.raises(ValueError, match=message):
        load_config(resolve_config_path("smoke"), [override])


def test_an_inner_lr_times_weight_decay_of_one_or_more_is_refused():
    """theta (1 - lr wd) flips sign or vanishes at lr wd >= 1: refused at load for the top of the lr range."""
    from learned_optim.meta.config import resolve_config_path

    smoke = resolve_config_path("smoke")
    fine = load_config(smoke, ["unroll.lr_range=[0.001,0.1]", "unroll.weight_decays=[0.0,9.0]"])
    assert fine.unroll.weight_decays == [0.0, 9.0]
    with pytest.raises(ValueError, match="lr 0.1 x weight decay 10 must be < 1"):
        load_config(smoke, ["unroll.lr_range=[0.001,0.1]", "unroll.weight_decays=[0.0,10.0]"])
    with pytest.raises(ValueError, match="lr 0.5 x weight decay 2 must be < 1"):
        load_config(smoke, ["unroll.lr=0.5", "unroll.weight_decay=2.0"])
    # weight_decay still steps the curriculum's evaluation runs when a list is given: checked too
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        load_config(smoke, ["unroll.weight_decays=[0.1]", "unroll.weight_decay=-1.0"])
    with pytest.raises(ValueError, match="lr 0.1 x weight decay 20 must be < 1"):
        load_config(smoke, ["unroll.lr_range=[0.001,0.1]", "unroll.weight_decays=[0.1]", "unroll.weight_decay=20.0"])


def test_a_meta_step_that_makes_the_weights_non_finite_stops_the_run(tmp_path):
    """Training does not go on (and ship) a net whose weights became NaN: the step raises, the checkpoints stay."""
    trainer = MetaTrainer(tiny_config(meta_epochs=4, checkpoint_every=1), out_dir=tmp_path / "run", progress=False)
    trainer.train(stop_after=2)
    trainer.save_checkpoint()
    resumed = MetaTrainer(tiny_config(meta_epochs=4, checkpoint_every=1), out_dir=tmp_path / "run", progress=False)
    step = resumed.meta_optimizer.step

    def poisoned_step(*args, **kwargs):
        step(*args, **kwargs)
        with torch.no_grad():
            next(resumed.rule.parameters()).view(-1)[0] = float("nan")

    resumed.meta_optimizer.step = poisoned_step
    with pytest.raises(RuntimeError, match="made the net's weights non-finite.*resume from the last checkpoint"):
        resumed.train(resume=True)
    assert not (tmp_path / "run" / "model").exists()
    again = MetaTrainer(tiny_config(meta_epochs=4, checkpoint_every=1), out_dir=tmp_path / "run", progress=False)
    assert again.load_checkpoint() and all(bool(torch.isfinite(p).all()) for p in again.rule.parameters())
