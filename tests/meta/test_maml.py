"""MAML meta-training (M-L2O): meta-gradients against finite differences, the trainer's MAML mode
(including a bit-exact resume), task-argument sampling and test-time adaptation on a task."""

from __future__ import annotations

import json

import pytest
import torch

from learned_optim.meta.config import MAMLConfig, MetaTrainConfig, UnrollConfig
from learned_optim.meta.maml import adapt_on_task, evaluate_rule, maml_segment, sample_task_kwargs
from learned_optim.meta.trainer import MetaTrainer
from learned_optim.meta.unroll import start_trajectory, unroll
from learned_optim.nets import RNNProp
from learned_optim.objectives import meta_objective
from learned_optim.tasks import make_family

F64 = torch.float64


def _tiny_setup(seed: int = 0):
    """A float64 RNNProp (hidden 3) and two 2-d quadratic instances (support, query) of one sigma."""
    torch.manual_seed(seed)
    rule = RNNProp(hidden_size=3).to(F64)
    family = make_family("quadratic", dim=2, num_instances=2, sigma=0.7, dtype="float64")
    gs, gq = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    support_task, query_task = family.sample(gs), family.sample(gq)
    support = start_trajectory(rule, support_task, gs)
    query = start_trajectory(rule, query_task, gq)
    return rule, support_task, support, query_task, query


def _outer(rule, weights, setup, maml: MAMLConfig, steps: int = 3):
    _, st, s, qt, q = setup
    cfg = UnrollConfig(trajectory_length=100, segment_length=steps, second_order=True)  # exact optimizee terms
    return maml_segment(
        rule,
        weights,
        st,
        s,
        qt,
        q,
        steps,
        support_generator=torch.Generator().manual_seed(3),
        query_generator=torch.Generator().manual_seed(4),
        unroll_config=cfg,
        maml=maml,
    )


def _direction(weights):
    gen = torch.Generator().manual_seed(5)
    return {k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in weights.items()}


@pytest.mark.parametrize("inner_update,inner_steps", [("sgd", 1), ("adam", 2)])
def test_second_order_meta_gradient_matches_finite_differences(inner_update, inner_steps):
    setup = _tiny_setup()
    rule = setup[0]
    maml = MAMLConfig(
        enabled=True, inner_lr=0.05, inner_steps=inner_steps, first_order=False, inner_update=inner_update
    )
    weights = {k: v.detach().clone().requires_grad_(True) for k, v in rule.named_parameters()}
    result = _outer(rule, weights, setup, maml)
    grads = torch.autograd.grad(result.loss, list(weights.values()))
    v = _direction(weights)
    analytic = sum(float((g * v[k]).sum()) for g, k in zip(grads, weights, strict=True))
    eps = 1e-6

    def shifted(sign: float):
        return {k: (w.detach() + sign * eps * v[k]).requires_grad_(True) for k, w in weights.items()}

    plus = _outer(rule, shifted(1.0), setup, maml).loss.detach()
    minus = _outer(rule, shifted(-1.0), setup, maml).loss.detach()
    numeric = float(plus - minus) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)
    # the inner step moved the weights and the second-order terms matter
    assert any(not torch.equal(result.fast_weights[k].detach(), weights[k].detach()) for k in weights)


def test_first_order_meta_gradient_is_the_query_gradient_at_the_adapted_weights():
    setup = _tiny_setup()
    rule, _, _, qt, q = setup
    maml = MAMLConfig(enabled=True, inner_lr=0.05, first_order=True)
    weights = {k: v.detach().clone().requires_grad_(True) for k, v in rule.named_parameters()}
    result = _outer(rule, weights, setup, maml)
    fo = torch.autograd.grad(result.loss, list(weights.values()))
    fast = {k: v.detach() for k, v in result.fast_weights.items()}
    cfg = UnrollConfig(trajectory_length=100, segment_length=3, second_order=True)

    def query_loss(w):
        res = unroll(rule, w, qt, q, 3, generator=torch.Generator().manual_seed(4), config=cfg)
        return meta_objective("sum", res.losses)

    v = _direction(weights)
    eps = 1e-6
    numeric = float(
        query_loss({k: fast[k] + eps * v[k] for k in fast}).detach()
        - query_loss({k: fast[k] - eps * v[k] for k in fast}).detach()
    ) / (2 * eps)
    analytic = sum(float((g * v[k]).sum()) for g, k in zip(fo, weights, strict=True))
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)
    # and it is not the exact (second-order) meta-gradient
    so_weights = {k: v.detach().clone().requires_grad_(True) for k, v in rule.named_parameters()}
    so = torch.autograd.grad(
        _outer(rule, so_weights, setup, MAMLConfig(enabled=True, inner_lr=0.05, first_order=False)).loss,
        list(so_weights.values()),
    )
    assert not all(torch.allclose(a, b, rtol=1e-6, atol=1e-12) for a, b in zip(fo, so, strict=True))


