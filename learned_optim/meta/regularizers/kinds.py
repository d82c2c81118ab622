"""The regularizer kinds (one class per ``kind`` of a config block: its settings, defaults and term) and the
parsing of config blocks (see :mod:`learned_optim.meta.regularizers`)."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..._validation import check_value, positive_finite
from ..curvature import HVP_MODES, LossFn
from ..unroll import StepInputs
from .smoothing import smoothing_term
from .terms import (
    gam_term,
    gsam_term,
    hutchinson_trace,
    jacobian_trace,
    local_entropy_mean,
    local_entropy_surrogate,
    sam_term,
    top_eigenvalue,
)


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


def _check_hvp(mode: str) -> None:
    if mode not in HVP_MODES:
        raise ValueError(f"hvp must be one of {HVP_MODES}")


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
        _check_hvp(self.hvp)

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
    hvp: str = "forward"

    def check(self) -> None:
        if self.iters < 1:
            raise ValueError("iters must be >= 1")
        _check_hvp(self.hvp)

    def term(self, loss_fn, params, *, inputs, generator):
        return top_eigenvalue(
            loss_fn, params, self.iters, generator=generator, absolute=self.absolute, hvp_mode=self.hvp
        )


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
        if not (
            positive_finite(self.gamma) and self.steps >= 1 and 0 <= self.ema <= 1 and 0 <= self.burn_in < self.steps
        ):
            raise ValueError("need a finite gamma > 0, steps >= 1, 0 <= ema <= 1 and 0 <= burn_in < steps")
        if not positive_finite(self.lr) or not (math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError("need a finite lr > 0 and a finite noise >= 0")

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
        if not positive_finite(self.rho):
            raise ValueError("rho must be positive and finite")

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
        if not positive_finite(self.rho) or not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError("need a finite rho > 0 and a finite alpha >= 0")

    def term(self, loss_fn, params, *, inputs, generator):
        return gsam_term(loss_fn, params, self.rho, self.alpha)


@dataclasses.dataclass
class GAMRegularizer(Regularizer):
    """First-order flatness (:func:`gam_term`)."""

    kind = "gam"
    default_where = "final"
    rho: float = 0.2
    hvp: str = "forward"

    def check(self) -> None:
        if not positive_finite(self.rho):
            raise ValueError("rho must be positive and finite")
        _check_hvp(self.hvp)

    def term(self, loss_fn, params, *, inputs, generator):
        return gam_term(loss_fn, params, self.rho, hvp_mode=self.hvp)


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
        finite = all(math.isfinite(x) for x in (self.epsilon, self.step_fraction, self.init_std))
        if not finite or not self.epsilon > 0 or self.steps < 0 or not self.step_fraction > 0 or self.init_std < 0:
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


#: Where in the trajectory a block applies.
WHERE = ("posterior", "all", "final", "segment_end")


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
    if every > 1 and place in ("final", "segment_end"):  # (it applied only where both chose a step: maybe never)
        raise ValueError(f"{where}: every applies to where: all or posterior; where: {place} already picks its points")
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
