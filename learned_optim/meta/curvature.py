r"""Curvature of a loss over a dict of tensors: Hessian-vector products, Hutchinson's trace, power iteration.

The one home of these primitives, used by the meta-training regularizers
(:mod:`learned_optim.meta.regularizers`, differentiable in :math:`\theta`) and by the flatness diagnostics
(:mod:`learned_optim.bench.flatness`, plain numbers at a model's current weights). ``loss_fn`` maps a dict of
parameter tensors to a scalar; vectors are dicts with the same keys.

* :func:`hvp`: :math:`\nabla^2 L(\theta)\,v` by forward-over-reverse (``jvp`` of ``grad``);
* :func:`hutchinson_forms`: :math:`z_i^\top \nabla^2 L(\theta)\,z_i` for a batch of probes, whose mean is
  Hutchinson's unbiased estimate of :math:`\operatorname{tr}\nabla^2 L` for Rademacher :math:`z_i`
  (:func:`rademacher`);
* :func:`power_iteration`: :math:`v_{k+1} = Hv_k/\|Hv_k\|`, converging to the eigenvector of the
  largest-magnitude eigenvalue at the rate :math:`|\lambda_2/\lambda_1|` per iteration.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.func import grad as func_grad
from torch.func import jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "LossFn",
    "Params",
    "dot",
    "norm",
    "gaussian",
    "rademacher",
    "hvp",
    "hutchinson_forms",
    "power_iteration",
    "twice_differentiable",
]

Params = dict[str, Tensor]
LossFn = Callable[[Mapping[str, Tensor]], Tensor]


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    r""":math:`\sum_k \langle a_k, b_k\rangle` over the keys of ``a`` (a 0-d tensor, differentiable)."""
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def norm(a: Mapping[str, Tensor]) -> Tensor:
    r""":math:`\sqrt{\sum_k \|a_k\|^2}` (a 0-d tensor in the tensors' dtype, differentiable)."""
    return torch.sqrt(sum(v.square().sum() for v in a.values()))  # type: ignore[arg-type]


def gaussian(like: Tensor, generator: torch.Generator | None, shape: Sequence[int] | None = None) -> Tensor:
    """Standard normal draws of ``shape`` (default ``like``'s) with ``like``'s dtype and device.

    Drawn on ``generator``'s device (torch's global RNG when ``None``), so a CPU generator gives the same
    numbers whatever device ``like`` is on.
    """
    shape = tuple(like.shape) if shape is None else tuple(shape)
    if generator is None:
        return torch.randn(shape, dtype=like.dtype, device=like.device)
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=generator.device).to(like.device)


def rademacher(like: Tensor, generator: torch.Generator | None, shape: Sequence[int]) -> Tensor:
    """Independent :math:`\\pm 1` entries of ``shape`` with ``like``'s dtype and device (see :func:`gaussian`)."""
    if generator is None:
        bits = torch.randint(0, 2, tuple(shape), device=like.device)
    else:
        bits = torch.randint(0, 2, tuple(shape), generator=generator, device=generator.device).to(like.device)
    return bits.to(like.dtype) * 2 - 1


def twice_differentiable() -> contextlib.AbstractContextManager[None]:
    """A context in which the loss's graph can be differentiated twice: attention through the math kernel
    (the fused CPU flash kernel's backward has no derivative)."""
    return sdpa_kernel(SDPBackend.MATH)


#: How :func:`hvp` differentiates twice: ``"forward"`` (forward-over-reverse, ``jvp`` of ``grad``: one
#: forward-mode pass, the default) or ``"reverse"`` (reverse-over-reverse, :math:`\nabla_\theta (\nabla L \cdot v)`:
#: for losses whose forward-mode derivative torch cannot take: ``F.mse_loss(..., reduction="mean")`` raises
#: "ZeroTensors are immutable" under forward-over-reverse in torch <= 2.14, pytorch/pytorch#123996, as on
#: meta-mix's ``nn.Module`` MSE tasks).
HVP_MODES = ("forward", "reverse")


def hvp(
    loss_fn: LossFn, params: Mapping[str, Tensor], vector: Mapping[str, Tensor], *, mode: str = "forward"
) -> Params:
    r"""Hessian-vector product :math:`\nabla^2 L(\theta)\,v`, by forward-over-reverse (``mode="forward"``,
    ``jvp`` of ``grad``) or reverse-over-reverse (``mode="reverse"``; see :data:`HVP_MODES`).

    Differentiable in ``params`` (and ``vector``) when they are in an autograd graph.
    """
    if mode == "forward":
        return jvp(func_grad(loss_fn), (dict(params),), (dict(vector),))[1]
    if mode != "reverse":
        raise ValueError(f"hvp mode must be one of {HVP_MODES}, got {mode!r}")
    v = dict(vector)

    def grad_dot_vector(p: Params) -> Tensor:
        return dot(func_grad(loss_fn)(p), v)

    with twice_differentiable():
        return func_grad(grad_dot_vector)(dict(params))


def hutchinson_forms(
    loss_fn: LossFn, params: Mapping[str, Tensor], probes: Params, *, vectorize: bool = True, mode: str = "forward"
) -> Tensor:
    r"""The quadratic forms :math:`z_i^\top \nabla^2 L(\theta)\,z_i` of a batch of probes.

    ``probes`` holds, per key, ``n`` vectors stacked on a leading dimension; returns the ``n`` forms (a
    tensor differentiable in ``params``). ``vectorize`` batches them with ``torch.func.vmap``; ``False``
    evaluates the probes one by one, for losses that ``vmap`` cannot batch; ``mode`` is :func:`hvp`'s.
    """
    params = dict(params)

    def form(z: Params) -> Tensor:
        return dot(z, hvp(loss_fn, params, z, mode=mode))

    if vectorize:
        return vmap(form)(probes)
    count = next(iter(probes.values())).shape[0]
    return torch.stack([form({k: z[i] for k, z in probes.items()}) for i in range(count)])


def power_iteration(
    matvec: Callable[[Params], Params],
    start: Params,
    iters: int,
    *,
    norm_of: Callable[[Params], float | Tensor] = norm,
    rayleigh: Callable[[Params, Params], float] | None = None,
    tol: float | None = None,
) -> tuple[Params, float]:
    r"""Power iteration :math:`v_{k+1} = Hv_k/\|Hv_k\|` from ``start`` (normalised first), ``iters`` times.

    ``matvec(v)`` is :math:`Hv`; ``norm_of`` the norm used to normalise (a differentiable tensor norm by
    default; a float64 one gives plain numbers). With ``rayleigh(hv, v)`` the Rayleigh quotient
    :math:`v_k^\top H v_k` is tracked and, with ``tol``, the iteration stops once it changes by at most
    ``tol`` relative to itself. Stops early when :math:`\|Hv\|` is 0 (reporting 0) or not finite (``nan``).
    Returns the last unit vector and the last Rayleigh quotient (``nan`` when not tracked).
    """
    scale = norm_of(start)
    v = {k: x / scale for k, x in start.items()}
    value = math.nan
    for _ in range(max(1, iters)):
        hv = matvec(v)
        new = rayleigh(hv, v) if rayleigh is not None else math.nan
        scale = norm_of(hv)
        if not bool(scale > 0):  # Hv vanished (an eigenvalue 0) or is not finite
            return v, 0.0 if bool(scale == 0) else math.nan
        v = {k: x / scale for k, x in hv.items()}
        converged = tol is not None and math.isfinite(value) and abs(new - value) <= tol * abs(new)
        value = new
        if converged:
            break
    return v, value
