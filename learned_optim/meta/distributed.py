"""Meta-training over processes (``torchrun``): which rank this is, the net's gradients averaged over ranks
(data-parallel), and the exact exchanges of particle-parallel PES (rows gathered, tensors and JSON broadcast)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["data_parallel", "average_gradients", "block_bounds", "gather_blocks", "broadcast_tensors", "broadcast_json"]


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


def block_bounds(total: int, world_size: int) -> list[tuple[int, int]]:
    """The contiguous ``[start, end)`` block of ``total`` items each of ``world_size`` ranks owns, as even as can be."""
    return [(r * total // world_size, (r + 1) * total // world_size) for r in range(world_size)]


def gather_blocks(block: Tensor, bounds: Sequence[tuple[int, int]]) -> Tensor:
    """Every rank's ``block`` (rows ``bounds[rank]`` of one table) concatenated in rank order, on every rank.

    Exact: the rows are copied, never summed (padded to the largest block for ``all_gather``)."""
    import torch.distributed as dist

    width = max(end - start for start, end in bounds)
    padded = block.new_zeros((width, *block.shape[1:]))
    padded[: block.shape[0]] = block
    gathered = [torch.empty_like(padded) for _ in bounds]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: end - start] for g, (start, end) in zip(gathered, bounds, strict=True)])


def broadcast_tensors(tensors: Mapping[str, Tensor], src: int, device: torch.device) -> dict[str, Tensor]:
    """``src``'s tensors on every rank, by name; the other ranks pass tensors of the same names, shapes and dtypes
    (whose values are ignored). Sent on ``device`` (the process group's: CPU for gloo, CUDA for NCCL)."""
    import torch.distributed as dist

    out = {}
    for name in sorted(tensors):
        buffer = tensors[name].detach().to(device=device, copy=True).contiguous()
        dist.broadcast(buffer, src)
        out[name] = buffer
    return out


def broadcast_json(value: Any, src: int, device: torch.device) -> Any:
    """``src``'s JSON-serialisable ``value`` on every rank (sent as UTF-8 bytes; nothing is pickled)."""
    import torch.distributed as dist

    data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8).to(device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    buffer = torch.empty(int(size), dtype=torch.uint8, device=device)
    if dist.get_rank() == src:
        buffer.copy_(data)
    dist.broadcast(buffer, src)
    return json.loads(bytes(buffer.cpu().tolist()).decode())
