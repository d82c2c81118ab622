r"""Flatness-seeking baselines for the evaluation harness: SAM, GSAM, GAM and Entropy-SGD.

The registry of baseline optimizers, :data:`BASELINES` (``adam``, ``sgd``, ``adamw`` and these four),
so ``evaluate([...], baselines)`` and ``python -m learned_optim evaluate --baselines
adam,sgd,sam,gsam,gam,entropy-sgd`` know them; each is tuned over its learning-rate grid on the
validation split like Adam and SGD. All take the harness's standard closure (zero grads, forward,
backward, return the loss), which they call several times per step: their time per step in the
harness tables is therefore the honest cost of one update.

=============== ===================================================================== ================
name            what                                                                   gradient
                                                                                       evaluations/step
=============== ===================================================================== ================
``sam``         ``pytorch_optimizer.SAM`` over SGD, :math:`\rho` = 0.05 (Foret et al.)  2
``sam-adamw``   ``pytorch_optimizer.SAM`` over AdamW, :math:`\rho` = 0.05                2
``gsam``        ``pytorch_optimizer.GSAM`` over SGD, :math:`\rho` = 0.05,               2
                :math:`\alpha` = 0.4 (Zhuang et al. 2022)
``gam``         :class:`GAM`, written here from Zhang et al. (2023) and the authors'   4
                algorithm; SGD update
``entropy-sgd`` :class:`EntropySGD`, written here from Chaudhari et al. (2017)         ``L`` (20)
=============== ===================================================================== ================

``pytorch_optimizer`` is an optional dependency (``pip install 'learned-optim[baselines]'``); building
``sam``/``gsam`` without it raises ``ImportError``; ``gam`` and ``entropy-sgd`` need only torch. In the
harness, one step is one minibatch: the extra gradient evaluations of these methods (the SGLD steps of
Entropy-SGD included) all use that step's minibatch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = [
    "DEFAULT_LR_GRID",
    "BaselineInfo",
    "BASELINES",
    "register_baseline",
    "GAM",
    "EntropySGD",
    "sam",
    "sam_adamw",
    "gsam",
    "SAM_GRID",
    "SAM_ADAMW_GRID",
    "ENTROPY_SGD_GRID",
]

#: Learning-rate grid of the baselines (the appendix of "Learning to Generalize Provably in L2O").
DEFAULT_LR_GRID: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)


@dataclasses.dataclass(frozen=True)
class BaselineInfo:
    """A baseline optimizer: how to build it and which learning rates to tune it over.

    ``opt_class(params, lr=lr, **defaults)`` must return a ``torch.optim.Optimizer`` whose
    ``step(closure)`` accepts the standard closure (zero grads, forward, backward, return the loss),
    so optimizers that evaluate the closure several times per step (SAM, GSAM) fit as well.
    """

    name: str
    opt_class: Callable[..., Optimizer]
    description: str = ""
    lr_grid: tuple[float, ...] = DEFAULT_LR_GRID
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def build(self, params: list[Tensor], lr: float) -> Optimizer:
        """The optimizer over ``params`` with learning rate ``lr``."""
        return self.opt_class(params, lr=lr, **self.defaults)


#: The baselines known by name to :func:`evaluate` and the CLI. Add more with :func:`register_baseline`.
BASELINES: dict[str, BaselineInfo] = {}


def register_baseline(info: BaselineInfo, *, overwrite: bool = False) -> BaselineInfo:
    """Add ``info`` to :data:`BASELINES` (names are case-insensitive; an existing name needs ``overwrite``)."""
    key = info.name.lower()
    if key in BASELINES and not overwrite:
        raise ValueError(f"baseline {info.name!r} is already registered; pass overwrite=True to replace it")
    BASELINES[key] = info
    return info


register_baseline(BaselineInfo("adam", torch.optim.Adam, "torch.optim.Adam, default betas and eps"))
register_baseline(BaselineInfo("sgd", torch.optim.SGD, "torch.optim.SGD without momentum"))
register_baseline(BaselineInfo("adamw", torch.optim.AdamW, "torch.optim.AdamW, default betas, eps, weight decay 0.01"))

#: Learning rates tried for the SGD-based flatness baselines (the harness's default grid).
SAM_GRID: tuple[float, ...] = DEFAULT_LR_GRID
#: Learning rates tried for SAM over AdamW: Adam's usual range.
SAM_ADAMW_GRID: tuple[float, ...] = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
#: Entropy-SGD's outer learning rate multiplies :math:`\theta - \mu` (about ``L * sgld_lr / 2`` gradients),
#: so its useful range sits higher (the authors used 1 on MNIST).
ENTROPY_SGD_GRID: tuple[float, ...] = (1.0, 0.3, 0.1, 0.03, 0.01)


def _require_closure(closure: Callable[[], Tensor] | None, name: str) -> Callable[[], Tensor]:
    if closure is None:
        raise RuntimeError(
            f"{name} evaluates the loss several times per step: pass step(closure), a closure that "
            "zeroes the gradients, computes the loss, calls backward() and returns the loss"
        )
    return torch.enable_grad()(closure)


def _sgd_direction(
    states: Mapping[Tensor, dict[str, Any]],
    param: Tensor,
    direction: Tensor,
    group: Mapping[str, Any],
    *,
    nesterov: bool = False,
) -> Tensor:
    r"""The step direction of ``torch.optim.SGD`` (dampening 0) for ``param`` given its gradient-like ``direction``.

    :math:`d \leftarrow d + \lambda\theta` (``weight_decay``); with ``momentum`` :math:`\mu > 0` the buffer
    :math:`b \leftarrow \mu b + d` (:math:`b = d` at the first step, kept in ``states[param]["momentum_buffer"]``)
    and the direction is :math:`b`, or :math:`d + \mu b` with Nesterov. The caller steps
    :math:`\theta \leftarrow \theta - \mathrm{lr}\cdot` direction.
    """
    if group["weight_decay"]:
        direction = direction.add(param, alpha=group["weight_decay"])
    if group["momentum"]:
        state = states[param]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = direction.clone()
        else:
            buf.mul_(group["momentum"]).add_(direction)
        direction = direction.add(buf, alpha=group["momentum"]) if nesterov else buf
    return direction


# ------------------------------------------------------------------------------------------ SAM / GSAM
@functools.cache
def _sam_class() -> type:
    from pytorch_optimizer import SAM

    class HarnessSAM(SAM):
        """``pytorch_optimizer.SAM`` whose ``step(closure)`` also computes the first gradient."""

        def step(self, closure=None):
            closure = _require_closure(closure, "SAM")
            loss = closure()  # g at theta (SAM.step expects it to be there already)
            super().step(closure)  # perturb to theta + rho g/|g|, recompute, restore, base step
            return loss

    return HarnessSAM


class _ConstantRho:
    """A rho "scheduler" for ``pytorch_optimizer.GSAM`` that always returns the same radius."""

    def __init__(self, rho: float) -> None:
        self.rho = float(rho)

    def step(self) -> float:
        return self.rho


@functools.cache
def _gsam_class() -> type:
    from pytorch_optimizer import GSAM

    class HarnessGSAM(GSAM):
        """``pytorch_optimizer.GSAM`` taking the standard closure (GSAM's own returns ``(outputs, loss)``)."""

        def step(self, closure=None):
            closure = _require_closure(closure, "GSAM")
            # GSAM calls its closure for (outputs, loss), though pytorch_optimizer annotates it as returning a float
            _, loss = super().step(lambda: (None, closure()))  # type: ignore[arg-type, return-value]
            return loss

    return HarnessGSAM


def sam(
    params: Iterable[Any],
    lr: float = 0.1,
    *,
    rho: float = 0.05,
    adaptive: bool = False,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> Optimizer:
    r"""SAM (Foret et al. 2021) over SGD: :math:`g_p = \nabla L(\theta + \rho g/\|g\|)`, then an SGD step
    with :math:`g_p`. ``pytorch_optimizer.SAM``; ``step(closure)`` returns the loss at :math:`\theta`."""
    return _sam_class()(
        params, torch.optim.SGD, rho=rho, adaptive=adaptive, lr=lr, momentum=momentum, weight_decay=weight_decay
    )


def sam_adamw(
    params: Iterable[Any],
    lr: float = 1e-3,
    *,
    rho: float = 0.05,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> Optimizer:
    r"""SAM over AdamW: :math:`g_p = \nabla L(\theta + \rho g/\|g\|)`, then a ``torch.optim.AdamW`` step
    (decoupled weight decay) with :math:`g_p` as its gradient: SAM's flatness term on the baseline the learned
    optimizers are measured against. ``pytorch_optimizer.SAM``; ``step(closure)`` returns the loss at :math:`\theta`."""
    return _sam_class()(
        params, torch.optim.AdamW, rho=rho, adaptive=False, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps
    )


def gsam(
    params: Iterable[Any],
    lr: float = 0.1,
    *,
    rho: float = 0.05,
    alpha: float = 0.4,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> Optimizer:
    r"""GSAM (Zhuang et al. 2022) over SGD: the update direction is
    :math:`g_p - \alpha(g - \mathrm{proj}_{g_p} g)`, with a constant :math:`\rho`.
    ``pytorch_optimizer.GSAM`` (its ``model`` argument, used to switch batch-norm running statistics
    off during the second pass, is an empty module here: the harness's tasks keep no running statistics)."""
    params = list(params)
    base = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return _gsam_class()(params, base, nn.Module(), _ConstantRho(rho), alpha=alpha)


# ------------------------------------------------------------------------------------------ GAM
class GAM(Optimizer):
    r"""Gradient norm Aware Minimization (Zhang et al., CVPR 2023) with an SGD update.

    Seeks first-order flatness, a small :math:`\rho\max_{\|\delta\|\le\rho}\|\nabla L(\theta+\delta)\|`,
    together with SAM's zeroth-order flatness. One step (the authors' algorithm; Hessian-vector products
    by finite differences of gradients):

    .. math::
        g_0 &= \nabla L(\theta),\quad g_1 = \nabla L(\theta + \rho\,\hat g_0),\quad
        h = g_1 - g_0 \;(\approx \rho H\hat g_0),\\
        \theta_2 &= \theta + \rho'\,\hat h,\quad g_2 = \nabla L(\theta_2),\quad
        g_3 = \nabla L(\theta_2 + \rho\,\hat g_2),\\
        p &= g_0 + (1-\beta_0)\,g_2,\quad d = \beta_1 g_1 + (1-\beta_1)\,g_3,\quad
        d \leftarrow d - \gamma\,\big(p - \tfrac{\langle p, d\rangle}{\|d\|^2} d\big)

    (:math:`\hat x = x/\|x\|`; the last line removes from :math:`d` the part of :math:`p` orthogonal to it,
    as GSAM does), then the SGD step :math:`\theta \leftarrow \theta - \mathrm{lr}\,d` (momentum and L2
    weight decay added to :math:`d` as in ``torch.optim.SGD``). Defaults are the reference CIFAR
    ones: :math:`\rho` = ``grad_rho`` = 0.03, :math:`\rho'` = ``grad_norm_rho`` = 0.2,
    :math:`\beta_0 = \beta_1` = 0.1, :math:`\gamma` = 0.05. Four gradient evaluations per step; ``step``
    needs a closure and returns the loss at :math:`\theta`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        *,
        grad_rho: float = 0.03,
        grad_norm_rho: float = 0.2,
        grad_beta_0: float = 0.1,
        grad_beta_1: float = 0.1,
        grad_gamma: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        eps: float = 1e-12,
    ) -> None:
        if lr < 0 or grad_rho < 0 or grad_norm_rho < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, grad_rho, grad_norm_rho, momentum and weight_decay must be >= 0")
        super().__init__(
            params,
            dict(
                lr=lr,
                grad_rho=grad_rho,
                grad_norm_rho=grad_norm_rho,
                grad_beta_0=grad_beta_0,
                grad_beta_1=grad_beta_1,
                grad_gamma=grad_gamma,
                momentum=momentum,
                weight_decay=weight_decay,
                eps=eps,
            ),
        )

    def _params(self) -> list[tuple[Tensor, dict[str, Any]]]:
        return [(p, g) for g in self.param_groups for p in g["params"]]

    def _grads(self) -> list[Tensor]:
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p, _ in self._params()]

    @staticmethod
    def _norm(tensors: list[Tensor]) -> Tensor:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))

    @torch.no_grad()
    def _shift(self, direction: list[Tensor], radius_key: str) -> list[Tensor]:
        """Move every parameter by ``radius * direction / |direction|`` (global norm); returns the shifts."""
        norm = self._norm(direction)
        shifts = []
        for (p, group), d in zip(self._params(), direction, strict=True):
            shift = d * (group[radius_key] / (norm + group["eps"]))
            p.add_(shift)
            shifts.append(shift)
        return shifts

    @torch.no_grad()
    def _unshift(self, shifts: list[Tensor]) -> None:
        for (p, _), s in zip(self._params(), shifts, strict=True):
            p.sub_(s)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        closure = _require_closure(closure, "GAM")
        loss = closure()
        g0 = self._grads()
        shift0 = self._shift(g0, "grad_rho")
        closure()
        g1 = self._grads()
        self._unshift(shift0)
        shift1 = self._shift([a - b for a, b in zip(g1, g0, strict=True)], "grad_norm_rho")
        closure()
        g2 = self._grads()
        shift2 = self._shift(g2, "grad_rho")
        closure()
        g3 = self._grads()
        self._unshift(shift2)
        self._unshift(shift1)
        group0 = self.param_groups[0]
        b0, b1, gamma = group0["grad_beta_0"], group0["grad_beta_1"], group0["grad_gamma"]
        pro = [a + (1.0 - b0) * c for a, c in zip(g0, g2, strict=True)]
        new = [b1 * a + (1.0 - b1) * c for a, c in zip(g1, g3, strict=True)]
        inner = sum((a * b).sum() for a, b in zip(pro, new, strict=True))
        coef = inner / (self._norm(new).square() + group0["eps"])
        for (p, group), d, q in zip(self._params(), new, pro, strict=True):
            p.add_(_sgd_direction(self.state, p, d - gamma * (q - coef * d), group), alpha=-group["lr"])
        return loss


# ------------------------------------------------------------------------------------------ Entropy-SGD
class EntropySGD(Optimizer):
    r"""Entropy-SGD (Chaudhari et al., ICLR 2017): SGD on the negative local entropy.

    Each step runs ``L`` SGLD steps from :math:`\theta' = \mu = \theta`,

    .. math::
        \theta' \leftarrow \theta' - \eta'\big(\nabla L(\theta') + \gamma_t(\theta' - \theta)\big)
        + \sqrt{2\eta'}\,\varepsilon\,\xi,\qquad \mu \leftarrow \alpha\mu + (1-\alpha)\theta'

    (:math:`\eta'` = ``sgld_lr`` 0.1, :math:`\varepsilon` = ``noise`` 1e-4, :math:`\alpha` = ``ema`` 0.75),
    then the outer step takes :math:`\theta - \mu` as its gradient (:math:`-\nabla G = \gamma(\theta-\mu)`
    with :math:`\gamma` absorbed into ``lr``, as in the authors' code): with ``momentum`` (0.9) and
    Nesterov, :math:`\theta \leftarrow \theta - \mathrm{lr}\,\cdot` that direction. The coupling
    :math:`\gamma_t = \gamma_0 (1 + \gamma_1)^t` grows ("scoping"; ``gamma`` 0.03, ``scoping`` 1e-3: the
    authors' MNIST values). ``L`` gradient evaluations per step (the first at :math:`\theta`, whose loss
    ``step`` returns); the SGLD noise comes from the optimizer's own generator (``seed``).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1.0,
        *,
        L: int = 20,
        gamma: float = 0.03,
        scoping: float = 1e-3,
        sgld_lr: float = 0.1,
        noise: float = 1e-4,
        ema: float = 0.75,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        if L < 1 or lr < 0 or gamma < 0 or sgld_lr <= 0 or not 0 <= ema < 1 or momentum < 0:
            raise ValueError("need L >= 1, lr >= 0, gamma >= 0, sgld_lr > 0, 0 <= ema < 1 and momentum >= 0")
        super().__init__(
            params,
            dict(
                lr=lr,
                L=L,
                gamma=gamma,
                scoping=scoping,
                sgld_lr=sgld_lr,
                noise=noise,
                ema=ema,
                momentum=momentum,
                nesterov=nesterov,
                weight_decay=weight_decay,
            ),
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_taken = 0

    def _noise(self, p: Tensor) -> Tensor:
        return torch.randn(p.shape, generator=self.generator, dtype=p.dtype).to(p.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        closure = _require_closure(closure, "Entropy-SGD")
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        anchor = [p.detach().clone() for p, _ in params]
        mu = [a.clone() for a in anchor]
        loss = None
        L = self.param_groups[0]["L"]
        for _ in range(L):
            value = closure()
            loss = value if loss is None else loss
            for (p, group), a, m in zip(params, anchor, mu, strict=True):
                gamma = group["gamma"] * (1.0 + group["scoping"]) ** self.steps_taken
                grad = torch.zeros_like(p) if p.grad is None else p.grad
                drift = grad + gamma * (p - a)
                kick = math.sqrt(2.0 * group["sgld_lr"]) * group["noise"]
                p.add_(drift, alpha=-group["sgld_lr"])
                if kick:
                    p.add_(self._noise(p), alpha=kick)
                m.mul_(group["ema"]).add_(p, alpha=1.0 - group["ema"])
        for (p, group), a, m in zip(params, anchor, mu, strict=True):
            p.copy_(a)
            p.add_(_sgd_direction(self.state, p, a - m, group, nesterov=group["nesterov"]), alpha=-group["lr"])
        self.steps_taken += 1
        assert loss is not None
        return loss


# ------------------------------------------------------------------------------------------ registry
register_baseline(
    BaselineInfo("sam", sam, "pytorch_optimizer.SAM over SGD (rho 0.05); 2 gradients per step", SAM_GRID),
    overwrite=True,
)
register_baseline(
    BaselineInfo(
        "sam-adamw", sam_adamw, "pytorch_optimizer.SAM over AdamW (rho 0.05); 2 gradients per step", SAM_ADAMW_GRID
    ),
    overwrite=True,
)
register_baseline(
    BaselineInfo("gsam", gsam, "pytorch_optimizer.GSAM over SGD (rho 0.05, alpha 0.4); 2 gradients per step", SAM_GRID),
    overwrite=True,
)
register_baseline(
    BaselineInfo(
        "gam", GAM, "GAM (Zhang et al. 2023) over SGD, reference CIFAR hyperparameters; 4 gradients per step", SAM_GRID
    ),
    overwrite=True,
)
register_baseline(
    BaselineInfo(
        "entropy-sgd",
        EntropySGD,
        "Entropy-SGD (Chaudhari et al. 2017): L=20 SGLD steps, "
        "gamma 0.03, Nesterov momentum 0.9; 20 gradients per step",
        ENTROPY_SGD_GRID,
    ),
    overwrite=True,
)
