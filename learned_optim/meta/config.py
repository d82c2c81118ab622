"""Meta-training configuration: one dataclass tree, loadable from JSON or YAML, overridable by dotted keys.

A config file mirrors :class:`MetaTrainConfig`::

    name: l2o-lstm
    seed: 0
    net: {family: dm_lstm, config: {hidden_size: 20}}
    task: {family: digits-mlp20-sigmoid, kwargs: {batch_size: 128}}
    unroll: {trajectory_length: 100, segment_length: 20}
    objective: {kind: sum, split: train}
    meta_optimizer: {name: adam, lr: 1.0e-3, grad_clip: null}
    curriculum: {enabled: true, stages: [100, 200, 500]}
    imitation: {enabled: true}
    meta_epochs: 2000

Unknown keys are errors (a typo never silently falls back to a default). ``--set unroll.segment_length=10``
on the command line maps to :func:`apply_overrides`.

A file may start from another one with ``base: <name or path>`` (a bundled config's name, or a path relative
to the file): the base's mapping is read (recursively) and the file's keys are merged over it, sections key by
key, lists and scalars replaced whole. A family of fine-tunes that differ in one block is then one base file
and one short file per member::

    base: adafac-mlp-adam-magnitude-tbv-nomup-control
    name: adafac-mlp-adam-magnitude-tbv-nomup-sam
    regularizers: [{kind: sam, weight: 1, where: segment_end, rho: 0.05}]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

import torch
from torch import Tensor

from .._validation import check_value, positive_finite
from ..objectives import OBJECTIVES
from ..schedules import SCHEDULES

__all__ = [
    "NetSection",
    "TaskSection",
    "UnrollConfig",
    "ObjectiveConfig",
    "MetaOptimizerConfig",
    "CurriculumConfig",
    "ImitationConfig",
    "MAMLConfig",
    "CONFIG_DIR",
    "resolve_config_path",
    "build_meta_optimizer",
    "EstimatorConfig",
    "MetaTrainConfig",
    "load_config",
    "apply_overrides",
    "parse_override",
]

#: Meta-optimizer defaults per net family (SPEC §2): Adam 1e-3 for the LSTM nets and adafac_mlp, RMSprop 1e-2
#: for the MLP.
DEFAULT_META_OPTIMIZER = {
    "dm_lstm": ("adam", 1e-3),
    "rnnprop": ("adam", 1e-3),
    "mlp": ("rmsprop", 1e-2),
    "adafac_mlp": ("adam", 1e-3),
}

#: The torch optimizers that can train the net's weights, by config name.
META_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "sgd": torch.optim.SGD,
}
SPLITS = ("train", "val")


_S = TypeVar("_S", bound="_Section")


class _Section:
    """Mixin: strict construction from nested mappings and conversion back to plain JSON types."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # every section is a dataclass

    @classmethod
    def from_dict(cls: type[_S], values: Mapping[str, Any] | None, *, where: str = "") -> _S:
        values = dict(values or {})
        hints = get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"config{'.' + where if where else ''}: unknown field(s) {unknown}; known fields: {sorted(known)}"
            )
        kwargs = {}
        for key, value in values.items():
            name = f"{where}.{key}".strip(".")
            section = _section_type(hints[key])
            if section is not None and (value is None or isinstance(value, Mapping)):
                kwargs[key] = section.from_dict(value, where=name)
            elif section is not None:
                raise ValueError(
                    f"config.{name} is a section of fields {sorted(f.name for f in dataclasses.fields(section))}: "
                    f"give it a mapping (or set one field, e.g. --set {name}.<field>=...), got {value!r}"
                )
            else:
                kwargs[key] = check_value(f"config.{name}", hints[key], value)
        obj = cls(**kwargs)
        obj.validate(where or "config")
        return obj

    def validate(self, where: str) -> None:
        """Raise ``ValueError`` on out-of-range values (overridden per section)."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, _Section):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def _section_type(hint: Any) -> type[_Section] | None:
    if isinstance(hint, type) and issubclass(hint, _Section):
        return hint
    if get_origin(hint) in (Union, types.UnionType):
        for arg in get_args(hint):
            if isinstance(arg, type) and issubclass(arg, _Section):
                return arg
    return None


@dataclasses.dataclass
class NetSection(_Section):
    """Which update rule to meta-train: a family of :data:`learned_optim.nets.FAMILIES` and its config."""

    family: str | None = "dm_lstm"
    config: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TaskSection(_Section):
    """The optimizee distribution: ``learned_optim.tasks.make_family(family, **kwargs)``.

    ``family`` may also be ``"package.module:attribute"``, a :class:`~learned_optim.tasks.base.TaskFamily`
    subclass or factory called with ``kwargs`` (for task families defined outside the package).
    ``eval_kwargs`` override ``kwargs`` for the curriculum's evaluation runs.
    """

    family: str = "digits-mlp20-sigmoid"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class UnrollConfig(_Section):
    r"""Truncated-BPTT unroll of the learned optimizer (see :mod:`learned_optim.meta.unroll`).

    Fields:
        trajectory_length: optimizee steps per trajectory (one meta-epoch); replaced by the current
            curriculum stage's length when the curriculum is enabled.
        segment_length: steps per truncation segment; each segment is one meta-gradient step.
        second_order: keep the optimizee gradient in the graph (second-order terms); default detached.
        checkpoint_steps: recompute each step in the backward pass (``torch.utils.checkpoint``) to bound
            the memory of long segments.
        max_param_norm: divergence guard bound on the global norm of theta, used when the task sets no
            ``divergence_bound`` of its own (``None``: only non-finite values trigger the guard).
        diverged_loss_factor: a frozen (diverged) run counts the loss ``factor * max(f_0, f_frozen)``
            for every remaining step.
        lr: the inner learning rate :math:`\eta` of :math:`\theta \leftarrow \theta + \eta\Delta` (``None``:
            the net's ``default_lr``: 1 where ``lr`` multiplies a learned step, 1e-3 for ``adafac_mlp``); the
            curriculum's evaluation runs and the checkpoint's default ``lr`` use it.
        lr_range: ``[lo, hi]``: each training trajectory draws its own :math:`\eta` log-uniformly in this range
            (for a net whose step is ``lr`` times a learned direction: robustness to the user's lr and
            schedule); ``None``: every trajectory uses ``lr``.
        schedule: the inner lr's schedule over each trajectory (one of :data:`~learned_optim.schedules.SCHEDULES`):
            step :math:`t` of a trajectory of :math:`T` steps uses
            :math:`\eta \cdot` :func:`~learned_optim.schedules.lr_factor` ``(schedule, t, T)``; ``"cosine"`` is the
            warm-up and cosine decay to 0 of the benchmark suite and of the checkpoints' recommended schedule,
            so the net meets in meta-training the small late steps it meets in use; ``"constant"``: :math:`\eta`.
        weight_decay: the inner decoupled weight decay :math:`\lambda` of
            :math:`\theta \leftarrow \theta (1 - \eta_t\lambda) + \eta_t\Delta` (AdamW's; default 0: no decay), used
            when ``weight_decays`` is ``None`` and by the curriculum's evaluation runs.
        weight_decays: each training trajectory draws its :math:`\lambda` uniformly from this list (e.g. ``[0,
            0.01, 0.1, 0.3, 1]``: the user's weight decay stays outside the net, which then meets in meta-training
            the decays it meets in use); ``None``: every trajectory uses ``weight_decay``. Imitation segments
            follow their teacher's own step, without decay.
    """

    trajectory_length: int = 100
    segment_length: int = 20
    second_order: bool = False
    checkpoint_steps: bool = False
    max_param_norm: float | None = 1e4
    diverged_loss_factor: float = 10.0
    lr: float | None = None
    lr_range: list[float] | None = None
    schedule: str = "constant"
    weight_decay: float = 0.0
    weight_decays: list[float] | None = None

    def validate(self, where: str) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{where}.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.lr is not None and not positive_finite(self.lr):
            raise ValueError(f"{where}.lr must be positive and finite, or null")
        if self.lr_range is not None and not (
            len(self.lr_range) == 2 and positive_finite(self.lr_range[1]) and 0 < self.lr_range[0] <= self.lr_range[1]
        ):
            raise ValueError(f"{where}.lr_range must be [lo, hi] with 0 < lo <= hi < inf, or null")
        if self.trajectory_length < 1 or self.segment_length < 1:
            raise ValueError(f"{where}: trajectory_length and segment_length must be >= 1")
        if self.max_param_norm is not None and not positive_finite(self.max_param_norm):
            raise ValueError(f"{where}: max_param_norm must be positive and finite, or null")
        if not (positive_finite(self.diverged_loss_factor) and self.diverged_loss_factor >= 1):
            raise ValueError(f"{where}: diverged_loss_factor must be finite and >= 1")
        # weight_decay is used even with a list (the curriculum's evaluation runs): both are checked
        decays = [self.weight_decay, *(self.weight_decays or [])]
        if self.weight_decays == [] or not all(d == 0 or positive_finite(d) for d in decays):
            raise ValueError(f"{where}: weight_decay and weight_decays must be finite and >= 0 (a non-empty list)")
        top_lr = self.lr_range[1] if self.lr_range is not None else self.lr
        if top_lr is not None and top_lr * max(decays) >= 1:  # theta (1 - lr wd) would flip or vanish
            raise ValueError(f"{where}: lr {top_lr:g} x weight decay {max(decays):g} must be < 1")


@dataclasses.dataclass
class ObjectiveConfig(_Section):
    """Meta-objective ``kind`` (one of ``sum``, ``last``, ``log``, ``log_last``; see
    :mod:`learned_optim.objectives`) on the losses of ``split``: ``train`` (train-by-train) or
    ``val`` (train-by-validation: the optimizee trains on train batches, the meta-loss uses val batches)."""

    kind: str = "sum"
    split: str = "train"

    def validate(self, where: str) -> None:
        if self.kind not in OBJECTIVES:
            raise ValueError(f"{where}.kind: {self.kind!r} is not one of {OBJECTIVES}")
        if self.split not in SPLITS:
            raise ValueError(f"{where}.split: {self.split!r} is not one of {SPLITS}")


@dataclasses.dataclass
class MetaOptimizerConfig(_Section):
    """The optimizer of the net's weights. ``name``/``lr`` default per net family (Adam 1e-3 for
    ``dm_lstm``/``rnnprop``, RMSprop 1e-2 for ``mlp``). ``grad_clip`` clips the global norm of the
    meta-gradient (``None``: no clipping). ``kwargs`` go to the torch optimizer."""

    name: str | None = None
    lr: float | None = None
    grad_clip: float | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self, where: str) -> None:
        if self.name is not None and self.name.lower() not in META_OPTIMIZERS:
            raise ValueError(f"{where}.name: {self.name!r} is not one of {', '.join(META_OPTIMIZERS)}")
        if self.lr is not None and not positive_finite(self.lr):
            raise ValueError(f"{where}.lr must be positive and finite")
        if self.grad_clip is not None and not positive_finite(self.grad_clip):
            raise ValueError(f"{where}.grad_clip must be positive and finite, or null")

    def resolved(self, family: str) -> tuple[str, float]:
        name, lr = DEFAULT_META_OPTIMIZER.get(family, ("adam", 1e-3))
        return (self.name or name).lower(), float(self.lr if self.lr is not None else lr)


@dataclasses.dataclass
class CurriculumConfig(_Section):
    """Curriculum of trajectory lengths (Chen et al., 2020); see :mod:`learned_optim.meta.curriculum`."""

    enabled: bool = False
    stages: list[int] = dataclasses.field(default_factory=lambda: [100, 200, 500, 1000, 1500, 2000, 2500, 3000])
    eval_every: int = 100
    eval_runs: int = 20
    min_evals: int = 3
    score: str = "final"

    def validate(self, where: str) -> None:
        if not self.stages or any(int(s) < 1 for s in self.stages):
            raise ValueError(f"{where}.stages must be a non-empty list of positive lengths")
        if self.eval_every < 1 or self.eval_runs < 1 or self.min_evals < 1:
            raise ValueError(f"{where}: eval_every, eval_runs and min_evals must be >= 1")
        if self.score not in ("final", "mean"):
            raise ValueError(f"{where}.score must be 'final' or 'mean'")


@dataclasses.dataclass
class ImitationConfig(_Section):
    """Imitation of Adam (Chen et al., 2020); see :mod:`learned_optim.meta.imitation`.

    ``probabilities[stage]`` is the chance that a meta-epoch imitates (the last entry is reused past
    the end; stage 0 when the curriculum is off). The teacher is Adam with ``teacher_lr``; the net is
    fitted by its own Adam with ``lr``.
    """

    enabled: bool = False
    probabilities: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.1, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3])
    teacher_lr: float = 0.01
    teacher_betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    teacher_eps: float = 1e-8
    lr: float = 1e-3

    def validate(self, where: str) -> None:
        if not self.probabilities or any(not 0.0 <= p <= 1.0 for p in self.probabilities):
            raise ValueError(f"{where}.probabilities must be a non-empty list of values in [0, 1]")
        if not all(positive_finite(x) for x in (self.teacher_lr, self.teacher_eps, self.lr)):
            raise ValueError(f"{where}: teacher_lr, teacher_eps and lr must be positive and finite")
        if len(self.teacher_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.teacher_betas):
            raise ValueError(f"{where}.teacher_betas must be two values in [0, 1), got {self.teacher_betas}")

    def probability(self, stage: int) -> float:
        return float(self.probabilities[min(stage, len(self.probabilities) - 1)])


@dataclasses.dataclass
class MAMLConfig(_Section):
    r"""MAML over the net's weights (M-L2O, SPEC §4); see :mod:`learned_optim.meta.maml`.

    Each meta-step runs a support segment under :math:`\phi`, takes ``inner_steps`` inner steps
    :math:`\phi' = \phi - \alpha\,u(\nabla_\phi L_S)` (``inner_update``: ``sgd``, :math:`u(g) = g`, the
    paper's; ``adam``, Adam with zero initial moments, which is what test-time adaptation does) on
    that same segment, and descends the query segment's meta-loss under :math:`\phi'`.
    ``first_order`` drops the second-order terms (the reference's variant). ``query``: ``new_instance``
    (another instance drawn with the same ``task_kwargs`` draw: the default), ``same_instance``
    (same instance, another initial point and batch stream) or ``next_segment`` (the reference:
    the next segment of the support trajectory). ``task_kwargs`` defines what a MAML task is: each
    key is a task-family argument drawn per meta-epoch, from a list (uniform choice) or
    ``{loguniform: [lo, hi]}`` / ``{uniform: [lo, hi]}``; e.g. ``{sigma: [0.1, 0.5, 1.0]}``.
    """

    enabled: bool = False
    inner_lr: float = 1e-3
    inner_steps: int = 1
    first_order: bool = True
    inner_update: str = "sgd"
    query: str = "new_instance"
    task_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self, where: str) -> None:
        if not positive_finite(self.inner_lr) or self.inner_steps < 1:
            raise ValueError(f"{where}: inner_lr must be positive and finite, and inner_steps >= 1")
        if self.inner_update not in ("sgd", "adam"):
            raise ValueError(f"{where}.inner_update must be 'sgd' or 'adam', got {self.inner_update!r}")
        if self.query not in ("new_instance", "same_instance", "next_segment"):
            raise ValueError(
                f"{where}.query must be 'new_instance', 'same_instance' or 'next_segment', got {self.query!r}"
            )


@dataclasses.dataclass
class EstimatorConfig(_Section):
    r"""How a segment's meta-gradient is estimated: ``kind`` ``tbptt`` (backpropagation through the segment,
    truncated BPTT: the default) or ``pes`` (persistent evolution strategies, :mod:`learned_optim.meta.pes`:
    ``num_pairs`` antithetic pairs of particles with perturbations :math:`N(0, \sigma^2)` of the net's
    weights, ``sigma`` :math:`= \sigma`; each truncation is one segment of ``unroll.segment_length`` steps).

    ``instances``: task instances per truncation. Instance 0 is the trainer's trajectory; the others draw their own
    :math:`\theta_0` from the same task and their own batches, and are carried from truncation to truncation with
    it. With PES each instance has ``num_pairs`` pairs of its own, so the estimate averages over ``instances *
    num_pairs`` pairs and several starting points and data streams of the task (``2 * num_pairs * instances``
    particles). With truncated BPTT the meta-objective is the mean of the instances' objectives, its gradient the
    mean of their meta-gradients (:class:`~learned_optim.meta.instances.TaskInstances`; not with maml or imitation,
    whose terms follow one trajectory). The config's ``regularizers`` add each instance's terms, taken on its own
    trajectory, to its objective: the meta-loss is the mean of the instances' objectives plus terms (with
    ``batch_particles`` the terms are taken after each batched step, one instance after the other).

    ``batch_particles``: unroll the particles (PES) or the task instances (truncated BPTT, ``instances`` > 1)
    together, every inner step one call batched over them by ``torch.func.vmap``
    (:func:`~learned_optim.meta.unroll.unroll_particles`) instead of one after the other. The same estimate to
    float rounding, not bit for bit (batched products round differently), so a run with it is a run of its own
    (``--resume`` continues it bit for bit); its speed depends on the task mix and the machine
    (``benchmarks/batched_particles.py``)."""

    kind: str = "tbptt"
    num_pairs: int = 4
    sigma: float = 0.01
    batch_particles: bool = False
    instances: int = 1

    def validate(self, where: str) -> None:
        if self.kind not in ("tbptt", "pes"):
            raise ValueError(f"{where}.kind must be 'tbptt' or 'pes', got {self.kind!r}")
        if self.instances < 1:
            raise ValueError(f"{where}.instances must be >= 1, got {self.instances}")
        if self.batch_particles and self.kind == "tbptt" and self.instances == 1:
            raise ValueError(
                f"{where}.batch_particles batches PES particles or, with truncated BPTT, task instances: it needs "
                "kind 'pes' or instances > 1"
            )
        if self.num_pairs < 1 or not positive_finite(self.sigma):
            raise ValueError(f"{where}: num_pairs must be >= 1 and sigma positive and finite")


@dataclasses.dataclass
class MetaTrainConfig(_Section):
    """Everything a meta-training run needs (see the module docstring for the file layout).

    Fields beyond the sections: ``name``/``description`` (recorded in the zoo folder), ``expected_time``
    (free text, how long the recipe takes on the machine it was sized for), ``seed`` (makes the run
    reproducible), ``device``, ``dtype`` (``float32`` or ``float64``, for both the net and the optimizee),
    ``num_threads`` (torch CPU threads while training; 1 by default because the small per-step ops of
    meta-training run several times faster single-threaded on a busy CPU than with 2 contending threads;
    ``None`` keeps torch's setting),
    ``schedule`` (the lr schedule the trained net recommends with its default lr, ``cosine`` or ``constant``:
    written to the zoo folder's config.json, what ``bench --lr-rule default`` and the demo follow; unset: none
    recorded, i.e. constant), ``init_from`` (zoo name or folder to fine-tune; its architecture replaces ``net``),
    ``meta_epochs
    (trajectories to train; the cap when the curriculum is on), ``checkpoint_every`` (meta-steps between
    checkpoints), ``out_dir`` (run folder; ``runs/<name>`` when unset), ``estimator`` (truncated BPTT or PES,
    :class:`EstimatorConfig`), ``regularizers`` (flatness-aware
    meta-loss terms, a list of blocks ``{kind, weight, where, every, ...}``; see
    :mod:`learned_optim.meta.regularizers`; several combine by summing).
    """

    name: str = "learned-optimizer"
    description: str | None = None
    expected_time: str | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    num_threads: int | None = 1
    schedule: str | None = None
    net: NetSection = dataclasses.field(default_factory=NetSection)
    init_from: str | None = None
    task: TaskSection = dataclasses.field(default_factory=TaskSection)
    unroll: UnrollConfig = dataclasses.field(default_factory=UnrollConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    meta_optimizer: MetaOptimizerConfig = dataclasses.field(default_factory=MetaOptimizerConfig)
    curriculum: CurriculumConfig = dataclasses.field(default_factory=CurriculumConfig)
    imitation: ImitationConfig = dataclasses.field(default_factory=ImitationConfig)
    maml: MAMLConfig = dataclasses.field(default_factory=MAMLConfig)
    estimator: EstimatorConfig = dataclasses.field(default_factory=EstimatorConfig)
    regularizers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    meta_epochs: int = 100
    checkpoint_every: int = 50
    out_dir: str | None = None

    def validate(self, where: str) -> None:
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"{where}.dtype must be 'float32' or 'float64'")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"{where}.num_threads must be >= 1 or null")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"{where}.schedule must be one of {', '.join(SCHEDULES)} or null, got {self.schedule!r}")
        if self.meta_epochs < 1 or self.checkpoint_every < 1:
            raise ValueError(f"{where}: meta_epochs and checkpoint_every must be >= 1")
        if self.net.family is None and self.init_from is None:
            raise ValueError(f"{where}: set net.family, or init_from to fine-tune an existing optimizer")
        if self.estimator.kind == "pes" and (self.maml.enabled or self.imitation.enabled or self.regularizers):
            raise ValueError(
                f"{where}: estimator 'pes' does not combine with maml, imitation or regularizers "
                "(they need backpropagation through the segment); use estimator.kind: tbptt for them"
            )
        if self.estimator.kind == "tbptt" and self.estimator.instances > 1:
            if self.maml.enabled or self.imitation.enabled:
                raise ValueError(
                    f"{where}: estimator.instances > 1 with truncated BPTT does not combine with maml or imitation "
                    "(their terms follow one trajectory)"
                )
            if self.estimator.batch_particles and self.unroll.checkpoint_steps:
                raise ValueError(f"{where}: estimator.batch_particles does not combine with unroll.checkpoint_steps")
        if self.regularizers:
            from .regularizers import parse_blocks  # checked when the config is loaded, not at the first step

            parse_blocks(self.regularizers, where=f"{where}.regularizers")
        if self.maml.enabled and self.maml.query == "next_segment":
            lengths = [self.unroll.trajectory_length, *(self.curriculum.stages if self.curriculum.enabled else [])]
            if any(int(n) % (2 * self.unroll.segment_length) for n in lengths):
                raise ValueError(
                    f"{where}: maml.query 'next_segment' needs every trajectory length to be a multiple "
                    "of 2 * unroll.segment_length (a support and a query segment per meta-step)"
                )

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> MetaTrainConfig:
        return load_config(path, overrides)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


#: The bundled configs (``python -m learned_optim.meta train <name>``).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def resolve_config_path(config: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """A config file path (tried relative to ``relative_to`` first), or the bundled ``configs/<config>.yaml|.json``."""
    for path in ([relative_to / config] if relative_to is not None else []) + [Path(config)]:
        if path.is_file():
            return path
    for suffix in (".yaml", ".yml", ".json"):
        candidate = CONFIG_DIR / f"{config}{suffix}"
        if candidate.is_file():
            return candidate
    bundled = sorted(p.stem for p in CONFIG_DIR.glob("*.y*ml")) + sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    raise FileNotFoundError(f"config {str(config)!r} is neither a file nor a bundled config ({', '.join(bundled)})")


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merged key by key, anything else replaced."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_config_mapping(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping with its ``base:`` chain resolved (a cycle is an error)."""
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ValueError(f"config base chain loops: {chain}")
    data = _read_mapping(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ValueError(f"{path}: 'base' must be a config name or path, got {base!r}")
    base_path = resolve_config_path(base, relative_to=path.parent)
    return _merge(_read_config_mapping(base_path, (*seen, resolved)), data)


def _read_mapping(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError(
                "YAML configs need PyYAML: the 'meta' extra (pip install -e '.[meta]' in a checkout) "
                "(or use a JSON config)"
            ) from None
        try:
            data = _yaml_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping at the top level")
    return data


#: A float as YAML 1.2 writes it: YAML 1.1 (PyYAML) reads ``1e-4`` (no dot) as a string.
_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$")


@functools.cache
def _yaml_loader() -> type:
    """PyYAML's ``SafeLoader`` with YAML 1.2's floats (built once, on first use: PyYAML is optional)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return Loader


def _yaml_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2's floats, so that ``lr: 1e-4`` is a number as in JSON."""
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506  # a SafeLoader


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> ``(["a", "b"], value)``; the value is parsed as YAML (JSON when PyYAML is missing)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        import yaml
    except ImportError:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
    else:
        try:
            value = _yaml_load(raw)
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: the value is not valid YAML: {err}") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set dotted keys in a nested config mapping (in place; returns it)."""
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {key!r} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> MetaTrainConfig:
    """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``) config file and apply ``key=value`` overrides."""
    data = apply_overrides(_read_config_mapping(Path(path)), overrides)
    return MetaTrainConfig.from_dict(data)


def build_meta_optimizer(
    params: Sequence[Tensor], name: str, lr: float, kwargs: Mapping[str, Any] | None = None
) -> torch.optim.Optimizer:
    """The torch optimizer of the net's weights (``adam``, ``adamw``, ``rmsprop`` or ``sgd``)."""
    try:
        cls = META_OPTIMIZERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown meta-optimizer {name!r}; choose one of {sorted(META_OPTIMIZERS)}") from None
    return cls(params, lr=lr, **dict(kwargs or {}))
