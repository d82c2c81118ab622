r"""Weight averaging of fine-tunes of one net (a uniform model soup, Wortsman et al. 2022).

Fine-tunes of one parent checkpoint that differ only in their meta-seed (or in a regularizer) stay close to the
parent in weight space; their uniform average

.. math:: \phi_{\mathrm{soup}} = \frac{1}{n} \sum_{i=1}^{n} \phi_i

is one net of the same architecture whose behaviour is meant to be less tied to any one meta-seed's draw of tasks.
Given the parent :math:`\phi_0` and a scale :math:`\lambda`, the soup moves along the mean fine-tuning displacement
instead (interpolation toward the parent for :math:`\lambda < 1`, as WiSE-FT, Wortsman et al. 2022; extrapolation
past the mean for :math:`\lambda > 1`, as task arithmetic, Ilharco et al. 2023):

.. math:: \phi_{\lambda} = \phi_0 + \lambda \Big(\frac{1}{n} \sum_{i=1}^{n} \phi_i - \phi_0\Big)

Only checkpoints of the same family and net configuration, fine-tuned from the same parent, are averaged;
anything else is refused with a clear error. Settings of the net that its weights do not depend on (a decay, a
clip) can be changed in the soup (``net_overrides``): the weights stay the average, and the change is recorded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
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
    parent: str | os.PathLike | None = None,
    scale: float = 1.0,
    net_overrides: Mapping[str, Any] | None = None,
) -> Path:
    r"""Write the uniform weight average of the checkpoint folders ``sources`` as a checkpoint folder ``out``.

    Args:
        sources: two or more checkpoint folders of one family and net configuration, fine-tuned from one parent
            (config.json's ``training.parent.name``).
        out: the folder to write (config.json, model.safetensors, README.md).
        name, description: the soup's zoo name and description (default: the first source's name + ``-soup``).
        schedule: the recommended lr schedule (default: the one the sources agree on).
        command: the command that made the soup, recorded in its card and config.
        parent: the folder of the sources' common parent checkpoint :math:`\phi_0` (its name must be the one the
            sources record, its family and net theirs); needed for a ``scale`` other than 1.
        scale: :math:`\lambda`, the soup :math:`\phi_0 + \lambda (\bar\phi - \phi_0)`; 1 is the plain average.
        net_overrides: net configuration fields to change in the soup, e.g. ``{"second_moment_decay": 0.95}``: only
            fields that leave every weight's shape as it is (the averaged weights are loaded strictly).

    The sources' optimizer defaults (``lr``) must agree; the soup records every ingredient (folder, name,
    weights' SHA-256), the common parent under ``training`` and, for a scaled soup, the scale and the parent
    folder's weights.
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
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"a soup's scale must be a finite number above 0, got {scale}")
    if scale != 1.0 and parent is None:
        raise ValueError(f"a soup scaled by {scale} moves from its parent: give the parent's folder (parent=...)")
    origin = None
    if parent is not None:
        origin, origin_config = load_rule_from_dir(parent)
        if Path(parent).resolve() in resolved:
            raise ValueError(f"the parent {parent} is also one of the soup's ingredients")
        found = (origin_config.get("name"), origin_config["family"], origin_config.get("net"))
        if found != (parent_name, family, configs[0].get("net")):
            raise CheckpointError(
                f"{parent} is not the ingredients' parent: it is {found[0]!r} ({found[1]}), they were fine-tuned "
                f"from {parent_name!r} ({family}), or its net configuration differs"
            )

    soup = rules[0]
    states = [r.state_dict() for r in rules]
    with torch.no_grad():
        averaged = {k: torch.stack([s[k].double() for s in states]).mean(0) for k in states[0]}
        if origin is not None:
            start = {k: v.double() for k, v in origin.state_dict().items()}
            averaged = {k: start[k] + scale * (v - start[k]) for k, v in averaged.items()}
    soup.load_state_dict({k: v.to(states[0][k].dtype) for k, v in averaged.items()}, strict=True)
    overrides = dict(net_overrides or {})
    if overrides:
        soup = soup.reconfigured(**overrides)
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
    recipe: dict[str, Any] = {"ingredients": ingredients, "command": command}
    if parent is not None:
        recipe |= {"scale": scale, "parent_folder": str(parent), "parent_weights_sha256": weights_sha256(parent)}
    if overrides:
        recipe["net_overrides"] = overrides
    training = {"soup": recipe, "parent": parents[0]}
    name = name or f"{configs[0].get('name') or family}-soup"
    average = f"uniform weight average of {len(paths)} fine-tunes of {parent_name}"
    description = description or (
        (f"{parent_name} plus {scale:g} x its displacement to the " if parent is not None else "The ")
        + f"{average}: "
        + ", ".join(str(i["name"]) for i in ingredients)
        + ("; net settings changed: " + ", ".join(f"{k} {v!r}" for k, v in overrides.items()) if overrides else "")
        + "."
    )
    config = {"name": name, "family": family, "net": soup.config.to_dict(), "training": training}
    what = f"The uniform average of the weights of {len(paths)} fine-tunes of `{parent_name}`"
    if parent is not None:
        what = (
            f"The parent `{parent_name}` (`{parent}`, weights SHA-256 {recipe['parent_weights_sha256']}) plus "
            f"{scale:g} times the mean displacement of {len(paths)} fine-tunes of it"
        )
    sections = [
        "## Weight soup",
        "",
        f"{what} (`learned_optim.meta.soup`):",
        "",
        "| ingredient | folder | weights SHA-256 | its meta-training command | wall time |",
        "|---|---|---|---|---|",
        *(
            f"| {i['name']} | `{i['folder']}` | {i['weights_sha256']} | `{i['command'] or 'not recorded'}` | "
            f"{_minutes(i['wall_time_seconds'])} |"
            for i in ingredients
        ),
    ]
    if overrides:
        net = configs[0].get("net") or {}
        changes = ", ".join(f"`{k}` {net.get(k, 'unset')!r} -> {v!r}" for k, v in overrides.items())
        sections += ["", f"Net settings changed from the ingredients' (the weights are the average): {changes}."]
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
