"""RNNProp (Lv et al., 2017): an LSTM over Adam-normalised inputs; the optimizer of M-L2O."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import kernels
from ..features import adam_ratio_features, bias_corrected, ema
from .base import NetConfig, Segments, UpdateRule, register_family
from .cells import inplace_allowed, lstm_cell

__all__ = ["RNNPropConfig", "RNNProp"]


@dataclasses.dataclass
class RNNPropConfig(NetConfig):
    hidden_size: int = 20
    beta1: float = 0.95
    beta2: float = 0.95
    eps: float = 1e-8
    output_scale: float = 0.01


@register_family
class RNNProp(UpdateRule):
    r"""Adam-style moments fed through Linear+ELU, one LSTM cell, Linear and tanh.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        \hat m = \tfrac{m}{1-\beta_1^t},\ \hat v = \tfrac{v}{1-\beta_2^t}

        x = \mathrm{ELU}\Big(A\Big[\tfrac{\hat m}{\sqrt{\hat v}+\epsilon},
        \tfrac{g}{\sqrt{\hat v}+\epsilon}\Big]\Big),\quad
        (h, c) \leftarrow \mathrm{LSTM}(x, (h, c)),\quad \Delta\theta = s\,\tanh(W h + b)

    State per coordinate: ``m``, ``v`` (scalars) and ``lstm`` of shape ``(2, hidden_size)``.
    """

    family = "rnnprop"
    config_class = RNNPropConfig
    config: RNNPropConfig
    packs_segments = True

    def __init__(self, config: RNNPropConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        c = self.config
        self.input = nn.Linear(2, c.hidden_size)
        self.cell = nn.LSTMCell(c.hidden_size, c.hidden_size)
        self.head = nn.Linear(c.hidden_size, 1)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"m": (), "v": (), "lstm": (2, self.config.hidden_size)}

    def forward(
        self,
        grad: Tensor,
        param: Tensor,
        state: Mapping[str, Tensor],
        step: Tensor,
        stats: Tensor | None = None,
        out_state: Mapping[str, Tensor] | None = None,
        segments: Segments | None = None,  # coordinatewise: packed tensors need nothing per segment
    ) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.config
        m = ema(state["m"], grad, c.beta1)
        v = ema(state["v"], grad.square(), c.beta2)
        x = adam_ratio_features(bias_corrected(m, c.beta1, step), bias_corrected(v, c.beta2, step), grad, c.eps)
        x = self.input(x)
        hidden, cell = state["lstm"], self.cell
        fast = inplace_allowed(grad, hidden, x)
        x = kernels.elu_(x) if fast else nn.functional.elu(x)
        if fast:  # no graph: write (h, c) straight into the new state
            new = out_state["lstm"] if out_state is not None else torch.empty_like(hidden)
            h, _ = lstm_cell(
                x,
                hidden[:, 0],
                hidden[:, 1],
                cell.weight_ih,
                cell.weight_hh,
                cell.bias_ih,
                cell.bias_hh,
                out=(new[:, 0], new[:, 1]),
            )
        else:
            h, c_new = lstm_cell(
                x, hidden[:, 0], hidden[:, 1], cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh
            )
            new = torch.stack([h, c_new], dim=1)
        delta = torch.tanh(self.head(h).squeeze(-1)) * c.output_scale
        return delta, {"m": m, "v": v, "lstm": new}
