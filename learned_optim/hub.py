"""Checkpoints laid out as Hugging Face Hub repos, the zoo catalog, and Hub download/upload.

A checkpoint is a folder with exactly the files of its Hub repo:

* ``config.json``: ``{"library": "learned_optim", "format_version": 1, "family": ..., "net": {...},
  "optimizer": {...defaults such as lr...}, "training": {...summary...}}``;
* ``model.safetensors``: the net's weights and nothing else;
* ``README.md``: the model card (what it was meta-trained on, the command, measured results).

Loading is strict (every tensor present with its exact shape, no extra ones, known family and
format version) and never unpickles anything: weights are read with ``safetensors`` only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .nets.base import FAMILIES, UpdateRule, build_rule
from .schedules import SCHEDULES

if TYPE_CHECKING:
    from .optimizer import LearnedOptimizer

__all__ = [
    "CheckpointError",
    "HubUploadError",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "CARD_NAME",
    "FORMAT_VERSION",
    "SCHEDULES",
    "records_meta_training",
    "weights_sha256",
    "save_pretrained",
    "load_rule",
    "resolve_checkpoint",
    "list_pretrained",
    "from_pretrained",
    "push_to_hub",
    "zoo_dir",
    "record_evaluation",
    "reconfigure_checkpoint",
    "parent_record",
    "model_card",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
#: Card sections that :func:`reconfigure_checkpoint` rewrites (the net's configuration) and adds.
NET_CONFIGURATION_HEADING = "## Net configuration"
RECONFIGURED_HEADING = "## Settings changed after training"
LIBRARY_NAME = "learned_optim"
#: Highest checkpoint format this version reads and the one it writes.
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint folder is missing, malformed, foreign, or does not match its net."""


class HubUploadError(RuntimeError):
    """:func:`push_to_hub` could not create the Hub repo or upload the checkpoint (network down, offline mode,
    authentication, a server error); the cause is chained."""


