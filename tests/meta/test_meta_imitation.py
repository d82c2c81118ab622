"""Imitation of Adam: the teacher's step, the loss value, and training a net towards Adam's steps."""

from __future__ import annotations

import pytest
import torch

from learned_optim import build_rule
from learned_optim.meta.config import ImitationConfig
from learned_optim.meta.imitation import adam_delta, imitation_loss, imitation_unroll
from learned_optim.meta.unroll import start_trajectory
from learned_optim.tasks.base import Task


class Bowl(Task):
    """f(x) = sum(c * x^2) with mixed curvatures; fixed data."""

    name = "bowl"

    def __init__(self):
        self.c = torch.tensor([0.5, 1.0, 4.0, 10.0])

    def init_params(self, generator):
        return {"x": torch.randn(4, generator=generator), "y": torch.randn(2, 3, generator=generator)}

    def batch(self, split, generator):
        return None

    def loss(self, params, batch):
        return (self.c * params["x"].square()).sum() + params["y"].square().sum()


def test_adam_delta_matches_torch_adam():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = torch.optim.Adam([p], lr=0.01)
    m = v = torch.zeros(3)
    theta = p.detach().clone()
    for t in range(1, 6):
        opt.zero_grad()
        (p.pow(3).sum()).backward()
        grad = p.grad.clone()
        opt.step()
        delta, m, v = adam_delta(grad, m, v, t, lr=0.01, betas=(0.9, 0.999), eps=1e-8)
        theta = theta + delta
        torch.testing.assert_close(theta, p.detach())


def test_imitation_loss_value():
    teacher = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0, 0.0]])}
    student = {"a": torch.tensor([0.0, 2.0]), "b": torch.tensor([[3.0, 0.0]])}
    # 1/2 * (1 + 9) / 4 coordinates
    assert float(imitation_loss(teacher, student)) == pytest.approx(1.25)


def test_imitation_unroll_follows_adam_and_trains_the_net_towards_it():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rule = build_rule("rnnprop")
    task = Bowl()
    start = start_trajectory(rule, task, torch.Generator().manual_seed(0))
    cfg = ImitationConfig(enabled=True, teacher_lr=0.01)
    result = imitation_unroll(
        rule, dict(rule.named_parameters()), task, start, 5, generator=torch.Generator(), config=cfg
    )
    # the optimizee moved exactly as Adam would
    p = torch.nn.Parameter(start.params["x"].clone())
    q = torch.nn.Parameter(start.params["y"].clone())
    adam = torch.optim.Adam([p, q], lr=0.01)
    for _ in range(5):
        adam.zero_grad()
        task.loss({"x": p, "y": q}, None).backward()
        adam.step()
    torch.testing.assert_close(result.end.params["x"], p.detach())
    torch.testing.assert_close(result.end.params["y"], q.detach())
    assert result.end.step == 5 and set(result.end.extra["x"]) == {"m", "v"}
    # a few Adam(1e-3) steps on the imitation loss reduce it
    opt = torch.optim.Adam(rule.parameters(), lr=1e-2)
    first = float(result.loss.detach())
    for _ in range(30):
        opt.zero_grad()
        loss = imitation_unroll(
            rule, dict(rule.named_parameters()), task, start, 5, generator=torch.Generator(), config=cfg
        ).loss
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_imitation_compares_adam_with_the_step_the_net_takes_at_its_lr(schedule):
    """The net's output is scaled by the unroll's lr of each step (the trajectory's lr and the schedule) before it is
    compared with Adam's step: a net stepping like Adam at lr 1e-3 has the loss of its output times 1e-3."""
    from learned_optim.functional import apply_rule
    from learned_optim.meta.config import UnrollConfig
    from learned_optim.meta.unroll import step_lr, task_loss_and_grad

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rule = build_rule("adafac_mlp")
    task = Bowl()
    start = start_trajectory(rule, task, torch.Generator().manual_seed(0))
    cfg, unroll_cfg = ImitationConfig(enabled=True, teacher_lr=0.01), UnrollConfig(schedule=schedule)
    result = imitation_unroll(
        rule, None, task, start, 1, generator=torch.Generator(), config=cfg, unroll_config=unroll_cfg
    )
    _, grads = task_loss_and_grad(task, {k: v.detach().requires_grad_() for k, v in start.params.items()}, None)
    output, _ = apply_rule(rule, None, grads, start.params, start.opt_state, 1)
    lr = step_lr(rule, start, unroll_cfg, 1)
    assert 0 < lr <= rule.default_lr
    target = {k: adam_delta(g, torch.zeros_like(g), torch.zeros_like(g), 1, lr=0.01, betas=(0.9, 0.999), eps=1e-8)[0]
              for k, g in grads.items()}  # fmt: skip
    expected = imitation_loss(target, {k: lr * u for k, u in output.items()})
    torch.testing.assert_close(result.loss.detach(), expected.detach())
    raw = imitation_loss(target, output)
    assert abs(float(expected) - float(raw)) > 1e-3 * float(raw)  # the lr matters
