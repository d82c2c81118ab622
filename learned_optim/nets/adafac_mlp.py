r"""A per-tensor normalised Adafactor-feature MLP (small_fc_lopt / AdafacMLPLOpt, with Celo2's and μLO's step).

Features of Metz et al. (2022, "Practical tradeoffs between memory, compute and performance in learned
optimizers"), the per-tensor RMS-normalised direction of Celo2 (Moudgil et al.), and the per-tensor μP
step scale of μLO (Thérien et al. 2024). The learning rate and weight decay stay outside the net, so
a user's LR scheduler and decoupled weight decay act exactly as with AdamW.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..features import (
    bias_corrected,
    ema,
    factored_moments,
    factored_preconditioner,
    matrix_view,
    rms_normalize,
    rsqrt_features,
    time_features,
)
from .base import NetConfig, UpdateRule, register_family

__all__ = ["AdafacMLPConfig", "AdafacMLP", "mup_scale"]


@dataclasses.dataclass
class AdafacMLPConfig(NetConfig):
    """Hyperparameters of :class:`AdafacMLP` (defaults: Celo2-sized MLP, small_fc_lopt features)."""

    hidden_size: int = 8
    num_hidden_layers: int = 2
    momentum_decays: tuple[float, ...] = (0.9, 0.99, 0.999)
    second_moment_decay: float = 0.999
    factored_decays: tuple[float, ...] = (0.9, 0.99, 0.999)
    time_scales: tuple[float, ...] = ()
    moment_eps: float = 1e-16
    factored_eps: float = 1e-30
    factored_rsqrt_eps: float = 1e-8
    feature_rms_eps: float = 1e-12
    direction_rms_eps: float = 1e-12
    mup: bool = True
    mup_base_fan_in: int = 64
    init: str = "adam"
    adam_feature_decay: float = 0.9


def mup_scale(shape: Sequence[int], base_fan_in: int) -> float:
    r"""The per-tensor μP step scale of a parameter of ``shape``.

    .. math:: s = \begin{cases} \min(1,\ b / \mathrm{fan\_in}) & \text{2 or more dimensions} \\
        1 & \text{vectors and scalars (biases, norm gains)} \end{cases}

    with :math:`\mathrm{fan\_in} = \prod_{d \ge 1} \mathrm{shape}_d` (a ``Linear`` weight ``(out, in)``: ``in``;
    a conv weight ``(out, in, kh, kw)``: ``in*kh*kw``) and :math:`b` = ``base_fan_in``. This is μLO's
    :math:`1/\mathrm{fan\_in}` for hidden matrices, relative to a base width at which the step is the
    plain ``lr`` (so ``lr`` keeps AdamW's scale); input layers, whose fan-in is the data dimension (at
    most :math:`b` for the tasks in view), get 1. A shape cannot tell an output layer from a hidden one:
    output matrices also get :math:`1/\mathrm{fan\_in}` (μP's rule for Adam's output-layer learning rate;
    μLO's 1 there assumes a ``1/width`` output multiplier in the model, which plain models lack), and an
    embedding table ``(vocab, dim)`` is treated as a matrix of fan-in ``dim``.
    """
    if len(shape) < 2:
        return 1.0
    rows, fan_in = matrix_view(shape)
    return min(1.0, base_fan_in / max(fan_in, 1))


@register_family
class AdafacMLP(UpdateRule):
    r"""Per-tensor normalised Adafactor-feature MLP with an RMS-normalised, μP-scaled direction.

    State per coordinate: momenta :math:`m_j` (decays ``momentum_decays``, :math:`j = 1..J`) and the
    second moment :math:`v` (decay ``second_moment_decay``); per tensor: Adafactor's row and column
    statistics :math:`r, c` (:func:`~learned_optim.features.factored_moments`, decays
    ``factored_decays``, :math:`K = J`), on the tensor's :func:`~learned_optim.features.matrix_view`
    (a vector is an ``(n, 1)`` matrix, for which the factored statistics are the full second moment).
    At step :math:`t` with gradient :math:`g`:

    .. math::
        m_j \leftarrow \mathrm{ema}_{\beta_j}(m_j, g),\quad v \leftarrow \mathrm{ema}_{\beta_v}(v, g^2),\quad
        (r, c) \leftarrow \mathrm{factored}(r, c, g),\quad
        \hat m_j = \frac{m_j}{1-\beta_j^t},\ \hat v = \frac{v}{1-\beta_v^t},\
        \phi_k = \hat v^{-1/2}_{\mathrm{fac},k}

    and the 28 coordinate features (for :math:`J = K = 3`)

    .. math::
        u = \big[g,\ \theta,\ m_j,\ v,\ \hat m_j (\hat v + \epsilon)^{-1/2},\ (\hat v + \epsilon)^{-1/2},\
        g\,\phi_k,\ r_k,\ c_k,\ (r_k + \epsilon_f)^{-1/2},\ (c_k + \epsilon_f)^{-1/2},\ m_k \phi_k\big]

    (:math:`r_k, c_k` broadcast to the coordinates of their row/column). **Every feature is divided by
    its RMS over the whole tensor**, :math:`u_f / \sqrt{\overline{u_f^2} + \epsilon_u}`; optional time
    features :math:`\tanh(t/\tau - 1)` are appended unnormalised. An MLP (``num_hidden_layers`` ReLU
    layers of ``hidden_size``) maps each coordinate's features to a direction :math:`d`, which is
    **RMS-normalised over the tensor** and scaled by the tensor's μP scale :math:`s` (:func:`mup_scale`;
    1 when ``mup`` is off):

    .. math:: \Delta\theta = -\,s\,\frac{d}{\sqrt{\overline{d^2} + \epsilon_d}}

    so the runtime's :math:`\theta \leftarrow \theta(1 - \mathrm{lr}\,\lambda) + \mathrm{lr}\,\Delta\theta`
    moves every tensor by RMS exactly :math:`\mathrm{lr}\cdot s` per step. ``lr`` is a real learning rate.

    ``init="adam"`` builds the MLP so that :math:`d` equals the normalised feature
    :math:`\hat m (\hat v + \epsilon)^{-1/2}` at decay ``adam_feature_decay`` exactly (two hidden units
    carry :math:`\pm x` through the ReLUs; the other units are random with zero output weights): the
    untrained net is AdamW (:math:`\beta_1` = ``adam_feature_decay``, :math:`\beta_2` =
    ``second_moment_decay``) with per-tensor RMS-normalised updates. ``init="random"``: truncated
    normal weights, std :math:`1/\sqrt{\mathrm{fan\_in}}`, zero biases (small_fc_lopt's init).

    Whole-tensor rule (``forward`` takes ``shape=``; see :mod:`learned_optim.nets.base`). Transient
    memory of a step: about ``(28 + 2 * hidden_size)`` floats per coordinate of the tensor.
    """

    family = "adafac_mlp"
    config_class = AdafacMLPConfig
    config: AdafacMLPConfig
    momentum_decay: Tensor
    factored_decay: Tensor
    whole_tensor = True
    default_lr = 1e-3

    def __init__(self, config: AdafacMLPConfig | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        c = self.config
        if len(c.momentum_decays) != len(c.factored_decays):
            raise ValueError("AdafacMLP: momentum_decays and factored_decays must have the same length")
        if c.init not in ("adam", "random"):
            raise ValueError(f"AdafacMLP: init must be 'adam' or 'random', got {c.init!r}")
        if c.num_hidden_layers < 1 or c.hidden_size < 2:
            raise ValueError("AdafacMLP needs num_hidden_layers >= 1 and hidden_size >= 2")
        if c.init == "adam" and c.adam_feature_decay not in c.momentum_decays:
            raise ValueError(f"AdafacMLP: adam_feature_decay {c.adam_feature_decay} is not in momentum_decays")
        layers: list[nn.Module] = []
        width = self.num_features
        for _ in range(c.num_hidden_layers):
            layers += [nn.Linear(width, c.hidden_size), nn.ReLU()]
            width = c.hidden_size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("momentum_decay", torch.tensor(c.momentum_decays).unsqueeze(1), persistent=False)
        self.register_buffer("factored_decay", torch.tensor(c.factored_decays), persistent=False)
        self.reset_parameters()

    @property
    def num_coordinate_features(self) -> int:
        j = len(self.config.momentum_decays)
        return 4 + 8 * j

    @property
    def num_features(self) -> int:
        return self.num_coordinate_features + len(self.config.time_scales)

    @property
    def adam_feature_index(self) -> int:
        """Row of :math:`\\hat m (\\hat v + \\epsilon)^{-1/2}` at ``adam_feature_decay`` among the features."""
        c = self.config
        return 3 + len(c.momentum_decays) + c.momentum_decays.index(c.adam_feature_decay)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the weights as ``config.init`` says (see the class docstring)."""
        linears = [m for m in self.mlp if isinstance(m, nn.Linear)]
        for layer in linears:
            nn.init.trunc_normal_(layer.weight, std=layer.in_features**-0.5)
            nn.init.zeros_(layer.bias)
        if self.config.init != "adam":
            return
        first, *hidden, last = linears
        first.weight[:2] = 0.0
        first.weight[0, self.adam_feature_index] = 1.0
        first.weight[1, self.adam_feature_index] = -1.0
        for layer in hidden:  # units 0 and 1 pass relu(x), relu(-x) through unchanged
            layer.weight[:2] = 0.0
            layer.weight[0, 0] = layer.weight[1, 1] = 1.0
        last.weight.zero_()
        last.weight[0, 0], last.weight[0, 1] = 1.0, -1.0  # relu(x) - relu(-x) = x

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"m": (len(self.config.momentum_decays),), "v": (1,)}

    def tensor_state_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        rows, cols = matrix_view(shape)
        k = len(self.config.factored_decays)
        return {"row": (rows, k), "col": (cols, k)}

    def step_scale(self, shape: Sequence[int]) -> float:
        """The per-tensor step scale :math:`s` (:func:`mup_scale`, or 1 with ``mup`` off)."""
        return mup_scale(shape, self.config.mup_base_fan_in) if self.config.mup else 1.0

    def coordinate_features(
        self, grad: Tensor, param: Tensor, state: Mapping[str, Tensor], step: Tensor, shape: Sequence[int]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The un-normalised features ``(F, n)`` (feature-major, rows in the class docstring's order) and the
        new state."""
        c = self.config
        rows, cols = matrix_view(shape)
        if rows * cols != grad.shape[0]:
            raise ValueError(f"AdafacMLP: shape {tuple(shape)} does not match a flat tensor of {grad.shape[0]}")
        m = ema(state["m"].t(), grad, self.momentum_decay.to(grad.dtype))  # (J, n)
        v = ema(state["v"].t(), grad.square(), c.second_moment_decay)  # (1, n)
        row, col = factored_moments(
            grad.view(rows, cols), state["row"], state["col"], self.factored_decay.to(grad.dtype), c.factored_eps
        )
        m_hat = m / (1.0 - self.momentum_decay.to(grad.dtype) ** step)
        ratio, rsqrt = rsqrt_features(m_hat, bias_corrected(v, c.second_moment_decay, step), c.moment_eps)
        precond = factored_preconditioner(row, col)  # (K, n)
        row_b = row.t().unsqueeze(2).expand(-1, rows, cols).reshape(row.shape[1], -1)
        col_b = col.t().unsqueeze(1).expand(-1, rows, cols).reshape(col.shape[1], -1)
        eps_f = c.factored_rsqrt_eps
        features = torch.cat(
            [
                grad.unsqueeze(0),
                param.unsqueeze(0),
                m,
                v,
                ratio,
                rsqrt,
                grad * precond,
                row_b,
                col_b,
                torch.rsqrt(row_b + eps_f),
                torch.rsqrt(col_b + eps_f),
                m * precond,
            ]
        )
        return features, {"m": m.t(), "v": v.t(), "row": row, "col": col}

    def forward(
        self,
        grad: Tensor,
        param: Tensor,
        state: Mapping[str, Tensor],
        step: Tensor,
        stats: Tensor | None = None,
        out_state: Mapping[str, Tensor] | None = None,
        *,
        shape: Sequence[int] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.config
        shape = (grad.shape[0],) if shape is None else tuple(shape)
        features, new_state = self.coordinate_features(grad, param, state, step, shape)
        x = rms_normalize(features, dim=1, eps=c.feature_rms_eps).t()  # (n, F)
        first, *rest = self.mlp
        assert isinstance(first, nn.Linear)
        bias: Tensor = first.bias
        if c.time_scales:  # per-tensor constant inputs: folded into the first layer's bias
            k = self.num_coordinate_features
            bias = bias + torch.mv(first.weight[:, k:], time_features(step, c.time_scales).to(bias.dtype))
        x = torch.addmm(bias, x, first.weight[:, : self.num_coordinate_features].t())
        for layer in rest:
            x = layer(x)
        direction = rms_normalize(x.squeeze(1), dim=0, eps=c.direction_rms_eps)
        return -self.step_scale(shape) * direction, new_state
