"""The packed step: the small tensors of a param group stepped together, one net call per pack.

A *pack* is a list of at least two parameters (same device, dtype, gradient dtype and state dtypes, and the same
step count unless the rule takes one per tensor, together fewer coordinates than one chunk) whose gradients, values
and per-coordinate state are concatenated (zero rows up to :data:`ROW_ALIGN`) and stepped by one call of the rule's
net, with the per-tensor statistics taken by segment (:class:`learned_optim.nets.Segments`); the results are copied
back into each parameter and its own state. The result equals stepping each tensor alone (see
``tests/core/test_packed_step.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import Tensor

from .functional import decoupled_update, stepped_parameter, wider_dtype
from .nets.base import Segments, UpdateRule

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "ROW_ALIGN",
    "PACK_MAX_BYTES",
    "align_rows",
    "pad_rows",
    "is_dtensor",
    "local_tensor",
    "plan_packs",
    "consecutive_batches",
    "packed_step",
    "step_counts",
    "by_step_count",
]

#: Chunks are cut at, and zero-padded to, multiples of this many coordinates. BLAS kernels round
#: differently for different row counts (below ~16 rows MKL takes other code paths), so fixed
#: alignment is what makes the result independent of ``chunk_size`` bit for bit.
ROW_ALIGN = 64


#: A tensor joins a pack (the packed step) only if its parameter, gradient and state take fewer bytes than this.
#: Packing copies them into the pack and the results back (~0.17 us per coordinate of DM-LSTM's 328 bytes on
#: the benchmark machine), while a tensor stepped alone costs a fixed ~0.5 ms (its own net call and
#: statistics): the two break even near 1 MiB for every family (DM-LSTM ~3k coordinates, MLP ~20k).
PACK_MAX_BYTES = 1 << 20


def pad_rows(x: Tensor, rows: int) -> Tensor:
    """``x`` with zero rows appended along dim 0 up to ``rows``."""
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def align_rows(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`ROW_ALIGN`."""
    return -(-n // ROW_ALIGN) * ROW_ALIGN


def is_dtensor(t: Tensor) -> TypeGuard[DTensor]:
    """A ``torch.distributed.tensor.DTensor`` (e.g. a parameter sharded by FSDP2's ``fully_shard``)."""
    return type(t).__name__ == "DTensor" and hasattr(t, "_local_tensor")


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view of its storage), or ``t`` itself."""
    return t._local_tensor if is_dtensor(t) else t


def step_counts(states: Sequence[Mapping[str, Tensor]], rule: UpdateRule) -> Tensor:
    """The step count of the tensors of these optimizer ``states`` that ``rule`` steps in one call, in its
    :attr:`~learned_optim.nets.base.UpdateRule.compute_dtype`: 0-d where they share one (always, for a rule without
    :attr:`~learned_optim.nets.base.UpdateRule.per_tensor_steps`: the callers group its tensors by count), else each
    tensor's, ``(S,)``."""
    dtype, first = rule.compute_dtype, states[0]["step"]
    if rule.per_tensor_steps and len(states) > 1:
        counts = torch.stack([state["step"] for state in states])
        values = counts.tolist()  # (one read, cheaper than a comparison op and its reduction)
        if values.count(values[0]) != len(values):
            return counts.to(dtype=dtype)
    return first.to(dtype=dtype)


def by_step_count(
    pairs: Sequence[tuple[Tensor, dict[str, Tensor]]], rule: UpdateRule
) -> list[list[tuple[Tensor, dict[str, Tensor]]]]:
    """``pairs`` (parameter, its optimizer state) as the groups ``rule`` steps in one call: all of them where it
    takes one step count per tensor (:attr:`~learned_optim.nets.base.UpdateRule.per_tensor_steps`), else those of
    each step count."""
    if rule.per_tensor_steps or len(pairs) < 2:
        return [list(pairs)]
    counts = torch.stack([state["step"] for _, state in pairs]).tolist()
    groups: dict[float, list[tuple[Tensor, dict[str, Tensor]]]] = {}
    for pair, count in zip(pairs, counts, strict=True):
        groups.setdefault(count, []).append(pair)
    return list(groups.values())


def _bytes_per_coordinate(p: Tensor, state: Mapping[str, Tensor], floats: Mapping[str, int]) -> int:
    """Bytes per coordinate of ``p``: value, gradient and per-coordinate state (what packing copies); ``floats``:
    the numbers per coordinate of each per-coordinate state tensor."""
    grad_size = p.grad.element_size() if p.grad is not None else 0
    return p.element_size() + grad_size + sum(state[k].element_size() * count for k, count in floats.items())


