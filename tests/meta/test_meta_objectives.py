"""Meta-objectives on hand-checkable losses, and the log objective's stability where ratios overflow."""

from __future__ import annotations

import math

import pytest
import torch

from learned_optim.objectives import meta_objective, safe_log


def test_sum_and_last_objectives():
    losses = torch.tensor([4.0, 2.0, 1.0])
    assert float(meta_objective("sum", losses)) == 7.0
    assert float(meta_objective("last", losses)) == 1.0


def test_log_objective_is_the_mean_log_ratio():
    losses = torch.tensor([4.0, 2.0, 1.0])
    # (1/3) * (log(4/8) + log(2/8) + log(1/8)) = (1/3) * (-1 - 2 - 3) * log 2 = -2 log 2
    value = meta_objective("log", losses, initial_loss=8.0)
    assert float(value) == pytest.approx(-2 * math.log(2), rel=1e-6)


def test_log_last_objective_divides_by_the_global_step():
    losses = torch.tensor([4.0, 2.0, 1.0])
    # (1/t) log(f_t / f_0) with t = 40, f_t = 1, f_0 = e^4: -4 / 40
    value = meta_objective("log_last", losses, initial_loss=math.exp(4.0), last_step=40)
    assert float(value) == pytest.approx(-0.1, rel=1e-6)


def test_log_objective_is_stable_where_the_naive_ratio_overflows():
    losses = torch.tensor([1e30, 3e35], requires_grad=True)  # float32
    f0 = 1e-10
    naive = torch.log(losses / f0).mean()  # 1e40 and 3e45 overflow float32
    assert not torch.isfinite(naive)
    value = meta_objective("log", losses, initial_loss=f0)
    expected = 0.5 * (math.log(1e30 / 1e-10) + math.log(3e35 / 1e-10))
    assert float(value.detach()) == pytest.approx(expected, rel=1e-6)
    (grad,) = torch.autograd.grad(value, losses)
    # d/df_t of (1/L) sum log f_t = 1 / (L f_t): tiny but finite, never a huge ratio
    torch.testing.assert_close(grad, torch.tensor([0.5 / 1e30, 0.5 / 3e35]))
    last = meta_objective("log_last", losses, initial_loss=f0, last_step=80)
    assert float(last.detach()) == pytest.approx(math.log(3e35 / 1e-10) / 80, rel=1e-6)


def test_log_of_a_zero_loss_is_finite():
    assert torch.isfinite(safe_log(torch.tensor([0.0])))


def test_objective_argument_errors():
    losses = torch.tensor([1.0])
    with pytest.raises(ValueError, match="initial loss"):
        meta_objective("log", losses)
    with pytest.raises(ValueError, match="positive finite"):
        meta_objective("log", losses, initial_loss=0.0)
    with pytest.raises(ValueError, match="last_step"):
        meta_objective("log_last", losses, initial_loss=1.0)
    with pytest.raises(ValueError, match="unknown meta-objective"):
        meta_objective("median", losses)
