r"""How flat is a model's loss where it stands? Hessian trace and top eigenvalue, PGA sharpness, max gradient norm.

All functions measure the loss averaged over a set of batches (weighted by batch size),

.. math:: L(\theta) = \frac{\sum_b n_b L_b(\theta)}{\sum_b n_b},

at the model's *current* weights, without changing them (the model is evaluated functionally with
``torch.func.functional_call``; buffers are copied, so batch-norm running statistics are left alone):

* :func:`hessian_trace`: Hutchinson's estimate :math:`\frac1n\sum_i z_i^\top\nabla^2L\,z_i`, Rademacher
  :math:`z_i`, Hessian-vector products by forward-over-reverse (``jvp`` of ``grad``);
* :func:`hessian_top_eigenvalue`: the eigenvalue of largest magnitude, by power iteration;
* :func:`pga_sharpness`: :math:`\max_{\|\delta\|_\infty\le r} L(\theta+\delta) - L(\theta)` for several
  radii :math:`r`, by projected gradient ascent (the SAM/GSAM property, "Learning Regularizers" §Evaluation);
* :func:`pga_max_grad_norm`: :math:`\max_{\|\delta\|_\infty\le r}\|\nabla L(\theta+\delta)\|` (the GAM property);
* :func:`flatness_report`: all of them in one dict.

Projected gradient ascent (the protocol of the learning-regularizers paper, with its unstated constants
fixed here): start at :math:`\delta_0 = \operatorname{clip}_{[-r,r]}(\sigma r\,\xi)`, :math:`\xi\sim N(0,I)`,
:math:`\sigma` = ``init_fraction`` (0.5); then ``steps`` (10) steps
:math:`\delta \leftarrow \operatorname{clip}_{[-r,r]}(\delta + s\,r\,\operatorname{sign}\nabla_\delta F)` with
:math:`s` = ``step_fraction`` = 0.25 (the :math:`2.5\,r/\text{steps}` step of Madry et al. for 10 steps:
enough to cross the ball twice), the sign being the steepest-ascent direction of the :math:`L_\infty`
norm. The reported value is the largest :math:`F` seen over the start and all iterates.

Usage with an ``nn.Module`` (``loss_fn(outputs, targets)``, batches ``(inputs, targets)``)::

    from learned_optim.bench import flatness
    model.eval()
    flatness.hessian_trace(model, torch.nn.functional.cross_entropy, val_loader, probes=50)
    flatness.pga_sharpness(model, torch.nn.functional.cross_entropy, val_loader)  # {0.001: ..., ..., 0.1: ...}

or functionally, with a dict of tensors and ``loss_fn(params, batch)`` (e.g. a
:class:`learned_optim.tasks.Task`'s ``loss``)::

    flatness.hessian_trace(params, task.loss, [task.batch("val", generator)])

Call ``model.eval()`` first for models with batch norm or dropout: the measures assume a
deterministic loss, and batch-norm running-statistic updates do not compose with ``jvp``. ``data`` is
an iterable of batches (a ``DataLoader``, or a list holding one batch); ``max_batches`` caps how many
are used. ``vectorize=False`` runs the Hutchinson probes one by one for losses ``torch.func.vmap``
cannot batch; ``hvp_mode="reverse"`` takes Hessian-vector products by reverse-over-reverse
(:func:`learned_optim.meta.curvature.hvp`) for models whose operators have no forward-mode derivative
(CPU LSTMs, fused attention, ``nn.Flatten`` of zero tangents).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._numerics import global_norm, seeded_generator
from ..meta import curvature

__all__ = [
    "RADII",
    "PGA_STEPS",
    "STEP_FRACTION",
    "INIT_FRACTION",
    "hessian_trace",
    "hessian_top_eigenvalue",
    "pga_sharpness",
    "pga_max_grad_norm",
    "gradient_norm",
    "flatness_report",
    "FlatnessOptions",
    "task_flatness",
    "frozen_functional",
]

#: Radii of the :math:`L_\infty` balls (the learning-regularizers paper's).
RADII: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1)
#: Projected-gradient-ascent steps.
PGA_STEPS = 10
#: PGA step as a fraction of the radius (2.5 r / PGA_STEPS).
STEP_FRACTION = 0.25
#: Standard deviation of the Gaussian start as a fraction of the radius.
INIT_FRACTION = 0.5

Params = dict[str, Tensor]


# ------------------------------------------------------------------------------------------ objective
@dataclasses.dataclass
class _Objective:
    params: Params
    loss: Callable[[Mapping[str, Tensor], Any], Tensor]
    batches: list[Any]
    weights: list[float]
    hvp_mode: str = "forward"

    def loss_on(self, batch: Any) -> Callable[[Mapping[str, Tensor]], Tensor]:
        """The loss on one batch as a function of the parameters alone (for the ``torch.func`` transforms)."""
        return lambda p: self.loss(p, batch)

    def total(self, params: Mapping[str, Tensor]) -> Tensor:
        """The batch-size-weighted mean loss (one graph over all batches: for small data only)."""
        return sum(w * self.loss(params, b) for w, b in zip(self.weights, self.batches, strict=True))  # type: ignore[return-value]

    def value(self, params: Mapping[str, Tensor]) -> float:
        with torch.no_grad():
            return float(sum(w * float(self.loss(params, b)) for w, b in zip(self.weights, self.batches, strict=True)))

    def grad(self, params: Mapping[str, Tensor]) -> tuple[float, Params]:
        """Loss and gradient, accumulated batch by batch."""
        total, out = 0.0, {k: torch.zeros_like(v) for k, v in params.items()}
        leaf = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        for w, b in zip(self.weights, self.batches, strict=True):
            loss = self.loss(leaf, b)
            grads = torch.autograd.grad(loss, list(leaf.values()), allow_unused=True)
            total += w * float(loss.detach())
            for (k, _), g in zip(leaf.items(), grads, strict=True):
                if g is not None:
                    out[k] += w * g
        return total, out

    def hvp(self, params: Mapping[str, Tensor], vector: Mapping[str, Tensor]) -> Params:
        out = {k: torch.zeros_like(v) for k, v in params.items()}
        for w, b in zip(self.weights, self.batches, strict=True):
            hv = curvature.hvp(self.loss_on(b), params, vector, mode=self.hvp_mode)
            for k in out:
                out[k] += w * hv[k].detach()
        return out


def _batch_size(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, Tensor) and item.dim():
                return int(item.shape[0])
    return 1


def frozen_functional(model: nn.Module) -> tuple[Params, Callable[[Mapping[str, Tensor], Any], Any]]:
    """``model`` as a function of its trainable parameters: ``(params, forward)``, ``params`` its trainable
    parameters now (detached) and ``forward(p, inputs)`` its output at parameters ``p``, with the buffers frozen
    (copied now and never updated: in ``eval()`` mode BatchNorm reads those running statistics), so the loss is
    a deterministic function of ``p`` that any number of probes may evaluate."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def forward(p: Mapping[str, Tensor], inputs: Any) -> Any:
        return functional_call(model, {**buffers, **p}, (inputs,))

    return params, forward


