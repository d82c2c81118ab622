"""MuonAdamW: Muon on every matrix (conv weights by their matrix view), AdamW on the rest, one optimizer."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from learned_optim.bench.baselines import BASELINES, MuonAdamW
from learned_optim.features import NEWTON_SCHULZ_COEFFICIENTS, newton_schulz_orthogonalize

MU = 0.95


def gradients(shape, count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def trajectory(optimizer_class, start, grads, **kwargs):
    """The parameter after each step of ``optimizer_class([param], **kwargs)`` fed ``grads`` one by one."""
    param = torch.nn.Parameter(start.clone())
    optimizer = optimizer_class([param], **kwargs)
    points = []
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
        points.append(param.detach().clone())
    return points, optimizer


def direct_muon(start, grads, lr, weight_decay, *, nesterov=True, scale=True):
    """Muon written out in the textbook form: b <- mu b + g, direction g + mu b (b without Nesterov), its
    Newton-Schulz polar factor on the (shape[0], prod(shape[1:])) view, lr * 0.2 sqrt(max side), decoupled decay."""
    rows, cols = start.shape[0], math.prod(start.shape[1:])
    theta, buffer, points = start.clone(), torch.zeros_like(start), []
    for grad in grads:
        buffer = MU * buffer + grad
        direction = grad + MU * buffer if nesterov else buffer
        polar = newton_schulz_orthogonalize(direction.reshape(rows, cols), 5).reshape(start.shape)
        theta = theta * (1 - lr * weight_decay) - lr * (0.2 * math.sqrt(max(rows, cols)) if scale else 1.0) * polar
        points.append(theta.clone())
    return points, buffer


@pytest.mark.parametrize(
    "shape",
    [(6, 10), (10, 6), (4, 3, 3, 3)],
    ids=["linear-wide", "linear-tall", "conv"],
)
def test_matrix_steps_are_muon_on_the_matrix_view(shape):
    """Three steps of a Linear (wide and tall) and a conv weight equal Muon written out directly: momentum,
    Nesterov, Newton-Schulz on the matrix view, the RMS-matching scale and decoupled weight decay. torch's
    EMA-form buffer is (1 - mu) times the textbook one; the orthogonalisation does not see that scale."""
    lr, weight_decay = 0.05, 0.1
    start, grads = torch.randn(shape, generator=torch.Generator().manual_seed(1)), gradients(shape, 3)
    got, optimizer = trajectory(MuonAdamW, start, grads, lr=lr, weight_decay=weight_decay)
    want, buffer = direct_muon(start, grads, lr, weight_decay)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    (state,) = optimizer.state.values()
    assert set(state) == {"momentum_buffer"}
    torch.testing.assert_close(state["momentum_buffer"], (1 - MU) * buffer)
    # the comparison sees the Nesterov term (from the second step on) and the scale
    for variant in (dict(nesterov=False), dict(scale=False)):
        other, _ = direct_muon(start, grads, lr, weight_decay, **variant)
        assert not torch.allclose(got[-1], other[-1], rtol=1e-3, atol=1e-4), variant
    without_nesterov, _ = trajectory(MuonAdamW, start, grads, lr=lr, weight_decay=weight_decay, nesterov=False)
    torch.testing.assert_close(without_nesterov[-1], direct_muon(start, grads, lr, weight_decay, nesterov=False)[0][-1])


@pytest.mark.parametrize("shape", [(5,), (), (1, 7), (7, 1), (1, 1, 3, 3)], ids=["bias", "scalar", "row", "col", "1x1"])
def test_other_parameters_step_exactly_like_torch_adamw(shape):
    """A bias, a scalar, a single row or column (a one-output head), a one-filter conv: torch.optim.AdamW's steps and
    state, bit for bit, over several steps with weight decay."""
    start, grads = torch.randn(shape, generator=torch.Generator().manual_seed(2)), gradients(shape, 4)
    got, ours = trajectory(MuonAdamW, start, grads, lr=0.01, weight_decay=0.1)
    want, theirs = trajectory(torch.optim.AdamW, start, grads, lr=0.01, weight_decay=0.1)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    (state,) = ours.state.values()
    (reference,) = theirs.state.values()
    assert state.keys() == reference.keys()
    for key in state:
        assert torch.equal(state[key], reference[key]) and state[key].dtype == reference[key].dtype
    assert not MuonAdamW.takes_muon_step(shape)


def test_a_linear_weight_steps_like_torch_muon_matching_adamw_rms():
    """torch.optim.Muon(adjust_lr_fn="match_rms_adamw") over five steps, as far as its bfloat16 Newton-Schulz
    products allow (1.6% of the displacement here, whose float32 iteration is the exact one); Muon without Nesterov
    lands 20% away, torch's default lr scale (1 here) 33%."""
    lr, weight_decay = 0.02, 0.1
    start, grads = torch.randn(24, 64, generator=torch.Generator().manual_seed(3)), gradients((24, 64), 5)
    reference, _ = trajectory(
        torch.optim.Muon, start, grads, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"
    )

    def distance(points):
        return max(float((p - r).norm() / (r - start).norm()) for p, r in zip(points, reference, strict=True))

    assert distance(trajectory(MuonAdamW, start, grads, lr=lr, weight_decay=weight_decay)[0]) < 0.04
    assert distance(trajectory(MuonAdamW, start, grads, lr=lr, weight_decay=weight_decay, nesterov=False)[0]) > 0.1
    original_scale, _ = trajectory(torch.optim.Muon, start, grads, lr=lr, weight_decay=weight_decay)  # lr * 1
    assert distance(original_scale) > 0.2  # against lr * 0.2 sqrt(64) = 1.6 lr


