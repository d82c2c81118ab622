"""The meta-trainer: ``MetaTrainer(config).train()`` turns a config into a zoo-format optimizer folder.

One *meta-step* is one truncated-BPTT segment of one trajectory followed by one update of the net's
weights; one *meta-epoch* is one trajectory (a freshly sampled task run for ``trajectory_length`` steps,
or the curriculum stage's length). Per meta-epoch, with the imitation probability of the current stage,
the segments of that trajectory imitate Adam instead (:mod:`learned_optim.meta.imitation`). With
``estimator.kind: pes`` each segment is a PES truncation instead (:mod:`learned_optim.meta.pes`): its
particles carry their own trajectories, and the meta-gradient is PES's estimate instead of backprop.

Run folder (``out_dir``)::

    config.json          the resolved config of the run
    log.jsonl            one JSON object per meta-step, trajectory end, evaluation, start/resume/finish
    checkpoint/          state-<meta_step>.safetensors + state-<meta_step>.json (latest only)
    model/               the result: config.json + model.safetensors + README.md (hub.save_pretrained)

Checkpoints hold the net's weights, the meta-optimizers' states, every RNG state, the curriculum
state, the counters and the in-flight trajectory (its task is re-drawn from its recorded seed), as
safetensors tensors plus a JSON document; nothing is pickled. Each file is written to a temporary name
and moved into place with ``os.replace``; the JSON is written last, so a JSON file's presence means its
checkpoint is complete. ``train(resume=True)`` continues from the latest one, bit for bit on the same
device, so a killed run loses at most ``checkpoint_every`` meta-steps.

When the curriculum restores its best net (on advancing or finishing) only the weights are restored;
the meta-optimizer's moments carry on, as in the reference implementation. The shipped net is the best
evaluated one when the curriculum is on, the last one otherwise.

Reproducibility: all randomness is drawn from generators seeded by ``(seed, purpose, index)``: the
net's initialisation, each trajectory's task and batches, the imitation coin flips, and the fixed
evaluation runs of the curriculum.
"""

from __future__ import annotations

import collections
import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor

from .._numerics import derive_seed, seeded_generator
from ..hub import load_rule, parent_record
from ..nets.base import UpdateRule, build_rule
from ..tasks.base import Task, TaskFamily
from ..tasks.registry import make_task_family
from .card import run_metrics, save_run_model
from .checkpoint import (
    complete_checkpoints,
    latest_checkpoint,
    read_checkpoint,
    trainer_state_from_tensors,
    trainer_state_to_tensors,
    write_checkpoint,
)
from .config import MetaTrainConfig, TaskSection, build_meta_optimizer, load_config
from .curriculum import Curriculum
from .distributed import average_gradients, data_parallel
from .imitation import imitation_unroll
from .unroll import MetaLossHook, Trajectory, UnrollResult, as_hook, evaluation_scores, start_trajectory, unroll

__all__ = ["MetaTrainer", "derive_seed", "make_task_family", "build_meta_optimizer"]