def _objective(
    model: nn.Module | Mapping[str, Tensor],
    loss_fn: Callable[..., Tensor],
    data: Iterable[Any],
    max_batches: int | None,
    hvp_mode: str = "forward",
) -> _Objective:
    batches = list(itertools.islice(iter(data), max_batches)) if max_batches is not None else list(data)
    if not batches:
        raise ValueError("no batches to measure the loss on")
    if isinstance(model, nn.Module):
        params, forward = frozen_functional(model)
        if not params:
            raise ValueError("the model has no trainable parameters")

        def loss(p: Mapping[str, Tensor], batch: Any) -> Tensor:
            return loss_fn(forward(p, batch[0]), batch[1])
    elif isinstance(model, Mapping):
        params = {n: p.detach() for n, p in model.items()}
        loss = loss_fn
    else:
        raise TypeError(f"model must be an nn.Module or a dict of tensors, got {type(model).__name__}")
    sizes = [_batch_size(b) for b in batches]
    total = float(sum(sizes))
    return _Objective(params, loss, batches, [s / total for s in sizes], hvp_mode)


# ------------------------------------------------------------------------------------------ Hessian
def hessian_trace(
    model: nn.Module | Mapping[str, Tensor],
    loss_fn: Callable[..., Tensor],
    data: Iterable[Any],
    *,
    probes: int = 100,
    seed: int = 0,
    max_batches: int | None = None,
    vectorize: bool = True,
    probe_chunk: int = 10,
    hvp_mode: str = "forward",
) -> float:
    r"""Hutchinson estimate of :math:`\operatorname{tr}\nabla^2 L(\theta)` with ``probes`` Rademacher vectors.

    Each probe sees every batch (so the estimate is unbiased for the weighted-mean loss); probes are
    evaluated ``probe_chunk`` at a time with ``vmap`` (``vectorize``). The standard error is
    :math:`\sqrt{2\sum_{i\ne j}H_{ij}^2/n}`: raise ``probes`` for a tighter estimate.
    """
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    obj = _objective(model, loss_fn, data, max_batches, hvp_mode)
    gen = seeded_generator(seed)
    values: list[Tensor] = []
    for start in range(0, probes, probe_chunk):
        n = min(probe_chunk, probes - start)
        zs = {k: curvature.rademacher(v, gen, (n, *v.shape)) for k, v in obj.params.items()}
        chunk = torch.zeros(n, dtype=torch.float64)
        for w, b in zip(obj.weights, obj.batches, strict=True):
            forms = curvature.hutchinson_forms(obj.loss_on(b), obj.params, zs, vectorize=vectorize, mode=hvp_mode)
            chunk += w * forms.detach().double().cpu()
        values.append(chunk)
    return float(torch.cat(values).mean())


