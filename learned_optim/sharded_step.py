r"""Whole-tensor steps of FSDP2-sharded parameters, each computed by one rank ("owner computes").

A whole-tensor rule (``adafac_mlp``: factored row/column statistics, per-tensor normalisation, the orthogonalised
direction) needs each parameter whole. :class:`~learned_optim.LearnedOptimizer` with ``sharded_step="every_rank"``
all-gathers every sharded tensor on every rank and steps it there, so each of the :math:`W` ranks of a shard group
computes every tensor's step. With ``sharded_step="owner"`` (the default, :func:`step_by_owners`) the ranks share the
work: the tensors, largest first, go in rounds of :math:`W`, the :math:`j`-th tensor of a round to the group's rank
:math:`j`; each rank sends its shards of a tensor (parameter, gradient, per-coordinate state) to the tensor's owner
(``gather``), the owner steps the whole tensor exactly as a single process would, and sends each rank its shards of
the new parameter and state and the new per-tensor state (``scatter``). The result is the every-rank step's bit for
bit; each rank computes about :math:`1/W` of the steps and holds at most one whole tensor at a time.

Taken: parameters whose ``DTensor`` placements shard one mesh dimension with ``Shard(d)`` (FSDP2's ``Shard(0)``;
HSDP's replicated dimension too: each replica group shares out its own steps) and whose gradient has the same
placements. Others (``_StridedShard``, several sharded mesh dimensions, ``Partial``) are left to the every-rank step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor

from .packing import is_dtensor
from .packing import local_tensor as _local

__all__ = ["ShardedStep", "SHARDED_STEPS", "shard_layout", "step_by_owners"]

#: How a whole-tensor rule steps FSDP2-sharded tensors: ``"owner"`` (one rank per tensor) or ``"every_rank"``.
ShardedStep = Literal["owner", "every_rank"]
SHARDED_STEPS: tuple[ShardedStep, ...] = ("owner", "every_rank")

#: Bytes each piece of a message is padded to, so that every piece starts aligned for its dtype.
_ALIGN = 8


def shard_layout(p: Tensor) -> tuple[Any, int] | None:
    """``(process group, tensor dim)`` over which the ``DTensor`` ``p`` and its gradient are sharded, when they are
    sharded along one mesh dimension by a plain ``Shard(d)`` and replicated on the others; else ``None``."""
    grad = p.grad
    if not is_dtensor(p) or grad is None or not is_dtensor(grad) or tuple(grad.placements) != tuple(p.placements):
        return None
    from torch.distributed.tensor import Shard

    sharded = [(i, placement) for i, placement in enumerate(p.placements) if not placement.is_replicate()]
    if len(sharded) != 1 or type(sharded[0][1]) is not Shard:  # (subclasses: _StridedShard's chunks interleave)
        return None
    mesh_dim, placement = sharded[0]
    return p.device_mesh.get_group(mesh_dim), cast(Shard, placement).dim


def _pack(pieces: Sequence[Tensor]) -> Tensor:
    """The pieces' bytes, one after another, each padded to :data:`_ALIGN` bytes (a flat ``uint8`` tensor)."""
    parts = []
    for x in pieces:
        raw = x.contiguous().view(-1).view(torch.uint8)
        parts += [raw, raw.new_zeros(-raw.numel() % _ALIGN)]
    return torch.cat(parts)


