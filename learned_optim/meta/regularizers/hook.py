"""The meta-loss hook that applies the config's regularizer blocks at the trajectory points they select (see
:mod:`learned_optim.meta.regularizers`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..unroll import MetaLossHook, StepInputs, as_hook
from .kinds import RegularizerBlock, parse_blocks


class RegularizerHook(MetaLossHook):
    """The meta-loss hook of a list of regularizer blocks (see the module docstring).

    Args:
        blocks: config mappings or :class:`RegularizerBlock` objects.
        segment_length: truncation length of the unroll (needed by ``where: segment_end``).
        seed: if given, the regularizers draw from their own generator seeded with it instead of
            torch's global RNG.

    The trainer calls :meth:`begin_trajectory` with each trajectory's length (needed by ``posterior``
    and ``final``). :meth:`pop_values` returns the mean raw value (before the weight) of each block
    over the calls since the last pop, for logging.
    """

    def __init__(
        self,
        blocks: Sequence[Mapping[str, Any] | RegularizerBlock],
        *,
        segment_length: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.blocks = parse_blocks(blocks)
        self.segment_length = segment_length
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.length: int | None = None
        self.wants_step_inputs = any(b.regularizer.wants_step_inputs for b in self.blocks)
        self._values: dict[str, list[float]] = {}
        if any(b.where == "segment_end" for b in self.blocks) and not segment_length:
            raise ValueError("where: segment_end needs the segment length (RegularizerHook(segment_length=...))")

    def begin_trajectory(self, length: int) -> None:
        self.length = int(length)

    def active(self, block: RegularizerBlock, step: int) -> bool:
        """Whether ``block`` applies at the point :math:`\\theta_t` of step ``t = step``."""
        if step % block.every:
            return False
        if block.where == "all":
            return True
        if block.where == "segment_end":
            assert self.segment_length
            return step % self.segment_length == 0 or (self.length is not None and step == self.length)
        if self.length is None:
            raise RuntimeError(
                f"where: {block.where} needs the trajectory length; call begin_trajectory(length) "
                "before unrolling (the MetaTrainer does)"
            )
        if block.where == "final":
            return step == self.length
        return step > self.length // 2  # posterior: the second half

    def __call__(
        self, params: Mapping[str, Tensor], task: Any, batch: Any, step: int, *, inputs: StepInputs | None = None
    ) -> Tensor | None:
        def loss_fn(p: Mapping[str, Tensor]) -> Tensor:
            return task.loss(p, batch)

        total = None
        for block in self.blocks:
            if not self.active(block, step):
                continue
            value = block.regularizer.term(loss_fn, params, inputs=inputs, generator=self.generator)
            self._values.setdefault(block.name, []).append(float(value.detach()))
            term = block.weight * value
            total = term if total is None else total + term
        return total

    def pop_values(self) -> dict[str, float]:
        """Mean raw value of each block since the last call (blocks that did not run are left out)."""
        out = {k: sum(v) / len(v) for k, v in self._values.items() if v}
        self._values.clear()
        return out


class _CombinedHook(MetaLossHook):
    """Sum of several meta-loss hooks, forwarding ``begin_trajectory``/``pop_values``/step inputs."""

    def __init__(self, hooks: Sequence[MetaLossHook]) -> None:
        self.hooks = list(hooks)
        self.wants_step_inputs = any(h.wants_step_inputs for h in self.hooks)

    def begin_trajectory(self, length: int) -> None:
        for h in self.hooks:
            h.begin_trajectory(length)

    def __call__(
        self, params: Mapping[str, Tensor], task: Any, batch: Any, step: int, *, inputs: StepInputs | None = None
    ) -> Tensor | None:
        total = None
        for h in self.hooks:
            term = h(params, task, batch, step, inputs=inputs if h.wants_step_inputs else None)
            if term is not None:
                total = term if total is None else total + term
        return total

    def pop_values(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for h in self.hooks:
            out.update(h.pop_values())
        return out


def combine_hooks(*hooks: MetaLossHook | Callable[..., Tensor | None] | None) -> MetaLossHook | None:
    """One hook summing the given ones (``None`` entries dropped, functions wrapped by
    :func:`~learned_optim.meta.unroll.as_hook`; a single hook is returned as is)."""
    present = [h for h in (as_hook(h) for h in hooks) if h is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else _CombinedHook(present)
