r"""The one differentiable learned step, shared by the runtime optimizer, :func:`learned_optim.adapt` and
meta-training (:mod:`learned_optim.meta.unroll`, MAML, imitation, the regularizers).

For every parameter tensor :math:`\theta` with gradient :math:`g` and net state :math:`s`:

.. math::
    (\Delta, s') = \mathrm{net}_\phi(g, \theta, s, t),\qquad
    \theta' = \theta\,(1 - \eta\lambda) + \eta\,\Delta

with :math:`\eta` the learning rate and :math:`\lambda` the decoupled weight decay (AdamW's). The net runs
on a flat ``(n,)`` view of each tensor through :func:`learned_optim.nets.base.functional_update` (its
``forward``, with the weights :math:`\phi` substituted by ``torch.func.functional_call`` when given, so
the step is differentiable in :math:`\phi`; :func:`apply_rule` substitutes them once for all the tensors of a
step). Everything here is out of place and graph-friendly; the
optimizer's in-place fast paths are the same math under ``no_grad``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .nets.base import UpdateRule, functional_update

__all__ = [
    "StateDict",
    "apply_rule",
    "decoupled_update",
    "decoupled_update_",
    "decoupled_updates_",
    "stepped_parameter",
    "to_device",
    "wider_dtype",
]

#: Net state of several tensors: tensor name -> state name -> tensor.
StateDict = dict[str, dict[str, Tensor]]


def decoupled_update(
    theta: Tensor, delta: Tensor, lr: float | Tensor, weight_decay: float = 0.0, *, work: Tensor | None = None
) -> Tensor:
    r""":math:`\theta (1 - \eta\lambda) + \eta\,\Delta`: the step with decoupled weight decay, out of place; with
    ``work`` (a buffer of ``delta``'s shape for :math:`\eta\Delta`; no autograd) into ``theta`` itself, the same
    arithmetic bit for bit (:func:`decoupled_update_` saves that buffer with a multiply-add)."""
    if work is not None:
        if weight_decay != 0.0:
            theta.mul_(1.0 - lr * weight_decay)
        return theta.add_(torch.mul(delta, lr, out=work))
    if weight_decay != 0.0:
        theta = theta * (1.0 - lr * weight_decay)
    return theta + lr * delta


def wider_dtype(dtype: torch.dtype, than: torch.dtype) -> bool:
    """Whether a parameter of ``dtype`` holds every value of the net's ``than`` and more (float64 against float32):
    it then takes its update in its own dtype (:func:`stepped_parameter`)."""
    return dtype != than and torch.promote_types(dtype, than) == dtype


def stepped_parameter(
    param: Tensor, theta: Tensor, delta: Tensor, lr: float | Tensor, weight_decay: float = 0.0
) -> Tensor:
    r"""The new value of ``param`` (out of place): :func:`decoupled_update` of ``theta``, its copy in the net's
    dtype, in the wider of the two dtypes. A float64 parameter is updated in float64 (in the net's float32 it would
    lose every step smaller than its float32 spacing, and its low bits); a bf16 or fp16 one gets the float32
    result, rounded once."""
    if wider_dtype(param.dtype, theta.dtype):
        return decoupled_update(param, delta.to(param.dtype), lr, weight_decay)
    return decoupled_update(theta, delta, lr, weight_decay)


def decoupled_update_(theta: Tensor, delta: Tensor, lr: float | Tensor, weight_decay: float = 0.0) -> Tensor:
    r"""In place (no autograd): :math:`\theta \leftarrow \theta (1 - \eta\lambda) + \eta\,\Delta`; returns ``theta``."""
    if weight_decay != 0.0:
        theta.mul_(1.0 - lr * weight_decay)
    return theta.add_(delta * lr) if isinstance(lr, Tensor) else theta.add_(delta, alpha=lr)


def decoupled_updates_(
    thetas: list[Tensor], deltas: list[Tensor], lr: float | Tensor, weight_decay: float = 0.0
) -> None:
    r""":func:`decoupled_update_` of each ``thetas[i]`` by ``deltas[i]`` with foreach ops: the same arithmetic (on a
    CPU, where a foreach op runs the per-tensor one, the same bits as one call per tensor). A tensor ``lr`` may have
    any shape of one element (the foreach ops take 0-d ones)."""
    if isinstance(lr, Tensor):
        lr = lr.reshape(())
    if weight_decay != 0.0:
        torch._foreach_mul_(thetas, 1.0 - lr * weight_decay)
    if isinstance(lr, Tensor):
        torch._foreach_add_(thetas, torch._foreach_mul(deltas, lr))
    else:
        torch._foreach_add_(thetas, deltas, alpha=lr)


def to_device(batch: Any, device: torch.device | str | None, dtype: torch.dtype | None = None) -> Any:
    """Move the tensors of a (nested) batch to ``device``; floating tensors are cast to ``dtype``."""
    if isinstance(batch, Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device) if device is not None else batch
    kind: Any = type(batch)  # a dict subclass or a namedtuple is rebuilt as itself
    if isinstance(batch, Mapping):
        return kind((k, to_device(v, device, dtype)) for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        items = [to_device(v, device, dtype) for v in batch]
        return kind(*items) if hasattr(batch, "_fields") else kind(items)
    return batch


def _compute_dtype(rule: UpdateRule, weights: Mapping[str, Tensor] | None) -> torch.dtype:
    if weights:
        return next(iter(weights.values())).dtype
    return rule.compute_dtype


class _EveryTensor(nn.Module):
    """The net's update of each tensor of one step, as one module call: ``functional_call`` on it substitutes the
    net's weights once per step instead of once per tensor (the same operations, so the same bits)."""

    def __init__(self, rule: UpdateRule) -> None:
        super().__init__()
        self.rule = rule

    def forward(
        self, grads: Mapping[str, Tensor], params: Mapping[str, Tensor], opt_state: StateDict, step: int
    ) -> tuple[dict[str, Tensor], StateDict]:
        return apply_rule(self.rule, None, grads, params, opt_state, step)


def apply_rule(
    rule: UpdateRule,
    weights: Mapping[str, Tensor] | None,
    grads: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    opt_state: StateDict,
    step: int,
) -> tuple[dict[str, Tensor], StateDict]:
    r"""The net's update :math:`\Delta` of every tensor (flat views) and the new per-coordinate state.

    ``step`` is the 1-based step count, passed to the net as a 0-d tensor in its compute dtype (as the
    runtime optimizer does). Deltas come back in each parameter's shape and dtype.
    """
    if weights is not None and len(params) > 1:  # the weights substituted once for every tensor
        prefixed = {f"rule.{name}": value for name, value in weights.items()}
        return functional_call(_EveryTensor(rule), prefixed, (grads, params, opt_state, step))
    dtype = _compute_dtype(rule, weights)
    deltas, new_state = {}, {}
    for name, param in params.items():
        t = torch.tensor(float(step), dtype=dtype, device=param.device)
        delta, state = functional_update(
            rule,
            weights,
            grads[name].reshape(-1).to(dtype),
            param.reshape(-1).to(dtype),
            opt_state[name],
            t,
            param.shape,
        )
        deltas[name] = delta.reshape(param.shape).to(param.dtype)
        new_state[name] = state
    return deltas, new_state
