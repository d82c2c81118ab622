r"""Learning a single step size: the two settings of SPEC §5 (Wang, Yuan, Wu & Ge, ICML 2021).

This module holds the reusable math behind ``examples/step_size_quadratic.py`` and
``examples/train_by_validation.py``; it depends on torch only.

1. Meta-gradient explosion on a quadratic
-----------------------------------------
Inner problem :math:`f(w) = \tfrac12 w^\top H w` with :math:`H \succ 0`, gradient descent from a fixed
:math:`w_0` with step size :math:`\eta`: :math:`w_{\tau+1} = (I - \eta H) w_\tau`. With the eigen-
decomposition :math:`H = \sum_i \lambda_i u_i u_i^\top` (``torch.linalg.eigh``: ascending, so
:math:`\lambda_1 = \alpha` is the smallest and :math:`\lambda_d = L` the largest) and
:math:`c_i = \langle u_i, w_0\rangle`,

.. math::
    f(w_t) = \tfrac12 \sum_i \lambda_i c_i^2 (1 - \eta\lambda_i)^{2t}.

*Last-loss objective* :math:`\hat F(\eta) = f(w_t)`: its derivative is
:math:`-t\sum_i c_i^2\lambda_i^2(1-\eta\lambda_i)^{2t-1}`, exponentially small for
:math:`\eta < 2/L` (every :math:`|1-\eta\lambda_i| < 1`) and exponentially large for :math:`\eta > 2/L`
(:math:`|1 - \eta L| > 1`) -- Theorem 3.

*Log objective* :math:`\hat F(\eta) = \tfrac1t \log f(w_t)`, whose derivative (Eq. 1 of the paper)

.. math::
    \hat F'(\eta) = \frac{-2\sum_i c_i^2 \lambda_i^2 (1-\eta\lambda_i)^{2t-1}}
                         {\sum_i c_i^2 \lambda_i (1-\eta\lambda_i)^{2t}}

is polynomially bounded (Theorem 4). Backpropagating through the unrolled trajectory still forms
the numerator and the denominator separately, each exponentially large or small (Corollary 1), so
it overflows (``inf``/``NaN``) long before the ratio is large. Here both the objective and its
derivative are evaluated in log space: with
:math:`b_i = \log(\tfrac12 \lambda_i c_i^2) + 2t\log|1-\eta\lambda_i|`,
:math:`\log f(w_t) = \operatorname{logsumexp}_i b_i`, and the derivative is a difference of two
signed log-sum-exps divided by the same normaliser (:func:`log_objective_grad`), i.e. a weighted
average of bounded quantities -- never a ratio of two huge numbers. Dividing numerator and
denominator by the dominant factor (:math:`(1-\eta\alpha)^{2t}` or :math:`(\eta L - 1)^{2t}`, Eq. 2
of the paper) is what ``logsumexp`` does automatically, without having to know which eigenvalue is
the smallest -- but note the paper's Eq. 2 needs :math:`\alpha` and :math:`L` correctly identified,
which is why the eigenvalues must come from ``eigh`` (sorted) rather than ``eig`` (unordered).

Meta-training: projected gradient descent :math:`\eta_k = \max(0, \eta_{k-1} - \mu_k \hat F'(\eta_{k-1}))`
with :math:`\mu_k = 1/(100\sqrt k)` (:func:`meta_train_step_size`).

2. Train-by-train vs train-by-validation on least squares
---------------------------------------------------------
Task: :math:`w^*` uniform on the unit sphere of :math:`\mathbb R^d`, :math:`x \sim N(0, I_d)`,
:math:`y = \langle w^*, x\rangle + \xi`, :math:`\xi \sim N(0,\sigma^2)`. GD from :math:`w_0 = 0` on
the training loss :math:`\hat f(w) = \frac1{2n_1}\|Xw - y\|^2` for :math:`t` steps, with the divergence
guard of the paper: the first time :math:`\|w_\tau\| \ge 40\sigma` the run is frozen at
:math:`w_{\tau'} = 40\sigma\, w_\tau/\|w_\tau\|` for all :math:`\tau' \ge \tau` (a point of norm
:math:`40\sigma`, hence a high meta-loss). The meta-loss is :math:`\frac1{2m}\|X'w_t - y'\|^2` on the
training set itself (train-by-train, TbT) or on a disjoint validation set (train-by-validation, TbV;
:func:`split_task`).

The GD steps are batched over tasks and step sizes and written on the smaller Gram matrix
(:func:`gd_least_squares`): for :math:`n_1 \ge d`, :math:`w \leftarrow w - \eta(Hw - b)` with
:math:`H = X^\top X/n_1`, :math:`b = X^\top y/n_1`; for :math:`n_1 < d`, since :math:`w_0 = 0` every iterate
lies in the row space of :math:`X`, :math:`w = X^\top a`, and GD is
:math:`a \leftarrow a - \eta(Ka - y/n_1)` with :math:`K = XX^\top/n_1` and
:math:`\|w\|^2 = n_1 a^\top K a`. Per step size this costs :math:`O(t\min(n_1,d)^2)` instead of
:math:`O(t n_1 d)`, which makes a 25-point grid over 300 tasks cheap. Checked against plain GD
(:func:`gd_least_squares_reference`) in the tests.
For isotropic :math:`x`, the population excess risk of :math:`w` is
:math:`E(\langle w - w^*, x\rangle^2) = \|w - w^*\|^2`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    # quadratic
    "random_quadratic",
    "quadratic_spectrum",
    "log_last_loss",
    "log_objective",
    "log_objective_grad",
    "last_loss_closed_form",
    "unrolled_last_loss",
    "autograd_value_and_grad",
    "MetaTrace",
    "meta_train_step_size",
    "meta_lr",
    # least squares
    "sample_least_squares_tasks",
    "split_task",
    "gd_least_squares",
    "gd_least_squares_reference",
    "half_mse",
    "GUARD_FACTOR",
]

# ----------------------------------------------------------------------------------------------
# 1. quadratic
# ----------------------------------------------------------------------------------------------


def random_quadratic(d: int = 20, seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """``(H, w0)`` with ``H = XᵀX``, ``X ~ N(0,1)^{d×d}`` and ``w0 ~ N(0, I_d)`` (SPEC §5)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, d, generator=g, dtype=torch.float64)
    w0 = torch.randn(d, generator=g, dtype=torch.float64)
    return (X.T @ X).to(dtype), w0.to(dtype)


