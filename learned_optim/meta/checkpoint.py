"""A meta-training run's checkpoint: the trainer's whole state in one safetensors file and one JSON file.

``state-<meta_step>.safetensors`` holds every tensor (the net's weights, the meta-optimizers' state, the
random generators, the trajectory, the estimator's state) and ``state-<meta_step>.json`` everything else
(the config, counters, param groups). Both are written atomically (a temporary file, fsync, rename), the
older pair is removed only after the new one is complete, and a resume reads tensors only through
safetensors (never unpickles) and refuses a checkpoint whose config differs from the run's.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .._files import write_atomically
from .unroll import Trajectory

if TYPE_CHECKING:
    from .trainer import MetaTrainer

__all__ = [
    "CHECKPOINT_FORMAT",
    "optimizer_to_tensors",
    "optimizer_from_tensors",
    "rng_to_tensors",
    "rng_from_tensors",
    "latest_checkpoint",
    "write_checkpoint",
    "read_checkpoint",
    "trainer_state_to_tensors",
    "trainer_state_from_tensors",
]

#: Version of the checkpoint layout; a checkpoint of another version is refused.
CHECKPOINT_FORMAT = 1


def optimizer_to_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A torch optimizer's state as tensors named ``<prefix>.<param id>.<key>`` and JSON (groups, scalars)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}.{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(
    opt: torch.optim.Optimizer, prefix: str, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]
) -> None:
    """Load the state :func:`optimizer_to_tensors` wrote into ``opt``."""
    state: dict[int, dict[str, Any]] = {}
    head = prefix + "."
    for key, value in tensors.items():
        if key.startswith(head):
            pid, name = key[len(head) :].split(".", 1)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_to_tensors(generators: Mapping[str, torch.Generator]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every random state a run draws from: torch's global generator (``rng.torch``), each CUDA device's
    (``rng.cuda.<index>``, once CUDA is initialised), each of ``generators`` (``rng.<name>``), numpy's
    global legacy generator (what user code and libraries draw from) and Python's ``random``; as tensors
    and JSON."""
    tensors = {"rng.torch": torch.get_rng_state(), **{f"rng.{k}": g.get_state() for k, g in generators.items()}}
    if torch.cuda.is_initialized():
        tensors |= {f"rng.cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    meta: dict[str, Any] = {}
    try:
        import numpy as np

        # the global RNG, checkpointed as it is (legacy=True: the tuple form)
        kind, keys, pos, has_gauss, cached = cast(tuple, np.random.get_state(legacy=True))  # noqa: NPY002
        tensors["rng.numpy"] = torch.from_numpy(keys.astype("int64"))
        meta["rng_numpy"] = [kind, int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    version, internal, gauss = random.getstate()
    meta["rng_python"] = [version, list(internal), gauss]
    return tensors, meta


def rng_from_tensors(
    tensors: Mapping[str, Tensor], meta: Mapping[str, Any], generators: Mapping[str, torch.Generator]
) -> None:
    """Restore the random states :func:`rng_to_tensors` saved (a generator the checkpoint lacks is left as is;
    so is a CUDA device this process does not have)."""
    torch.set_rng_state(tensors["rng.torch"])
    for i in range(torch.cuda.device_count()):
        if f"rng.cuda.{i}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{i}"], i)
    for name, generator in generators.items():
        if f"rng.{name}" in tensors:
            generator.set_state(tensors[f"rng.{name}"])
    if "rng.numpy" in tensors and meta.get("rng_numpy"):
        import numpy as np

        kind, pos, has_gauss, cached = meta["rng_numpy"]
        np_state = (kind, tensors["rng.numpy"].numpy().astype("uint32"), pos, has_gauss, cached)
        np.random.set_state(np_state)  # noqa: NPY002 (restores the global RNG checkpointed above)
    version, internal, gauss = meta["rng_python"]
    random.setstate((version, tuple(internal), gauss))


def complete_checkpoints(directory: Path) -> dict[int, Path]:
    """The JSON halves of the complete checkpoints in ``directory``, by meta-step."""
    if not directory.is_dir():
        return {}
    found = (p for p in directory.glob("state-*.json") if p.with_suffix(".safetensors").is_file())
    return {int(p.stem.split("-")[1]): p for p in found}


