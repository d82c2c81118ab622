"""Tests of learned_optim.meta.stepsize: the stable log meta-objective and the TbT/TbV least-squares machinery."""

from __future__ import annotations

import math

import mpmath  # a dependency of torch (through sympy)
import pytest
import torch

from learned_optim.meta.stepsize import (
    GUARD_FACTOR,
    autograd_value_and_grad,
    gd_least_squares,
    gd_least_squares_reference,
    half_mse,
    last_loss_closed_form,
    log_last_loss,
    log_objective,
    log_objective_grad,
    meta_train_step_size,
    quadratic_spectrum,
    random_quadratic,
    sample_least_squares_tasks,
    split_task,
    unrolled_last_loss,
)


def exact_log_last_loss(eta: float, lam: torch.Tensor, c: torch.Tensor, t: int) -> float:
    """log f(w_t) in 40-digit arithmetic with unbounded exponent range (an independent reference)."""
    with mpmath.workdps(40):
        total = mpmath.mpf(0)
        for li, ci in zip(lam.tolist(), c.tolist(), strict=True):
            li, ci = mpmath.mpf(li), mpmath.mpf(ci)  # exact conversion of the float64 inputs
            total += li * ci**2 * (1 - mpmath.mpf(eta) * li) ** (2 * t)
        return float(mpmath.log(total / 2))


@pytest.fixture(scope="module")
def small_quadratic():
    H, w0 = random_quadratic(6, seed=3)
    lam, c = quadratic_spectrum(H, w0)
    return H, w0, lam, c


def test_spectrum_sorted_and_reconstructs(small_quadratic):
    H, w0, lam, c = small_quadratic
    assert torch.all(lam[1:] >= lam[:-1]) and lam[0] > 0
    assert torch.allclose(0.5 * w0 @ H @ w0, 0.5 * (lam * c**2).sum(), rtol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.01, 0.05, 0.2, 0.7])
@pytest.mark.parametrize("t", [1, 7, 30])
def test_closed_form_log_objective_equals_direct(small_quadratic, eta, t):
    H, w0, lam, c = small_quadratic
    direct = torch.log(unrolled_last_loss(torch.tensor(eta, dtype=torch.float64), H, w0, t))
    closed = log_last_loss(eta, lam, c, t)
    assert torch.isfinite(direct)
    assert float(closed) == pytest.approx(float(direct), rel=1e-9, abs=1e-9)
    assert float(closed) == pytest.approx(exact_log_last_loss(eta, lam, c, t), rel=1e-12, abs=1e-12)
    assert float(torch.log(last_loss_closed_form(eta, lam, c, t))) == pytest.approx(float(closed), rel=1e-9, abs=1e-9)
    assert float(log_objective(eta, lam, c, t)) == pytest.approx(float(closed) / t, rel=1e-14)


@pytest.mark.parametrize("eta,t", [(0.2, 2000), (10.0, 300), (0.05, 400_000), (1e-4, 20_000)])
def test_stable_where_naive_overflows(small_quadratic, eta, t):
    H, w0, lam, c = small_quadratic
    naive = float(torch.log(last_loss_closed_form(eta, lam, c, t)))
    exact = exact_log_last_loss(eta, lam, c, t)
    if abs(exact) > 710:  # outside float64's exponent range: the direct computation over/underflows
        assert naive in (math.inf, -math.inf)
        if t <= 2000:  # and so does backprop through the unrolled GD
            value, grad = autograd_value_and_grad(lambda e: torch.log(unrolled_last_loss(e, H, w0, t)) / t)(eta)
            assert not (math.isfinite(value) and math.isfinite(grad) and grad != 0.0)
    stable = float(log_last_loss(eta, lam, c, t))
    assert math.isfinite(stable)
    assert stable == pytest.approx(exact, rel=1e-10)
    g = log_objective_grad(eta, lam, c, t)
    assert torch.isfinite(g)
    _, g_auto = autograd_value_and_grad(lambda e: log_objective(e, lam, c, t))(eta)
    assert g_auto == pytest.approx(float(g), rel=1e-8, abs=1e-10)


def test_overflow_cases_really_overflow(small_quadratic):
    """Guard against the test above silently losing its teeth (every case inside float64's range)."""
    _, _, lam, c = small_quadratic
    assert exact_log_last_loss(0.2, lam, c, 2000) > 710
    assert exact_log_last_loss(10.0, lam, c, 300) > 710
    assert exact_log_last_loss(0.05, lam, c, 400_000) < -745


