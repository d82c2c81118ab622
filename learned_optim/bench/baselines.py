r"""Flatness-seeking baselines for the evaluation harness: SAM, GSAM, GAM and Entropy-SGD; and Muon with AdamW.

The registry of baseline optimizers, :data:`BASELINES` (``adam``, ``sgd``, ``adamw`` and these six),
so ``evaluate([...], baselines)`` and ``python -m learned_optim evaluate --baselines
adam,sgd,sam,gsam,gam,entropy-sgd,muon-adamw`` know them; each is tuned over its learning-rate grid on the
validation split like Adam and SGD. All take the harness's standard closure (zero grads, forward,
backward, return the loss), which the flatness-seeking ones call several times per step: their time per step in
the harness tables is therefore the honest cost of one update.

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
``muon-adamw``  :class:`MuonAdamW`: Muon (Jordan et al. 2024) on every matrix, update    1
                RMS matched to AdamW's (Liu et al. 2025); AdamW on the rest
=============== ===================================================================== ================

``pytorch_optimizer`` is an optional dependency (``pip install 'learned-optim[baselines]'``); building
``sam``/``gsam`` without it raises ``ImportError``; ``gam``, ``entropy-sgd`` and ``muon-adamw`` need only torch. In the
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
from torch.optim.adamw import adamw

from ..features import matrix_view, newton_schulz_orthogonalize

__all__ = [
    "DEFAULT_LR_GRID",
    "BaselineInfo",
    "BASELINES",
    "register_baseline",
    "GAM",
    "EntropySGD",
    "MuonAdamW",
    "sam",
    "sam_adamw",
    "gsam",
    "SAM_GRID",
    "SAM_ADAMW_GRID",
    "ENTROPY_SGD_GRID",
    "MUON_ADAMW_GRID",
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


# ------------------------------------------------------------------------------------------ Muon + AdamW
#: Learning rates tried for Muon with AdamW in :func:`evaluate`: its update RMS is matched to AdamW's (Liu et al.
#: 2025), so it shares AdamW's range, the one :data:`SAM_ADAMW_GRID` tries.
MUON_ADAMW_GRID: tuple[float, ...] = SAM_ADAMW_GRID


class MuonAdamW(Optimizer):
    r"""Muon on every matrix, AdamW on everything else: one optimizer, one set of param groups.

    A parameter whose :func:`~learned_optim.features.matrix_view` ``(A, B) = (shape[0], prod(shape[1:]))`` has
    :math:`\min(A, B) \ge 2` (a ``Linear`` weight as is, a conv weight ``(out, in, kh, kw)`` as ``(out, in*kh*kw)``)
    takes a **Muon** step (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks"), in
    ``torch.optim.Muon``'s form (momentum :math:`\mu` = 0.95, Nesterov, ``adjust_lr_fn="match_rms_adamw"``):

    .. math::
        B_t &= \mu B_{t-1} + (1-\mu)\,G_t, \qquad D_t = (1-\mu)\,G_t + \mu B_t \;\;(B_t \text{ without Nesterov}),\\
        O_t &= \mathrm{NS}_k(D_t) \approx U V^\top \quad (D_t = U \Sigma V^\top,\ A \times B \text{ view}),\\
        \theta_t &= \theta_{t-1}(1 - \eta\lambda) - 0.2\,\eta\sqrt{\max(A, B)}\; O_t

    (:math:`\eta` the group's lr, :math:`\lambda` its weight decay). :math:`B_t` is :math:`(1-\mu)` times the
    textbook sum :math:`\mu B_{t-1} + G_t` and :math:`D_t` :math:`(1-\mu)` times :math:`G_t + \mu B_t`; the
    orthogonalisation is invariant to that positive scale (up to its :math:`\epsilon`), so both forms give the same
    step, and this one keeps ``momentum_buffer`` interchangeable with ``torch.optim.Muon``'s.
    :math:`\mathrm{NS}_k` is :func:`~learned_optim.features.newton_schulz_orthogonalize`: ``ns_steps`` (5) quintic
    iterations with Muon's coefficients :data:`~learned_optim.features.NEWTON_SCHULZ_COEFFICIENTS` from
    :math:`D / (\lVert D\rVert_F + \epsilon)`, :math:`\epsilon` = ``ns_eps`` (1e-7), on the wide orientation, as
    ``torch.optim.Muon`` does; its products run in ``ns_dtype`` (``None``: the parameter's dtype; pass
    ``torch.bfloat16`` for ``torch.optim.Muon``'s rounding, which always casts to bfloat16).
    The scale :math:`0.2\sqrt{\max(A, B)}` (Liu et al. 2025, "Muon is scalable for LLM training") matches the
    update's RMS to AdamW's: an orthogonal :math:`A \times B` matrix has RMS :math:`1/\sqrt{\max(A, B)}`, so the
    step's RMS is :math:`0.2\,\eta`, about AdamW's, and AdamW's learning rate and weight decay transfer.

    **Every other parameter** (biases, norm gains, scalars, a single row or column such as a one-output head) takes
    an **AdamW** step with the same :math:`\eta` and :math:`\lambda` (Loshchilov & Hutter 2019; ``betas`` (0.9,
    0.999), ``eps`` 1e-8, torch's defaults), through torch's own functional ``torch.optim.adamw.adamw``, so its
    state and steps are ``torch.optim.AdamW``'s exactly:

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
        \theta_t = \theta_{t-1}(1 - \eta\lambda) - \eta\,\frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} +
        \varepsilon}.

    Why not ``torch.optim.Muon`` itself: in torch 2.14 its constructor raises ``ValueError`` for any parameter that
    is not 2-D (conv weights, biases), so a model needs it and an AdamW side by side, two optimizers that one LR
    scheduler cannot drive; and a conv weight needs the matrix view. The class keeps its param groups whole (a
    scheduler writes ``group["lr"]`` once for both rules); the matrix or not decision is a function of the shape.

    As in ``torch.optim.AdamW`` and ``torch.optim.Muon``, sparse gradients raise ``RuntimeError`` (and so does a
    complex matrix, as in ``torch.optim.Muon``), and a non-finite gradient is not checked: it propagates into the
    parameters and state as it does there (the suite's loop ends a run at the first non-finite loss).
    ``step(closure)`` evaluates the closure once, under ``torch.enable_grad``, and returns its loss.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        weight_decay: float = 0.01,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_eps: float = 1e-7,
        ns_dtype: torch.dtype | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or ns_steps < 1 or ns_eps < 0 or eps < 0:
            raise ValueError(
                "MuonAdamW needs lr >= 0, weight_decay >= 0, 0 <= momentum < 1, ns_steps >= 1, ns_eps >= 0, eps >= 0"
            )
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"MuonAdamW: betas must lie in [0, 1), got {betas}")
        super().__init__(
            params,
            dict(
                lr=lr,
                weight_decay=weight_decay,
                momentum=momentum,
                nesterov=nesterov,
                ns_steps=ns_steps,
                ns_eps=ns_eps,
                ns_dtype=ns_dtype,
                betas=betas,
                eps=eps,
            ),
        )

    @staticmethod
    def takes_muon_step(shape: Iterable[int]) -> bool:
        """Whether a parameter of ``shape`` is a matrix that Muon updates: its matrix view has two sides >= 2."""
        return min(matrix_view(tuple(shape))) >= 2

    @staticmethod
    def muon_scale(shape: Iterable[int]) -> float:
        r""":math:`0.2\sqrt{\max(A, B)}` of the matrix view ``(A, B)`` of ``shape``: the factor on the lr that matches
        an orthogonalised update's RMS to AdamW's (``torch.optim.Muon``'s ``adjust_lr_fn="match_rms_adamw"``)."""
        return 0.2 * math.sqrt(max(matrix_view(tuple(shape))))

    def _muon_step(self, param: Tensor, grad: Tensor, group: Mapping[str, Any]) -> None:
        if torch.is_complex(param):
            raise RuntimeError("MuonAdamW does not support complex matrices (torch.optim.Muon neither)")
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        buffer, momentum = state["momentum_buffer"], group["momentum"]
        buffer.lerp_(grad, 1 - momentum)
        direction = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
        polar = newton_schulz_orthogonalize(
            direction.reshape(matrix_view(param.shape)), group["ns_steps"], eps=group["ns_eps"], dtype=group["ns_dtype"]
        )
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(polar.reshape(param.shape), alpha=-group["lr"] * self.muon_scale(param.shape))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            vectors: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            steps: list[Tensor] = []
            has_complex = False
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("MuonAdamW does not support sparse gradients")
                if self.takes_muon_step(param.shape):
                    self._muon_step(param, param.grad, group)
                    continue
                state = self.state[param]
                if not state:  # torch.optim.AdamW's state: a CPU step count (float64 under a float64 default)
                    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                    state["step"] = torch.tensor(0.0, dtype=step_dtype)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                has_complex |= torch.is_complex(param)
                vectors.append(param)
                grads.append(param.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if vectors:
                beta1, beta2 = group["betas"]
                adamw(
                    vectors,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    [],
                    steps,
                    has_complex=has_complex,
                    amsgrad=False,
                    beta1=beta1,
                    beta2=beta2,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=False,
                )
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
register_baseline(
    BaselineInfo(
        "muon-adamw",
        MuonAdamW,
        "Muon (momentum 0.95, Nesterov, 5 Newton-Schulz steps, update RMS matched to AdamW's) on every matrix, "
        "AdamW on the other parameters, weight decay 0.01; 1 gradient per step",
        MUON_ADAMW_GRID,
    ),
    overwrite=True,
)
