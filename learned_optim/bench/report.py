"""Text and file helpers shared by the evaluation harness and the suite's reports."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from .._files import write_atomically
from ..hub import read_config, record_evaluation

__all__ = [
    "check_outputs",
    "json_safe",
    "slug",
    "plural",
    "fmt_ci",
    "table_lines",
    "Report",
    "write_report",
    "output_files",
    "write_json",
]


def json_safe(value: Any) -> Any:
    """NaN/inf become ``null`` (strict JSON); containers are converted recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def slug(name: str) -> str:
    """``name`` as a file-name part: runs of other characters than letters, digits, ``._-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "task"


def plural(n: int, noun: str) -> str:
    """``"1 seed"``, ``"3 seeds"``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def table_lines(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table: the header line, the rule, one line per row of cells."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def fmt_ci(mean: float, half: float, scale: float = 1.0, digits: int = 4) -> str:
    """``mean ± half`` (both times ``scale``; ``digits`` significant digits for the mean, 2 for the
    half-width); ``n/a`` for a non-finite mean, the mean alone for a non-finite half-width."""
    if not math.isfinite(mean):
        return "n/a"
    text = f"{mean * scale:.{digits}g}"
    return text if not math.isfinite(half) else f"{text} ± {half * scale:.2g}"


class Report(Protocol):
    """What the evaluation harness and the suite both produce: files, a markdown table, card results."""

    def write(self, out_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Path]: ...

    def markdown(self) -> str: ...

    def card_results(self) -> dict[str, Any]: ...


def write_report(
    results: Report, out_dir: str | os.PathLike, *, plots: bool, record_card: Sequence[str], sections: Sequence[str]
) -> dict[str, Path]:
    """Write ``results``' files to ``out_dir`` and, for each checkpoint folder of ``record_card``, its table
    into the model card (section of ``sections``) and its results into config.json; returns the files."""
    files = results.write(out_dir, plots=plots)
    for checkpoint in record_card:
        record_evaluation(checkpoint, list(sections), results.markdown(), results.card_results())
        files[f"card:{checkpoint}"] = Path(checkpoint) / "README.md"
    return files


def check_outputs(out_dir: str | os.PathLike, *, plots: bool, record_card: Sequence[str] = ()) -> None:
    """What :func:`write_report` needs, checked before the runs (hours of them) rather than after: ``out_dir`` a
    folder that exists or can be made, matplotlib where ``plots`` are asked for, each ``record_card`` folder a
    checkpoint. ``ValueError`` (a :class:`~learned_optim.CheckpointError` for a card folder) otherwise."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {out} cannot be created: {err}") from None
    if plots and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("the plots need matplotlib (pip install matplotlib, or the 'meta' extra); or pass --no-plots")
    for checkpoint in record_card:
        read_config(checkpoint)


def output_files(out_dir: str | os.PathLike, names: Mapping[str, str]) -> dict[str, Path]:
    """Create ``out_dir`` and return ``{key: out_dir / file name}`` for ``names`` (key -> file name)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {key: out / name for key, name in names.items()}


def write_json(path: Path, data: Any) -> None:
    """Strict JSON (no NaN: pass :func:`json_safe` data), indented, with a final newline."""
    write_atomically(path, (json.dumps(data, indent=1, allow_nan=False) + "\n").encode())
