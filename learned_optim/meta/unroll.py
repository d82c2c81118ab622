r"""Differentiable unrolls of a learned optimizer on a task, cut into truncated-BPTT segments.

A trajectory runs the learned update on one task instance from :math:`\theta_0`:

.. math::
    g_t = \nabla_\theta f(\theta_{t-1}; B_t),\qquad
    (\Delta_t, s_t) = \mathrm{net}_\phi(g_t, \theta_{t-1}, s_{t-1}, t),\qquad
    \theta_t = \theta_{t-1} (1 - \eta_t\lambda) + \eta_t\,\Delta_t

with :math:`\eta_t` the trajectory's ``lr`` or the config's ``lr`` (default the rule's ``default_lr``: 1 for
the nets whose step is learned, a real learning rate for ``adafac_mlp``) times the config's lr ``schedule``,
:math:`\lambda` the trajectory's or the config's decoupled ``weight_decay`` (AdamW's; 0 by default), and the
net applied to every parameter tensor as a flat ``(n,)`` view by :func:`learned_optim.functional.apply_rule` (the one
differentiable step, shared with the runtime optimizer and :func:`learned_optim.adapt`; here with the
weights :math:`\phi` as explicit inputs). The gradient :math:`g_t` is detached unless ``second_order`` is
set, in which case the graph keeps :math:`\partial g_t/\partial\theta_{t-1}` and the meta-gradient is exact.

A trajectory of :math:`T` steps is cut in segments of ``segment_length`` steps; :func:`unroll` runs one
segment and returns the meta-loss terms of the points :math:`\theta_{s+1}, \dots, \theta_{s+L}` it
reached, so the caller can backpropagate into :math:`\phi`. Between segments :math:`\theta` and the net
state are detached (:class:`Trajectory` only holds detached tensors).

Divergence guard: when :math:`\|\theta_t\|_2` exceeds the task's ``divergence_bound`` (the config's
``max_param_norm`` when the task sets none) or a loss stops being finite,
the run is frozen at its last good point and every remaining step counts the constant loss
``diverged_loss_factor * max(f_0, last finite loss)`` (no gradient, no NaN).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value, vjp, vmap
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import checkpoint

from .._numerics import derive_seed, global_norm, seeded_generator
from ..functional import StateDict, apply_rule, decoupled_update, to_device
from ..nets.base import UpdateRule
from ..objectives import meta_objective
from ..schedules import lr_factor, lr_ratio
from ..tasks.base import Task, TaskFamily
from .config import UnrollConfig

__all__ = [
    "Trajectory",
    "UnrollResult",
    "MetaLossHook",
    "FunctionHook",
    "as_hook",
    "StepInputs",
    "start_trajectory",
    "start_instance",
    "step_lr",
    "step_lr_ratio",
    "task_loss_and_grad",
    "unroll",
    "unroll_particles",
    "evaluation_scores",
]


class MetaLossHook:
    r"""Extra meta-loss term at a trajectory point (regularizers plug in here): the declared hook protocol.

    Called after every step that was not frozen by the guard with ``params`` = :math:`\theta_t` (in the
    graph of the net's weights), the task, the train batch that produced :math:`g_t`, the global
    1-based step ``t`` and, when the hook sets :attr:`wants_step_inputs`, ``inputs=`` the
    :class:`StepInputs` of the update that produced :math:`\theta_t` (e.g. to run the net again on
    perturbed inputs; ``None`` otherwise). Returns a scalar added to the meta-loss, or ``None``.

    The trainer calls :meth:`begin_trajectory` at every new trajectory and logs what :meth:`pop_values`
    returns after every meta-step; both do nothing by default. A plain function
    ``hook(params, task, batch, step)`` is accepted wherever a hook is, through :func:`as_hook`.
    """

    #: Whether the hook is called with ``inputs=`` a :class:`StepInputs`.
    wants_step_inputs: bool = False

    def __call__(
        self, params: Mapping[str, Tensor], task: Task, batch: Any, step: int, *, inputs: StepInputs | None = None
    ) -> Tensor | None:
        raise NotImplementedError

    def begin_trajectory(self, length: int) -> None:
        """A new trajectory of ``length`` steps starts."""

    def pop_values(self) -> dict[str, float]:
        """Values to log since the last call (e.g. each term's mean raw value)."""
        return {}


class FunctionHook(MetaLossHook):
    """A plain function ``fn(params, task, batch, step) -> Tensor | None`` as a :class:`MetaLossHook`."""

    def __init__(self, fn: Callable[..., Tensor | None]) -> None:
        self.fn = fn

    def __call__(
        self, params: Mapping[str, Tensor], task: Task, batch: Any, step: int, *, inputs: StepInputs | None = None
    ) -> Tensor | None:
        return self.fn(params, task, batch, step)


def as_hook(hook: MetaLossHook | Callable[..., Tensor | None] | None) -> MetaLossHook | None:
    """``hook`` as a :class:`MetaLossHook` (a plain function is wrapped in a :class:`FunctionHook`)."""
    if hook is None or isinstance(hook, MetaLossHook):
        return hook
    if not callable(hook):
        raise TypeError(f"a meta-loss hook must be a MetaLossHook or a callable, got {type(hook).__name__}")
    return FunctionHook(hook)


@dataclasses.dataclass
class StepInputs:
    r"""What the update :math:`\theta_{t-1} \to \theta_t` was computed from (for hooks that set
    ``wants_step_inputs``): the rule and its weights (in the graph), the gradient :math:`g_t` the net
    saw (detached unless ``second_order``), :math:`\theta_{t-1}` and the net state :math:`s_{t-1}`,
    all by parameter name, and the 1-based step ``t``. Feeding them to :func:`apply_rule` reproduces
    the step."""

    rule: UpdateRule
    weights: Mapping[str, Tensor] | None
    grads: dict[str, Tensor]
    params: dict[str, Tensor]
    state: StateDict
    step: int


@dataclasses.dataclass
class Trajectory:
    r"""Where an optimizee run stands between segments (all tensors detached).

    Attributes:
        params: :math:`\theta_t` by name, in the task's shapes.
        opt_state: the net's per-coordinate state of each tensor (leading axis = ``numel``).
        step: steps taken so far (:math:`t`).
        initial_loss: :math:`f_0`, the meta-split loss at :math:`\theta_0` (set by the first segment).
        diverged: the guard froze the run; ``penalty`` is the loss it counts per remaining step.
        last_loss: the last finite meta-split loss (for the penalty).
        extra: further per-tensor state a caller carries along (e.g. the imitation teacher's moments).
        lr: this trajectory's inner learning rate :math:`\eta` (``None``: the unroll config's ``lr``, else
            the net's ``default_lr``); set per trajectory when meta-training samples it (``unroll.lr_range``).
        horizon: the trajectory's length :math:`T`, the horizon of the unroll config's lr ``schedule``
            (``None``: the config's ``trajectory_length``).
        weight_decay: this trajectory's decoupled weight decay :math:`\lambda` (``None``: the unroll config's
            ``weight_decay``); set per trajectory when meta-training samples it (``unroll.weight_decays``).
    """

    params: dict[str, Tensor]
    opt_state: StateDict
    step: int = 0
    initial_loss: float | None = None
    diverged: bool = False
    penalty: float | None = None
    last_loss: float | None = None
    extra: StateDict = dataclasses.field(default_factory=dict)
    lr: float | None = None
    horizon: int | None = None
    weight_decay: float | None = None

    def detached(self) -> Trajectory:
        return dataclasses.replace(
            self,
            params={k: v.detach() for k, v in self.params.items()},
            opt_state={k: {s: v.detach() for s, v in st.items()} for k, st in self.opt_state.items()},
            extra={k: {s: v.detach() for s, v in st.items()} for k, st in self.extra.items()},
        )

    # -- serialisation (safetensors tensors + JSON metadata, see the trainer's checkpoints) -----------
    def to_tensors(self, prefix: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        names = list(self.params)
        tensors = {f"{prefix}.params.{i}": self.params[n] for i, n in enumerate(names)}
        for group, store in (("state", self.opt_state), ("extra", self.extra)):
            for i, n in enumerate(names):
                for key, value in store.get(n, {}).items():
                    tensors[f"{prefix}.{group}.{i}.{key}"] = value
        meta = {
            "names": names,
            "step": self.step,
            "initial_loss": self.initial_loss,
            "diverged": self.diverged,
            "penalty": self.penalty,
            "last_loss": self.last_loss,
            "has_extra": bool(self.extra),
            "lr": self.lr,
            "horizon": self.horizon,
            "weight_decay": self.weight_decay,
        }
        return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, meta

    @classmethod
    def from_tensors(
        cls,
        prefix: str,
        tensors: Mapping[str, Tensor],
        meta: Mapping[str, Any],
        device: torch.device | str | None = None,
    ) -> Trajectory:
        names = meta["names"]
        params = {n: tensors[f"{prefix}.params.{i}"].to(device) for i, n in enumerate(names)}
        stores: dict[str, StateDict] = {"state": {n: {} for n in names}, "extra": {}}
        if meta.get("has_extra"):
            stores["extra"] = {n: {} for n in names}
        for key, value in tensors.items():
            for group in ("state", "extra"):
                head = f"{prefix}.{group}."
                if key.startswith(head):
                    index, name = key[len(head) :].split(".", 1)
                    stores[group][names[int(index)]][name] = value.to(device)
        return cls(
            params=params,
            opt_state=stores["state"],
            step=int(meta["step"]),
            initial_loss=meta["initial_loss"],
            diverged=bool(meta["diverged"]),
            penalty=meta["penalty"],
            last_loss=meta["last_loss"],
            extra=stores["extra"],
            lr=meta.get("lr"),
            horizon=meta.get("horizon"),
            weight_decay=meta.get("weight_decay"),
        )


@dataclasses.dataclass
class UnrollResult:
    r"""One segment.

    Attributes:
        losses: ``(L,)`` meta-split losses at :math:`\theta_{s+1},\dots,\theta_{s+L}` (differentiable in the
            net's weights; constants for frozen steps).
        train_losses: ``(L,)`` detached train losses :math:`f(\theta_{t-1}; B_t)` seen by the optimizee.
        extra: sum of the hook's terms over the segment (a 0-d tensor, 0 without a hook).
        points: :math:`\theta_{s+1},\dots` kept in the graph when ``keep_points=True`` (for regularizers).
        end: the detached :class:`Trajectory` after the segment.
        diverged_at: global step at which the guard froze the run during this segment, else ``None``.
    """

    losses: Tensor
    train_losses: Tensor
    extra: Tensor
    points: list[dict[str, Tensor]]
    end: Trajectory
    diverged_at: int | None = None

    def objective(self, kind: str) -> Tensor:
        """The segment's meta-objective :func:`~learned_optim.objectives.meta_objective` of kind ``kind`` over
        ``losses`` (hook terms in ``extra`` not included), with the trajectory's initial loss and step at its end."""
        return meta_objective(kind, self.losses, initial_loss=self.end.initial_loss, last_step=self.end.step)


def start_trajectory(
    rule: UpdateRule,
    task: Task,
    generator: torch.Generator,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Trajectory:
    r"""Draw :math:`\theta_0` from ``task.init_params(generator)`` and give every tensor fresh net state."""
    compute = rule.compute_dtype
    params = {}
    for name, value in task.init_params(generator).items():
        value = value.detach()
        params[name] = value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else None)
    opt_state = {
        n: rule.init_state(p.numel(), device=p.device, dtype=compute, shape=p.shape) for n, p in params.items()
    }
    return Trajectory(params=params, opt_state=opt_state)


def start_instance(
    rule: UpdateRule,
    task: Task,
    beside: Trajectory,
    seed: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Trajectory:
    r"""Another instance of ``task`` beside the trajectory ``beside``: its own :math:`\theta_0`, drawn from a
    generator seeded with ``seed`` (:func:`start_trajectory`), with ``beside``'s lr, schedule horizon and weight
    decay, so that it can be unrolled with it (:func:`unroll_particles`)."""
    other = start_trajectory(rule, task, seeded_generator(seed), device=device, dtype=dtype)
    other.lr, other.horizon, other.weight_decay = beside.lr, beside.horizon, beside.weight_decay
    return other


def step_lr(rule: UpdateRule, trajectory: Trajectory, config: UnrollConfig, t: int) -> float:
    r"""The lr of the trajectory's 1-based step ``t``: :math:`\eta \cdot` ``lr_factor(schedule, t - 1, T)``, with
    :math:`\eta` the trajectory's ``lr``, else the config's, else the rule's ``default_lr``, and :math:`T` the
    trajectory's ``horizon``, else the config's ``trajectory_length``."""
    lr = trajectory.lr if trajectory.lr is not None else config.lr if config.lr is not None else rule.default_lr
    return lr * lr_factor(config.schedule, t - 1, _horizon(trajectory, config))


def step_lr_ratio(trajectory: Trajectory, config: UnrollConfig, t: int) -> float:
    r"""The lr ratio :math:`\rho_t` of the trajectory's 1-based step ``t`` (:func:`~learned_optim.schedules.lr_ratio`
    of the config's schedule over the trajectory's horizon, as :func:`step_lr`), what a net with
    :attr:`~learned_optim.nets.base.UpdateRule.uses_lr_ratio` sees there."""
    return lr_ratio(config.schedule, t - 1, _horizon(trajectory, config))


def _horizon(trajectory: Trajectory, config: UnrollConfig) -> int:
    """The length :math:`T` of the trajectory's schedule: its ``horizon``, else the config's ``trajectory_length``."""
    return trajectory.horizon if trajectory.horizon is not None else config.trajectory_length


def step_weight_decay(trajectory: Trajectory, config: UnrollConfig) -> float:
    """The decoupled weight decay :math:`\\lambda` of the trajectory's steps: its own, else the config's."""
    return trajectory.weight_decay if trajectory.weight_decay is not None else config.weight_decay


def task_loss_and_grad(
    task: Task, params: Mapping[str, Tensor], batch: Any, *, create_graph: bool = False
) -> tuple[Tensor, dict[str, Tensor]]:
    """``f(params; batch)`` and its gradient (detached unless ``create_graph``); the loss stays in the graph."""
    loss = task.loss(params, batch)
    grads = torch.autograd.grad(
        loss, list(params.values()), create_graph=create_graph, retain_graph=True, allow_unused=True
    )
    return loss, {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads, strict=True)}


def unroll(
    rule: UpdateRule,
    weights: Mapping[str, Tensor] | None,
    task: Task,
    trajectory: Trajectory,
    num_steps: int,
    *,
    generator: torch.Generator,
    config: UnrollConfig | None = None,
    meta_split: str = "train",
    hook: MetaLossHook | Callable[..., Tensor | None] | None = None,
    keep_points: bool = False,
    track_graph: bool = True,
) -> UnrollResult:
    r"""Run ``num_steps`` learned steps from ``trajectory`` and collect the meta-loss terms.

    Args:
        rule: the update rule (its module; ``weights`` are substituted through ``functional_call``).
        weights: the net's weights by name (e.g. ``dict(rule.named_parameters())``); ``None`` uses the
            module's own.
        task: the optimizee.
        trajectory: the (detached) state to continue from; a fresh one from :func:`start_trajectory`.
        num_steps: segment length :math:`L`.
        generator: source of the batches (train, and val when ``meta_split="val"``).
        config: unroll options (``second_order``, ``checkpoint_steps``, the guard).
        meta_split: ``"train"``: ``losses[i]`` is :math:`f(\theta_{s+i+1})` on the next train batch
            (train-by-train); ``"val"``: on a fresh val batch (train-by-validation).
        hook: extra meta-loss term at each new point (see :class:`MetaLossHook`).
        keep_points: return the points :math:`\theta_t` (in the graph) in ``UnrollResult.points``.
        track_graph: ``False`` runs without building the graph of the net (evaluation); losses detached.
    """
    cfg = config or UnrollConfig()
    hook = as_hook(hook)
    if meta_split not in ("train", "val"):
        raise ValueError(f"meta_split must be 'train' or 'val', got {meta_split!r}")
    dtype = next((p.dtype for p in trajectory.params.values() if p.is_floating_point()), None)
    device = next(iter(trajectory.params.values())).device
    second_order = cfg.second_order and track_graph
    bound = _divergence_bound(task, cfg)

    def fresh(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in tensors.items()}

    params = fresh(trajectory.params)
    state = {k: {s: v.detach() for s, v in st.items()} for k, st in trajectory.opt_state.items()}
    guard = _Guard.of(trajectory, cfg, track_graph)
    step0 = trajectory.step
    weight_decay = step_weight_decay(trajectory, cfg)

    def batch_of(split: str) -> Any:
        return to_device(task.batch(split, generator), device, dtype)

    def one_step(params: dict[str, Tensor], state: StateDict, batch: Any, t: int):
        loss, grads = task_loss_and_grad(task, params, batch, create_graph=second_order)
        with torch.set_grad_enabled(track_graph):
            rule.set_lr_ratio(step_lr_ratio(trajectory, cfg, t))
            deltas, new_state = apply_rule(rule, weights, grads, params, state, t)
            lr_t = step_lr(rule, trajectory, cfg, t)
            new_params = {k: decoupled_update(params[k], deltas[k], lr_t, weight_decay) for k in params}
        return loss, new_params, new_state, grads

    points: list[dict[str, Tensor]] = []
    extra: Tensor | float = 0.0

    with torch.enable_grad():
        if guard.initial_loss is None and not guard.diverged and meta_split == "val":
            guard.initial_loss = float(task.loss(params, batch_of("val")).detach())
        for i in range(num_steps):
            t = step0 + i + 1
            if guard.diverged:
                guard.frozen_step()
                continue
            batch = batch_of("train")
            if cfg.checkpoint_steps and track_graph:
                loss, new_params, new_state, grads = checkpoint(one_step, params, state, batch, t, use_reentrant=False)
            else:
                loss, new_params, new_state, grads = one_step(params, state, batch, t)
            if not guard.took_step(loss, first=i == 0, meta_split=meta_split, t=t):
                continue
            finite = all(bool(torch.isfinite(p.detach()).all()) for p in new_params.values())
            if not finite or (bound is not None and global_norm(new_params.values()) > bound):
                guard.stop(t)
                continue
            if not track_graph:
                new_params = fresh(new_params)
                new_state = {k: {s: v.detach() for s, v in st.items()} for k, st in new_state.items()}
            previous = (params, state)
            params, state = new_params, new_state
            if meta_split == "val" and not guard.record(task.loss(params, batch_of("val"))):
                guard.stop(t)
                continue
            if keep_points:
                points.append(params)
            if hook is not None and track_graph:
                inputs = (
                    StepInputs(rule, weights, grads, previous[0], previous[1], t) if hook.wants_step_inputs else None
                )
                term = hook(params, task, batch, t, inputs=inputs)
                if term is not None:
                    extra = extra + term
        if meta_split == "train" and not guard.diverged and num_steps > 0:
            guard.record_last(task.loss(params, batch_of("train")), step0 + num_steps)

    ref = next(iter(params.values()))
    if isinstance(extra, float):
        extra = ref.new_tensor(extra).detach()
    return guard.result(trajectory, params, state, num_steps, ref, extra=extra, points=points)


def unroll_particles(
    rule: UpdateRule,
    weights: Mapping[str, Tensor],
    task: Task,
    trajectories: Sequence[Trajectory],
    num_steps: int,
    *,
    generator: torch.Generator | Sequence[torch.Generator],
    config: UnrollConfig | None = None,
    meta_split: str = "train",
    streams: Sequence[int] | None = None,
    shared_weights: bool = False,
    track_graph: bool = False,
    hook: MetaLossHook | Callable[..., Tensor | None] | None = None,
) -> list[UnrollResult]:
    r""":func:`unroll` for ``P`` particles at once: particle :math:`p` runs the net with weights ``weights[name][p]``
    (each stacked on a leading axis of ``P``; with ``shared_weights`` every particle runs ``weights`` itself) from
    ``trajectories[p]``, and every step is one call batched over the particles by ``torch.func.vmap``: the task's
    loss and gradient (``vmap(grad_and_value(task.loss))``), the net's update
    (:func:`~learned_optim.functional.apply_rule`, on its ATen path: the native kernels have no batching rule) and
    the meta-split losses.

    Without a graph by default (PES's particles). With ``track_graph`` the losses stay in the graph of ``weights``,
    as :func:`unroll`'s do (truncated BPTT over several task instances: the meta-gradient of the particles' summed
    objectives is the sum of their :func:`unroll` meta-gradients, to float rounding); the optimizee's gradient is
    detached unless ``config.second_order``, and ``config.checkpoint_steps`` is not supported. A meta-loss ``hook``
    (with ``track_graph`` and ``shared_weights``: truncated BPTT over task instances) is called as :func:`unroll` calls
    it, on each particle's own new point, batch and step inputs, one particle after the other after each batched
    step, its terms in each result's ``extra``.
    A particle whose gradient is not finite steps from a zero gradient instead (and the guard rejects the step, as
    :func:`unroll` does) so that no infinity enters the graph the others backpropagate through.

    The particles see the same batches, drawn once from ``generator`` in the order :func:`unroll` draws them for
    each (common random numbers, as PES's particles, each with a generator of the same seed, see in the loop). Or
    ``generator`` is a sequence of generators, one per batch stream (e.g. per task instance), ``streams[p]`` the
    stream of particle :math:`p`: each step draws a batch from every stream, and each particle sees its stream's,
    as its own :func:`unroll` with that stream's generator would. The particles must stand at the same step with the
    same lr, schedule horizon and weight decay. The divergence guard is
    :func:`unroll`'s, per particle: a particle it freezes keeps its last good point (``torch.where`` on a
    per-particle mask) and counts the penalty while the others go on. The results equal ``P`` calls of
    :func:`unroll` (``track_graph=False``) to float rounding, not bit for bit: batched products round differently,
    and under ``vmap`` a net keeps its float32 sums over a tensor where they would overflow (past gradients of
    :math:`\sim 10^9`, :func:`~learned_optim.features.overflowed`; the divergence guard then freezes the particle).
    """
    cfg = config or UnrollConfig()
    if meta_split not in ("train", "val"):
        raise ValueError(f"meta_split must be 'train' or 'val', got {meta_split!r}")
    if not trajectories:
        return []
    first = trajectories[0]
    shared = ("step", "lr", "horizon", "weight_decay")
    for other in trajectories[1:]:
        if any(getattr(other, k) != getattr(first, k) for k in shared) or list(other.params) != list(first.params):
            raise ValueError(f"unroll_particles: the particles must share their tensors and {', '.join(shared)}")
    count = len(trajectories)
    for name, value in weights.items():
        if not shared_weights and value.shape[:1] != (count,):
            raise ValueError(f"unroll_particles: weights[{name!r}] {tuple(value.shape)} is not stacked over {count}")
    if track_graph and cfg.checkpoint_steps:
        raise ValueError("unroll_particles: config.checkpoint_steps is not supported with track_graph")
    hook = as_hook(hook)
    if hook is not None and not (track_graph and shared_weights):
        raise ValueError("unroll_particles: a meta-loss hook needs track_graph and shared_weights")
    extras: list[Tensor | float] = [0.0] * count
    second_order = cfg.second_order and track_graph
    params = {k: torch.stack([tr.params[k].detach() for tr in trajectories]) for k in first.params}
    state = {
        k: {s: torch.stack([tr.opt_state[k][s].detach() for tr in trajectories]) for s in first.opt_state[k]}
        for k in first.opt_state
    }
    guards = [_Guard.of(tr, cfg, track_graph=track_graph) for tr in trajectories]
    dtype = next((p.dtype for p in params.values() if p.is_floating_point()), None)
    device = next(iter(params.values())).device
    bound = _divergence_bound(task, cfg)
    weight_decay = step_weight_decay(first, cfg)

    generators = [generator] if isinstance(generator, torch.Generator) else list(generator)
    stream_of = [0] * count if streams is None else list(streams)
    if len(stream_of) != count or not all(0 <= i < len(generators) for i in stream_of):
        raise ValueError(f"unroll_particles: streams must give each of the {count} particles one of the generators")
    per_particle = torch.tensor(stream_of, device=device)

    def batch_of(split: str) -> Any:
        drawn = [to_device(task.batch(split, g), device, dtype) for g in generators]
        if len(drawn) == 1:
            return drawn[0]
        return tree_map(lambda *xs: torch.stack(xs).index_select(0, per_particle), *drawn)  # each particle's stream's

    batch_axis = None if len(generators) == 1 else 0

    def learned_step(
        w: Mapping[str, Tensor], g: dict[str, Tensor], p: dict[str, Tensor], s: StateDict, t: int, lr: float
    ) -> tuple[dict[str, Tensor], StateDict]:
        deltas, new_state = apply_rule(rule, w, g, p, s, t)
        return {k: decoupled_update(p[k], deltas[k], lr, weight_decay) for k in p}, new_state

    def loss_only(p: dict[str, Tensor], batch: Any) -> Tensor:
        # the forward of vjp, whose pullback is never run: some ops (nn.GRU's) batch only under a grad transform
        return vjp(lambda q: task.loss(q, batch), p)[0]

    loss_and_grad = vmap(grad_and_value(task.loss), in_dims=(0, batch_axis))
    losses_at = vmap(loss_only, in_dims=(0, batch_axis))
    # the large tensors of a net with a native kernel: one kernel call per particle (see NATIVE_LOOP_MIN_COORDINATES;
    # the kernels have no autograd, so never with a graph)
    looped = [
        k
        for k, v in first.params.items()
        if not track_graph and v.numel() >= NATIVE_LOOP_MIN_COORDINATES and rule.steps_natively(device)
    ]
    batched = [k for k in first.params if k not in looped]
    step_batched = vmap(learned_step, in_dims=(None if shared_weights else 0, 0, 0, 0, None, None))

    def step_all(
        grads: dict[str, Tensor], params: dict[str, Tensor], state: StateDict, t: int, lr: float
    ) -> tuple[dict[str, Tensor], StateDict]:
        new_params: dict[str, Tensor] = {}
        new_state: StateDict = {}
        if batched:
            new_params, new_state = step_batched(
                weights, _pick(grads, batched), _pick(params, batched), _pick(state, batched), t, lr
            )
        if looped:
            each = [
                learned_step(
                    weights if shared_weights else _particle(weights, p),
                    _particle(_pick(grads, looped), p),
                    _particle(_pick(params, looped), p),
                    {k: _particle(state[k], p) for k in looped},
                    t,
                    lr,
                )
                for p in range(count)
            ]
            for k in looped:
                new_params[k] = torch.stack([e[0][k] for e in each])
                new_state[k] = {s: torch.stack([e[1][k][s] for e in each]) for s in state[k]}
        return new_params, new_state

    def live() -> list[bool]:
        return [not g.diverged for g in guards]

    def keep(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
        """``new`` for the particles of ``mask`` (``(P,)`` booleans), ``old`` for the others."""
        return torch.where(mask.view(-1, *([1] * (new.dim() - 1))), new, old)

    def finite_gradients(grads: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[bool]]:
        """The gradients (detached unless second order), a particle's replaced by zeros where any is not finite."""
        if not second_order:
            grads = {k: v.detach() for k, v in grads.items()}
        if not track_graph:
            return grads, [True] * count
        ok = torch.stack([torch.isfinite(v.detach()).flatten(1).all(1) for v in grads.values()]).all(0)
        return {k: keep(ok, v, torch.zeros_like(v)) for k, v in grads.items()}, ok.tolist()

    with torch.set_grad_enabled(track_graph):
        if meta_split == "val" and any(g.initial_loss is None and not g.diverged for g in guards):
            initial = losses_at(params, batch_of("val"))
            for g, value in zip(guards, initial, strict=True):
                if g.initial_loss is None and not g.diverged:
                    g.initial_loss = float(value)
        for i in range(num_steps):
            t = first.step + i + 1
            running = live()
            for g, alive in zip(guards, running, strict=True):
                if not alive:
                    g.frozen_step()
            if not any(running):
                continue
            batch = batch_of("train")
            grads, losses = loss_and_grad(params, batch)
            grads, finite_grads = finite_gradients(grads)
            rule.set_lr_ratio(step_lr_ratio(first, cfg, t))
            new_params, new_state = step_all(grads, params, state, t, step_lr(rule, first, cfg, t))
            previous = (params, state)
            checked = [v.detach() for v in new_params.values()]
            finite = torch.stack([torch.isfinite(v).flatten(1).all(1) for v in checked]).all(0).tolist()
            norms = torch.stack([v.double().square().flatten(1).sum(1) for v in checked]).sum(0).sqrt()
            accepted = [False] * count
            for p, g in enumerate(guards):
                if not running[p] or not g.took_step(losses[p], first=i == 0, meta_split=meta_split, t=t):
                    continue
                if not (finite[p] and finite_grads[p]) or (bound is not None and float(norms[p]) > bound):
                    g.stop(t)
                    continue
                accepted[p] = True
            mask = torch.tensor(accepted, device=device)
            params = {k: keep(mask, new_params[k], v) for k, v in params.items()}
            state = {k: {s: keep(mask, new_state[k][s], v) for s, v in st.items()} for k, st in state.items()}
            if meta_split == "val" and any(accepted):
                values = losses_at(params, batch_of("val"))
                for p, g in enumerate(guards):
                    if accepted[p] and not g.record(values[p]):
                        g.stop(t)
            for p, g in enumerate(guards):
                if hook is None or not accepted[p] or g.diverged:
                    continue
                inputs = None
                if hook.wants_step_inputs:
                    before = {k: _particle(st, p) for k, st in previous[1].items()}
                    inputs = StepInputs(rule, weights, _particle(grads, p), _particle(previous[0], p), before, t)
                own_batch = batch if batch_axis is None else tree_map(lambda x, p=p: x[p], batch)
                term = hook(_particle(params, p), task, own_batch, t, inputs=inputs)
                if term is not None:
                    extras[p] = extras[p] + term
        if meta_split == "train" and num_steps > 0 and any(live()):
            running = live()
            values = losses_at(params, batch_of("train"))
            for p, g in enumerate(guards):
                if running[p]:
                    g.record_last(values[p], first.step + num_steps)

    ref = next(iter(params.values()))
    return [
        g.result(
            tr,
            {k: v[p] for k, v in params.items()},
            {k: {s: v[p] for s, v in st.items()} for k, st in state.items()},
            num_steps,
            ref,
            extra=extra if isinstance(extra, Tensor) else None,
        )
        for p, (g, tr, extra) in enumerate(zip(guards, trajectories, extras, strict=True))
    ]


#: Tensors of at least this many coordinates are stepped one particle at a time by :func:`unroll_particles` where the
#: net has a native kernel (:meth:`~learned_optim.nets.base.UpdateRule.steps_natively`): the batched ATen step
#: of ``adafac_mlp`` over 8 particles took 0.38x-0.65x the time of 8 kernel calls at 1k-8k coordinates, 0.98x at
#: 128 x 128 and 1.9x at 256 x 128 (Intel Xeon with AVX-512, one thread,
#: ``benchmarks/results/particle-parallel/vmap_probe.py``).
NATIVE_LOOP_MIN_COORDINATES = 1 << 14


def _pick(tensors: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {k: tensors[k] for k in names}


def _particle(tensors: Mapping[str, Tensor], p: int) -> dict[str, Tensor]:
    """Particle ``p``'s slice of tensors stacked over the particles."""
    return {k: v[p] for k, v in tensors.items()}


def _divergence_bound(task: Task, config: UnrollConfig) -> float | None:
    r"""The guard's bound on :math:`\|\theta_t\|_2`: the task's ``divergence_bound``, else the config's
    ``max_param_norm``."""
    task_bound = getattr(task, "divergence_bound", None)
    return task_bound if task_bound is not None else config.max_param_norm


@dataclasses.dataclass
class _Guard:
    """One trajectory's meta-loss terms, train losses and divergence guard through a segment (the bookkeeping
    :func:`unroll` and :func:`unroll_particles` share; see the module docstring for the guard)."""

    diverged_loss_factor: float
    track_graph: bool
    initial_loss: float | None
    last_loss: float | None
    penalty: float | None
    diverged: bool
    diverged_at: int | None = None
    meta_losses: list[Tensor | float] = dataclasses.field(default_factory=list)
    train_losses: list[float] = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, trajectory: Trajectory, config: UnrollConfig, track_graph: bool) -> _Guard:
        return cls(
            config.diverged_loss_factor,
            track_graph,
            trajectory.initial_loss,
            trajectory.last_loss,
            trajectory.penalty,
            trajectory.diverged,
        )

    def freeze(self, t: int) -> float:
        """Freeze the run at step ``t``; returns the loss every remaining step counts."""
        self.diverged, self.diverged_at = True, t
        reference = max(v for v in (self.initial_loss, self.last_loss, 0.0) if v is not None and math.isfinite(v))
        self.penalty = self.diverged_loss_factor * reference if reference > 0 else 1.0
        return self.penalty

    def stop(self, t: int) -> None:
        """Freeze the run at step ``t``; that step's meta-loss term counts the penalty."""
        self.meta_losses.append(self.freeze(t))

    def frozen_step(self) -> None:
        """A step of a run the guard froze earlier: it counts the penalty."""
        assert self.penalty is not None  # set with `diverged`, here or in an earlier segment
        self.meta_losses.append(self.penalty)
        self.train_losses.append(self.penalty)

    def record(self, value: Tensor) -> bool:
        """Append a meta-split loss; returns False (and records nothing) when it is not finite."""
        v = float(value.detach())
        if not math.isfinite(v):
            return False
        self.last_loss = v
        self.meta_losses.append(value if self.track_graph else value.detach())
        return True

    def took_step(self, loss: Tensor, *, first: bool, meta_split: str, t: int) -> bool:
        r"""Step ``t``'s train loss :math:`f(\theta_{t-1}; B_t)` seen; with ``meta_split="train"`` it is also the
        meta-loss term of :math:`\theta_{t-1}` (not on a segment's ``first`` step: the previous segment counted it).
        Returns False, frozen at :math:`\theta_{t-1}` (its term and step ``t``'s count the penalty), where that
        term is not finite."""
        value = float(loss.detach())
        if self.initial_loss is None:
            self.initial_loss = value
        self.train_losses.append(value)
        if first or meta_split != "train" or self.record(loss):
            return True
        frozen = self.freeze(t - 1)  # theta_{t-1} is not a finite point
        self.meta_losses.append(frozen)
        self.train_losses[-1] = frozen
        self.meta_losses.append(frozen)
        return False

    def record_last(self, loss: Tensor, t: int) -> None:
        r"""The train-split meta-loss term of the segment's last point :math:`\theta_t`; freezes there if not finite."""
        if not self.record(loss):
            self.stop(t)

    def result(
        self,
        trajectory: Trajectory,
        params: Mapping[str, Tensor],
        state: StateDict,
        num_steps: int,
        ref: Tensor,
        *,
        extra: Tensor | None = None,
        points: list[dict[str, Tensor]] | None = None,
    ) -> UnrollResult:
        """The segment's :class:`UnrollResult`: ``trajectory`` continued to ``params``, ``state`` after ``num_steps``
        steps (``ref``: a tensor of the losses' dtype and device)."""
        losses = (
            torch.stack(
                [
                    v if isinstance(v, Tensor) else torch.tensor(v, dtype=ref.dtype, device=ref.device)
                    for v in self.meta_losses
                ]
            )
            if self.meta_losses
            else ref.new_zeros(0)
        )
        end = dataclasses.replace(
            trajectory,
            params={k: v.detach() for k, v in params.items()},
            opt_state={k: {s: v.detach() for s, v in st.items()} for k, st in state.items()},
            step=trajectory.step + num_steps,
            initial_loss=self.initial_loss,
            diverged=self.diverged,
            penalty=self.penalty,
            last_loss=self.last_loss,
        )
        return UnrollResult(
            losses=losses,
            train_losses=torch.tensor(self.train_losses, dtype=torch.float64),
            extra=ref.new_zeros(()) if extra is None else extra,
            points=points or [],
            end=end,
            diverged_at=self.diverged_at,
        )


def evaluation_scores(
    rule: UpdateRule,
    family: TaskFamily,
    config: UnrollConfig,
    length: int,
    runs: int,
    *,
    seed: int,
    meta_split: str = "train",
    score: str = "final",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> list[float]:
    r"""``rule`` run without a graph for ``length`` steps on ``runs`` fixed tasks of ``family`` (task and batches
    drawn from ``(seed, "eval-task"|"eval-data", r)``; the divergence guard applies), one score per task:
    the ``"final"`` or ``"mean"`` meta-split loss, or ``"log_final"``, :math:`\log(f_T / f_0)` (comparable
    across tasks of different loss scales)."""
    if score not in ("final", "mean", "log_final"):
        raise ValueError(f"score must be 'final', 'mean' or 'log_final', got {score!r}")
    values = []
    for r in range(runs):
        gen = seeded_generator(derive_seed(seed, "eval-task", r))
        task = family.sample(gen)
        trajectory = start_trajectory(rule, task, gen, device=device, dtype=dtype)
        trajectory.horizon = length
        result = unroll(
            rule,
            None,
            task,
            trajectory,
            length,
            generator=seeded_generator(derive_seed(seed, "eval-data", r)),
            config=config,
            meta_split=meta_split,
            track_graph=False,
        )
        if score == "log_final":
            assert result.end.initial_loss is not None  # set by the unroll's first step
            values.append(math.log(float(result.losses[-1]) / result.end.initial_loss))
        else:
            values.append(float(result.losses[-1] if score == "final" else result.losses.mean()))
    return values
