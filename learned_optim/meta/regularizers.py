r"""Flatness-aware regularizers of the meta-loss (SPEC §3): optimizers meta-trained to land in flat minima.

A regularizer is a term :math:`\lambda\,R(\theta_t)` added to the meta-loss at points :math:`\theta_t` of
the optimizee trajectory. Because :math:`\theta_t = \theta_{t-1} + \Delta_\phi(\dots)` is in the graph of
the net's weights :math:`\phi`, backpropagating the meta-loss chains :math:`\nabla_\theta R` into
:math:`\phi`: the net is trained to produce trajectories whose points are flat (Yang et al. 2023,
"Learning to Generalize Provably in L2O"; the SAM/GSAM/GAM terms and the smoothing term of "Learning
Regularizers"). At meta-test time nothing of this runs: the optimizer costs the same per step as a
vanilla one.

Config blocks (``MetaTrainConfig.regularizers``, a list; several may be combined)::

    regularizers:
      - {kind: hessian_trace, weight: 1.0e-3, where: posterior, probes: 10}
      - {kind: smoothing, weight: 1.0, where: all, every: 5, epsilon: 1.0}

Every block has ``kind``, ``weight`` (:math:`\lambda`, required), ``where`` (which trajectory points:
``posterior`` = second half of the trajectory, :math:`t > T/2`; ``all``; ``final`` = the trajectory's
last point :math:`t = T`; ``segment_end`` = the last point of every truncated-BPTT segment), ``every``
(apply at steps :math:`t` with :math:`t \bmod \text{every} = 0` only, to bound the cost), an optional
``name`` (the key of its logged value) and the hyperparameters of its kind:

=================== ========================================================================= ==========
kind                term :math:`R(\theta)` (its gradient w.r.t. :math:`\theta` is what reaches
                    the net)                                                                   default
                                                                                               ``where``
=================== ========================================================================= ==========
hessian_trace       Hutchinson :math:`\frac1n\sum_i z_i^\top H z_i`, fresh Rademacher          posterior
                    :math:`z_i` at every call, :math:`Hz` by ``jvp(grad)`` (``probes`` 10;
                    ``hvp: reverse``: by ``grad`` of :math:`\nabla L \cdot z`)
hessian_eigenvalue  :math:`|v^\top H v|`, :math:`v` from ``iters`` (10) power iterations         posterior
                    (largest-magnitude eigenvalue; ``absolute: false`` keeps the sign)
jacobian_trace      :math:`g^\top g` (``reduction: sum``) or its mean over coordinates          posterior
local_entropy       surrogate :math:`\frac\gamma2\|\theta - \mathrm{sg}(\mu)\|^2` whose gradient  posterior
                    is :math:`\gamma(\theta-\mu) = -\nabla_\theta G(\theta;\gamma)`, :math:`\mu`
                    the SGLD estimate of :math:`E[\theta']` (see :func:`local_entropy_mean`)
sam                 :math:`L(\theta + \mathrm{sg}(\hat\epsilon))`, :math:`\hat\epsilon =            final
                    \rho g/\|g\|` (``gap: true``: minus :math:`L(\theta)`)
gsam                value :math:`L(\theta+\hat\epsilon)`, gradient the GSAM direction              final
                    :math:`g_p - \alpha(g - \mathrm{proj}_{g_p} g)`
gam                 :math:`\rho\,\|\nabla L(\theta + \mathrm{sg}(\delta))\|`, :math:`\delta =        final
                    \rho\,Hg/\|Hg\|` (one normalised ascent step on :math:`\|\nabla L\|`)
smoothing           :math:`\|m(x + \mathrm{sg}(\tilde\delta)) - m(x)\|^2` over the coordinates,      all
                    :math:`\tilde\delta` found by PGA in the :math:`L_\infty` ball of radius
                    ``epsilon`` around the net's input features :math:`x` (Xiong & Hsieh 2022;
                    ``space: gradient`` perturbs the gradient fed to the net instead)
=================== ========================================================================= ==========

:math:`L` is the optimizee loss on the train batch that produced :math:`g_t` (the hook's ``batch``),
:math:`g = \nabla L(\theta)`, :math:`H = \nabla^2 L(\theta)` and :math:`\mathrm{sg}` stops the gradient
(SAM, GSAM and GAM treat their perturbations as constants, as the optimizers they come from do).
Terms are summed over the points where they apply, like the ``sum`` meta-objective sums losses.

Randomness (probes, power-iteration start, SGLD noise, PGA start) comes from the ``generator=`` of the
functions (``seed=`` of :class:`RegularizerHook`), else from torch's global RNG. The trainer gives its hook a
generator seeded from the config's ``seed`` (and the process rank) and checkpoints its state, so a run is
reproducible from its config and a resumed run continues bit for bit (torch's global RNG starts from a random
seed in every process).

:class:`RegularizerHook` is the :class:`~learned_optim.meta.unroll.MetaLossHook` the trainer builds
from the config; the functions below are the differentiable building blocks, usable on any
``loss_fn(params_dict) -> scalar``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import grad as func_grad

from .._validation import check_value
from ..functional import apply_rule
from .curvature import (
    HVP_MODES,
    LossFn,
    Params,
    dot,
    gaussian,
    hutchinson_forms,
    hvp,
    norm,
    power_iteration,
    rademacher,
)
from .unroll import MetaLossHook, StepInputs, as_hook

__all__ = [
    "WHERE",
    "REGULARIZERS",
    "Regularizer",
    "RegularizerBlock",
    "RegularizerHook",
    "parse_blocks",
    "combine_hooks",
    "HessianTraceRegularizer",
    "HessianEigenvalueRegularizer",
    "JacobianTraceRegularizer",
    "LocalEntropyRegularizer",
    "SAMRegularizer",
    "GSAMRegularizer",
    "GAMRegularizer",
    "SmoothingRegularizer",
    "hvp",
    "hutchinson_trace",
    "top_eigenvalue",
    "jacobian_trace",
    "local_entropy_mean",
    "local_entropy_surrogate",
    "sam_term",
    "gsam_term",
    "gam_term",
    "smoothing_term",
    "net_input_layer",
]

#: Where in the trajectory a block applies.
WHERE = ("posterior", "all", "final", "segment_end")


# ------------------------------------------------------------------------------------------ helpers
def _detached(params: Mapping[str, Tensor]) -> Params:
    return {k: v.detach() for k, v in params.items()}


# ------------------------------------------------------------------------------------------ the terms
def hutchinson_trace(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    probes: int = 10,
    *,
    generator: torch.Generator | None = None,
    vectorize: bool = True,
    hvp_mode: str = "forward",
) -> Tensor:
    r"""Hutchinson's estimate :math:`\frac1n\sum_{i=1}^n z_i^\top \nabla^2 L(\theta) z_i` of the Hessian trace.

    The :math:`z_i` are fresh Rademacher vectors (drawn from ``generator``, or torch's global RNG),
    :math:`Hz` comes from :func:`hvp`. ``vectorize`` batches the probes with ``torch.func.vmap``
    (several times faster); set it to ``False`` for losses that ``vmap`` cannot batch. ``hvp_mode`` is
    :func:`~learned_optim.meta.curvature.hvp`'s ``mode`` (``"reverse"`` where forward mode fails). The result is a
    0-d tensor differentiable in ``params``; its expectation is :math:`\operatorname{tr} H` exactly.
    """
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    zs = {k: rademacher(v, generator, (probes, *v.shape)) for k, v in params.items()}
    try:
        values = hutchinson_forms(loss_fn, params, zs, vectorize=vectorize, mode=hvp_mode)
    except RuntimeError as err:
        if not vectorize:
            raise
        raise RuntimeError(
            f"torch.func.vmap could not batch the Hutchinson probes over this loss ({err}); "
            "set vectorize: false in the hessian_trace block"
        ) from err
    return values.mean()


def top_eigenvalue(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    iters: int = 10,
    *,
    generator: torch.Generator | None = None,
    absolute: bool = True,
) -> Tensor:
    r"""The Hessian eigenvalue of largest magnitude by power iteration.

    :math:`v_0 \sim N(0, I)`, :math:`v_{k+1} = Hv_k/\|Hv_k\|` for ``iters`` iterations on the detached
    :math:`\theta`, then the Rayleigh quotient :math:`v^\top H(\theta) v` with :math:`\theta` in the
    graph: at an eigenvector its gradient is :math:`v^\top (\partial H) v`, the derivative of the
    eigenvalue itself (Hellmann-Feynman), so :math:`v` is rightly treated as a constant. Returns its
    absolute value (the spectral norm :math:`\|H\|_2` once converged) unless ``absolute=False``.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    params = dict(params)
    fixed = _detached(params)
    start = {k: gaussian(p, generator) for k, p in fixed.items()}
    v, _ = power_iteration(lambda u: {k: x.detach() for k, x in hvp(loss_fn, fixed, u).items()}, start, iters)
    value = dot(v, hvp(loss_fn, dict(params), v))
    return value.abs() if absolute else value


def jacobian_trace(loss_fn: LossFn, params: Mapping[str, Tensor], reduction: str = "sum") -> Tensor:
    r""":math:`g^\top g` with :math:`g = \nabla L(\theta)` (``reduction="sum"``), or :math:`\frac1p g^\top g`
    (``"mean"``, the reference's choice): the trace of the Gauss-Newton-like approximation
    :math:`gg^\top` of the Hessian. Differentiable in ``params`` (its gradient is :math:`2Hg`)."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    g = func_grad(loss_fn)(dict(params))
    total = sum(v.square().sum() for v in g.values())
    if reduction == "mean":
        total = total / sum(v.numel() for v in g.values())
    return total


def local_entropy_mean(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    *,
    gamma: float = 1e-4,
    steps: int = 20,
    lr: float = 0.1,
    noise: float = 1e-4,
    ema: float = 0.25,
    burn_in: int = 0,
    generator: torch.Generator | None = None,
) -> Params:
    r"""SGLD estimate :math:`\mu \approx E[\theta']` of
    :math:`\theta' \sim \exp(-L(\theta') - \frac\gamma2\|\theta-\theta'\|^2)`.

    Starting at :math:`\theta' = \mu = \theta` (detached), ``steps`` steps of

    .. math::
        \theta' \leftarrow \theta' - \eta'\big(\nabla L(\theta') + \gamma(\theta' - \theta)\big)
        + \sqrt{2\eta'}\,\varepsilon\,\xi,\quad \xi\sim N(0, I),\qquad
        \mu \leftarrow (1 - \alpha)\mu + \alpha\theta'

    with :math:`\eta'` = ``lr``, :math:`\varepsilon` = ``noise`` (the thermal noise of Entropy-SGD; 1 samples
    the Gibbs measure exactly, the defaults 1e-4 make it nearly a gradient flow) and :math:`\alpha` =
    ``ema`` (the SPEC's :math:`\mu \leftarrow 0.75\mu + 0.25\theta'`); ``ema=0`` takes the plain mean of
    the samples instead (lower variance for long chains). With ``burn_in`` > 0, the first ``burn_in``
    samples are discarded (:math:`\mu` restarts from the next one). The local entropy's
    gradient is then :math:`-\nabla_\theta G(\theta;\gamma) = \gamma(\theta - E[\theta'])`
    (Chaudhari et al. 2017). Returns detached tensors.
    """
    if steps < 1 or not 0 <= ema <= 1 or not 0 <= burn_in < steps:
        raise ValueError(f"need steps >= 1, 0 <= ema <= 1 and 0 <= burn_in < steps (got {steps}, {ema}, {burn_in})")
    theta = _detached(params)
    x = {k: v.clone() for k, v in theta.items()}
    mu = {k: v.clone() for k, v in theta.items()}
    grad_fn = func_grad(loss_fn)
    kick = math.sqrt(2.0 * lr) * noise
    for i in range(steps):
        g = grad_fn(x)
        x = {
            k: (x[k] - lr * (g[k].detach() + gamma * (x[k] - theta[k])) + kick * gaussian(x[k], generator)).detach()
            for k in x
        }
        if i < burn_in:
            continue
        if ema == 0 or (burn_in and i == burn_in):  # plain mean (its first sample replaces theta)
            count = i - burn_in + 1
            weight = 1.0 / count if ema == 0 else 1.0
            mu = {k: mu[k] + weight * (x[k] - mu[k]) for k in x}
        else:
            mu = {k: (1.0 - ema) * mu[k] + ema * x[k] for k in x}
    return mu


def local_entropy_surrogate(params: Mapping[str, Tensor], mean: Mapping[str, Tensor], gamma: float) -> Tensor:
    r""":math:`\frac\gamma2\|\theta - \mathrm{sg}(\mu)\|^2`, whose gradient w.r.t. :math:`\theta` is
    :math:`\gamma(\theta - \mu) = -\nabla_\theta G(\theta;\gamma)` when :math:`\mu = E[\theta']`: adding it to
    the meta-loss adds :math:`-\lambda G` to first order, which is what the generalization paper asks."""
    return 0.5 * gamma * sum((params[k] - mean[k].detach()).square().sum() for k in params)  # type: ignore[return-value]


def _sam_perturbation(loss_fn: LossFn, fixed: Params, rho: float) -> tuple[Params, Params]:
    g = {k: v.detach() for k, v in func_grad(loss_fn)(fixed).items()}
    scale = rho / (norm(g) + 1e-12)
    return g, {k: v * scale for k, v in g.items()}


def sam_term(loss_fn: LossFn, params: Mapping[str, Tensor], rho: float = 0.05, *, gap: bool = False) -> Tensor:
    r"""SAM's perturbed loss :math:`L(\theta + \mathrm{sg}(\hat\epsilon))`, :math:`\hat\epsilon = \rho\,g/\|g\|`.

    Its gradient w.r.t. :math:`\theta` is SAM's update direction :math:`g_p = \nabla L(\theta+\hat\epsilon)`
    (Foret et al. 2021). ``gap=True`` returns the sharpness :math:`L(\theta+\hat\epsilon) - L(\theta)` instead
    (gradient :math:`g_p - g`).
    """
    params = dict(params)
    _, eps = _sam_perturbation(loss_fn, _detached(params), rho)
    value = loss_fn({k: params[k] + eps[k] for k in params})
    return value - loss_fn(params) if gap else value


def gsam_term(loss_fn: LossFn, params: Mapping[str, Tensor], rho: float = 0.05, alpha: float = 0.4) -> Tensor:
    r"""A term whose value is SAM's perturbed loss :math:`L(\theta+\hat\epsilon)` and whose gradient w.r.t.
    :math:`\theta` is the GSAM direction (Zhuang et al. 2022)

    .. math:: g_p - \alpha\,\big(g - \tfrac{\langle g, g_p\rangle}{\|g_p\|^2} g_p\big)

    i.e. descent on the perturbed loss plus ascent along the part of :math:`g` orthogonal to
    :math:`g_p`, which lowers the surrogate gap :math:`h = L(\theta+\hat\epsilon) - L(\theta)` without
    changing the perturbed loss. Built as :math:`L(\theta+\mathrm{sg}\,\hat\epsilon) - \alpha\langle
    \mathrm{sg}(g_\perp), \theta - \mathrm{sg}(\theta)\rangle`.
    """
    params = dict(params)
    fixed = _detached(params)
    g, eps = _sam_perturbation(loss_fn, fixed, rho)
    g_p = {k: v.detach() for k, v in func_grad(loss_fn)({k: fixed[k] + eps[k] for k in fixed}).items()}
    coef = dot(g, g_p) / (dot(g_p, g_p) + 1e-24)
    g_perp = {k: g[k] - coef * g_p[k] for k in g}
    value = loss_fn({k: params[k] + eps[k] for k in params})
    return value - alpha * dot(g_perp, {k: params[k] - fixed[k] for k in params})


def gam_term(loss_fn: LossFn, params: Mapping[str, Tensor], rho: float = 0.2) -> Tensor:
    r"""GAM's first-order flatness :math:`\rho\max_{\|\delta\|\le\rho}\|\nabla L(\theta+\delta)\|` (Zhang et
    al. 2023) with the maximiser approximated by one normalised ascent step on :math:`\|\nabla L\|`:

    .. math:: \delta = \rho\,\frac{Hg}{\|Hg\|}\quad(\nabla_\theta\|g\| = Hg/\|g\|),\qquad
              R = \rho\,\|\nabla L(\theta + \mathrm{sg}(\delta))\|

    :math:`Hg` by :func:`hvp`. The gradient w.r.t. :math:`\theta` is
    :math:`\rho\,H(\theta+\delta)\,g(\theta+\delta)/\|g(\theta+\delta)\|`.
    """
    params = dict(params)
    fixed = _detached(params)
    g = {k: v.detach() for k, v in func_grad(loss_fn)(fixed).items()}
    hg = {k: v.detach() for k, v in hvp(loss_fn, fixed, g).items()}
    scale = rho / (norm(hg) + 1e-12)
    shifted = {k: params[k] + hg[k] * scale for k in params}
    return rho * norm(func_grad(loss_fn)(shifted))


# ------------------------------------------------------------------------------------------ smoothing
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


# ------------------------------------------------------------------------------------------ kinds
@dataclasses.dataclass
class Regularizer:
    """Base of the regularizer kinds: a dataclass of the kind's hyperparameters with :meth:`term`."""

    kind: ClassVar[str]
    default_where: ClassVar[str] = "posterior"
    wants_step_inputs: ClassVar[bool] = False

    def term(
        self,
        loss_fn: LossFn,
        params: Mapping[str, Tensor],
        *,
        inputs: StepInputs | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        raise NotImplementedError

    def check(self) -> None:
        """Raise ``ValueError`` on out-of-range hyperparameters."""


@dataclasses.dataclass
class HessianTraceRegularizer(Regularizer):
    """Hutchinson trace of the Hessian (:func:`hutchinson_trace`)."""

    kind = "hessian_trace"
    probes: int = 10
    vectorize: bool = True
    hvp: str = "forward"

    def check(self) -> None:
        if self.probes < 1:
            raise ValueError("probes must be >= 1")
        if self.hvp not in HVP_MODES:
            raise ValueError(f"hvp must be one of {HVP_MODES}")

    def term(self, loss_fn, params, *, inputs, generator):
        return hutchinson_trace(
            loss_fn, params, self.probes, generator=generator, vectorize=self.vectorize, hvp_mode=self.hvp
        )


@dataclasses.dataclass
class HessianEigenvalueRegularizer(Regularizer):
    """Largest-magnitude Hessian eigenvalue by power iteration (:func:`top_eigenvalue`)."""

    kind = "hessian_eigenvalue"
    iters: int = 10
    absolute: bool = True

    def check(self) -> None:
        if self.iters < 1:
            raise ValueError("iters must be >= 1")

    def term(self, loss_fn, params, *, inputs, generator):
        return top_eigenvalue(loss_fn, params, self.iters, generator=generator, absolute=self.absolute)


@dataclasses.dataclass
class JacobianTraceRegularizer(Regularizer):
    """:math:`g^T g` (:func:`jacobian_trace`)."""

    kind = "jacobian_trace"
    reduction: str = "sum"

    def check(self) -> None:
        if self.reduction not in ("sum", "mean"):
            raise ValueError("reduction must be 'sum' or 'mean'")

    def term(self, loss_fn, params, *, inputs, generator):
        return jacobian_trace(loss_fn, params, self.reduction)


@dataclasses.dataclass
class LocalEntropyRegularizer(Regularizer):
    """Negative local entropy through its gradient (:func:`local_entropy_mean`, :func:`local_entropy_surrogate`)."""

    kind = "local_entropy"
    gamma: float = 1e-4
    steps: int = 20
    lr: float = 0.1
    noise: float = 1e-4
    ema: float = 0.25
    burn_in: int = 0

    def check(self) -> None:
        if not self.gamma > 0 or self.steps < 1 or not 0 <= self.ema <= 1 or not 0 <= self.burn_in < self.steps:
            raise ValueError("need gamma > 0, steps >= 1, 0 <= ema <= 1 and 0 <= burn_in < steps")

    def term(self, loss_fn, params, *, inputs, generator):
        mean = local_entropy_mean(
            loss_fn,
            params,
            gamma=self.gamma,
            steps=self.steps,
            lr=self.lr,
            noise=self.noise,
            ema=self.ema,
            burn_in=self.burn_in,
            generator=generator,
        )
        return local_entropy_surrogate(params, mean, self.gamma)


@dataclasses.dataclass
class SAMRegularizer(Regularizer):
    """SAM's perturbed loss (:func:`sam_term`)."""

    kind = "sam"
    default_where = "final"
    rho: float = 0.05
    gap: bool = False

    def check(self) -> None:
        if not self.rho > 0:
            raise ValueError("rho must be positive")

    def term(self, loss_fn, params, *, inputs, generator):
        return sam_term(loss_fn, params, self.rho, gap=self.gap)


@dataclasses.dataclass
class GSAMRegularizer(Regularizer):
    """Perturbed loss with the GSAM gradient (:func:`gsam_term`)."""

    kind = "gsam"
    default_where = "final"
    rho: float = 0.05
    alpha: float = 0.4

    def check(self) -> None:
        if not self.rho > 0 or self.alpha < 0:
            raise ValueError("need rho > 0 and alpha >= 0")

    def term(self, loss_fn, params, *, inputs, generator):
        return gsam_term(loss_fn, params, self.rho, self.alpha)


@dataclasses.dataclass
class GAMRegularizer(Regularizer):
    """First-order flatness (:func:`gam_term`)."""

    kind = "gam"
    default_where = "final"
    rho: float = 0.2

    def check(self) -> None:
        if not self.rho > 0:
            raise ValueError("rho must be positive")

    def term(self, loss_fn, params, *, inputs, generator):
        return gam_term(loss_fn, params, self.rho)


@dataclasses.dataclass
class SmoothingRegularizer(Regularizer):
    """Smoothness of the net in its input features (:func:`smoothing_term`)."""

    kind = "smoothing"
    default_where = "all"
    wants_step_inputs = True
    epsilon: float = 1.0
    steps: int = 10
    step_fraction: float = 0.2
    init_std: float = 0.01
    reduction: str = "sum"
    space: str = "features"

    def check(self) -> None:
        if not self.epsilon > 0 or self.steps < 0 or not self.step_fraction > 0 or self.init_std < 0:
            raise ValueError("need epsilon > 0, steps >= 0, step_fraction > 0 and init_std >= 0")
        if self.reduction not in ("sum", "mean"):
            raise ValueError("reduction must be 'sum' or 'mean'")
        if self.space not in ("features", "gradient"):
            raise ValueError("space must be 'features' or 'gradient'")

    def term(self, loss_fn, params, *, inputs, generator):
        if inputs is None:
            raise RuntimeError("the smoothing regularizer needs the step inputs (call it through RegularizerHook)")
        return smoothing_term(
            inputs,
            epsilon=self.epsilon,
            steps=self.steps,
            step_fraction=self.step_fraction,
            init_std=self.init_std,
            reduction=self.reduction,
            space=self.space,
            generator=generator,
        )


#: Every regularizer kind by name.
REGULARIZERS: dict[str, type[Regularizer]] = {
    cls.kind: cls
    for cls in (
        HessianTraceRegularizer,
        HessianEigenvalueRegularizer,
        JacobianTraceRegularizer,
        LocalEntropyRegularizer,
        SAMRegularizer,
        GSAMRegularizer,
        GAMRegularizer,
        SmoothingRegularizer,
    )
}


# ------------------------------------------------------------------------------------------ blocks
@dataclasses.dataclass
class RegularizerBlock:
    """One config block: a regularizer with its weight, where it applies and how often."""

    regularizer: Regularizer
    weight: float
    where: str
    every: int = 1
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or self.regularizer.kind

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.regularizer.kind,
            "weight": self.weight,
            "where": self.where,
            "every": self.every,
            "name": self.name,
            **dataclasses.asdict(self.regularizer),
        }


def parse_block(block: Mapping[str, Any], where: str = "regularizers[0]") -> RegularizerBlock:
    """A :class:`RegularizerBlock` from a config mapping (unknown keys and bad values raise ``ValueError``)."""
    if not isinstance(block, Mapping):
        raise ValueError(f"{where} must be a mapping with at least 'kind' and 'weight', got {block!r}")
    values = dict(block)
    kind = values.pop("kind", None)
    if kind not in REGULARIZERS:
        raise ValueError(f"{where}.kind must be one of {sorted(REGULARIZERS)}, got {kind!r}")
    cls = REGULARIZERS[kind]
    if "weight" not in values:
        raise ValueError(f"{where}: 'weight' (lambda) is required")
    weight = check_value(f"{where}.weight", float, values.pop("weight"))
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{where}.weight must be finite and >= 0, got {weight}")
    place = values.pop("where", cls.default_where)
    if place not in WHERE:
        raise ValueError(f"{where}.where must be one of {WHERE}, got {place!r}")
    every = check_value(f"{where}.every", int, values.pop("every", 1))
    if every < 1:
        raise ValueError(f"{where}.every must be >= 1")
    name = check_value(f"{where}.name", str, values.pop("name", ""))
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"{where}: {kind} has no field(s) {unknown}; its fields: kind, weight, where, every, name, "
            f"{', '.join(sorted(known))}"
        )
    regularizer = cls(**{k: check_value(f"{where}.{k}", hints[k], v) for k, v in values.items()})
    try:
        regularizer.check()
    except ValueError as err:
        raise ValueError(f"{where} ({kind}): {err}") from None
    return RegularizerBlock(regularizer, weight, place, every, name)


def parse_blocks(
    blocks: Sequence[Mapping[str, Any] | RegularizerBlock] | None, where: str = "regularizers"
) -> list[RegularizerBlock]:
    """Parse a list of config blocks; block names must be unique (a repeated kind needs ``name``)."""
    parsed = [
        b if isinstance(b, RegularizerBlock) else parse_block(b, f"{where}[{i}]") for i, b in enumerate(blocks or [])
    ]
    names = [b.name for b in parsed]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{where}: block names {repeated} repeat; give repeated kinds distinct 'name's")
    return parsed


# ------------------------------------------------------------------------------------------ the hook
class RegularizerHook(MetaLossHook):
    """The meta-loss hook of a list of regularizer blocks (see the module docstring).

    Args:
        blocks: config mappings or :class:`RegularizerBlock` objects.
        segment_length: truncation length of the unroll (needed by ``where: segment_end``).
        seed: if given, the regularizers draw from their own generator seeded with it instead of
            torch's global RNG.

    The trainer calls :meth:`begin_trajectory` with each trajectory's length (needed by ``posterior``
    and ``final``). :meth:`pop_values` returns the mean raw value (before the weight) of each block
    over the calls since the last pop, for logging.
    """

    def __init__(
        self,
        blocks: Sequence[Mapping[str, Any] | RegularizerBlock],
        *,
        segment_length: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.blocks = parse_blocks(blocks)
        self.segment_length = segment_length
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.length: int | None = None
        self.wants_step_inputs = any(b.regularizer.wants_step_inputs for b in self.blocks)
        self._values: dict[str, list[float]] = {}
        if any(b.where == "segment_end" for b in self.blocks) and not segment_length:
            raise ValueError("where: segment_end needs the segment length (RegularizerHook(segment_length=...))")

    def begin_trajectory(self, length: int) -> None:
        self.length = int(length)

    def active(self, block: RegularizerBlock, step: int) -> bool:
        """Whether ``block`` applies at the point :math:`\\theta_t` of step ``t = step``."""
        if step % block.every:
            return False
        if block.where == "all":
            return True
        if block.where == "segment_end":
            assert self.segment_length
            return step % self.segment_length == 0 or (self.length is not None and step == self.length)
        if self.length is None:
            raise RuntimeError(
                f"where: {block.where} needs the trajectory length; call begin_trajectory(length) "
                "before unrolling (the MetaTrainer does)"
            )
        if block.where == "final":
            return step == self.length
        return step > self.length // 2  # posterior: the second half

    def __call__(
        self, params: Mapping[str, Tensor], task: Any, batch: Any, step: int, *, inputs: StepInputs | None = None
    ) -> Tensor | None:
        def loss_fn(p: Mapping[str, Tensor]) -> Tensor:
            return task.loss(p, batch)

        total = None
        for block in self.blocks:
            if not self.active(block, step):
                continue
            value = block.regularizer.term(loss_fn, params, inputs=inputs, generator=self.generator)
            self._values.setdefault(block.name, []).append(float(value.detach()))
            term = block.weight * value
            total = term if total is None else total + term
        return total

    def pop_values(self) -> dict[str, float]:
        """Mean raw value of each block since the last call (blocks that did not run are left out)."""
        out = {k: sum(v) / len(v) for k, v in self._values.items() if v}
        self._values.clear()
        return out


class _CombinedHook(MetaLossHook):
    """Sum of several meta-loss hooks, forwarding ``begin_trajectory``/``pop_values``/step inputs."""

    def __init__(self, hooks: Sequence[MetaLossHook]) -> None:
        self.hooks = list(hooks)
        self.wants_step_inputs = any(h.wants_step_inputs for h in self.hooks)

    def begin_trajectory(self, length: int) -> None:
        for h in self.hooks:
            h.begin_trajectory(length)

    def __call__(
        self, params: Mapping[str, Tensor], task: Any, batch: Any, step: int, *, inputs: StepInputs | None = None
    ) -> Tensor | None:
        total = None
        for h in self.hooks:
            term = h(params, task, batch, step, inputs=inputs if h.wants_step_inputs else None)
            if term is not None:
                total = term if total is None else total + term
        return total

    def pop_values(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for h in self.hooks:
            out.update(h.pop_values())
        return out


def combine_hooks(*hooks: MetaLossHook | Callable[..., Tensor | None] | None) -> MetaLossHook | None:
    """One hook summing the given ones (``None`` entries dropped, functions wrapped by
    :func:`~learned_optim.meta.unroll.as_hook`; a single hook is returned as is)."""
    present = [h for h in (as_hook(h) for h in hooks) if h is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else _CombinedHook(present)