def hessian_top_eigenvalue(
    model: nn.Module | Mapping[str, Tensor],
    loss_fn: Callable[..., Tensor],
    data: Iterable[Any],
    *,
    iters: int = 20,
    tol: float = 1e-4,
    seed: int = 0,
    max_batches: int | None = None,
    hvp_mode: str = "forward",
) -> float:
    r"""The Hessian eigenvalue of largest magnitude (signed) by power iteration from a Gaussian start.

    Stops after ``iters`` iterations or when the Rayleigh quotient changes by less than ``tol``
    (relative). Power iteration converges at the rate :math:`|\lambda_2/\lambda_1|` per iteration.
    """
    obj = _objective(model, loss_fn, data, max_batches, hvp_mode)
    gen = seeded_generator(seed)
    start = {k: torch.randn(p.shape, generator=gen).to(p) for k, p in obj.params.items()}
    _, value = curvature.power_iteration(
        lambda v: obj.hvp(obj.params, v),
        start,
        iters,
        norm_of=lambda vec: global_norm(vec.values()),
        rayleigh=lambda hv, v: float(sum(float((hv[k] * v[k]).double().sum()) for k in v)),
        tol=tol,
    )
    return value


# ------------------------------------------------------------------------------------------ PGA
def _start(params: Params, radius: float, init_fraction: float, gen: torch.Generator) -> Params:
    return {
        k: (init_fraction * radius * torch.randn(p.shape, generator=gen)).clamp(-radius, radius).to(p)
        for k, p in params.items()
    }


def _shifted(params: Params, delta: Params) -> Params:
    return {k: params[k] + delta[k] for k in params}


def _ascend(delta: Params, direction: Params, radius: float, step_fraction: float) -> Params:
    step = step_fraction * radius
    return {k: (delta[k] + step * direction[k].sign()).clamp(-radius, radius) for k in delta}


def _projected_ascent(
    params: Params,
    probe: Callable[[Params], tuple[float, Params | None]],
    final: Callable[[Params], float],
    *,
    radii: Sequence[float],
    steps: int,
    step_fraction: float,
    init_fraction: float,
    seed: int,
) -> dict[float, float]:
    r"""The module docstring's projected gradient ascent of :math:`F(\theta+\delta)`, for each radius.

    ``probe(point)`` gives :math:`F` at the point and the ascent direction (``None`` stops the ascent);
    ``final(point)`` gives :math:`F` alone at the last iterate. Returns the largest :math:`F` seen per radius.
    """
    out = {}
    for i, radius in enumerate(radii):
        delta = _start(params, radius, init_fraction, seeded_generator(seed + i))
        best = -math.inf
        for _ in range(steps):
            value, direction = probe(_shifted(params, delta))
            best = max(best, value)
            if direction is None:
                break
            delta = _ascend(delta, direction, radius, step_fraction)
        out[float(radius)] = max(best, final(_shifted(params, delta)))
    return out


