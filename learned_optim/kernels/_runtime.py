"""The kernels' run-time state: the switches, the library loaded on first use, and the guard's verdicts
(see :mod:`learned_optim.kernels`)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import _guard as guard_measurement
from ._build import build, cpu_model, guard_record_path, is_prebuilt, supported_isas
from ._guard import KERNELS, MIN_SPEEDUP

logger = logging.getLogger("learned_optim.kernels")

#: The kernels each net family's step calls, the one that runs its net (and decides its chunk size) first.
RULE_KERNELS: dict[str, tuple[str, ...]] = {
    "dm_lstm": ("lstm_cell",),
    "rnnprop": ("lstm_cell", "elu"),
    "mlp": ("mlp",),
    "adafac_mlp": ("adafac_mlp",),
}

_lock = threading.RLock()
_lib: ctypes.CDLL | None = None
_lib_path: Path | None = None
_isa: str | None = None
_guard: dict[str, Any] | None = None
_error: str | None = None
_loaded = False
_force = False
_enabled = os.environ.get("LEARNED_OPTIM_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")
_forked_child = False


def _after_fork_in_child() -> None:
    global _forked_child
    _forked_child = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def kernel_threads() -> int:
    """The threads a kernel call may use: ``torch.get_num_threads()``, but 1 in a process forked from this one when
    the kernels run on torch's OpenMP threads (:func:`shares_torch_threads`). GNU OpenMP's threads do not survive
    ``fork()``: a parallel region in the child would wait for ever, as torch's own parallel ops do there."""
    if _forked_child and shares_torch_threads():
        return 1
    return torch.get_num_threads()


def set_enabled(value: bool) -> bool:
    """Turn the native kernels on or off for this process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(value)
    return previous


@contextlib.contextmanager
def enabled_as(value: bool) -> Iterator[None]:
    """Context manager: the kernels on (``True``) or off (``False``) inside the block."""
    previous = set_enabled(value)
    try:
        yield
    finally:
        set_enabled(previous)


def enabled() -> bool:
    """Whether the native kernels are switched on (they may still be unavailable: see :func:`available`)."""
    return _enabled


@contextlib.contextmanager
def forced() -> Iterator[None]:
    """Context manager: every kernel that is built runs inside the block, whatever the guard measured.

    For tests of the kernels' results and for benchmarks that compare them with ATen; the ATen path still
    runs where a kernel does not apply (dtype, device, shape) or when the kernels are off or unavailable.
    """
    global _force
    previous, _force = _force, True
    try:
        yield
    finally:
        _force = previous


@contextlib.contextmanager
def _switched(kernel: bool) -> Iterator[None]:
    """The guard's switch: every kernel forced on (``True``) or all off (``False``) inside the block."""
    global _force, _enabled
    previous = _force, _enabled
    _force = _enabled = kernel
    try:
        yield
    finally:
        _force, _enabled = previous


def isa() -> str | None:
    """The instruction set of the loaded kernels (builds them on the first call), ``None`` if unavailable."""
    return _isa if _library() is not None else None


def _library() -> ctypes.CDLL | None:
    global _lib, _lib_path, _isa, _error, _loaded, _guard
    if not _loaded:
        with _lock:
            if not _loaded:
                try:
                    _lib, _lib_path, _isa = build()
                except Exception as err:  # any build/load problem means: use the ATen path
                    _error = f"{type(err).__name__}: {err}"
                    logger.warning("learned_optim: native kernels unavailable, using the ATen path (%s)", _error)
                _loaded = True  # before the guard: its measurement calls the kernels (under forced())
                if _lib is not None and _lib_path is not None and _isa is not None:
                    try:
                        record: Path | None = guard_record_path(_lib_path)
                    except (OSError, RuntimeError) as err:  # no cache folder to name (no home directory)
                        logger.warning("learned_optim: the kernels' guard record is not cached (%s)", err)
                        record = None
                    _guard = guard_measurement.load_or_measure(record, _isa, _switched)
    return _lib


def _native() -> ctypes.CDLL | None:
    """The library when the kernels are switched on and built (builds it on the first call), else ``None``."""
    return _library() if _enabled else None


def library_for(name: str) -> ctypes.CDLL | None:
    """The library if kernel ``name`` is to run: switched on, built, and measured faster (or :func:`forced`)."""
    lib = _native()
    if lib is None or not (_force or _guard_allows(name)):
        return None
    return lib


