"""Native CPU kernels: built from ``learned_optim/csrc`` on first use, with the ATen path as fallback.

They serve the nets' inference path (the optimizer's step, under ``no_grad``); meta-training's
differentiable path never uses them.

* :func:`lstm_cell_into` (``csrc/lstm_cell.cpp``), behind :func:`learned_optim.nets.cells.lstm_cell`:
  per block of rows the gate GEMM stays in registers and goes straight through the activations and the
  state update, instead of an MKL GEMM followed by elementwise ATen kernels over 20-wide gate slices;
* :func:`elu_` (``csrc/elementwise.cpp``), RNNProp's input activation: ATen's CPU ELU computes
  ``expm1`` one element at a time;
* :func:`mlp_feature_mean_square` and :func:`mlp_update` (``csrc/mlp.cpp``), the MLP net's statistics
  pass and update: features, hidden layer and output per 16 coordinates in registers, instead of a
  (rows x 22) feature matrix built by ~30 ATen ops, twice (statistics, then update);
* :func:`adafac_state_sumsq` and :func:`adafac_direction` (``csrc/adafac.cpp``), the two passes of
  ``AdafacMLP``'s inference step (state update and feature sums of squares; features, MLP and direction),
  each one sweep over the tensor with the 16 features and the hidden units in registers, instead of ~30 ATen
  elementwise passes and GEMMs per block of rows.

Same math; their ``exp`` is a polynomial accurate to about 1 float32 ulp, so results differ from the
ATen path by a few ulps (tested in ``tests/core/test_kernels.py``).

The source is plain C++ (GCC/Clang vector extensions, no torch headers), compiled once per machine with
the system compiler (``$CXX``, else ``c++``; 10-25 seconds) into one library in a cache folder and loaded with
``ctypes``: no ninja, no Python-version-specific build, no ABI tie to torch. Nothing is ever downloaded.

**Instruction set, picked at run time.** The same sources build for three targets (``csrc/vec.h``): ``avx512``
(16-float vectors, 32 registers), ``avx2`` (AVX2 + FMA: 8-float vectors, register blocks sized for 16
registers) and ``portable`` (no ISA flags: 4-float vectors, SSE2 on x86-64, NEON on ARM). :func:`isa` is the
best one the CPU's flags allow, or ``$LEARNED_OPTIM_ISA`` (``avx512``, ``avx2`` or ``portable``; one the CPU
cannot execute is an error and leaves the ATen path). Only the selected one is built.

**The guard: a kernel runs only where it is measured faster.** Right after a build, each kernel is timed
against the ATen path of the same rule on the machine at hand (:data:`GUARD_ROWS` coordinates, one thread,
thread CPU time, best of :data:`GUARD_REPEATS` interleaved rounds): ``lstm_cell`` through a DM-LSTM step,
``elu`` on RNNProp's input activation, ``mlp`` through an MLP rule's statistics and update, ``adafac_mlp``
through an ``AdafacMLP`` step on a matrix of :data:`ADAFAC_GUARD_SCALE` times as many coordinates (above
its ``coordinate_block``: the large tensors its step time lives in; the kernel path then serves all sizes,
as it was also measured faster on small tensors, where both paths are mostly per-call overhead). The ratios
(ATen time / kernel time) are cached beside the library (``<library>.guard.json``; measured again under
another torch); a kernel whose ratio is below :data:`MIN_SPEEDUP` is not used, and the ATen path runs
instead. :func:`report` says which path
each rule takes and why; :func:`forced` runs the kernels whatever the guard says (tests, benchmarks).

* Cache: ``$LEARNED_OPTIM_CACHE`` or ``$XDG_CACHE_HOME/learned_optim`` (default ``~/.cache/learned_optim``),
  in ``kernels/learned_optim-<hash>.so``; the hash covers the sources, the compiler's version, the ISA's
  flags and the CPU's model and feature flags (the guard's measurements belong to the machine).
* ``LEARNED_OPTIM_KERNELS=0`` disables the kernels (the ATen path runs); so does :func:`set_enabled`.
* If there is no compiler or the build fails, a warning is logged once and the ATen path runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import inspect
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "available",
    "enabled",
    "set_enabled",
    "enabled_as",
    "lstm_cell_into",
    "elu_",
    "mlp_feature_mean_square",
    "mlp_update",
    "adafac_state_sumsq",
    "adafac_direction",
    "ADAFAC_MAX_MOMENTA",
    "ADAFAC_MAX_HIDDEN",
    "build_error",
    "isa",
    "supported_isas",
    "ISAS",
    "KERNELS",
    "RULE_KERNELS",
    "MIN_SPEEDUP",
    "forced",
    "uses",
    "serves",
    "guard",
    "report",
    "library_path",
    "vector_lanes",
]

logger = logging.getLogger(__name__)

_SOURCE_DIR = Path(__file__).with_name("csrc")
_FLAGS = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-fPIC", "-shared", "-std=gnu++17", "-pthread", "-Wno-psabi"]

#: The instruction-set targets, best first: compiler flags and the CPU flags (``/proc/cpuinfo``) they need.
ISAS: dict[str, tuple[list[str], frozenset[str]]] = {
    "avx512": (
        ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"],
        frozenset({"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx2", "fma", "f16c"}),
    ),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], frozenset({"avx2", "fma", "f16c"})),
    "portable": ([], frozenset()),
}

#: The kernels the guard measures, and the ones each family's step calls.
KERNELS = ("lstm_cell", "elu", "mlp", "adafac_mlp")
RULE_KERNELS: dict[str, tuple[str, ...]] = {
    "dm_lstm": ("lstm_cell",),
    "rnnprop": ("elu", "lstm_cell"),
    "mlp": ("mlp",),
    "adafac_mlp": ("adafac_mlp",),
}

#: A kernel is used only if the ATen path of the same rule takes at least this many times its time here.
MIN_SPEEDUP = 1.5
#: Coordinates per guard measurement, and interleaved rounds (kernel, ATen) of which the best counts.
GUARD_ROWS = 1 << 14
GUARD_REPEATS = 7
#: ``adafac_mlp`` is measured on a matrix of this many times :data:`GUARD_ROWS` coordinates (see the module
#: docstring): the per-tensor whole-tensor rule's step time is that of its large tensors.
ADAFAC_GUARD_SCALE = 8

_lock = threading.RLock()
_lib: ctypes.CDLL | None = None
_lib_path: Path | None = None
_isa: str | None = None
_guard: dict[str, Any] | None = None
_error: str | None = None
_loaded = False
_force = False
_enabled = os.environ.get("LEARNED_OPTIM_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


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


def _cache_dir() -> Path:
    root = os.environ.get("LEARNED_OPTIM_CACHE")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "learned_optim" / "kernels"


def _cpuinfo(prefixes: tuple[str, ...]) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(prefixes):
                return line.split(":", 1)[-1].strip()
    except OSError:
        pass
    return ""


def _cpu_flags() -> str:
    return _cpuinfo(("flags", "Features")) or platform.processor()


def _cpu_model() -> str:
    return _cpuinfo(("model name",)) or platform.processor() or platform.machine()


def supported_isas() -> list[str]:
    """The targets of :data:`ISAS` this CPU can execute, best first (``portable`` always)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["portable"]
    flags = set(_cpu_flags().split())
    return [name for name, (_, needs) in ISAS.items() if needs <= flags]


