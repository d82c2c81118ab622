r"""A per-tensor normalised Adafactor-feature MLP (small_fc_lopt / AdafacMLPLOpt, with Celo2's and μLO's step).

Features of Metz et al. (2022, "Practical tradeoffs between memory, compute and performance in learned
optimizers"), the per-tensor RMS-normalised direction of Celo2 (Moudgil et al.), and the per-tensor μP
step scale of μLO (Thérien et al. 2024). The learning rate and weight decay stay outside the net, so
a user's LR scheduler and decoupled weight decay act exactly as with AdamW.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import kernels
from .._numerics import bfloat16_matmul_is_native
from ..features import (
    FactoredPackLayout,
    PackRun,
    bias_corrected,
    checked_factored_means,
    checked_sums,
    ema,
    factored_means,
    factored_moments,
    factored_pack_layout,
    factored_preconditioner,
    factored_row_factor,
    factored_rsqrt_factors,
    matrix_view,
    newton_schulz_orthogonalize,
    rms_normalize,
    rsqrt_features,
    time_features,
    wide_sums,
    wide_sums_directly,
)
from .base import DecoupledUpdate, NetConfig, Segments, UpdateRule, register_family
from .cells import inplace_allowed

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
    lr_ratio_input: bool = False
    moment_eps: float = 1e-16
    factored_eps: float = 1e-30
    factored_rsqrt_eps: float = 1e-8
    feature_rms_eps: float = 1e-12
    direction_rms_eps: float = 1e-12
    normalize_direction: bool = True
    direction_clip: float | None = None
    newton_schulz_steps: int = 0
    newton_schulz_dtype: str = "float32"
    newton_schulz_min_side: int = 2
    step_magnitude: str = "unit"
    orthogonal_step_rms: float | None = None
    orthogonal_step_floor: float | None = None
    magnitude_head_bound: float | None = None
    mup: bool = True
    mup_base_fan_in: int = 64
    init: str = "adam"
    adam_feature_decay: float = 0.9


#: ``AdafacMLPConfig.newton_schulz_dtype``'s fixed choices; ``"auto"`` picks one per device at run time.
NEWTON_SCHULZ_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def mean_squares(x: Tensor, dim: int) -> Tensor:
    """The mean of :math:`x^2` along ``dim``, in float64 where :func:`~learned_optim.features.wide_sums` (the row and
    column features :math:`r_k, c_k \\sim g^2` have squares past float32's range from :math:`|g| \\approx 10^9` on)."""
    return (x.double() if wide_sums() else x).square().mean(dim=dim)


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


@dataclasses.dataclass(frozen=True)
class _InPlacePlan:
    """What :meth:`AdafacMLP.step_in_place` derives from its tensors' shapes (and addresses) alone."""

    #: the tensors in the order they are stepped (by shape, for the orthogonalisation), ``None``: as given
    order: list[int] | None
    #: the per-tensor step scale :math:`s` (:meth:`AdafacMLP.step_scale`), in that order, float32 on the CPU
    scales: Tensor
    #: per kernel call: its tensors (a slice of that order), their matrix views, and the layout of the buffer its
    #: steps are written into (with the orthogonalisation; ``None``: the kernel applies the update itself)
    batches: list[tuple[slice, list[tuple[int, int]], FactoredPackLayout | None]]


@register_family
class AdafacMLP(UpdateRule):
    r"""Per-tensor normalised Adafactor-feature MLP with an RMS-normalised, μP-scaled direction.

    State per coordinate (4 floats for :math:`J = 3`): momenta :math:`m_j` (decays ``momentum_decays``,
    :math:`j = 1..J`; state ``m0, m1, ...``) and the second moment :math:`v` (decay
    ``second_moment_decay``); per tensor: Adafactor's row and column statistics :math:`r, c`
    (:func:`~learned_optim.features.factored_moments`, decays ``factored_decays``, :math:`K = J`), on the
    tensor's :func:`~learned_optim.features.matrix_view` (a vector is an ``(n, 1)`` matrix, for which
    the factored statistics are the full second moment).
    At step :math:`t` with gradient :math:`g`:

    .. math::
        m_j \leftarrow \mathrm{ema}_{\beta_j}(m_j, g),\quad v \leftarrow \mathrm{ema}_{\beta_v}(v, g^2),\quad
        (r, c) \leftarrow \mathrm{factored}(r, c, g),\quad
        \hat m_j = \frac{m_j}{1-\beta_j^t},\ \hat v = \frac{v}{1-\beta_v^t},\
        \phi_k = \hat v^{-1/2}_{\mathrm{fac},k}

    and the 28 coordinate features (for :math:`J = K = 3`)

    .. math::
        u = \big[g,\ \theta,\ m_j,\ v,\ \hat m_j (\hat v + \epsilon)^{-1/2},\ (\hat v + \epsilon)^{-1/2},\
        g\,\phi_k,\ m_k \phi_k,\ r_k,\ (r_k + \epsilon_f)^{-1/2},\ c_k,\ (c_k + \epsilon_f)^{-1/2}\big]

    (:math:`r_k, c_k` broadcast to the coordinates of their row/column). **Every feature is divided by
    its RMS over the whole tensor**, :math:`u_f / \sqrt{\overline{u_f^2} + \epsilon_u}`; optional time
    features :math:`\tanh(t/\tau - 1)` and, with ``lr_ratio_input``, the lr ratio :math:`\rho_t = \eta_t /
    \max_{s \le t} \eta_s` (where the user's schedule stands against its peak so far: 1 through a warm-up and at
    a constant lr, falling to 0 with a decay; no horizon) are appended unnormalised. An MLP (``num_hidden_layers`` ReLU
    layers of ``hidden_size``) maps each coordinate's features to a direction :math:`d`, which is
    **RMS-normalised over the tensor** (``normalize_direction``; off for ablations: :math:`\Delta\theta = -s\,d`)
    and scaled by the tensor's μP scale :math:`s` (:func:`mup_scale`; 1 when ``mup`` is off):

    .. math:: \Delta\theta = -\,s\,a\,\mathrm{clip}_{\pm\kappa}\big(d / \sqrt{\overline{d^2} + \epsilon_d}\big)

    so the runtime's :math:`\theta \leftarrow \theta(1 - \mathrm{lr}\,\lambda) + \mathrm{lr}\,\Delta\theta`
    moves every tensor by RMS exactly :math:`\mathrm{lr}\cdot s\cdot a` per step (at most, with the clip:
    ``direction_clip`` :math:`\kappa` bounds each coordinate of the normalised direction at :math:`\kappa` times
    its RMS, a guard against a few coordinates taking most of the step; ``None``, the default, clips nothing).
    ``lr`` is a real learning rate. The per-tensor magnitude :math:`a` is ``step_magnitude``: ``"unit"``,
    :math:`a = 1` (Celo2: the step's size is the lr schedule's alone); ``"adam"``, :math:`a` = the RMS over the
    tensor of Adam's own step :math:`\hat m (\hat v + \epsilon)^{-1/2}` at decay ``adam_feature_decay``, so the
    net sets the direction and Adam's signal-to-noise ratio still shrinks the step where gradients are mostly
    noise. With ``magnitude_head_bound`` :math:`B` the net also scales each tensor's step by a learned factor
    read from the tensor's mean last hidden activations :math:`\bar z = \frac1n \sum_i z_i` (a linear head on
    a mean pool, as in DeepSets): :math:`a \leftarrow a\, B^{\tanh(w_\mu \cdot \bar z + b_\mu)} \in [a/B, aB]`; the head
    starts at zero (factor 1: a fine-tune with it starts from its parent's function). The native kernel does not
    take the head: such a net steps on the ATen paths.

    With ``newton_schulz_steps`` :math:`k > 0` the direction of every matrix (a :func:`matrix_view` whose smaller side
    is at least ``newton_schulz_min_side``, 2 by default: linear and conv weights, embeddings; a larger bound leaves
    thin matrices, such as a classifier head over a few classes or a tabular input layer, to the net's own direction)
    is replaced by its approximate orthogonal polar factor
    before the RMS normalisation, :math:`d \leftarrow \mathrm{NS}_k(d_{\mathrm{rows} \times \mathrm{cols}})`
    (:func:`~learned_optim.features.newton_schulz_orthogonalize`; Muon's orthogonalisation, which Celo2 applies on top
    of its learned rule for hidden matrices): every singular direction of the net's step moves by about the same
    amount, and the per-tensor step RMS stays :math:`\mathrm{lr}\cdot s\cdot a` (AdamW's with ``"adam"``), so AdamW's
    lr still transfers. With ``orthogonal_step_rms`` :math:`\rho` the orthogonalised matrices take :math:`a = \rho`
    instead, whatever ``step_magnitude`` (Muon's update size: :math:`\rho = 0.2` is its RMS matched to AdamW's, so
    AdamW's lr and weight decay transfer; the step no longer shrinks where Adam's signal-to-noise ratio is low, and
    the decoupled weight decay sets the weights' scale against it); with ``orthogonal_step_floor`` :math:`\rho` they
    take :math:`\max(a, \rho)`: ``step_magnitude``'s size where it is larger, Muon's where it has fallen below. The
    other tensors keep ``step_magnitude``'s :math:`a`. Vectors are not orthogonalised. The iteration's products run
    in ``newton_schulz_dtype``:
    ``"float32"``, ``"bfloat16"`` (Muon's choice), or ``"auto"``, bfloat16 where the device has native bfloat16
    products and the matrix is large enough to gain (:meth:`newton_schulz_products_dtype`). The native kernel
    computes the step and the orthogonalisation runs on it after (:meth:`_orthogonalize_steps_`; with
    ``direction_clip`` on the ATen paths only); a step costs about :math:`3k` products of the matrix with its smaller
    Gram matrix more.

    ``init="adam"`` builds the MLP so that :math:`d` equals the normalised feature
    :math:`\hat m (\hat v + \epsilon)^{-1/2}` at decay ``adam_feature_decay`` exactly (two hidden units
    carry :math:`\pm x` through the ReLUs; the other units are random with zero output weights): the
    untrained net is AdamW (:math:`\beta_1` = ``adam_feature_decay``, :math:`\beta_2` =
    ``second_moment_decay``) with per-tensor RMS-normalised updates, exactly AdamW (times :math:`s`) with
    ``step_magnitude="adam"``. ``init="momentum"`` carries the normalised momentum :math:`m` at
    ``adam_feature_decay`` the same way: with ``newton_schulz_steps`` the untrained net orthogonalises a momentum, as
    Muon does (an EMA, without Nesterov's look-ahead), and with ``step_magnitude="adam"`` moves each tensor by
    AdamW's per-tensor step RMS. ``init="random"``: truncated
    normal weights, std :math:`1/\sqrt{\mathrm{fan\_in}}`, zero biases (small_fc_lopt's init).

    Whole-tensor rule (``forward`` takes ``shape=``; see :mod:`learned_optim.nets.base`). Computed
    feature-major: the per-tensor normalisation is folded into the first layer's weight columns, and the
    row/column features enter as a rank-structured term (one row of ``hidden_size`` values per row and per
    column of the tensor) instead of being broadcast to every coordinate. Transient memory of a step:
    about ``16 + 2 * hidden_size`` floats per coordinate of the tensor with autograd (meta-training);
    without it (the optimizer's step) tensors above :meth:`block_coordinates` coordinates go block by block
    (:meth:`_blocked_forward`), about ``16 + 2 * hidden_size`` floats per coordinate of one block.

    Paths of the step without autograd: the native CPU kernel (:mod:`learned_optim.kernels`, kernel
    ``adafac_mlp``: contiguous float32 CPU tensors, up to 8 momenta and ``hidden_size`` 32) wherever the
    kernels' guard uses it, for one tensor or a pack of any size (:meth:`_native_forward`: the whole step in one
    call, each tensor in two sweeps over memory with no transient per coordinate); else the ATen blocked path
    above :meth:`block_coordinates`, the one-shot path below it. The ATen paths define the math (the kernel is
    tested equal to them) and the one-shot path is the only one with autograd (meta-training). The optimizer
    steps the small tensors of a param group together (:meth:`_packed_forward`, one call or one set of ops for
    all of them, so a model of many small tensors does not pay a tensor's fixed cost many times).
    """

    family = "adafac_mlp"
    config_class = AdafacMLPConfig
    config: AdafacMLPConfig
    momentum_decay: Tensor
    factored_decay: Tensor
    lr_ratio: Tensor
    whole_tensor = True
    packs_segments = True
    applies_update = True  # in its native kernel's last sweep
    per_tensor_steps = True
    default_lr = 1e-3
    #: Coordinates per block of the inference path (:meth:`_blocked_forward`) on CPU; whole rows of the
    #: matrix view, so at least one row. Tensors up to :meth:`one_shot_bound` take the one-shot path.
    coordinate_block: int = 1 << 16
    #: Tensors up to this many coordinates take the one-shot path (the shared :meth:`features`) without autograd on
    #: the CPU's ATen path, larger ones :meth:`_blocked_forward`, whose intermediates are kept from step to step
    #: (:attr:`scratch`): the one-shot path's ~60 floats per coordinate, allocated anew at every step, are paged in
    #: anew too (glibc), from ~24k coordinates on. One tensor's step, one thread, AMD EPYC, one-shot / blocked:
    #: 16k coordinates 1.36 / 1.60 ms, 24k 2.06 / 1.89, 32k 4.5 / 2.1, 64k 9.5 / 3.7.
    one_shot_coordinates: int = 1 << 14
    #: Blocks per chunk of the inference path's first pass (the state update and the features' sums of squares),
    #: whose transient memory is two floats per coordinate of a chunk rather than a block's ``16 + 2 * hidden_size``.
    sums_block_factor: int = 16
    #: The same on a GPU, where a block's cost is its ~25 kernel launches rather than its memory traffic:
    #: 64k-coordinate blocks made a 10M-parameter step on an H200 72 ms against Adam's 0.44 ms.
    accelerator_coordinate_block: int = 1 << 20
    #: ``newton_schulz_dtype="auto"`` takes bfloat16 products only for matrices whose smaller side (the Gram matrix's
    #: size) is at least this: below it the conversions cost as much as the products save or more (5 steps, one
    #: thread, Intel Xeon with AMX: 128 x 128 0.68x, 128 x 512 0.97x, 160 x 640 2.0x, 192 x 192 1.3x, 1000 x 1000 3.1x
    #: float32's speed; ``benchmarks/results/bench/orthogonal-bf16/README.md``).
    bfloat16_min_side: int = 160
    #: Coordinates of steps the orthogonalising in-place step (:meth:`step_in_place`) holds at once: its tensors go
    #: in consecutive batches of at most this many (a larger tensor alone), each one kernel call writing its steps
    #: into a buffer of this size (64 MiB), so the transient memory does not grow with the model.
    in_place_step_coordinates: int = 1 << 24
    #: :meth:`step_in_place`'s plans kept (one per list of parameters stepped together: a param group).
    kept_in_place_plans: int = 8

    def block_coordinates(self, device: torch.device) -> int:
        """Coordinates per block of the inference path on ``device``."""
        return self.coordinate_block if device.type == "cpu" else self.accelerator_coordinate_block

    def one_shot_bound(self, device: torch.device) -> int:
        """The largest tensor (in coordinates) that the one-shot path steps without autograd on ``device``: a block,
        and on the CPU at most :attr:`one_shot_coordinates` (elsewhere no :attr:`scratch` is kept: a caching allocator
        serves the one-shot path's intermediates)."""
        block = self.block_coordinates(device)
        return min(block, self.one_shot_coordinates) if device.type == "cpu" else block

    def cpu_chunk_size(self) -> int:
        """Packs of small tensors on the CPU's ATen path go up to the one-shot path's bound (:attr:`coordinate_block`):
        a step's transient memory here is ~40 floats per coordinate, and fewer, larger packs cost fewer ops (a
        42-tensor transformer's step 8.7 -> 6.0-6.4 ms against DM-LSTM's 8192; ``benchmarks/results/
        step_adafac_session18.md``)."""
        return self.coordinate_block

    def __init__(self, config: AdafacMLPConfig | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        c = self.config
        if len(c.momentum_decays) != len(c.factored_decays):
            raise ValueError("AdafacMLP: momentum_decays and factored_decays must have the same length")
        if c.direction_clip is not None and not (c.normalize_direction and c.direction_clip > 0):
            raise ValueError(
                f"AdafacMLP: direction_clip bounds the normalised direction: it needs normalize_direction and a "
                f"bound above 0, got {c.direction_clip} with normalize_direction={c.normalize_direction}"
            )
        if c.newton_schulz_steps < 0 or (c.newton_schulz_steps > 0 and not c.normalize_direction):
            raise ValueError(
                f"AdafacMLP: newton_schulz_steps orthogonalises the direction before its RMS normalisation: it needs "
                f"normalize_direction and 0 or more steps, got {c.newton_schulz_steps} with "
                f"normalize_direction={c.normalize_direction}"
            )
        if c.newton_schulz_min_side < 2:
            raise ValueError(
                f"AdafacMLP: newton_schulz_min_side is the smallest matrix side that is orthogonalised (a single row "
                f"or column has nothing to orthogonalise): it must be at least 2, got {c.newton_schulz_min_side}"
            )
        if c.newton_schulz_dtype not in (*NEWTON_SCHULZ_DTYPES, "auto"):
            raise ValueError(
                f"AdafacMLP: newton_schulz_dtype must be 'float32', 'bfloat16' or 'auto', got {c.newton_schulz_dtype!r}"
            )
        if c.init not in ("adam", "momentum", "random"):
            raise ValueError(f"AdafacMLP: init must be 'adam', 'momentum' or 'random', got {c.init!r}")
        if c.num_hidden_layers < 1 or c.hidden_size < 2:
            raise ValueError("AdafacMLP needs num_hidden_layers >= 1 and hidden_size >= 2")
        if c.step_magnitude not in ("unit", "adam"):
            raise ValueError(f"AdafacMLP: step_magnitude must be 'unit' or 'adam', got {c.step_magnitude!r}")
        if (c.init != "random" or c.step_magnitude == "adam") and c.adam_feature_decay not in c.momentum_decays:
            raise ValueError(f"AdafacMLP: adam_feature_decay {c.adam_feature_decay} is not in momentum_decays")
        for name in ("orthogonal_step_rms", "orthogonal_step_floor"):
            size = getattr(c, name)
            if size is not None and not (c.newton_schulz_steps > 0 and size > 0):
                raise ValueError(
                    f"AdafacMLP: {name} sets the step size of the orthogonalised matrices: it needs "
                    f"newton_schulz_steps > 0 and a size above 0, got {size} with "
                    f"newton_schulz_steps={c.newton_schulz_steps}"
                )
        if c.orthogonal_step_rms is not None and c.orthogonal_step_floor is not None:
            raise ValueError("AdafacMLP: orthogonal_step_rms fixes the size that orthogonal_step_floor bounds: set one")
        if c.magnitude_head_bound is not None and not c.magnitude_head_bound > 1.0:
            raise ValueError(f"AdafacMLP: magnitude_head_bound must be above 1, got {c.magnitude_head_bound}")
        layers: list[nn.Module] = []
        width = self.num_features
        for _ in range(c.num_hidden_layers):
            layers += [nn.Linear(width, c.hidden_size), nn.ReLU()]
            width = c.hidden_size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        #: The per-tensor magnitude head (``magnitude_head_bound``): mean last hidden activations -> log factor.
        self.magnitude_head = nn.Linear(width, 1) if c.magnitude_head_bound is not None else None
        self.register_buffer("momentum_decay", torch.tensor(c.momentum_decays).unsqueeze(1), persistent=False)
        self.register_buffer("factored_decay", torch.tensor(c.factored_decays), persistent=False)
        #: The lr ratio of the step being computed (``lr_ratio_input``; :meth:`set_lr_ratio`, not saved).
        self.register_buffer("lr_ratio", torch.ones(()), persistent=False)
        self._in_place_plans: dict[tuple[tuple[Any, ...], tuple[tuple[int, torch.Size], ...]], _InPlacePlan | None] = {}
        # beta_v and the momentum decays as the tensor paths hold them, in float32, for :meth:`_count_terms` (0.999 is
        # 0.99900001 there: at t = 1 the correction 1 / (1 - beta) differs by 1.3e-5 between the two roundings)
        self._float32_decays: list[float] = torch.tensor(
            [c.second_moment_decay, *c.momentum_decays], dtype=torch.float32
        ).tolist()
        self.reset_parameters()

    @property
    def num_coordinate_features(self) -> int:
        j = len(self.config.momentum_decays)
        return 4 + 8 * j

    @property
    def num_features(self) -> int:
        return len(self.input_names)

    @property
    def input_names(self) -> list[str]:
        """The first layer's inputs in order: the coordinate features (:meth:`features`), then the per-tensor
        constants (time features, the lr ratio)."""
        c = self.config
        return (
            [f"feature{i}" for i in range(self.num_coordinate_features)]
            + [f"time{scale:g}" for scale in c.time_scales]
            + (["lr_ratio"] if c.lr_ratio_input else [])
        )

    @property
    def uses_lr_ratio(self) -> bool:
        return self.config.lr_ratio_input

    def set_lr_ratio(self, ratio: float) -> None:
        if self.config.lr_ratio_input:
            self.lr_ratio.fill_(ratio)

    def weights_for(self, changed: UpdateRule) -> dict[str, Tensor]:
        """This net's weights for ``changed`` (:meth:`UpdateRule.reconfigured`): where ``changed``'s inputs are this
        net's followed by new ones (e.g. ``lr_ratio_input`` turned on), the new inputs' first-layer columns are zero,
        and where ``changed`` adds the magnitude head, the head is zero (a factor of 1), so the changed net computes
        what this one does."""
        weights = self.state_dict()
        head = getattr(changed, "magnitude_head", None)
        if head is not None and self.magnitude_head is None:
            weights.update({f"magnitude_head.{k}": torch.zeros_like(v) for k, v in head.state_dict().items()})
        mine, theirs = self.input_names, getattr(changed, "input_names", None)
        if theirs is None or len(theirs) <= len(mine) or theirs[: len(mine)] != mine:
            return weights
        first = weights["mlp.0.weight"]
        weights["mlp.0.weight"] = torch.cat([first, first.new_zeros(first.shape[0], len(theirs) - len(mine))], dim=1)
        return weights

    @property
    def momentum_feature_index(self) -> int:
        """Row of the momentum :math:`m` at ``adam_feature_decay`` among the features (after :math:`g, \\theta`)."""
        c = self.config
        return 2 + c.momentum_decays.index(c.adam_feature_decay)

    @property
    def adam_feature_index(self) -> int:
        """Row of :math:`\\hat m (\\hat v + \\epsilon)^{-1/2}` at ``adam_feature_decay`` among the features (after the
        momenta and :math:`v`)."""
        return self.momentum_feature_index + len(self.config.momentum_decays) + 1

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise the weights as ``config.init`` says (see the class docstring)."""
        linears = [m for m in self.mlp if isinstance(m, nn.Linear)]
        for layer in linears:
            nn.init.trunc_normal_(layer.weight, std=layer.in_features**-0.5)
            nn.init.zeros_(layer.bias)
        if self.magnitude_head is not None:  # a factor of 1 to start from
            nn.init.zeros_(self.magnitude_head.weight)
            nn.init.zeros_(self.magnitude_head.bias)
        if self.config.init == "random":
            return
        carried = self.adam_feature_index if self.config.init == "adam" else self.momentum_feature_index
        first, *hidden, last = linears
        first.weight[:2] = 0.0
        first.weight[0, carried] = 1.0
        first.weight[1, carried] = -1.0
        for layer in hidden:  # units 0 and 1 pass relu(x), relu(-x) through unchanged
            layer.weight[:2] = 0.0
            layer.weight[0, 0] = layer.weight[1, 1] = 1.0
        last.weight.zero_()
        last.weight[0, 0], last.weight[0, 1] = 1.0, -1.0  # relu(x) - relu(-x) = x

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        # one contiguous (n,) vector per momentum (not an (n, J) block): the features are computed
        # feature-major, and transposing an (n, J) state in and out costs more than the arithmetic
        return {**{f"m{j}": () for j in range(len(self.config.momentum_decays))}, "v": ()}

    def tensor_state_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        rows, cols = matrix_view(shape)
        k = len(self.config.factored_decays)
        return {"row": (rows, k), "col": (cols, k)}

    def step_scale(self, shape: Sequence[int]) -> float:
        """The per-tensor step scale :math:`s` (:func:`mup_scale`, or 1 with ``mup`` off)."""
        return mup_scale(shape, self.config.mup_base_fan_in) if self.config.mup else 1.0

    def features(
        self, grad: Tensor, param: Tensor, state: Mapping[str, Tensor], step: Tensor, shape: Sequence[int]
    ) -> tuple[list[Tensor], Tensor, Tensor, Tensor, dict[str, Tensor]]:
        r"""The un-normalised features, feature-major, and the new state.

        Returns ``(blocks, scale, row_features, col_features, new_state)``: ``blocks`` are the per-coordinate
        features as ``(k, n)`` tensors in the order :math:`g, \theta, m_j, v, \hat m_j/\sqrt{\hat v+\epsilon}
        (1-\beta_j^t), 1/\sqrt{\hat v+\epsilon}, g\phi_k, m_k\phi_k` (16 rows for :math:`J=3`), ``scale`` the
        ``(16,)`` per-row factors that turn them into the documented features (the bias correction
        :math:`1/(1-\beta_j^t)` of the ratio rows, 1 elsewhere), ``row_features`` ``(2K, rows)``: :math:`r_k,
        (r_k+\epsilon_f)^{-1/2}` and ``col_features`` ``(2K, cols)``: :math:`c_k, (c_k+\epsilon_f)^{-1/2}` (a
        row/column feature of coordinate :math:`(i, j)` is that of its row :math:`i` / column :math:`j`).
        Feature :math:`f` of coordinate :math:`i` is ``scale[f] * cat(blocks)[f, i]``, then the row, then the
        column features: 28 in all for :math:`J = K = 3`.
        """
        c = self.config
        rows, cols = matrix_view(shape)
        if rows * cols != grad.shape[0]:
            raise ValueError(f"AdafacMLP: shape {tuple(shape)} does not match a flat tensor of {grad.shape[0]}")
        beta = self.momentum_decay.to(grad.dtype)  # (J, 1)
        j = len(c.momentum_decays)
        m = ema(torch.stack([state[f"m{i}"] for i in range(j)]), grad, beta)  # (J, n)
        sq = grad.square()
        v = ema(state["v"], sq, c.second_moment_decay).unsqueeze(0)  # (1, n)
        row, col = factored_moments(
            sq.view(rows, cols), state["row"], state["col"], self.factored_decay.to(grad.dtype), c.factored_eps
        )
        ratio, rsqrt = rsqrt_features(m, bias_corrected(v, c.second_moment_decay, step), c.moment_eps)
        precond = factored_preconditioner(row, col)  # (K, n)
        blocks = [grad.unsqueeze(0), param.unsqueeze(0), m, v, ratio, rsqrt, grad * precond, m * precond]
        new_state = {**{f"m{i}": m[i] for i in range(j)}, "v": v[0], "row": row, "col": col}
        scale = self._feature_scale(beta.squeeze(1), step, grad)
        return blocks, scale, self._factored_features(row), self._factored_features(col), new_state

    @staticmethod
    def _feature_scale(beta: Tensor, step: Tensor, like: Tensor) -> Tensor:
        """The ``(16,)`` per-row factors of :meth:`features`' dense rows (for :math:`J = 3`): the bias
        correction :math:`1/(1-\\beta_j^t)` of the ratio rows, 1 elsewhere; ``beta`` ``(J,)``. For one step
        count per tensor (``step`` ``(S,)``) one row per tensor, ``(S, 16)``."""
        return AdafacMLP._feature_scale_of(AdafacMLP._ratio_correction(beta, step), like)

    @staticmethod
    def _ratio_correction(beta: Tensor, step: Tensor) -> Tensor:
        """The ratio rows' bias corrections :math:`1/(1-\\beta_j^t)`: ``(J,)``, or ``(S, J)`` for ``step`` ``(S,)``."""
        return 1.0 / (1.0 - (beta**step if step.dim() == 0 else beta ** step.unsqueeze(-1)))

    def _v_correction(self, step: Tensor) -> Tensor:
        """The second moment's bias correction :math:`1/(1-\\beta_v^t)` at one step count ``step`` (0-d)."""
        return 1.0 / (1.0 - self.config.second_moment_decay**step)

    @staticmethod
    def _feature_scale_of(correction: Tensor, like: Tensor) -> Tensor:
        """:meth:`_feature_scale` from the ratio rows' corrections ``(..., J)``: ``(..., 16)``."""
        lead, (before, after) = correction.shape[:-1], AdafacMLP._rows_around_ratios(correction.shape[-1])
        return torch.cat([like.new_ones((*lead, before)), correction, like.new_ones((*lead, after))], dim=-1)

    @staticmethod
    def _rows_around_ratios(j: int) -> tuple[int, int]:
        """How many dense feature rows come before and after the J ratio rows (:meth:`features`' order: :math:`g,
        \\theta, m_j, v` before, :math:`1/\\sqrt{\\hat v+\\epsilon}, g\\phi_k, m_k\\phi_k` after)."""
        return 3 + j, 1 + 2 * j

    def _first_bias(self, step: Tensor) -> Tensor:
        """The first layer's bias with the per-tensor constant inputs (time features, the lr ratio) folded in:
        ``(H,)``, or ``(S, H)`` for one step count per tensor (``step`` ``(S,)``) when there are time features."""
        first = self.mlp[0]
        assert isinstance(first, nn.Linear)
        c, k = self.config, self.num_coordinate_features
        if not c.time_scales and not c.lr_ratio_input:
            return first.bias
        lead = step.shape if c.time_scales else ()
        constants = [time_features(step, c.time_scales)] if c.time_scales else []
        if c.lr_ratio_input:
            constants.append(self.lr_ratio.expand(*lead, 1))
        inputs = torch.cat([x.to(first.bias.dtype) for x in constants], dim=-1)
        if inputs.dim() == 1:
            return first.bias + torch.mv(first.weight[:, k:], inputs)
        return first.bias + inputs @ first.weight[:, k:].t()

    def _count_terms(self, step: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """What depends on the step count ``step`` (0-d, on the CPU: the kernel's), as the kernel takes it: the second
        moment's bias correction :math:`1/(1-\\beta_v^t)` (0-d), the dense features' factors (:meth:`_feature_scale`)
        and the first layer's bias (:meth:`_first_bias`); for one count per tensor (``step`` ``(S,)``) each with a
        leading axis of S. The corrections are computed on the host in double precision from the float32 decays (a few
        float operations instead of a dozen tensor ops, the largest cost of a small model's step) and rounded once to
        ``like``'s dtype; each row as for its count alone."""
        c = self.config
        per_tensor = step.dim() > 0
        counts: list[float] = step.tolist() if per_tensor else [step.item()]

        def corrections(t: float) -> list[float]:
            return [1.0 / (1.0 - beta**t) for beta in self._float32_decays]

        before, after = self._rows_around_ratios(len(c.momentum_decays))
        rows = [corrections(t) for t in counts]
        v_correction = like.new_tensor([row[0] for row in rows] if per_tensor else rows[0][0])
        feature_scale = like.new_tensor([[1.0] * before + row[1:] + [1.0] * after for row in rows])
        if not per_tensor:
            return v_correction, feature_scale[0], self._first_bias(step)
        if self.config.time_scales:  # per distinct count by the 0-d expression (a vectorised tanh may round otherwise)
            distinct, index = torch.unique(step, return_inverse=True)
            bias = torch.stack([self._first_bias(count) for count in distinct])[index]
        else:  # the same for every tensor
            bias = self._first_bias(step).expand(step.shape[0], -1)
        return v_correction, feature_scale, bias

    def _factored_features(self, stats: Tensor) -> Tensor:
        """``(2K, rows)`` from ``(rows, K)`` row (or column) statistics: :math:`r_k, (r_k + \\epsilon_f)^{-1/2}`."""
        return torch.cat([stats.t(), torch.rsqrt(stats.t() + self.config.factored_rsqrt_eps)])

    def forward(  # type: ignore[override]  # the step is None only when given update= (base contract)
        self,
        grad: Tensor,
        param: Tensor,
        state: Mapping[str, Tensor],
        step: Tensor,
        stats: Tensor | None = None,
        out_state: Mapping[str, Tensor] | None = None,
        segments: Segments | None = None,
        *,
        shape: Sequence[int] | None = None,
        shapes: Sequence[Sequence[int]] | None = None,
        update: DecoupledUpdate | None = None,
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        if segments is not None:
            if shapes is None or len(shapes) != len(segments):
                raise ValueError("adafac_mlp: a packed call needs shapes=, one shape per segment")
            shape_list = [tuple(s) for s in shapes]
            return self._packed_forward(grad, param, state, step, segments, shape_list, out_state, update)
        c = self.config
        shape = (grad.shape[0],) if shape is None else tuple(shape)
        rows, cols = matrix_view(shape)
        n = grad.shape[0]
        if rows * cols != n:
            raise ValueError(f"AdafacMLP: shape {tuple(shape)} does not match a flat tensor of {n}")
        if inplace_allowed(grad, param, *self.parameters()) and (
            n > self.one_shot_bound(grad.device) or kernels.uses("adafac_mlp")
        ):
            layout = factored_pack_layout((shape,))
            native = self._native_forward(grad, param, state, step, layout, out_state, update)
            if native is not None:
                return native
            return self._blocked_forward(grad, param, state, step, shape, out_state, update)
        blocks, scale, row_features, col_features, new_state = self.features(grad, param, state, step, shape)
        dense = torch.cat(blocks)  # (16, n)
        # Mean square of each feature over the tensor (a row/column feature repeats over its row/column).
        dense_ms = self._dense_sum_squares(dense) / n
        weight, row_weight, col_weight, bias = self._first_layer(
            dense_ms, scale, mean_squares(row_features, dim=1), mean_squares(col_features, dim=1), step
        )
        row_term = torch.addmm(bias.unsqueeze(1), row_weight, row_features)  # (H, rows)
        col_term = col_weight @ col_features  # (H, cols)
        # first layer, feature-major (H, n): the dense rows, plus the rank-structured row and column
        # terms broadcast over the (rows, cols) view
        base = (row_term.unsqueeze(2) + col_term.unsqueeze(1)).reshape(-1, n)
        inplace = inplace_allowed(grad, weight)  # no graph to record: activations in place
        x = base.addmm_(weight, dense) if inplace else torch.addmm(base, weight, dense)
        *hidden_layers, last = list(self.mlp)[1:]  # (a slice of the Sequential builds a new module)
        for layer in hidden_layers:
            if isinstance(layer, nn.Linear):
                x = torch.addmm(layer.bias.unsqueeze(1), layer.weight, x)
            else:
                x = x.relu_() if inplace else torch.relu(x)
        assert isinstance(last, nn.Linear)
        factor = self._magnitude_factor(x.mean(dim=1) if self.magnitude_head is not None else None)
        direction = torch.addmm(last.bias.unsqueeze(1), last.weight, x).squeeze(0)
        if self._orthogonalizes(rows, cols):
            direction = self._orthogonalized(direction, rows, cols).reshape(n)
        if c.normalize_direction:
            direction = rms_normalize(direction, dim=0, eps=c.direction_rms_eps)
            if c.direction_clip is not None:
                direction = direction.clamp(-c.direction_clip, c.direction_clip)
        magnitude = self._orthogonal_magnitude(self._magnitude(dense_ms, scale), rows, cols)
        return -self.step_scale(shape) * magnitude * factor * direction, new_state

    def _orthogonalizes(self, rows: int, cols: int) -> bool:
        """Whether the direction of a tensor of matrix view ``(rows, cols)`` is orthogonalised (``newton_schulz_steps``:
        matrices whose smaller side is at least ``newton_schulz_min_side``; vectors, scalars and single rows or columns
        never)."""
        c = self.config
        return c.newton_schulz_steps > 0 and min(rows, cols) >= c.newton_schulz_min_side

    def _orthogonalized(self, direction: Tensor, rows: int, cols: int) -> Tensor:
        """The approximate polar factors (:func:`~learned_optim.features.newton_schulz_orthogonalize`) of the
        directions of ``direction`` (one or several consecutive tensors of view ``(rows, cols)``, flat or as ``(count,
        rows, cols)``), as ``(count, rows, cols)``. Without autograd on the CPU a buffer of :attr:`scratch`: valid
        until the next call."""
        matrices = direction.view(-1, rows, cols)
        dtype = self.newton_schulz_products_dtype(direction.device, rows, cols)
        return newton_schulz_orthogonalize(matrices, self.config.newton_schulz_steps, dtype=dtype, scratch=self.scratch)

    def newton_schulz_products_dtype(self, device: torch.device, rows: int, cols: int) -> torch.dtype:
        """The dtype of the orthogonalisation's matrix products for a ``(rows, cols)`` matrix on ``device``
        (``newton_schulz_dtype``; ``"auto"``: bfloat16 where the hardware runs bfloat16 products natively,
        :func:`~learned_optim._numerics.bfloat16_matmul_is_native`, and the matrix's smaller side is at least
        :attr:`bfloat16_min_side`, else float32). A function of the hardware and the shape only, never of timings, so
        a run's numerics are the same in every process on one machine."""
        choice = self.config.newton_schulz_dtype
        if choice == "auto":
            large = min(rows, cols) >= self.bfloat16_min_side
            return torch.bfloat16 if large and bfloat16_matmul_is_native(device.type) else torch.float32
        return NEWTON_SCHULZ_DTYPES[choice]

    def _magnitude(self, dense_ms: Tensor, scale: Tensor) -> Tensor | float:
        """The per-tensor step magnitude :math:`a` (``step_magnitude``) from the dense rows' mean squares (float64 where
        :func:`~learned_optim.features.wide_sums`), in ``scale``'s dtype."""
        if self.config.step_magnitude == "unit":
            return 1.0
        i = self.adam_feature_index  # RMS of the bias-corrected m_j / sqrt(v_hat + eps): Adam's step
        return scale[i] * dense_ms[i].sqrt().to(scale.dtype)

    @property
    def _sets_orthogonal_magnitude(self) -> bool:
        """Whether ``orthogonal_step_rms`` or ``orthogonal_step_floor`` is set."""
        return self.config.orthogonal_step_rms is not None or self.config.orthogonal_step_floor is not None

    def _orthogonal_magnitude(self, magnitude: Tensor | float, rows: int, cols: int) -> Tensor | float:
        """The magnitude :math:`a` of one tensor (or of consecutive tensors) of matrix view ``(rows, cols)`` whose
        ``step_magnitude`` size is ``magnitude``: where the tensor is orthogonalised, ``orthogonal_step_rms`` when set,
        at least ``orthogonal_step_floor`` when set; ``magnitude`` elsewhere."""
        c = self.config
        if not self._orthogonalizes(rows, cols):
            return magnitude
        if c.orthogonal_step_rms is not None:
            return c.orthogonal_step_rms
        if c.orthogonal_step_floor is not None:
            floor = c.orthogonal_step_floor
            return magnitude.clamp_min(floor) if isinstance(magnitude, Tensor) else max(magnitude, floor)
        return magnitude

    def _magnitude_factor(self, pooled: Tensor | None) -> Tensor | float:
        r"""The magnitude head's factor :math:`B^{\tanh(w_\mu \cdot \bar z + b_\mu)}` of each tensor from its mean last
        hidden activations ``pooled`` (``(H,)``, or ``(H, S)`` for ``S`` tensors: a factor each); 1 without the
        head, whatever ``pooled`` is (a caller that would have to compute it may pass ``None``)."""
        head, bound = self.magnitude_head, self.config.magnitude_head_bound
        if head is None or bound is None or pooled is None:
            return 1.0
        logit = head.weight.squeeze(0) @ pooled.to(head.weight.dtype) + head.bias.squeeze(0)
        return torch.exp(math.log(bound) * torch.tanh(logit))

    @property
    def v_feature_index(self) -> int:
        """Row of the second moment :math:`v` among the dense features."""
        return 2 + len(self.config.momentum_decays)

    def _dense_sum_squares(self, dense: Tensor, runs: Sequence[PackRun] | None = None) -> Tensor:
        r"""The dense rows' sums of squares along the last axis of ``dense`` (``(16, n)``: ``(16,)``), or with
        ``runs`` each packed tensor's (``dense`` the pack's ``(16, size)``: ``(16, S)``, one column per tensor), in
        float64 where :func:`~learned_optim.features.wide_sums` (else float32's). The second moment's row is squared
        in float64: :math:`v \sim g^2`, so :math:`\sum v^2 \sim n g^4` leaves float32's range from
        :math:`|g| \approx 10^9` on; the other rows' float norms, whose squares :math:`\sum u^2` stay in it up to
        :math:`n g^2 \approx 10^{38}`, are squared in float64, and taken in float64 where they overflowed (one check
        for the whole pack)."""
        if not wide_sums():  # the differentiable step (float32 sums), never a pack's
            if runs is not None:
                raise ValueError("AdafacMLP: a pack's sums of squares are taken without autograd")
            return torch.linalg.vector_norm(dense, dim=-1).square()
        d, i = dense.shape[0], self.v_feature_index
        # (16, tensors, coordinates) each
        views = [dense.unsqueeze(1)] if runs is None else [dense[:, r.a : r.b].view(d, r.count, -1) for r in runs]

        def norms(rows: slice | int, dtype: torch.dtype) -> Tensor:  # each tensor's norms of ``rows``, (.., S)
            # (no out=: the one-tensor step also runs under vmap)
            return torch.cat([torch.linalg.vector_norm(view[rows], dim=-1, dtype=dtype) for view in views], dim=-1)

        def narrow() -> Tensor:  # overflows where a float32 norm of a row ~ g does (n g^2 ~ 3e38)
            rows = norms(slice(None), dense.dtype).double()  # (the v row replaced by its float64 norm)
            return torch.cat([rows[:i], norms(i, torch.float64).unsqueeze(0), rows[i + 1 :]]).square()

        sums = checked_sums(dense, narrow, lambda: norms(slice(None), torch.float64).square())
        return sums if runs is not None else sums.squeeze(1)

    def _first_layer(
        self, dense_ms: Tensor, scale: Tensor, row_ms: Tensor, col_ms: Tensor, step: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r"""The first layer with the per-tensor RMS normalisation folded in.

        Feature :math:`f` enters as :math:`u_f / \sqrt{\overline{u_f^2} + \epsilon_u}` with :math:`u_f =
        \mathrm{scale}_f\,\mathrm{raw}_f`, so the normalisation is a per-column factor of the first
        layer's weight and the GEMM runs on the raw rows (no normalised copy). ``dense_ms``, ``row_ms`` and
        ``col_ms`` are the mean squares over the tensor of the raw dense rows and of the row and column
        features (:meth:`features`; a row feature's over the rows, as it repeats over the columns). Returns
        ``(dense_weight, row_weight, col_weight, bias)``: the ``(H, 16)``, ``(H, 2K)``, ``(H, 2K)`` blocks of
        the folded weight and the ``(H,)`` bias with the time features (per-tensor constants), so that the
        first layer's pre-activation is ``dense_weight @ dense + (row_weight @ row_features + bias)[:, r] +
        (col_weight @ col_features)[:, c]`` at coordinate ``(r, c)``.
        """
        first = self.mlp[0]
        assert isinstance(first, nn.Linear)
        k, d, nr = self.num_coordinate_features, scale.shape[0], row_ms.shape[0]
        ms = torch.cat([dense_ms, row_ms, col_ms])
        factor = torch.cat([scale, torch.ones_like(scale[:1]).expand(ms.shape[0] - d)])
        weight = first.weight[:, :k] * self._normaliser(factor, ms)
        return weight[:, :d], weight[:, d : d + nr], weight[:, d + nr :], self._first_bias(step)

    def _normaliser(self, factor: Tensor, ms: Tensor) -> Tensor:
        r""":math:`z = q / \sqrt{q^2 \overline{u^2} + \epsilon_u}`, the factor that turns a raw feature into its
        per-tensor normalised value (``factor`` :math:`q`: the raw row's scale, ``ms`` its mean square
        :math:`\overline{u^2}`), computed in the mean square's dtype (float64 where the sums are: a mean square of a
        feature of scale :math:`g^2` is past float32's range where :math:`z` is not) and rounded to ``factor``'s."""
        q = factor.to(ms.dtype)
        return (q * torch.rsqrt(q.square() * ms + self.config.feature_rms_eps)).to(factor.dtype)

    @torch.no_grad()
    def _packed_forward(
        self,
        grad: Tensor,
        param: Tensor,
        state: Mapping[str, Tensor],
        step: Tensor,
        segments: Segments,
        shapes: list[tuple[int, ...]],
        out_state: Mapping[str, Tensor] | None = None,
        update: DecoupledUpdate | None = None,
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        r""":meth:`forward` of several tensors at once (the optimizer's packed step), without autograd.

        The tensors' coordinates are concatenated (``segments``: their sizes, then zero padding rows),
        ``shapes`` are their shapes, ``step`` their step count or each tensor's (``(S,)``, where they differ: each
        tensor's bias corrections and time features its own), and the per-tensor state is packed too:
        ``state["row"]`` is every tensor's ``(rows_s, K)`` row statistics one after the other, ``state["col"]`` their
        column statistics. The elementwise features, the moments and the MLP run once for the whole pack; what
        is per tensor (Adafactor's row and column means, the rank-structured row/column terms, the feature
        and direction RMS) is one batched broadcast or reduction per run of consecutive tensors of one shape
        (:class:`~learned_optim.features.PackRun`; the optimizer orders a pack by shape), as the per-tensor
        step computes it for each. The per-tensor feature normalisation multiplies the features instead of
        being folded into the first layer's weights, so the result equals the per-tensor step to float
        rounding (bound in ``tests/core/test_packed_step.py``). Padding rows get any value. Where the native
        kernel applies (:meth:`_native_forward`) the same math runs in one call, tensor by tensor; the ATen ops below
        otherwise, their large intermediates in :attr:`scratch`. Either way the new per-coordinate state goes into
        ``out_state`` (the packed state itself may be given), and with ``update`` the decoupled update is applied to
        ``param`` (the optimizer's packed copy) and ``None`` returned as the step (not by the kernel where it
        orthogonalises: its step is returned).
        """
        c = self.config
        j, dtype, hidden = len(c.momentum_decays), grad.dtype, c.hidden_size
        d = 4 + 4 * j  # dense features
        beta = self.momentum_decay.to(dtype)  # (J, 1)
        layout = factored_pack_layout(tuple(shapes))
        if step.dim() > 0 and step.shape != (len(shapes),):
            raise ValueError(f"AdafacMLP: {step.numel()} step counts for {len(shapes)} packed tensors")
        if tuple(b - a for (a, b), *_ in layout.bounds) != segments.sizes:
            raise ValueError(f"AdafacMLP: shapes {shapes} do not match the packed sizes {segments.sizes}")
        native = self._native_forward(grad, param, state, step, layout, out_state, update)
        if native is not None:
            return native
        # the large intermediates go into buffers kept from step to step (the same arithmetic as out of place)
        size, take = grad.shape[0], functools.partial(self.scratch.take, like=grad)
        work = take("work", (j, size))
        m = torch.stack([state[f"m{i}"] for i in range(j)], out=take("m", (j, size)))
        m = ema(m, grad, beta, out=m, work=work)  # (J, R)
        sq = torch.square(grad, out=take("square", (size,)))
        # the new state into the caller's storage (which aliases state: each coordinate read before it is written)
        new_v = out_state["v"] if out_state is not None else torch.empty_like(state["v"])
        v = ema(state["v"], sq, c.second_moment_decay, out=new_v, work=work[0])
        # Adafactor's row and column means of g^2, tensor by tensor (a run of same-shaped tensors at once), then
        # one EMA for the whole pack
        row_mean, col_mean = grad.new_empty(layout.rows), grad.new_empty(layout.cols)

        def means(wide: bool) -> tuple[Tensor, Tensor]:
            for run in layout.runs:
                g2 = sq[run.a : run.b].view(run.count, run.rows, run.cols)
                if wide:
                    rows_mean, cols_mean = factored_means(g2)
                    row_mean[run.r0 : run.r1], col_mean[run.c0 : run.c1] = rows_mean.reshape(-1), cols_mean.reshape(-1)
                else:
                    torch.mean(g2, dim=2, out=row_mean[run.r0 : run.r1].view(run.count, run.rows))
                    torch.mean(g2, dim=1, out=col_mean[run.c0 : run.c1].view(run.count, run.cols))
            return row_mean, col_mean

        row_mean, col_mean = checked_sums(grad, lambda: means(wide=False), lambda: means(wide=True))
        decay = self.factored_decay.to(dtype)
        row = ema(state["row"], (row_mean + c.factored_eps).unsqueeze(1), decay)  # (sum of rows, K)
        col = ema(state["col"], (col_mean + c.factored_eps).unsqueeze(1), decay)  # (sum of cols, K)
        row_features, col_features = self._factored_features(row), self._factored_features(col)  # (2K, .)
        first = self.mlp[0]
        assert isinstance(first, nn.Linear)
        # (16, 1), or (16, S) for one step count per tensor; the bias (H,) or (S, H)
        scale = self._feature_scale(beta.squeeze(1), step, grad).view(-1, d).t()
        k, nr = self.num_coordinate_features, row_features.shape[0]
        bias = self._first_bias(step)
        phi = take("phi", (j, size))
        row_rms, col_rms = (grad.new_empty(nr, len(shapes), dtype=torch.float64) for _ in range(2))
        for run in layout.runs:
            n, rows, cols = run.count, run.rows, run.cols
            row_factor, col_factor = factored_rsqrt_factors(
                row[run.r0 : run.r1].view(n, rows, -1), col[run.c0 : run.c1].view(n, cols, -1)
            )  # (n, rows, K), (n, cols, K)
            torch.mul(
                row_factor.permute(2, 0, 1).unsqueeze(3),
                col_factor.permute(2, 0, 1).unsqueeze(2),
                out=phi[:, run.a : run.b].view(j, n, rows, cols),
            )
            wide = torch.float64  # the row and column features ~ g^2: squares past float32's range
            row_view = row_features[:, run.r0 : run.r1].view(nr, n, rows)
            torch.linalg.vector_norm(row_view, dim=2, dtype=wide, out=row_rms[:, run.s0 : run.s1])
            col_view = col_features[:, run.c0 : run.c1].view(nr, n, cols)
            torch.linalg.vector_norm(col_view, dim=2, dtype=wide, out=col_rms[:, run.s0 : run.s1])
        counts = layout.counts(grad)
        # each row/column feature over its RMS on the tensor (a row feature repeats over the row's columns)
        ones = grad.new_ones(1, 1)
        row_norm = self._normaliser(ones, row_rms.square() / counts[1])
        col_norm = self._normaliser(ones, col_rms.square() / counts[2])
        # one step count, or each row its tensor's (padding rows count 1, where the correction is finite)
        row_step = step if step.dim() == 0 else segments.expand(step, padding=1.0)
        # the dense rows: g, theta, m (J), v, m / sqrt(v_hat + eps) (J), 1 / sqrt(v_hat + eps), g phi (J), m phi (J)
        dense = take("dense", (d, size))
        dense[0], dense[1], dense[2 : 2 + j], dense[2 + j] = grad, param, m, v
        rsqrt = dense[3 + 2 * j : 4 + 2 * j]
        bias_corrected(v, c.second_moment_decay, row_step, out=rsqrt[0])
        rsqrt_features(m, rsqrt, c.moment_eps, out=(dense[3 + j : 3 + 2 * j], rsqrt))
        torch.mul(grad, phi, out=dense[4 + 2 * j : 4 + 3 * j])
        torch.mul(m, phi, out=dense[4 + 3 * j :])
        dense_ms = self._dense_sum_squares(dense, layout.runs) / counts[0]  # (16, S): each feature's over its tensor
        normaliser = self._normaliser(scale, dense_ms)  # (16, S)
        row_weight, col_weight = first.weight[:, d : d + nr], first.weight[:, d + nr : k]
        x = take("hidden0", (hidden, size))
        if segments.rows > layout.coordinates:
            x[:, layout.coordinates :] = 0.0
            dense[:, layout.coordinates :] = 0.0
        for run in layout.runs:
            n, rows, cols, segment = run.count, run.rows, run.cols, slice(run.s0, run.s1)
            # the first layer's row/column terms over the features normalised per tensor: (H, n*rows), (H, n*cols)
            scaled_rows = row_features[:, run.r0 : run.r1].view(nr, n, rows) * row_norm[:, segment].unsqueeze(2)
            if bias.dim() == 1:
                row_term = torch.addmm(bias.unsqueeze(1), row_weight, scaled_rows.view(nr, n * rows))
            else:  # each tensor's own bias (time features at its step count)
                row_term = (row_weight @ scaled_rows.view(nr, n * rows)).view(hidden, n, rows)
                row_term = row_term.add_(bias[segment].t().unsqueeze(2)).view(hidden, n * rows)
            scaled_cols = col_features[:, run.c0 : run.c1].view(nr, n, cols) * col_norm[:, segment].unsqueeze(2)
            col_term = col_weight @ scaled_cols.view(nr, n * cols)
            if cols == 1:  # vectors: a 3-D broadcast (TensorIterator is several times slower with the 4-D one)
                out = x[:, run.a : run.b].view(hidden, n, rows)
                torch.add(row_term.view(hidden, n, rows), col_term.view(hidden, n, 1), out=out)
            else:
                torch.add(
                    row_term.view(hidden, n, rows, 1),
                    col_term.view(hidden, n, 1, cols),
                    out=x[:, run.a : run.b].view(hidden, n, rows, cols),
                )
            dense[:, run.a : run.b].view(d, n, -1).mul_(normaliser[:, segment].unsqueeze(2))
        x.addmm_(first.weight[:, :d], dense).relu_()
        *hidden_layers, last = list(self.mlp)[2:]
        spare = itertools.cycle(("hidden1", "hidden0"))  # the layers write the two hidden buffers in turn
        for layer in hidden_layers:
            if isinstance(layer, nn.Linear):
                x = torch.addmm(layer.bias.unsqueeze(1), layer.weight, x, out=take(next(spare), x.shape))
            else:
                x = x.relu_()
        step_scale = -layout.step_scales(self.step_scale, grad)
        if self.magnitude_head is not None:  # each tensor's mean last hidden activations
            pooled = x.new_empty(hidden, len(shapes))
            for run in layout.runs:
                pooled[:, run.s0 : run.s1] = x[:, run.a : run.b].view(hidden, run.count, -1).mean(dim=2)
            step_scale = step_scale * self._magnitude_factor(pooled)
        assert isinstance(last, nn.Linear)
        # the step stays in the scratch where it is applied here (update)
        kept = take("direction", (1, size)) if update is not None else None
        direction = torch.addmm(last.bias.unsqueeze(1), last.weight, x, out=kept).squeeze(0)
        if c.step_magnitude == "adam" or self._sets_orthogonal_magnitude:
            magnitude = step_scale.new_ones(len(shapes)) * self._magnitude(dense_ms, scale)
            for run in layout.runs:
                per_tensor = magnitude[run.s0 : run.s1]
                magnitude[run.s0 : run.s1] = self._orthogonal_magnitude(per_tensor, run.rows, run.cols)
            step_scale = step_scale * magnitude
        clip = c.direction_clip  # set only with normalize_direction (checked in __init__)
        for run in layout.runs:
            if self._orthogonalizes(run.rows, run.cols):
                per_tensor = direction[run.a : run.b]
                per_tensor.view(-1, run.rows, run.cols).copy_(self._orthogonalized(per_tensor, run.rows, run.cols))
        if c.normalize_direction:
            direction_rms = grad.new_empty(len(shapes))
            for run in layout.runs:
                per_tensor = direction[run.a : run.b].view(run.count, -1)
                torch.linalg.vector_norm(per_tensor, dim=1, out=direction_rms[run.s0 : run.s1])
            normaliser = torch.rsqrt(direction_rms.square() / counts[0] + c.direction_rms_eps)
            if clip is None:
                step_scale = step_scale * normaliser
        for run in layout.runs:
            per_tensor = direction[run.a : run.b].view(run.count, -1)
            if clip is not None:  # normalised, clipped, then scaled
                per_tensor.mul_(normaliser[run.s0 : run.s1].unsqueeze(1)).clamp_(-clip, clip)
            per_tensor.mul_(step_scale[run.s0 : run.s1].unsqueeze(1))
        momenta = [f"m{i}" for i in range(j)]
        if out_state is not None:
            torch._foreach_copy_([out_state[k] for k in momenta], list(m.unbind()))
        new_m = [out_state[k] for k in momenta] if out_state is not None else list(m.clone().unbind())
        new_state = {**dict(zip(momenta, new_m, strict=True)), "v": v, "row": row, "col": col}
        if update is None:
            return direction, new_state
        from ..functional import decoupled_update  # (both import the nets)

        lr, weight_decay = update  # applied as the optimizer's packed step would (its arithmetic, bit for bit)
        if isinstance(lr, Tensor):
            lr = lr.to(device=param.device, dtype=param.dtype)
        coordinates = slice(0, layout.coordinates)
        decoupled_update(param[coordinates], direction[coordinates], lr, weight_decay, work=direction[coordinates])
        return None, new_state

    def _native_forward(
        self,
        grad: Tensor,
        param: Tensor,
        state: Mapping[str, Tensor],
        step: Tensor,
        layout: FactoredPackLayout,
        out_state: Mapping[str, Tensor] | None,
        update: DecoupledUpdate | None = None,
    ) -> tuple[Tensor | None, dict[str, Tensor]] | None:
        """The inference step of the tensors of ``layout`` (one, or a pack) in one native call
        (:func:`~learned_optim.kernels.adafac_pack_step`: :meth:`_packed_forward`'s math tensor by tensor, each
        tensor's two passes of :meth:`_blocked_forward` fused into one sweep each), the new state written into
        ``out_state`` (new tensors if ``None``); with ``update``, the decoupled update applied to ``param`` in
        the kernel's last sweep and ``None`` returned as the step. ``None`` where the kernel does not apply or
        is not used here, or autograd records (meta-training)."""
        c = self.config
        native = grad.device.type == "cpu" and self._kernel_takes_net and kernels.uses("adafac_mlp")
        if not (native and inplace_allowed(grad, param, *self.parameters())):
            return None
        orthogonal = c.newton_schulz_steps > 0
        if orthogonal:  # the kernel's step, orthogonalised here: the caller applies it
            update = None
        momenta = [f"m{i}" for i in range(len(c.momentum_decays))]
        names = [*momenta, "v", "row", "col"]
        new = {k: out_state[k] if out_state is not None else torch.empty_like(state[k]) for k in names}
        delta = kernels.adafac_pack_step(
            [view for *_, view in layout.bounds], grad, param, [state[k] for k in momenta], state["v"],
            [new[k] for k in momenta], new["v"], state["row"], state["col"], new["row"], new["col"],
            self._kernel_net(step, grad), layout.step_scales(self.step_scale, grad), update,
        )  # fmt: skip
        if delta is None:
            return None
        if orthogonal:
            self._orthogonalize_steps_(delta, layout)
        if update is not None:  # written through its storage, as an in-place op would
            torch.autograd.graph.increment_version(param)
        return (None if update is not None else delta), new

    def steps_natively(self, device: torch.device) -> bool:
        return device.type == "cpu" and self._kernel_takes_net and kernels.uses("adafac_mlp")

    @property
    def _kernel_takes_net(self) -> bool:
        """Whether the native kernel computes this net's step: not with the magnitude head; with the orthogonalisation
        only without ``direction_clip`` (the kernel's clipped step cannot be orthogonalised after the fact)."""
        c = self.config
        return self.magnitude_head is None and (c.newton_schulz_steps == 0 or c.direction_clip is None)

    def _orthogonalize_steps_(self, delta: Tensor, layout: FactoredPackLayout) -> None:
        r"""Orthogonalise, in place, the kernel's steps :math:`\Delta = -s\,a\,d / \mathrm{RMS}(d)` of the matrices
        of ``layout``, each to :math:`\mathrm{NS}_k(\Delta)` rescaled to :math:`\Delta`'s RMS :math:`s\,a` (to
        :math:`s\,a'`, :math:`a'` the :meth:`_orthogonal_magnitude` of :math:`a`, where that is set): the orthogonalised
        direction of :meth:`forward` (the iteration is odd and invariant to a positive scale), to float rounding."""
        step_scales = layout.step_scales(self.step_scale, delta) if self._sets_orthogonal_magnitude else None
        for run in layout.runs:
            if self._orthogonalizes(run.rows, run.cols):
                steps = delta[run.a : run.b].view(run.count, run.rows, run.cols)
                polar = self._orthogonalized(steps, run.rows, run.cols)
                norm = torch.linalg.vector_norm(steps, dim=(1, 2), keepdim=True)  # s a sqrt(n)
                if step_scales is not None:
                    scales = step_scales[run.s0 : run.s1].view(-1, 1, 1) * math.sqrt(run.rows * run.cols)
                    norm = scales * self._orthogonal_magnitude(norm / scales, run.rows, run.cols)
                polar_norm = torch.linalg.vector_norm(polar, dim=(1, 2), keepdim=True)
                torch.mul(polar, norm / polar_norm.clamp_min(torch.finfo(polar.dtype).tiny), out=steps)

    def _kernel_net(self, step: Tensor, like: Tensor) -> kernels.AdafacNet:
        """The net's weights and constants at step count ``step`` (0-d, or one count per tensor ``(S,)``) as the
        adafac kernel takes them."""
        c = self.config
        linears = [layer for layer in self.mlp if isinstance(layer, nn.Linear)]
        v_correction, feature_scale, bias = self._count_terms(step, like)
        scalars = {
            "beta_v": c.second_moment_decay,
            "moment_eps": c.moment_eps,
            "factored_eps": c.factored_eps,
            "factored_rsqrt_eps": c.factored_rsqrt_eps,
            "feature_rms_eps": c.feature_rms_eps,
            "direction_rms_eps": c.direction_rms_eps,
        }
        return kernels.AdafacNet(
            config=scalars,
            v_correction=v_correction,
            beta=c.momentum_decays,
            factored_decay=c.factored_decays,
            feature_scale=feature_scale,
            weight=linears[0].weight[:, : self.num_coordinate_features],
            bias=bias,
            layers=[(layer.weight, layer.bias) for layer in linears[1:]],
            adam_index=self.adam_feature_index if c.step_magnitude == "adam" else None,
            normalize=c.normalize_direction,
            direction_clip=c.direction_clip or 0.0,
        )

    @torch.no_grad()
    def step_in_place(
        self,
        params: Sequence[Tensor],
        states: Sequence[Mapping[str, Tensor]],
        step: Tensor,
        lr: float | Tensor,
        weight_decay: float,
    ) -> list[Tensor]:
        """The native kernel over every tensor it takes, each in its own storage (see
        :meth:`UpdateRule.step_in_place`): contiguous float32 CPU parameters, gradients and state. The same kernel
        and arithmetic as the optimizer's per-tensor and packed steps (:meth:`_native_forward`), so the same
        result bit for bit, without their copies into and out of packs. With the orthogonalisation
        (``newton_schulz_steps``) the kernel writes the steps into a buffer instead (in batches of at most
        :attr:`in_place_step_coordinates`), the tensors ordered by shape so that matrices of one shape are
        orthogonalised together (:meth:`_orthogonalize_steps_`, as in a pack), and the decoupled update follows as
        :func:`~learned_optim.functional.decoupled_update_` applies it: the per-tensor step's result to float
        rounding (the batched products of a run of several matrices may round differently)."""
        weights = tuple(self.parameters())
        native = self._kernel_takes_net and kernels.uses("adafac_mlp") and inplace_allowed(*weights)
        if not native or weights[0].dtype != torch.float32:
            return list(params)
        taken: list[tuple[Tensor, Tensor, Mapping[str, Tensor]]] = []  # parameter, gradient, state
        taken_index: list[int] = []
        rest: list[Tensor] = []
        plain_f32 = kernels.plain_f32
        for i, (p, state) in enumerate(zip(params, states, strict=True)):
            grad = p.grad
            if grad is not None and grad.layout == torch.strided and p.numel() > 0 and plain_f32(p) and plain_f32(grad):
                taken.append((p, grad, state))
                taken_index.append(i)
            else:
                rest.append(p)
        if not taken:
            return list(params)
        plan = self._in_place_plan([p for p, _, _ in taken])
        if plan is None:
            return list(params)  # parameters sharing memory: the kernel may step tensors on several threads at once
        if plan.order is not None:
            taken = [taken[i] for i in plan.order]
            taken_index = [taken_index[i] for i in plan.order]
        if step.dim() > 0 and (rest or plan.order is not None):  # the step counts of the tensors taken, in their order
            step = step[taken_index]
        tensors, grads, state_of = [p for p, _, _ in taken], [g for _, g, _ in taken], [s for *_, s in taken]
        momenta = [f"m{i}" for i in range(len(self.config.momentum_decays))]
        from ..functional import decoupled_updates_  # (both import the nets)

        shared_net = self._kernel_net(step, step) if step.dim() == 0 else None  # else each batch's step counts
        for batch, views, layout in plan.batches:
            part = tensors[batch]
            net = shared_net if shared_net is not None else self._kernel_net(step[batch], step)
            # the steps' buffer, kept from step to step (CPU float32, as the kernel's parameters)
            direction = None
            if layout is not None:
                direction = self.scratch.take("in_place_steps", (layout.coordinates,), part[0], torch.float32)
            ran = kernels.adafac_tensors_step(
                views, grads[batch], part,
                [[state[k] for state in state_of[batch]] for k in momenta], [state["v"] for state in state_of[batch]],
                [state["row"] for state in state_of[batch]], [state["col"] for state in state_of[batch]],
                net, plan.scales[batch], None if layout is not None else (lr, weight_decay), direction,
            )  # fmt: skip
            if not ran:  # the tensors of this batch on are left to the caller, untouched
                return list(params) if batch.start == 0 else [*tensors[batch.start :], *rest]
            if layout is not None and direction is not None:
                self._orthogonalize_steps_(direction, layout)
                steps = [direction[a:b].view_as(p) for ((a, b), *_), p in zip(layout.bounds, part, strict=True)]
                decoupled_updates_(part, steps, lr, weight_decay)
            torch.autograd.graph.increment_version(part)  # written through their storage, as an in-place op would
        return rest

    def _in_place_plan(self, tensors: Sequence[Tensor]) -> _InPlacePlan | None:
        """The :class:`_InPlacePlan` of :meth:`step_in_place` for these parameters (in the caller's order), ``None`` if
        any two share memory. A function of their addresses and shapes and of the settings it reads alone, so it is
        kept, keyed by them, for the next steps (a few at a time: one per param group, say): a small model's step
        would otherwise spend as long sorting, sizing and checking its tensors as the kernel takes to step them."""
        c = self.config
        settings = (self.in_place_step_coordinates, c.newton_schulz_steps, c.mup, c.mup_base_fan_in)
        key = tuple((p.data_ptr(), p.shape) for p in tensors)
        if (settings, key) in self._in_place_plans:
            return self._in_place_plans[settings, key]
        spans = sorted((address, address + 4 * shape.numel()) for address, shape in key)
        plan = None
        if not any(end > start for (_, end), (start, _) in zip(spans, spans[1:], strict=False)):
            from ..packing import consecutive_batches  # (it imports the nets)

            orthogonal = c.newton_schulz_steps > 0
            # matrices of one shape consecutive (stably, as a pack orders them)
            order = sorted(range(len(key)), key=lambda i: (len(key[i][1]), tuple(key[i][1]))) if orthogonal else None
            shapes = [tuple(key[i][1]) for i in order] if order is not None else [tuple(shape) for _, shape in key]
            sizes = [math.prod(shape) for shape in shapes]
            batches = consecutive_batches(sizes, self.in_place_step_coordinates) if orthogonal else [slice(0, len(key))]
            plan = _InPlacePlan(
                order=order,
                scales=torch.tensor([self.step_scale(shape) for shape in shapes], dtype=torch.float32, device="cpu"),
                batches=[
                    (
                        batch,
                        [matrix_view(shape) for shape in shapes[batch]],
                        factored_pack_layout(tuple(shapes[batch])) if orthogonal else None,
                    )
                    for batch in batches
                ],
            )
        if len(self._in_place_plans) >= self.kept_in_place_plans:
            self._in_place_plans.clear()
        self._in_place_plans[settings, key] = plan
        return plan

    @torch.no_grad()
    def _blocked_forward(
        self,
        grad: Tensor,
        param: Tensor,
        state: Mapping[str, Tensor],
        step: Tensor,
        shape: tuple[int, ...],
        out_state: Mapping[str, Tensor] | None,
        update: DecoupledUpdate | None = None,
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """:meth:`forward` without autograd, over blocks of whole rows of the matrix view.

        The same math in two passes, so the transient memory is a few floats per coordinate of a block or chunk
        instead of ``16 + 2 * hidden_size`` per coordinate of the tensor (whose allocation, page by page, cost more
        than the arithmetic): the first pass updates the state and sums each feature's squares without making the
        features (chunks of :attr:`sums_block_factor` blocks, two scratch floats per coordinate); the second makes
        the features block by block (about :meth:`block_coordinates` coordinates: ``16 + 2 * hidden_size`` floats
        per coordinate of one block) and runs the MLP with the normalisation folded into its first layer. Equal
        to the one-shot path up to float rounding. ``out_state`` (the state storage itself) receives the new
        state in place; with ``update`` the decoupled update is applied to ``param`` here, as the optimizer's
        whole-tensor step would (:func:`~learned_optim.functional.decoupled_update_`), and ``None`` returned as the
        step. Its large intermediates live in :attr:`scratch`. The native kernel runs the same two passes, each one
        sweep over the tensor (:meth:`_native_forward`).
        """
        c = self.config
        rows, cols = matrix_view(shape)
        n, j, dtype = grad.shape[0], len(c.momentum_decays), grad.dtype
        beta = self.momentum_decay.to(dtype).squeeze(1)
        # Adafactor's statistics first: the preconditioner of every block needs the new row and column means
        take = functools.partial(self.scratch.take, like=grad)  # buffers kept from step to step
        grad_rc = grad.view(rows, cols)
        grad_sq = torch.mul(grad_rc, grad_rc, out=take("square", (rows, cols)))  # also the first pass's g^2
        wide = wide_sums_directly(grad)  # every sum of g^2-size terms in float64 at once, no check read back
        row_mean, col_mean = checked_factored_means(
            grad_sq,
            # (ATen's vector_norm over dim 0 is 3-12x slower than a sum of the squares down the columns)
            lambda: (
                torch.linalg.vector_norm(grad_rc, dim=1).square_().div_(cols),
                torch.sum(grad_sq, dim=0).div_(rows),
            ),
        )
        row_mean, col_mean = row_mean.add_(c.factored_eps), col_mean.add_(c.factored_eps)
        decay = self.factored_decay.to(dtype)
        # into the state storage where given (a vector's row statistics are K floats per coordinate)
        row = ema(state["row"], row_mean.unsqueeze(1), decay, out=out_state["row"] if out_state else None)
        col = ema(state["col"], col_mean.unsqueeze(1), decay, out=out_state["col"] if out_state else None)
        # the row factor and the row features are made per chunk or block (a vector has a row per coordinate)
        row_scale, col_factor = row.mean(dim=0), torch.rsqrt(col).t().contiguous()  # (K,), (K, C)
        names = [*(f"m{i}" for i in range(j)), "v"]
        new = {k: out_state[k] if out_state is not None else torch.empty_like(state[k]) for k in names}
        new["row"], new["col"] = row, col
        v_correction = self._v_correction(step).to(dtype)  # a 0-d tensor: a float would make a GPU step wait for it
        block_rows = min(rows, max(1, self.block_coordinates(grad.device) // cols))
        blocks = [(r, min(r + block_rows, rows)) for r in range(0, rows, block_rows)]

        def state_and_sums() -> Tensor:
            r"""Pass 1 on ATen: the new state, and the features' sums of squares, without the features.

            Over chunks of :attr:`sums_block_factor` blocks, the state update in place and each sum from the new
            state (:math:`s^2 = w = 1 / (k_v v' + \epsilon)`, :math:`\phi_k^2 = a_k^2[r]\, e_k^2[c]`):

            .. math:: \textstyle\sum m_j^2 s^2 = \langle m_j^2, w \rangle,\quad
                \sum (g \phi_k)^2 = \langle a_k^2, G^2 e_k^2 \rangle,\quad
                \sum (m_k \phi_k)^2 = \langle a_k^2, M_k^2 e_k^2 \rangle

            with :math:`G^2, M_k^2` the squares as ``(rows, cols)`` matrices (a product with :math:`a^2` over the rows
            each, then with :math:`e^2`): two chunk-sized scratch vectors instead of the 16 feature rows."""
            chunk_rows = min(rows, block_rows * self.sums_block_factor)
            vectors = take("work", (2, chunk_rows * cols))
            e2 = col_factor.square()  # phi_k^2 = a2[k, r] e2[k, c]
            sums = grad.new_zeros(4 + 4 * j, dtype=torch.float64)

            def chunk_sums(r0: int, r1: int) -> Tensor:
                """The state of rows ``r0:r1`` updated in place, and their sums of squares in float64."""
                a, b = r0 * cols, r1 * cols
                g, m_new, v_new = grad[a:b], [new[f"m{i}"][a:b] for i in range(j)], new["v"][a:b]
                for i in range(j):
                    torch.lerp(state[f"m{i}"][a:b], g, 1.0 - beta[i], out=m_new[i])
                torch.mul(state["v"][a:b], c.second_moment_decay, out=v_new).addcmul_(
                    g, g, value=1.0 - c.second_moment_decay
                )
                w, square = vectors[0, : b - a], vectors[1, : b - a]
                torch.mul(v_new, v_correction, out=w).add_(c.moment_eps).reciprocal_()
                # a^2 in one op (a vector's rows are (n, K): three ops over them cost 4x one); (K, chunk rows) as the
                # transpose of a row-major block: no copy
                a2, chunk = factored_row_factor(row[r0:r1], row_scale, squared=True).t(), (r1 - r0, cols)
                # reduced over the rows first: a (K, cols) transient, for a vector (cols 1) too
                ratio, narrow_mphi = [], []
                for i in range(j):
                    torch.mul(m_new[i], m_new[i], out=square)
                    ratio.append(torch.dot(square, w))
                    if not wide:  # the float32 sums share this square; all K rows of a2 in one product: as cheap as one
                        narrow_mphi.append(torch.dot(torch.mm(a2, square.view(chunk))[i], e2[i]))

                def narrow_phi() -> tuple[Tensor, Tensor]:
                    return (torch.mm(a2, grad_sq[r0:r1]) * e2).sum(dim=1), torch.stack(narrow_mphi)

                def wide_phi() -> tuple[Tensor, Tensor]:
                    a2w, e2w = a2.double(), e2.double()
                    mphi = [
                        torch.dot(torch.mm(a2w, m.double().square().view(chunk))[i], e2w[i])
                        for i, m in enumerate(m_new)
                    ]
                    return (torch.mm(a2w, grad_sq[r0:r1].double()) * e2w).sum(dim=1), torch.stack(mphi)

                gphi, mphi = checked_sums(grad, narrow_phi, wide_phi)  # sums over the rows of g^2 and m^2
                plain_rows = (g, param[a:b], *m_new, v_new)
                plain = checked_sums(  # sums of n g^2 (of n g^4 for v: its float32 sum overflows from |g| ~ 1e9 on)
                    grad,
                    lambda: torch.stack([torch.dot(x, x) for x in plain_rows]).double(),
                    lambda: torch.stack(
                        [torch.linalg.vector_norm(x, dtype=torch.float64) for x in plain_rows]
                    ).square(),
                )
                rest = [torch.stack([*ratio, w.sum()]), gphi, mphi]
                return torch.cat([plain, *(x.double() for x in rest)])

            for r0 in range(0, rows, chunk_rows):
                sums += chunk_sums(r0, min(r0 + chunk_rows, rows))
            return sums

        def direction_and_sum_squares() -> tuple[Tensor, Tensor, Tensor]:
            """Pass 2 on ATen: the features again, block by block, through the MLP; the raw direction, its sum
            of squares and the mean last hidden activations (zero without the magnitude head). The dense rows as in
            :meth:`features`, the normalisation in the first layer's weight."""
            # the step stays in the scratch where it is applied here (update)
            direction = take("direction", (n,)) if update is not None else grad.new_empty(n)
            features = take("dense", (4 + 4 * j, block_rows * cols))
            # a row of ones under the activations: the layers' biases ride in their GEMMs (an addmm copies its bias
            # into the output first, a pass over it per layer)
            acts = [take(f"hidden{i}", (hidden + 1, block_rows * cols)) for i in range(2)]
            for buffer in acts:
                buffer[hidden].fill_(1.0)
            activation_sums = grad.new_zeros(hidden, dtype=torch.float64)  # of the last hidden layer (magnitude head)
            copied = [grad, param, *(new[k] for k in names)]  # rows 0 .. 2 + J as they are
            # the row factors and row terms of up to `span` rows at a time: a matrix's all at once (a block's would
            # cost a few ops per block), a vector's (a row per coordinate) block by block
            span, span_end = block_rows * max(1, self.block_coordinates(grad.device) // block_rows), 0
            for r0, r1 in blocks:
                if r1 > span_end:
                    span_start, span_end = r0, min(rows, r0 + span)
                    stats = row[span_start:span_end]
                    row_factors = factored_row_factor(stats, row_scale).t()  # (K, span rows)
                    row_terms = torch.addmm(bias.unsqueeze(1), row_weight, self._factored_features(stats))
                a, b = r0 * cols, r1 * cols
                u = features[:, : b - a]
                for target, source in zip(u[: len(copied)], copied, strict=True):
                    target.copy_(source[a:b])
                m, rsqrt, phi = u[2 : 2 + j], u[3 + 2 * j], u[4 + 2 * j : 4 + 3 * j]
                torch.mul(u[2 + j], v_correction, out=rsqrt).add_(c.moment_eps).rsqrt_()
                torch.mul(m, rsqrt, out=u[3 + j : 3 + 2 * j])
                in_span = slice(r0 - span_start, r1 - span_start)
                torch.mul(row_factors[:, in_span, None], col_factor[:, None, :], out=phi.view(j, r1 - r0, cols))
                torch.mul(phi, m, out=u[4 + 3 * j :])
                phi.mul_(u[0])
                x = acts[0][:hidden, : b - a]
                torch.add(row_terms[:, in_span, None], col_term[:, None, :], out=x.view(hidden, r1 - r0, cols))
                x.addmm_(weight, u).relu_()
                for index, layer_weight in enumerate(biased_weights):  # x and the ones row below it
                    last = index == len(biased_weights) - 1
                    if last and self.magnitude_head is not None:
                        activation_sums += acts[index % 2][:hidden, : b - a].sum(dim=1, dtype=torch.float64)
                    y = direction[a:b].unsqueeze(0) if last else acts[(index + 1) % 2][:hidden, : b - a]
                    torch.mm(layer_weight, acts[index % 2][:, : b - a], out=y)
                    if not last:
                        y.relu_()
            return direction, torch.dot(direction, direction), activation_sums / n

        sums = state_and_sums()
        scale, col_features = self._feature_scale(beta, step, grad), self._factored_features(col)
        # the row features' mean squares without making them: r_k^2 and (r_k + eps)^-1, over the rows
        # (a vector's r_k^2: a float32 Gram matrix of its (n, K) statistics, 4x faster than their float64 squares)
        inverse = row.add(c.factored_rsqrt_eps).reciprocal_()
        row_ms = checked_sums(
            grad,
            lambda: torch.cat([torch.mm(row.t(), row).diagonal() / rows, inverse.mean(dim=0)]).double(),
            lambda: torch.cat([mean_squares(row, dim=0), inverse.double().mean(dim=0)]),
        )
        col_ms = mean_squares(col_features, dim=1)
        weight, row_weight, col_weight, bias = self._first_layer(sums / n, scale, row_ms, col_ms, step)
        col_term = col_weight @ col_features  # (H, cols)
        hidden = self.config.hidden_size
        biased_weights = [  # [W | b] of the layers after the first
            torch.cat([m.weight, m.bias.unsqueeze(1)], dim=1) for m in list(self.mlp)[1:] if isinstance(m, nn.Linear)
        ]
        direction, sum_squares, mean_activations = direction_and_sum_squares()
        if self._orthogonalizes(rows, cols):  # (the iteration reads the direction before it writes it back)
            direction.view(-1, rows, cols).copy_(self._orthogonalized(direction, rows, cols))
            sum_squares = torch.dot(direction, direction)
        factor = self._magnitude_factor(mean_activations)
        magnitude = self._orthogonal_magnitude(self._magnitude(sums / n, scale), rows, cols)
        step_scale = -self.step_scale(shape) * magnitude * factor
        if c.normalize_direction:
            mean_square = torch.as_tensor(sum_squares / n, dtype=dtype)
            if c.direction_clip is not None:  # normalised, clipped, then scaled
                direction.mul_(torch.rsqrt(mean_square + c.direction_rms_eps))
                direction.clamp_(-c.direction_clip, c.direction_clip).mul_(step_scale)
            else:
                direction.mul_(torch.rsqrt(mean_square + c.direction_rms_eps) * step_scale)
        else:
            direction.mul_(step_scale)
        if update is None:
            return direction, new
        from ..functional import decoupled_update_  # (both import the nets)

        lr, weight_decay = update
        if isinstance(lr, Tensor):
            lr = lr.to(device=param.device, dtype=param.dtype)
        decoupled_update_(param, direction, lr, weight_decay)
        return None, new
