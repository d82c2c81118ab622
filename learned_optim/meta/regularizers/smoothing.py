"""The smoothing term: the net's output made insensitive to adversarial perturbations of its input features
(Xiong & Hsieh 2022; see :mod:`learned_optim.meta.regularizers`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ...functional import apply_rule
from ..curvature import (
    gaussian,
)
from ..unroll import StepInputs


def net_input_layer(rule: nn.Module) -> nn.Module:
    r"""The module whose (first positional) input is the net's feature vector :math:`x`.

    A net may say so with an ``input_layer`` attribute (a module it calls on its features, e.g. an
    ``nn.Identity`` tap, or a method returning one); otherwise it is the first submodule, in
    registration order, that holds parameters of its own, e.g. the input ``Linear`` of RNNProp (the
    Adam-ratio features). DM-LSTM, whose LSTM cells run through the functional ``lstm_cell``, has an
    identity ``input_layer`` tap on its log-and-sign features. The net itself is run unchanged; a forward
    pre-hook on this module shifts its input, so no update math is duplicated here. This needs the module
    to be *called* once per update: the MLP optimizer folds its feature normalisation into its first
    layer's weights and never calls that ``Linear``, so :func:`smoothing_term` refuses it with an error;
    ``space="gradient"`` works for every net.
    """
    custom = getattr(rule, "input_layer", None)
    if custom is not None:
        return custom() if callable(custom) and not isinstance(custom, nn.Module) else custom
    for module in rule.modules():
        if module is not rule and any(True for _ in module.parameters(recurse=False)):
            return module
    raise ValueError(
        f"{type(rule).__name__} has no parametrised submodule to take as its input layer; "
        "define an `input_layer` attribute"
    )


def _run_net(
    inputs: StepInputs,
    name: str,
    weights: Mapping[str, Tensor] | None,
    layer: nn.Module | None,
    offset: Tensor | None,
    capture: list[Tensor] | None = None,
) -> Tensor:
    """The update of tensor ``name`` with the input of ``layer`` shifted by ``offset`` (or recorded);
    ``layer=None``: the offset shifts the gradient fed to the net (and ``capture`` records it)."""
    grad = inputs.grads[name]
    if layer is None:
        if capture is not None:
            capture.append(grad.reshape(-1))
        if offset is not None:
            grad = grad + offset.reshape(grad.shape)
        deltas, _ = apply_rule(
            inputs.rule, weights, {name: grad}, {name: inputs.params[name]}, {name: inputs.state[name]}, inputs.step
        )
        return deltas[name]

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if capture is not None:
            capture.append(args[0])
        if offset is None:
            return None
        return (args[0] + offset, *args[1:])

    handle = layer.register_forward_pre_hook(pre_hook)
    try:
        deltas, _ = apply_rule(
            inputs.rule, weights, {name: grad}, {name: inputs.params[name]}, {name: inputs.state[name]}, inputs.step
        )
    finally:
        handle.remove()
    return deltas[name]


def smoothing_term(
    inputs: StepInputs,
    *,
    epsilon: float = 1.0,
    steps: int = 10,
    step_fraction: float = 0.2,
    init_std: float = 0.01,
    reduction: str = "sum",
    space: str = "features",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Smoothness of the net in its input (Xiong & Hsieh 2022): :math:`\sum \|m(\tilde x) - m(x)\|^2`.

    For every parameter tensor, with the net's state and weights of the step held fixed, projected
    gradient ascent finds :math:`\tilde x = x + \tilde\delta` in the :math:`L_\infty` ball of radius
    :math:`\epsilon` around the net's input features :math:`x` (see :func:`net_input_layer`):
    :math:`\tilde\delta_0 = \mathrm{clip}(\sigma\,\xi)`, :math:`\xi \sim N(0, I)`, :math:`\sigma` =
    ``init_std``, then ``steps`` steps
    :math:`\tilde\delta \leftarrow \mathrm{clip}_{[-\epsilon,\epsilon]}(\tilde\delta + s\epsilon\,
    \mathrm{sign}\,\nabla_{\tilde\delta}\|m(x+\tilde\delta) - m(x)\|^2)` with :math:`s` = ``step_fraction``
    (the reference: 10 steps of :math:`\epsilon/5`). The term is :math:`\|m(x + \mathrm{sg}(\tilde\delta))
    - m(x)\|^2` with the net's weights in the graph, summed over coordinates and tensors
    (``reduction="mean"``: averaged over coordinates).

    ``space="gradient"`` takes the gradient fed to the net as its input :math:`x` instead (the
    learning-regularizers paper's reading, "the input to the optimizer, in our case, gradient"; the
    radius is then in gradient units).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if space not in ("features", "gradient"):
        raise ValueError(f"space must be 'features' or 'gradient', got {space!r}")
    rule = inputs.rule
    layer = net_input_layer(rule) if space == "features" else None
    live = inputs.weights
    frozen = {k: v.detach() for k, v in (live.items() if live is not None else rule.named_parameters())}
    total, count = None, 0
    for name in inputs.params:
        capture: list[Tensor] = []
        with torch.no_grad():
            base = _run_net(inputs, name, frozen, layer, None, capture)
        if len(capture) != 1:
            raise RuntimeError(
                f"{type(rule).__name__}: its input layer {type(layer).__name__} ran {len(capture)} "
                "times in one update; feature-space smoothing needs a module the net calls once on its "
                "features (an `input_layer` tap); use space: gradient for this net"
            )
        x = capture[0]
        delta = (init_std * gaussian(x, generator)).clamp(-epsilon, epsilon)
        for _ in range(steps):
            delta.requires_grad_(True)
            with torch.enable_grad():
                gap = (_run_net(inputs, name, frozen, layer, delta) - base).square().sum()
                (direction,) = torch.autograd.grad(gap, delta)
            delta = (delta.detach() + step_fraction * epsilon * direction.sign()).clamp(-epsilon, epsilon)
        term = (_run_net(inputs, name, live, layer, delta) - _run_net(inputs, name, live, layer, None)).square().sum()
        total = term if total is None else total + term
        count += base.numel()
    assert total is not None
    return total / count if reduction == "mean" else total