def _guard_allows(name: str) -> bool:
    ratio = None if _guard is None else _guard["ratios"].get(name)
    return ratio is not None and ratio >= MIN_SPEEDUP


def library_path() -> Path | None:
    """The loaded library's file (builds it on the first call); where its guard record is kept:
    :func:`~learned_optim.kernels._build.guard_record_path`."""
    return _lib_path if _library() is not None else None


def vector_lanes() -> int | None:
    """Floats per vector of the loaded build (16 AVX-512, 8 AVX2, 4 portable), ``None`` if unavailable."""
    lib = _library()
    return None if lib is None else int(lib.lo_vector_lanes())


def shares_torch_threads() -> bool | None:
    """Whether the loaded build runs its threads on torch's OpenMP runtime (:func:`~learned_optim.kernels._build.
    openmp_flags`) rather than threads of its own, ``None`` if unavailable."""
    lib = _library()
    return None if lib is None else bool(lib.lo_uses_openmp())


def uses(name: str) -> bool:
    """Whether kernel ``name`` (one of :data:`KERNELS`) runs where it applies (builds the kernels if needed)."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; kernels: {list(KERNELS)}")
    return library_for(name) is not None


def serves(family: str) -> bool:
    """Whether the native kernel that runs the net of family ``family`` (its first in :data:`RULE_KERNELS`) is
    used here; false for families without one. The optimizer's chunk size follows it: a family whose net runs on
    ATen takes ATen's chunk size even if a smaller kernel (RNNProp's ELU) runs beside it."""
    names = RULE_KERNELS.get(family, ())
    return bool(names) and uses(names[0])


def guard() -> dict[str, Any] | None:
    """The guard's record for the loaded library (ISA, CPU, ratios ATen / kernel, times), ``None`` if none."""
    _library()
    return None if _guard is None else dict(_guard)


def report() -> str:
    """Which path each net family's step takes on this machine, and why (ISA, measured ratio, threshold)."""
    from ..nets.base import FAMILIES  # lazy: the nets import this module

    lib = _library() if _enabled else None  # switched off: nothing to build or measure
    lines = [f"learned_optim native kernels on {cpu_model()} (CPU runs {', '.join(supported_isas())})"]
    if not _enabled:
        lines.append("  switched off (LEARNED_OPTIM_KERNELS=0 or set_enabled(False)): every family runs on ATen")
    elif lib is None or _guard is None:
        lines.append(f"  unavailable ({_error or 'no guard measurement'}): every family runs on ATen")
    else:
        busy_note = " on a busy machine: measured again once it is calm" if _guard.get("busy") else ""
        bundled = " bundled with the package" if _lib_path is not None and is_prebuilt(_lib_path) else ""
        lines.append(
            f"  library {_lib_path}{bundled} (ISA {_isa}, {vector_lanes()}-float vectors, threads: "
            f"{'torch OpenMP runtime' if shares_torch_threads() else 'its own'}); guard: a kernel runs "
            f"if ATen takes >= {MIN_SPEEDUP}x its time ({_guard['rows']} coordinates, 1 thread, measured "
            f"{_guard['measured']}, load {_guard['load']}{busy_note}){'; forced on' if _force else ''}"
        )
        for name in KERNELS:
            ratio = _guard["ratios"][name]
            verdict = "used" if uses(name) else "NOT used (ATen runs)"
            lines.append(
                f"  kernel {name}: {verdict}: ATen {_guard['aten_ms'][name]:.3g} ms / kernel "
                f"{_guard['kernel_ms'][name]:.3g} ms = {ratio:.2f}x"
            )
    for family in sorted(FAMILIES):
        names = RULE_KERNELS.get(family, ())
        if not names:
            lines.append(f"  {family}: ATen (no native kernel for this family)")
            continue
        used = [k for k in names if _enabled and lib is not None and uses(k)]
        path = "native kernels " + ", ".join(used) if used else "ATen"
        rest = [k for k in names if k not in used]
        lines.append(f"  {family}: {path}" + (f"; ATen for {', '.join(rest)}" if used and rest else ""))
    return "\n".join(lines)


def available() -> bool:
    """Whether the kernels are enabled and built (builds them on the first call)."""
    return _native() is not None


def build_error() -> str | None:
    """Why the kernels could not be built (``None`` if they were, or were never tried)."""
    return _error
