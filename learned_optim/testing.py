"""Helpers for tests and benchmarks that compare the optimizer's code paths.

:func:`fit_sign_descent` is a few-second stand-in for meta-training: it regresses a net's step toward
signSGD's, so that the optimizer battery (``tests/core/test_optimizer.py``) and the benchmarks
(``benchmarks/bf16_state.py``) can compare code paths on loss curves that go down. :class:`PerTensorSteps` is the
optimizer with packing off, the reference of the packed steps.
"""

from __future__ import annotations

import torch

from .nets.base import UpdateRule, functional_update
from .optimizer import LearnedOptimizer

__all__ = ["PerTensorSteps", "fit_sign_descent"]


class PerTensorSteps(LearnedOptimizer):
    """:class:`~learned_optim.LearnedOptimizer` with packing off: every tensor is stepped alone (a small one on the
    one-shot path, a large one on the blocked path or the native kernel), never in a pack of small tensors."""

    def _plan_packs(self, params: list[torch.Tensor]) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
        return [], params


def fit_sign_descent(
    rule: UpdateRule,
    *,
    iters: int = 100,
    n: int = 32,
    unroll: int = 8,
    target: float = 0.005,
    seed: int = 0,
    max_first_step: int = 40,
    grad_decades: int = 0,
) -> UpdateRule:
    r"""Fit ``rule`` in place by regression of its step toward ``-target * sign(g)`` on random quadratics.

    For each of ``iters`` random diagonal quadratics :math:`f(x) = \tfrac12 \sum_i c_i x_i^2`
    (:math:`c_i \sim U[0.5, 2]`, :math:`x_i \sim N(0, 0.2^2)`, ``n`` coordinates) the net is unrolled ``unroll``
    steps through :func:`~learned_optim.functional_update` (its own steps move the iterate; the iterate and
    state are detached between steps) and its weights take one Adam step (lr 1e-2) on

    .. math:: \sum_t \operatorname{mean}_i \big(\Delta_{t,i} / \text{target} + \operatorname{sign}(g_{t,i})\big)^2 .

    Options that widen the inputs the net sees: the step counter starts at a random offset in
    ``[0, max_first_step)`` per quadratic (``0``: always at step 1), and each gradient is scaled by
    :math:`10^{-k}`, ``k`` uniform in ``{0, ..., grad_decades}`` per step. Deterministic given ``seed``;
    returns ``rule`` with ``requires_grad`` off.
    """
    gen = torch.Generator().manual_seed(seed)
    rule.requires_grad_(True)
    meta_opt = torch.optim.Adam(rule.parameters(), lr=1e-2)
    for _ in range(iters):
        curvature = torch.rand(n, generator=gen) * 1.5 + 0.5
        x = torch.randn(n, generator=gen) * 0.2
        state = rule.init_state(n)
        first_step = int(torch.randint(0, max_first_step, (), generator=gen)) if max_first_step > 0 else 0
        meta_loss = torch.zeros(())
        for t in range(unroll):
            grad = curvature * x
            if grad_decades:
                grad = grad * 10 ** float(torch.randint(-grad_decades, 1, (), generator=gen))
            delta, state = functional_update(rule, None, grad, x, state, torch.tensor(float(first_step + t + 1)))
            meta_loss = meta_loss + (delta / target + torch.sign(grad)).square().mean()
            x = (x + delta).detach()
            state = {k: v.detach() for k, v in state.items()}
        meta_opt.zero_grad()
        meta_loss.backward()
        meta_opt.step()
    return rule.requires_grad_(False)
