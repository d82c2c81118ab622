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

**Packed calls.** A rule whose class sets ``packs_segments = True`` lets the optimizer step many tensors
of a param group in one call: their coordinates are concatenated (then zero rows up to a multiple of the
optimizer's row alignment), and the layout is passed as ``segments=`` (a :class:`Segments`). Then
``stats`` is :meth:`UpdateRule.segment_stats` (the per-tensor statistics of every segment, stacked along
a new first axis, or ``None``), and ``forward`` must compute for the rows of each segment what the call
on that tensor alone computes (per-tensor quantities by segment, e.g. ``segments.expand(stats)`` per row,
``segments.mean(x)`` per segment); padding rows may get any value. Every packed tensor has the same step
count, unless the class sets ``per_tensor_steps = True``: then ``step`` may be one count per segment, an
``(S,)`` tensor, where the tensors' counts differ (layers unfrozen at different times, parameters that get no
gradient at some steps), so that they still go in one call. Rules without per-tensor quantities just ignore
``segments``.

*Whole-tensor rules* (class attribute ``whole_tensor = True``) need more than a chunk of coordinates:
the tensor's shape (factored statistics, a per-shape step scale) and reductions of their own output
over the tensor (a per-tensor normalised step). Both callers then call ``forward`` once per tensor on
the whole flat tensor, never on chunks or padded rows, with the keyword ``shape=`` the parameter's
shape. Such a rule may also keep *per-tensor state* whose shapes depend on the parameter's shape
(:meth:`UpdateRule.tensor_state_shapes`, e.g. Adafactor's row and column statistics); it travels in the
same ``state`` dict as the per-coordinate state, and :meth:`UpdateRule.init_state` creates it when given
``shape=``. A whole-tensor rule that also sets ``packs_segments`` takes packed whole tensors from the
optimizer: ``segments=`` with ``shapes=`` (one shape per segment, no chunks), and its per-tensor state
packed too (each key's per-tensor tensors concatenated along their first axis, in segment order).

**Applying the update itself.** A rule whose class sets ``applies_update = True`` may be passed
``update=(lr, weight_decay)`` (a :data:`DecoupledUpdate`) by the optimizer's in-place path (eager, no
autograd, ``param`` the parameter's storage or the packed copy the optimizer writes back, in the compute
dtype). It may then write ``theta * (1 - lr * weight_decay) + lr * delta`` into ``param`` itself and return
``None`` as its delta, which saves the caller's sweep over the tensor (a native kernel does it in the sweep
that scales its step); or ignore it and return ``delta`` as usual.

**Stepping tensors in place.** :meth:`UpdateRule.step_in_place` lets a rule step tensors of a param group
(eager, no autograd, one step count, or one per tensor with ``per_tensor_steps``, not ``maximize``) in their own
storage in one call, e.g. a native kernel
given each tensor's addresses, with nothing packed or copied; it returns the tensors it left, which the
optimizer steps as usual. The result must be what stepping each tensor alone gives. The default takes none.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._scratch import Scratch
from .._validation import check_value

__all__ = [
    "NetConfig",
    "Provenance",
    "UpdateRule",
    "Segments",
    "DecoupledUpdate",
    "FAMILIES",
    "register_family",
    "build_rule",
    "functional_update",
]


#: ``(lr, weight_decay)`` of the step :math:`\theta \leftarrow \theta (1 - \eta\lambda) + \eta\Delta`, passed as
#: ``update=`` to a rule that applies it itself (see "Applying the update itself" above).
DecoupledUpdate = tuple[float | Tensor, float]


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