class MetaTrainer:
    """Meta-trains a learned optimizer from a :class:`~learned_optim.meta.config.MetaTrainConfig`.

    Args:
        config: the config (a dataclass, a mapping, or a path to a JSON/YAML file).
        out_dir: run folder (default ``config.out_dir`` or ``runs/<name>``).
        device: overrides ``config.device``.
        family: a :class:`TaskFamily` to use instead of building ``config.task`` (Python API only; pass
            the same one again to resume).
        hook: extra meta-loss term per trajectory point (see :class:`~learned_optim.meta.unroll.MetaLossHook`), in
            truncated-BPTT and MAML meta-steps (not in imitation meta-epochs; refused with PES).
        progress: show a tqdm progress bar over meta-epochs.
        command: the command line recorded in the model card.
        rank, world_size: data-parallel meta-training (default: from an initialised
            ``torch.distributed`` process group, else a single process). Each rank runs its own
            trajectories (task ``meta_epoch * world_size + rank``), the meta-gradients are averaged over
            the ranks before every meta-optimizer step (what DDP does; done by hand because the net runs
            through ``functional_call``, not through a wrapped module's forward), so every rank keeps
            identical weights. Rank 0 writes the log, the checkpoints and the model; rank ``r > 0`` writes
            ``log.rank<r>.jsonl`` and ``checkpoint/rank<r>/`` (its trajectory), so ``--resume`` restarts
            every rank where it was. Without a process group, ``rank``/``world_size`` only select the
            tasks (a single-process stand-in for one rank).
        parallel: what the ranks of a process group split: ``"data"`` (the trajectories, as above) or
            ``"particles"`` (PES only: every rank runs the same trajectory and unrolls its share of the PES
            particles, :class:`~learned_optim.meta.pes.PESRunner`; the run is the single-process one bit for
            bit, faster; rank 0 alone writes the log, the checkpoints and the model, and a checkpoint
            resumes on any number of processes).

    Example::

        trainer = MetaTrainer("learned_optim/meta/configs/l2o-lstm.yaml", out_dir="runs/l2o-lstm")
        folder = trainer.train()            # runs/l2o-lstm/model, loadable by learned_optim.from_pretrained
    """

    def __init__(
        self,
        config: MetaTrainConfig | Mapping[str, Any] | str | os.PathLike,
        *,
        out_dir: str | os.PathLike | None = None,
        device: str | None = None,
        family: TaskFamily | None = None,
        hook: MetaLossHook | None = None,
        progress: bool = True,
        command: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        parallel: str = "data",
    ) -> None:
        if isinstance(config, (str, os.PathLike)):
            config = load_config(config)
        elif isinstance(config, Mapping):
            config = MetaTrainConfig.from_dict(config)
        if device is not None:
            config.device = device
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was requested but CUDA is not available; use --device cpu")
        self.dtype = getattr(torch, config.dtype)
        self.rank, self.world_size, in_group = data_parallel(rank, world_size)
        if parallel not in ("data", "particles"):
            raise ValueError(f"parallel must be 'data' or 'particles', got {parallel!r}")
        if parallel == "particles" and config.estimator.kind != "pes":
            raise ValueError("particle-parallel meta-training splits PES particles: it needs estimator.kind 'pes'")
        if parallel == "particles" and self.world_size > 1 and not in_group:
            raise ValueError("particle-parallel meta-training on several ranks needs a torch.distributed process group")
        self._synchronize = in_group and parallel == "data"  # data-parallel: average the ranks' meta-gradients
        # who splits the trajectories: the ranks (data-parallel), or nobody (one process, or particle-parallel)
        self.data_rank, self.data_world_size = (self.rank, self.world_size) if parallel == "data" else (0, 1)
        self.writes_files = parallel == "data" or self.rank == 0
        if self.world_size > 1 and config.maml.enabled:
            raise ValueError("data-parallel meta-training (world size > 1) does not support maml yet")
        self.out_dir = Path(out_dir or config.out_dir or Path("runs") / config.name)
        if hook is not None and config.estimator.kind == "pes":
            raise ValueError(
                "a meta-loss hook does not combine with estimator 'pes' (it needs backpropagation through the "
                "segment); use estimator.kind: tbptt for it"
            )
        self.hook = as_hook(hook)
        self.regularizer_hook = None
        if config.regularizers:  # flatness-aware meta-loss terms (learned_optim.meta.regularizers)
            from .regularizers import RegularizerHook, combine_hooks

            # their own stream, seeded from the config: torch's global RNG starts from a random seed in each process
            self.regularizer_hook = RegularizerHook(
                config.regularizers,
                segment_length=config.unroll.segment_length,
                seed=derive_seed(config.seed, "regularizers", self.data_rank),
            )
            self.hook = combine_hooks(hook, self.regularizer_hook)
        self.progress = progress
        self.command = command or "MetaTrainer(config).train()  # Python API"
        self.family = (
            family
            if family is not None
            else make_task_family(config.task.family, config.task.kwargs, device=self.device, dtype=self.dtype)
        )
        self._eval_family: TaskFamily | None = None if config.task.eval_kwargs and family is None else self.family

        self.parent: dict[str, Any] | None = None
        self.rule = self._build_rule().to(device=self.device, dtype=self.dtype)
        name, lr = config.meta_optimizer.resolved(self.rule.family)
        self.meta_optimizer_name, self.meta_lr = name, lr
        params = list(self.rule.parameters())
        self.meta_optimizer = build_meta_optimizer(params, name, lr, config.meta_optimizer.kwargs)
        self.imitation_optimizer = (
            torch.optim.Adam(params, lr=config.imitation.lr) if config.imitation.enabled else None
        )
        self.curriculum = Curriculum(config.curriculum) if config.curriculum.enabled else None
        self.maml = None
        if config.maml.enabled:  # M-L2O: the query side of each meta-step (see learned_optim.meta.maml)
            from .maml import MAMLRunner

            self.maml = MAMLRunner(config, self.family, device=self.device, dtype=self.dtype)
        self.pes = None
        if config.estimator.kind == "pes":  # persistent evolution strategies (learned_optim.meta.pes)
            from .pes import PESRunner

            particle_split = (self.rank, self.world_size) if parallel == "particles" else (0, 1)
            self.pes = PESRunner(
                config,
                self.rule,
                device=self.device,
                dtype=self.dtype,
                rank=particle_split[0],
                world_size=particle_split[1],
            )

        self.instances = None
        if config.estimator.kind == "tbptt" and config.estimator.instances > 1:  # (learned_optim.meta.instances)
            if hook is not None:  # (the config's regularizers are taken per instance)
                raise ValueError(
                    "a meta-loss hook does not combine with estimator.instances > 1 under truncated BPTT (its terms "
                    "follow one trajectory)"
                )
            from .instances import TaskInstances

            self.instances = TaskInstances(config, self.rule, device=self.device, dtype=self.dtype)

        self.meta_steps = 0  # meta-gradient updates so far
        self.meta_epochs = 0  # completed trajectories
        self.trajectory: Trajectory | None = None
        self.task: Task | None = None
        self.trajectory_mode = "unroll"
        self.trajectory_length = 0
        self.data_generator = torch.Generator()
        self.best_weights: dict[str, Tensor] | None = None
        self.last_eval: dict[str, Any] | None = None
        self.recent_meta_losses: collections.deque[float] = collections.deque(maxlen=50)
        self.recent_final_losses: collections.deque[float] = collections.deque(maxlen=20)
        self.wall_time = 0.0
        self._session_start: float | None = None  # perf_counter() at the start of the train() call running now
        self.resume_log_bytes = 0  # the log's length at the checkpoint a resume starts from
        self.commands: list[str] = []
        self.finished = False
        self.finish_reason: str | None = None
        self._log_handle: TextIO | None = None

    # ------------------------------------------------------------------------------------- building
    def _build_rule(self) -> UpdateRule:
        cfg = self.config
        if cfg.init_from is not None:
            rule, parent_config = load_rule(cfg.init_from)
            if cfg.net.family is not None and cfg.net.family != rule.family:
                raise ValueError(
                    f"init_from {cfg.init_from!r} is a {rule.family!r} net but net.family is "
                    f"{cfg.net.family!r}; fine-tuning keeps the parent's architecture (drop net.family)"
                )
            parent_net = rule.config.to_dict()
            changed = {k: v for k, v in (cfg.net.config or {}).items() if k not in parent_net or parent_net[k] != v}
            if changed:  # settings the weights do not depend on (a decay, a clip) may differ from the parent's
                try:
                    rule = rule.reconfigured(**changed)
                except ValueError as err:
                    raise ValueError(
                        f"init_from keeps the parent's weights; net.config may change only settings they do not "
                        f"depend on: {err}"
                    ) from None
            extra = {"net_overrides": changed} if changed else {}
            self.parent = parent_record(parent_config, init_from=str(cfg.init_from), **extra)
            return rule
        assert cfg.net.family is not None  # the config requires net.family without init_from
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, "net"))
            return build_rule(cfg.net.family, cfg.net.config)

    @property
    def eval_family(self) -> TaskFamily:
        if self._eval_family is None:
            task: TaskSection = self.config.task
            self._eval_family = make_task_family(
                task.family, {**task.kwargs, **task.eval_kwargs}, device=self.device, dtype=self.dtype
            )
        return self._eval_family

    @property
    def stage(self) -> int:
        return self.curriculum.stage if self.curriculum is not None else 0

    def _weights(self) -> dict[str, Tensor]:
        return dict(self.rule.named_parameters())

    # ----------------------------------------------------------------------------------- trajectories
    def task_for(self, index: int) -> tuple[Task, torch.Generator]:
        if self.maml is not None:
            return self.maml.support_task_for(index)
        gen = seeded_generator(derive_seed(self.config.seed, "task", index))
        return self.family.sample(gen), gen

    @property
    def task_index(self) -> int:
        """This rank's trajectory index: data-parallel ranks split the tasks (``meta_epoch`` on a single process
        and particle-parallel)."""
        return self.meta_epochs * self.data_world_size + self.data_rank

    def _begin_trajectory(self) -> None:
        index = self.meta_epochs
        self.task, gen = self.task_for(self.task_index)
        self.trajectory = start_trajectory(self.rule, self.task, gen, device=self.device, dtype=self.dtype)
        lr_range = self.config.unroll.lr_range
        if lr_range is not None:  # this trajectory's inner lr, log-uniform in the range
            u = float(torch.rand((), generator=seeded_generator(derive_seed(self.config.seed, "lr", self.task_index))))
            self.trajectory.lr = math.exp(math.log(lr_range[0]) + u * (math.log(lr_range[1]) - math.log(lr_range[0])))
        decays = self.config.unroll.weight_decays
        if decays is not None:  # this trajectory's weight decay, one of the list
            draw = seeded_generator(derive_seed(self.config.seed, "weight_decay", self.task_index))
            self.trajectory.weight_decay = decays[int(torch.randint(len(decays), (), generator=draw))]
        self.data_generator = seeded_generator(derive_seed(self.config.seed, "data", self.task_index))
        self.trajectory_length = (
            self.curriculum.train_length if self.curriculum is not None else self.config.unroll.trajectory_length
        )
        self.trajectory.horizon = self.trajectory_length
        self.trajectory_mode = "unroll"
        if self.maml is not None:
            self.maml.begin(index, self.rule, self.task)
        if self.pes is not None:
            self.pes.begin(self.trajectory, self.task, self.task_index)
        if self.instances is not None:
            self.instances.begin(self.trajectory, self.task, self.task_index)
        if self.config.imitation.enabled:
            p = self.config.imitation.probability(self.stage)
            coin = float(torch.rand((), generator=seeded_generator(derive_seed(self.config.seed, "imitation", index))))
            if coin < p:
                self.trajectory_mode = "imitation"
        if self.hook is not None:
            self.hook.begin_trajectory(self.trajectory_length)

    def step(self) -> dict[str, Any]:
        """One meta-step: a segment of the current trajectory and one update of the net's weights."""
        cfg = self.config
        if self.trajectory is None:
            self._begin_trajectory()
        assert self.trajectory is not None and self.task is not None
        started = time.perf_counter()
        per_step = 1 if self.maml is None or self.trajectory_mode == "imitation" else self.maml.steps_per_meta_step
        n = min(per_step * cfg.unroll.segment_length, self.trajectory_length - self.trajectory.step)
        weights = self._weights()
        optimizer: torch.optim.Optimizer | None
        diverged_at: int | None
        metrics: dict[str, Any] = {
            "event": "meta_step",
            "meta_step": self.meta_steps + 1,
            "meta_epoch": self.meta_epochs,
            "stage": self.stage,
            "mode": self.trajectory_mode,
            "trajectory_step": self.trajectory.step + n,
            "trajectory_length": self.trajectory_length,
        }
        if self.trajectory.lr is not None:
            metrics["inner_lr"] = self.trajectory.lr
        if self.trajectory.weight_decay is not None:
            metrics["inner_weight_decay"] = self.trajectory.weight_decay
        if self.trajectory_mode == "imitation":
            imitation = imitation_unroll(
                self.rule,
                weights,
                self.task,
                self.trajectory,
                n,
                generator=self.data_generator,
                config=cfg.imitation,
                unroll_config=cfg.unroll,
            )
            loss, optimizer = imitation.loss, self.imitation_optimizer
            metrics["imitation_loss"] = float(loss.detach())
            train_losses, end, diverged_at = imitation.train_losses, imitation.end, None
        elif self.pes is not None:
            assert self.task is not None
            loss, pes_metrics, train_losses, end = self.pes.segment(weights, self.task, self.task_index, n)
            optimizer, diverged_at = self.meta_optimizer, None
            metrics.update(pes_metrics, objective=float(loss.detach()))
        elif self.maml is not None:
            assert self.task is not None and self.trajectory is not None
            loss, maml_metrics, train_losses, end, diverged_at = self.maml.segment(
                self.rule, weights, self.task, self.trajectory, self.data_generator, n, self.hook
            )
            optimizer = self.meta_optimizer
            metrics.update(
                maml_metrics, objective=maml_metrics["outer_loss"], meta_split_loss_last=maml_metrics["query_loss_last"]
            )
        else:
            result, objective, extra = self.segment_objective(weights, n)
            loss, optimizer = objective + extra, self.meta_optimizer
            metrics.update(
                objective=float(objective.detach()),
                extra=float(extra.detach()),
                meta_split_loss_last=float(result.losses[-1].detach()),
            )
            train_losses, end, diverged_at = result.train_losses, result.end, result.diverged_at
            if self.instances is not None:
                metrics["instances_diverged"] = sum(other.diverged for other in self.instances.others)
        if self.hook is not None and self.trajectory_mode != "imitation":  # (imitation adds no hook term)
            metrics["regularizers"] = self.hook.pop_values()
        assert optimizer is not None
        optimizer.zero_grad(set_to_none=True)
        skipped = not loss.requires_grad
        grad_norm = 0.0
        if not skipped:
            loss.backward()
        if self._synchronize:
            skipped = average_gradients(list(self.rule.parameters()), skipped, self.dtype)
        if not skipped:
            params = [p for p in self.rule.parameters() if p.grad is not None]
            clip = cfg.meta_optimizer.grad_clip
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf))
            skipped = not math.isfinite(grad_norm)
            if not skipped:
                optimizer.step()
                if not all(bool(torch.isfinite(p).all()) for p in self.rule.parameters()):
                    raise RuntimeError(
                        f"meta-step {self.meta_steps + 1} made the net's weights non-finite (meta-gradient norm "
                        f"{grad_norm:.4g}); nothing of this step was saved: resume from the last checkpoint "
                        "(--resume) with a smaller meta_optimizer.lr or a grad_clip"
                    )
        optimizer.zero_grad(set_to_none=True)
        self.meta_steps += 1
        self.trajectory = end
        meta_loss = float(loss.detach())
        if math.isfinite(meta_loss):
            self.recent_meta_losses.append(meta_loss)
        metrics.update(
            meta_loss=meta_loss,
            grad_norm=grad_norm,
            skipped=skipped,
            diverged=end.diverged,
            diverged_at=diverged_at,
            loss_first=float(train_losses[0]) if len(train_losses) else None,
            loss_last=float(train_losses[-1]) if len(train_losses) else None,
            seconds=time.perf_counter() - started,
        )
        self._log(metrics)
        if end.step >= self.trajectory_length:
            self._end_trajectory(metrics)
        return metrics

    def segment_objective(self, weights: Mapping[str, Tensor], n: int) -> tuple[UnrollResult, Tensor, Tensor]:
        """The next ``n`` steps of the current trajectory, their meta-objective and the hook's terms over them,
        without touching the net, its optimizer or ``self.trajectory`` (the segment's end is ``result.end``). With
        task instances (``estimator.instances``) the objective and the terms are the means of theirs, ``result``
        instance 0's (the trainer's trajectory), and the other instances move on to their segment's end."""
        cfg = self.config
        assert self.task is not None and self.trajectory is not None, "no trajectory in progress"
        if self.instances is not None:
            results = self.instances.segment(weights, self.task, self.trajectory, self.data_generator, n, self.hook)
        else:
            results = [
                unroll(
                    self.rule,
                    weights,
                    self.task,
                    self.trajectory,
                    n,
                    generator=self.data_generator,
                    config=cfg.unroll,
                    meta_split=cfg.objective.split,
                    hook=self.hook,
                )
            ]
        if len(results) == 1:
            return results[0], results[0].objective(cfg.objective.kind), results[0].extra
        objectives = torch.stack([r.objective(cfg.objective.kind) for r in results]).mean()
        return results[0], objectives, torch.stack([r.extra for r in results]).mean()

    def _end_trajectory(self, last: Mapping[str, Any]) -> None:
        assert self.trajectory is not None
        final = last.get("meta_split_loss_last", last.get("loss_last"))
        if self.trajectory_mode == "unroll" and final is not None:
            self.recent_final_losses.append(float(final))
        self._log(
            {
                "event": "trajectory_end",
                "meta_epoch": self.meta_epochs,
                "mode": self.trajectory_mode,
                "initial_loss": self.trajectory.initial_loss,
                "final_loss": final,
                "diverged": self.trajectory.diverged,
            }
        )
        self.meta_epochs += 1
        self.trajectory, self.task = None, None
        if self.curriculum is not None and self.curriculum.should_evaluate(self.meta_epochs):
            self._curriculum_evaluation()
        if self.meta_epochs >= self.config.meta_epochs and not self.finished:
            self.finished, self.finish_reason = True, "meta_epochs"

    # ------------------------------------------------------------------------------------ evaluation
    def evaluate(self, length: int, runs: int, *, score: str = "final") -> float:
        """Mean over ``runs`` fixed evaluation tasks of the final (or mean) meta-split loss after
        ``length`` steps of the current net (no graph; the divergence guard applies)."""
        values = self.evaluate_runs(length, runs, score=score)
        return sum(values) / len(values)

    def evaluate_runs(self, length: int, runs: int, *, score: str = "final") -> list[float]:
        """:meth:`evaluate`'s value per evaluation task (:func:`~.unroll.evaluation_scores`; ``score``: ``"final"``,
        ``"mean"`` or ``"log_final"``), on the run's fixed evaluation tasks."""
        return evaluation_scores(
            self.rule,
            self.eval_family,
            self.config.unroll,
            length,
            runs,
            seed=self.config.seed,
            meta_split=self.config.objective.split,
            score=score,
            device=self.device,
            dtype=self.dtype,
        )

    def _curriculum_evaluation(self) -> None:
        assert self.curriculum is not None
        cur = self.curriculum
        length, stage = cur.eval_length, cur.stage
        started = time.perf_counter()
        score = self.evaluate(length, cur.config.eval_runs, score=cur.config.score)
        decision = cur.report(score)
        if decision.new_best:
            self.best_weights = {k: v.detach().clone() for k, v in self.rule.state_dict().items()}
        if decision.action in ("advance", "finish") and self.best_weights is not None:
            self.rule.load_state_dict(self.best_weights)
        if decision.action == "finish":
            self.finished, self.finish_reason = True, f"curriculum_{decision.reason}"
        self.last_eval = {
            "meta_epoch": self.meta_epochs,
            "stage": stage,
            "eval_length": length,
            "score": score,
            "best_score": cur.best_score,
        }
        self._log(
            {
                "event": "eval",
                **self.last_eval,
                "new_best": decision.new_best,
                "action": decision.action,
                "reason": decision.reason,
                "next_stage": cur.stage,
                "seconds": time.perf_counter() - started,
            }
        )

    # --------------------------------------------------------------------------------------- logging
    @property
    def log_path(self) -> Path:
        return self.out_dir / ("log.jsonl" if self.data_rank == 0 else f"log.rank{self.data_rank}.jsonl")

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint" / ("" if self.data_rank == 0 else f"rank{self.data_rank}")

    @property
    def model_dir(self) -> Path:
        return self.out_dir / "model"

    def _log(self, record: Mapping[str, Any]) -> None:
        if self._log_handle is not None:
            self._log_handle.write(json.dumps(record, default=str) + "\n")
            self._log_handle.flush()

    # ------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        """Write the full trainer state (:mod:`~learned_optim.meta.checkpoint`, atomically) and drop older
        checkpoints; returns the JSON path (``None`` on a particle-parallel rank > 0, which writes nothing)."""
        if self._log_handle is not None:
            self._log_handle.flush()  # the checkpoint records the log's length
        # data-parallel: each rank keeps its last two, so that a rank killed while the others wrote a newer one still
        # shares a meta-step with them (load_checkpoint resumes every rank from the newest step they all have)
        keep = 2 if self.data_world_size > 1 else 1
        state = trainer_state_to_tensors(self)  # (particle-parallel: collective, so every rank builds it)
        if not self.writes_files:
            return None
        return write_checkpoint(self.checkpoint_dir, self.meta_steps, *state, keep=keep)

    def generators(self) -> dict[str, torch.Generator]:
        """The run's own random generators, by checkpoint name (besides the global ones)."""
        generators = {"data": self.data_generator}
        if self.instances is not None:
            generators.update(self.instances.named_generators())
        if self.regularizer_hook is not None and self.regularizer_hook.generator is not None:
            generators["regularizers"] = self.regularizer_hook.generator
        return generators

    def load_checkpoint(self, path: str | os.PathLike | None = None) -> bool:
        """Restore the trainer from ``path`` (a ``state-*.json``) or the latest checkpoint; False if none. With
        several ranks (a process group), every rank resumes from the newest meta-step all of them have a checkpoint
        of, and one that has checkpoints none of the others share is an error."""
        if path is not None:
            json_path: Path | None = Path(path)
        elif self._synchronize:
            json_path = self._common_checkpoint()
        else:
            json_path = latest_checkpoint(self.checkpoint_dir)
        if json_path is None:
            return False
        trainer_state_from_tensors(self, *read_checkpoint(json_path, self.config.to_dict()))
        return True

    def _common_checkpoint(self) -> Path | None:
        """This rank's checkpoint at the newest meta-step every rank has one of (``None`` if no rank has any)."""
        import torch.distributed as dist

        mine = complete_checkpoints(self.checkpoint_dir)
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, sorted(mine))
        common = set.intersection(*(set(steps) for steps in every))
        if common:
            return mine[max(common)]
        if any(every):
            raise ValueError(
                f"cannot resume: the ranks' checkpoints share no meta-step ({dict(enumerate(every))}); a kill while "
                "they were written? Remove the run's checkpoint folder to start again"
            )
        return None

    # ------------------------------------------------------------------------------------ main loop
    def elapsed(self) -> float:
        """Seconds of training so far: earlier sessions' (``wall_time``) and the running one's."""
        running = 0.0 if self._session_start is None else time.perf_counter() - self._session_start
        return self.wall_time + running

    def train(self, *, resume: bool = False, stop_after: int | None = None) -> Path | None:
        """Run (or with ``resume=True`` continue) meta-training; returns the zoo folder ``out_dir/model``.

        ``stop_after`` ends the session after that many meta-steps *without* finishing, as an
        interruption would (returns ``None``); a later ``train(resume=True)`` continues.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        resumed = False
        if resume:
            resumed = self.load_checkpoint()
        elif latest_checkpoint(self.checkpoint_dir) is not None:
            raise FileExistsError(
                f"{self.out_dir} already holds a run's checkpoints; pass resume=True (--resume) "
                "to continue it or choose another out_dir (--out)"
            )
        if resumed and self.finished and (self.model_dir / "config.json").exists():
            warnings.warn(
                f"{self.out_dir} holds a run that finished ({self.finish_reason}) after {self.meta_steps} meta-steps; "
                f"its net is {self.model_dir}. Nothing was trained or written",
                stacklevel=2,
            )
            return self.model_dir
        if not resumed and (self.model_dir / "config.json").exists():
            raise FileExistsError(
                f"{self.model_dir} holds a finished run's net and {self.checkpoint_dir} no checkpoint to resume "
                "from: choose another out_dir (--out), or remove the folder to train it again"
            )
        if not self.writes_files:  # particle-parallel rank > 0: rank 0 logs the run
            pass
        elif resumed and self.log_path.exists() and self.log_path.stat().st_size > self.resume_log_bytes:
            with open(self.log_path, "ab") as handle:  # drop the records written after the checkpoint
                handle.truncate(self.resume_log_bytes)
        elif not resumed and self.log_path.exists():  # a run stopped before its first checkpoint: its log is kept
            kept = self.log_path.with_name(f"{self.log_path.stem}-before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            self.log_path.rename(kept)
            if resume:
                warnings.warn(
                    f"no complete checkpoint in {self.checkpoint_dir} to resume from: training from the start (the "
                    f"earlier log is kept as {kept})",
                    stacklevel=2,
                )
        self._log_handle = open(self.log_path, "a") if self.writes_files else None
        threads = torch.get_num_threads()
        if self.config.num_threads is not None:
            torch.set_num_threads(self.config.num_threads)
        self._session_start = time.perf_counter()
        self.commands.append(self.command)
        if self.rank == 0:
            (self.out_dir / "config.json").write_text(self.config.to_json() + "\n")
        self._log(
            {
                "event": "resume" if resumed else "start",
                "meta_step": self.meta_steps,
                "rank": self.rank,
                "world_size": self.world_size,
                "meta_epoch": self.meta_epochs,
                "command": self.command,
                "device": str(self.device),
                "meta_optimizer": self.meta_optimizer_name,
                "meta_lr": self.meta_lr,
                "config": self.config.to_dict(),
            }
        )
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.config.meta_epochs,
            initial=self.meta_epochs,
            unit="traj",
            desc=self.config.name,
            disable=not self.progress or self.rank != 0,
            dynamic_ncols=True,
        )
        session_steps = 0
        try:
            while not self.finished:
                if stop_after is not None and session_steps >= stop_after:
                    return None
                epochs_before = self.meta_epochs
                metrics = self.step()
                session_steps += 1
                bar.update(self.meta_epochs - epochs_before)
                last = metrics["loss_last"]
                bar.set_postfix(
                    stage=self.stage,
                    meta_loss=f"{metrics['meta_loss']:.4g}",
                    loss="-" if last is None else f"{last:.4g}",
                    refresh=False,
                )
                if self.meta_steps % self.config.checkpoint_every == 0 and not self.finished:
                    self.save_checkpoint()
            if self.best_weights is not None:
                self.rule.load_state_dict(self.best_weights)  # ship the best evaluated net
            self._log(
                {
                    "event": "finish",
                    "reason": self.finish_reason,
                    "meta_steps": self.meta_steps,
                    "meta_epochs": self.meta_epochs,
                    "wall_time": self.elapsed(),
                }
            )
            self.save_checkpoint()
            return self.save_model() if self.rank == 0 else self.model_dir
        finally:
            torch.set_num_threads(threads)
            bar.close()
            self.wall_time = self.elapsed()
            self._session_start = None
            if self._log_handle is not None:
                self._log_handle.close()
            self._log_handle = None

    # ------------------------------------------------------------------------------------ the result
    def final_metrics(self) -> dict[str, Any]:
        """Summary of the meta-training run recorded in the zoo folder (:func:`~.card.run_metrics`)."""
        return run_metrics(self)

    def save_model(self, directory: str | os.PathLike | None = None) -> Path:
        """Write the net as a zoo folder (``hub.save_pretrained``) with a model card of the run."""
        return save_run_model(self, Path(directory) if directory is not None else self.model_dir)
