"""SAM, GSAM (pytorch_optimizer), GAM and Entropy-SGD baselines: one step against hand-computed updates."""

from __future__ import annotations

import pytest
import torch

from learned_optim.bench.baselines import BASELINES, GAM, EntropySGD, gsam, sam, sam_adamw
from learned_optim.bench.evaluate import evaluate
from learned_optim.tasks.base import Task

D64 = torch.float64
A = torch.diag(torch.tensor([1.0, 3.0, 0.5], dtype=D64))
X0 = torch.tensor([1.0, 1.0, -2.0], dtype=D64)


def run_step(optimizer_factory, **kwargs):
    """One step on L(x) = 1/2 x^T A x from X0; returns (new x, returned loss, closure calls)."""
    x = X0.clone().requires_grad_(True)
    opt = optimizer_factory([x], **kwargs)
    calls = []

    def closure():
        opt.zero_grad()
        loss = 0.5 * x @ A @ x
        loss.backward()
        calls.append(float(loss.detach()))
        return loss

    loss = opt.step(closure)
    return x.detach(), float(loss.detach()), len(calls)


def test_sam_step():
    pytest.importorskip("pytorch_optimizer")
    lr, rho = 0.1, 0.05
    g = A @ X0
    expected = X0 - lr * A @ (X0 + rho * g / g.norm())
    x, loss, calls = run_step(sam, lr=lr, rho=rho)
    torch.testing.assert_close(x, expected)
    assert loss == pytest.approx(float(0.5 * X0 @ A @ X0)) and calls == 2


def test_sam_adamw_step():
    """SAM's perturbed gradient fed to AdamW: the first step is lr * g_p / (|g_p| + eps) after decoupled decay."""
    pytest.importorskip("pytorch_optimizer")
    lr, rho, wd = 0.1, 0.05, 0.1
    g = A @ X0
    g_p = A @ (X0 + rho * g / g.norm())
    expected = X0 * (1 - lr * wd) - lr * g_p / (g_p.abs() + 1e-8)
    x, loss, calls = run_step(sam_adamw, lr=lr, rho=rho, weight_decay=wd)
    torch.testing.assert_close(x, expected)
    assert loss == pytest.approx(float(0.5 * X0 @ A @ X0)) and calls == 2


def test_gsam_step():
    pytest.importorskip("pytorch_optimizer")
    lr, rho, alpha = 0.1, 0.05, 0.4
    g = A @ X0
    g_p = A @ (X0 + rho * g / g.norm())
    expected = X0 - lr * (g_p - alpha * (g - (g @ g_p) / (g_p @ g_p) * g_p))
    x, loss, calls = run_step(gsam, lr=lr, rho=rho, alpha=alpha)
    torch.testing.assert_close(x, expected)
    assert loss == pytest.approx(float(0.5 * X0 @ A @ X0)) and calls == 2


def test_gam_step():
    lr, rho, rho2, b0, b1, gamma = 0.1, 0.03, 0.2, 0.1, 0.1, 0.05

    def unit(v):
        return v / v.norm()

    g0 = A @ X0
    g1 = A @ (X0 + rho * unit(g0))
    x2 = X0 + rho2 * unit(g1 - g0)  # for a quadratic g1 - g0 = rho A g0/|g0|: the Hg direction
    g2 = A @ x2
    g3 = A @ (x2 + rho * unit(g2))
    p = g0 + (1 - b0) * g2
    d = b1 * g1 + (1 - b1) * g3
    d = d - gamma * (p - (p @ d) / (d @ d) * d)
    x, loss, calls = run_step(GAM, lr=lr)
    torch.testing.assert_close(x, X0 - lr * d)
    assert calls == 4
    torch.testing.assert_close(unit(g1 - g0), unit(A @ g0))


def test_entropy_sgd_step_without_noise():
    lr, L, gamma, eta, alpha = 0.5, 3, 0.03, 0.1, 0.75
    xp, mu = X0.clone(), X0.clone()
    for _ in range(L):
        xp = xp - eta * (A @ xp + gamma * (xp - X0))
        mu = alpha * mu + (1 - alpha) * xp
    x, loss, calls = run_step(EntropySGD, lr=lr, L=L, gamma=gamma, sgld_lr=eta, ema=alpha, noise=0.0, momentum=0.0)
    torch.testing.assert_close(x, X0 - lr * (X0 - mu))
    assert calls == L and loss == pytest.approx(float(0.5 * X0 @ A @ X0))
    # with noise and Nesterov momentum it still descends on average and needs a closure
    x_noisy, _, _ = run_step(EntropySGD, lr=lr, L=L)
    assert float(0.5 * x_noisy @ A @ x_noisy) < float(0.5 * X0 @ A @ X0)
    with pytest.raises(RuntimeError, match="closure"):
        EntropySGD([X0.clone().requires_grad_(True)]).step()


class LinearTask(Task):
    """Noisy least squares 1/2 mean((Xw - y)^2) in float32: cheap, with train/val/test splits."""

    name = "linear"

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        w = torch.randn(4, generator=g)
        self.data = {}
        for split in ("train", "val", "test"):
            x = torch.randn(64, 4, generator=g)
            self.data[split] = (x, x @ w + 0.1 * torch.randn(64, generator=g))

    def init_params(self, generator):
        return {"w": torch.randn(4, generator=generator)}

    def batch(self, split, generator):
        x, y = self.data[split]
        if split != "train":
            return x, y
        idx = torch.randint(0, 64, (16,), generator=generator)
        return x[idx], y[idx]

    def loss(self, params, batch):
        x, y = batch
        return 0.5 * (x @ params["w"] - y).square().mean()


def test_baselines_registered_and_run_in_the_harness_with_flatness():
    pytest.importorskip("pytorch_optimizer")
    from learned_optim.bench.flatness import FlatnessOptions

    assert {"sam", "gsam", "gam", "entropy-sgd"} <= set(BASELINES)
    options = FlatnessOptions(patience=5, probes=2, iters=3, radii=(0.01, 0.1), steps=2, hessian_batches=1)
    results = evaluate(
        ["sgd", "sam", "gsam", "gam", "entropy-sgd"],
        [LinearTask()],
        steps=25,
        seeds=2,
        lr_grid=[0.1],
        progress=False,
        log=lambda line: None,
        flatness=options,
    )
    rows = {row["optimizer"]: row for row in results.summary}
    assert set(rows) == {"sgd", "sam", "gsam", "gam", "entropy-sgd"}
    for row in rows.values():
        assert (
            row["hessian_trace"] > 0
            and row["hessian_eigenvalue"] > 0
            and "sharpness@0.1" in row
            and "max_grad_norm@0.01" in row
        )
    runs = results.runs
    assert all(r.flatness is not None for r in runs)
    text = results.markdown()
    assert "Flatness at the point of convergence" in text and "sharpness@0.01" in text
    assert results.to_dict()["config"]["flatness"]["patience"] == 5