def latest_checkpoint(directory: Path) -> Path | None:
    """The JSON half of the newest complete checkpoint in ``directory`` (``None`` if there is none)."""
    found = complete_checkpoints(directory)
    return found[max(found)] if found else None


def write_checkpoint(
    directory: Path, meta_step: int, tensors: Mapping[str, Tensor], meta: Mapping[str, Any], keep: int = 1
) -> Path:
    """Write ``state-<meta_step>`` (tensors, then JSON; each atomically) and drop the checkpoints older than the
    ``keep`` newest; returns the JSON path. ``meta`` gets the ``format`` key."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"state-{meta_step:09d}"
    meta = {"format": CHECKPOINT_FORMAT, **meta}
    write_atomically(
        stem.with_suffix(".safetensors"), lambda p: save_file(dict(tensors), str(p), metadata={"format": "pt"})
    )
    write_atomically(stem.with_suffix(".json"), lambda p: p.write_text(json.dumps(meta, indent=1) + "\n"))
    kept = {f"state-{step:09d}" for step in sorted(complete_checkpoints(directory))[-keep:]} | {stem.name}
    for old in directory.glob("state-*"):
        if old.stem not in kept and not old.name.startswith("."):
            old.unlink(missing_ok=True)
    return stem.with_suffix(".json")


def _config_differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += _config_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {vb!r} -> {va!r}")
    return out


def read_checkpoint(json_path: Path, config: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of the checkpoint ``json_path``, after checking its format and that its config
    equals ``config`` (the run's, as a dict) up to ``device``; a clear ``ValueError`` otherwise."""
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{json_path}: the trainer checkpoint is not valid JSON (truncated?): {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{json_path}: unsupported trainer checkpoint format {found!r}")
    saved, current = dict(meta["config"]), dict(config)
    saved.pop("device", None), current.pop("device", None)
    diffs = _config_differences(current, saved)
    if diffs:
        raise ValueError(f"cannot resume {json_path}: the config differs from the checkpoint's: {diffs}")
    tensors_path = json_path.with_suffix(".safetensors")
    try:
        return load_file(str(tensors_path)), meta
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{tensors_path}: the trainer checkpoint's tensors are not readable (truncated?): {err}"
        ) from None


def trainer_state_to_tensors(trainer: MetaTrainer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A :class:`~learned_optim.meta.trainer.MetaTrainer`'s whole state as (tensors, JSON): the net's weights,
    the meta-optimizers' states, the best weights, every generator, the in-flight trajectory (and its other task
    instances), MAML's and PES's state, the counters and the log's length (a resume truncates the log there)."""
    tensors: dict[str, Tensor] = {
        f"net.{k}": v.detach().contiguous().cpu() for k, v in trainer.rule.state_dict().items()
    }
    meta: dict[str, Any] = {"config": trainer.config.to_dict()}
    opt_tensors, meta["meta_optimizer"] = optimizer_to_tensors(trainer.meta_optimizer, "meta_opt")
    tensors.update(opt_tensors)
    if trainer.imitation_optimizer is not None:
        opt_tensors, meta["imitation_optimizer"] = optimizer_to_tensors(trainer.imitation_optimizer, "imitation_opt")
        tensors.update(opt_tensors)
    if trainer.best_weights is not None:
        tensors.update({f"best.{k}": v.detach().contiguous().cpu() for k, v in trainer.best_weights.items()})
    rng_tensors, rng_meta = rng_to_tensors(trainer.generators())
    tensors.update(rng_tensors)
    meta.update(rng_meta)
    if trainer.trajectory is not None:
        traj_tensors, meta["trajectory"] = trainer.trajectory.to_tensors("traj")
        tensors.update(traj_tensors)
        meta["trajectory"].update(mode=trainer.trajectory_mode, length=trainer.trajectory_length)
    if trainer.maml is not None:
        maml_tensors, meta["maml"] = trainer.maml.to_tensors()
        tensors.update(maml_tensors)
    if trainer.pes is not None:
        pes_tensors, meta["pes"] = trainer.pes.to_tensors()
        tensors.update(pes_tensors)
    if trainer.instances is not None and trainer.trajectory is not None:
        instance_tensors, meta["instances"] = trainer.instances.to_tensors()
        tensors.update(instance_tensors)
    meta.update(
        meta_steps=trainer.meta_steps,
        meta_epochs=trainer.meta_epochs,
        curriculum=trainer.curriculum.state_dict() if trainer.curriculum is not None else None,
        last_eval=trainer.last_eval,
        recent_meta_losses=list(trainer.recent_meta_losses),
        recent_final_losses=list(trainer.recent_final_losses),
        wall_time=trainer.elapsed(),
        commands=trainer.commands,
        finished=trainer.finished,
        finish_reason=trainer.finish_reason,
        parent=trainer.parent,
        log_bytes=trainer.log_path.stat().st_size if trainer.log_path.exists() else 0,
        world_size=trainer.data_world_size,
    )
    return tensors, meta


