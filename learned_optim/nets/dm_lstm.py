"""DM-LSTM: the coordinatewise two-layer LSTM optimizer of Andrychowicz et al. (2016).

Base of L2O-DM and of L2O-DM-CL (Chen et al., 2020) and of the Hessian/entropy-regularized variants.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..features import log_and_sign
from .base import NetConfig, Segments, UpdateRule, register_family
from .cells import inplace_allowed, lstm_cell

__all__ = ["DMLSTMConfig", "DMLSTM"]


@dataclasses.dataclass
class DMLSTMConfig(NetConfig):
    hidden_size: int = 20
    num_layers: int = 2
    preprocess_k: float = 5.0
    output_scale: float = 0.01


@register_family
class DMLSTM(UpdateRule):
    r"""Two stacked LSTM cells over log-and-sign gradient features.

    .. math::
        x = \Big[\max\big(\tfrac{\log(|g|+\epsilon)}{k}, -1\big),\ \operatorname{clip}(g e^k, -1, 1)\Big],\quad
        (h_l, c_l) \leftarrow \mathrm{LSTM}_l(h_{l-1}, (h_l, c_l)),\quad
        \Delta\theta = s \cdot W h_L + b

    with :math:`k` = ``preprocess_k`` and :math:`s` = ``output_scale``; :math:`\theta \leftarrow
    \theta + \mathrm{lr}\,\Delta\theta`. State per coordinate: ``lstm`` of shape
    ``(num_layers, 2, hidden_size)`` holding :math:`(h_l, c_l)`.

    The cells are ``nn.LSTMCell`` modules (their weights, their parametrisation) evaluated by
    :func:`learned_optim.nets.cells.lstm_cell` (one fused gate GEMM; see there for the numerics).
    ``input_layer`` is an identity module called on :math:`x`: a tap through which the smoothing
    regularizer (:func:`learned_optim.meta.regularizers.smoothing_term`) perturbs the features.
    """

    family = "dm_lstm"
    config_class = DMLSTMConfig
    config: DMLSTMConfig
    packs_segments = True

    def __init__(self, config: DMLSTMConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        c = self.config
        sizes = [2] + [c.hidden_size] * c.num_layers
        self.cells = nn.ModuleList(nn.LSTMCell(sizes[i], sizes[i + 1]) for i in range(c.num_layers))
        self.head = nn.Linear(c.hidden_size, 1)
        self.input_layer = nn.Identity()

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"lstm": (self.config.num_layers, 2, self.config.hidden_size)}

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
        x = self.input_layer(log_and_sign(grad, self.config.preprocess_k))
        hidden = state["lstm"]
        if inplace_allowed(grad, hidden):  # no graph: write (h, c) straight into the new state
            new = out_state["lstm"] if out_state is not None else torch.empty_like(hidden)
            for layer, cell in enumerate(cast(Iterable[nn.LSTMCell], self.cells)):
                x, _ = lstm_cell(
                    x,
                    hidden[:, layer, 0],
                    hidden[:, layer, 1],
                    cell.weight_ih,
                    cell.weight_hh,
                    cell.bias_ih,
                    cell.bias_hh,
                    out=(new[:, layer, 0], new[:, layer, 1]),
                )
        else:
            layers = []
            for layer, cell in enumerate(cast(Iterable[nn.LSTMCell], self.cells)):
                x, c = lstm_cell(
                    x,
                    hidden[:, layer, 0],
                    hidden[:, layer, 1],
                    cell.weight_ih,
                    cell.weight_hh,
                    cell.bias_ih,
                    cell.bias_hh,
                )
                layers.append(torch.stack([x, c], dim=1))
            new = torch.stack(layers, dim=1)
        delta = self.head(x).squeeze(-1) * self.config.output_scale
        return delta, {"lstm": new}
