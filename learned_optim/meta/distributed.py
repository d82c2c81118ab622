"""Data-parallel meta-training (``torchrun``): which rank this is, and the net's gradients averaged over ranks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["data_parallel", "average_gradients"]


def data_parallel(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    """``(rank, world_size, all-reduce gradients?)`` from the arguments or the torch.distributed group."""
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    if rank is None and world_size is None and initialized:
        rank, world_size = dist.get_rank(), dist.get_world_size()
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in range for world_size {world_size}")
    return rank, world_size, world_size > 1 and initialized


def average_gradients(params: list[nn.Parameter] | list[Tensor], skipped: bool, flag_dtype: torch.dtype) -> bool:
    r"""All-reduce the gradients of ``params`` to their mean over the ranks that have one, in one flat buffer.

    A rank without a gradient for a parameter (``grad is None``) or that ``skipped`` its meta-step contributes
    zeros and is not counted: :math:`\bar g = \sum_r g_r / \#\{r : g_r \text{ exists}\}`; a parameter no rank
    has a gradient for keeps ``None``. Returns whether every rank skipped (then no rank steps).
    ``flag_dtype`` is the dtype of the buffer's count entries (the gradients').
    """
    import torch.distributed as dist

    device = params[0].device
    flags = torch.tensor(
        [float(p.grad is not None) for p in params] + [float(not skipped)], device=device, dtype=flag_dtype
    )
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params] + [flags])
    dist.all_reduce(flat)
    counts, live = flat[-len(flags) : -1], float(flat[-1])
    offset = 0
    for p, count in zip(params, counts.tolist(), strict=True):
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p) / count if count > 0 else None
        offset += n
    return live == 0