def quadratic_spectrum(H: Tensor, w0: Tensor) -> tuple[Tensor, Tensor]:
    """Ascending eigenvalues ``lam`` of symmetric ``H`` and the coordinates ``c = Uᵀ w0``."""
    lam, U = torch.linalg.eigh(H)
    return lam, U.T @ w0


def _log_abs(x: Tensor) -> Tensor:
    # log|x| with x == 0 mapped to log(tiny) instead of -inf, so that autograd through it is finite
    # (the corresponding term then has weight exp(2t·log tiny) = 0 and zero gradient).
    return torch.log(torch.abs(x).clamp_min(torch.finfo(x.dtype).tiny))


def log_last_loss(eta: Tensor | float, lam: Tensor, c: Tensor, t: int) -> Tensor:
    r"""``log f(w_t) = logsumexp_i [log(½ λ_i c_i²) + 2t·log|1 − ηλ_i|]``; broadcasts over ``eta``.

    Finite for any ``t`` and ``η`` (no intermediate is formed outside log space), and differentiable
    in ``η`` by autograd with a bounded gradient.
    """
    eta = torch.as_tensor(eta, dtype=lam.dtype)
    log_weight = torch.log(0.5 * lam.clamp_min(torch.finfo(lam.dtype).tiny) * c**2)
    return torch.logsumexp(log_weight + 2 * t * _log_abs(1 - eta.unsqueeze(-1) * lam), dim=-1)


def log_objective(eta: Tensor | float, lam: Tensor, c: Tensor, t: int) -> Tensor:
    r"""The stable meta-objective :math:`\hat F(\eta) = \frac1t \log f(w_t)`."""
    return log_last_loss(eta, lam, c, t) / t


def log_objective_grad(eta: Tensor | float, lam: Tensor, c: Tensor, t: int) -> Tensor:
    r""":math:`\hat F'(\eta)` of the log objective by the closed form (paper Eq. 1), in log space.

    Numerator terms :math:`c_i^2\lambda_i^2 (1-\eta\lambda_i)^{2t-1}` carry the sign of
    :math:`1-\eta\lambda_i`; they are split into positive and negative parts, each summed with
    ``logsumexp`` and divided by the log-normaliser before exponentiating.
    """
    eta = torch.as_tensor(eta, dtype=lam.dtype)
    r = 1 - eta.unsqueeze(-1) * lam
    log_abs_r = _log_abs(r)
    log_lam = torch.log(lam.clamp_min(torch.finfo(lam.dtype).tiny))
    log_c2 = torch.log(c**2)
    a = log_c2 + 2 * log_lam + (2 * t - 1) * log_abs_r
    b = log_c2 + log_lam + 2 * t * log_abs_r
    log_den = torch.logsumexp(b, dim=-1)
    neg_inf = torch.tensor(-math.inf, dtype=lam.dtype)
    pos = torch.logsumexp(torch.where(r > 0, a, neg_inf), dim=-1)
    neg = torch.logsumexp(torch.where(r < 0, a, neg_inf), dim=-1)
    return -2 * (torch.exp(pos - log_den) - torch.exp(neg - log_den))