def test_sample_task_kwargs():
    gen = torch.Generator().manual_seed(0)
    draws = [
        sample_task_kwargs({"sigma": [0.1, 1.0], "b": {"loguniform": [1.0, 100.0]}, "c": 3}, gen) for _ in range(200)
    ]
    assert {d["sigma"] for d in draws} == {0.1, 1.0}
    assert all(1.0 <= d["b"] <= 100.0 and d["c"] == 3 for d in draws)
    assert sum(d["b"] < 10.0 for d in draws) == pytest.approx(100, abs=30)  # log-uniform: half below 10
    with pytest.raises(ValueError):
        sample_task_kwargs({"sigma": {"loguniform": [0.0, 1.0]}}, gen)


def _config(query: str = "new_instance", **maml) -> dict:
    return {
        "name": "maml-test",
        "seed": 0,
        "net": {"family": "rnnprop", "config": {"hidden_size": 4}},
        "task": {"family": "lasso", "kwargs": {"dim": 3, "num_instances": 4}},
        "unroll": {"trajectory_length": 6 if query != "next_segment" else 12, "segment_length": 3},
        "maml": {"enabled": True, "task_kwargs": {"sigma": [0.1, 1.0]}, "query": query, **maml},
        "meta_epochs": 3,
        "checkpoint_every": 2,
    }


@pytest.mark.parametrize("query", ["new_instance", "same_instance", "next_segment"])
def test_trainer_maml_mode_runs_and_logs(tmp_path, query):
    trainer = MetaTrainer(_config(query), out_dir=tmp_path / "run", progress=False)
    before = {k: v.clone() for k, v in trainer.rule.state_dict().items()}
    folder = trainer.train()
    steps = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["event"] == "meta_step"]
    assert len(steps) == 6 and all("inner_loss" in r and r["task_kwargs"]["sigma"] in (0.1, 1.0) for r in steps)
    assert all(r["trajectory_step"] == (3 if query != "next_segment" else 6) * (1 + i % 2) for i, r in enumerate(steps))
    assert any(not torch.equal(before[k], v) for k, v in trainer.rule.state_dict().items())
    config = json.loads((folder / "config.json").read_text())
    assert config["training"]["meta_training"]["config"]["maml"]["enabled"] is True


def test_trainer_maml_resume_is_bit_exact(tmp_path):
    cfg = _config(first_order=False, inner_steps=2, inner_update="adam")
    full = MetaTrainer(cfg, out_dir=tmp_path / "full", progress=False)
    full.train()
    part = MetaTrainer(cfg, out_dir=tmp_path / "part", progress=False)
    assert part.train(stop_after=3) is None
    part.save_checkpoint()
    resumed = MetaTrainer(cfg, out_dir=tmp_path / "part", progress=False)
    resumed.train(resume=True)
    for k, v in full.rule.state_dict().items():
        assert torch.equal(v, resumed.rule.state_dict()[k]), k


def test_maml_config_validation():
    with pytest.raises(ValueError, match="inner_update"):
        MetaTrainConfig.from_dict({"maml": {"enabled": True, "inner_update": "rmsprop"}})
    with pytest.raises(ValueError, match="next_segment"):
        MetaTrainConfig.from_dict(
            {
                "maml": {"enabled": True, "query": "next_segment"},
                "unroll": {"trajectory_length": 30, "segment_length": 20},
            }
        )


def test_adapt_on_task_returns_an_adapted_copy():
    torch.manual_seed(0)
    rule = RNNProp(hidden_size=4)
    original = {k: v.clone() for k, v in rule.state_dict().items()}
    family = make_family("lasso", dim=3, num_instances=4, sigma=10.0)
    adapted, losses = adapt_on_task(rule, family, steps=3, segment_length=4, trajectory_length=8, seed=1)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.equal(v, rule.state_dict()[k]) for k, v in original.items())
    assert any(not torch.equal(v, adapted.state_dict()[k]) for k, v in original.items())
    curve = evaluate_rule(adapted, family.sample(torch.Generator().manual_seed(9)), steps=10)
    assert curve.shape == (11,) and bool(torch.isfinite(curve).all())


def test_maml_meta_steps_log_and_clear_the_regularizer_values(tmp_path):
    """A MAML meta-step's regularizer values reach the log and leave the hook, as in truncated BPTT."""
    cfg = {**_config(), "regularizers": [{"kind": "jacobian_trace", "weight": 0.01}]}
    trainer = MetaTrainer(cfg, out_dir=tmp_path / "run", progress=False)
    trainer.train()
    steps = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["event"] == "meta_step"]
    assert steps and all(set(r["regularizers"]) <= {"jacobian_trace"} for r in steps)
    assert any(r["regularizers"] for r in steps)  # (at the trajectory's end: the block's default `where`)
    assert trainer.regularizer_hook is not None and not any(trainer.regularizer_hook._values.values())


def test_a_meta_loss_hook_with_pes_is_refused(tmp_path):
    """PES runs no backpropagation through the segment, so a Python-API hook would be ignored: it is refused."""
    cfg = {
        "name": "pes-hook",
        "net": {"family": "rnnprop", "config": {"hidden_size": 4}},
        "task": {"family": "lasso", "kwargs": {"dim": 3, "num_instances": 4}},
        "estimator": {"kind": "pes"},
    }
    with pytest.raises(ValueError, match="hook does not combine with estimator 'pes'"):
        MetaTrainer(cfg, out_dir=tmp_path / "run", progress=False, hook=lambda *a, **k: None)