@dataclasses.dataclass(frozen=True, eq=False)
class Segments:
    r"""Layout of a packed batch: tensors of ``sizes`` coordinates one after the other, then zero rows up to
    ``rows`` (``rows >= sum(sizes)``). Segment :math:`s` is rows :math:`[o_s, o_s + n_s)` with
    :math:`o_s = \sum_{j<s} n_j`."""

    sizes: tuple[int, ...]
    rows: int
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 1 or sum(self.sizes) > self.rows:
            raise ValueError(f"Segments: sizes {self.sizes} must be >= 1 each and fit in {self.rows} rows")

    def __len__(self) -> int:
        return len(self.sizes)

    def slices(self) -> list[slice]:
        """The rows of each segment."""
        ends = list(itertools.accumulate(self.sizes))
        return [slice(end - n, end) for n, end in zip(self.sizes, ends, strict=True)]

    @functools.cached_property
    def index(self) -> Tensor:
        """``(rows,)`` int64: the segment of each row; padding rows get ``len(self)``."""
        counts = torch.tensor([*self.sizes, self.rows - sum(self.sizes)], device=self.device)
        return torch.repeat_interleave(torch.arange(len(self) + 1, device=self.device), counts)

    def expand(self, per_segment: Tensor, padding: float = 0.0) -> Tensor:
        """``(k, *S)`` per-segment values to ``(rows, *S)`` per row (each segment's value on its rows, ``padding``
        on the padding rows)."""
        padded = torch.cat([per_segment, per_segment.new_full((1, *per_segment.shape[1:]), padding)])
        return padded.index_select(0, self.index)

    def sum(self, per_row: Tensor) -> Tensor:
        r"""``(rows, *S)`` per-row values to ``(k, *S)`` sums over each segment's rows, :math:`\sum_{i \in s} x_i`
        (padding excluded)."""
        out = per_row.new_zeros((len(self) + 1, *per_row.shape[1:]))
        return out.index_add_(0, self.index, per_row)[:-1]

    def mean(self, per_row: Tensor) -> Tensor:
        r"""Per-segment means :math:`\frac{1}{n_s}\sum_{i \in s} x_i`, shape ``(k, *S)``."""
        sizes = torch.tensor(self.sizes, dtype=per_row.dtype, device=per_row.device)
        return self.sum(per_row) / sizes.view(-1, *([1] * (per_row.dim() - 1)))