def plan_packs(
    params: Sequence[Tensor],
    states: Mapping[Tensor, Mapping[str, Tensor]],
    rule: UpdateRule,
    chunk_rows: Callable[[torch.device], int | None],
) -> tuple[list[list[Tensor]], list[Tensor]]:
    """Split parameters into packs (lists of >= 2 tensors stepped together, at most ``chunk_rows(device)``
    coordinates each, every member under :data:`PACK_MAX_BYTES`) and the tensors stepped alone. ``states``: each
    parameter's optimizer state. A pack lists its tensors ordered by shape (stably), so that tensors of one shape
    are consecutive and a rule takes their per-tensor statistics at once."""
    floats = {k: math.prod(shape) for k, shape in rule.state_shapes().items()}
    names = list(floats)
    singles: list[Tensor] = []
    buckets: dict[tuple[Any, ...], list[Tensor]] = {}
    limits: dict[torch.device, int | None] = {}
    for p in params:
        if p.device not in limits:
            limits[p.device] = chunk_rows(p.device)
        limit = limits[p.device]
        n = p.numel()
        small = not is_dtensor(p) and limit is not None and 0 < n < limit
        if not (small and n * _bytes_per_coordinate(p, states[p], floats) < PACK_MAX_BYTES):
            singles.append(p)
            continue
        state = states[p]
        grad_dtype = p.grad.dtype if p.grad is not None else None
        count = None if rule.per_tensor_steps else float(state["step"])
        key = (p.device, p.dtype, grad_dtype, count, *(state[k].dtype for k in names))
        buckets.setdefault(key, []).append(p)
    packs: list[list[Tensor]] = []
    for members in buckets.values():
        limit = limits[members[0].device]
        members.sort(key=lambda p: (p.dim(), tuple(p.shape)))
        assert limit is not None
        packs += [members[batch] for batch in consecutive_batches([p.numel() for p in members], limit)]
    singles += [pack[0] for pack in packs if len(pack) == 1]
    return [pack for pack in packs if len(pack) > 1], singles


def consecutive_batches(sizes: Sequence[int], limit: int) -> list[slice]:
    """Consecutive slices of ``sizes`` whose sums are at most ``limit`` (an item larger than ``limit`` alone), each
    as long as the next item allows (greedy)."""
    batches: list[slice] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            batches.append(slice(start, i))
            start, total = i, 0
        total += size
    if sizes:
        batches.append(slice(start, len(sizes)))
    return batches


def packed_step(
    params: Sequence[Tensor],
    states: Sequence[dict[str, Tensor]],
    rule: UpdateRule,
    net: Callable[..., Any],
    lr: float | Tensor,
    weight_decay: float,
    maximize: bool,
) -> None:
    """One net call for several tensors (``states``: theirs, in order): concatenated (zero rows up to
    :data:`ROW_ALIGN`), stepped with per-segment statistics, and copied back into each parameter and its
    own state. ``net``: the rule's forward as the optimizer runs it (eager, compiled or a native kernel)."""
    dtype = rule.compute_dtype
    params = list(params)
    sizes = tuple(p.numel() for p in params)
    total = sum(sizes)
    rows = align_rows(total)
    device = params[0].device

    def packed(name: str, parts: list[Tensor]) -> Tensor:  # in the rule's scratch, kept from step to step
        pad = parts[0].new_zeros((rows - total, *parts[0].shape[1:]))
        return torch.cat([*parts, pad], out=rule.scratch.take(f"pack.{name}", (rows, *pad.shape[1:]), pad, dtype))

    grads = [p.grad.reshape(-1) for p in params]  # type: ignore[union-attr]  # params with grads only
    grad = packed("grad", grads)
    if maximize:
        grad.neg_()
    theta = packed("theta", [p.detach().reshape(-1) for p in params])
    shapes = rule.state_shapes()  # each per-coordinate state is (numel, *shape) (init_state, load_state_dict)
    state = {k: packed(k, [s[k] for s in states]) for k in shapes}
    step = step_counts(states, rule).to(device=device)
    segments = Segments(sizes, rows, device)
    stats = rule.segment_stats(grad, theta, state, step, segments)
    extra: dict[str, Any] = {}
    tensor_keys: list[str] = []
    if rule.whole_tensor:  # per-tensor state (e.g. factored statistics): packed one tensor after the other
        extra["shapes"] = [tuple(p.shape) for p in params]
        tensor_keys = list(rule.tensor_state_shapes(extra["shapes"][0]))
        state.update({k: torch.cat([s[k] for s in states]).to(dtype) for k in tensor_keys})
    # parameters wider than the net's dtype (float64) take the update in their own (stepped_parameter)
    wider = wider_dtype(params[0].dtype, dtype)  # (a pack's parameters share one dtype)
    if rule.applies_update and net is rule and not torch.is_grad_enabled() and not wider:
        extra["update"] = (lr, weight_decay)  # the rule may apply it to theta, this step's own copy, itself
    # the packed state is this step's own copy: the rule may write the new state into it
    delta, new_state = net(grad, theta, state, step, stats, out_state=state, segments=segments, **extra)
    if isinstance(lr, Tensor):
        lr = lr.to(device=device, dtype=dtype)
    if delta is None:  # applied by the rule
        new_theta = theta[:total].split(sizes)
    elif not wider:  # into theta, this step's own copy
        work = rule.scratch.take("pack.update", (total,), delta)
        new_theta = decoupled_update(theta[:total], delta[:total], lr, weight_decay, work=work).split(sizes)
    else:
        flat_params = torch.cat([p.detach().reshape(-1) for p in params])
        new_theta = stepped_parameter(flat_params, theta[:total], delta[:total], lr, weight_decay).split(sizes)
    torch._foreach_copy_(params, [t.view(p.shape) for t, p in zip(new_theta, params, strict=True)])
    for k in shapes:
        torch._foreach_copy_([s[k] for s in states], list(new_state[k][:total].split(sizes)))
    for k in tensor_keys:
        targets = [s[k] for s in states]
        torch._foreach_copy_(targets, list(new_state[k].split([t.shape[0] for t in targets])))
