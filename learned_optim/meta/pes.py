r"""Persistent evolution strategies (PES; Vicol, Metz & Sohl-Dickstein 2021), beside truncated BPTT.

A trajectory of :math:`T` inner steps is cut into truncations of :math:`K` steps. PES keeps :math:`N`
antithetic *pairs* of particles on the same inner problem; particle :math:`i^\pm` runs the net with
weights :math:`\phi \pm \epsilon_i`, :math:`\epsilon_i \sim N(0, \sigma^2 I)` drawn afresh every
truncation, and carries its own inner state (optimizee parameters and optimizer state) from truncation
to truncation. Each pair also carries the accumulated perturbation

.. math:: \xi_i \leftarrow \xi_i + \epsilon_i \qquad (\xi_i = 0 \text{ when its inner problem starts}),

and the truncation's estimate of the meta-gradient is

.. math:: \hat g = \frac{1}{2N\sigma^2} \sum_{i=1}^{N} \xi_i \,\big(L_i^{+} - L_i^{-}\big)

with :math:`L_i^\pm` the truncation's meta-objective of particle :math:`i^\pm`. Summed over the
truncations of a trajectory (at fixed :math:`\phi`) it is an unbiased estimate of the gradient of the
Gaussian-smoothed full-trajectory objective :math:`\mathbb E_\epsilon[\sum_k L_k(\phi + \epsilon)]` (the
true gradient up to :math:`O(\sigma^2)` smoothing), unlike truncated BPTT, whose segments ignore the
effect of the weights on the state they inherit. No backpropagation through the inner steps.

:func:`pes_estimate` is the estimator on flat weight vectors; :class:`PESRunner` is the meta-trainer's
side of it (``estimator: {kind: pes}`` in the config), checkpointed with the trainer so that ``--resume``
continues bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .._numerics import derive_seed, seeded_generator
from ..nets.base import UpdateRule
from ..tasks.base import Task
from .config import EstimatorConfig, MetaTrainConfig
from .distributed import block_bounds, broadcast_json, broadcast_tensors, gather_blocks
from .unroll import Trajectory, start_instance, unroll, unroll_particles

__all__ = ["PESResult", "pes_estimate", "PESRunner"]


@dataclasses.dataclass
class PESResult:
    """One truncation: ``gradient`` :math:`\\hat g` ``(D,)``, the new accumulated perturbations ``xi``
    ``(N, D)``, the particles' objectives ``losses`` ``(2N,)`` (:math:`L^+_{1..N}, L^-_{1..N}`) and their new
    inner ``state`` (whatever ``unroll_fn`` returned)."""

    gradient: Tensor
    xi: Tensor
    losses: Tensor
    state: Any


def pes_estimate(
    unroll_fn: Callable[[Tensor, Any], tuple[Tensor, Any]],
    theta: Tensor,
    state: Any,
    xi: Tensor,
    epsilon: Tensor,
    sigma: float,
) -> PESResult:
    r"""One PES truncation from flat weights ``theta`` ``(D,)``.

    ``epsilon`` ``(N, D)``: this truncation's perturbations, drawn from :math:`N(0, \sigma^2 I)`;
    ``xi`` ``(N, D)``: the pairs' accumulated perturbations before it. ``unroll_fn(weights, state)`` runs
    the truncation for the ``2N`` particles with weights ``weights`` ``(2N, D)`` (rows
    :math:`\theta + \epsilon_1, \dots, \theta + \epsilon_N, \theta - \epsilon_1, \dots, \theta - \epsilon_N`)
    from their inner ``state`` and returns their objectives ``(2N,)`` and new state.
    """
    if epsilon.ndim != 2 or epsilon.shape != xi.shape or epsilon.shape[1] != theta.numel():
        raise ValueError(
            f"pes_estimate: epsilon {tuple(epsilon.shape)} and xi {tuple(xi.shape)} must both be (N, {theta.numel()})"
        )
    n = epsilon.shape[0]
    weights = torch.cat([theta + epsilon, theta - epsilon])
    losses, new_state = unroll_fn(weights, state)
    xi = xi + epsilon
    gradient = (xi * (losses[:n] - losses[n:]).unsqueeze(1)).sum(dim=0) / (2 * n * sigma**2)
    return PESResult(gradient=gradient, xi=xi, losses=losses, state=new_state)


class PESRunner:
    """The meta-trainer's PES estimator: ``2N`` particles on the trainer's current task.

    All particles start from the trainer's :math:`\\theta_0` and see the same batches (one generator per
    truncation, seeded by the run seed, the task index and the truncation's first step: common random
    numbers, so that :math:`L^+ - L^-` measures the perturbation, not the data). The perturbations are
    drawn from a generator seeded the same way. What persists between truncations (the particles'
    trajectories and :math:`\\xi`) goes into the trainer's checkpoint. It holds the run's config and the
    net, never the trainer: the trainer passes the task, its index and the weights in.

    Particle-parallel (``world_size`` > 1, a process group): rank ``r`` unrolls only its contiguous block of
    the particles (:func:`~.distributed.block_bounds`) and the ranks exchange the particles' objectives and
    divergence flags after each truncation (one ``all_gather``), so every rank computes the same :math:`\\hat g`
    from the same numbers as one process would: the run is the single-process run bit for bit, each rank unrolling
    ``1 / world_size`` of the particles (on two processes 1.5x the meta-steps per second on a 2-vCPU AMD VM, 1.9x on
    a 2-core Intel Xeon; ``benchmarks/particle_parallel.py``, ``benchmarks/batched_particles.py``). The other ranks'
    particles are stale copies until a checkpoint gathers them (:meth:`to_tensors`), so a checkpoint holds every
    particle and resumes on any number of processes.

    With ``estimator.instances`` :math:`K > 1` the pairs are spread over :math:`K` instances of the task (their own
    :math:`\\theta_0` and batches; :meth:`instance_of`), the estimate unchanged in form over all
    :math:`N = K \\cdot` ``num_pairs`` pairs. With ``estimator.batch_particles`` a process's particles are unrolled
    together, each inner step one call batched over them (:func:`~.unroll.unroll_particles`, a batch stream per
    instance), instead of one after the other: the same estimate to float rounding.
    """

    def __init__(
        self,
        run: MetaTrainConfig,
        rule: UpdateRule,
        *,
        device: torch.device,
        dtype: torch.dtype,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.run, self.rule = run, rule
        self.config: EstimatorConfig = run.estimator
        self.device, self.dtype = device, dtype
        if world_size > self.num_particles:
            raise ValueError(
                f"particle-parallel PES on {world_size} processes needs at least as many particles, has "
                f"{self.num_particles} (estimator.num_pairs: {self.config.num_pairs}, instances: "
                f"{self.config.instances})"
            )
        self.rank, self.world_size = rank, world_size
        self.bounds = block_bounds(self.num_particles, world_size)
        self.names = [n for n, _ in rule.named_parameters()]
        self.shapes = [p.shape for _, p in rule.named_parameters()]
        self.particles: list[Trajectory] = []
        self.xi: Tensor | None = None

    @property
    def num_pairs(self) -> int:
        """Antithetic pairs of a truncation: ``num_pairs`` on each of the ``instances`` task instances."""
        return self.config.num_pairs * self.config.instances

    @property
    def num_particles(self) -> int:
        return 2 * self.num_pairs

    def instance_of(self, particle: int) -> int:
        """The task instance particle ``particle`` runs on (particles ``i`` and ``i + num_pairs`` are a pair, the
        pairs of instance :math:`k` the :math:`k`-th ``estimator.num_pairs`` of them)."""
        return (particle % self.num_pairs) // self.config.num_pairs

    def _unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """The net's weights by name from flat ``(D,)`` weights, or stacked ``(P, D)`` ones (each ``(P, *shape)``)."""
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = shape.numel()
            out[name] = flat[..., offset : offset + size].reshape(*flat.shape[:-1], *shape)
            offset += size
        return out

    def begin(self, trajectory: Trajectory, task: Task, task_index: int) -> None:
        """New inner problem, the trainer's ``task_index``-th: the particles of instance 0 start at ``trajectory``,
        those of instance :math:`k > 0` at their own :math:`\\theta_0` drawn from ``task`` (a generator seeded by the
        run seed, the task index and :math:`k`) with ``trajectory``'s lr, horizon and weight decay; :math:`\\xi = 0`."""
        starts = [trajectory]
        for k in range(1, self.config.instances):
            seed = derive_seed(self.run.seed, "pes-instance", task_index, k)
            starts.append(start_instance(self.rule, task, trajectory, seed, device=self.device, dtype=self.dtype))
        self.particles = [starts[self.instance_of(i)].detached() for i in range(self.num_particles)]
        dim = sum(s.numel() for s in self.shapes)
        self.xi = torch.zeros((self.num_pairs, dim), device=self.device, dtype=self.dtype)

    def segment(
        self, weights: Mapping[str, Tensor], task: Task, task_index: int, n: int
    ) -> tuple[Tensor, dict[str, Any], Tensor, Trajectory]:
        """One truncation of ``n`` steps on ``task`` (the trainer's ``task_index``-th). Returns a surrogate loss
        whose value is the particles' mean objective and whose gradient in ``weights`` is :math:`\\hat g`, the
        metrics, and the train losses and trajectory end of this rank's first particle (particle ``1+`` on one
        process and on rank 0; the trainer's bookkeeping of steps)."""
        cfg = self.run
        assert self.xi is not None
        first, last = self.bounds[self.rank]
        start = self.particles[first].step  # every particle has taken the same steps
        theta = torch.cat([weights[k].detach().reshape(-1) for k in self.names])
        noise = seeded_generator(derive_seed(cfg.seed, "pes-noise", task_index, start))
        epsilon = torch.randn(self.xi.shape, generator=noise, dtype=self.xi.dtype).to(self.xi.device)
        epsilon = epsilon * self.config.sigma
        # instance 0's batches as before instances existed (so that one instance is the earlier run bit for bit)
        data_seeds = [derive_seed(cfg.seed, "pes-data", task_index, start)]
        data_seeds += [derive_seed(cfg.seed, "pes-data", task_index, start, k) for k in range(1, self.config.instances)]
        train_losses: list[Tensor] = []

        def run(all_weights: Tensor, particles: list[Trajectory]) -> tuple[Tensor, tuple[list[Trajectory], Tensor]]:
            """Every particle's objective; its new trajectory (this rank's) and divergence flag, as the new state."""
            objectives, ends = [], list(particles)
            options: dict[str, Any] = {"config": cfg.unroll, "meta_split": cfg.objective.split}
            if self.config.batch_particles:  # one batch stream per instance of this block
                instances = sorted({self.instance_of(i) for i in range(first, last)})
                results = unroll_particles(
                    self.rule,
                    self._unflatten(all_weights[first:last]),
                    task,
                    particles[first:last],
                    n,
                    generator=[seeded_generator(data_seeds[k]) for k in instances],
                    streams=[instances.index(self.instance_of(i)) for i in range(first, last)],
                    **options,
                )
            else:
                results = [
                    unroll(
                        self.rule,
                        self._unflatten(all_weights[i]),
                        task,
                        particles[i],
                        n,
                        generator=seeded_generator(data_seeds[self.instance_of(i)]),
                        track_graph=False,
                        **options,
                    )
                    for i in range(first, last)
                ]
            for i, result in zip(range(first, last), results, strict=True):
                objectives.append(result.objective(cfg.objective.kind).detach())
                train_losses.append(result.train_losses)
                ends[i] = result.end
            flags = torch.tensor([float(ends[i].diverged) for i in range(first, last)], device=all_weights.device)
            mine = torch.stack([torch.stack(objectives).to(all_weights.dtype), flags.to(all_weights.dtype)], dim=1)
            if self.world_size > 1:  # every particle's objective and flag, from the rank that unrolled it (one call)
                mine = gather_blocks(mine, self.bounds)
            return mine[:, 0], (ends, mine[:, 1])

        with torch.no_grad():
            out = pes_estimate(run, theta, self.particles, self.xi, epsilon, self.config.sigma)
        (self.particles, diverged), self.xi = out.state, out.xi
        mean = out.losses.mean()
        gradient = self._unflatten(out.gradient)
        surrogate = mean + sum(
            (weights[k] * gradient[k]).sum() - (weights[k].detach() * gradient[k]).sum() for k in self.names
        )
        metrics = {
            "pes_loss_plus": float(out.losses[: self.num_pairs].mean()),
            "pes_loss_minus": float(out.losses[self.num_pairs :].mean()),
            "pes_grad_norm": float(out.gradient.norm()),
            "pes_diverged": int(diverged.sum()),
        }
        return surrogate, metrics, train_losses[0], self.particles[first]

    # ------------------------------------------------------------------------------ checkpoints
    def gather_particles(self) -> None:
        """Particle-parallel: every rank's particles sent to every rank, so each holds all of them up to date."""
        for owner, (start, end) in enumerate(self.bounds):
            for i in range(start, end):
                tensors, meta = self.particles[i].to_tensors("particle")
                meta = broadcast_json(meta, owner, self.device)
                tensors = broadcast_tensors(tensors, owner, self.device)
                self.particles[i] = Trajectory.from_tensors("particle", tensors, meta, device=self.device)

    def to_tensors(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Every particle's trajectory and :math:`\\xi` (particle-parallel: collective, every rank calls it)."""
        if self.world_size > 1 and self.particles:
            self.gather_particles()
        tensors: dict[str, Tensor] = {}
        meta: dict[str, Any] = {"particles": []}
        if self.xi is not None:
            tensors["pes.xi"] = self.xi.detach().contiguous().cpu()
        for i, particle in enumerate(self.particles):
            t, m = particle.to_tensors(f"pes.particle.{i}")
            tensors.update({k: v.clone() for k, v in t.items()})  # particles may share storage (safetensors refuses)
            meta["particles"].append(m)
        return tensors, meta

    def load(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any] | None) -> None:
        if meta is None or "pes.xi" not in tensors:
            self.particles, self.xi = [], None
            return
        if len(meta["particles"]) != self.num_particles:
            raise ValueError(
                f"the checkpoint holds {len(meta['particles'])} PES particles, the config makes {self.num_particles} "
                "(estimator.num_pairs and instances must be the run's)"
            )
        device = self.device
        self.xi = tensors["pes.xi"].to(device)
        self.particles = [
            Trajectory.from_tensors(f"pes.particle.{i}", tensors, m, device=device)
            for i, m in enumerate(meta["particles"])
        ]
