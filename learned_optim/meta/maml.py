r"""MAML over the learned optimizer's weights (M-L2O, Yang et al. 2023; SPEC §4) and test-time adaptation.

One MAML meta-step on a task :math:`\tau` (a draw of ``maml.task_kwargs``, e.g. one :math:`\sigma`):

.. math::
    \phi^{(0)} = \phi,\qquad
    \phi^{(k+1)} = \phi^{(k)} - \alpha\, u_k\big(\nabla_\phi L_S(\phi^{(k)})\big),\quad k < K,\qquad
    \text{outer loss } L_Q(\phi^{(K)})

where :math:`L_S` is the meta-objective of a support segment (``unroll.segment_length`` learned steps
on the support instance, the same segment replayed for every inner step), :math:`L_Q` that of a query
segment, :math:`u_k` the inner update (``sgd``: :math:`u_k(g) = g`, the paper's; ``adam``: Adam's
normalised step with moments started at zero, i.e. what :func:`adapt_on_task` and
:func:`learned_optim.adapt` do at test time) and :math:`K` = ``inner_steps``. The outer gradient
:math:`dL_Q/d\phi` flows through :math:`\phi^{(K)}` to :math:`\phi`; with ``first_order`` the inner
gradients are constants (FOMAML, the reference's variant: the outer gradient is
:math:`\nabla L_Q` at :math:`\phi^{(K)}`), otherwise the second-order terms are kept (exact MAML when
``unroll.second_order`` also keeps the optimizee's Hessian terms).

Where the query comes from (``maml.query``) is the main difference to the reference implementation,
whose query was the *next segment of the same instance* (``next_segment``, kept for ablations). By
default (``new_instance``) the support and query are two independent instances drawn with the *same*
task arguments (for LASSO: the same :math:`\sigma`, different :math:`W, y, x_0`), each with its own
trajectory and batch stream, so the inner step has to generalise within the task, which is what
test-time adaptation asks of it (adapt on some instances, test on others). The task arguments are
*sampled* per meta-epoch (a list is a uniform choice, ``{loguniform: [lo, hi]}`` a continuous draw),
not cycled through a few fixed values.

The trainer (:class:`learned_optim.meta.trainer.MetaTrainer`) owns the support trajectory as its usual
``trajectory``; :class:`MAMLRunner` owns the query trajectory, its task and batch generator, and their
checkpoint tensors. :func:`maml_segment` is the pure computation of one meta-step (used by the runner and
by the finite-difference tests). :func:`adapt_on_task` fine-tunes a net on a task for evaluation
(M-L2O's adaptation stage and the Transfer Learning / Vanilla L2O baselines).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .._numerics import derive_seed, global_norm, seeded_generator
from ..nets.base import UpdateRule
from ..tasks.base import Task, TaskFamily
from ..tasks.registry import make_task_family
from .config import MAMLConfig, MetaTrainConfig, UnrollConfig
from .imitation import adam_delta
from .unroll import MetaLossHook, Trajectory, start_trajectory, unroll

__all__ = [
    "sample_task_kwargs",
    "inner_step",
    "MAMLSegment",
    "maml_segment",
    "MAMLRunner",
    "adapt_on_task",
    "evaluate_rule",
]


# ------------------------------------------------------------------------------------ task arguments
def sample_task_kwargs(spec: Mapping[str, Any], generator: torch.Generator) -> dict[str, Any]:
    """One draw of the task arguments that define a MAML task.

    ``spec`` maps a task-family argument to a list (uniform choice), ``{"loguniform": [lo, hi]}``,
    ``{"uniform": [lo, hi]}`` or a constant. Keys are drawn in sorted order (reproducible).
    """
    out: dict[str, Any] = {}
    for key in sorted(spec):
        value = spec[key]
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError(f"maml.task_kwargs.{key}: cannot sample from an empty list")
            out[key] = value[int(torch.randint(len(value), (), generator=generator))]
        elif isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in ("uniform", "loguniform"):
            kind, bounds = next(iter(value.items()))
            lo, hi = (float(b) for b in bounds)
            if not (lo <= hi and (kind == "uniform" or lo > 0)):
                raise ValueError(f"maml.task_kwargs.{key}: invalid {kind} bounds {bounds}")
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            out[key] = (
                lo + (hi - lo) * u if kind == "uniform" else math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u)
            )
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------------------- inner step
def inner_step(
    weights: Mapping[str, Tensor],
    loss: Tensor,
    config: MAMLConfig,
    *,
    k: int,
    moments: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> tuple[dict[str, Tensor], float]:
    r"""One inner update :math:`\phi' = \phi - \alpha\,u(\nabla_\phi L)`; returns ``(phi', grad_norm)``.

    Non-finite inner gradients leave :math:`\phi` unchanged (``grad_norm`` is then ``nan``). With
    ``inner_update="adam"`` the moments live in ``moments`` (zeros at ``k = 0``; betas 0.9/0.999,
    eps 1e-8, bias-corrected), so ``K`` inner steps replay ``K`` steps of test-time adaptation.
    """
    names = list(weights)
    if not loss.requires_grad:
        return dict(weights), 0.0
    second = not config.first_order
    raw = torch.autograd.grad(loss, [weights[n] for n in names], create_graph=second, allow_unused=True)
    grads = [torch.zeros_like(weights[n]) if g is None else g for n, g in zip(names, raw, strict=True)]
    norm = global_norm(grads)
    if not math.isfinite(norm):
        return dict(weights), float("nan")
    if not second:
        grads = [g.detach() for g in grads]
    out = {}
    for n, g in zip(names, grads, strict=True):
        if config.inner_update == "adam":
            assert moments is not None
            m, v = moments.get(n, (torch.zeros_like(g), torch.zeros_like(g)))
            delta, m, v = adam_delta(g, m, v, k + 1, lr=config.inner_lr, betas=(0.9, 0.999), eps=1e-8)
            moments[n] = (m, v)
            out[n] = weights[n] + delta
        else:
            out[n] = weights[n] - config.inner_lr * g
    return out, norm


@dataclasses.dataclass
class MAMLSegment:
    """Result of :func:`maml_segment`.

    Attributes:
        loss: the outer (query) meta-loss under the adapted weights (backpropagate it into ``weights``).
        inner_losses: the support meta-loss before each inner step (floats; ``[0]`` is under ``phi``).
        inner_grad_norms: norm of each inner gradient.
        support_end, query_end: the detached trajectories after the segment (``next_segment``: the
            query continues the support trajectory, ``query_end`` is the single trajectory's end).
        train_losses: the query's train losses (detached).
        query_losses: the query's meta-split losses (detached).
        diverged_at: step at which the query run was frozen by the divergence guard, if it was.
        fast_weights: the adapted weights (in the graph of ``weights``).
    """

    loss: Tensor
    inner_losses: list[float]
    inner_grad_norms: list[float]
    support_end: Trajectory
    query_end: Trajectory
    train_losses: Tensor
    query_losses: Tensor
    diverged_at: int | None
    fast_weights: dict[str, Tensor]


def maml_segment(
    rule: UpdateRule,
    weights: Mapping[str, Tensor],
    support_task: Task,
    support: Trajectory,
    query_task: Task | None,
    query: Trajectory | None,
    num_steps: int,
    *,
    support_generator: torch.Generator,
    query_generator: torch.Generator | None,
    unroll_config: UnrollConfig,
    maml: MAMLConfig,
    objective: str = "sum",
    split: str = "train",
    hook: MetaLossHook | None = None,
    query_steps: int | None = None,
) -> MAMLSegment:
    """One MAML meta-step (see the module docstring): inner steps on a support segment, then the query.

    ``query_task``/``query`` ``None`` means ``next_segment``: the query (``query_steps`` steps, default
    ``num_steps``) continues the support trajectory reached under ``weights`` on ``support_task``.
    The support segment is replayed with the same batches for every inner step (the support batch
    generator's state is rewound), and the support trajectory advances along the first run (under
    ``weights``). ``hook`` (regularizers) applies to the query segment, i.e. to the outer loss.
    """
    fast = dict(weights)
    moments: dict[str, tuple[Tensor, Tensor]] = {}
    rewind = support_generator.get_state()
    inner_losses, norms = [], []
    support_end: Trajectory | None = None
    after = rewind
    for k in range(maml.inner_steps):
        support_generator.set_state(rewind)
        res = unroll(
            rule,
            fast,
            support_task,
            support,
            num_steps,
            generator=support_generator,
            config=unroll_config,
            meta_split=split,
        )
        if support_end is None:
            support_end, after = res.end, support_generator.get_state()
        inner = res.objective(objective)
        inner_losses.append(float(inner.detach()))
        fast, norm = inner_step(fast, inner, maml, k=k, moments=moments)
        norms.append(norm)
    support_generator.set_state(after)
    assert support_end is not None
    if query_task is None:
        query_task, query, query_generator = support_task, support_end, support_generator
    assert query is not None and query_generator is not None
    res = unroll(
        rule,
        fast,
        query_task,
        query,
        num_steps if query_steps is None else query_steps,
        generator=query_generator,
        config=unroll_config,
        meta_split=split,
        hook=hook,
    )
    outer = res.objective(objective) + res.extra
    return MAMLSegment(
        loss=outer,
        inner_losses=inner_losses,
        inner_grad_norms=norms,
        support_end=support_end,
        query_end=res.end,
        train_losses=res.train_losses,
        query_losses=res.losses.detach(),
        diverged_at=res.diverged_at,
        fast_weights=fast,
    )


# ------------------------------------------------------------------------------ the trainer's helper
class MAMLRunner:
    """The MAML side of a :class:`~learned_optim.meta.trainer.MetaTrainer` run (``maml.enabled``).

    Per meta-epoch ``index`` it draws the task arguments and the support task (:meth:`support_task_for`;
    the trainer keeps it and its trajectory and passes them back in), and the query task with its own
    trajectory and batch generator (:meth:`begin`); :meth:`segment` computes one meta-step's outer loss.
    Everything is drawn from seeds derived from ``(config.seed, purpose, index)``, so a resumed run
    re-draws the same tasks. It holds the run's config and task family, never the trainer.
    """

    def __init__(self, run: MetaTrainConfig, family: TaskFamily, *, device: torch.device, dtype: torch.dtype) -> None:
        self.run = run
        self.config: MAMLConfig = run.maml
        self.family = family
        self.device, self.dtype = device, dtype
        self.task_kwargs: dict[str, Any] = {}
        self.query_task: Task | None = None
        self.query: Trajectory | None = None
        self.query_generator = torch.Generator()
        self._families: OrderedDict[str, TaskFamily] = OrderedDict()

    # -- tasks -------------------------------------------------------------------------------------
    def family_for(self, task_kwargs: Mapping[str, Any]) -> TaskFamily:
        """The run's task family with ``task_kwargs`` overriding its kwargs (a small LRU cache)."""
        if not task_kwargs:
            return self.family
        key = json.dumps(task_kwargs, sort_keys=True, default=str)
        if key not in self._families:
            cfg = self.run.task
            self._families[key] = make_task_family(
                cfg.family, {**cfg.kwargs, **task_kwargs}, device=self.device, dtype=self.dtype
            )
            while len(self._families) > 16:
                self._families.popitem(last=False)
        self._families.move_to_end(key)
        return self._families[key]

    def _gen(self, *keys: Any) -> torch.Generator:
        return seeded_generator(derive_seed(self.run.seed, *keys))

    def support_task_for(self, index: int) -> tuple[Task, torch.Generator]:
        """Draw meta-epoch ``index``'s task arguments and its support task (the trainer's ``_task_for``)."""
        self.task_kwargs = sample_task_kwargs(self.config.task_kwargs, self._gen("maml-task", index))
        gen = self._gen("task", index)
        return self.family_for(self.task_kwargs).sample(gen), gen

    def _query_for(self, index: int, support_task: Task) -> tuple[Task | None, torch.Generator]:
        gen = self._gen("maml-query", index)
        if self.config.query == "new_instance":
            return self.family_for(self.task_kwargs).sample(gen), gen
        if self.config.query == "same_instance":
            return support_task, gen
        return None, gen

    def begin(self, index: int, rule: UpdateRule, support_task: Task) -> None:
        """Start meta-epoch ``index``'s query trajectory (after the trainer started the support one)."""
        self.query_task, gen = self._query_for(index, support_task)
        self.query = (
            None
            if self.query_task is None
            else start_trajectory(rule, self.query_task, gen, device=self.device, dtype=self.dtype)
        )
        self.query_generator = self._gen("maml-query-data", index)

    # -- one meta-step ---------------------------------------------------------------------------------
    def segment(
        self,
        rule: UpdateRule,
        weights: Mapping[str, Tensor],
        support_task: Task,
        support: Trajectory,
        support_generator: torch.Generator,
        num_steps: int,
        hook: MetaLossHook | None = None,
    ) -> tuple[Tensor, dict[str, Any], Tensor, Trajectory, int | None]:
        """One meta-step on the current task pair: ``(outer loss, metrics, train losses, end, diverged_at)``.

        ``support`` is the trainer's trajectory on ``support_task`` (batches from ``support_generator``);
        ``end`` is the trajectory the trainer keeps (the support one; with ``next_segment`` the single
        trajectory after support + query). The query trajectory advances in place.
        """
        cfg = self.run
        next_segment = self.config.query == "next_segment"
        n_support = num_steps // 2 if next_segment else num_steps
        result = maml_segment(
            rule,
            weights,
            support_task,
            support,
            self.query_task,
            self.query,
            max(n_support, 1),
            support_generator=support_generator,
            query_generator=None if next_segment else self.query_generator,
            unroll_config=cfg.unroll,
            maml=self.config,
            objective=cfg.objective.kind,
            split=cfg.objective.split,
            hook=hook,
            query_steps=num_steps - n_support if next_segment else None,
        )
        if next_segment:
            end = result.query_end
        else:
            end, self.query = result.support_end, result.query_end
        metrics = {
            "inner_loss": result.inner_losses[0],
            "inner_loss_last": result.inner_losses[-1],
            "inner_grad_norm": result.inner_grad_norms[0],
            "outer_loss": float(result.loss.detach()),
            "query_loss_last": float(result.query_losses[-1]) if len(result.query_losses) else None,
            "task_kwargs": self.task_kwargs,
        }
        return result.loss, metrics, result.train_losses, end, result.diverged_at

    @property
    def steps_per_meta_step(self) -> int:
        """Support-trajectory steps a meta-step consumes per ``segment_length`` (2 with ``next_segment``)."""
        return 2 if self.config.query == "next_segment" else 1

    # -- checkpoints ----------------------------------------------------------------------------------
    def to_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors: dict[str, Tensor] = {"maml.rng.query": self.query_generator.get_state()}
        meta: dict[str, Any] = {"task_kwargs": self.task_kwargs, "query": None}
        if self.query is not None:
            traj_tensors, meta["query"] = self.query.to_tensors("maml.query")
            tensors.update(traj_tensors)
        return tensors, meta

    def load(
        self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any] | None, index: int, support_task: Task | None
    ) -> None:
        """Restore the in-flight query after the trainer restored its task (``support_task_for(index)``)."""
        if meta is None or support_task is None:
            self.query_task, self.query = None, None
            return
        self.task_kwargs = dict(meta["task_kwargs"])
        self.query_task, _ = self._query_for(index, support_task)
        self.query = (
            None
            if meta["query"] is None
            else Trajectory.from_tensors("maml.query", tensors, meta["query"], device=self.device)
        )
        self.query_generator.set_state(tensors["maml.rng.query"])


# --------------------------------------------------------------------------- adaptation and evaluation
def adapt_on_task(
    rule: UpdateRule,
    family: TaskFamily | Task,
    *,
    steps: int = 5,
    lr: float = 1e-3,
    segment_length: int = 20,
    trajectory_length: int = 100,
    seed: int = 0,
    objective: str = "sum",
    unroll_config: UnrollConfig | None = None,
    grad_clip: float | None = None,
) -> tuple[UpdateRule, list[float]]:
    r"""Test-time adaptation (M-L2O's adaptation stage): ``steps`` Adam updates of a copy of ``rule``.

    Each update is one truncated segment of ``segment_length`` learned steps on the adaptation task
    (its meta-objective ``objective``); segments continue one trajectory for ``trajectory_length``
    steps, then a new instance is drawn from ``family`` (a fixed :class:`Task` is restarted from a new
    initial point). Returns ``(adapted copy, meta-losses)``; ``rule`` itself is not modified. Any
    non-finite meta-gradient raises :class:`learned_optim.adapt.AdaptationError` and nothing is kept.
    """
    from ..adapt import adapt_weights

    cfg = unroll_config or UnrollConfig(trajectory_length=trajectory_length, segment_length=segment_length)
    adapted = copy.deepcopy(rule).requires_grad_(False)
    data = seeded_generator(derive_seed(seed, "adapt-data"))
    state: dict[str, Any] = {"task": None, "trajectory": None, "instance": 0}

    def segment_loss(weights: Mapping[str, Tensor], k: int) -> Tensor:
        traj = state["trajectory"]
        if traj is None or traj.step >= trajectory_length:
            gen = seeded_generator(derive_seed(seed, "adapt-instance", state["instance"]))
            state["instance"] += 1
            state["task"] = family.sample(gen) if isinstance(family, TaskFamily) else family
            traj = start_trajectory(adapted, state["task"], gen)
        n = min(segment_length, trajectory_length - traj.step)
        res = unroll(adapted, weights, state["task"], traj, n, generator=data, config=cfg)
        state["trajectory"] = res.end
        return res.objective(objective)

    losses = adapt_weights(adapted, segment_loss, steps=steps, lr=lr, grad_clip=grad_clip)
    return adapted, losses


@torch.no_grad()
def evaluate_rule(
    rule: UpdateRule, task: Task, *, steps: int = 1000, seed: int = 0, config: UnrollConfig | None = None
) -> Tensor:
    """Losses ``f(theta_0), f(theta_1), ..., f(theta_steps)`` of ``rule`` run on ``task`` (no graph)."""
    gen = torch.Generator().manual_seed(seed)
    traj = start_trajectory(rule, task, gen)
    cfg = config or UnrollConfig(trajectory_length=steps, segment_length=steps)
    res = unroll(rule, None, task, traj, steps, generator=gen, config=cfg, track_graph=False)
    return torch.cat([res.train_losses[:1], res.losses.detach().double()])