def _requested_isa() -> str:
    """``$LEARNED_OPTIM_ISA`` if set (validated against the CPU), else the best supported target."""
    supported = supported_isas()
    wanted = os.environ.get("LEARNED_OPTIM_ISA", "").strip().lower()
    if not wanted:
        return supported[0]
    if wanted not in ISAS:
        raise ValueError(f"LEARNED_OPTIM_ISA={wanted!r} is not one of {sorted(ISAS)}")
    if wanted not in supported:
        raise ValueError(f"LEARNED_OPTIM_ISA={wanted!r}, but this CPU only runs {supported}")
    return wanted


def isa() -> str | None:
    """The instruction set of the loaded kernels (builds them on the first call), ``None`` if unavailable."""
    return _isa if _library() is not None else None


def _compile(compiler: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        sources = [str(f) for f in sorted(_SOURCE_DIR.glob("*.cpp"))]
        subprocess.run(
            [compiler, *flags, f"-I{_SOURCE_DIR}", "-o", tmp, *sources],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        os.replace(tmp, target)  # atomic: concurrent builders never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> tuple[ctypes.CDLL, Path, str]:
    target_isa = _requested_isa()
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise RuntimeError(f"no C++ compiler found (looked for {os.environ.get('CXX', 'c++')!r}; set $CXX)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = b"\0".join(f.name.encode() + f.read_bytes() for f in sorted(_SOURCE_DIR.glob("*.[ch]*")))
    flags = _FLAGS + ISAS[target_isa][0]
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                version.encode(),
                " ".join(flags).encode(),
                platform.machine().encode(),
                _cpu_model().encode(),
                _cpu_flags().encode(),
            ]
        )
    ).hexdigest()[:16]
    target = _cache_dir() / f"learned_optim-{key}.so"
    try:
        if not target.exists():
            logger.info("learned_optim: compiling native kernels (%s) into %s", target_isa, target)
            _compile(compiler, flags, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", None) or err
        message = f"building the native kernels failed: {' '.join(flags)}: {str(detail).strip()[-400:]}"
        raise RuntimeError(message) from err
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn = lib.lo_lstm_cell_f32
    fn.argtypes = [i64, i64, i64, ptr, i64, ptr, i64, ptr, i64, ptr, ptr, ptr, i64, ptr, i64, ctypes.c_int]
    fn.restype = ctypes.c_int
    lib.lo_elu_f32.argtypes = [i64, ptr, ctypes.c_int]
    lib.lo_elu_f32.restype = None
    f32, c_int = ctypes.c_float, ctypes.c_int
    lib.lo_mlp_feature_sumsq_f32.argtypes = [i64, c_int, ptr, ptr, ptr, ptr, ptr, f32, ptr, c_int]
    lib.lo_mlp_feature_sumsq_f32.restype = c_int
    lib.lo_mlp_update_f32.argtypes = [
        i64,
        c_int,
        c_int,
        ptr,
        ptr,
        ptr,
        ptr,
        ptr,
        f32,
        ptr,
        ptr,
        ptr,
        ptr,
        f32,
        f32,
        ptr,
        ptr,
        ptr,
        c_int,
    ]
    lib.lo_mlp_update_f32.restype = c_int
    lib.lo_mlp_feature_sumsq_segments_f32.argtypes = [i64, ptr, *lib.lo_mlp_feature_sumsq_f32.argtypes[1:]]
    lib.lo_mlp_feature_sumsq_segments_f32.restype = c_int
    lib.lo_mlp_update_segments_f32.argtypes = [i64, ptr, *lib.lo_mlp_update_f32.argtypes[1:]]
    lib.lo_mlp_update_segments_f32.restype = c_int
    lib.lo_adafac_state_sumsq_f32.argtypes = [i64, i64, c_int, *[ptr] * 7, f32, f32, f32, ptr, ptr, ptr, c_int]
    lib.lo_adafac_state_sumsq_f32.restype = c_int
    lib.lo_adafac_direction_f32.argtypes = [
        i64,
        i64,
        c_int,
        *[ptr] * 4,
        f32,
        f32,
        ptr,
        ptr,
        c_int,
        c_int,
        *[ptr] * 6,
        f32,
        ptr,
        ptr,
        c_int,
    ]
    lib.lo_adafac_direction_f32.restype = c_int
    lib.lo_vector_lanes.argtypes = []
    lib.lo_vector_lanes.restype = c_int
    return lib, target, target_isa


def _library() -> ctypes.CDLL | None:
    global _lib, _lib_path, _isa, _error, _loaded, _guard
    if not _loaded:
        with _lock:
            if not _loaded:
                try:
                    _lib, _lib_path, _isa = _build()
                except Exception as err:  # any build/load problem means: use the ATen path
                    _error = f"{type(err).__name__}: {err}"
                    logger.warning("learned_optim: native kernels unavailable, using the ATen path (%s)", _error)
                _loaded = True  # before the guard: its measurement calls the kernels (under forced())
                if _lib is not None and _lib_path is not None:
                    _guard = _load_or_measure_guard(_lib_path.with_suffix(".guard.json"))
    return _lib


def _native() -> ctypes.CDLL | None:
    """The library when the kernels are switched on and built (builds it on the first call), else ``None``."""
    return _library() if _enabled else None


def _kernel(name: str) -> ctypes.CDLL | None:
    """The library if kernel ``name`` is to run: switched on, built, and measured faster (or :func:`forced`)."""
    lib = _native()
    if lib is None or not (_force or _guard_allows(name)):
        return None
    return lib


def _guard_allows(name: str) -> bool:
    ratio = None if _guard is None else _guard["ratios"].get(name)
    return ratio is not None and ratio >= MIN_SPEEDUP


def library_path() -> Path | None:
    """The loaded library's file (builds it on the first call); its guard record is ``<stem>.guard.json``."""
    return _lib_path if _library() is not None else None


def vector_lanes() -> int | None:
    """Floats per vector of the loaded build (16 AVX-512, 8 AVX2, 4 portable), ``None`` if unavailable."""
    lib = _library()
    return None if lib is None else int(lib.lo_vector_lanes())


def uses(name: str) -> bool:
    """Whether kernel ``name`` (one of :data:`KERNELS`) runs where it applies (builds the kernels if needed)."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; kernels: {list(KERNELS)}")
    return _kernel(name) is not None


def serves(family: str) -> bool:
    """Whether any native kernel runs in the step of net family ``family`` (false for families without one)."""
    return any(uses(k) for k in RULE_KERNELS.get(family, ()))


def guard() -> dict[str, Any] | None:
    """The guard's record for the loaded library (ISA, CPU, ratios ATen / kernel, times), ``None`` if none."""
    _library()
    return None if _guard is None else dict(_guard)


def report() -> str:
    """Which path each net family's step takes on this machine, and why (ISA, measured ratio, threshold)."""
    from .nets.base import FAMILIES  # lazy: the nets import this module

    lib = _library()
    lines = [f"learned_optim native kernels on {_cpu_model()} (CPU runs {', '.join(supported_isas())})"]
    if not _enabled:
        lines.append("  switched off (LEARNED_OPTIM_KERNELS=0 or set_enabled(False)): every family runs on ATen")
    elif lib is None or _guard is None:
        lines.append(f"  unavailable ({_error or 'no guard measurement'}): every family runs on ATen")
    else:
        lines.append(
            f"  library {_lib_path} (ISA {_isa}, {vector_lanes()}-float vectors); guard: a kernel runs "
            f"if ATen takes >= {MIN_SPEEDUP}x its time ({_guard['rows']} coordinates, 1 thread, measured "
            f"{_guard['measured']}, load {_guard['load']}){'; forced on' if _force else ''}"
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


# ------------------------------------------------------------------------------------ the guard
def _best_of(candidates: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Best thread CPU time (seconds) of each candidate over GUARD_REPEATS interleaved rounds, after a warm-up."""
    best = dict.fromkeys(candidates, float("inf"))
    for f in candidates.values():
        f()
    for _ in range(GUARD_REPEATS):
        for name, f in candidates.items():
            start = time.thread_time()
            f()
            best[name] = min(best[name], time.thread_time() - start)
    return best


def _guard_workloads(n: int) -> dict[str, Callable[[], object]]:
    """One call of each kernel's rule code (the same call runs the kernel or ATen, by the switches)."""
    from .nets import DMLSTM, AdafacMLP, MLPUpdate  # lazy: the nets import this module

    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-6, -1, (n,), generator=gen)
    param = torch.randn(n, generator=gen)
    step = torch.tensor(10.0)
    torch.manual_seed(0)
    dm = DMLSTM().requires_grad_(False)
    dm_state = {"lstm": torch.randn(n, *dm.state_shapes()["lstm"], generator=gen) * 0.1}
    dm_out = {"lstm": torch.empty_like(dm_state["lstm"])}
    mlp = MLPUpdate().requires_grad_(False)
    d = mlp.state_shapes()["m"][0]
    mlp_state = {"m": torch.randn(n, d, generator=gen) * 1e-3, "v": torch.rand(n, d, generator=gen) * 1e-5}
    mlp_out = {k: torch.empty_like(v) for k, v in mlp_state.items()}
    z = torch.randn(n, 20, generator=gen)
    z_work = torch.empty_like(z)
    # adafac_mlp on a matrix of ADAFAC_GUARD_SCALE * n coordinates: above AdafacMLP.coordinate_block, the
    # regime its step time lives in, where the kernel replaces the ATen blocked path
    adafac = AdafacMLP().requires_grad_(False)
    adafac_shape = (ADAFAC_GUARD_SCALE * n // 512, 512)
    adafac_n = adafac_shape[0] * adafac_shape[1]
    adafac_grad, adafac_param = torch.randn(adafac_n, generator=gen) * 1e-3, torch.randn(adafac_n, generator=gen)
    adafac_state = adafac.init_state(adafac_n, shape=adafac_shape)
    for value in adafac_state.values():
        value.copy_(torch.rand(value.shape, generator=gen) * 1e-6)
    adafac_out = {k: torch.empty_like(v) for k, v in adafac_state.items()}

    def lstm_cell() -> object:
        return dm(grad, param, dm_state, step, None, out_state=dm_out)

    def elu() -> object:
        return elu_(z_work.copy_(z))

    def mlp_rule() -> object:
        return mlp(grad, param, mlp_state, step, mlp.tensor_stats(grad, param, mlp_state, step), out_state=mlp_out)

    def adafac_rule() -> object:
        return adafac(adafac_grad, adafac_param, adafac_state, step, out_state=adafac_out, shape=adafac_shape)

    return {"lstm_cell": lstm_cell, "elu": elu, "mlp": mlp_rule, "adafac_mlp": adafac_rule}


def _measure_guard() -> dict[str, Any]:
    """Time every kernel against the ATen path of its rule (see the module docstring)."""
    global _force, _enabled
    threads = torch.get_num_threads()
    aten_ms, kernel_ms = {}, {}
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            for name, work in _guard_workloads(GUARD_ROWS).items():
                previous_force, previous_enabled = _force, _enabled

                def on(work: Callable[[], object] = work) -> None:
                    global _force, _enabled
                    _force, _enabled = True, True
                    work()

                def off(work: Callable[[], object] = work) -> None:
                    global _force, _enabled
                    _force, _enabled = False, False
                    work()

                try:
                    best = _best_of({"kernel": on, "aten": off})
                finally:
                    _force, _enabled = previous_force, previous_enabled
                kernel_ms[name], aten_ms[name] = best["kernel"] * 1e3, best["aten"] * 1e3
    finally:
        torch.set_num_threads(threads)
    return {
        "isa": _isa,
        "cpu": _cpu_model(),
        "rows": GUARD_ROWS,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load": " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?",
        "torch": torch.__version__,
        "workloads": _guard_workloads_key(),
        "ratios": {k: aten_ms[k] / max(kernel_ms[k], 1e-9) for k in KERNELS},
        "aten_ms": aten_ms,
        "kernel_ms": kernel_ms,
    }


def _guard_workloads_key() -> str:
    """Hash of what the guard times (the workloads' source and size): a cached record measured on other
    workloads is measured again, as one measured against another build or another torch is."""
    source = inspect.getsource(_guard_workloads) + repr((GUARD_ROWS, ADAFAC_GUARD_SCALE))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _valid_guard(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and record.get("isa") == _isa
        and record.get("torch") == torch.__version__  # another torch: another ATen to compare with
        and record.get("workloads") == _guard_workloads_key()
        and all(
            isinstance(record.get(part), dict) and all(isinstance(record[part].get(k), (int, float)) for k in KERNELS)
            for part in ("ratios", "aten_ms", "kernel_ms")
        )
    )


def _load_or_measure_guard(path: Path) -> dict[str, Any] | None:
    """The guard record cached at ``path``, or a fresh measurement written there (atomically)."""
    try:
        record = json.loads(path.read_text())
        if _valid_guard(record):
            return record
    except (OSError, ValueError):
        pass
    try:
        record = _measure_guard()
    except Exception as err:  # no measurement: the kernels stay unused (the ATen path is always correct)
        logger.warning("learned_optim: measuring the native kernels failed, using the ATen path (%s)", err)
        return None
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)
    slower = [k for k in KERNELS if record["ratios"][k] < MIN_SPEEDUP]
    if slower:
        logger.info("learned_optim: kernels %s are not %sx faster than ATen here; ATen runs them", slower, MIN_SPEEDUP)
    return record


def available() -> bool:
    """Whether the kernels are enabled and built (builds them on the first call)."""
    return _native() is not None


def build_error() -> str | None:
    """Why the kernels could not be built (``None`` if they were, or were never tried)."""
    return _error


def _threads(n: int) -> int:
    return torch.get_num_threads() if n >= 4096 else 1


def _cpu_f32(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def _flat_f32(*tensors: Tensor) -> bool:
    return _cpu_f32(*tensors) and all(t.is_contiguous() for t in tensors)


def _rows_ok(t: Tensor, n: int) -> bool:
    return t.dim() == 2 and t.shape[0] == n and _cpu_f32(t) and (t.stride(1) == 1 or t.shape[1] == 1)


def lstm_cell_into(x: Tensor, h: Tensor, c: Tensor, weight: Tensor, bias: Tensor, h_out: Tensor, c_out: Tensor) -> bool:
    r"""Run the fused LSTM cell into ``h_out, c_out`` if the kernel applies; return whether it ran.

    ``weight`` is ``[W_ih, W_hh]`` ``(4H, I + H)`` and ``bias`` ``b_ih + b_hh`` ``(4H,)``, both with the
    ``g``-gate rows already doubled (see :func:`learned_optim.nets.cells.lstm_cell`). Applies to float32
    CPU tensors whose rows are contiguous (any row stride) when no autograd graph is being recorded;
    the outputs must not overlap the inputs of *other* rows. Uses ``torch.get_num_threads()`` threads.
    """
    n, hidden = h.shape[0], h.shape[-1]
    if not (all(_rows_ok(t, n) for t in (x, h, c, h_out, c_out)) and _cpu_f32(weight, bias)):
        return False
    lib = _kernel("lstm_cell")
    if lib is None:
        return False
    weight, bias = weight.contiguous(), bias.contiguous()
    threads = _threads(n)
    status = lib.lo_lstm_cell_f32(
        n,
        x.shape[1],
        hidden,
        x.data_ptr(),
        x.stride(0),
        h.data_ptr(),
        h.stride(0),
        c.data_ptr(),
        c.stride(0),
        weight.data_ptr(),
        bias.data_ptr(),
        h_out.data_ptr(),
        h_out.stride(0),
        c_out.data_ptr(),
        c_out.stride(0),
        threads,
    )
    return status == 0


def elu_(z: Tensor) -> Tensor:
    r"""ELU (:math:`\alpha = 1`) in place: :math:`z` for :math:`z > 0`, else :math:`e^z - 1`.

    The native kernel for contiguous float32 CPU tensors, ``torch.nn.functional.elu_`` otherwise
    (or when the kernels are off or unavailable). For inference only: records no autograd graph.
    """
    lib = _kernel("elu") if _flat_f32(z) else None
    if lib is None:
        return torch.nn.functional.elu_(z)
    lib.lo_elu_f32(z.numel(), z.data_ptr(), _threads(z.numel()))
    return z


def _offsets(sizes: tuple[int, ...] | None, n: int) -> Tensor:
    """int64 segment offsets ``[0, n_1, n_1 + n_2, ..., n]`` (one segment of ``n`` rows when ``sizes`` is None)."""
    if sizes is None:
        return torch.tensor([0, n], dtype=torch.int64)
    return torch.tensor([0, *sizes], dtype=torch.int64).cumsum_(0)


def mlp_feature_mean_square(
    grad: Tensor,
    param: Tensor,
    m: Tensor,
    v: Tensor,
    decay: Tensor,
    eps: float,
    sizes: tuple[int, ...] | None = None,
) -> Tensor | None:
    r"""Mean over coordinates of each MLP feature's square (``MLPUpdate.tensor_stats``), or ``None``.

    ``grad, param`` ``(n,)``, ``m, v`` ``(n, D)`` the moments *before* this step's EMA update, ``decay``
    ``(D,)``. ``sizes``: the rows are that many tensors packed one after the other (``sum(sizes) <= n``;
    rows past the last are ignored); the result is then ``(len(sizes), 2 + 4D)``, each row the bits the call
    on that tensor alone gives. ``None`` when the kernel does not apply (not contiguous float32 CPU,
    ``D > 8``, kernels off, unavailable or not faster here); the caller then computes it with ATen.
    """
    lib = _kernel("mlp") if _flat_f32(grad, param, m, v, decay) and m.dim() == 2 and grad.numel() > 0 else None
    if lib is None:
        return None
    n, d = m.shape
    offsets = _offsets(sizes, n)
    k = offsets.numel() - 1
    if int(offsets[-1]) > n or (sizes is not None and min(sizes) < 1):
        raise ValueError(f"segment sizes {sizes} do not fit {n} rows (each must be >= 1)")
    out = torch.empty(k, 2 + 4 * d, dtype=torch.float64)
    status = lib.lo_mlp_feature_sumsq_segments_f32(
        k,
        offsets.data_ptr(),
        d,
        grad.data_ptr(),
        param.data_ptr(),
        m.data_ptr(),
        v.data_ptr(),
        decay.data_ptr(),
        eps,
        out.data_ptr(),
        _threads(n),
    )
    if status:
        return None
    means = (out / offsets.diff().unsqueeze(1)).to(torch.float32)
    return means if sizes is not None else means[0]


def mlp_update(
    grad: Tensor,
    param: Tensor,
    m: Tensor,
    v: Tensor,
    decay: Tensor,
    eps: float,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    magnitude_scale: float,
    step_scale: float,
    out: Mapping[str, Tensor] | None = None,
    sizes: tuple[int, ...] | None = None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    r"""The MLP rule's ``(delta, m', v')`` for one hidden layer (``MLPUpdate.forward``), or ``None``.

    ``w1`` ``(H, 2 + 4D)`` with the feature normalisation folded into its columns and ``b1`` ``(H,)``
    with the time features folded in; ``w2`` ``(2, H)``, ``b2`` ``(2,)``. ``out``: optional ``{"m", "v"}``
    tensors to write ``m', v'`` into (they may be ``m, v`` themselves). ``sizes``: the rows are that many
    tensors packed one after the other, and ``w1`` is ``(len(sizes), H, 2 + 4D)``, one per tensor; rows past
    the last tensor are left unset. ``None`` when the kernel does not apply; the caller then computes it
    with ATen.
    """
    lib = _kernel("mlp") if _flat_f32(grad, param, m, v, decay) and m.dim() == 2 else None
    if lib is None:
        return None
    n, d = m.shape
    offsets = _offsets(sizes, n)
    k = offsets.numel() - 1
    if int(offsets[-1]) > n or w1.dim() != (2 if sizes is None else 3) or (sizes is not None and w1.shape[0] != k):
        raise ValueError(f"mlp_update: segment sizes {sizes} and first-layer weights {tuple(w1.shape)} do not match")
    w1, b1, w2, b2 = (t.detach().to(torch.float32).contiguous() for t in (w1, b1, w2, b2))
    delta = torch.empty_like(grad)
    m_new, v_new = (
        (out["m"], out["v"])
        if out is not None and _flat_f32(out["m"], out["v"])
        else (torch.empty_like(m), torch.empty_like(v))
    )
    status = lib.lo_mlp_update_segments_f32(
        k,
        offsets.data_ptr(),
        d,
        w1.shape[-2],
        grad.data_ptr(),
        param.data_ptr(),
        m.data_ptr(),
        v.data_ptr(),
        decay.data_ptr(),
        eps,
        w1.data_ptr(),
        b1.data_ptr(),
        w2.data_ptr(),
        b2.data_ptr(),
        magnitude_scale,
        step_scale,
        delta.data_ptr(),
        m_new.data_ptr(),
        v_new.data_ptr(),
        _threads(n),
    )
    return None if status else (delta, m_new, v_new)


#: What the ``adafac_mlp`` kernel handles (``csrc/adafac.cpp``): momenta :math:`J` (``4 + 4J`` dense
#: features) and the MLP's hidden size; beyond them its wrappers return ``None`` (the ATen path runs).
ADAFAC_MAX_MOMENTA = 8
ADAFAC_MAX_HIDDEN = 32


def _pointers(tensors: Sequence[Tensor]) -> ctypes.Array[ctypes.c_void_p]:
    """The tensors' data pointers as a C ``float* const*`` array."""
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def _adafac_view(
    grad: Tensor, vectors: Sequence[Tensor], row_factor: Tensor, col_factor: Tensor, j: int
) -> tuple[int, int] | None:
    """The ``(rows, cols)`` view of an ``adafac_mlp`` kernel call (``ValueError`` on shapes that do not fit),
    or ``None`` when the kernel does not apply to these tensors (dtype, device, layout, ``J``)."""
    n = grad.numel()
    if row_factor.dim() != 2 or col_factor.dim() != 2 or row_factor.shape[0] != j or col_factor.shape[0] != j:
        raise ValueError(
            f"adafac kernel: row_factor {tuple(row_factor.shape)} and col_factor {tuple(col_factor.shape)} "
            f"must be (J, rows) and (J, cols) with J = {j} momenta"
        )
    rows, cols = row_factor.shape[1], col_factor.shape[1]
    if rows * cols != n or any(t.dim() != 1 or t.numel() != n for t in (grad, *vectors)):
        shapes = [tuple(t.shape) for t in (grad, *vectors)]
        raise ValueError(f"adafac kernel: vectors {shapes} must all be ({n},) and rows * cols = {rows} * {cols} = {n}")
    if not (_flat_f32(grad, *vectors, row_factor, col_factor) and 1 <= j <= ADAFAC_MAX_MOMENTA and n > 0):
        return None
    return rows, cols


def adafac_state_sumsq(
    grad: Tensor,
    param: Tensor,
    m: Sequence[Tensor],
    v: Tensor,
    m_out: Sequence[Tensor],
    v_out: Tensor,
    beta: Sequence[float],
    beta_v: float,
    v_correction: float,
    eps: float,
    row_factor: Tensor,
    col_factor: Tensor,
) -> Tensor | None:
    r"""Pass 1 of ``AdafacMLP``'s inference step (the new state and the features' sums of squares), or ``None``.

    The tensor is its ``(rows, cols)`` matrix view, flat in row-major order: ``grad``, ``param``, ``v`` and
    the :math:`J` momenta ``m`` are ``(rows * cols,)`` vectors. Writes

    .. math:: m_j' = m_j + (1-\beta_j)(g - m_j),\qquad v' = \beta_v v + (1-\beta_v)\,g^2

    into ``m_out``, ``v_out`` (they may be ``m``, ``v`` themselves: in place) and returns the ``(4 + 4J,)``
    float64 sums over the tensor of the squares of the raw dense features (the rows of
    ``AdafacMLP.features``' blocks, without its ``scale``)

    .. math:: u = \big[g,\ \theta,\ m_j',\ v',\ m_j' s,\ s,\ g\,\phi_k,\ m_k' \phi_k\big],\qquad
        s = (k_v v' + \epsilon)^{-1/2},\qquad \phi_k(r, c) = a_{kr}\, e_{kc}

    with :math:`k_v` = ``v_correction`` (:math:`1/(1-\beta_v^t)`), ``row_factor`` :math:`a` ``(J, rows)`` and
    ``col_factor`` :math:`e` ``(J, cols)`` (the factored preconditioner's factors). The sums do not depend on
    the thread count. ``None`` when the kernel does not apply (not all contiguous float32 CPU tensors,
    :math:`J` above :data:`ADAFAC_MAX_MOMENTA`, kernels off, unavailable or not faster here): the caller then
    computes it with ATen.
    """
    j = len(beta)
    if len(m) != j or len(m_out) != j:
        raise ValueError(f"adafac_state_sumsq: {len(m)} momenta and {len(m_out)} outputs for {j} decays")
    view = _adafac_view(grad, [param, *m, v, *m_out, v_out], row_factor, col_factor, j)
    lib = _kernel("adafac_mlp") if view is not None else None
    if lib is None or view is None:
        return None
    rows, cols = view
    out = torch.empty(4 + 4 * j, dtype=torch.float64)
    status = lib.lo_adafac_state_sumsq_f32(
        rows,
        cols,
        j,
        grad.data_ptr(),
        param.data_ptr(),
        _pointers(m),
        v.data_ptr(),
        _pointers(m_out),
        v_out.data_ptr(),
        (ctypes.c_float * j)(*beta),
        beta_v,
        v_correction,
        eps,
        row_factor.data_ptr(),
        col_factor.data_ptr(),
        out.data_ptr(),
        _threads(grad.numel()),
    )
    return None if status else out


def adafac_direction(
    grad: Tensor,
    param: Tensor,
    m: Sequence[Tensor],
    v: Tensor,
    v_correction: float,
    eps: float,
    row_factor: Tensor,
    col_factor: Tensor,
    weight: Tensor,
    row_term: Tensor,
    col_term: Tensor,
    layers: Sequence[tuple[Tensor, Tensor]],
    out: Tensor | None = None,
) -> tuple[Tensor, float] | None:
    r"""Pass 2 of ``AdafacMLP``'s inference step (the raw direction and its sum of squares), or ``None``.

    From the *new* state ``m``, ``v`` (as :func:`adafac_state_sumsq` wrote it) the same raw features
    :math:`u` (``4 + 4J`` per coordinate), then the MLP per coordinate :math:`(r, c)` of the
    ``(rows, cols)`` view:

    .. math:: h_1 = \mathrm{relu}\big(W u + t^{\mathrm{row}}_{:, r} + t^{\mathrm{col}}_{:, c}\big),\quad
        h_l = \mathrm{relu}(W_l h_{l-1} + b_l),\quad d = w_o^\top h + b_o

    with ``weight`` :math:`W` ``(H, 4 + 4J)`` (the per-tensor feature normalisation folded into its
    columns), ``row_term`` ``(H, rows)`` and ``col_term`` ``(H, cols)`` (the first layer's bias and its
    row and column features: ``AdafacMLP._first_layer``), and ``layers`` the ``(weight, bias)`` of the
    MLP's later layers: hidden ``(H, H), (H,)``, then the output ``(1, H), (1,)``. Writes :math:`d` into
    ``out`` (a new vector if ``None``) and returns ``(d, sum of d^2)`` (float64 sum, independent of the thread
    count). ``None`` when the kernel does not apply (as :func:`adafac_state_sumsq`, or ``H`` above
    :data:`ADAFAC_MAX_HIDDEN`): the caller then computes it with ATen.
    """
    j = len(m)
    direction = torch.empty_like(grad) if out is None else out
    view = _adafac_view(grad, [param, *m, v, direction], row_factor, col_factor, j)
    hidden = weight.shape[0]
    *inner, (w_out, b_out) = layers
    if weight.shape != (hidden, 4 + 4 * j) or row_term.shape != (hidden, row_factor.shape[1]):
        raise ValueError(f"adafac_direction: weight {tuple(weight.shape)}, row_term {tuple(row_term.shape)} do not fit")
    if col_term.shape != (hidden, col_factor.shape[1]) or w_out.shape != (1, hidden) or b_out.shape != (1,):
        raise ValueError(f"adafac_direction: col_term {tuple(col_term.shape)} or output layer {tuple(w_out.shape)}")
    if any(w.shape != (hidden, hidden) or b.shape != (hidden,) for w, b in inner):
        raise ValueError(f"adafac_direction: hidden layers must be ({hidden}, {hidden}) with ({hidden},) biases")
    supported = view is not None and hidden <= ADAFAC_MAX_HIDDEN and _cpu_f32(weight, row_term, col_term)
    lib = _kernel("adafac_mlp") if supported else None
    if lib is None or view is None:
        return None
    rows, cols = view

    def flat(tensors: list[Tensor]) -> Tensor:
        return torch.cat([t.detach().reshape(-1) for t in tensors]).float() if tensors else grad.new_zeros(1)

    weight, row_term, col_term = (t.detach().float().contiguous() for t in (weight, row_term, col_term))
    inner_w, inner_b, w_out = flat([w for w, _ in inner]), flat([b for _, b in inner]), flat([w_out])
    sumsq = ctypes.c_double()
    status = lib.lo_adafac_direction_f32(
        rows,
        cols,
        j,
        grad.data_ptr(),
        param.data_ptr(),
        _pointers(m),
        v.data_ptr(),
        v_correction,
        eps,
        row_factor.data_ptr(),
        col_factor.data_ptr(),
        hidden,
        len(layers),
        weight.data_ptr(),
        row_term.data_ptr(),
        col_term.data_ptr(),
        inner_w.data_ptr(),
        inner_b.data_ptr(),
        w_out.data_ptr(),
        float(b_out),
        direction.data_ptr(),
        ctypes.byref(sumsq),
        _threads(grad.numel()),
    )
    return None if status else (direction, sumsq.value)
