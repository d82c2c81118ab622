r"""Synthetic optimizees: quadratic, LASSO, Rosenbrock, noisy least squares, polynomial regression,
and the step-size paper's quadratic.

All families take a CPU ``torch.Generator`` in :meth:`sample`, draw the whole instance from it
(data, noise, the instance's sigma), and build tasks in ``dtype`` on ``device`` (float64 works for
finite-difference checks). Every task's :meth:`loss` is a pure function of ``(params, batch)``
built from differentiable torch ops, so ``torch.func.grad`` / ``jvp`` / ``vmap`` apply to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._common import check_split, family_config, normal, resolve_dtype, sample_choice, uniform
from .base import Params, Task, TaskFamily

__all__ = [
    "TRAIN_SIGMAS",
    "TEST_SIGMAS",
    "QuadraticTask",
    "QuadraticFamily",
    "LassoFamily",
    "RosenbrockTask",
    "RosenbrockFamily",
    "LinearRegressionTask",
    "LeastSquaresFamily",
    "PolynomialRegressionFamily",
    "StepSizeQuadraticTask",
    "StepSizeQuadraticFamily",
]

#: sigma of W ~ N(0, sigma^2) for meta-training quadratic/LASSO tasks (M-L2O reference mixture).
TRAIN_SIGMAS: tuple[float, ...] = (0.1, 0.5, 1.0)
#: sigma of the out-of-distribution adaptation/test quadratic/LASSO tasks (M-L2O Table 1).
TEST_SIGMAS: tuple[float, ...] = (10.0, 25.0, 50.0, 100.0, 200.0)


def _reduce(per_instance: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_instance.mean()
    if reduction == "sum":
        return per_instance.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


# --------------------------------------------------------------------------------------------------
# Quadratic and LASSO


class QuadraticTask(Task):
    r"""``n`` independent regularised least-squares problems solved at once.

    .. math::
        f(x) = \frac{1}{n} \sum_{i=1}^{n} \Big( q\,\lVert W_i x_i - y_i \rVert_2^2
               + \lambda \lVert x_i \rVert_1 \Big)

    with ``q = 1, lambda = 0`` for the quadratic and ``q = 1/2, lambda = 0.005`` for LASSO. The loss
    is the **mean over the n instances** (``reduction="sum"``: the sum). Parameters
    ``{"x": (n, d)}``; every split's batch is the fixed data ``{"W": (n, d, d), "y": (n, d)}``.
    ``sigma`` holds the per-instance scale of ``W`` (shape ``(n,)``, float64, for reporting).
    """

    def __init__(
        self,
        W: Tensor,
        y: Tensor,
        sigma: Tensor,
        *,
        quad_scale: float,
        l1: float,
        init_std: float,
        reduction: str = "mean",
        name: str = "quadratic",
    ) -> None:
        self.W, self.y, self.sigma = W, y, sigma
        self.quad_scale, self.l1, self.init_std, self.reduction = quad_scale, l1, init_std, reduction
        self.name = name

    def init_params(self, generator: torch.Generator) -> Params:
        """``x0 ~ N(0, init_std^2)`` of shape (n, d)."""
        return {"x": normal(self.y.shape, self.init_std, generator, dtype=self.y.dtype, device=self.y.device)}

    def batch(self, split: str, generator: torch.Generator) -> dict[str, Tensor]:
        check_split(split)
        return {"W": self.W, "y": self.y}

    def loss(self, params: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        x = params["x"]
        residual = torch.einsum("nij,nj->ni", batch["W"], x) - batch["y"]
        per_instance = self.quad_scale * residual.square().sum(-1)
        if self.l1:
            per_instance = per_instance + self.l1 * x.abs().sum(-1)
        return _reduce(per_instance, self.reduction)


class QuadraticFamily(TaskFamily):
    r"""Quadratic ``(1/n) sum_i ||W_i x_i - y_i||^2`` (SPEC §4): the M-L2O / L2O-DM toy task.

    Per task: ``W_i ~ N(0, sigma^2)`` (d x d), ``y_i ~ U[0, 1]`` (d), ``x0 ~ N(0, init_std^2)``.

    Args:
        dim: d (10).
        num_instances: n, instances per task, optimised jointly (128).
        sigma: a float (fixed) or a list to sample from; training mixture :data:`TRAIN_SIGMAS`
            ``(0.1, 0.5, 1)`` (default), test :data:`TEST_SIGMAS` ``(10, 25, 50, 100, 200)``.
        sigma_per_instance: draw sigma independently for every instance instead of once per task.
        init_std: std of the initial point (0.01; the same in meta-training and meta-testing).
        reduction: ``"mean"`` (default) or ``"sum"`` over instances.
        dtype, device: of the task tensors.
    """

    name = "quadratic"
    _quad_scale = 1.0

    def __init__(
        self,
        *,
        dim: int = 10,
        num_instances: int = 128,
        sigma: float | Sequence[float] = TRAIN_SIGMAS,
        sigma_per_instance: bool = False,
        init_std: float = 0.01,
        reduction: str = "mean",
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.config = family_config(locals())
        self.dim, self.num_instances, self.sigma = dim, num_instances, sigma
        self.sigma_per_instance, self.init_std, self.reduction = sigma_per_instance, init_std, reduction
        self.dtype, self.device = resolve_dtype(dtype), torch.device(device)
        self.l1 = 0.0

    def _sigmas(self, generator: torch.Generator) -> Tensor:
        n = self.num_instances
        draws = [sample_choice(self.sigma, generator) for _ in range(n if self.sigma_per_instance else 1)]
        return torch.tensor(draws, dtype=torch.float64).expand(n).contiguous()

    def sample(self, generator: torch.Generator) -> QuadraticTask:
        n, d = self.num_instances, self.dim
        sigma = self._sigmas(generator)
        W = normal((n, d, d), sigma.view(n, 1, 1).to(self.dtype), generator, dtype=self.dtype, device=self.device)
        y = uniform((n, d), 0.0, 1.0, generator, dtype=self.dtype, device=self.device)
        return QuadraticTask(
            W,
            y,
            sigma.to(self.device),
            quad_scale=self._quad_scale,
            l1=self.l1,
            init_std=self.init_std,
            reduction=self.reduction,
            name=self.name,
        )


class LassoFamily(QuadraticFamily):
    r"""LASSO ``(1/n) sum_i (1/2 ||W_i x_i - y_i||^2 + l1 ||x_i||_1)`` (SPEC §4, the M-L2O task).

    Same arguments and sampling as :class:`QuadraticFamily`, plus ``l1`` (0.005).
    """

    name = "lasso"
    _quad_scale = 0.5

    def __init__(self, *, l1: float = 0.005, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = {**self.config, "l1": l1}
        self.l1 = l1


# --------------------------------------------------------------------------------------------------
# Rosenbrock


class RosenbrockTask(Task):
    r"""``n`` 2-D Rosenbrock functions solved at once.

    .. math:: f(x) = \frac{1}{n} \sum_{i=1}^{n} (a - u_i)^2 + b\,(v_i - u_i^2)^2,
              \qquad x_i = (u_i, v_i)

    minimum 0 at ``x_i = (a, a^2)``. Parameters ``{"x": (n, 2)}``; no data (``batch`` returns None).
    """

    def __init__(
        self,
        num_instances: int,
        *,
        a: float,
        b: float,
        init_mean: float,
        init_std: float,
        reduction: str,
        dtype: torch.dtype,
        device: torch.device,
        name: str = "rosenbrock",
    ) -> None:
        self.num_instances, self.a, self.b = num_instances, a, b
        self.init_mean, self.init_std, self.reduction = init_mean, init_std, reduction
        self.dtype, self.device, self.name = dtype, device, name

    def init_params(self, generator: torch.Generator) -> Params:
        """``x0 ~ N(init_mean, init_std^2)`` (N(0, 1) by default, as M-L2O)."""
        return {
            "x": normal(
                (self.num_instances, 2),
                self.init_std,
                generator,
                mean=self.init_mean,
                dtype=self.dtype,
                device=self.device,
            )
        }

    def batch(self, split: str, generator: torch.Generator) -> None:
        check_split(split)
        return None

    def loss(self, params: Mapping[str, Tensor], batch: Any = None) -> Tensor:
        u, v = params["x"].unbind(-1)
        return _reduce((self.a - u).square() + self.b * (v - u.square()).square(), self.reduction)


class RosenbrockFamily(TaskFamily):
    """2-D Rosenbrock, batched (SPEC §4): ``a`` (1), ``b`` (100), ``num_instances`` (128),
    ``init_mean`` (0) and ``init_std`` (1) of ``x0``, ``reduction`` ("mean"), ``dtype``, ``device``.
    ``a`` and ``b`` may be lists, sampled once per task."""

    name = "rosenbrock"

    def __init__(
        self,
        *,
        num_instances: int = 128,
        a: float | Sequence[float] = 1.0,
        b: float | Sequence[float] = 100.0,
        init_mean: float = 0.0,
        init_std: float = 1.0,
        reduction: str = "mean",
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.config = family_config(locals())
        self.num_instances, self.a, self.b = num_instances, a, b
        self.init_mean, self.init_std, self.reduction = init_mean, init_std, reduction
        self.dtype, self.device = resolve_dtype(dtype), torch.device(device)

    def sample(self, generator: torch.Generator) -> RosenbrockTask:
        return RosenbrockTask(
            self.num_instances,
            a=float(sample_choice(self.a, generator)),
            b=float(sample_choice(self.b, generator)),
            init_mean=self.init_mean,
            init_std=self.init_std,
            reduction=self.reduction,
            dtype=self.dtype,
            device=self.device,
            name=self.name,
        )


# --------------------------------------------------------------------------------------------------
# Linear regression: noisy least squares and polynomial regression


class LinearRegressionTask(Task):
    r"""Linear regression on fixed features.

    .. math:: f(w) = \frac{1}{2m} \sum_{j=1}^{m} \big(\langle w, \phi_j \rangle - y_j\big)^2

    over the ``m`` rows of a batch ``(Phi, y)``. Parameters ``{"w": (d,)}``; ``w0 ~ N(0,
    init_std^2)`` (``init_std = 0``: gradient descent from 0, as in the step-size paper).
    ``batch("train")`` is the whole train split, or ``batch_size`` rows drawn without replacement;
    val and test are always whole. :meth:`metrics` gives the RMSE ``sqrt(mean residual^2)``.
    """

    def __init__(
        self,
        splits: Mapping[str, tuple[Tensor, Tensor]],
        *,
        init_std: float = 0.0,
        batch_size: int | None = None,
        divergence_bound: float | None = None,
        name: str = "linear-regression",
        **info: Any,
    ) -> None:
        self.splits = dict(splits)
        self.init_std, self.batch_size, self.divergence_bound, self.name = init_std, batch_size, divergence_bound, name
        #: Instance facts (e.g. the ground truth ``w_star``, ``noise_std``).
        self.info = info
        phi = self.splits["train"][0]
        self.dim, self.dtype, self.device = phi.shape[1], phi.dtype, phi.device

    def init_params(self, generator: torch.Generator) -> Params:
        return {"w": normal((self.dim,), self.init_std, generator, dtype=self.dtype, device=self.device)}

    def batch(self, split: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        check_split(split)
        phi, y = self.splits[split]
        if len(y) == 0:
            raise ValueError(f"{self.name}: the {split!r} split is empty (n_{split} = 0)")
        if split == "train" and self.batch_size is not None and self.batch_size < len(y):
            idx = torch.randperm(len(y), generator=generator)[: self.batch_size].to(y.device)
            return phi[idx], y[idx]
        return phi, y

    def loss(self, params: Mapping[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        phi, y = batch
        return 0.5 * (phi @ params["w"] - y).square().mean()

    @torch.no_grad()
    def metrics(self, params: Mapping[str, Tensor], batch: tuple[Tensor, Tensor]) -> dict[str, float]:
        loss = float(self.loss(params, batch))
        return {"loss": loss, "rmse": math.sqrt(2.0 * loss)}


class LeastSquaresFamily(TaskFamily):
    r"""Noisy least squares of the step-size paper (SPEC §5).

    Per task: ``w* ~ U(unit sphere in R^d)``; rows ``x ~ N(0, I_d)``, ``y = <w*, x> + xi``,
    ``xi ~ N(0, noise_std^2)``; ``n_train`` / ``n_val`` / ``n_test`` fresh rows per split. The
    optimizee minimises :class:`LinearRegressionTask`'s ``1/(2n) sum (<w, x_j> - y_j)^2`` from
    ``w0 = 0``. Train-by-train: ``n_train=500, n_val=0`` and the meta-loss on "train";
    train-by-validation: ``n_train=n_val=250`` (default) and the meta-loss on "val". The task's
    ``divergence_bound`` is ``divergence_factor * noise_std`` (the paper's ``||w|| >= 40 sigma``).

    Args: ``dim`` (1000), ``n_train`` (250), ``n_val`` (250), ``n_test`` (1000), ``noise_std``
    (1.0; a list is sampled once per task), ``batch_size`` (None: full-batch GD), ``init_std`` (0),
    ``divergence_factor`` (40), ``dtype``, ``device``.
    """

    name = "least-squares"

    def __init__(
        self,
        *,
        dim: int = 1000,
        n_train: int = 250,
        n_val: int = 250,
        n_test: int = 1000,
        noise_std: float | Sequence[float] = 1.0,
        batch_size: int | None = None,
        init_std: float = 0.0,
        divergence_factor: float | None = 40.0,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.config = family_config(locals())
        self.dim, self.sizes = dim, {"train": n_train, "val": n_val, "test": n_test}
        self.noise_std, self.batch_size, self.init_std = noise_std, batch_size, init_std
        self.divergence_factor = divergence_factor
        self.dtype, self.device = resolve_dtype(dtype), torch.device(device)

    def sample(self, generator: torch.Generator) -> LinearRegressionTask:
        noise_std = float(sample_choice(self.noise_std, generator))
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        w_star = normal((self.dim,), 1.0, generator, **kw)
        w_star = w_star / w_star.norm()
        splits = {}
        for split, n in self.sizes.items():
            x = normal((n, self.dim), 1.0, generator, **kw)
            splits[split] = (x, x @ w_star + normal((n,), noise_std, generator, **kw))
        bound = None if self.divergence_factor is None else self.divergence_factor * noise_std
        return LinearRegressionTask(
            splits,
            init_std=self.init_std,
            batch_size=self.batch_size,
            divergence_bound=bound,
            name=self.name,
            w_star=w_star,
            noise_std=noise_std,
        )


class PolynomialRegressionFamily(TaskFamily):
    r"""Noisy polynomial (by default cubic) regression, fitted in the monomial basis.

    Per task: true coefficients ``c_k ~ N(0, coef_std^2)``, ``k = 0..degree``; inputs
    ``u ~ U[-input_range, input_range]``; targets ``y = sum_k c_k u^k + xi``,
    ``xi ~ N(0, noise_std^2)``. The optimizee fits ``w`` in
    ``f(w) = 1/(2n) sum_j (sum_k w_k u_j^k - y_j)^2`` (a :class:`LinearRegressionTask` on the
    features ``phi_j = (1, u_j, ..., u_j^degree)``): convex but ill-conditioned (the monomials are
    strongly correlated), which is what makes it a useful optimizer test.

    Args: ``degree`` (3), ``n_train`` (100), ``n_val`` (100), ``n_test`` (1000), ``noise_std``
    (0.1; a list is sampled per task), ``coef_std`` (1), ``input_range`` (1), ``batch_size``
    (None: full batch; e.g. 16 for SGD noise), ``init_std`` (0), ``dtype``, ``device``.
    """

    name = "cubic-regression"

    def __init__(
        self,
        *,
        degree: int = 3,
        n_train: int = 100,
        n_val: int = 100,
        n_test: int = 1000,
        noise_std: float | Sequence[float] = 0.1,
        coef_std: float = 1.0,
        input_range: float = 1.0,
        batch_size: int | None = None,
        init_std: float = 0.0,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.config = family_config(locals())
        self.degree, self.sizes = degree, {"train": n_train, "val": n_val, "test": n_test}
        self.noise_std, self.coef_std, self.input_range = noise_std, coef_std, input_range
        self.batch_size, self.init_std = batch_size, init_std
        self.dtype, self.device = resolve_dtype(dtype), torch.device(device)

    def features(self, u: Tensor) -> Tensor:
        """``(1, u, u^2, ..., u^degree)`` for every entry of ``u`` (shape ``(n, degree + 1)``)."""
        return u.unsqueeze(-1) ** torch.arange(self.degree + 1, dtype=u.dtype, device=u.device)

    def sample(self, generator: torch.Generator) -> LinearRegressionTask:
        noise_std = float(sample_choice(self.noise_std, generator))
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        coef = normal((self.degree + 1,), self.coef_std, generator, **kw)
        splits = {}
        for split, n in self.sizes.items():
            phi = self.features(uniform((n,), -self.input_range, self.input_range, generator, **kw))
            splits[split] = (phi, phi @ coef + normal((n,), noise_std, generator, **kw))
        return LinearRegressionTask(
            splits, init_std=self.init_std, batch_size=self.batch_size, name=self.name, coef=coef, noise_std=noise_std
        )


# --------------------------------------------------------------------------------------------------
# The step-size paper's quadratic


class StepSizeQuadraticTask(Task):
    r"""``f(w) = 1/2 w^T H w`` with ``H = X^T X`` (SPEC §5).

    Parameters ``{"w": (d,)}``; the batch is ``{"H": H}`` for every split. ``init_params`` returns
    the task's fixed ``w0`` when it has one (the paper fixes it), else draws ``N(0, I)``.

    Because gradient descent with step ``eta`` gives ``w_t = (I - eta H)^t w0``, the loss after
    ``t`` steps has the closed form (``H = Q diag(lambda) Q^T``, ``c = Q^T w0``)

    .. math:: \log f(w_t) = \operatorname{logsumexp}_i \Big( \log(\tfrac12 \lambda_i c_i^2)
              + 2t \log\lvert 1 - \eta \lambda_i \rvert \Big),

    computed stably in log space by :meth:`gd_log_loss` (differentiable in ``eta``).
    """

    def __init__(self, H: Tensor, w0: Tensor | None, name: str = "stepsize-quadratic") -> None:
        self.H, self.w0, self.name = H, w0, name
        self._eig: tuple[Tensor, Tensor] | None = None

    def init_params(self, generator: torch.Generator) -> Params:
        if self.w0 is not None:
            return {"w": self.w0.clone()}
        return {"w": normal((self.H.shape[0],), 1.0, generator, dtype=self.H.dtype, device=self.H.device)}

    def batch(self, split: str, generator: torch.Generator) -> dict[str, Tensor]:
        check_split(split)
        return {"H": self.H}

    def loss(self, params: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        w = params["w"]
        return 0.5 * w @ (batch["H"] @ w)

    @property
    def eigenvalues(self) -> Tensor:
        """Eigenvalues of ``H`` in ascending order (``torch.linalg.eigh``)."""
        return self._eigh()[0]

    def _eigh(self) -> tuple[Tensor, Tensor]:
        if self._eig is None:
            self._eig = torch.linalg.eigh(self.H)
        return self._eig

    def gd_log_loss(self, eta: Tensor | float, steps: int, w0: Tensor | None = None) -> Tensor:
        """``log f(w_t)`` after ``steps`` gradient-descent steps of size ``eta`` from ``w0``
        (default: the task's ``w0``), by the closed form in the class docstring."""
        lam, Q = self._eigh()
        w0 = self.w0 if w0 is None else w0
        if w0 is None:
            raise ValueError("this task has no fixed w0: pass w0")
        c = Q.T @ w0
        eta = torch.as_tensor(eta, dtype=lam.dtype, device=lam.device)
        tiny = torch.finfo(lam.dtype).tiny
        log_terms = (
            torch.log(0.5 * lam.clamp_min(tiny))
            + torch.log(c.square().clamp_min(tiny))
            + 2 * steps * torch.log((1 - eta * lam).abs().clamp_min(tiny))
        )
        return torch.logsumexp(log_terms, dim=0)


class StepSizeQuadraticFamily(TaskFamily):
    """The 20-d quadratic of the step-size paper (SPEC §5): ``X ~ N(0, 1)^{dim x dim}``, ``H = X^T X``,
    ``w0 ~ N(0, I)`` drawn once per task and fixed (``fixed_init=False``: drawn per ``init_params``).

    Args: ``dim`` (20), ``fixed_init`` (True), ``dtype`` (float32; float64 recommended for the
    closed form), ``device``.
    """

    name = "stepsize-quadratic"

    def __init__(
        self,
        *,
        dim: int = 20,
        fixed_init: bool = True,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.config = family_config(locals())
        self.dim, self.fixed_init = dim, fixed_init
        self.dtype, self.device = resolve_dtype(dtype), torch.device(device)

    def sample(self, generator: torch.Generator) -> StepSizeQuadraticTask:
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        X = normal((self.dim, self.dim), 1.0, generator, **kw)
        w0 = normal((self.dim,), 1.0, generator, **kw) if self.fixed_init else None
        return StepSizeQuadraticTask(X.T @ X, w0, name=self.name)