def pga_sharpness(
    model: nn.Module | Mapping[str, Tensor],
    loss_fn: Callable[..., Tensor],
    data: Iterable[Any],
    *,
    radii: Sequence[float] = RADII,
    steps: int = PGA_STEPS,
    step_fraction: float = STEP_FRACTION,
    init_fraction: float = INIT_FRACTION,
    seed: int = 0,
    max_batches: int | None = None,
) -> dict[float, float]:
    r"""Largest loss increase :math:`\max_{\|\delta\|_\infty\le r} L(\theta+\delta) - L(\theta)` found by
    projected gradient ascent (see the module docstring), for each radius ``r`` in ``radii``."""
    obj = _objective(model, loss_fn, data, max_batches)
    base = obj.value(obj.params)
    best = _projected_ascent(
        obj.params,
        obj.grad,
        obj.value,
        radii=radii,
        steps=steps,
        step_fraction=step_fraction,
        init_fraction=init_fraction,
        seed=seed,
    )
    return {radius: value - base for radius, value in best.items()}


def gradient_norm(
    model: nn.Module | Mapping[str, Tensor],
    loss_fn: Callable[..., Tensor],
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
) -> float:
    r""":math:`\|\nabla L(\theta)\|_2` at the current weights."""
    obj = _objective(model, loss_fn, data, max_batches)
    return global_norm(obj.grad(obj.params)[1].values())


def pga_max_grad_norm(
    model: nn.Module | Mapping[str, Tensor],
    loss_fn: Callable[..., Tensor],
    data: Iterable[Any],
    *,
    radii: Sequence[float] = RADII,
    steps: int = PGA_STEPS,
    step_fraction: float = STEP_FRACTION,
    init_fraction: float = INIT_FRACTION,
    seed: int = 0,
    max_batches: int | None = None,
    hvp_mode: str = "forward",
) -> dict[float, float]:
    r"""Largest gradient norm :math:`\max_{\|\delta\|_\infty\le r}\|\nabla L(\theta+\delta)\|` found by
    projected gradient ascent, for each radius. The ascent direction is
    :math:`\nabla_\delta\|\nabla L\| = H\nabla L/\|\nabla L\|` (a Hessian-vector product per step)."""
    obj = _objective(model, loss_fn, data, max_batches, hvp_mode)

    def probe(point: Params) -> tuple[float, Params | None]:
        g = obj.grad(point)[1]
        norm = global_norm(g.values())
        return norm, (obj.hvp(point, {k: v / norm for k, v in g.items()}) if norm != 0 else None)

    return _projected_ascent(
        obj.params,
        probe,
        lambda point: global_norm(obj.grad(point)[1].values()),
        radii=radii,
        steps=steps,
        step_fraction=step_fraction,
        init_fraction=init_fraction,
        seed=seed,
    )