def trainer_state_from_tensors(trainer: MetaTrainer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Restore what :func:`trainer_state_to_tensors` saved into ``trainer`` (built from the same config and run on as
    many data-parallel processes: each rank's tasks follow from the world size, so another one would continue another
    run; a single-process or particle-parallel run, whose tasks do not depend on the processes, records 1 and resumes
    on one process or particle-parallel on any number)."""
    saved_world = int(meta.get("world_size") or trainer.data_world_size)  # (checkpoints before session 22: none)
    if saved_world != trainer.data_world_size:
        raise ValueError(
            f"cannot resume: the run was checkpointed on {saved_world} process(es) (data-parallel) and this launch has "
            f"{trainer.data_world_size}; resume it with torchrun --nproc-per-node {saved_world}"
            if saved_world > 1
            else f"cannot resume: the run was checkpointed on 1 process and this launch has {trainer.data_world_size} "
            "(data-parallel); resume it on one process, or particle-parallel (--parallel particles) on any number"
        )
    trainer.rule.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True)
    optimizer_from_tensors(trainer.meta_optimizer, "meta_opt", tensors, meta["meta_optimizer"])
    if trainer.imitation_optimizer is not None:
        optimizer_from_tensors(trainer.imitation_optimizer, "imitation_opt", tensors, meta["imitation_optimizer"])
    best = {k[5:]: v.to(trainer.device) for k, v in tensors.items() if k.startswith("best.")}
    trainer.best_weights = best or None
    rng_from_tensors(tensors, meta, trainer.generators())
    if trainer.curriculum is not None:
        trainer.curriculum.load_state_dict(meta["curriculum"])
    trainer.meta_steps, trainer.meta_epochs = int(meta["meta_steps"]), int(meta["meta_epochs"])
    trainer.last_eval = meta["last_eval"]
    trainer.recent_meta_losses.clear()
    trainer.recent_meta_losses.extend(meta["recent_meta_losses"])
    trainer.recent_final_losses.clear()
    trainer.recent_final_losses.extend(meta["recent_final_losses"])
    trainer.wall_time = float(meta["wall_time"])
    trainer.commands = list(meta["commands"])
    trainer.finished, trainer.finish_reason = bool(meta["finished"]), meta["finish_reason"]
    trainer.parent = meta.get("parent", trainer.parent)
    trainer.resume_log_bytes = int(meta["log_bytes"])
    traj = meta.get("trajectory")
    if traj is not None:
        trainer.task, _ = trainer.task_for(trainer.task_index)
        trainer.trajectory = Trajectory.from_tensors("traj", tensors, traj, device=trainer.device)
        trainer.trajectory_mode, trainer.trajectory_length = traj["mode"], int(traj["length"])
        if trainer.hook is not None:
            trainer.hook.begin_trajectory(trainer.trajectory_length)
    else:
        trainer.trajectory, trainer.task = None, None
    if trainer.maml is not None:
        trainer.maml.load(tensors, meta.get("maml") if traj is not None else None, trainer.meta_epochs, trainer.task)
    if trainer.pes is not None:
        trainer.pes.load(tensors, meta.get("pes") if traj is not None else None)
    if trainer.instances is not None:
        trainer.instances.load(tensors, meta.get("instances", {"instances": []}) if traj is not None else None)
