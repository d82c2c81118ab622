"""The registry of task families: name -> class, and :func:`make_family`."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch

from .base import TaskFamily
from .distribution import MetaMixFamily
from .mixture import MixtureFamily
from .neural import PRESETS, ConvFamily, MLPFamily, ResNetFamily, TimmFamily
from .synthetic import (
    LassoFamily,
    LeastSquaresFamily,
    PolynomialRegressionFamily,
    QuadraticFamily,
    RosenbrockFamily,
    StepSizeQuadraticFamily,
)

__all__ = ["TASK_FAMILIES", "register_family", "make_family", "make_task_family"]

#: Every task family by name. Presets (e.g. ``"digits-mlp20-sigmoid"``) are subclasses of a base
#: family with other defaults.
TASK_FAMILIES: dict[str, type[TaskFamily]] = {}


def register_family(cls: type[TaskFamily]) -> type[TaskFamily]:
    """Add ``cls`` to :data:`TASK_FAMILIES` under ``cls.name`` (usable as a class decorator)."""
    existing = TASK_FAMILIES.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"task family name {cls.name!r} is already registered to {existing.__name__}")
    TASK_FAMILIES[cls.name] = cls
    return cls


_BUILT_IN: tuple[type[TaskFamily], ...] = (
    QuadraticFamily,
    LassoFamily,
    RosenbrockFamily,
    LeastSquaresFamily,
    PolynomialRegressionFamily,
    StepSizeQuadraticFamily,
    MLPFamily,
    ConvFamily,
    ResNetFamily,
    TimmFamily,
    MixtureFamily,
    MetaMixFamily,
    *PRESETS.values(),
)
for _cls in _BUILT_IN:
    register_family(_cls)


def make_family(name: str, **config: Any) -> TaskFamily:
    """Build the task family ``name`` with constructor arguments ``config``: the one resolution of task
    names, for meta-training, MAML and the evaluation harness alike.

    ``name`` is a family registered in :data:`TASK_FAMILIES`, or ``"module:attr"``, a factory importable
    from ``module`` (``attr`` may be dotted) that returns a :class:`TaskFamily`.

    >>> family = make_family("lasso", sigma=(10.0, 25.0))
    >>> task = family.sample(torch.Generator().manual_seed(0))  # doctest: +SKIP
    """
    if ":" in name:
        module, _, attr = name.partition(":")
        factory: Any = importlib.import_module(module)
        for part in attr.split("."):
            factory = getattr(factory, part)
        result = factory(**config)
        if not isinstance(result, TaskFamily):
            raise TypeError(f"task family {name!r} built a {type(result).__name__}, not a TaskFamily")
        return result
    try:
        cls = TASK_FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown task family {name!r}; registered: {sorted(TASK_FAMILIES)}") from None
    return cls(**config)


def make_task_family(
    family: str,
    kwargs: Mapping[str, Any] | None = None,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> TaskFamily:
    """:func:`make_family` (a registered name or ``"module:attr"``) on a device and dtype (meta-training's).

    For registry families, a non-CPU ``device`` and a non-float32 ``dtype`` are passed on as the
    family's ``device``/``dtype`` arguments unless ``kwargs`` sets them (so the task data lives where
    the unroll runs); ``"module:attr"`` factories get ``kwargs`` only.
    """
    kwargs = dict(kwargs or {})
    if ":" not in family:
        if device is not None and device.type != "cpu":
            kwargs.setdefault("device", str(device))
        if dtype is not None and dtype != torch.float32:
            kwargs.setdefault("dtype", str(dtype).removeprefix("torch."))
    return make_family(family, **kwargs)
