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
* :func:`adafac_pack_step` (``csrc/adafac.cpp``), ``AdafacMLP``'s whole inference step of one tensor or of
  a pack of tensors in one call: Adafactor statistics, per-tensor normalisers, then its two passes (state
  update and feature sums of squares; features, MLP and direction), each one sweep over the tensor with the
  16 features and the hidden units in registers, and the direction's scale (or the decoupled update itself),
  instead of ~30 ATen elementwise passes and GEMMs per block of rows and ~25 ATen ops per tensor around them;
  :func:`adafac_tensors_step`, the same kernel over tensors each in its own storage (the optimizer's in-place
  step, ``AdafacMLP.step_in_place``: nothing packed or copied).

Same math; their ``exp`` is a polynomial accurate to about 1 float32 ulp, so results differ from the
ATen path by a few ulps (tested in ``tests/core/test_kernels.py``).

The source is plain C++ (GCC/Clang vector extensions, no torch headers), compiled once per machine with
the system compiler (``$CXX``, else ``c++``; 10-35 seconds) into one library in a cache folder and loaded with
``ctypes``: no ninja, no Python-version-specific build, no ABI tie to torch. Nothing is ever downloaded.

**Instruction set, picked at run time.** The same sources build for three targets (``csrc/vec.h``): ``avx512``
(16-float vectors, 32 registers), ``avx2`` (AVX2 + FMA: 8-float vectors, register blocks sized for 16
registers) and ``portable`` (no ISA flags: 4-float vectors, SSE2 on x86-64, NEON on ARM). :func:`isa` is the
best one the CPU's flags allow, or ``$LEARNED_OPTIM_ISA`` (``avx512``, ``avx2`` or ``portable``; one the CPU
cannot execute is an error and leaves the ATen path). Only the selected one is built.

**The guard: a kernel runs only where it is measured faster.** Right after a build, each kernel is timed
against the ATen path of the same rule on the machine at hand (``_guard.GUARD_ROWS`` coordinates, one
thread, thread CPU time, best of ``_guard.GUARD_REPEATS`` interleaved rounds): ``lstm_cell`` through a
DM-LSTM step, ``elu`` on RNNProp's input activation, ``mlp`` through an MLP rule's statistics and update,
``adafac_mlp`` through an ``AdafacMLP`` step on a matrix of ``_guard.ADAFAC_GUARD_SCALE`` times as many
coordinates (above its ``coordinate_block``: the large tensors its step time lives in; the kernel path then
serves all sizes, as it was also measured faster on small tensors, where both paths are mostly per-call
overhead). A ratio within ``_guard.CLOSE_CALL_BAND`` of :data:`MIN_SPEEDUP` is a close call, measured
``_guard.CLOSE_CALL_ROUNDS`` times in all, and the round of median ratio counts. A measurement taken on a busy
machine (a 1-minute load average of at least the CPUs the process may use, ``_guard.busy``) counts until a later
process finds the machine calm and measures again. The ratios (ATen time / kernel
time) are cached beside the library (``<library>.guard.json``; a bundled library's in the cache folder;
measured again under another torch or other guard workloads); a kernel whose ratio is below
:data:`MIN_SPEEDUP` is not used, and the ATen path runs instead. :func:`report` says which path each rule
takes and why; :func:`forced` runs the kernels whatever the guard says (tests, benchmarks).

* Cache: ``$LEARNED_OPTIM_CACHE`` or ``$XDG_CACHE_HOME/learned_optim`` (default ``~/.cache/learned_optim``),
  in ``kernels/learned_optim-<hash>.so``; the hash covers the sources, the compiler's version, the ISA's
  flags and the CPU's model and feature flags (the guard's measurements belong to the machine).
* ``LEARNED_OPTIM_KERNELS=0`` disables the kernels (the ATen path runs); so does :func:`set_enabled`.
* Threads: ``torch.get_num_threads()``. Where torch runs GNU OpenMP (its Linux wheels) and the compiler is GCC, the
  library is built with ``-fopenmp`` and its parallel regions run on torch's own OpenMP threads
  (:func:`shares_torch_threads`); elsewhere, or with ``LEARNED_OPTIM_OPENMP=0``, it starts threads of its own.
  GNU OpenMP's threads do not survive ``fork()`` (torch's own parallel ops hang in a child forked after its parent
  ran them), so in a forked child the OpenMP build runs on one thread.
* Bundled libraries, for machines without a compiler: ``python -m learned_optim.kernels prebuild`` compiles one
  library per ISA of the architecture (the C++ runtime linked in, threads of their own) into ``kernels/prebuilt/``,
  named by a digest of the sources, and a wheel built afterwards ships them (``hatch_build.py``). Where there is no
  compiler or the build fails, the best bundled library the CPU runs loads instead (the selected ISA's where
  ``$LEARNED_OPTIM_ISA`` asks for one), if it was built from these sources and is intact (its digest beside it); the
  guard measures it like any build and keeps its record in the cache folder. ``$LEARNED_OPTIM_PREBUILT`` names
  another folder of bundled libraries.
* If neither a build nor a bundled library is to be had, a warning is logged once and the ATen path runs.

Layout: ``_build`` (targets, compile, cache, bundled libraries), ``_guard`` (the measurement), ``_runtime`` (the
switches, the library loaded on first use, the verdicts), ``_ops`` (the entry points the nets call), ``__main__`` (the
command line: ``report``, ``prebuild``).
"""

from __future__ import annotations

from ._build import ISAS, cpu_flags, cpu_model, supported_isas
from ._guard import KERNELS, MIN_SPEEDUP
from ._ops import (
    ADAFAC_MAX_HIDDEN,
    ADAFAC_MAX_MOMENTA,
    AdafacNet,
    adafac_pack_step,
    adafac_tensors_step,
    elu_,
    lstm_cell_into,
    mlp_feature_mean_square,
    mlp_update,
    plain_f32,
)
from ._runtime import (
    RULE_KERNELS,
    available,
    build_error,
    enabled,
    enabled_as,
    forced,
    guard,
    isa,
    kernel_threads,
    library_path,
    report,
    serves,
    set_enabled,
    shares_torch_threads,
    uses,
    vector_lanes,
)

__all__ = [
    "available",
    "enabled",
    "set_enabled",
    "enabled_as",
    "lstm_cell_into",
    "elu_",
    "mlp_feature_mean_square",
    "mlp_update",
    "AdafacNet",
    "adafac_pack_step",
    "adafac_tensors_step",
    "plain_f32",
    "ADAFAC_MAX_MOMENTA",
    "ADAFAC_MAX_HIDDEN",
    "build_error",
    "isa",
    "supported_isas",
    "cpu_model",
    "cpu_flags",
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
    "kernel_threads",
    "shares_torch_threads",
    "vector_lanes",
]