def test_torch_muon_with_a_float32_iteration_is_muon_adamw(monkeypatch):
    """With torch.optim.Muon's bfloat16 Newton-Schulz swapped for the project's float32 one, the two agree to float
    rounding on a wide and a tall matrix: momentum, Nesterov, scale and decay are torch's."""
    from torch.optim import _muon

    def float32_iteration(grad, ns_coefficients, ns_steps, eps):
        assert tuple(ns_coefficients) == NEWTON_SCHULZ_COEFFICIENTS and ns_steps == 5 and eps == 1e-7
        return newton_schulz_orthogonalize(grad, ns_steps, eps)

    monkeypatch.setattr(_muon, "_zeropower_via_newtonschulz", float32_iteration)
    for shape in ((8, 12), (12, 8)):
        start, grads = torch.randn(shape, generator=torch.Generator().manual_seed(4)), gradients(shape, 5)
        kwargs = dict(lr=0.03, weight_decay=0.05)
        want, theirs = trajectory(torch.optim.Muon, start, grads, adjust_lr_fn="match_rms_adamw", **kwargs)
        got, ours = trajectory(MuonAdamW, start, grads, **kwargs)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        (state,) = ours.state.values()
        (reference,) = theirs.state.values()
        torch.testing.assert_close(state["momentum_buffer"], reference["momentum_buffer"])


def test_torch_muon_refuses_what_muon_adamw_takes():
    """The reason for the class: torch.optim.Muon accepts only 2-D parameters."""
    for shape in ((4, 3, 3, 3), (5,)):
        with pytest.raises(ValueError, match="2D"):
            torch.optim.Muon([torch.nn.Parameter(torch.zeros(shape))])
    assert MuonAdamW.takes_muon_step((4, 3, 3, 3)) and MuonAdamW.takes_muon_step((2, 2))
    assert MuonAdamW.muon_scale((4, 3, 3, 3)) == pytest.approx(0.2 * math.sqrt(27))


def small_model():
    torch.manual_seed(5)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(), torch.nn.Linear(16, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)
    )


TEACHER = torch.randn(32, 1, generator=torch.Generator().manual_seed(6)) / 4


