"""Buffers kept from one optimizer step to the next for the step's large intermediates on the CPU.

glibc's ``malloc`` hands a freed block at or above its mmap threshold (at most 32 MiB, raised to the size of the
largest such block freed so far) back to the system, and trims the top of its heap past twice that. A step that
allocates and frees tens of MiB of intermediates, as the ATen path of a learned optimizer's packed step does
(~60 floats per coordinate), then page-faults on all of it again at every step: 12.5k minor faults per step, about
half the step's time, on the benchmark suite's char transformer (``benchmarks/results/``
``scratch_session44_amd_avx512.md``). Intermediates taken from a :class:`Scratch` are allocated once and reused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Scratch"]


class Scratch:
    """Named buffers reused from step to step (see the module docstring).

    :meth:`take` returns an uninitialised tensor of the asked shape, a view of the buffer kept under its name
    (and the device and dtype), which grows when too small (up to :attr:`kept_bytes_limit` in all) and never
    shrinks. It is valid until the next
    :meth:`take` of that name: callers use it within one step, one step at a time (the owner, e.g. an update rule,
    is not stepped from two threads at once). Fresh tensors, nothing kept, where reuse would be wrong or gains
    nothing: off the CPU (a caching allocator serves accelerators), under autograd (saved tensors would be
    overwritten) and inside ``torch.compile`` (which plans its own buffers). Copies and pickles (``deepcopy``,
    sending the owner to another process) start empty.
    """

    #: At most this many bytes are kept: a buffer that would take the total past it is allocated anew at each
    #: :meth:`take`, as without a scratch. Kept buffers stay allocated between steps (through the forward and
    #: backward passes), so a large model's step transients are not kept; their page faults are a smaller share of
    #: its step.
    kept_bytes_limit: int = 64 << 20
    #: Smaller buffers are allocated anew at each :meth:`take`: glibc serves them from its heap's free lists without
    #: paging (its mmap threshold starts at 128 KiB), and keeping one costs more Python than it saves
    #: (``newton_schulz_orthogonalize`` of a 96 x 96 matrix: 230 us out of place, 300 with every matrix kept).
    min_kept_bytes: int = 128 << 10

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    def take(self, name: str, shape: Sequence[int], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """An uninitialised tensor of ``shape`` on ``like``'s device, of ``dtype`` (default ``like``'s), contiguous."""
        dtype = like.dtype if dtype is None else dtype
        size = math.prod(shape)
        if not self.keeps(like, size * dtype.itemsize):
            return like.new_empty(tuple(shape), dtype=dtype)
        key = (name, like.device, dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < size:
            kept_elsewhere = self.nbytes - (0 if buffer is None else buffer.numel() * buffer.element_size())
            buffer = like.new_empty(size, dtype=dtype)
            if kept_elsewhere + buffer.numel() * buffer.element_size() > self.kept_bytes_limit:
                return buffer.view(tuple(shape))
            self._buffers[key] = buffer
        return buffer[:size].view(tuple(shape))

    def take_like(self, name: str, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """:meth:`take` laid out as ``torch.empty_like(like)``: the layout of an elementwise op's result on ``like``
        (its strides, a size-1 dimension's included: a BLAS call on a transposed operand may round differently by
        them)."""
        strides = torch.empty_like(like, device="meta", dtype=dtype).stride()
        extent = 1 + sum((size - 1) * stride for size, stride in zip(like.shape, strides, strict=True))
        return self.take(name, (extent,), like, dtype).as_strided(like.shape, strides)

    @classmethod
    def keeps(cls, like: Tensor, nbytes: int | None = None) -> bool:
        """Whether :meth:`take` reuses a kept buffer for tensors like ``like`` (of ``nbytes``, if given; else it
        allocates a fresh one)."""
        if nbytes is not None and nbytes < cls.min_kept_bytes:
            return False
        return like.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()

    @property
    def nbytes(self) -> int:
        """Bytes held by the kept buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        """Drop every kept buffer."""
        self._buffers.clear()

    def __reduce__(self) -> tuple[Any, ...]:
        return (Scratch, ())
