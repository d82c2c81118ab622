"""A mixture of task families, for a richer meta-training distribution than one fixed task."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import Task, TaskFamily

__all__ = ["MixtureFamily", "DEFAULT_MLP_MIX"]

#: Default components: MLP classifiers on digits (batch 128) with 1 or 2 hidden layers of width
#: 10, 20 or 40 and sigmoid, ReLU or tanh activations (18 architectures around MLP-20-sigmoid).
DEFAULT_MLP_MIX: tuple[dict[str, Any], ...] = tuple(
    {"name": "mlp", "hidden_sizes": (width,) * depth, "activation": act}
    for width, depth, act in itertools.product((10, 20, 40), (1, 2), ("sigmoid", "relu", "tanh"))
)

ComponentSpec = TaskFamily | str | Mapping[str, Any]


class MixtureFamily(TaskFamily):
    """Sample a component family (probability proportional to ``weights``), then a task from it.

    Args:
        components: families, given as :class:`TaskFamily` instances, registry names, or dicts
            ``{"name": <registry name>, **config}``. Default :data:`DEFAULT_MLP_MIX`.
        weights: relative sampling weights (default uniform).
        **shared: extra constructor arguments passed to every component given by name or dict
            (e.g. ``dataset="mnist", data_root=...``, ``dtype=...``); a component's own dict wins.

    Sampled tasks keep their component's name (e.g. ``"digits-mlp40x40-tanh"``).
    """

    name = "mixture"

    def __init__(
        self,
        *,
        components: Sequence[ComponentSpec] | None = None,
        weights: Sequence[float] | None = None,
        **shared: Any,
    ) -> None:
        from .registry import make_family

        specs = list(DEFAULT_MLP_MIX if components is None else components)
        if not specs:
            raise ValueError("a mixture needs at least one component")
        self.components: list[TaskFamily] = []
        for spec in specs:
            if isinstance(spec, TaskFamily):
                self.components.append(spec)
            elif isinstance(spec, str):
                self.components.append(make_family(spec, **shared))
            else:
                spec = dict(spec)
                self.components.append(make_family(spec.pop("name"), **{**shared, **spec}))
        w = (
            torch.ones(len(specs), dtype=torch.float64)
            if weights is None
            else torch.as_tensor(weights, dtype=torch.float64)
        )
        if w.shape != (len(specs),) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"weights must be {len(specs)} non-negative numbers, not all 0; got {weights}")
        self.weights = w / w.sum()
        self.config = {
            "components": [{"name": c.name, **getattr(c, "config", {})} for c in self.components],
            "weights": None if weights is None else [float(v) for v in weights],
        }

    def sample(self, generator: torch.Generator) -> Task:
        index = int(torch.multinomial(self.weights, 1, generator=generator))
        return self.components[index].sample(generator)
