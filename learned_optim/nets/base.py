"""The contract every learned update rule follows, and the registry of net families.

An update rule is an ``nn.Module`` applied independently to every scalar coordinate of the
parameters it optimizes. It defines its update exactly once, in :meth:`UpdateRule.forward`::

    delta, new_state = rule(grad, param, state, step, stats)      # theta <- theta + lr * delta

with ``grad``/``param`` flat ``(n,)`` tensors, ``state`` a dict of per-coordinate tensors whose
leading axis is ``n``, ``step`` the 1-based step count of the tensor (0-d float tensor) and ``stats``
what :meth:`UpdateRule.tensor_stats` computed over the *whole* tensor (``None`` for nets whose
features are purely per coordinate). Two callers share it:

* :class:`learned_optim.LearnedOptimizer` calls it in place under ``no_grad`` over chunks of
  coordinates (``stats`` computed once per tensor, so chunking never changes the result), passing
  ``out_state=``: views of its own state storage into which the rule *may* write the new state (they
  alias ``state``: a rule that uses them reads each coordinate's state before writing it) and then
  return them, which saves copying the new state back; rules may ignore it;
* meta-training calls :func:`functional_update`, i.e. the same ``forward`` through
  ``torch.func.functional_call`` with the net's weights as explicit, differentiable inputs.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._validation import check_value

__all__ = ["NetConfig", "UpdateRule", "FAMILIES", "register_family", "build_rule", "functional_update"]


@dataclasses.dataclass
class NetConfig:
    """Hyperparameters of a net family. Subclasses are dataclasses; every field goes to config.json."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> NetConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        converted = {k: check_value(f"{cls.__name__}.{k}", hints.get(k), v) for k, v in values.items()}
        return cls(**converted)


class UpdateRule(nn.Module):
    """Base class of the coordinatewise update rules (see the module docstring for the contract)."""

    #: Name of the family in config.json and in :data:`FAMILIES`.
    family: ClassVar[str]
    #: The :class:`NetConfig` subclass holding this family's hyperparameters.
    config_class: ClassVar[type[NetConfig]]
    #: Set by :func:`learned_optim.from_pretrained`: the checkpoint the net was loaded from (for ``save_pretrained``).
    pretrained_origin: dict[str, Any]
    #: Appended to by :func:`learned_optim.adapt`: one record per adaptation of the net.
    adaptations: list[dict[str, Any]]

    def __init__(self, config: NetConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None:
            config = self.config_class(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the net runs in: that of its weights (float32 unless converted)."""
        return next(self.parameters()).dtype

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Trailing shape of each per-coordinate state tensor (the leading axis is the coordinate)."""
        raise NotImplementedError

    def init_state(
        self, numel: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> dict[str, Tensor]:
        """Fresh per-coordinate state for a tensor of ``numel`` coordinates (all zeros)."""
        return {k: torch.zeros((numel, *shape), device=device, dtype=dtype) for k, shape in self.state_shapes().items()}

    def tensor_stats(self, grad: Tensor, param: Tensor, state: Mapping[str, Tensor], step: Tensor) -> Tensor | None:
        """Per-tensor statistics the per-coordinate update needs (default: none).

        Must be a mean over the tensor's coordinates (of any per-coordinate quantity): the optimizer
        combines the shards of an FSDP2-sharded tensor as the size-weighted mean of their statistics.
        """
        return None

    def forward(
        self,
        grad: Tensor,
        param: Tensor,
        state: Mapping[str, Tensor],
        step: Tensor,
        stats: Tensor | None = None,
        out_state: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items())


FAMILIES: dict[str, type[UpdateRule]] = {}


def register_family(cls: type[UpdateRule]) -> type[UpdateRule]:
    """Class decorator adding a net family to :data:`FAMILIES` under ``cls.family``."""
    if cls.family in FAMILIES:
        raise ValueError(f"net family {cls.family!r} is already registered")
    FAMILIES[cls.family] = cls
    return cls


def build_rule(family: str, config: Mapping[str, Any] | None = None) -> UpdateRule:
    """Instantiate a registered net family from a config mapping (unknown keys are an error)."""
    try:
        cls = FAMILIES[family]
    except KeyError:
        raise ValueError(f"unknown net family {family!r}; known families: {sorted(FAMILIES)}") from None
    return cls(cls.config_class.from_dict(config or {}))


def functional_update(
    rule: UpdateRule,
    weights: Mapping[str, Tensor] | None,
    grad: Tensor,
    param: Tensor,
    state: Mapping[str, Tensor],
    step: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The update of a whole tensor with the net's weights given explicitly (meta-training caller).

    ``weights=None`` uses the module's own parameters. Differentiable in ``weights``, ``grad``,
    ``param`` and ``state``.
    """
    stats = rule.tensor_stats(grad, param, state, step)
    if weights is None:
        return rule(grad, param, state, step, stats)
    return functional_call(rule, dict(weights), (grad, param, state, step, stats))
