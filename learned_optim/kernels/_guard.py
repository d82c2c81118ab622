"""The guard: each kernel timed against the ATen path of its rule on the machine at hand, cached beside the
library (see :mod:`learned_optim.kernels`)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .._files import write_atomically
from ._build import cpu_model

logger = logging.getLogger("learned_optim.kernels")

#: Coordinates per guard measurement, and interleaved rounds (kernel, ATen) of which the best counts.
GUARD_ROWS = 1 << 14
GUARD_REPEATS = 7
#: ``adafac_mlp`` is measured on a matrix of this many times :data:`GUARD_ROWS` coordinates (see the module
#: docstring): the per-tensor whole-tensor rule's step time is that of its large tensors.
ADAFAC_GUARD_SCALE = 8

#: The kernels the guard measures.
KERNELS = ("lstm_cell", "elu", "mlp", "adafac_mlp")
#: A kernel is used only if the ATen path of the same rule takes at least this many times its time here.
MIN_SPEEDUP = 1.5
#: A ratio within this factor of :data:`MIN_SPEEDUP` is a close call: it is measured :data:`CLOSE_CALL_ROUNDS` times
#: in all and the median round counts. (On a shared machine the ATen time of one workload moved 5.8-8.5 ms between
#: back-to-back measurements, so that a verdict measured once near the bar could go either way, and it is cached.)
CLOSE_CALL_BAND = 1.2
CLOSE_CALL_ROUNDS = 5


def machine_load() -> tuple[float, int] | None:
    """The 1-minute load average and the number of CPUs this process may run on; ``None`` where the OS does not
    tell (no ``os.getloadavg``)."""
    if not hasattr(os, "getloadavg"):
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return os.getloadavg()[0], cpus


def busy() -> bool:
    """Whether the machine is busy for a measurement: a 1-minute load average of at least the number of CPUs this
    process may run on (a runnable thread for every core, so the guard's thread shares one). A record measured busy
    counts for now and is measured again by the first process that finds the machine calm (:func:`load_or_measure`):
    one measured under load read 3.35x for a kernel that measured ~1.4x on the idle machine."""
    load = machine_load()
    return load is not None and load[0] >= load[1]


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


def _median_round(measure_round: Callable[[], dict[str, float]]) -> dict[str, float]:
    """One round of ``measure_round`` (its ``kernel`` and ``aten`` times), or, where its ratio ``aten / kernel`` is a
    close call (within :data:`CLOSE_CALL_BAND` of :data:`MIN_SPEEDUP`), the round of median ratio among
    :data:`CLOSE_CALL_ROUNDS`; with the number of rounds taken, under ``rounds``."""

    def ratio(times: dict[str, float]) -> float:
        return times["aten"] / max(times["kernel"], 1e-12)

    taken = [measure_round()]
    if MIN_SPEEDUP / CLOSE_CALL_BAND <= ratio(taken[0]) <= MIN_SPEEDUP * CLOSE_CALL_BAND:
        taken += [measure_round() for _ in range(CLOSE_CALL_ROUNDS - 1)]
    taken.sort(key=ratio)
    return {**taken[len(taken) // 2], "rounds": len(taken)}


def workloads(n: int) -> dict[str, Callable[[], object]]:
    """One call of each kernel's rule code (the same call runs the kernel or ATen, by the switches)."""
    from ..nets import DMLSTM, AdafacMLP, MLPUpdate  # lazy: the nets import the kernels
    from ._ops import elu_

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


#: ``switched(True)``: every kernel runs (forced) inside the block; ``switched(False)``: none (ATen).
Switch = Callable[[bool], contextlib.AbstractContextManager[None]]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def measure(isa: str, switched: Switch) -> dict[str, Any]:
    """Time every kernel against the ATen path of its rule (see :mod:`learned_optim.kernels`)."""
    threads = torch.get_num_threads()
    busy_before = busy()
    aten_ms, kernel_ms, rounds = {}, {}, {}
    try:
        torch.set_num_threads(1)
        # the workloads seed torch's global generator: the caller's random stream must not depend on whether
        # this process happened to measure the guard (the first use on a machine) or read it from the cache; they
        # run in float32 without autocast, whatever the caller's default dtype and autocast state
        with (
            torch.no_grad(),
            torch.random.fork_rng(devices=[]),
            _default_dtype(torch.float32),
            torch.autocast("cpu", enabled=False),
        ):
            for name, work in workloads(GUARD_ROWS).items():

                def on(work: Callable[[], object] = work) -> None:
                    with switched(True):
                        work()

                def off(work: Callable[[], object] = work) -> None:
                    with switched(False):
                        work()

                best = _median_round(functools.partial(_best_of, {"kernel": on, "aten": off}))
                kernel_ms[name], aten_ms[name] = best["kernel"] * 1e3, best["aten"] * 1e3
                rounds[name] = best["rounds"]
    finally:
        torch.set_num_threads(threads)
    return {
        "isa": isa,
        "cpu": cpu_model(),
        "rows": GUARD_ROWS,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load": " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?",
        "busy": busy_before or busy(),
        "torch": torch.__version__,
        "workloads": workloads_key(),
        "ratios": {k: aten_ms[k] / max(kernel_ms[k], 1e-9) for k in KERNELS},
        "aten_ms": aten_ms,
        "kernel_ms": kernel_ms,
        "rounds": rounds,
    }


def workloads_key() -> str:
    """Hash of what the guard times and how (the workloads' source and size, the close-call rounds): a cached record
    measured otherwise is measured again, as one measured against another build or another torch is."""
    source = inspect.getsource(workloads) + repr((GUARD_ROWS, ADAFAC_GUARD_SCALE, CLOSE_CALL_BAND, CLOSE_CALL_ROUNDS))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def valid(record: Any, isa: str) -> bool:
    """Whether ``record`` is a complete guard measurement of this ISA's build, torch and workloads."""
    return (
        isinstance(record, dict)
        and record.get("isa") == isa
        and record.get("torch") == torch.__version__  # another torch: another ATen to compare with
        and record.get("workloads") == workloads_key()
        and all(
            isinstance(record.get(part), dict) and all(isinstance(record[part].get(k), (int, float)) for k in KERNELS)
            for part in ("ratios", "aten_ms", "kernel_ms")
        )
    )


def load_or_measure(path: Path | None, isa: str, switched: Switch) -> dict[str, Any] | None:
    """The guard record cached at ``path``, or a fresh measurement written there (atomically): where there is none
    valid (:func:`valid`), or the cached one was measured on a busy machine and this one is calm now (:func:`busy`).
    ``None``: no cache, a measurement for this process only."""
    if path is not None:
        try:
            record = json.loads(path.read_text())
            if valid(record, isa):
                if not (record.get("busy") and not busy()):
                    return record
                logger.info("learned_optim: the kernels' guard was measured on a busy machine (load %s); measuring "
                            "again", record.get("load"))  # fmt: skip
        except (OSError, ValueError):
            pass
    try:
        record = measure(isa, switched)
    except Exception as err:  # no measurement: the kernels stay unused (the ATen path is always correct)
        logger.warning("learned_optim: measuring the native kernels failed, using the ATen path (%s)", err)
        return None
    try:
        if path is not None:  # (a bundled library's record may go to a cache folder not made yet)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps(record, indent=1).encode())
    except OSError as err:  # a read-only cache: the measurement still counts, for this process
        logger.warning("learned_optim: could not cache the kernels' guard record at %s (%s)", path, err)
    slower = [k for k in KERNELS if record["ratios"][k] < MIN_SPEEDUP]
    if slower:
        logger.info("learned_optim: kernels %s are not %sx faster than ATen here; ATen runs them", slower, MIN_SPEEDUP)
    return record
