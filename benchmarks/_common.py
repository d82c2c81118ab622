"""Shared helpers of the performance benchmarks: interleaved timing, machine load, matmul throughput.

Timing rules (the machine these numbers come from is shared and noisy):

* every figure that is compared is measured in the same run, round-robin (candidate A, B, C, A, B, C,
  ...), so a load change hits all candidates alike;
* the primary figure is the *CPU time* of the process (``time.process_time``), best of the repeats: on
  a machine whose cores are shared with other jobs it counts the time this process actually ran,
  where wall time also counts time spent waiting for a core. Median wall time is printed alongside;
* the load average and the thread count are printed with every table;
* on a CUDA device (``device="cuda"``) the device is synchronised before and after every timed call and
  the primary figure is the *wall time* of the call: the process's CPU time would count only the launches.
"""

from __future__ import annotations

import dataclasses
import os
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from learned_optim.kernels import cpu_flags, cpu_model

__all__ = [
    "Timing",
    "measure",
    "clock_name",
    "machine_header",
    "matmul_gflops",
    "GemmRecorder",
    "gemm_only_seconds",
    "table",
    "peak_rss_kib",
    "reset_peak_rss",
]


@dataclasses.dataclass
class Timing:
    best: float  # seconds, best of the repeats: process CPU time on CPU, synchronised wall time on CUDA
    median: float  # the same clock's median
    wall_median: float
    repeats: int

    def fmt(self, scale: float = 1e3, unit: str = "ms") -> str:
        return f"{self.best * scale:.3g} {unit} (wall {self.wall_median * scale:.3g})"


def on_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def clock_name(device: str | torch.device = "cpu") -> str:
    """What :attr:`Timing.best` counts on ``device``."""
    return "wall, synchronised" if on_cuda(device) else "CPU"


def measure(
    candidates: Mapping[str, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    device: str | torch.device = "cpu",
) -> dict[str, Timing]:
    """Time every candidate ``repeats`` times, round-robin, after ``warmup`` untimed calls each.

    On CUDA every call is bracketed by ``torch.cuda.synchronize`` and timed by the wall clock."""
    cuda = on_cuda(device)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for f in candidates.values():
        for _ in range(warmup):
            f()
    primary: dict[str, list[float]] = {k: [] for k in candidates}
    wall: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(repeats):
        for name, f in candidates.items():
            sync()
            w0, c0 = time.perf_counter(), time.process_time()
            f()
            sync()
            w1, c1 = time.perf_counter(), time.process_time()
            primary[name].append(w1 - w0 if cuda else c1 - c0)
            wall[name].append(w1 - w0)
    return {
        k: Timing(min(primary[k]), statistics.median(primary[k]), statistics.median(wall[k]), repeats)
        for k in candidates
    }


def machine_header(device: str | torch.device = "cpu") -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?", "?", "?")
    gpu = ""
    if on_cuda(device):
        props = torch.cuda.get_device_properties(device)
        gpu = f"GPU {props.name} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}), "
    return (
        f"torch {torch.__version__}, {gpu}{cpu_model()}, {os.cpu_count()} cores visible, "
        f"torch threads {torch.get_num_threads()}, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        f"(1/5/15 min)"
    )


def cpu_flags_line() -> str:
    """The CPU's model name and the flags that decide the fast paths (AVX-512, AMX, bfloat16), as ``lscpu`` shows them
    (both read from ``/proc/cpuinfo`` by :mod:`learned_optim.kernels`)."""
    flags = [f for f in cpu_flags().split() if f.startswith(("avx", "amx", "fma"))]
    return f"lscpu: {cpu_model()}; flags {' '.join(flags)}"


def matmul_gflops(n: int = 1024, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """Measured float32 GEMM throughput (GFLOP/s) of an ``n x n x n`` product on ``device``: the compute limit."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    t = measure({"mm": lambda: torch.mm(a, b)}, repeats=repeats, device=device)["mm"].best
    return 2 * n**3 / t / 1e9


class GemmRecorder(TorchDispatchMode):
    """Records ``(M, K, N)`` of every ``mm``/``addmm`` (also in place and ``out=``) dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func in (aten.mm.default, aten.mm.out, aten.addmm.default, aten.addmm.out, aten.addmm_.default):
            a, b = (args[0], args[1]) if func in (aten.mm.default, aten.mm.out) else (args[1], args[2])
            self.shapes.append((a.shape[0], a.shape[1], b.shape[1]))
        return func(*args, **kwargs)

    @property
    def flops(self) -> int:
        return sum(2 * m * k * n for m, k, n in self.shapes)


def gemm_only_seconds(
    shapes: Sequence[tuple[int, int, int]], calls: int, repeats: int = 3, device: str | torch.device = "cpu"
) -> float:
    """Seconds (:func:`measure`'s clock) of just the GEMMs of ``calls`` chunks of the given shapes (random data)."""
    mats = [
        (torch.randn(m, k, device=device), torch.randn(k, n, device=device), torch.empty(m, n, device=device))
        for m, k, n in shapes
    ]

    def run() -> None:
        for _ in range(calls):
            for a, b, out in mats:
                torch.mm(a, b, out=out)

    return measure({"gemm": run}, repeats=repeats, device=device)["gemm"].best


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _status(key: str) -> int:
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS counter of this process (Linux) and return the current RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status("VmRSS")


def peak_rss_kib() -> int:
    """Peak RSS (KiB) since the last :func:`reset_peak_rss`."""
    return _status("VmHWM")
