"""Registers every zoo optimizer in timm's optimizer registry (when timm is importable).

After ``import learned_optim``, ``timm.optim.create_optimizer_v2(model, learned_optim.FLAGSHIP, lr=1e-3,
weight_decay=0.05)`` (AdamW's lr and weight decay) builds the learned optimizer with timm's parameter grouping (no
weight decay on biases and norms).
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..optimizer import LearnedOptimizer

__all__ = ["register_timm_optimizers"]


def _zoo_optimizer(name: str, params: Any, lr: float | None = None, **kwargs: Any) -> LearnedOptimizer:
    from ..hub import from_pretrained

    if lr is not None:
        kwargs["lr"] = lr
    return from_pretrained(name, params, **kwargs)


def register_timm_optimizers() -> list[str]:
    """Register the bundled zoo entries with timm; returns the names registered (empty without timm)."""
    try:
        from timm.optim._optim_factory import OptimInfo, default_registry
    except ImportError:
        return []
    from ..hub import CheckpointError, list_pretrained

    try:
        entries = list_pretrained()
    except CheckpointError as err:  # a broken bundled entry must not break `import learned_optim`
        warnings.warn(f"learned_optim zoo not registered with timm: {err}", RuntimeWarning, stacklevel=2)
        return []
    registered = []
    for entry in entries:
        name = entry["name"]
        if "_" in name:  # timm splits optimizer names on "_"
            continue
        if name.lower() in default_registry.list_optimizers():  # timm stores names lower-cased
            continue
        factory = functools.partial(_zoo_optimizer, name)
        default_registry.register(
            OptimInfo(
                name=name,
                opt_class=factory,  # type: ignore[arg-type]  # timm calls opt_class(params, **kwargs): any factory
                has_eps=False,
                description=entry.get("description") or f"learned_optim {entry['family']} learned optimizer",
            )
        )
        registered.append(name)
    return registered
