"""learned_optim.bench.flatness: Hessian trace / top eigenvalue against torch.func.hessian, PGA against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from learned_optim.bench import flatness

D64 = torch.float64


def quadratic_batches():
    """Two 'batches' of sizes 1 and 3 whose losses are 1/2 x^T A_b x: the weighted Hessian is (A1 + 3 A2) / 4."""
    A1 = torch.diag(torch.tensor([2.0, 1.0, 4.0], dtype=D64))
    A2 = torch.tensor([[1.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 0.5]], dtype=D64)
    batches = [(torch.zeros(1), A1), (torch.zeros(3), A2)]

    def loss(params, batch):
        x = params["x"]
        return 0.5 * x @ batch[1] @ x

    return loss, batches, (A1 + 3 * A2) / 4


def test_hessian_trace_and_eigenvalue_of_a_weighted_quadratic():
    loss, batches, H = quadratic_batches()
    params = {"x": torch.tensor([0.3, -1.0, 2.0], dtype=D64)}
    estimate = flatness.hessian_trace(params, loss, batches, probes=4000, probe_chunk=1000)
    off = H.square().sum() - H.diagonal().square().sum()
    assert abs(estimate - float(H.trace())) < 4 * math.sqrt(2 * float(off) / 4000)
    eig = torch.linalg.eigvalsh(H)
    assert flatness.hessian_top_eigenvalue(params, loss, batches, iters=200, tol=1e-12) == pytest.approx(
        float(eig.abs().max()), rel=1e-8
    )
    assert flatness.hessian_trace(params, loss, batches, probes=30, vectorize=False) == pytest.approx(
        flatness.hessian_trace(params, loss, batches, probes=30)
    )
    # reverse-over-reverse products give the same numbers (the suite's mode, for LSTMs and fused attention)
    assert flatness.hessian_trace(
        params, loss, batches, probes=30, vectorize=False, hvp_mode="reverse"
    ) == pytest.approx(flatness.hessian_trace(params, loss, batches, probes=30))
    assert flatness.hessian_top_eigenvalue(
        params, loss, batches, iters=200, tol=1e-12, hvp_mode="reverse"
    ) == pytest.approx(float(eig.abs().max()), rel=1e-8)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_module_api_matches_exact_hessian_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = Net().double()
    x, y = torch.randn(24, 3, dtype=D64), torch.randint(0, 3, (24,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def full_loss(vec):
        p = {n: v.reshape(s) for n, v, s in zip(names, torch.split(vec, sizes), shapes, strict=True)}
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    vec = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    H = torch.func.hessian(full_loss)(vec)
    n = 3000
    trace = flatness.hessian_trace(model, F.cross_entropy, loader, probes=n, probe_chunk=1000)
    off = H.square().sum() - H.diagonal().square().sum()
    assert abs(trace - float(H.trace())) < 4 * math.sqrt(2 * float(off) / n)
    eig = torch.linalg.eigvalsh(H)
    top = eig[eig.abs().argmax()]
    assert flatness.hessian_top_eigenvalue(model, F.cross_entropy, loader, iters=300, tol=1e-12) == pytest.approx(
        float(top), rel=1e-6
    )
    assert flatness.gradient_norm(model, F.cross_entropy, loader) == pytest.approx(
        float(torch.func.grad(full_loss)(vec).norm()), rel=1e-10
    )
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="no batches"):
        flatness.hessian_trace(model, F.cross_entropy, [])


def test_pga_sharpness_and_max_grad_norm_reach_the_corners():
    a = torch.tensor([1.0, 2.0, 0.5], dtype=D64)
    c = torch.tensor([1.0, -2.0, 0.5], dtype=D64)
    at_min = {"x": torch.zeros(3, dtype=D64)}
    batches = [None]

    def bowl(p, batch):
        return 0.5 * (a * p["x"].square()).sum()

    def plane(p, batch):
        return c @ p["x"]

    radii = (0.01, 0.1)
    # convex bowl at its minimum: the max over the L-inf ball is at a corner, 1/2 sum a_i r^2
    sharp = flatness.pga_sharpness(at_min, bowl, batches, radii=radii)
    for r in radii:
        assert sharp[r] == pytest.approx(0.5 * float(a.sum()) * r * r, rel=1e-12)
    # linear loss: r |c|_1 exactly
    assert flatness.pga_sharpness(at_min, plane, batches, radii=radii)[0.1] == pytest.approx(0.1 * float(c.abs().sum()))
    # gradient norm of the bowl: |a * delta| is largest at a corner, r |a|_2
    grad_norm = flatness.pga_max_grad_norm(at_min, bowl, batches, radii=radii)
    for r in radii:
        assert grad_norm[r] == pytest.approx(r * float(a.norm()), rel=1e-12)
    # fewer steps than needed to cross the ball from the start give a lower bound, never more
    short = flatness.pga_sharpness(at_min, bowl, batches, radii=(0.1,), steps=1, step_fraction=0.01)
    assert 0 <= short[0.1] <= sharp[0.1]


def test_report_and_task_flatness():
    loss, batches, H = quadratic_batches()
    params = {"x": torch.tensor([0.3, -1.0, 2.0], dtype=D64)}
    report = flatness.flatness_report(params, loss, batches, radii=(0.01,), probes=8, iters=5, steps=3)
    assert set(report) == {
        "loss",
        "grad_norm",
        "hessian_trace",
        "hessian_eigenvalue",
        "sharpness@0.01",
        "max_grad_norm@0.01",
    }
    with pytest.raises(ValueError, match="unknown flatness metric"):
        flatness.FlatnessOptions(metrics=("hessian",))
    with pytest.raises(ValueError, match="hvp_mode"):
        flatness.FlatnessOptions(hvp_mode="backward")

    class Task:
        def batch(self, split, generator):
            return batches[1]

        def loss(self, p, batch):
            return loss(p, batch)

    options = flatness.FlatnessOptions(probes=4, iters=3, radii=(0.1,), steps=2, metrics=("hessian_trace", "sharpness"))
    out = flatness.task_flatness(Task(), params, options, torch.Generator().manual_seed(0))
    assert set(out) == {"hessian_trace", "sharpness@0.1"}
