r"""Truncated BPTT over several instances of the trainer's task per meta-step (``estimator.instances``).

The trainer's trajectory is instance 0; instances :math:`k = 1, \dots, K-1` of the same task start from their own
:math:`\theta_0^{(k)}` and draw their own batches, and are carried from truncation to truncation with it. A meta-step
unrolls every instance over the same ``n`` steps with the same net and takes the mean of their meta-objectives,

.. math:: L(\phi) = \frac1K \sum_{k=0}^{K-1} L_k(\phi),\qquad \nabla_\phi L = \frac1K \sum_k \nabla_\phi L_k,

a meta-gradient averaged over starting points and data streams of the task (lower variance per meta-step). With
``estimator.batch_particles`` the instances are unrolled together, each inner step one call batched over them by
``torch.func.vmap`` (:func:`~learned_optim.meta.unroll.unroll_particles` with ``track_graph``), else one after the
other (:func:`~learned_optim.meta.unroll.unroll`): the same objective and meta-gradient to float rounding. The
config's regularizers add each instance's terms, taken on its own points, to its objective.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .._numerics import derive_seed
from ..nets.base import UpdateRule
from ..tasks.base import Task
from .config import MetaTrainConfig
from .unroll import MetaLossHook, Trajectory, UnrollResult, start_instance, unroll, unroll_particles

__all__ = ["TaskInstances"]


class TaskInstances:
    """The instances :math:`1, \\dots, K-1` beside the trainer's trajectory (instance 0) of truncated BPTT.

    Instance :math:`k` of the trainer's ``task_index``-th task starts at :math:`\\theta_0` drawn from (run seed,
    ``"instance"``, task index, :math:`k`) and draws its batches from a generator seeded with (run seed, ``"data"``,
    task index, :math:`k`) (instance 0's from (run seed, ``"data"``, task index), the trainer's own). The instances'
    trajectories and generators go into the trainer's checkpoint, so ``--resume`` continues bit for bit. It holds the
    run's config and the net, never the trainer: the trainer passes its trajectory, task and data generator in.
    """

    def __init__(self, run: MetaTrainConfig, rule: UpdateRule, *, device: torch.device, dtype: torch.dtype) -> None:
        self.run, self.rule, self.device, self.dtype = run, rule, device, dtype
        self.count = run.estimator.instances
        self.others: list[Trajectory] = []
        #: the batch streams of instances 1..K-1 (re-seeded at every new task; checkpointed by the trainer)
        self.generators = [torch.Generator() for _ in range(self.count - 1)]

    def begin(self, trajectory: Trajectory, task: Task, task_index: int) -> None:
        """New inner problem, the trainer's ``task_index``-th, whose instance 0 starts at ``trajectory``."""
        seed = self.run.seed
        self.others = [
            start_instance(
                self.rule,
                task,
                trajectory,
                derive_seed(seed, "instance", task_index, k),
                device=self.device,
                dtype=self.dtype,
            )
            for k in range(1, self.count)
        ]
        for k, generator in enumerate(self.generators, start=1):
            generator.manual_seed(derive_seed(seed, "data", task_index, k))

    def segment(
        self,
        weights: Mapping[str, Tensor],
        task: Task,
        trajectory: Trajectory,
        generator: torch.Generator,
        n: int,
        hook: MetaLossHook | None = None,
    ) -> list[UnrollResult]:
        """The next ``n`` steps of every instance (instance 0 from ``trajectory`` with batches from ``generator``),
        their losses in the graph of ``weights``; the other instances move on to their segment's end. ``hook``: the
        regularizers' meta-loss terms, taken on each instance's own points (in each result's ``extra``): one instance
        after the other, or, batched, after each step one instance after the other (a regularizer that draws random
        numbers then draws them in another order: a run of its own)."""
        cfg = self.run
        starts, streams = [trajectory, *self.others], [generator, *self.generators]
        options: dict[str, Any] = {"config": cfg.unroll, "meta_split": cfg.objective.split, "hook": hook}
        if cfg.estimator.batch_particles:
            results = unroll_particles(
                self.rule,
                weights,
                task,
                starts,
                n,
                generator=streams,
                streams=list(range(self.count)),
                shared_weights=True,
                track_graph=True,
                **options,
            )
        else:
            results = [
                unroll(self.rule, weights, task, start, n, generator=stream, **options)
                for start, stream in zip(starts, streams, strict=True)
            ]
        self.others = [r.end for r in results[1:]]
        return results

    # ------------------------------------------------------------------------------ checkpoints
    def named_generators(self) -> dict[str, torch.Generator]:
        """The instances' batch generators by checkpoint name."""
        return {f"data.instance.{k}": g for k, g in enumerate(self.generators, start=1)}

    def to_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors: dict[str, Tensor] = {}
        meta: dict[str, Any] = {"instances": []}
        for k, other in enumerate(self.others, start=1):
            t, m = other.to_tensors(f"instance.{k}")
            tensors.update(t)
            meta["instances"].append(m)
        return tensors, meta

    def load(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any] | None) -> None:
        """Restore the instances :meth:`to_tensors` saved (none: no trajectory in flight)."""
        if meta is None:
            self.others = []
            return
        if len(meta["instances"]) != self.count - 1:
            raise ValueError(
                f"the checkpoint holds {len(meta['instances']) + 1} task instances, the config makes {self.count} "
                "(estimator.instances must be the run's)"
            )
        self.others = [
            Trajectory.from_tensors(f"instance.{k}", tensors, m, device=self.device)
            for k, m in enumerate(meta["instances"], start=1)
        ]