# ---------------------------------------------------------------------------------------------- saving
def model_card(config: Mapping[str, Any], sections: Sequence[str] = ()) -> str:
    """A checkpoint's model card (README.md), the one writer of cards.

    Front matter, title, the research warning (``research``) and the ``description``, usage and the net's
    configuration from ``config`` (a config.json's content: ``name``, ``family``, ``net``), then ``sections``
    (markdown lines of the caller's own sections, e.g. the meta-trainer's), then the adaptation records and the
    training record of ``config["training"]``.
    :func:`record_evaluation` later adds or replaces "## Evaluation: ..." sections.
    """
    training = config.get("training") or {}
    lines = [
        "---",
        f"library_name: {LIBRARY_NAME}",
        "tags: [learned-optimizer, l2o, pytorch]",
        "---",
        "",
        f"# {config.get('name') or config['family']} (learned_optim)",
        "",
        *(
            [f"> **Research reproduction, not a general-purpose optimizer.** {config['research']}", ""]
            if config.get("research")
            else []
        ),
        f"A `{config['family']}` learned optimizer for PyTorch."
        + (f" {config['description']}" if config.get("description") else ""),
        "",
        "```python",
        "import learned_optim",
        'opt = learned_optim.from_pretrained("<this folder or repo id>", model.parameters())',
        "```",
        "",
        NET_CONFIGURATION_HEADING,
        "",
        "```json",
        json.dumps(config["net"], indent=2),
        "```",
    ]
    if sections:
        lines += ["", *sections]
    lines += _adaptation_lines(training)
    if training:
        lines += ["", "## Training", "", "```json", json.dumps(training, indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"


def _lineage(training: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """A checkpoint's ``training`` record, then its parent's, its parent's parent's... (each under
    ``training.parent``), each with where its own parent's record is in config.json."""
    record, where = training, "training.parent"
    while record:
        yield where, record
        record, where = (record.get("parent") or {}).get("training") or {}, where + ".training.parent"


def _adaptation_lines(training: Mapping[str, Any]) -> list[str]:
    """The card's "## Adaptation" section: each generation of :func:`learned_optim.adapt` runs the net went through,
    newest first, read from ``training.adaptation`` and the parents' records under ``training.parent`` (a net
    loaded from an adapted checkpoint and saved again keeps its parent's adaptations in its card)."""
    generations = [  # (where its parent's record is, the checkpoint adapted from, its adaptations), from this net back
        (where, record.get("parent") or {}, record["adaptation"])
        for where, record in _lineage(training)
        if record.get("adaptation")
    ]
    if not generations:
        return []
    lines = ["", "## Adaptation", ""]
    if not training.get("adaptation"):
        parent = training.get("parent") or {}
        lines += [f"Saved again from `{parent.get('name') or parent.get('source')}` without further adaptation.", ""]
    for where, parent, records in generations:
        if parent:
            lines += [
                f"Adapted from `{parent.get('name') or parent.get('source')}` (loaded from "
                f"`{parent.get('source')}`{', revision ' + str(parent['revision']) if parent.get('revision') else ''})"
                f" with `learned_optim.adapt`; the parent's training and results are under `{where}` in "
                "config.json and do not describe this net.",
                "",
            ]
        for i, r in enumerate(records, 1):
            what = f"{r.get('model')} ({r.get('num_parameters')} parameters), loss `{r.get('loss_fn')}`"
            if r.get("description"):
                what += f", data: {r['description']}"
            lines.append(
                f"{i}. {r.get('date')}: {what}; {r.get('steps')} Adam steps (lr {r.get('lr')}) on unrolls of "
                f"{r.get('unroll')} optimizer steps (optimizer lr {r.get('optimizer_lr')}), "
                f"{r.get('batches_seen')} batches like {json.dumps(r.get('example_batch'))}; meta-loss "
                f"{r.get('meta_loss_first')} -> {r.get('meta_loss_last')}."
            )
        lines.append("")
    return lines[:-1]


def parent_record(config: Mapping[str, Any], **where: Any) -> dict[str, Any]:
    """What a checkpoint derived from another records of it (``training.parent``): ``where`` it was loaded
    from (e.g. ``source=``/``revision=`` or ``init_from=``), then its name, family, net and training."""
    return {
        **where,
        "name": config.get("name"),
        "family": config.get("family"),
        "net": config.get("net"),
        "training": config.get("training"),
    }


def save_pretrained(
    rule: UpdateRule,
    save_directory: str | os.PathLike,
    *,
    name: str | None = None,
    description: str | None = None,
    training: Mapping[str, Any] | None = None,
    optimizer_defaults: Mapping[str, Any] | None = None,
    card: str | None = None,
    schedule: str | None = None,
) -> Path:
    """Write ``rule`` as a checkpoint folder (config.json, model.safetensors, README.md).

    Args:
        rule: the update rule to save.
        save_directory: folder to write (created if needed; files in it are overwritten).
        name, description: zoo name and one-line description recorded in config.json.
        training: JSON-serialisable summary of how the net was trained (and measured results).
        optimizer_defaults: recommended :class:`~learned_optim.LearnedOptimizer` keyword defaults
            (e.g. ``{"lr": 1.0}``), applied by :func:`from_pretrained` unless overridden.
        card: model card text; a card generated from the config is written when omitted.
        schedule: the lr schedule the checkpoint recommends with its default lr (one of :data:`SCHEDULES`:
            ``"cosine"``, warm-up then cosine decay, or ``"constant"``), recorded as config.json's top-level
            ``"schedule"`` (what ``bench --lr-rule default`` and the demo follow; ``"constant"`` when absent).

    A net loaded by :func:`from_pretrained` remembers its checkpoint, and :func:`learned_optim.adapt`
    records every adaptation on the net. Saving such a net fills what is not passed: ``training.parent``
    (the checkpoint it was loaded from: source, revision, name, family, net, training), ``training.adaptation``
    (one record per adaptation: model, loss, batches, steps, meta-losses, the optimizer lr it ran at and the one
    set),
    ``name`` (the parent's, with ``-adapted`` once adapted), ``description``, ``schedule`` and ``optimizer_defaults``
    (the parent's, with ``lr`` set to the one the last adaptation's optimizer was given: an LR scheduler's
    ``initial_lr``, not its lr of the moment), and the parent's ``research`` note. The generated card then has an
    "## Adaptation" section.
    """
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES} or None, got {schedule!r}")
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    name, description, training, optimizer_defaults, schedule, research = _inherited(
        rule, name, description, training, optimizer_defaults, schedule
    )
    config: dict[str, Any] = {
        "library": LIBRARY_NAME,
        "format_version": FORMAT_VERSION,
        "name": name,
        "description": description,
        "family": rule.family,
        "net": rule.config.to_dict(),
        "optimizer": dict(optimizer_defaults or {}),
        "training": dict(training or {}),
    }
    if schedule is not None:
        config["schedule"] = schedule
    if research:
        config["research"] = research
    weights = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in rule.state_dict().items()}
    # one metadata entry: safetensors keeps the metadata in a hash map whose order varies from save to save, and
    # the file's bytes (which identify a checkpoint's runs in the benchmark store) must depend on the weights only
    save_file(weights, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    _write_config(directory, config)
    (directory / CARD_NAME).write_text(card if card is not None else model_card(config))
    return directory


def _inherited(
    rule: UpdateRule,
    name: str | None,
    description: str | None,
    training: Mapping[str, Any] | None,
    optimizer_defaults: Mapping[str, Any] | None,
    schedule: str | None,
) -> tuple[Any, ...]:
    """``save_pretrained``'s arguments completed from the net's parent checkpoint and adaptations, and the parent's
    research note (a net derived from a research reproduction is one too)."""
    origin: Mapping[str, Any] = rule.provenance.origin or {}
    adaptations = list(rule.provenance.adaptations)
    training = dict(training or {})
    if adaptations:
        training.setdefault("adaptation", adaptations)
    if not origin:
        return name, description, training, optimizer_defaults, schedule, None
    if schedule is None:
        schedule = origin.get("schedule")
    parent = origin["parent"]
    training.setdefault("parent", parent)
    if name is None and parent.get("name"):
        name = parent["name"] + ("-adapted" if adaptations else "")
    if description is None and adaptations:
        last = adaptations[-1]
        description = (
            f"{parent.get('name') or parent.get('source')} adapted with learned_optim.adapt on "
            f"{last.get('model')} / {last.get('loss_fn')}"
            + (f" ({last['description']})" if last.get("description") else "")
        )
    elif description is None:
        description = origin.get("description")
    if optimizer_defaults is None:
        optimizer_defaults = dict(origin.get("optimizer") or {})
        last = adaptations[-1] if adaptations else {}
        lr = last.get("optimizer_base_lr", last.get("optimizer_lr"))  # the user's lr, not the schedule's at adapt time
        if isinstance(lr, (int, float)):
            optimizer_defaults["lr"] = lr
    return name, description, training, optimizer_defaults, schedule, origin.get("research")


# ---------------------------------------------------------------------------------------------- loading
#: The optimizer defaults a checkpoint's config.json may record (``"optimizer"``), and their JSON types.
OPTIMIZER_DEFAULTS: dict[str, tuple[type, ...]] = {
    "lr": (int, float),
    "weight_decay": (int, float),
    "maximize": (bool,),
    "chunk_size": (int, str, type(None)),
    "nonfinite": (str,),
}


def check_optimizer_defaults(defaults: Mapping[str, Any], where: object) -> None:
    """Raise :class:`CheckpointError` (``where``: the file or folder named) unless every key of ``defaults`` is one a
    checkpoint may set (:data:`OPTIMIZER_DEFAULTS`) with a value of its type."""
    unknown = sorted(set(defaults) - set(OPTIMIZER_DEFAULTS))
    if unknown:
        raise CheckpointError(
            f"{where}: unknown optimizer defaults {unknown}; a checkpoint may set {sorted(OPTIMIZER_DEFAULTS)}"
        )
    for key, value in defaults.items():
        kinds = OPTIMIZER_DEFAULTS[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # JSON true is no number
            raise CheckpointError(f"{where}: optimizer default {key!r} has the wrong type: {value!r}")


def _write_config(directory: Path, config: Mapping[str, Any]) -> None:
    """Write ``config`` as the folder's config.json (indented JSON, values JSON lacks as strings)."""
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + "\n")


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``config.json`` of a checkpoint folder."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: {directory} is not a learned_optim checkpoint folder")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    if config.get("library") != LIBRARY_NAME:
        run_net = Path(directory) / "model"
        if (run_net / CONFIG_NAME).is_file():
            raise CheckpointError(f"{directory} is a meta-training run's folder; its net is the checkpoint {run_net}")
        raise CheckpointError(
            f"{path} is not a learned_optim checkpoint (library={config.get('library')!r}); "
            "foreign checkpoints (e.g. transformers models) cannot be loaded as optimizers"
        )
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION or version < 1:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is not supported by this "
            f"learned_optim (supports 1..{FORMAT_VERSION}); upgrade learned_optim"
        )
    family = config.get("family")
    if not isinstance(family, str) or family not in FAMILIES:
        raise CheckpointError(f"{path}: unknown net family {family!r}; known families: {sorted(FAMILIES)}")
    if not isinstance(config.get("net", {}), dict):
        raise CheckpointError(f"{path}: 'net' must be a JSON object of hyperparameters")
    defaults = config.get("optimizer", {})
    if not isinstance(defaults, dict):
        raise CheckpointError(f"{path}: 'optimizer' must be a JSON object of optimizer defaults, got {defaults!r}")
    check_optimizer_defaults(defaults, path)
    if config.get("schedule") is not None and config["schedule"] not in SCHEDULES:
        raise CheckpointError(f"{path}: schedule must be one of {SCHEDULES} or absent, got {config['schedule']!r}")
    return config


