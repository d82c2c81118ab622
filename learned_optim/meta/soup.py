r"""Weight averaging of fine-tunes of one net (a uniform model soup, Wortsman et al. 2022).

Fine-tunes of one parent checkpoint that differ only in their meta-seed (or in a regularizer) stay close to the
parent in weight space; their uniform average

.. math:: \phi_{\mathrm{soup}} = \frac{1}{n} \sum_{i=1}^{n} \phi_i

is one net of the same architecture whose behaviour is meant to be less tied to any one meta-seed's draw of tasks.
Only checkpoints of the same family and net configuration, fine-tuned from the same parent, are averaged;
anything else is refused with a clear error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..hub import (
    CheckpointError,
    load_rule_from_dir,
    model_card,
    records_meta_training,
    save_pretrained,
    weights_sha256,
)

__all__ = ["weight_soup"]


def _minutes(seconds: float | None) -> str:
    return "not recorded" if seconds is None else f"{seconds / 60:.1f} min"


def _one(values: list[Any], what: str, sources: Sequence[Path]) -> Any:
    """The single value every source agrees on (``None`` entries ignored), else a :class:`CheckpointError`."""
    distinct = {repr(v): v for v in values if v is not None}
    if len(distinct) > 1:
        listing = ", ".join(f"{s}: {v!r}" for s, v in zip(sources, values, strict=True))
        raise CheckpointError(f"soup ingredients disagree on {what} ({listing})")
    return next(iter(distinct.values()), None)


def weight_soup(
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    name: str | None = None,
    description: str | None = None,
    schedule: str | None = None,
    command: str | None = None,
) -> Path:
    """Write the uniform weight average of the checkpoint folders ``sources`` as a checkpoint folder ``out``.

    Args:
        sources: two or more checkpoint folders of one family and net configuration, fine-tuned from one parent
            (config.json's ``training.parent.name``).
        out: the folder to write (config.json, model.safetensors, README.md).
        name, description: the soup's zoo name and description (default: the first source's name + ``-soup``).
        schedule: the recommended lr schedule (default: the one the sources agree on).
        command: the command that made the soup, recorded in its card and config.

    The sources' optimizer defaults (``lr``) must agree; the soup records every ingredient (folder, name,
    weights' SHA-256) and the common parent under ``training``.
    """
    paths = [Path(s) for s in sources]
    if len(paths) < 2:
        raise ValueError(f"a soup needs two or more checkpoints, got {len(paths)}")
    resolved = [p.resolve() for p in paths]
    repeated = sorted({str(p) for p, r in zip(paths, resolved, strict=True) if resolved.count(r) > 1})
    if repeated:
        raise ValueError(f"a soup's ingredients must be distinct folders; given more than once: {repeated}")
    if Path(out).resolve() in resolved:
        raise ValueError(f"the soup's out folder {out} is one of its ingredients: it would be overwritten")
    loaded = [load_rule_from_dir(p) for p in paths]
    rules, configs = [r for r, _ in loaded], [c for _, c in loaded]
    family = _one([c["family"] for c in configs], "the family", paths)
    _one([c.get("net") for c in configs], "the net configuration", paths)
    parents = [(c.get("training") or {}).get("parent") or {} for c in configs]
    parent_name = _one([p.get("name") for p in parents], "the parent checkpoint", paths)
    if parent_name is None or any(p.get("name") is None for p in parents):
        raise CheckpointError(
            f"soup ingredients must be fine-tunes of one parent checkpoint (training.parent.name); "
            f"parents found: {[p.get('name') for p in parents]}"
        )
    defaults = _one([c.get("optimizer") or {} for c in configs], "the optimizer defaults", paths)
    schedule = schedule or _one([c.get("schedule") for c in configs], "the lr schedule", paths)

    soup = rules[0]
    states = [r.state_dict() for r in rules]
    with torch.no_grad():
        averaged = {k: torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) for k, v in states[0].items()}
    soup.load_state_dict(averaged, strict=True)
    ingredients: list[dict[str, Any]] = []
    for path, c in zip(paths, configs, strict=True):
        meta = (c.get("training") or {}).get("meta_training") or {}
        ingredients.append(
            {
                "folder": str(path),
                "name": c.get("name"),
                "weights_sha256": weights_sha256(path),
                "meta_trained": records_meta_training(c),
                "command": meta.get("command"),
                "wall_time_seconds": meta.get("wall_time_seconds"),
            }
        )
    training = {"soup": {"ingredients": ingredients, "command": command}, "parent": parents[0]}
    name = name or f"{configs[0].get('name') or family}-soup"
    description = description or (
        f"Uniform weight average of {len(paths)} fine-tunes of {parent_name}: "
        + ", ".join(str(i["name"]) for i in ingredients)
        + "."
    )
    config = {"name": name, "family": family, "net": soup.config.to_dict(), "training": training}
    sections = [
        "## Weight soup",
        "",
        f"The uniform average of the weights of {len(paths)} fine-tunes of `{parent_name}` "
        "(`learned_optim.meta.soup`):",
        "",
        "| ingredient | folder | weights SHA-256 | its meta-training command | wall time |",
        "|---|---|---|---|---|",
        *(
            f"| {i['name']} | `{i['folder']}` | {i['weights_sha256']} | `{i['command'] or 'not recorded'}` | "
            f"{_minutes(i['wall_time_seconds'])} |"
            for i in ingredients
        ),
    ]
    times = [i["wall_time_seconds"] for i in ingredients]
    if all(isinstance(t, (int, float)) for t in times):
        sections += [
            "",
            f"Meta-training of the ingredients: {_minutes(sum(times))} in all (each card has its machine).",
        ]
    if command:
        sections += ["", "Command (from the repository root):", "", "```bash", command, "```"]
    return save_pretrained(
        soup,
        out,
        name=name,
        description=description,
        training=training,
        optimizer_defaults=defaults,
        card=model_card(config, sections),
        schedule=schedule,
    )
