"""Input features shared by the optimizer nets.

Every function here is pure, elementwise over coordinates (or a reduction over one tensor) and
differentiable, so the same code serves the in-place optimizer step and the functional unrolls of
meta-training. Nets import these; no net defines its own copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "log_and_sign",
    "ema",
    "bias_corrected",
    "adam_ratio_features",
    "rsqrt_features",
    "time_features",
    "blocked_mean_square",
    "STATS_BLOCK",
]

#: Block length of per-tensor reductions. Reductions are always summed block by block with this
#: length, so a statistic is bit-identical whatever chunk size the runtime applies the net with.
STATS_BLOCK = 1 << 16


def log_and_sign(grad: Tensor, k: float = 5.0, eps: float = 1e-20) -> Tensor:
    r"""Andrychowicz et al. (2016) gradient preprocessing, two features per coordinate.

    .. math::
        \Big[\max\big(\tfrac{\log(|g| + \epsilon)}{k}, -1\big),\;
        \operatorname{clip}(g\,e^{k}, -1, 1)\Big]

    Returns a tensor of shape ``grad.shape + (2,)``.
    """
    magnitude = torch.clamp(torch.log(grad.abs() + eps) / k, min=-1.0)
    sign = torch.clamp(grad * math.exp(k), -1.0, 1.0)
    return torch.stack([magnitude, sign], dim=-1)


def ema(average: Tensor, value: Tensor, decay: float | Tensor) -> Tensor:
    r"""Exponential moving average :math:`a \leftarrow \beta a + (1-\beta) x` (out of place)."""
    return average * decay + value * (1.0 - decay)


def bias_corrected(average: Tensor, decay: float, step: Tensor) -> Tensor:
    r"""Adam's bias correction :math:`\hat a = a / (1 - \beta^t)` for step count ``t >= 1``."""
    return average / (1.0 - decay**step)


def adam_ratio_features(m_hat: Tensor, v_hat: Tensor, grad: Tensor, eps: float = 1e-8) -> Tensor:
    r"""RNNProp inputs :math:`[\hat m/(\sqrt{\hat v}+\epsilon),\; g/(\sqrt{\hat v}+\epsilon)]`."""
    denom = v_hat.sqrt() + eps
    return torch.stack([m_hat / denom, grad / denom], dim=-1)


def rsqrt_features(m: Tensor, v: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    r"""Metz et al. (2019) moment features :math:`m/\sqrt{v+\epsilon}` and :math:`1/\sqrt{v+\epsilon}`."""
    rs = torch.rsqrt(v + eps)
    return m * rs, rs


def time_features(step: Tensor, scales: Sequence[float]) -> Tensor:
    r"""Training-time features :math:`\tanh(t/s - 1)` for each timescale ``s`` (shape ``(len(scales),)``)."""
    s = torch.as_tensor(scales, dtype=torch.float32, device=step.device)
    return torch.tanh(step.to(torch.float32) / s - 1.0)


def blocked_mean_square(features_of: Callable[[slice], Tensor], numel: int) -> Tensor:
    r"""Mean of squares over coordinates, :math:`\frac1n\sum_i x_i^2`, of features made block by block.

    ``features_of(slice)`` returns the features of the coordinates in the slice feature-major, shape
    ``(F, block)`` (each feature a contiguous row, so the sum is a fast inner-dimension reduction); the
    result has shape ``(F,)``. Blocks are always :data:`STATS_BLOCK` long, so the statistic is
    bit-identical however callers chunk the tensor, and transient memory is bounded by one block.
    """
    total = None
    for start in range(0, numel, STATS_BLOCK):
        part = features_of(slice(start, min(start + STATS_BLOCK, numel))).square().sum(dim=1)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("cannot take statistics of an empty tensor")
    return total / numel