def _nbytes(specs: Sequence[tuple[torch.Size, torch.dtype]]) -> int:
    return sum(-(-shape.numel() * dtype.itemsize // _ALIGN) * _ALIGN for shape, dtype in specs)


def _unpack(buffer: Tensor, specs: Sequence[tuple[torch.Size, torch.dtype]]) -> list[Tensor]:
    """The pieces of ``shape`` and ``dtype`` that :func:`_pack` put into ``buffer`` (views of it)."""
    pieces, start = [], 0
    for shape, dtype in specs:
        size = shape.numel() * dtype.itemsize
        pieces.append(buffer[start : start + size].view(dtype).view(shape))
        start += -(-size // _ALIGN) * _ALIGN
    return pieces


def _with_dim(shape: torch.Size, dim: int, size: int) -> torch.Size:
    return torch.Size((*shape[:dim], size, *shape[dim + 1 :]))


@dataclass
class _Sharded:
    """One sharded parameter of a shard group: its state, sharded dim and every rank's shard size along it."""

    param: Tensor
    state: dict[str, Tensor]
    dim: int
    sizes: list[int]

    def pieces(self, per_coordinate: Sequence[str]) -> list[Tensor]:
        """This rank's shards: parameter, gradient, per-coordinate states."""
        p = self.param
        return [_local(p), _local(cast(Tensor, p.grad)), *(_local(self.state[k]) for k in per_coordinate)]

    def specs(self, per_coordinate: Sequence[str], rank: int) -> list[tuple[torch.Size, torch.dtype]]:
        """Shapes and dtypes of rank ``rank``'s :meth:`pieces`."""
        size = self.sizes[rank]
        return [(_with_dim(x.shape, self.dim, size), x.dtype) for x in self.pieces(per_coordinate)]

    def tensor_state(self, per_coordinate: Sequence[str]) -> list[Tensor]:
        """The per-tensor state (replicated on every rank; not the step count), in a fixed order."""
        return [_local(self.state[k]) for k in sorted(self.state) if k not in per_coordinate and k != "step"]

    def reply_specs(self, per_coordinate: Sequence[str], rank: int) -> list[tuple[torch.Size, torch.dtype]]:
        """What the owner sends rank ``rank`` back: its shards of the new parameter and per-coordinate state (not the
        gradient), then the new per-tensor state."""
        shards = self.specs(per_coordinate, rank)
        return [shards[0], *shards[2:], *((x.shape, x.dtype) for x in self.tensor_state(per_coordinate))]

    def padded_nbytes(self, per_coordinate: Sequence[str], world: int, reply: bool) -> int:
        """The size of every rank's message about this tensor: the largest rank's (collectives take equal sizes)."""
        specs = self.reply_specs if reply else self.specs
        return max(_nbytes(specs(per_coordinate, r)) for r in range(world))


def step_by_owners(
    params: Sequence[Tensor],
    states: Sequence[dict[str, Tensor]],
    per_coordinate: Sequence[str],
    step_whole: Callable[[Tensor, dict[str, Tensor]], None],
) -> list[Tensor]:
    """Step the sharded ``params`` it takes (see the module docstring) by their owners; returns the others, in order.

    ``states[i]`` is ``params[i]``'s optimizer state: ``per_coordinate`` names its ``DTensor`` states sharded like the
    parameter (global shape ``param.shape + state shape``), its other tensors but ``"step"`` are per-tensor state
    replicated on every rank. ``step_whole(whole_param, whole_state)`` steps an unsharded parameter (its ``.grad``
    set) and its state in place; the owner calls it. Every rank of a shard group must call this with the same
    parameters in the same order (as FSDP2 steps them)."""
    import torch.distributed as dist

    groups: dict[int, tuple[Any, list[tuple[Tensor, dict[str, Tensor], int]]]] = {}
    left = []
    for p, state in zip(params, states, strict=True):
        layout = shard_layout(p)
        if layout is None:
            left.append(p)
        else:
            groups.setdefault(id(layout[0]), (layout[0], []))[1].append((p, state, layout[1]))
    for group, members in groups.values():
        world = dist.get_world_size(group)
        # every rank's shard size along the sharded dim, of every tensor: one small all-gather per group and step
        mine = torch.tensor([_local(p).shape[d] for p, _, d in members], device=_local(members[0][0]).device)
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine, group=group)
        sizes = torch.stack(everyone).cpu().t().tolist()  # [tensor][rank]
        tensors = [_Sharded(p, state, d, s) for (p, state, d), s in zip(members, sizes, strict=True)]
        tensors.sort(key=lambda t: -t.param.numel())  # (stable: ties keep the parameters' order)
        for first in range(0, len(tensors), world):
            _owner_round(group, tensors[first : first + world], per_coordinate, step_whole)
    return left


def _padded(message: Tensor, size: int) -> Tensor:
    return torch.cat([message, message.new_zeros(size - message.numel())])


def _owner_round(
    group: Any,
    tensors: list[_Sharded],
    per_coordinate: Sequence[str],
    step_whole: Callable[[Tensor, dict[str, Tensor]], None],
) -> None:
    """Step ``tensors[j]`` on the group's rank ``j``: gather its shards there, step it whole, scatter them back."""
    import torch.distributed as dist

    world, me = dist.get_world_size(group), dist.get_rank(group)
    device = _local(tensors[0].param).device
    inbox: list[Tensor] = []
    works = []
    for owner, t in enumerate(tensors):
        size = t.padded_nbytes(per_coordinate, world, reply=False)
        gathered = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(world)] if owner == me else None
        message = _padded(_pack(t.pieces(per_coordinate)), size)
        works.append(dist.gather(message, gathered, group=group, group_dst=owner, async_op=True))
        inbox = gathered if gathered is not None else inbox
    for work in works:
        cast(dist.Work, work).wait()

    replies = None
    if me < len(tensors):
        t = tensors[me]
        shards = [_unpack(message, t.specs(per_coordinate, r)) for r, message in enumerate(inbox)]
        whole_param, whole_grad, *whole_coords = (
            torch.cat([shard[k] for shard in shards], dim=t.dim) for k in range(len(shards[0]))
        )
        whole_param.grad = whole_grad
        per_tensor = {k: _local(v) for k, v in t.state.items() if k not in per_coordinate}
        step_whole(whole_param, {**per_tensor, **dict(zip(per_coordinate, whole_coords, strict=True))})
        size, start = t.padded_nbytes(per_coordinate, world, reply=True), 0
        replies = []
        for r in range(world):
            shard = [x.narrow(t.dim, start, t.sizes[r]) for x in (whole_param, *whole_coords)]
            replies.append(_padded(_pack([*shard, *t.tensor_state(per_coordinate)]), size))
            start += t.sizes[r]

    works, answers = [], []
    for owner, t in enumerate(tensors):
        answer = torch.empty(t.padded_nbytes(per_coordinate, world, reply=True), dtype=torch.uint8, device=device)
        outbox = replies if owner == me else None
        works.append(dist.scatter(answer, outbox, group=group, group_src=owner, async_op=True))
        answers.append(answer)
    for work in works:
        cast(dist.Work, work).wait()
    for t, answer in zip(tensors, answers, strict=True):
        targets = [_local(t.param), *(_local(t.state[k]) for k in per_coordinate), *t.tensor_state(per_coordinate)]
        for target, value in zip(targets, _unpack(answer, t.reply_specs(per_coordinate, me)), strict=True):
            target.copy_(value)