# ------------------------------------------------------------------------------------------ reports
def flatness_report(
    model: nn.Module | Mapping[str, Tensor],
    loss_fn: Callable[..., Tensor],
    data: Iterable[Any],
    *,
    radii: Sequence[float] = RADII,
    probes: int = 100,
    iters: int = 20,
    steps: int = PGA_STEPS,
    step_fraction: float = STEP_FRACTION,
    init_fraction: float = INIT_FRACTION,
    seed: int = 0,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Every measure on the same batches: ``loss``, ``grad_norm``, ``hessian_trace``,
    ``hessian_eigenvalue``, ``sharpness@<r>`` and ``max_grad_norm@<r>`` for each radius."""
    batches = list(itertools.islice(iter(data), max_batches)) if max_batches is not None else list(data)
    obj = _objective(model, loss_fn, batches, None)
    pga: dict[str, Any] = {
        "radii": radii,
        "steps": steps,
        "step_fraction": step_fraction,
        "init_fraction": init_fraction,
        "seed": seed,
    }
    report = {
        "loss": obj.value(obj.params),
        "grad_norm": gradient_norm(model, loss_fn, batches),
        "hessian_trace": hessian_trace(model, loss_fn, batches, probes=probes, seed=seed),
        "hessian_eigenvalue": hessian_top_eigenvalue(model, loss_fn, batches, iters=iters, seed=seed),
    }
    report.update({f"sharpness@{r:g}": v for r, v in pga_sharpness(model, loss_fn, batches, **pga).items()})
    report.update({f"max_grad_norm@{r:g}": v for r, v in pga_max_grad_norm(model, loss_fn, batches, **pga).items()})
    return report


@dataclasses.dataclass
class FlatnessOptions:
    """Flatness-at-convergence metrics of the evaluation harness (:func:`learned_optim.bench.evaluate.evaluate`).

    A run's *point of convergence* is its parameters at the first step where the minibatch training
    loss has not improved on its best value for ``patience`` consecutive steps (the learning-regularizers
    paper's criterion, 100); a run that never stalls is measured at its last step. There the harness
    measures, on the task's data: the Hessian trace (``probes`` probes) and top eigenvalue (``iters``
    power iterations) of the loss on ``hessian_batches`` minibatches of ``hessian_split``, and the PGA
    sharpness and max gradient norm for ``radii`` on one batch of ``pga_split`` (the validation split,
    as in the paper). ``metrics`` selects among ``hessian_trace``, ``hessian_eigenvalue``,
    ``sharpness`` and ``max_grad_norm``. ``hvp_mode`` and ``vectorize`` are :func:`hessian_trace`'s.
    """

    patience: int = 100
    probes: int = 20
    iters: int = 20
    radii: tuple[float, ...] = RADII
    steps: int = PGA_STEPS
    step_fraction: float = STEP_FRACTION
    init_fraction: float = INIT_FRACTION
    hessian_split: str = "train"
    hessian_batches: int = 4
    pga_split: str = "val"
    seed: int = 0
    metrics: tuple[str, ...] = ("hessian_trace", "hessian_eigenvalue", "sharpness", "max_grad_norm")
    hvp_mode: str = "forward"
    vectorize: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - {"hessian_trace", "hessian_eigenvalue", "sharpness", "max_grad_norm"})
        if unknown:
            raise ValueError(f"unknown flatness metric(s) {unknown}")
        if self.patience < 1:
            raise ValueError("patience must be >= 1")
        if self.hvp_mode not in curvature.HVP_MODES:
            raise ValueError(f"hvp_mode must be one of {curvature.HVP_MODES}, got {self.hvp_mode!r}")
        self.radii = tuple(float(r) for r in self.radii)
        self.metrics = tuple(self.metrics)


def task_flatness(
    task: Any, params: Mapping[str, Tensor], options: FlatnessOptions, generator: torch.Generator
) -> dict[str, float]:
    """The :class:`FlatnessOptions` metrics of a :class:`~learned_optim.tasks.Task` at ``params``
    (batches drawn from ``generator``)."""
    params = {k: v.detach() for k, v in params.items()}
    out: dict[str, float] = {}
    o = options
    if {"hessian_trace", "hessian_eigenvalue"} & set(o.metrics):
        batches = [task.batch(o.hessian_split, generator) for _ in range(o.hessian_batches)]
        if "hessian_trace" in o.metrics:
            out["hessian_trace"] = hessian_trace(
                params, task.loss, batches, probes=o.probes, seed=o.seed, vectorize=o.vectorize, hvp_mode=o.hvp_mode
            )
        if "hessian_eigenvalue" in o.metrics:
            out["hessian_eigenvalue"] = hessian_top_eigenvalue(
                params, task.loss, batches, iters=o.iters, seed=o.seed, hvp_mode=o.hvp_mode
            )
    if {"sharpness", "max_grad_norm"} & set(o.metrics):
        batches = [task.batch(o.pga_split, generator)]
        pga: dict[str, Any] = {
            "radii": o.radii,
            "steps": o.steps,
            "step_fraction": o.step_fraction,
            "init_fraction": o.init_fraction,
            "seed": o.seed,
        }
        if "sharpness" in o.metrics:
            out.update({f"sharpness@{r:g}": v for r, v in pga_sharpness(params, task.loss, batches, **pga).items()})
        if "max_grad_norm" in o.metrics:
            out.update(
                {
                    f"max_grad_norm@{r:g}": v
                    for r, v in pga_max_grad_norm(params, task.loss, batches, hvp_mode=o.hvp_mode, **pga).items()
                }
            )
    return out