def train_steps(model, optimizer, steps, seed, scheduler=None):
    """``steps`` steps on fresh batches (from ``seed``) of a linear teacher's regression; returns the losses."""
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 2, 4, 4, generator=generator)
        y = x.flatten(1) @ TEACHER

        def closure(x=x, y=y):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        losses.append(float(optimizer.step(closure).detach()))
        if scheduler is not None:
            scheduler.step()
    return losses


def test_a_model_trains_and_its_state_dict_resumes_bit_identically():
    """Conv and Linear weights by Muon, biases and the one-output head by AdamW, in one param group; a run saved
    after 3 steps and resumed in a fresh optimizer continues exactly as the uninterrupted run."""
    model = small_model()
    optimizer = MuonAdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    losses = train_steps(model, optimizer, 3, seed=0)
    saved_model, saved = copy.deepcopy(model.state_dict()), io.BytesIO()
    torch.save(optimizer.state_dict(), saved)
    train_steps(model, optimizer, 3, seed=1)
    kinds = {name: set(optimizer.state[p]) for name, p in model.named_parameters()}
    assert kinds["0.weight"] == kinds["2.weight"] == {"momentum_buffer"}
    assert kinds["4.weight"] == kinds["0.bias"] == {"step", "exp_avg", "exp_avg_sq"}

    resumed = small_model()
    resumed.load_state_dict(saved_model)
    fresh = MuonAdamW(resumed.parameters(), lr=0.5)  # lr and weight decay come back from the state dict
    saved.seek(0)
    fresh.load_state_dict(torch.load(saved, weights_only=True))
    train_steps(resumed, fresh, 3, seed=1)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    losses += train_steps(model, optimizer, 150, seed=2)
    assert sum(losses[-20:]) / 20 < 0.25 * sum(losses[:3]) / 3, losses


def test_an_lr_scheduler_drives_both_rules():
    """LambdaLR writes group["lr"]: halving it gives the run of half the lr, for the matrices and the rest alike."""
    halved, direct, full = small_model(), small_model(), small_model()
    optimizer = MuonAdamW(halved.parameters(), lr=0.02)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    train_steps(halved, optimizer, 2, seed=0, scheduler=scheduler)
    train_steps(direct, MuonAdamW(direct.parameters(), lr=0.01), 2, seed=0)
    train_steps(full, MuonAdamW(full.parameters(), lr=0.02), 2, seed=0)
    for a, b, c in zip(halved.parameters(), direct.parameters(), full.parameters(), strict=True):
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_sparse_gradients_and_complex_matrices_are_refused():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    optimizer = MuonAdamW(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="MuonAdamW does not support sparse gradients"):
        optimizer.step()
    matrix = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
    matrix.grad = torch.ones_like(matrix)
    with pytest.raises(RuntimeError, match="MuonAdamW does not support complex"):
        MuonAdamW([matrix]).step()


def test_a_non_finite_gradient_propagates_as_in_torch():
    """No check of its own: a NaN gradient reaches the parameter as in torch.optim.Muon and torch.optim.AdamW."""
    for shape, reference in (((4, 4), torch.optim.Muon), ((4,), torch.optim.AdamW)):
        grad = torch.full(shape, math.nan)
        got, _ = trajectory(MuonAdamW, torch.ones(shape), [grad])
        want, _ = trajectory(reference, torch.ones(shape), [grad])
        assert torch.equal(got[0].isnan(), want[0].isnan()) and got[0].isnan().all()


def test_registered_for_evaluate_with_adamws_learning_rates():
    info = BASELINES["muon-adamw"]
    assert info.opt_class is MuonAdamW and info.lr_grid == BASELINES["sam-adamw"].lr_grid
    optimizer = info.build([torch.nn.Parameter(torch.zeros(3, 3))], lr=1e-3)
    assert optimizer.defaults["weight_decay"] == torch.optim.AdamW([torch.zeros(1)]).defaults["weight_decay"]