def weights_sha256(directory: str | os.PathLike) -> str:
    """SHA-256 (16 hex digits) of a checkpoint folder's weights file: what identifies its weights in the benchmark
    store's run keys and in a weight soup's record of its ingredients."""
    h = hashlib.sha256()
    with (Path(directory) / WEIGHTS_NAME).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def records_meta_training(config: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's config.json records that its weights were meta-trained: a meta-training record
    (``training.meta_training``), or a weight soup (``training.soup``) whose every ingredient records one."""
    training = config.get("training") or {}
    if training.get("meta_training"):
        return True
    ingredients = (training.get("soup") or {}).get("ingredients") or []
    return bool(ingredients) and all(i.get("meta_trained") for i in ingredients)


def load_rule_from_dir(directory: str | os.PathLike) -> tuple[UpdateRule, dict[str, Any]]:
    """Build the net of a checkpoint folder and load its weights strictly. Returns ``(rule, config)``."""
    directory = Path(directory)
    config = read_config(directory)
    try:
        rule = build_rule(config["family"], config.get("net", {}))
    except (TypeError, ValueError, RuntimeError) as err:  # RuntimeError: torch refusing a size (e.g. negative)
        raise CheckpointError(f"{directory / CONFIG_NAME}: invalid net configuration: {err}") from None
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} does not exist (weights are read from safetensors only)")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{weights_path} is not a readable safetensors file (truncated or another format?): {err}"
        ) from None
    expected = rule.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path} does not match the {config['family']} net of its config: "
            f"missing tensors {missing}, unexpected tensors {unexpected}"
        )
    for key, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{weights_path}: tensor {key!r} has shape {tuple(tensor.shape)}, the net "
                f"needs {tuple(expected[key].shape)}"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{weights_path}: tensor {key!r} has non-floating dtype {tensor.dtype}")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{weights_path}: tensor {key!r} holds NaN or inf")
    rule.load_state_dict({k: v.to(expected[k].dtype) for k, v in weights.items()}, strict=True)
    return rule, config


PENDING_EVALUATION_HEADING = "## Evaluation"
#: Results recorded by the benchmark suite (``learned_optim.bench``) are filed under keys starting with this.
BENCH_RESULTS_PREFIX = "bench suite"


def record_evaluation(
    directory: str | os.PathLike, tasks: Sequence[str], markdown: str, results: Mapping[str, Any]
) -> None:
    """Put measured evaluation results on ``tasks`` into a checkpoint's card and config.

    The card (README.md) gets ``markdown`` as its section "## Evaluation: <tasks>", replacing an
    earlier section for the same tasks (up to the next "## " heading) and the trainer's placeholder
    section "## Evaluation"; config.json gets ``results`` under ``training.results["<tasks>"]`` (what
    :func:`list_pretrained` shows). Weights are not touched.
    """
    directory = Path(directory)
    key = ", ".join(tasks)
    config = read_config(directory)
    training = config.setdefault("training", {})
    training["results"] = {**(training.get("results") or {}), key: dict(results)}
    _write_card_section(
        directory, config, f"## Evaluation: {key}", markdown.strip().splitlines(), drop=PENDING_EVALUATION_HEADING
    )
    _write_config(directory, config)


def _write_card_section(
    directory: Path,
    config: Mapping[str, Any],
    heading: str,
    body: Sequence[str],
    drop: str | None = None,
    json_blocks: Mapping[str, Any] | None = None,
) -> None:
    """Write the card of ``directory`` (one generated from ``config`` when it has none) with the section ``heading``
    (up to the next "## " heading) set to ``body``, appended when absent, the section ``drop`` removed, and in each
    section of ``json_blocks`` (heading -> value) that the card has, its first fenced JSON block set to the value (the
    rest of that section kept)."""
    card_path = directory / CARD_NAME
    lines = (card_path.read_text() if card_path.is_file() else model_card(config)).splitlines()

    def section_end(start: int) -> int:
        return next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))

    if drop is not None and drop in lines:
        start = lines.index(drop)
        del lines[start : section_end(start)]
    for other, value in (json_blocks or {}).items():
        if other in lines:
            start = lines.index(other)
            opening = next((i for i in range(start, section_end(start)) if lines[i] == "```json"), None)
            if opening is None:
                continue
            closing = next((i for i in range(opening + 1, len(lines)) if lines[i] == "```"), None)
            if closing is not None:
                lines[opening + 1 : closing] = json.dumps(value, indent=2).splitlines()
    if heading in lines:
        start = lines.index(heading)
        lines[start : section_end(start)] = [heading, "", *body, ""]
    else:
        lines += ["", heading, "", *body, ""]
    card_path.write_text("\n".join(lines).rstrip() + "\n")


def reconfigure_checkpoint(
    directory: str | os.PathLike,
    settings: Mapping[str, Any],
    command: str | None = None,
    optimizer: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Change, in place, settings of a checkpoint folder that its weights do not depend on: net settings (a decay, an
    epsilon, the orthogonalisation's product dtype), e.g. ``{"newton_schulz_dtype": "auto"}``, and ``optimizer``
    defaults (config.json's ``optimizer``: what :func:`from_pretrained` passes when the caller does not, e.g.
    ``{"lr": 1e-2}``).

    The net with the new settings is built and the weights loaded into it strictly
    (:meth:`~learned_optim.nets.base.UpdateRule.reconfigured`: a :class:`ValueError` when a setting is unknown or
    invalid or would change a weight, and nothing is written); an optimizer default must be one a checkpoint may set
    (:data:`OPTIMIZER_DEFAULTS`), of its type, and is checked by building the optimizer with it. config.json's ``net``
    and ``optimizer`` get the new values (nothing else in them changes) and ``training.reconfigured`` one record more
    (the settings, net ones by name and optimizer ones as ``optimizer.KEY``, their values before, ``command``); the
    card its net configuration anew and a section "## Settings changed after training" listing every such record;
    model.safetensors is not touched. Returns the record."""
    directory = Path(directory)
    optimizer = dict(optimizer or {})
    rule, config = load_rule_from_dir(directory)
    before = rule.config.to_dict()
    defaults = dict(config.get("optimizer") or {})
    check_optimizer_defaults(optimizer, directory)
    unchanged = sorted(k for k, v in settings.items() if k in before and before[k] == v)
    unchanged += sorted(f"optimizer.{k}" for k, v in optimizer.items() if k in defaults and defaults[k] == v)
    if unchanged:
        raise ValueError(f"{directory}: {', '.join(unchanged)} already set to the value given; nothing to change")
    changed = rule.reconfigured(**settings)
    from .optimizer import LearnedOptimizer

    probe = torch.zeros(1, device="meta", requires_grad=True)
    LearnedOptimizer([probe], changed, **{**defaults, **optimizer})  # (the optimizer's own checks of the values)
    record = {
        "settings": {**settings, **{f"optimizer.{k}": v for k, v in optimizer.items()}},
        "before": {**{k: before.get(k) for k in settings}, **{f"optimizer.{k}": defaults.get(k) for k in optimizer}},
        "command": command,
    }
    changed_net = changed.config.to_dict()
    config["net"] = {**(config.get("net") or {}), **{k: changed_net[k] for k in settings}}  # (the rest as stored)
    if optimizer:
        config["optimizer"] = {**defaults, **optimizer}
    training = config.setdefault("training", {})
    training["reconfigured"] = [*(training.get("reconfigured") or []), record]
    body = [
        "The weights are the trained ones; these settings, which they do not depend on, were changed after "
        "training (`learned_optim.hub.reconfigure_checkpoint`):",
        "",
        *(
            "- "
            + ", ".join(f"`{k}` {r['before'].get(k)!r} -> {v!r}" for k, v in r["settings"].items())
            + (f" (`{r['command']}`)" if r.get("command") else "")
            for r in training["reconfigured"]
        ),
    ]
    _write_card_section(
        directory, config, RECONFIGURED_HEADING, body, json_blocks={NET_CONFIGURATION_HEADING: config["net"]}
    )
    _write_config(directory, config)
    return record


#: The zoo's flagship, the general-purpose entry to replace AdamW with (keep AdamW's tuned lr, weight decay and
#: schedule): chosen among the recipes by a pre-registered rule on the recipe-selection set, never on the benchmark
#: suite (README "The zoo"; benchmarks/results/bench/orthogonal/README.md). The demo's default.
FLAGSHIP = "adafac-mlp-adam-magnitude-tbv-nomup-soup-all8-orthogonal"


def zoo_dir() -> Path:
    """Folder of the bundled zoo: inside the installed wheel, else ``pretrained/`` of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "pretrained", here.parent / "pretrained"):
        if candidate.is_dir():
            return candidate
    return here / "pretrained"


def _zoo_entries() -> dict[str, Path]:
    root = zoo_dir()
    if not root.is_dir():
        return {}
    return {d.name: d for d in sorted(root.iterdir()) if (d / CONFIG_NAME).is_file()}


def _trained_on(training: Mapping[str, Any]) -> Any:
    """The task family a checkpoint was meta-trained on: its own record's, else (a weight soup, an adapted or
    fine-tuned net that records none) the nearest parent's."""
    return next((record["tasks"] for _, record in _lineage(training) if record.get("tasks")), None)


