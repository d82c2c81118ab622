"""Numeric helpers shared by the shipped core, meta-training and the research tooling (one definition each)."""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["global_norm", "seeded_generator", "derive_seed", "bfloat16_matmul_is_native"]


def global_norm(tensors: Iterable[Tensor]) -> float:
    r""":math:`\sqrt{\sum_i \|t_i\|_2^2}` over all the tensors, accumulated in float64, as a Python float.

    For reporting and for decisions (clipping, divergence, non-finite checks): detached, never in a graph.
    """
    return math.sqrt(sum(float(t.detach().double().square().sum()) for t in tensors))


def functorch_wrapped(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a tensor of a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``...): no data-dependent
    branch, in-place activation or op without a batching rule on it. ``False`` where torch does not tell."""
    return _is_functorch_wrapped(tensor)


_is_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda tensor: False)


def seeded_generator(seed: int) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` seeded with ``seed`` (independent of torch's global RNG)."""
    return torch.Generator().manual_seed(seed)


def derive_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed determined by ``seed`` and ``keys`` (stable across runs, platforms and Python versions)."""
    text = "/".join(str(k) for k in (seed, *keys)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


@functools.cache
def bfloat16_matmul_is_native(device_type: str) -> bool:
    """Whether matrix products in bfloat16 run on native bfloat16 units on this machine's ``device_type``: a CUDA GPU
    that supports bfloat16; a CPU with AMX tiles or AVX512-BF16 dot products (elsewhere bfloat16 is converted to
    float32 and costs more). Measured: 5 Newton-Schulz steps at 1000 x 1000 in bfloat16 3.1x float32's speed on an
    Intel Xeon with AMX, 2.25x on an AMD EPYC with AVX512-BF16 and no AMX (``benchmarks/newton_schulz_dtype.py``,
    ``benchmarks/results/bench/orthogonal-bf16/``). A property of the hardware, read
    once per process, so a run's numerics do not depend on timings."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    return False
