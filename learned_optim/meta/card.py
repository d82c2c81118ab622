"""The model card of a meta-training run (its sections; :func:`learned_optim.hub.model_card` lays them out)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..hub import model_card
from ..nets.base import UpdateRule
from .config import MetaTrainConfig
from .regularizers import parse_blocks

__all__ = ["meta_training_card"]


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