def list_pretrained() -> list[dict[str, Any]]:
    """The bundled zoo: one dict per entry with its name, family, description, training and results.

    ``suite`` holds the aggregates of the benchmark suite (``python -m learned_optim bench --record-card``)
    per recorded suite run (key ``"bench suite v<N>"``, ``" (quick)"`` for the quick selection), or ``None``.
    ``kind`` is ``"general"`` for an entry recommended to train models with, ``"research"`` for a
    reproduction kept with its evidence (``research`` then says what it is for; config.json's top-level
    ``"research"``); ``flagship`` marks :data:`FLAGSHIP`. The flagship comes first, then the other general-purpose
    entries, then the research ones.
    """
    entries = []
    for name, directory in _zoo_entries().items():
        config = read_config(directory)
        training = config.get("training") or {}
        results = training.get("results") or {}
        suite = {k: v.get("aggregates") for k, v in results.items() if k.startswith(BENCH_RESULTS_PREFIX)}
        entries.append(
            {
                "name": name,
                "flagship": name == FLAGSHIP,
                "kind": "research" if config.get("research") else "general",
                "research": config.get("research"),
                "family": config["family"],
                "description": config.get("description"),
                "trained_on": _trained_on(training),
                "results": training.get("results"),
                "suite": suite or None,
                "path": str(directory),
            }
        )
    return sorted(entries, key=lambda e: (not e["flagship"], e["kind"] != "general"))


