"""Truncated BPTT over several task instances per meta-step (``estimator.instances`` with kind ``tbptt``)."""

from __future__ import annotations

import pytest
import torch
from test_meta_trainer import meta_records, tiny_config, weights_of

from learned_optim.meta import instances as instances_module
from learned_optim.meta.instances import TaskInstances
from learned_optim.meta.trainer import MetaTrainer
from learned_optim.meta.unroll import unroll, unroll_particles
from learned_optim.objectives import meta_objective


def tbptt_config(instances: int = 2, batched: bool = False, **changes):
    base = {
        "net": {"family": "adafac_mlp", "config": {"hidden_size": 4}},
        "estimator": {"kind": "tbptt", "instances": instances, "batch_particles": batched},
        "unroll": {"trajectory_length": 6, "segment_length": 3, "lr": 0.01, "weight_decays": [0.0, 0.1]},
        "objective": {"split": "val"},
    }
    return tiny_config(**{**base, **changes})


SAM = [{"kind": "sam", "weight": 1.0, "where": "all", "rho": 0.05}]
HESSIAN = [{"kind": "hessian_trace", "weight": 0.1, "where": "segment_end", "probes": 2}]


def first_segment(config, tmp_path):
    """The trainer's first segment: its results per instance, objective and meta-gradient (nothing updated)."""
    trainer = MetaTrainer(config, out_dir=tmp_path, progress=False)
    trainer._begin_trajectory()
    weights = trainer._weights()
    _, objective, _ = trainer.segment_objective(weights, 3)
    gradient = torch.autograd.grad(objective, list(weights.values()))
    return trainer, objective.detach(), torch.cat([g.reshape(-1) for g in gradient])