def last_loss_closed_form(eta: Tensor | float, lam: Tensor, c: Tensor, t: int) -> Tensor:
    """``f(w_t) = ½ Σ λ_i c_i² (1 − ηλ_i)^{2t}`` computed directly (overflows for large ``t``/``η``)."""
    eta = torch.as_tensor(eta, dtype=lam.dtype)
    return 0.5 * (lam * c**2 * (1 - eta.unsqueeze(-1) * lam) ** (2 * t)).sum(-1)


def unrolled_last_loss(eta: Tensor, H: Tensor, w0: Tensor, t: int) -> Tensor:
    """``f(w_t)`` by running ``t`` GD steps ``w ← w − η H w`` (the graph plain backprop differentiates)."""
    w = w0
    for _ in range(t):
        w = w - eta * (H @ w)
    return 0.5 * w @ (H @ w)


def autograd_value_and_grad(
    objective: Callable[[Tensor], Tensor], dtype: torch.dtype = torch.float64
) -> Callable[[float], tuple[float, float]]:
    """Wrap a scalar ``objective(eta_tensor)`` as ``eta -> (value, d value / d eta)`` by backprop."""

    def value_and_grad(eta: float) -> tuple[float, float]:
        e = torch.tensor(eta, dtype=dtype, requires_grad=True)
        value = objective(e)
        (grad,) = torch.autograd.grad(value, e)
        return float(value.detach()), float(grad)

    return value_and_grad


def meta_lr(k: int, scale: float = 0.01) -> float:
    """Meta step size ``μ_k = scale/√k`` (``k ≥ 1``); the paper uses ``1/(100√k)``."""
    return scale / math.sqrt(k)


@dataclass
class MetaTrace:
    """History of a meta-training run: ``etas[k]`` is η after ``k`` meta steps (``etas[0] = η0``)."""

    etas: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)  # meta-objective at etas[k-1], as computed
    grads: list[float] = field(default_factory=list)  # meta-gradient at etas[k-1], as computed
    nonfinite: int = 0  # meta steps whose gradient was inf/NaN (update skipped)

    @property
    def final(self) -> float:
        return self.etas[-1]

    @property
    def zero_grads(self) -> int:
        """Meta steps whose gradient was exactly 0 (e.g. ``d log f/d f = 1/inf``): η silently stalls."""
        return sum(g == 0.0 for g in self.grads)


def meta_train_step_size(
    value_and_grad: Callable[[float], tuple[float, float]],
    eta0: float,
    steps: int,
    lr: Callable[[int], float] = meta_lr,
) -> MetaTrace:
    """Projected meta-gradient descent on η: ``η_k = max(0, η_{k−1} − lr(k)·F'(η_{k−1}))``.

    A non-finite meta-gradient leaves η unchanged (what a framework that skips NaN updates does); such
    steps are counted in :attr:`MetaTrace.nonfinite`.
    """
    trace = MetaTrace(etas=[float(eta0)])
    eta = float(eta0)
    for k in range(1, steps + 1):
        value, grad = value_and_grad(eta)
        trace.values.append(value)
        trace.grads.append(grad)
        if math.isfinite(grad):
            eta = max(0.0, eta - lr(k) * grad)
        else:
            trace.nonfinite += 1
        trace.etas.append(eta)
    return trace


# ----------------------------------------------------------------------------------------------
# 2. least squares, train-by-train vs train-by-validation
# ----------------------------------------------------------------------------------------------

#: The divergence guard freezes a run once ``‖w‖ ≥ GUARD_FACTOR · σ``.
GUARD_FACTOR = 40.0