#: Research entries whose note :func:`from_pretrained` has already shown in this process.
_research_warned: set[str] = set()


def resolve_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """Find the folder of a checkpoint.

    Resolution order: an existing local directory; a zoo name from :func:`list_pretrained`; a
    Hugging Face Hub repo id (``owner/name``), fetched with ``huggingface_hub.snapshot_download``
    (its cache, ``revision`` pinning and offline mode apply).
    """
    path = Path(name_or_path)
    if path.is_dir():
        if revision is not None:
            raise CheckpointError(
                f"{path} is a local folder, which has no revisions; revision= applies to Hub repo ids"
            )
        return path
    name = str(name_or_path)
    zoo = _zoo_entries()
    if name in zoo:
        if revision is not None:
            raise CheckpointError(
                f"{name!r} is a bundled zoo entry, which has no revisions; revision= applies "
                "to Hub repo ids ('owner/name')"
            )
        return zoo[name]
    if "/" not in name or name.count("/") > 1:
        raise CheckpointError(
            f"{name!r} is neither a local checkpoint folder, nor a zoo name "
            f"({sorted(zoo) or 'the zoo is empty'}), nor a Hub repo id of the form 'owner/name'"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    if path.is_absolute() or name.startswith("."):
        raise CheckpointError(f"{name!r} is not a local checkpoint folder (no such directory)")
    not_a_folder = f"; there is no local folder {name} either"
    not_cached = (
        f"{name!r} (revision {revision or 'main'}) is not in the local Hub cache and the Hub cannot be reached "
        f"(offline?){not_a_folder}"
    )
    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
        # a commit never changes: its snapshot in the cache is the answer, without the network (huggingface_hub
        # would first retry the Hub for ~20 s when it cannot be reached)
        cached = _cached_snapshot(name, revision, cache_dir)
        if cached is not None and (cached / WEIGHTS_NAME).is_file():
            return cached
    try:
        folder = snapshot_download(
            name,
            revision=revision,
            cache_dir=None if cache_dir is None else Path(cache_dir),
            local_files_only=local_files_only,
            token=token,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME],
            library_name=LIBRARY_NAME,
        )
    except LocalEntryNotFoundError as err:
        raise CheckpointError(f"{not_cached}: {err}") from None
    except OfflineModeIsEnabled as err:
        # some huggingface_hub versions (1.33) list the repo online even for a commit hash already in the cache
        cached = _cached_snapshot(name, revision, cache_dir)
        if cached is None:
            raise CheckpointError(f"{not_cached}: {err}") from None
        return cached
    except HfHubHTTPError as err:
        raise CheckpointError(f"could not fetch {name!r} from the Hugging Face Hub: {err}") from None
    except HFValidationError as err:
        raise CheckpointError(f"{name!r} is not a valid Hub repo id ('owner/name'){not_a_folder}: {err}") from None
    return Path(folder)


