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
  (rows x 22) feature matrix built by ~30 ATen ops, twice (statistics, then update).

Same math; their ``exp`` is a polynomial accurate to about 1 float32 ulp, so results differ from the
ATen path by a few ulps (tested in ``tests/test_kernels.py``).

The source is plain C++ (GCC/Clang vector extensions, no torch headers), compiled once per machine with
the system compiler (``$CXX``, else ``c++``; a few seconds) into one library in a cache folder and loaded
with ``ctypes``: no ninja, no Python-version-specific build, no ABI tie to torch. Nothing is ever downloaded.

* Cache: ``$LEARNED_OPTIM_CACHE`` or ``$XDG_CACHE_HOME/learned_optim`` (default ``~/.cache/learned_optim``),
  in ``kernels/learned_optim-<hash>.so``; the hash covers the sources, the compiler's version, the flags
  and the CPU's feature flags (the build uses ``-march=native``).
* ``LEARNED_OPTIM_KERNELS=0`` disables the kernels (the ATen path runs); so does :func:`set_enabled`.
* If there is no compiler or the build fails, a warning is logged once and the ATen path runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

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
    "build_error",
]

logger = logging.getLogger(__name__)

_SOURCE_DIR = Path(__file__).with_name("csrc")
_FLAGS = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-fPIC", "-shared", "-std=gnu++17", "-pthread", "-Wno-psabi"]
_NATIVE = ["-march=native"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_loaded = False
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


def _cache_dir() -> Path:
    root = os.environ.get("LEARNED_OPTIM_CACHE")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "learned_optim" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


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


def _build() -> ctypes.CDLL:
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise RuntimeError(f"no C++ compiler found (looked for {os.environ.get('CXX', 'c++')!r}; set $CXX)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = b"\0".join(f.name.encode() + f.read_bytes() for f in sorted(_SOURCE_DIR.glob("*.[ch]*")))
    errors = []
    for flags in (_FLAGS + _NATIVE, _FLAGS):  # -march=native is not known to every compiler
        key = hashlib.sha256(
            b"\0".join(
                [source, version.encode(), " ".join(flags).encode(), platform.machine().encode(), _cpu_flags().encode()]
            )
        ).hexdigest()[:16]
        target = _cache_dir() / f"learned_optim-{key}.so"
        try:
            if not target.exists():
                logger.info("learned_optim: compiling native kernels into %s", target)
                _compile(compiler, flags, target)
            lib = ctypes.CDLL(str(target))
            break
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", None) or err
            errors.append(f"{' '.join(flags)}: {str(detail).strip()[-400:]}")
    else:
        raise RuntimeError("building the native kernels failed: " + " | ".join(errors))
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
    return lib


def _library() -> ctypes.CDLL | None:
    global _lib, _error, _loaded
    if not _loaded:
        with _lock:
            if not _loaded:
                try:
                    _lib = _build()
                except Exception as err:  # any build/load problem means: use the ATen path
                    _error = f"{type(err).__name__}: {err}"
                    logger.warning("learned_optim: native kernels unavailable, using the ATen path (%s)", _error)
                _loaded = True
    return _lib


def _native() -> ctypes.CDLL | None:
    """The library when the kernels are switched on and built (builds it on the first call), else ``None``."""
    return _library() if _enabled else None


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
    lib = _native()
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
    lib = _native() if _flat_f32(z) else None
    if lib is None:
        return torch.nn.functional.elu_(z)
    lib.lo_elu_f32(z.numel(), z.data_ptr(), _threads(z.numel()))
    return z


def mlp_feature_mean_square(
    grad: Tensor, param: Tensor, m: Tensor, v: Tensor, decay: Tensor, eps: float
) -> Tensor | None:
    r"""Mean over coordinates of each MLP feature's square (``MLPUpdate.tensor_stats``), or ``None``.

    ``grad, param`` ``(n,)``, ``m, v`` ``(n, D)`` the moments *before* this step's EMA update, ``decay``
    ``(D,)``. ``None`` when the kernel does not apply (not contiguous float32 CPU, ``D > 8``, kernels
    off or unavailable); the caller then computes it with ATen.
    """
    lib = _native() if _flat_f32(grad, param, m, v, decay) and m.dim() == 2 and grad.numel() > 0 else None
    if lib is None:
        return None
    n, d = m.shape
    out = torch.empty(2 + 4 * d, dtype=torch.float64)
    status = lib.lo_mlp_feature_sumsq_f32(
        n,
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
    return None if status else (out / n).to(torch.float32)


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
) -> tuple[Tensor, Tensor, Tensor] | None:
    r"""The MLP rule's ``(delta, m', v')`` for one hidden layer (``MLPUpdate.forward``), or ``None``.

    ``w1`` ``(H, 2 + 4D)`` with the feature normalisation folded into its columns and ``b1`` ``(H,)``
    with the time features folded in; ``w2`` ``(2, H)``, ``b2`` ``(2,)``. ``out``: optional ``{"m", "v"}``
    tensors to write ``m', v'`` into (they may be ``m, v`` themselves). ``None`` when the kernel does not
    apply; the caller then computes it with ATen.
    """
    lib = _native() if _flat_f32(grad, param, m, v, decay) and m.dim() == 2 else None
    if lib is None:
        return None
    n, d = m.shape
    w1, b1, w2, b2 = (t.detach().to(torch.float32).contiguous() for t in (w1, b1, w2, b2))
    delta = torch.empty_like(grad)
    m_new, v_new = (
        (out["m"], out["v"])
        if out is not None and _flat_f32(out["m"], out["v"])
        else (torch.empty_like(m), torch.empty_like(v))
    )
    status = lib.lo_mlp_update_f32(
        n,
        d,
        w1.shape[0],
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
