"""The model card of a meta-training run (its sections; :func:`learned_optim.hub.model_card` lays them out)."""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..hub import model_card, save_pretrained
from ..nets.base import UpdateRule
from .config import MetaTrainConfig, UnrollConfig
from .regularizers import parse_blocks

if TYPE_CHECKING:
    from .trainer import MetaTrainer

__all__ = ["meta_training_card", "run_metrics", "save_run_model"]


def _inner_loop(unroll: UnrollConfig) -> str:
    """The inner loop's lr, schedule and weight decay as a card line."""
    if unroll.lr_range is not None:
        lr = f"lr drawn log-uniformly in [{unroll.lr_range[0]:g}, {unroll.lr_range[1]:g}] per trajectory"
    else:
        lr = f"lr {unroll.lr:g}" if unroll.lr is not None else "the net's default lr"
    if unroll.weight_decays is not None:
        decay = f"weight decay drawn from {', '.join(f'{d:g}' for d in unroll.weight_decays)} per trajectory"
    else:
        decay = f"weight decay {unroll.weight_decay:g}"
    return f"{lr}, `{unroll.schedule}` schedule, {decay} (decoupled, as AdamW's)"


def meta_training_card(cfg: MetaTrainConfig, training: Mapping[str, Any], rule: UpdateRule) -> str:
    """The model card of a meta-training run: its description, the command, wall time and hardware, the
    meta-optimizer and objective, the parent and regularizers if any, the final metrics and the config, from
    ``training`` (the record :meth:`MetaTrainer.save_model` writes into config.json)."""
    meta = training["meta_training"]
    metrics = meta["metrics"]
    lines: list[str] = []
    if cfg.description:
        lines += [cfg.description, ""]
    seconds = float(meta["wall_time_seconds"])
    hours, rest = divmod(int(seconds), 3600)
    wall = f"{seconds:.1f} s" if seconds < 60 else f"{hours}h{rest // 60:02d}m{rest % 60:02d}s"
    lines += [
        "## Meta-training",
        "",
        f"Meta-trained on the `{cfg.task.family}` task family with `learned_optim.meta` "
        f"({metrics['meta_steps']} meta-steps, {metrics['meta_epochs']} trajectories; "
        f"finished: {metrics['finish_reason']}).",
        "",
        "Command (from the repository root):",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        f"- Wall time: {wall} on {meta['hardware']['device']} "
        f"({meta['hardware']['cpu_count']} CPU cores visible, {meta['hardware']['torch_threads']} torch threads)",
    ]
    if cfg.expected_time:
        lines.append(f"- Expected time of this recipe: {cfg.expected_time}")
    if meta["resumed_with"]:
        lines.append(f"- Interrupted and resumed {len(meta['resumed_with'])} time(s)")
    lines += [
        f"- Meta-optimizer: {meta['meta_optimizer']['name']}, lr {meta['meta_optimizer']['lr']:g}"
        + (f", gradient clipping {cfg.meta_optimizer.grad_clip:g}" if cfg.meta_optimizer.grad_clip else ""),
        f"- Objective: `{cfg.objective.kind}` on `{cfg.objective.split}` losses; segments of "
        f"{cfg.unroll.segment_length} steps",
        f"- Inner loop: {_inner_loop(cfg.unroll)}",
        "",
    ]
    if training.get("parent"):
        parent = training["parent"]
        lines += [
            "## Parent",
            "",
            f"Fine-tuned from `{parent['init_from']}` "
            f"(zoo name: {parent.get('name')!s}, family `{parent.get('family')}`), keeping its architecture.",
            "",
        ]
    if cfg.regularizers:
        lines += [
            "## Flatness regularizers",
            "",
            "Meta-loss terms added during meta-training only (`learned_optim.meta.regularizers`); at "
            "meta-test time the optimizer costs the same per step as an unregularized one. Smoothing of "
            f"the net: {'on' if any(b.get('kind') == 'smoothing' for b in cfg.regularizers) else 'off'}.",
            "",
            "| kind | weight | where | settings |",
            "|---|---|---|---|",
        ]
        for block in parse_blocks(cfg.regularizers):
            fields = block.to_dict()
            settings = {k: v for k, v in fields.items() if k not in ("kind", "weight", "where", "name")}
            lines.append(
                f"| {fields['kind']} | {fields['weight']:g} | {fields['where']} | "
                f"{', '.join(f'{k}={v}' for k, v in settings.items())} |"
            )
        lines.append("")
    lines += ["## Final meta-training metrics", "", "| metric | value |", "|---|---|"]
    for key, value in meta["metrics"].items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        elif isinstance(value, Mapping):
            value = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
        lines.append(f"| {key} | {value} |")
    lines += [
        "",
        "## Evaluation",
        "",
        "No meta-test results recorded yet.",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(cfg.to_dict(), indent=2),
        "```",
    ]
    return model_card({"name": cfg.name, "family": rule.family, "net": rule.config.to_dict()}, lines)


def run_metrics(trainer: MetaTrainer) -> dict[str, Any]:
    """Summary of a meta-training run recorded in its zoo folder: counters, finish reason, recent meta-losses and
    final losses, the curriculum's stage and best score, the last evaluation."""

    def mean(values) -> float | None:
        values = list(values)
        return sum(values) / len(values) if values else None

    out: dict[str, Any] = {
        "meta_steps": trainer.meta_steps,
        "meta_epochs": trainer.meta_epochs,
        "finish_reason": trainer.finish_reason,
        f"mean_meta_loss_last_{len(trainer.recent_meta_losses)}_steps": mean(trainer.recent_meta_losses),
        f"mean_final_{trainer.config.objective.split}_loss_last_{len(trainer.recent_final_losses)}_trajectories": mean(
            trainer.recent_final_losses
        ),
    }
    if trainer.curriculum is not None:
        out.update(
            curriculum_stage=trainer.curriculum.stage,
            curriculum_stage_length=trainer.curriculum.train_length,
            curriculum_best_score=None if math.isinf(trainer.curriculum.best_score) else trainer.curriculum.best_score,
        )
    if trainer.last_eval is not None:
        out["last_eval"] = trainer.last_eval
    return out


def save_run_model(trainer: MetaTrainer, directory: Path) -> Path:
    """Write a run's net as a zoo folder (``hub.save_pretrained``) with its training record in config.json and
    :func:`meta_training_card` as README."""
    cfg = trainer.config
    metrics = run_metrics(trainer)
    wall = trainer.elapsed()
    training = {
        "tasks": {"family": cfg.task.family, "kwargs": cfg.task.kwargs},
        "meta_training": {
            "command": trainer.commands[0] if trainer.commands else trainer.command,
            "resumed_with": trainer.commands[1:],
            "wall_time_seconds": round(wall, 1),
            "expected_time": cfg.expected_time,
            "hardware": {
                "device": str(trainer.device),
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "platform": platform.platform(),
                "torch": torch.__version__,
            },
            "meta_optimizer": {"name": trainer.meta_optimizer_name, "lr": trainer.meta_lr},
            "metrics": metrics,
            "config": cfg.to_dict(),
        },
        "parent": trainer.parent,
    }
    return save_pretrained(
        trainer.rule,
        directory,
        name=cfg.name,
        description=cfg.description,
        training=training,
        # the lr the net was meta-trained with (unroll.lr; else the family's default: 1.0 for step multipliers)
        optimizer_defaults={"lr": cfg.unroll.lr if cfg.unroll.lr is not None else trainer.rule.default_lr},
        card=meta_training_card(cfg, training, trainer.rule),
        schedule=cfg.schedule,
    )