@dataclasses.dataclass
class Provenance:
    """The lineage of a net's weights, which :func:`learned_optim.save_pretrained` writes into config.json.

    ``origin``: set by :func:`learned_optim.from_pretrained`, the checkpoint the net was loaded from
    (``parent``: its :func:`~learned_optim.hub.parent_record`, saved as ``training.parent``;
    ``description`` and ``optimizer`` defaults, inherited when saving). ``adaptations``: one record per
    :func:`learned_optim.adapt` run since (saved as ``training.adaptation``). A fresh net has neither.
    """

    origin: dict[str, Any] | None = None
    adaptations: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class UpdateRule(nn.Module):
    """Base class of the coordinatewise update rules (see the module docstring for the contract)."""

    #: Name of the family in config.json and in :data:`FAMILIES`.
    family: ClassVar[str]
    #: The :class:`NetConfig` subclass holding this family's hyperparameters.
    config_class: ClassVar[type[NetConfig]]
    #: Where the weights came from (:class:`Provenance`), what ``save_pretrained`` records of their lineage.
    provenance: Provenance
    #: ``forward`` takes ``segments=`` and steps packed tensors (see "Packed calls" in the module docstring).
    packs_segments: ClassVar[bool] = False
    #: ``forward`` runs on whole tensors and takes ``shape=`` (see the module docstring).
    whole_tensor: ClassVar[bool] = False
    #: ``forward`` takes ``update=`` and may apply the decoupled update itself (see the module docstring).
    applies_update: ClassVar[bool] = False
    #: The packed ``forward`` and :meth:`step_in_place` take one step count per tensor, ``step`` ``(S,)``, where
    #: the tensors' counts differ (see "Packed calls" in the module docstring); else the optimizer packs and steps
    #: the tensors of each count apart.
    per_tensor_steps: ClassVar[bool] = False
    #: The optimizer's ``lr`` when none is given: 1.0 where ``lr`` multiplies the learned step; a real
    #: learning rate (e.g. 1e-3) for nets whose step has a fixed size per unit of ``lr``.
    default_lr: ClassVar[float] = 1.0

    def __init__(self, config: NetConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None:
            config = self.config_class(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self.provenance = Provenance()
        #: Buffers for the large intermediates of a step without autograd on the CPU, kept from step to step
        #: (:class:`~learned_optim._scratch.Scratch`; the packed step's, :func:`learned_optim.packing.packed_step`).
        self.scratch = Scratch()

    def _apply(self, fn: Any, recurse: bool = True) -> UpdateRule:
        """``nn.Module``'s conversions (``.to``, ``.cuda``, ``.double``...), with :attr:`scratch` emptied: its buffers
        were sized and typed for the rule as it was."""
        self.scratch.clear()
        return super()._apply(fn, recurse)

    @property
    def uses_lr_ratio(self) -> bool:
        r"""Whether the net reads the lr ratio :math:`\rho_t = \eta_t / \max_{s \le t} \eta_s` (where the user's
        schedule stands relative to its peak; :meth:`set_lr_ratio`). The optimizer then tracks each param group's
        largest lr (``"peak_lr"``, saved with its ``state_dict``) and sets the ratio before stepping the group; the
        meta-trainer's unroll sets it from its schedule (:func:`learned_optim.schedules.lr_ratio`)."""
        return False

    def set_lr_ratio(self, ratio: float) -> None:
        """Set the lr ratio the following calls see (see :attr:`uses_lr_ratio`); nets that do not read it ignore it."""

    def steps_natively(self, device: torch.device) -> bool:
        """Whether :meth:`forward` without autograd on ``device`` runs a native kernel (:mod:`learned_optim.kernels`,
        kept by its guard on this machine). ``torch.func.vmap`` cannot batch one: a batched caller
        (:func:`learned_optim.meta.unroll.unroll_particles`) steps the large tensors of such a net one call at a time
        instead, on the kernel. False here: nets whose kernel is not worth it under a batched caller leave it so."""
        return False

    def reconfigured(self, **settings: Any) -> UpdateRule:
        """These weights in a net of the same family whose configuration has ``settings`` changed: for settings the
        weights do not depend on (a decay, a clip, an epsilon), e.g. ``rule.reconfigured(second_moment_decay=0.95)``,
        or that :meth:`weights_for` maps (an added input with zero weight).
        A :class:`ValueError` when a field is unknown or invalid, or when a weight of the changed net differs in name
        or shape; the provenance is kept."""
        listing = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        try:
            changed = build_rule(self.family, {**self.config.to_dict(), **settings})
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"net settings {listing}: {err}") from None
        weights, needed = self.weights_for(changed), changed.state_dict()
        differing = sorted(
            k
            for k in weights.keys() | needed.keys()
            if k not in weights or k not in needed or weights[k].shape != needed[k].shape
        )
        if differing:
            raise ValueError(f"net settings {listing} change the net's weights ({', '.join(differing)})")
        changed.to(dtype=self.compute_dtype, device=next(self.parameters()).device)
        changed.load_state_dict(weights, strict=True)
        changed.provenance = self.provenance
        changed.requires_grad_(any(p.requires_grad for p in self.parameters()))
        return changed

    def weights_for(self, changed: UpdateRule) -> dict[str, Tensor]:
        """This net's weights for ``changed``, a net of the same family with another configuration
        (:meth:`reconfigured`): its own state dict; a family may map them where the change keeps the function (a new
        input entering with zero weight)."""
        return self.state_dict()

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the net runs in: that of its weights (float32 unless converted); read every step, so found
        without ``parameters()``'s generators: the first parameter in its order."""
        weight = _first_parameter(self)
        if weight is None:
            raise ValueError(f"{type(self).__name__} has no parameters: no dtype to run in")
        return weight.dtype

    def step_in_place(
        self,
        params: Sequence[Tensor],
        states: Sequence[Mapping[str, Tensor]],
        step: Tensor,
        lr: float | Tensor,
        weight_decay: float,
    ) -> list[Tensor]:
        """Step those of ``params`` (their ``.grad``, their optimizer ``states``, the step count ``step`` shared by
        all, or one per tensor ``(S,)`` with :attr:`per_tensor_steps`, in :attr:`compute_dtype`) that this rule can
        in place, parameters and state, and return the others (see "Stepping tensors in place" in the module
        docstring). The default steps none."""
        return list(params)

    def cpu_chunk_size(self) -> int | None:
        """Coordinates per net call on the CPU's ATen path when the net knows better than the optimizer's
        default (:data:`learned_optim.optimizer.DEFAULT_CHUNK_SIZE`, sized for DM-LSTM's ~1.5 KB of temporaries per
        coordinate); ``None``: the default."""
        return None

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Trailing shape of each per-coordinate state tensor (the leading axis is the coordinate)."""
        raise NotImplementedError

    def tensor_state_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Full shape of each per-tensor state tensor of a parameter of ``shape`` (default: none).

        Only whole-tensor rules may keep such state; its names are the same for every shape.
        """
        return {}

    def init_state(
        self,
        numel: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        shape: tuple[int, ...] | torch.Size | None = None,
    ) -> dict[str, Tensor]:
        """Fresh state (all zeros) for a tensor of ``numel`` coordinates: the per-coordinate state, and the
        per-tensor state of a parameter of ``shape`` (``None``: a vector, ``(numel,)``)."""
        shape = (numel,) if shape is None else tuple(shape)
        if math.prod(shape) != numel:
            raise ValueError(f"init_state: shape {shape} does not have {numel} elements")
        state = {k: torch.zeros((numel, *s), device=device, dtype=dtype) for k, s in self.state_shapes().items()}
        for k, s in self.tensor_state_shapes(shape).items():
            state[k] = torch.zeros(s, device=device, dtype=dtype)
        return state

    def state_names(self) -> set[str]:
        """Names of all state tensors the rule keeps (per coordinate and per tensor)."""
        return set(self.state_shapes()) | set(self.tensor_state_shapes((1,)))

    def tensor_stats(self, grad: Tensor, param: Tensor, state: Mapping[str, Tensor], step: Tensor) -> Tensor | None:
        """Per-tensor statistics the per-coordinate update needs (default: none).

        Must be a mean over the tensor's coordinates (of any per-coordinate quantity): the optimizer
        combines the shards of an FSDP2-sharded tensor as the size-weighted mean of their statistics.
        """
        return None

    def segment_stats(
        self, grad: Tensor, param: Tensor, state: Mapping[str, Tensor], step: Tensor, segments: Segments
    ) -> Tensor | None:
        """:meth:`tensor_stats` of every segment of a packed batch, stacked along a new first axis (``None``
        for rules without statistics). Default: :meth:`tensor_stats` on each segment's rows (the same bits
        as per tensor); rules override it with a segment reduction."""
        if type(self).tensor_stats is UpdateRule.tensor_stats:  # no statistics: skip k calls returning None
            return None
        # each segment's step count (one per segment under per_tensor_steps)
        steps = list(step) if step.dim() > 0 else [step] * len(segments)
        per_segment = [
            self.tensor_stats(grad[s], param[s], {k: v[s] for k, v in state.items()}, count)
            for s, count in zip(segments.slices(), steps, strict=True)
        ]
        if any(t is None for t in per_segment):
            return None
        return torch.stack(typing.cast(list[Tensor], per_segment))

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
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items())


FAMILIES: dict[str, type[UpdateRule]] = {}


def _first_parameter(module: nn.Module) -> Tensor | None:
    """``next(module.parameters())``, ``None`` without parameters: the module's own first, then depth first."""
    for weight in module._parameters.values():
        if weight is not None:
            return weight
    for child in module._modules.values():
        if child is not None and (found := _first_parameter(child)) is not None:
            return found
    return None


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
    shape: tuple[int, ...] | torch.Size | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The update of a whole tensor with the net's weights given explicitly (meta-training caller).

    ``grad``/``param`` are the flat tensor; ``shape`` is the parameter's shape (``None``: a vector), passed
    on to whole-tensor rules. ``weights=None`` uses the module's own parameters. Differentiable in
    ``weights``, ``grad``, ``param`` and ``state``.
    """
    stats = rule.tensor_stats(grad, param, state, step)
    kwargs = {"shape": tuple(grad.shape) if shape is None else tuple(shape)} if rule.whole_tensor else {}
    if weights is None:
        return rule(grad, param, state, step, stats, **kwargs)
    return functional_call(rule, dict(weights), (grad, param, state, step, stats), kwargs)