def test_naive_backprop_fails_in_the_spec_setting():
    """SPEC §5: 20-d quadratic, t = 80, eta0 = 0.1: plain backprop gives NaN (float32) / ~1e130 (float64)."""
    H, w0 = random_quadratic(20, seed=0)
    lam, c = quadratic_spectrum(H, w0)
    _, g32_last = autograd_value_and_grad(lambda e: unrolled_last_loss(e, H.float(), w0.float(), 80), torch.float32)(
        0.1
    )
    _, g32_log = autograd_value_and_grad(
        lambda e: torch.log(unrolled_last_loss(e, H.float(), w0.float(), 80)) / 80, torch.float32
    )(0.1)
    _, g64_last = autograd_value_and_grad(lambda e: unrolled_last_loss(e, H, w0, 80))(0.1)
    assert not math.isfinite(g32_last) and not math.isfinite(g32_log)
    assert abs(g64_last) > 1e100
    g_stable = float(log_objective_grad(0.1, lam, c, 80))
    assert 0 < g_stable < 100


@pytest.mark.parametrize("eta", [0.003, 0.02, 0.09, 0.5, 3.0])
def test_meta_gradient_matches_finite_differences(small_quadratic, eta):
    _, _, lam, c = small_quadratic
    t = 25
    h = 1e-6 * eta
    fd = (float(log_objective(eta + h, lam, c, t)) - float(log_objective(eta - h, lam, c, t))) / (2 * h)
    closed = float(log_objective_grad(eta, lam, c, t))
    _, auto = autograd_value_and_grad(lambda e: log_objective(e, lam, c, t))(eta)
    assert closed == pytest.approx(fd, rel=1e-5, abs=1e-7)
    assert auto == pytest.approx(closed, rel=1e-10, abs=1e-12)


def test_meta_gradient_batched_and_at_a_root_of_one_minus_eta_lambda(small_quadratic):
    _, _, lam, c = small_quadratic
    etas = torch.tensor([0.01, 1 / float(lam[2]), 0.3], dtype=torch.float64)
    g = log_objective_grad(etas, lam, c, 40)
    assert g.shape == (3,) and torch.isfinite(g).all()
    for i, e in enumerate(etas.tolist()):
        assert float(g[i]) == pytest.approx(float(log_objective_grad(e, lam, c, 40)), rel=1e-12)


def test_meta_training_converges_to_grid_optimum_and_projects(small_quadratic):
    _, _, lam, c = small_quadratic
    t = 20
    grid = torch.linspace(0, 4 / float(lam[-1]), 40_001, dtype=torch.float64)
    eta_star = float(grid[log_objective(grid, lam, c, t).argmin()])
    trace = meta_train_step_size(lambda e: (0.0, float(log_objective_grad(e, lam, c, t))), 0.1, 3000)
    assert min(trace.etas) >= 0.0
    assert trace.nonfinite == 0
    assert trace.final == pytest.approx(eta_star, rel=0.01)


def test_meta_training_skips_nonfinite_gradients_and_projects_onto_nonnegative():
    calls = iter([math.nan, 1.0, math.inf, 1e9, -1e9])
    trace = meta_train_step_size(lambda e: (0.0, next(calls)), 0.5, 5)
    assert trace.nonfinite == 2
    assert trace.etas[1] == 0.5  # NaN: unchanged
    assert trace.etas[2] == pytest.approx(0.5 - 0.01 / math.sqrt(2))  # meta step 1/(100 sqrt k)
    assert trace.etas[3] == trace.etas[2]  # inf: unchanged
    assert trace.etas[4] == 0.0  # pushed below zero: clipped
    assert trace.etas[5] == pytest.approx(1e9 * 0.01 / math.sqrt(5))


# --------------------------------------------------------------------------------------------------
# least squares: GD with the divergence guard, TbT / TbV
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d", [(12, 30), (40, 15)])
def test_batched_gd_matches_plain_gd(n, d):
    gen = torch.Generator().manual_seed(1)
    X, y, _ = sample_least_squares_tasks(3, n, d, 0.7, gen)
    etas = [1e-3, 0.05, 0.3, 2.0]
    guard = GUARD_FACTOR * 0.7
    w, div = gd_least_squares(X, y, etas, 25, guard)
    assert w.shape == (3, len(etas), d) and div.shape == (3, len(etas))
    for b in range(3):
        for j, eta in enumerate(etas):
            w_ref, div_ref = gd_least_squares_reference(X[b], y[b], eta, 25, guard)
            assert bool(div[b, j]) == div_ref
            torch.testing.assert_close(w[b, j], w_ref, rtol=1e-9, atol=1e-10)