def test_the_objective_is_the_mean_of_the_instances_own_objectives(tmp_path):
    """Instance 0 is the trainer's own trajectory and batch stream, bit for bit the one-instance run's; the other
    starts from its own theta_0 and draws its own batches; the objective is the mean of theirs, and so is its
    meta-gradient (each instance's unrolled on its own)."""
    one, objective_one, gradient_one = first_segment(tbptt_config(instances=1), tmp_path / "one")
    assert one.instances is None
    two, objective_two, gradient_two = first_segment(tbptt_config(), tmp_path / "two")
    assert two.instances is not None and len(two.instances.others) == 1
    other = two.instances.others[0]
    assert other.step == 3 and not torch.equal(other.params["x"], two.trajectory.params["x"])
    # the other instance alone: its objective and gradient, from its own start and stream
    trainer = MetaTrainer(tbptt_config(), out_dir=tmp_path / "alone", progress=False)
    trainer._begin_trajectory()
    assert trainer.instances is not None
    start, stream = trainer.instances.others[0], trainer.instances.generators[0]
    assert not torch.equal(start.params["x"], trainer.trajectory.params["x"])
    weights = trainer._weights()
    result = unroll(
        trainer.rule, weights, trainer.task, start, 3, generator=stream, config=trainer.config.unroll, meta_split="val"
    )
    objective_other = meta_objective("sum", result.losses, initial_loss=result.end.initial_loss, last_step=3)
    gradient_other = torch.cat([g.reshape(-1) for g in torch.autograd.grad(objective_other, list(weights.values()))])
    torch.testing.assert_close(objective_two, (objective_one + objective_other.detach()) / 2, rtol=1e-6, atol=0)
    torch.testing.assert_close(gradient_two, (gradient_one + gradient_other) / 2, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(gradient_other, gradient_one, rtol=0.1)  # the instances really differ


SMOOTHING = [{"kind": "smoothing", "weight": 0.1, "where": "segment_end", "space": "gradient", "steps": 2}]


@pytest.mark.parametrize("regularizers", [[], SAM + SMOOTHING], ids=["plain", "regularized"])
def test_instances_unrolled_together_give_the_loop_objective_and_meta_gradient(tmp_path, monkeypatch, regularizers):
    """``batch_particles`` with truncated BPTT: the instances in one vmapped call per step (graph kept), the same
    objective, hook terms and meta-gradient as one after the other to float rounding; with regularizers (SAM at every
    point; smoothing, which reads the step's inputs and draws its start at random, at the segment's end, where the
    two orders draw alike) each instance's terms on its own points after each batched step."""
    calls = []

    def counting(*args, **kwargs):
        calls.append((len(args[3]), kwargs["shared_weights"], kwargs["track_graph"], kwargs["hook"] is not None))
        return unroll_particles(*args, **kwargs)

    def segment(config, folder):
        trainer = MetaTrainer(config, out_dir=folder, progress=False)
        trainer._begin_trajectory()
        weights = trainer._weights()
        _, objective, extra = trainer.segment_objective(weights, 3)
        gradient = torch.autograd.grad(objective + extra, list(weights.values()))
        return objective.detach(), extra.detach(), torch.cat([g.reshape(-1) for g in gradient])

    monkeypatch.setattr(instances_module, "unroll_particles", counting)
    objective_loop, extra_loop, gradient_loop = segment(
        tbptt_config(instances=3, regularizers=regularizers), tmp_path / "loop"
    )
    assert not calls
    objective_batched, extra_batched, gradient_batched = segment(
        tbptt_config(instances=3, batched=True, regularizers=regularizers), tmp_path / "vmap"
    )
    assert calls == [(3, True, True, bool(regularizers))]
    assert (float(extra_loop) != 0.0) == bool(regularizers)
    torch.testing.assert_close(objective_batched, objective_loop, rtol=1e-5, atol=0)
    torch.testing.assert_close(extra_batched, extra_loop, rtol=1e-4, atol=0)
    torch.testing.assert_close(gradient_batched, gradient_loop, rtol=1e-4, atol=1e-7)


def test_particles_take_a_hook_only_on_shared_weights_with_a_graph(tmp_path):
    trainer = MetaTrainer(tbptt_config(), out_dir=tmp_path, progress=False)
    trainer._begin_trajectory()
    starts = [trainer.trajectory, *trainer.instances.others]
    for shared, graph in ((False, True), (True, False)):
        weights = trainer._weights() if shared else {k: torch.stack([v, v]) for k, v in trainer._weights().items()}
        with pytest.raises(ValueError, match="a meta-loss hook needs track_graph and shared_weights"):
            unroll_particles(
                trainer.rule, weights, trainer.task, starts, 1, generator=trainer.data_generator,
                shared_weights=shared, track_graph=graph, hook=lambda *args, **kwargs: None,
            )  # fmt: skip


def test_regularizers_add_each_instances_own_terms(tmp_path):
    """With the config's regularizers the meta-loss is the mean over instances of objective plus terms, each
    instance's terms taken on its own points: against each instance unrolled alone with the trainer's hook (SAM at
    every point); the terms really differ between instances and enter the meta-gradient."""
    trainer = MetaTrainer(tbptt_config(regularizers=SAM), out_dir=tmp_path / "two", progress=False)
    trainer._begin_trajectory()
    assert trainer.instances is not None and trainer.hook is not None
    starts = [trainer.trajectory, *trainer.instances.others]
    streams = [
        torch.Generator().set_state(g.get_state()) for g in (trainer.data_generator, *trainer.instances.generators)
    ]
    weights = trainer._weights()
    _, objective, extra = trainer.segment_objective(weights, 3)
    alone = [
        unroll(
            trainer.rule,
            weights,
            trainer.task,
            start,
            3,
            generator=stream,
            config=trainer.config.unroll,
            meta_split="val",
            hook=trainer.hook,
        )  # fmt: skip
        for start, stream in zip(starts, streams, strict=True)
    ]
    extras = [r.extra for r in alone]
    assert all(e.requires_grad for e in extras) and not torch.allclose(extras[0], extras[1], rtol=0.01)
    torch.testing.assert_close(extra, torch.stack(extras).mean(), rtol=1e-6, atol=0)
    objectives = [meta_objective("sum", r.losses, initial_loss=r.end.initial_loss, last_step=3) for r in alone]
    torch.testing.assert_close(objective, torch.stack(objectives).mean(), rtol=1e-6, atol=0)
    params = list(weights.values())
    want = torch.autograd.grad(sum(o + e for o, e in zip(objectives, extras, strict=True)) / 2, params)
    got = torch.autograd.grad(objective + extra, params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(("batched", "regularized"), [(False, False), (True, False), (False, True), (True, True)])
def test_a_run_over_task_instances_resumes_bit_for_bit(tmp_path, batched, regularized):
    """Killed mid-trajectory and resumed: the same net and log bit for bit (the instances' trajectories and batch
    generators are in the checkpoint, with the regularizers' probes' generator); it trains (the net moves, every
    meta-step counts), and a checkpoint is refused under another number of instances."""
    config = tbptt_config(batched=batched, **({"regularizers": HESSIAN} if regularized else {}))
    full_folder = MetaTrainer(config, out_dir=tmp_path / "full", progress=False).train()
    assert MetaTrainer(config, out_dir=tmp_path / "cut", progress=False).train(stop_after=4) is None
    cut_folder = MetaTrainer(config, out_dir=tmp_path / "cut", progress=False).train(resume=True)
    wf, wc = weights_of(full_folder), weights_of(cut_folder)
    assert all(torch.equal(wf[k], wc[k]) for k in wf)
    records = meta_records(tmp_path / "full")
    assert records == meta_records(tmp_path / "cut")
    assert len(records) == 8 and all(not r["skipped"] and r["instances_diverged"] == 0 for r in records)
    if regularized:  # the probes' terms at every segment end, in the meta-loss
        assert all(r["extra"] != 0.0 and "hessian_trace" in r["regularizers"] for r in records)
    initial = MetaTrainer(config, out_dir=tmp_path / "init", progress=False).rule.state_dict()
    assert any(not torch.equal(initial[k], wf[k]) for k in wf)
    with pytest.raises(ValueError, match="estimator.instances: 2 -> 3"):
        changed = tbptt_config(instances=3, **({"regularizers": HESSIAN} if regularized else {}))
        MetaTrainer(changed, out_dir=tmp_path / "cut", progress=False).train(resume=True)


def test_task_instances_refuse_a_checkpoint_of_another_count(tmp_path):
    trainer = MetaTrainer(tbptt_config(instances=3), out_dir=tmp_path, progress=False)
    trainer._begin_trajectory()
    assert trainer.instances is not None
    two = TaskInstances(tbptt_config(), trainer.rule, device=trainer.device, dtype=trainer.dtype)
    with pytest.raises(ValueError, match="holds 3 task instances, the config makes 2"):
        two.load(*trainer.instances.to_tensors())


def test_task_instances_refuse_what_follows_one_trajectory(tmp_path):
    """Maml and imitation (their terms follow one trajectory), a caller's hook, gradient checkpointing of a batched
    unroll, and batching a single instance are refused with clear errors."""
    for changes in ({"imitation": {"enabled": True}}, {"maml": {"enabled": True}}):
        with pytest.raises(ValueError, match="does not combine with maml or imitation"):
            tbptt_config(**changes)
    with pytest.raises(ValueError, match="does not combine with unroll.checkpoint_steps"):
        tbptt_config(batched=True, unroll={"trajectory_length": 6, "segment_length": 3, "checkpoint_steps": True})
    with pytest.raises(ValueError, match="needs kind 'pes' or instances > 1"):
        tbptt_config(instances=1, batched=True)
    with pytest.raises(ValueError, match="instances must be >= 1"):
        tbptt_config(instances=0)
    with pytest.raises(ValueError, match="hook does not combine with estimator.instances"):
        MetaTrainer(tbptt_config(), out_dir=tmp_path, progress=False, hook=lambda *args, **kwargs: None)
