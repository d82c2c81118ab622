"""The flatness terms :math:`R(\theta)` as differentiable functions of the optimizee's parameters (see
:mod:`learned_optim.meta.regularizers`), usable on any ``loss_fn(params_dict) -> scalar``."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor
from torch.func import grad as func_grad

from ..curvature import (
    LossFn,
    Params,
    dot,
    gaussian,
    hutchinson_forms,
    hvp,
    norm,
    power_iteration,
    rademacher,
    twice_differentiable,
)


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
    hvp_mode: str = "forward",
) -> Tensor:
    r"""The Hessian eigenvalue of largest magnitude by power iteration.

    :math:`v_0 \sim N(0, I)`, :math:`v_{k+1} = Hv_k/\|Hv_k\|` for ``iters`` iterations on the detached
    :math:`\theta`, then the Rayleigh quotient :math:`v^\top H(\theta) v` with :math:`\theta` in the
    graph: at an eigenvector its gradient is :math:`v^\top (\partial H) v`, the derivative of the
    eigenvalue itself (Hellmann-Feynman), so :math:`v` is rightly treated as a constant. Returns its
    absolute value (the spectral norm :math:`\|H\|_2` once converged) unless ``absolute=False``.
    ``hvp_mode``: how the Hessian-vector products differentiate twice (:data:`~learned_optim.meta.curvature.HVP_MODES`).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    params = dict(params)
    fixed = _detached(params)
    start = {k: gaussian(p, generator) for k, p in fixed.items()}
    v, _ = power_iteration(
        lambda u: {k: x.detach() for k, x in hvp(loss_fn, fixed, u, mode=hvp_mode).items()}, start, iters
    )
    value = dot(v, hvp(loss_fn, dict(params), v, mode=hvp_mode))
    return value.abs() if absolute else value


def jacobian_trace(loss_fn: LossFn, params: Mapping[str, Tensor], reduction: str = "sum") -> Tensor:
    r""":math:`g^\top g` with :math:`g = \nabla L(\theta)` (``reduction="sum"``), or :math:`\frac1p g^\top g`
    (``"mean"``, the reference's choice): the trace of the Gauss-Newton-like approximation
    :math:`gg^\top` of the Hessian. Differentiable in ``params`` (its gradient is :math:`2Hg`)."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    with twice_differentiable():  # the meta-gradient differentiates g once more
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


def gam_term(loss_fn: LossFn, params: Mapping[str, Tensor], rho: float = 0.2, *, hvp_mode: str = "forward") -> Tensor:
    r"""GAM's first-order flatness :math:`\rho\max_{\|\delta\|\le\rho}\|\nabla L(\theta+\delta)\|` (Zhang et
    al. 2023) with the maximiser approximated by one normalised ascent step on :math:`\|\nabla L\|`:

    .. math:: \delta = \rho\,\frac{Hg}{\|Hg\|}\quad(\nabla_\theta\|g\| = Hg/\|g\|),\qquad
              R = \rho\,\|\nabla L(\theta + \mathrm{sg}(\delta))\|

    :math:`Hg` by :func:`hvp` (``hvp_mode``, :data:`~learned_optim.meta.curvature.HVP_MODES`). The gradient
    w.r.t. :math:`\theta` is :math:`\rho\,H(\theta+\delta)\,g(\theta+\delta)/\|g(\theta+\delta)\|`.
    """
    params = dict(params)
    fixed = _detached(params)
    g = {k: v.detach() for k, v in func_grad(loss_fn)(fixed).items()}
    hg = {k: v.detach() for k, v in hvp(loss_fn, fixed, g, mode=hvp_mode).items()}
    scale = rho / (norm(hg) + 1e-12)
    shifted = {k: params[k] + hg[k] * scale for k in params}
    with twice_differentiable():  # the meta-gradient differentiates this gradient once more
        return rho * norm(func_grad(loss_fn)(shifted))