def test_divergence_guard_freezes_a_run():
    gen = torch.Generator().manual_seed(2)
    sigma = 0.5
    X, y, _ = sample_least_squares_tasks(2, 30, 20, sigma, gen)
    guard = GUARD_FACTOR * sigma
    etas = [0.01, 5.0]  # 5.0 ≫ 2 / λ_max(XᵀX/n): diverges within a few steps
    w10, div10 = gd_least_squares(X, y, etas, 10, guard)
    w40, div40 = gd_least_squares(X, y, etas, 40, guard)
    assert not div10[:, 0].any() and div10[:, 1].all()
    assert torch.allclose(w10[:, 1].norm(dim=-1), torch.full((2,), guard, dtype=X.dtype), rtol=1e-12)
    torch.testing.assert_close(w40[:, 1], w10[:, 1], rtol=0, atol=0)  # frozen: later steps change nothing
    assert not torch.allclose(w40[:, 0], w10[:, 0])  # the converging run keeps moving
    # without the guard the same run would blow far past it
    w = torch.zeros(20, dtype=X.dtype)
    for _ in range(40):
        w = w - 5.0 * X[0].T @ (X[0] @ w - y[0]) / 30
    assert w.norm() > 1e6 * guard
    # a frozen run has a high meta-loss compared with a converging one
    loss = half_mse(w40, X, y)
    assert (loss[:, 1] > 100 * loss[:, 0]).all()


@pytest.mark.parametrize("n", [500, 9])
def test_tbt_tbv_split_sizes(n):
    X = torch.arange(2 * n * 3, dtype=torch.float64).reshape(2, n, 3)
    y = torch.arange(2 * n, dtype=torch.float64).reshape(2, n)
    X_tr, y_tr, X_m, y_m = split_task(X, y, "tbt")
    assert X_tr.shape == (2, n, 3) and X_m is X_tr and y_m is y_tr and y_tr.shape == (2, n)
    X_tr, y_tr, X_m, y_m = split_task(X, y, "tbv")
    assert X_tr.shape[-2] == n // 2 and X_m.shape[-2] == n - n // 2
    assert y_tr.shape[-1] == n // 2 and y_m.shape[-1] == n - n // 2
    torch.testing.assert_close(torch.cat([X_tr, X_m], dim=-2), X)  # disjoint and together all n
    torch.testing.assert_close(torch.cat([y_tr, y_m], dim=-1), y)
    if n == 500:
        assert (X_tr.shape[-2], X_m.shape[-2]) == (250, 250)
    with pytest.raises(ValueError):
        split_task(X, y, "tbx")


def test_sampled_tasks_follow_the_model():
    gen = torch.Generator().manual_seed(4)
    X, y, w_star = sample_least_squares_tasks(4, 2000, 10, 0.5, gen)
    torch.testing.assert_close(w_star.norm(dim=-1), torch.ones(4, dtype=torch.float64))
    noise = y - (X @ w_star.unsqueeze(-1)).squeeze(-1)
    assert noise.std().item() == pytest.approx(0.5, rel=0.05)
    assert X.var().item() == pytest.approx(1.0, rel=0.05)


def test_tbv_prefers_smaller_step_than_tbt_under_noise():
    """The effect the example measures, on a tiny instance: with n < d and large noise, TbT picks the
    largest stable step (fit the noise), TbV a much smaller one."""
    gen = torch.Generator().manual_seed(5)
    n, d, sigma = 40, 80, 3.0
    X, y, _ = sample_least_squares_tasks(30, n, d, sigma, gen)
    etas = torch.logspace(-4, 0, 9, dtype=torch.float64)
    chosen = {}
    for mode in ("tbt", "tbv"):
        X_tr, y_tr, X_m, y_m = split_task(X, y, mode)
        w, _ = gd_least_squares(X_tr, y_tr, etas, 40, GUARD_FACTOR * sigma)
        chosen[mode] = float(etas[half_mse(w, X_m, y_m).mean(0).argmin()])
    assert chosen["tbv"] * 10 <= chosen["tbt"]
