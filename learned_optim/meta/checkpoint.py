"""A meta-training run's checkpoint: the trainer's whole state in one safetensors file and one JSON file.

``state-<meta_step>.safetensors`` holds every tensor (the net's weights, the meta-optimizers' state, the
random generators, the trajectory, the estimator's state) and ``state-<meta_step>.json`` everything else
(the config, counters, param groups). Both are written atomically (a temporary file, fsync, rename), the
older pair is removed only after the new one is complete, and a resume reads tensors only through
safetensors (never unpickles) and refuses a checkpoint whose config differs from the run's.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = [
    "CHECKPOINT_FORMAT",
    "optimizer_to_tensors",
    "optimizer_from_tensors",
    "rng_to_tensors",
    "rng_from_tensors",
    "latest_checkpoint",
    "write_checkpoint",
    "read_checkpoint",
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
    """Every random state a run draws from: torch's global generator (``rng.torch``), each of
    ``generators`` (``rng.<name>``), numpy's global legacy generator (what user code and libraries draw
    from) and Python's ``random``; as tensors and JSON."""
    tensors = {"rng.torch": torch.get_rng_state(), **{f"rng.{k}": g.get_state() for k, g in generators.items()}}
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
    """Restore the random states :func:`rng_to_tensors` saved (a generator the checkpoint lacks is left as is)."""
    torch.set_rng_state(tensors["rng.torch"])
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


def latest_checkpoint(directory: Path) -> Path | None:
    """The JSON half of the newest complete checkpoint in ``directory`` (``None`` if there is none)."""
    if not directory.is_dir():
        return None
    found = sorted(p for p in directory.glob("state-*.json") if p.with_suffix(".safetensors").is_file())
    return found[-1] if found else None


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_checkpoint(directory: Path, meta_step: int, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Path:
    """Write ``state-<meta_step>`` (tensors, then JSON; each atomically) and drop the older checkpoints;
    returns the JSON path. ``meta`` gets the ``format`` key."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"state-{meta_step:09d}"
    meta = {"format": CHECKPOINT_FORMAT, **meta}
    _atomic_write(
        stem.with_suffix(".safetensors"), lambda p: save_file(dict(tensors), str(p), metadata={"format": "pt"})
    )
    _atomic_write(stem.with_suffix(".json"), lambda p: p.write_text(json.dumps(meta, indent=1) + "\n"))
    for old in directory.glob("state-*"):
        if old.stem != stem.name and not old.name.startswith("."):
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
    meta = json.loads(json_path.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{json_path}: unsupported trainer checkpoint format {meta.get('format')!r}")
    saved, current = dict(meta["config"]), dict(config)
    saved.pop("device", None), current.pop("device", None)
    diffs = _config_differences(current, saved)
    if diffs:
        raise ValueError(f"cannot resume {json_path}: the config differs from the checkpoint's: {diffs}")
    return load_file(str(json_path.with_suffix(".safetensors"))), meta