def _cached_snapshot(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None) -> Path | None:
    """The folder of ``repo_id``'s snapshot at ``revision`` in the Hub cache, read without the network."""
    from huggingface_hub import try_to_load_from_cache

    cache = None if cache_dir is None else Path(cache_dir)
    found = try_to_load_from_cache(repo_id, CONFIG_NAME, cache_dir=cache, revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def load_rule(name_or_path: str | os.PathLike, **resolve_kwargs: Any) -> tuple[UpdateRule, dict[str, Any]]:
    """Resolve (see :func:`resolve_checkpoint`) and load a checkpoint. Returns ``(rule, config)``."""
    return load_rule_from_dir(resolve_checkpoint(name_or_path, **resolve_kwargs))


def from_pretrained(
    name_or_path: str | os.PathLike,
    params: Iterable[Any],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    **optimizer_kwargs: Any,
) -> LearnedOptimizer:
    """A :class:`~learned_optim.LearnedOptimizer` over ``params`` running a pretrained net.

    ``name_or_path`` is a local checkpoint folder, a zoo name (see :func:`list_pretrained`) or a
    Hub repo id (``revision`` pins a branch, tag or commit). ``optimizer_kwargs`` (``lr``,
    ``weight_decay``, ``chunk_size``, ...) override the defaults recorded in the checkpoint. Like every
    :class:`~learned_optim.LearnedOptimizer`, it puts the net on the parameters' device.
    """
    from .optimizer import LearnedOptimizer

    rule, config = load_rule(
        name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
    )
    # remembered for save_pretrained (after learned_optim.adapt: what the adapted net derives from)
    rule.provenance.origin = {
        "parent": parent_record(config, source=str(name_or_path), revision=revision),
        "description": config.get("description"),
        "optimizer": config.get("optimizer", {}),
        "schedule": config.get("schedule"),
        "research": config.get("research"),
    }
    note, name = config.get("research"), str(config.get("name") or name_or_path)
    if note and name not in _research_warned:
        _research_warned.add(name)
        warnings.warn(f"{name} is a research reproduction, not a general-purpose optimizer: {note}", stacklevel=2)
    kwargs = {**config.get("optimizer", {}), **optimizer_kwargs}
    return LearnedOptimizer(params, rule, **kwargs)


def push_to_hub(
    rule: UpdateRule,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload learned optimizer",
    **save_kwargs: Any,
) -> str:
    """Save ``rule`` to a temporary folder and upload it as Hub repo ``repo_id`` (created if need be, in one commit);
    returns the commit URL. The checkpoint is written before the Hub is contacted (its own errors come as they are,
    as do errors in the arguments, e.g. an invalid repo id); a failure to reach the Hub or to upload
    (network, offline mode, authentication, a missing revision) raises :class:`HubUploadError` with the cause
    chained."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(rule, tmp, **save_kwargs)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=revision, commit_message=commit_message)
        except (ValueError, TypeError):  # the arguments themselves (an invalid repo id): as they are
            raise
        except Exception as err:  # the HTTP client's own errors differ by huggingface_hub version: caught whole
            raise HubUploadError(
                f"could not push the checkpoint to the Hugging Face Hub repo {repo_id!r} ({type(err).__name__}: "
                f"{err}); nothing was committed (the repo may have been created). Check the network, the token and "
                "its write access to the repo, then push again (or save_pretrained() to a folder, upload it later)"
            ) from err
    return str(getattr(info, "commit_url", info))
