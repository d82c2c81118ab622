"""The ``meta-mix`` meta-training task distribution: every kind is a learnable, deterministic task."""

from __future__ import annotations

import re

import pytest
import torch

from learned_optim.tasks import KINDS, MetaMixFamily, RescaledTask, make_family


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_deterministic_and_learnable(kind):
    family = make_family("meta-mix", kinds={kind: 1.0}, widths=[16, 32], batch_sizes=[32])
    task, again = family.sample(gen(1)), family.sample(gen(1))
    assert task.name == again.name and task.name.startswith(f"mix-{kind}")
    p0, q0 = task.init_params(gen(2)), again.init_params(gen(2))
    assert p0.keys() == q0.keys() and all(torch.equal(p0[k], q0[k]) for k in p0)
    b1, b2 = task.batch("train", gen(3)), again.batch("train", gen(3))
    assert all(torch.equal(x, y) for x, y in zip(b1, b2, strict=True))
    params = {k: v.clone().requires_grad_(True) for k, v in p0.items()}
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    data = gen(4)
    val = task.batch("val", gen(5))
    before = float(task.loss(params, val).detach())
    for _ in range(60):
        opt.zero_grad()
        task.loss(params, task.batch("train", data)).backward()
        opt.step()
    after = float(task.loss(params, val).detach())
    assert after < 0.8 * before, (task.name, before, after)  # held-out loss falls: the task can be learnt


def test_distribution_covers_kinds_widths_and_batch_sizes():
    family = MetaMixFamily()
    names = [family.sample(gen(s)).name for s in range(80)]
    assert {n.split("-")[1].rstrip("0123456789x") for n in names} == set(KINDS)
    assert len({n.rsplit("-b", 1)[1] for n in names}) == 4  # random batch sizes
    assert any("gmm" in n for n in names) and any("digits" in n for n in names)
    widths = {n.split("-")[1].removeprefix("mlp").split("x")[0] for n in names if n.startswith("mix-mlp")}
    assert len(widths) >= 3  # several widths (for the muP scale)


def test_rescaled_task_is_the_same_problem_in_rescaled_variables():
    family = make_family("meta-mix", kinds={"mlp": 1.0}, rescale=(0.1, 10.0))
    task = family.sample(gen(0))
    assert isinstance(task, RescaledTask)
    scales = torch.tensor(list(task.scales.values()))
    assert scales.min() >= 0.1 and scales.max() <= 10.0 and scales.std() > 0
    phi = {k: v.requires_grad_(True) for k, v in task.init_params(gen(1)).items()}
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in task.task.init_params(gen(1)).items()}
    batch = task.batch("train", gen(2))
    loss_phi, loss_theta = task.loss(phi, batch), task.task.loss(theta, batch)
    torch.testing.assert_close(loss_phi, loss_theta)
    g_phi = torch.autograd.grad(loss_phi, list(phi.values()))
    g_theta = torch.autograd.grad(loss_theta, list(theta.values()))
    for (k, s), a, b in zip(task.scales.items(), g_phi, g_theta, strict=True):
        torch.testing.assert_close(a, s * b, msg=k)  # d f(s phi) / d phi = s f'(theta)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown kind"):
        MetaMixFamily(kinds={"vit": 1.0})
    with pytest.raises(ValueError, match="unknown activation"):
        MetaMixFamily(activations=["swish"])
    with pytest.raises(ValueError, match="rescale"):
        MetaMixFamily(rescale=(2.0, 1.0))


@pytest.mark.parametrize("kind", ["mlp", "teacher", "transformer", "conv"])
def test_finite_train_pool_limits_train_batches_and_keeps_val_held_out(kind):
    family = make_family(
        "meta-mix", kinds={kind: 1.0}, batch_sizes=[32], finite_train_probability=1.0, train_set_sizes=[48]
    )
    task, again = family.sample(gen(0)), family.sample(gen(0))
    assert task.name.endswith("-n48-b32")
    seen: set[bytes] = set()
    data = gen(1)
    for _ in range(20):
        x, _ = task.batch("train", data)
        assert len(x) == 32
        seen.update(row.numpy().tobytes() for row in x.flatten(1))
    assert len(seen) <= 48  # every train batch comes from the task's pool of 48 examples
    x_val, _ = task.batch("val", gen(2))
    assert not {row.numpy().tobytes() for row in x_val.flatten(1)} <= seen  # val data is not the pool
    b1, b2 = task.batch("train", gen(3)), again.batch("train", gen(3))
    assert all(torch.equal(u, v) for u, v in zip(b1, b2, strict=True))  # the pool is a function of the seed


def test_finite_train_probability_mixes_pools_and_fresh_data():
    family = make_family("meta-mix", finite_train_probability=0.5, train_set_sizes=[64, 128])
    names = [family.sample(gen(s)).name for s in range(40)]
    sizes = [re.search(r"-n(\d+)-b\d+$", n) for n in names]
    finite = [int(m.group(1)) for m in sizes if m]
    assert 5 < len(finite) < 35 and set(finite) == {64, 128}
    assert (
        make_family("meta-mix").sample(gen(7)).name
        == make_family("meta-mix", finite_train_probability=0.0, train_set_sizes=[64]).sample(gen(7)).name
    )  # off by default: the draws of existing recipes are unchanged


def test_finite_train_arguments_are_checked():
    with pytest.raises(ValueError, match="finite_train_probability"):
        MetaMixFamily(finite_train_probability=1.5)
    with pytest.raises(ValueError, match="train_set_sizes"):
        MetaMixFamily(finite_train_probability=0.5, train_set_sizes=[0])


def test_task_modules_are_pure_functions_that_cudnn_can_differentiate():
    """Dropout off (eval mode) everywhere except a dropout-free RNN, which stays in training mode: cuDNN's RNN
    backward refuses eval mode (``--device cuda`` meta-training died on the GRU kind), and for an RNN without
    dropout the mode changes nothing. An RNN with dropout stays in eval mode."""
    from torch import nn

    from learned_optim.tasks._common import build_functional_module

    task = make_family("meta-mix", kinds={"gru": 1.0}, widths=[16], batch_sizes=[8]).sample(gen(0))
    rnns = [m for m in task.module.modules() if isinstance(m, nn.RNNBase)]
    assert rnns and all(m.training for m in rnns)
    assert not any(m.training for m in task.module.modules() if not isinstance(m, nn.RNNBase))

    def build():
        return nn.Sequential(nn.Dropout(0.5), nn.LSTM(4, 4, num_layers=2, dropout=0.5), nn.BatchNorm1d(4))

    module = build_functional_module(build, 0, torch.device("cpu"), torch.float32)
    assert not any(m.training for m in module.modules())
    assert not module[2].track_running_stats  # batch statistics only
