"""Small helpers shared by the task families: seeded sampling, dtypes, split checks, configs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import SPLITS

__all__ = [
    "child_seed",
    "seeded_global_rng",
    "sample_choice",
    "normal",
    "uniform",
    "resolve_dtype",
    "check_split",
    "family_config",
]


def child_seed(generator: torch.Generator) -> int:
    """A 62-bit seed drawn from ``generator`` (advances it by one draw)."""
    return int(torch.randint(0, 2**62, (), generator=generator))


@contextlib.contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Run a block with the global CPU RNG seeded to ``seed``, restoring the caller's RNG state after.

    This is how code that only knows the global RNG (``nn.Module`` default initialisers, timm's
    constructors) is made to draw from a task's ``torch.Generator`` without side effects.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_functional_module(
    build: Callable[[], nn.Module], seed: int, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """The module ``build()`` makes under ``seed``, made a pure function of its parameters for ``functional_call``.

    BatchNorm layers use batch statistics only (no running buffers to update); every module is in eval mode
    (no dropout), except recurrent layers without dropout, whose mode changes nothing but which cuDNN
    differentiates only in training mode.
    """
    with seeded_global_rng(seed):
        module = build()
    torch.func.replace_all_batch_norm_modules_(module)
    module.to(device=device, dtype=dtype).eval()
    for layer in module.modules():
        if isinstance(layer, nn.RNNBase) and layer.dropout == 0:
            layer.train()
    return module


def sample_choice(value: Any, generator: torch.Generator) -> Any:
    """``value`` itself if it is a scalar; a uniformly drawn element if it is a list or tuple."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("cannot sample from an empty list")
        return value[int(torch.randint(len(value), (), generator=generator))]
    return value


def normal(
    shape: Sequence[int],
    std: float | Tensor,
    generator: torch.Generator,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    mean: float = 0.0,
) -> Tensor:
    """``mean + std * N(0, 1)`` of ``shape``, drawn on the CPU from ``generator`` then moved."""
    z = torch.randn(tuple(shape), generator=generator, dtype=dtype)
    return (mean + std * z).to(device)


def uniform(
    shape: Sequence[int],
    low: float,
    high: float,
    generator: torch.Generator,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> Tensor:
    """``U[low, high)`` of ``shape``, drawn on the CPU from ``generator`` then moved."""
    u = torch.rand(tuple(shape), generator=generator, dtype=dtype)
    return (low + (high - low) * u).to(device)


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept ``torch.float64`` as well as ``"float64"`` / ``"torch.float64"`` (JSON configs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"not a floating dtype: {dtype!r}")
    return resolved


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def family_config(frame_locals: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of a family, from ``locals()`` at the top of its ``__init__``.

    dtypes and devices become strings, so the dict is JSON-serialisable when the arguments are and
    ``make_family(family.name, **family.config)`` rebuilds the family.
    """

    def plain(v: Any) -> Any:
        if isinstance(v, torch.dtype):
            return str(v).removeprefix("torch.")
        if isinstance(v, torch.device):
            return str(v)
        return v

    return {k: plain(v) for k, v in frame_locals.items() if k not in ("self", "__class__") and not k.startswith("_")}