def sample_least_squares_tasks(
    num_tasks: int, n: int, d: int, sigma: float, generator: torch.Generator, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor, Tensor]:
    """``(X, y, w_star)`` of shapes ``(B, n, d)``, ``(B, n)``, ``(B, d)``: ``‖w*‖ = 1``, ``y = Xw* + σξ``."""
    w_star = torch.randn(num_tasks, d, generator=generator, dtype=dtype)
    w_star = w_star / w_star.norm(dim=-1, keepdim=True)
    X = torch.randn(num_tasks, n, d, generator=generator, dtype=dtype)
    noise = torch.randn(num_tasks, n, generator=generator, dtype=dtype)
    y = (X @ w_star.unsqueeze(-1)).squeeze(-1) + sigma * noise
    return X, y, w_star


def split_task(X: Tensor, y: Tensor, mode: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(X_train, y_train, X_meta, y_meta)`` for a task of ``n`` samples (sample axis ``-2`` / ``-1``).

    ``"tbt"``: train on all ``n`` and measure the meta-loss on the same ``n`` samples.
    ``"tbv"``: train on the first ``n // 2`` and measure the meta-loss on the other ``n − n // 2``.
    """
    if mode == "tbt":
        return X, y, X, y
    if mode == "tbv":
        n1 = X.shape[-2] // 2
        return X[..., :n1, :], y[..., :n1], X[..., n1:, :], y[..., n1:]
    raise ValueError(f"mode must be 'tbt' or 'tbv', not {mode!r}")


def half_mse(w: Tensor, X: Tensor, y: Tensor) -> Tensor:
    """``½·mean_j (⟨w, x_j⟩ − y_j)²`` for ``w (B, E, d)``, ``X (B, m, d)``, ``y (B, m)`` → ``(B, E)``."""
    residual = w @ X.mT - y.unsqueeze(-2)
    return 0.5 * residual.pow(2).mean(-1)


def gd_least_squares(
    X: Tensor, y: Tensor, etas: Tensor | Sequence[float], t: int, guard: float
) -> tuple[Tensor, Tensor]:
    r"""GD from 0 on ``½·mean (Xw − y)²`` for every step size at once, with the divergence guard.

    ``X (B, n, d)``, ``y (B, n)``, ``etas (E,)`` → ``(w_t (B, E, d), diverged (B, E) bool)``: the same
    iterates as :func:`gd_least_squares_reference`, batched over tasks and step sizes, and written on
    the smaller Gram matrix (see the module docstring). A run whose norm reaches ``guard`` is rescaled to
    norm ``guard`` and frozen for the remaining steps.
    """
    n, d = X.shape[-2:]
    etas = torch.as_tensor(etas, dtype=X.dtype).reshape(1, -1, 1)
    if n >= d:  # primal: w ← w − η(Hw − b), H = XᵀX/n, b = Xᵀy/n
        M = X.mT @ X / n
        r = (X.mT @ y.unsqueeze(-1)).mT / n  # (B,1,d)
        scale = 1.0
    else:  # dual: w = Xᵀa, a ← a − η(Ka − y/n), K = XXᵀ/n, ‖w‖² = n·aᵀKa
        M = X @ X.mT / n
        r = y.unsqueeze(-2) / n  # (B,1,n)
        scale = float(n)
    state = torch.zeros(X.shape[0], etas.shape[1], M.shape[-1], dtype=X.dtype)
    frozen = torch.zeros(state.shape[:2], dtype=torch.bool)
    for step in range(t + 1):
        product = state @ M  # one matmul per step serves both the guard (dual norm) and the gradient
        if step > 0:  # the guard, on the iterate w_step
            norm = state.norm(dim=-1) if n >= d else (scale * (product * state).sum(-1)).clamp_min(0).sqrt()
            hit = ~frozen & (norm >= guard)
            shrink = torch.where(hit, guard / norm, torch.ones_like(norm)).unsqueeze(-1)
            state, product = state * shrink, product * shrink
            frozen = frozen | hit
        if step == t:
            break
        state = torch.where(frozen.unsqueeze(-1), state, state - etas * (product - r))
    return (state if n >= d else state @ X), frozen


def gd_least_squares_reference(X: Tensor, y: Tensor, eta: float, t: int, guard: float) -> tuple[Tensor, bool]:
    """Plain GD ``w ← w − η Xᵀ(Xw − y)/n`` from 0 on one task ``X (n, d)``, with the same guard.

    Slow and obvious; the tests check :func:`gd_least_squares` against it.
    """
    n = X.shape[0]
    w = torch.zeros(X.shape[1], dtype=X.dtype)
    for _ in range(t):
        w = w - eta * X.T @ (X @ w - y) / n
        norm = w.norm()
        if norm >= guard:
            return w * (guard / norm), True
    return w, False
