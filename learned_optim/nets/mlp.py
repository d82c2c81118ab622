"""The MLP optimizer of Metz et al. (2019): per-coordinate features, a small MLP, no RNN state."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from .. import kernels
from ..features import STATS_BLOCK, blocked_mean_square, ema, rsqrt_features, time_features
from .base import NetConfig, Segments, UpdateRule, register_family
from .cells import inplace_allowed

__all__ = ["MLPConfig", "MLPUpdate"]


@dataclasses.dataclass
class MLPConfig(NetConfig):
    hidden_size: int = 32
    num_hidden_layers: int = 1
    decays: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999, 0.9999)
    time_scales: tuple[float, ...] = (3, 10, 30, 100, 300, 1000, 3000, 1e4, 3e5)
    moment_eps: float = 1e-6
    rms_eps: float = 1e-5
    step_scale: float = 1e-3
    magnitude_scale: float = 1e-3


@register_family
class MLPUpdate(UpdateRule):
    r"""Feature MLP with a direction/magnitude output.

    For each EMA decay :math:`\beta_j`: :math:`m_j \leftarrow \mathrm{ema}_{\beta_j}(m_j, g)`,
    :math:`v_j \leftarrow \mathrm{ema}_{\beta_j}(v_j, g^2)`. The coordinate features
    :math:`u = [g, \theta, m_j, v_j, m_j/\sqrt{v_j+\epsilon}, 1/\sqrt{v_j+\epsilon}]` are each divided by
    their RMS over the tensor, :math:`u_f / \sqrt{\overline{u_f^2} + \epsilon_{rms}}`, and joined with
    the time features :math:`\tanh(t/s - 1)`. The MLP outputs :math:`(d, a)` and

    .. math:: \Delta\theta = -\,d\,\exp(\lambda_a a)\,\lambda_s

    with :math:`\lambda_a` = ``magnitude_scale`` and :math:`\lambda_s` = ``step_scale``. State per
    coordinate: ``m`` and ``v`` of shape ``(len(decays),)``.
    """

    family = "mlp"
    config_class = MLPConfig
    config: MLPConfig
    decay: Tensor  # buffer
    packs_segments = True

    def __init__(self, config: MLPConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        c = self.config
        layers: list[nn.Module] = []
        width = self.num_features
        for _ in range(c.num_hidden_layers):
            layers += [nn.Linear(width, c.hidden_size), nn.ReLU()]
            width = c.hidden_size
        layers.append(nn.Linear(width, 2))
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("decay", torch.tensor(c.decays, dtype=torch.float32), persistent=False)

    @property
    def num_coordinate_features(self) -> int:
        return 2 + 4 * len(self.config.decays)

    @property
    def num_features(self) -> int:
        return self.num_coordinate_features + len(self.config.time_scales)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"m": (len(self.config.decays),), "v": (len(self.config.decays),)}

    def _coordinate_features(self, grad: Tensor, param: Tensor, m: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Un-normalised features and the updated moments, feature-major.

        Returns the features ``(2 + 4D, n)`` and ``m, v`` as ``(D, n)`` (transposes of the ``(n, D)``
        state): every feature is a contiguous row, so the elementwise ops run over long contiguous
        runs instead of ``n`` rows of ``D`` values each, and the first layer is one ``W @ features`` GEMM.
        """
        decay = self.decay.to(grad.dtype).unsqueeze(1)
        m = ema(m.t(), grad, decay)
        v = ema(v.t(), grad.square(), decay)
        ratio, rsqrt = rsqrt_features(m, v, self.config.moment_eps)
        return torch.cat([grad.unsqueeze(0), param.unsqueeze(0), m, v, ratio, rsqrt]), m, v

    def tensor_stats(self, grad: Tensor, param: Tensor, state: Mapping[str, Tensor], step: Tensor) -> Tensor:
        """Mean square of each coordinate feature over the whole tensor, shape ``(2 + 4D,)``."""
        dtype = self.compute_dtype
        if inplace_allowed(grad, param, state["m"]) and dtype == torch.float32:
            fused = kernels.mlp_feature_mean_square(
                grad, param, state["m"], state["v"], self.decay, self.config.moment_eps
            )
            if fused is not None:
                return fused.to(grad.device)

        def features_of(block: slice) -> Tensor:
            return self._coordinate_features(
                grad[block].to(dtype), param[block].to(dtype), state["m"][block].to(dtype), state["v"][block].to(dtype)
            )[0]

        return blocked_mean_square(features_of, grad.shape[0])

    def segment_stats(
        self, grad: Tensor, param: Tensor, state: Mapping[str, Tensor], step: Tensor, segments: Segments
    ) -> Tensor | None:
        """:meth:`tensor_stats` of each packed segment, ``(k, 2 + 4D)``, with the bits of the per-tensor call:
        the native kernel per segment, or on ATen the packed features squared once and summed per segment
        (segments are shorter than :data:`~learned_optim.features.STATS_BLOCK`: one block, as per tensor)."""
        dtype = self.compute_dtype
        if inplace_allowed(grad, param, state["m"]) and dtype == torch.float32:
            fused = kernels.mlp_feature_mean_square(
                grad, param, state["m"], state["v"], self.decay, self.config.moment_eps, sizes=segments.sizes
            )
            if fused is not None:
                return fused.to(grad.device)
        if max(segments.sizes) > STATS_BLOCK:
            return super().segment_stats(grad, param, state, step, segments)
        features = self._coordinate_features(
            grad.to(dtype), param.to(dtype), state["m"].to(dtype), state["v"].to(dtype)
        )[0]
        squares = features.square()
        sums = torch.stack([squares[:, s].sum(dim=1) for s in segments.slices()])
        return sums / torch.tensor(segments.sizes, dtype=sums.dtype, device=sums.device).unsqueeze(1)

    def forward(
        self,
        grad: Tensor,
        param: Tensor,
        state: Mapping[str, Tensor],
        step: Tensor,
        stats: Tensor | None = None,
        out_state: Mapping[str, Tensor] | None = None,
        segments: Segments | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if stats is None:
            raise ValueError("MLPUpdate needs the per-tensor statistics from tensor_stats()")
        c = self.config
        # First layer on [u / rms(u), time features]: the per-tensor scaling is folded into its weight
        # columns and the (per-tensor constant) time features into its bias, so the GEMM runs on the
        # raw coordinate features (same math; no normalised or time-feature copies of the batch). Packed
        # tensors (``segments``): one folded weight per segment, (k, H, F). The ATen path scales the
        # features instead (per row: the same bits for a tensor alone and in a pack, one GEMM per pack).
        first, k = cast(nn.Linear, self.mlp[0]), self.num_coordinate_features
        times = time_features(step, c.time_scales).to(first.weight.dtype)
        scale = torch.rsqrt(stats + c.rms_eps)
        weight = first.weight[:, :k] * (scale if segments is None else scale.unsqueeze(1))
        bias = first.bias + torch.mv(first.weight[:, k:], times)
        *hidden, last = list(self.mlp)[1:]
        last = cast(nn.Linear, last)
        if c.num_hidden_layers == 1 and inplace_allowed(grad, param, state["m"], weight):
            fused = kernels.mlp_update(
                grad,
                param,
                state["m"],
                state["v"],
                self.decay,
                c.moment_eps,
                weight,
                bias,
                last.weight,
                last.bias,
                c.magnitude_scale,
                c.step_scale,
                out=out_state,
                sizes=None if segments is None else segments.sizes,
            )
            if fused is not None:
                return fused[0], {"m": fused[1], "v": fused[2]}
        features, m, v = self._coordinate_features(grad, param, state["m"], state["v"])
        features = features * (scale.unsqueeze(1) if segments is None else segments.expand(scale).t())
        x = torch.addmm(bias, features.t(), first.weight[:, :k].t())  # (n, H); BLAS reads it feature-major
        inplace = inplace_allowed(grad, x)
        for layer in hidden:
            x = (x.relu_() if inplace else torch.relu(x)) if isinstance(layer, nn.ReLU) else layer(x)
        # the 2-output layer as (2, H) @ (H, n): several times faster than (n, H) @ (H, 2) in MKL
        direction, magnitude = torch.addmm(last.bias.unsqueeze(1), last.weight, x.t())
        delta = -direction * torch.exp(c.magnitude_scale * magnitude) * c.step_scale
        return delta, {"m": m.t(), "v": v.t()}
