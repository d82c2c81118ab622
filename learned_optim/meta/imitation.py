r"""Imitation learning of Adam (Chen et al., 2020, "Training Stronger Baselines for Learning to Optimize").

In an imitation meta-epoch the optimizee follows the trajectory of the teacher, Adam with step size
:math:`\eta` (0.01):

.. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
    \Delta^{\mathrm{Adam}}_t = -\eta\,\frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon},\quad
    \theta_t = \theta_{t-1} + \Delta^{\mathrm{Adam}}_t

while the net sees the same gradients (its own state evolving along that trajectory) and would step by
:math:`\Delta^{\mathrm{net}}_t = \eta_t\,u_t`, its output :math:`u_t` times the step's lr :math:`\eta_t` (the unroll's:
the trajectory's lr and the config's schedule, :func:`learned_optim.meta.unroll.step_lr`). The segment's imitation
loss is the mean over its steps of

.. math:: \ell_t = \tfrac12 \,\|\Delta^{\mathrm{Adam}}_t - \Delta^{\mathrm{net}}_t\|^2 / n

with :math:`n` the number of optimizee coordinates; it is minimised by a separate Adam (lr 1e-3) on
the net's weights. The net's update comes from :func:`learned_optim.meta.unroll.apply_rule`, i.e. the
same ``functional_update`` as everywhere else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import cast

import torch
from torch import Tensor

from ..features import bias_corrected, ema
from ..functional import apply_rule, to_device
from ..nets.base import UpdateRule
from ..tasks.base import Task
from .config import ImitationConfig, UnrollConfig
from .unroll import Trajectory, step_lr, task_loss_and_grad

__all__ = ["ImitationResult", "adam_delta", "imitation_loss", "imitation_unroll"]


@dataclasses.dataclass
class ImitationResult:
    """``loss``: mean imitation loss of the segment (differentiable); ``train_losses``: the optimizee's
    losses along the teacher's trajectory (detached); ``end``: the trajectory after the segment."""

    loss: Tensor
    train_losses: Tensor
    end: Trajectory


def adam_delta(
    grad: Tensor, m: Tensor, v: Tensor, step: int, *, lr: float, betas: tuple[float, float], eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Adam's step :math:`\Delta^{\mathrm{Adam}}_t` and the new moments ``(delta, m, v)`` at 1-based ``step``."""
    b1, b2 = betas
    m = ema(m, grad, b1)
    v = ema(v, grad.square(), b2)
    t = torch.tensor(float(step), dtype=grad.dtype, device=grad.device)
    delta = -lr * bias_corrected(m, b1, t) / (bias_corrected(v, b2, t).sqrt() + eps)
    return delta, m, v


def imitation_loss(teacher: Mapping[str, Tensor], student: Mapping[str, Tensor]) -> Tensor:
    r""":math:`\tfrac12\|\Delta^{\mathrm{teacher}} - \Delta^{\mathrm{student}}\|^2 / n` over all tensors."""
    n = sum(d.numel() for d in teacher.values())
    total = sum((teacher[k].detach() - student[k]).square().sum() for k in teacher)
    return cast(Tensor, 0.5 * total / n)  # a tensor: the teacher has at least one tensor


def imitation_unroll(
    rule: UpdateRule,
    weights: Mapping[str, Tensor] | None,
    task: Task,
    trajectory: Trajectory,
    num_steps: int,
    *,
    generator: torch.Generator,
    config: ImitationConfig | None = None,
    unroll_config: UnrollConfig | None = None,
) -> ImitationResult:
    """Run ``num_steps`` teacher steps from ``trajectory`` and the net's imitation loss along them.

    The teacher's moments live in ``trajectory.extra[name] = {"m": ..., "v": ...}`` (created at zero).
    If the optimizee loss stops being finite the segment ends there (the remaining steps add nothing).
    ``unroll_config`` gives the lr schedule the net's output is scaled by, as in :func:`~.unroll.unroll`.
    """
    cfg = config or ImitationConfig()
    unroll_cfg = unroll_config or UnrollConfig()
    betas = (float(cfg.teacher_betas[0]), float(cfg.teacher_betas[1]))
    params = {k: v.detach() for k, v in trajectory.params.items()}
    device = next(iter(params.values())).device
    dtype = next((p.dtype for p in params.values() if p.is_floating_point()), None)
    state = {k: dict(st) for k, st in trajectory.opt_state.items()}
    teacher = {k: dict(st) for k, st in trajectory.extra.items()} or {
        k: {"m": torch.zeros_like(p), "v": torch.zeros_like(p)} for k, p in params.items()
    }
    terms: list[Tensor] = []
    train_losses: list[float] = []
    step = trajectory.step
    with torch.enable_grad():
        for _ in range(0 if trajectory.diverged else num_steps):
            t = step + 1
            leaves = {k: v.requires_grad_(True) for k, v in params.items()}
            loss, grads = task_loss_and_grad(task, leaves, to_device(task.batch("train", generator), device, dtype))
            if not math.isfinite(float(loss.detach())) or not all(
                bool(torch.isfinite(g).all()) for g in grads.values()
            ):
                break
            train_losses.append(float(loss.detach()))
            output, state = apply_rule(rule, weights, grads, leaves, state, t)
            lr_t = step_lr(rule, trajectory, unroll_cfg, t)
            student = {k: lr_t * u for k, u in output.items()}
            target = {}
            for k, g in grads.items():
                target[k], teacher[k]["m"], teacher[k]["v"] = adam_delta(
                    g, teacher[k]["m"], teacher[k]["v"], t, lr=cfg.teacher_lr, betas=betas, eps=cfg.teacher_eps
                )
            terms.append(imitation_loss(target, student))
            params = {k: (leaves[k] + target[k]).detach() for k in params}
            step = t
    ref = next(iter(params.values()))
    loss = torch.stack(terms).mean() if terms else ref.new_zeros(())
    diverged = len(terms) < num_steps
    end = Trajectory(
        params=params,
        opt_state={k: {s: v.detach() for s, v in st.items()} for k, st in state.items()},
        step=trajectory.step + num_steps,
        initial_loss=trajectory.initial_loss,
        diverged=trajectory.diverged or diverged,
        penalty=trajectory.penalty,
        last_loss=trajectory.last_loss,
        extra={k: {s: v.detach() for s, v in st.items()} for k, st in teacher.items()},
        lr=trajectory.lr,
        horizon=trajectory.horizon,
        weight_decay=trajectory.weight_decay,
    )
    return ImitationResult(loss=loss, train_losses=torch.tensor(train_losses, dtype=torch.float64), end=end)
