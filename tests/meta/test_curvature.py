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


@pytest.mark.parametrize("mode", curvature.HVP_MODES)
def test_hvp_is_the_hessian_times_the_vector(mode):
    v = {"a": torch.tensor([1.0, 2.0], dtype=torch.float64), "b": torch.tensor([-1.0], dtype=torch.float64)}
    hv = curvature.hvp(quadratic, PARAMS, v, mode=mode)
    torch.testing.assert_close(torch.cat([hv["a"], hv["b"]]), H @ torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))


def test_reverse_hvp_where_forward_mode_fails():
    """An nn.Module MSE task of meta-mix on which jvp(grad) raises ("ZeroTensors are immutable", torch 2.14):
    the reverse-over-reverse product still runs, and equals the Hessian (torch.autograd.functional) times v."""
    from learned_optim.tasks import make_family

    family = make_family("meta-mix", widths=[32], depths=[1], batch_sizes=[16], eval_batch_size=16, rescale=None)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):  # the first MSE task of the distribution
        task = family.sample(gen)
        if getattr(task, "loss_kind", None) == "mse":
            break
    else:
        pytest.skip("no MSE task drawn")
    params = {k: v.detach().double() for k, v in task.init_params(gen).items()}
    batch = [b.double() if b.is_floating_point() else b for b in task.batch("train", gen)]
    v = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in params.items()}
    hv = curvature.hvp(lambda p: task.loss(p, batch), params, v, mode="reverse")
    names = list(params)

    def flat_loss(*flat):
        return task.loss(dict(zip(names, flat, strict=True)), batch)

    hessian = torch.autograd.functional.hessian(flat_loss, tuple(params[k] for k in names))
    for i, k in enumerate(names):
        expected = sum((hessian[i][j].reshape(params[k].numel(), -1) @ v[n].reshape(-1)) for j, n in enumerate(names))
        torch.testing.assert_close(hv[k].reshape(-1), expected)
    with pytest.raises(ValueError, match="hvp mode"):
        curvature.hvp(lambda p: task.loss(p, batch), params, v, mode="sideways")


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


def test_reverse_hvp_through_attention():
    """Reverse-over-reverse through scaled_dot_product_attention (the fused CPU kernel has no second
    derivative, so hvp runs attention on the math kernel): equal to central differences of the gradient."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    params = {
        "q": torch.randn(4, 4, generator=gen, dtype=torch.float64),
        "k": torch.randn(4, 4, generator=gen, dtype=torch.float64),
    }

    def loss(p):
        out = torch.nn.functional.scaled_dot_product_attention(x @ p["q"], x @ p["k"], x, is_causal=True)
        return out.square().mean()

    v = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64) for k, t in params.items()}
    hv = curvature.hvp(loss, params, v, mode="reverse")
    eps = 1e-5
    plus = torch.func.grad(loss)({k: params[k] + eps * v[k] for k in params})
    minus = torch.func.grad(loss)({k: params[k] - eps * v[k] for k in params})
    for k in params:
        torch.testing.assert_close(hv[k], (plus[k] - minus[k]) / (2 * eps), rtol=1e-6, atol=1e-8)
