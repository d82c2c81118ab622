"""The curvature primitives of the regularizers and the flatness diagnostics, on a quadratic with a known Hessian."""

import math

import pytest
import torch

from learned_optim._numerics import global_norm, seeded_generator
from learned_optim.meta import curvature

H = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, -5.0]], dtype=torch.float64)


def quadratic(p):
    x = torch.cat([p["a"], p["b"]])
    return 0.5 * x @ H @ x


PARAMS = {"a": torch.tensor([0.3, -1.0], dtype=torch.float64), "b": torch.tensor([2.0], dtype=torch.float64)}


def test_hvp_is_the_hessian_times_the_vector():
    v = {"a": torch.tensor([1.0, 2.0], dtype=torch.float64), "b": torch.tensor([-1.0], dtype=torch.float64)}
    hv = curvature.hvp(quadratic, PARAMS, v)
    torch.testing.assert_close(torch.cat([hv["a"], hv["b"]]), H @ torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))


@pytest.mark.parametrize("vectorize", [True, False])
def test_hutchinson_forms_are_exact_quadratic_forms_and_average_to_the_trace(vectorize):
    gen = seeded_generator(0)
    probes = {k: curvature.rademacher(v, gen, (1000, *v.shape)) for k, v in PARAMS.items()}
    forms = curvature.hutchinson_forms(quadratic, PARAMS, probes, vectorize=vectorize)
    z = torch.cat([probes["a"], probes["b"]], dim=1)
    torch.testing.assert_close(forms, torch.einsum("ni,ij,nj->n", z, H, z))
    # Var(z^T H z) = 2 sum_{i != j} H_ij^2 = 4 here: the mean of 1000 forms is within 5 standard errors of tr H = 0
    assert abs(float(forms.mean()) - float(H.trace())) < 5 * math.sqrt(4 / 1000)


def test_power_iteration_finds_the_largest_magnitude_eigenvalue():
    start = {"a": torch.tensor([1.0, 1.0], dtype=torch.float64), "b": torch.tensor([1.0], dtype=torch.float64)}
    v, value = curvature.power_iteration(
        lambda u: curvature.hvp(quadratic, PARAMS, u),
        start,
        200,
        rayleigh=lambda hv, u: float(curvature.dot(hv, u)),
        tol=1e-12,
    )
    assert value == pytest.approx(-5.0, rel=1e-9)
    assert float(curvature.norm(v)) == pytest.approx(1.0)
    assert abs(float(v["b"][0])) == pytest.approx(1.0, rel=1e-6)


def test_power_iteration_reports_zero_when_hv_vanishes_and_nan_when_it_is_not_finite():
    start = {"a": torch.ones(2)}
    assert curvature.power_iteration(lambda u: {"a": torch.zeros(2)}, start, 5)[1] == 0.0
    assert math.isnan(curvature.power_iteration(lambda u: {"a": torch.full((2,), math.nan)}, start, 5)[1])


def test_global_norm_accumulates_in_float64():
    big = torch.full((4,), 3e19, dtype=torch.float32)  # its square overflows float32
    assert global_norm([big, torch.tensor([0.0])]) == pytest.approx(6e19)
    assert global_norm([]) == 0.0
