"""Behaviour battery of :class:`learned_optim.LearnedOptimizer`, run against every net family.

Modelled on PyTorch's own optimizer tests (``test/test_optim.py``): instead of comparing against
reference numbers, most tests check the documented contract of one step,

    theta <- theta - lr * weight_decay * theta + lr * delta,   (delta, state') = rule(+-g, theta, state, t)

with ``delta`` computed by calling the update rule directly through
:func:`learned_optim.functional_update` (the meta-training caller). The runtime (in place, chunked,
``no_grad``) and the functional caller must therefore agree. Descent is tested with a net fitted in
the test itself, because a randomly initialised net does not descend.

The runtime's LSTM cells run on the ATen path here (native kernels off): some checks are exact, and the
kernel rounds differently (by about an ulp); ``tests/core/test_kernels.py`` checks the kernel against the
ATen path, inside the optimizer included.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import learned_optim
from learned_optim import LearnedOptimizer, NonFiniteGradientError, functional_update, kernels
from learned_optim.testing import fit_sign_descent

FAMILY_NAMES = sorted(learned_optim.FAMILIES)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _aten_cells():
    with kernels.enabled_as(False):
        yield


# ------------------------------------------------------------------------------------------ helpers


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A small deterministic model with weights, biases and a norm layer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))
    return model.to(dtype)


def batch(seed: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """A deterministic regression batch (independent of the global RNG)."""
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(16, 6, generator=gen).to(dtype), torch.randn(16, 3, generator=gen).to(dtype)


def loss_of(model: nn.Module, seed: int) -> Tensor:
    x, y = batch(seed, next(model.parameters()).dtype)
    return nn.functional.mse_loss(model(x), y)


def backward(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> Tensor:
    opt.zero_grad()
    loss = loss_of(model, seed)
    loss.backward()
    return loss


def predict_step(opt: LearnedOptimizer) -> dict[Tensor, tuple[Tensor, dict[str, Tensor]]]:
    """What ``opt.step()`` must produce, per the documented rule, from the current grads and state.

    Returns ``{param: (expected new value, expected new per-coordinate state incl. "step")}``.
    """
    rule, expected = opt.rule, {}
    for group in opt.param_groups:
        lr, wd = float(group["lr"]), group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            old = opt.state.get(p) or {}
            state = (
                {k: v.clone() for k, v in old.items() if k != "step"}
                if old
                else rule.init_state(p.numel(), device=p.device, shape=p.shape)
            )
            step = old["step"].clone() if old else torch.zeros((), dtype=torch.float32)
            if lr == 0.0:
                expected[p] = (p.detach().clone(), {"step": step, **state})
                continue
            step = step + 1
            grad = p.grad.reshape(-1).to(torch.float32)
            if group["maximize"]:
                grad = -grad
            theta = p.detach().reshape(-1).to(torch.float32)
            delta, new_state = functional_update(rule, None, grad, theta, state, step, p.shape)
            theta = theta - lr * wd * theta + lr * delta
            expected[p] = (theta.view_as(p).to(p.dtype), {"step": step, **new_state})
    return expected


def assert_step_matches(opt: LearnedOptimizer, expected: dict[Tensor, tuple[Tensor, dict[str, Tensor]]]) -> None:
    """Parameters and state after ``opt.step()`` equal :func:`predict_step`'s prediction."""
    assert expected, "the step updated no parameter"
    # The packed step and this per-tensor prediction round their GEMMs differently, and by how much depends on
    # the CPU path ATen and MKL pick at run time (ATEN_CPU_CAPABILITY=default differs by 2-3 float32 ulps):
    # tolerances of a few tens of ulps, still far below any error in the rule (lr * wd * theta ~ 1e-2).
    for p, (value, state) in expected.items():
        torch.testing.assert_close(p.detach(), value, rtol=1e-5, atol=1e-6)
        assert set(opt.state[p]) == set(state)
        for k, v in state.items():
            assert opt.state[p][k].dtype == torch.float32, k
            torch.testing.assert_close(opt.state[p][k], v, rtol=1e-5, atol=1e-6, msg=f"state {k!r}")


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[list[Tensor], dict]:
    """Deep copies of the parameters and of the optimizer state, for bit-identity checks."""
    params = [p.detach().clone() for p in model.parameters()]
    state = {
        i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(model.parameters()) if p in opt.state
    }
    return params, state


def assert_identical(a: tuple[list[Tensor], dict], b: tuple[list[Tensor], dict]) -> None:
    """Two snapshots are bit-identical (same dtypes, same values, same state keys)."""
    assert len(a[0]) == len(b[0])
    for x, y in zip(a[0], b[0], strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert a[1].keys() == b[1].keys()
    for i in a[1]:
        assert a[1][i].keys() == b[1][i].keys()
        for k in a[1][i]:
            assert torch.equal(a[1][i][k], b[1][i][k]), (i, k)


def test_compute_dtype_is_the_first_parameters(family, make_rule):
    """``compute_dtype`` (read every step, found without ``parameters()``) is the dtype of ``next(parameters())``,
    after a conversion too."""
    rule = make_rule(family)
    assert rule.compute_dtype == next(rule.parameters()).dtype == torch.float32
    assert make_rule(family).double().compute_dtype == torch.float64
    assert learned_optim.nets.base._first_parameter(rule) is next(rule.parameters())
    with pytest.raises(ValueError, match="no parameters"):
        type(rule).compute_dtype.fget(nn.Identity())


# ------------------------------------------------------------------------------------------ descent


def test_fitted_net_goes_downhill(family, make_rule):
    """A net fitted to signSGD (on other quadratics) decreases a fixed quadratic through the runtime."""
    rule = make_rule(family)
    fit_sign_descent(rule)
    curvature = torch.linspace(0.5, 2.0, 16)
    x = nn.Parameter(torch.linspace(-0.15, 0.15, 16))
    # a net whose step has a fixed RMS (lr a real learning rate, default_lr < 1) moves by lr: take the fit's target
    opt = LearnedOptimizer([x], rule, lr=1.0 if rule.default_lr == 1.0 else 0.005)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = 0.5 * (curvature * x * x).sum()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert losses[10] < 0.7 * losses[0]
    assert losses[-1] < 0.05 * losses[0], losses


# ------------------------------------------------------------------------------------------ the step rule


def test_step_is_lr_times_rule_delta_per_group(family, make_rule):
    """Per-group lr and decoupled weight decay: theta - lr*wd*theta + lr*delta, for several steps."""
    model = make_model()
    first, rest = list(model[0].parameters()), [p for m in list(model)[1:] for p in m.parameters()]
    opt = LearnedOptimizer(
        [{"params": first, "lr": 0.5, "weight_decay": 0.1}, {"params": rest, "lr": 2.0}],
        make_rule(family),
        weight_decay=0.0,
    )
    assert opt.param_groups[1]["weight_decay"] == 0.0
    for seed in range(3):
        backward(model, opt, seed)
        expected = predict_step(opt)
        opt.step()
        assert_step_matches(opt, expected)
    assert all(float(opt.state[p]["step"]) == 3.0 for p in model.parameters())


def test_weight_decay_is_decoupled(family, make_rule):
    """With a zero gradient: theta <- (1 - lr*wd) * theta + lr * delta(0), the decay applied outside the net."""
    theta0 = torch.linspace(-1.0, 1.0, 9)
    p = nn.Parameter(theta0.clone())
    opt = LearnedOptimizer([p], make_rule(family), lr=0.5, weight_decay=0.2)
    p.grad = torch.zeros_like(p)
    expected = predict_step(opt)
    opt.step()
    assert_step_matches(opt, expected)
    delta, _ = functional_update(opt.rule, None, torch.zeros(9), theta0, opt.rule.init_state(9), torch.tensor(1.0))
    torch.testing.assert_close(p.detach(), 0.9 * theta0 + 0.5 * delta, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(p.detach(), theta0 + 0.5 * delta)  # the decay did act


def test_maximize(family, make_rule):
    """maximize=True feeds the negated gradient to the net; the result matches the rule on -g."""
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), make_rule(family), maximize=True)
    for seed in range(2):
        backward(model, opt, seed)
        expected = predict_step(opt)
        opt.step()
        assert_step_matches(opt, expected)
    # and it differs from minimizing
    model_min = make_model()
    opt_min = LearnedOptimizer(model_min.parameters(), make_rule(family))
    for seed in range(2):
        backward(model_min, opt_min, seed)
        opt_min.step()
    assert not torch.equal(model[0].weight, model_min[0].weight)


def test_tensor_lr(family, make_rule):
    """A 0-d tensor lr gives the same step as the float lr and stays a tensor under a scheduler."""
    results = []
    for lr in (0.3, torch.tensor(0.3)):
        model = make_model()
        opt = LearnedOptimizer(model.parameters(), make_rule(family), lr=lr)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for seed in range(2):
            backward(model, opt, seed)
            expected = predict_step(opt)
            opt.step()
            assert_step_matches(opt, expected)
            scheduler.step()
        assert isinstance(opt.param_groups[0]["lr"], Tensor) == isinstance(lr, Tensor)
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.075)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError):
        LearnedOptimizer(make_model().parameters(), make_rule(family), lr=torch.tensor([0.1, 0.2]))


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]] = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1.0 + epoch)),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=2.0, total_steps=10, cycle_momentum=False
    ),
}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_lr_scheduler_changes_the_step(family, make_rule, scheduler):
    """Schedulers drive ``lr`` as the multiplier of the learned step at every step."""
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), make_rule(family))
    sched = SCHEDULERS[scheduler](opt)
    lrs = []
    for seed in range(3):
        backward(model, opt, seed)
        lrs.append(float(opt.param_groups[0]["lr"]))
        expected = predict_step(opt)
        opt.step()
        assert_step_matches(opt, expected)
        sched.step()
    assert len(set(lrs)) == 3, lrs


def test_params_without_grad_are_skipped(family, make_rule):
    """Params whose grad is None are neither changed nor given state; the others still step."""
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), make_rule(family))
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step() is None
    assert not opt.state
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    backward(model, opt, 0)
    model[3].bias.grad = None
    opt.step()
    assert torch.equal(model[3].bias, before[-1]) and model[3].bias not in opt.state
    assert not torch.equal(model[0].weight, before[0])


def test_lr_zero_is_exact_noop_that_creates_state(family, make_rule):
    """lr = 0 leaves params bit-identical (even with weight decay) but creates the full state."""
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), make_rule(family), lr=0.0, weight_decay=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    backward(model, opt, 0)
    opt.step()
    for a, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, p)
        state = opt.state[p]
        fresh = opt.rule.init_state(p.numel(), shape=p.shape)
        assert set(state) == {"step", *fresh}
        assert float(state["step"]) == 0.0
        for k, value in fresh.items():
            assert state[k].shape == value.shape and not state[k].any()


def test_step_closure_returns_loss(family, make_rule):
    """step(closure) evaluates the closure with grad enabled and returns its loss."""
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), make_rule(family))
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        return backward(model, opt, 0)

    loss = opt.step(closure)
    assert calls == [True]
    assert isinstance(loss, Tensor) and torch.equal(loss, loss_of(make_model(), 0))
    assert float(opt.state[model[0].weight]["step"]) == 1.0


# ------------------------------------------------------------------------------------------ state dicts


@pytest.mark.parametrize("named", [False, True], ids=["unnamed", "named"])
def test_state_dict_round_trip_resumes_bit_identically(family, make_rule, named):
    """Save after 2 steps (torch.save + weights_only load), resume in a new optimizer: identical steps."""

    def build(model):
        params = model.named_parameters() if named else model.parameters()
        return LearnedOptimizer(params, make_rule(family), lr=torch.tensor(0.7), weight_decay=0.01)

    model = make_model()
    opt = build(model)
    for seed in range(2):
        backward(model, opt, seed)
        opt.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    if named:
        assert saved["opt"]["param_groups"][0]["param_names"] == [n for n, _ in model.named_parameters()]
    assert set(saved["opt"]) == {"state", "param_groups", learned_optim.optimizer.NET_STATE_KEY}

    resumed_model = make_model(seed=5)
    resumed_model.load_state_dict(saved["model"])
    resumed = build(resumed_model)
    resumed.load_state_dict(saved["opt"])
    assert_identical(snapshot(model, opt), snapshot(resumed_model, resumed))
    for seed in range(2, 5):
        backward(model, opt, seed)
        opt.step()
        backward(resumed_model, resumed, seed)
        resumed.step()
    assert_identical(snapshot(model, opt), snapshot(resumed_model, resumed))


def test_the_lr_ratio_follows_the_users_schedule_and_resumes_bit_identically():
    """A net with ``lr_ratio_input`` sees rho = lr / (largest lr so far) of its param group at every step, whatever
    scheduler sets the lr (here warm-up then cosine, ``lr_factor``): 1 through the warm-up, the cosine factor after
    it. The group's peak lr is saved with the state dict, so a run resumed after the peak steps bit for bit as the
    uninterrupted one (a resumed run that lost it would restart at rho = 1)."""
    horizon = 20

    def build(model):
        torch.manual_seed(0)
        rule = learned_optim.AdafacMLP(lr_ratio_input=True, hidden_size=4).requires_grad_(False)
        for weight in rule.parameters():
            weight.normal_(0.0, 0.5)
        opt = LearnedOptimizer(model.parameters(), rule, lr=0.05, weight_decay=0.01)
        factor = lambda t: learned_optim.schedules.lr_factor("cosine", t, horizon)  # noqa: E731
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    model = make_model()
    opt, schedule = build(model)
    seen = []
    for t in range(horizon):
        if t == 10:
            saved = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": schedule.state_dict()}
            saved = copy.deepcopy(saved)
        backward(model, opt, t)
        opt.step()
        schedule.step()
        seen.append(float(opt.rule.lr_ratio))
    want = [learned_optim.schedules.lr_ratio("cosine", t, horizon) for t in range(horizon)]
    assert seen == pytest.approx(want, rel=1e-6) and seen[0] == 1.0 and seen[-1] < 0.01
    assert saved["opt"]["param_groups"][0]["peak_lr"] == pytest.approx(0.05)

    resumed_model = make_model(seed=5)
    resumed_model.load_state_dict(saved["model"])
    resumed, resumed_schedule = build(resumed_model)
    resumed.load_state_dict(saved["opt"])
    resumed_schedule.load_state_dict(saved["sched"])
    for t in range(10, horizon):
        backward(resumed_model, resumed, t)
        resumed.step()
        resumed_schedule.step()
    assert_identical(snapshot(model, opt), snapshot(resumed_model, resumed))


def test_state_dict_carries_the_net_so_a_changed_net_resumes(family, make_rule):
    """The state dict carries the net's weights (what ``adapt`` changes): an optimizer whose net changed after it was
    built (here by hand) resumes in a fresh optimizer of the original net with the changed one, step for step. A
    state dict without the entry (saved before it existed, or by DCP) keeps the optimizer's net; one with another
    family's net, or another configuration's, is refused before anything changes."""
    key = learned_optim.optimizer.NET_STATE_KEY
    rule = make_rule(family)
    model, resumed_model = make_model(), make_model()
    opt = LearnedOptimizer(model.parameters(), copy.deepcopy(rule), lr=0.05)
    with torch.no_grad():
        for i, weight in enumerate(opt.rule.parameters()):
            weight.mul_(1.0 + 0.1 * (i + 1))
    backward(model, opt, 0)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    resumed = LearnedOptimizer(resumed_model.parameters(), copy.deepcopy(rule), lr=0.05)
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(saved)
    for a, b in zip(opt.rule.state_dict().values(), resumed.rule.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for seed in (1, 2):
        backward(model, opt, seed)
        opt.step()
        backward(resumed_model, resumed, seed)
        resumed.step()
    assert_identical(snapshot(model, opt), snapshot(resumed_model, resumed))

    untouched = LearnedOptimizer(make_model().parameters(), copy.deepcopy(rule), lr=0.05)
    untouched.load_state_dict({k: v for k, v in saved.items() if k != key})
    for a, b in zip(rule.state_dict().values(), untouched.rule.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other_family = next(f for f in FAMILY_NAMES if f != family)
    for foreign in (
        {"family": other_family, "weights": saved[key]["weights"]},
        {"family": family, "weights": {k: v[..., :1] for k, v in saved[key]["weights"].items()}},
    ):
        fresh = LearnedOptimizer(make_model().parameters(), copy.deepcopy(rule), lr=0.05)
        with pytest.raises(ValueError, match="state_dict's net"):
            fresh.load_state_dict({**saved, key: foreign})
        assert not fresh.state
        assert all(
            torch.equal(a, b) for a, b in zip(rule.state_dict().values(), fresh.rule.state_dict().values(), strict=True)
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_load_state_dict_onto_params_of_another_dtype(family, make_rule, dtype):
    """State saved with fp32 params loads onto bf16/fp16/fp64 params unchanged and stays float32."""
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), make_rule(family))
    for seed in range(2):
        backward(model, opt, seed)
        opt.step()
    saved = opt.state_dict()
    other = make_model(dtype=dtype)
    other.load_state_dict(model.state_dict())
    other_opt = LearnedOptimizer(other.parameters(), make_rule(family))
    other_opt.load_state_dict(saved)
    for i, p in enumerate(other.parameters()):
        for k, v in saved["state"][i].items():
            assert other_opt.state[p][k].dtype == torch.float32
            assert torch.equal(other_opt.state[p][k], v.to(torch.float32)), k
    backward(other, other_opt, 2)
    expected = predict_step(other_opt)
    other_opt.step()
    for p, (value, _) in expected.items():
        assert p.dtype == dtype
        # the packed step (all tensors in one net call) may round a GEMM row differently from the per-tensor
        # call on ATen (MKL picks its path by the row count and the CPU): a few float32 ulps of the new value
        torch.testing.assert_close(p.detach(), value, rtol=1e-6, atol=0)
        assert all(opt_state.dtype == torch.float32 for opt_state in other_opt.state[p].values())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_load_state_dict_onto_another_device(family, make_rule, device):
    """State saved on CPU follows the params to their device on load, and stepping resumes identically."""
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), make_rule(family))
    for seed in range(2):
        backward(model, opt, seed)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    moved = make_model().to(device)
    moved.load_state_dict(model.state_dict())
    moved_opt = LearnedOptimizer(moved.parameters(), make_rule(family).to(device))
    moved_opt.load_state_dict(saved)
    for p in moved.parameters():
        assert all(v.device == p.device for k, v in moved_opt.state[p].items() if k != "step")
    backward(model, opt, 2)
    opt.step()
    x, y = (t.to(device) for t in batch(2))
    moved_opt.zero_grad()
    nn.functional.mse_loss(moved(x), y).backward()
    moved_opt.step()
    for a, b in zip(model.parameters(), moved.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach().cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("other", FAMILY_NAMES + ["adam"])
def test_load_state_dict_from_another_optimizer_raises(family, make_rule, other):
    """State of another net family (or of Adam) is refused with a clear ValueError, state untouched: by the keys it
    lacks, or by the shape of a key both nets keep (RNNProp's ``lstm`` for DM-LSTM, its ``m`` for the MLP net)."""
    if other == family:
        pytest.skip("same family")
    source_model = make_model()
    if other == "adam":
        source = torch.optim.Adam(source_model.parameters())
    else:
        source = LearnedOptimizer(source_model.parameters(), make_rule(other))
    backward(source_model, source, 0)
    source.step()
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), make_rule(family))
    with pytest.raises(ValueError, match=f"{family} net keeps.*another optimizer|has shape"):
        opt.load_state_dict(source.state_dict())
    assert not opt.state


def test_state_put_in_place_by_a_wrapper_from_another_net_raises_before_any_change(family, make_rule):
    """A wrapper that loads the per-parameter state itself (ZeroRedundancyOptimizer writes ``optim.state[p]``) skips
    load_state_dict's checks: state from another family is then refused at the step, before anything changes."""
    other = next(
        f
        for f in FAMILY_NAMES
        if f != family and set(make_rule(f).state_names()) != set(make_rule(family).state_names())
    )
    model = make_model()
    source = LearnedOptimizer(model.parameters(), make_rule(other))
    backward(model, source, 0)
    source.step()
    opt = LearnedOptimizer(model.parameters(), make_rule(family))
    for p in model.parameters():
        opt.state[p] = {k: v.clone() for k, v in source.state[p].items()}
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=f"{family} net keeps.*another optimizer"):
        opt.step()
    assert_identical(before, snapshot(model, opt))


def test_state_put_in_place_with_as_many_but_other_keys_raises_before_any_change(family, make_rule):
    """The step checks the state's key names, not only their count: a foreign state with as many keys is refused."""
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), make_rule(family))
    backward(model, opt, 0)
    opt.step()
    first = next(iter(model.parameters()))
    name = next(k for k in opt.state[first] if k != "step")
    opt.state[first]["foreign_" + name] = opt.state[first].pop(name)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=f"has keys .*foreign_{name}.*{family} net keeps"):
        opt.step()
    assert_identical(before, snapshot(model, opt))


def test_load_state_dict_with_wrong_state_shape_raises(family, make_rule):
    """State of the same family but another net configuration, or for another param size, is refused."""
    model = make_model()
    other_config = {
        "mlp": {"decays": (0.9, 0.99)},
        "adafac_mlp": {"momentum_decays": (0.9, 0.99), "factored_decays": (0.9, 0.99)},
    }.get(family, {"hidden_size": 8})
    source = LearnedOptimizer(model.parameters(), make_rule(family, **other_config))
    backward(model, source, 0)
    source.step()
    opt = LearnedOptimizer(make_model().parameters(), make_rule(family))
    with pytest.raises(ValueError, match="has shape|has keys"):  # adafac_mlp keeps one state per momentum
        opt.load_state_dict(source.state_dict())
    saved = LearnedOptimizer(model.parameters(), make_rule(family))
    backward(model, saved, 0)
    saved.step()
    state_dict = saved.state_dict()
    state_dict["state"][0] = {k: v if k == "step" else v[:-1] for k, v in state_dict["state"][0].items()}
    with pytest.raises(ValueError, match="has shape"):
        opt.load_state_dict(state_dict)
    assert not opt.state


def test_load_state_dict_hooks_act_as_with_torch_optim(family, make_rule):
    """A load-state-dict pre-hook edits (or replaces) the dict before it is checked and loaded, e.g. to drop the state
    of a parameter the model no longer has; a post-hook sees the loaded state and its edits stay."""
    model = make_model()
    source = LearnedOptimizer(model.parameters(), make_rule(family))
    backward(model, source, 0)
    source.step()
    saved = source.state_dict()
    first_state = sorted(set(saved["state"][0]) - {"step"})[0]

    def zero_the_state(opt, state_dict):
        state_dict = copy.deepcopy(state_dict)
        for state in state_dict["state"].values():
            state[first_state].zero_()
        return state_dict

    opt = LearnedOptimizer(make_model().parameters(), make_rule(family))
    opt.register_load_state_dict_pre_hook(zero_the_state)
    seen = []
    opt.register_load_state_dict_post_hook(lambda o: seen.append({p: dict(o.state[p]) for p in o.state}))
    opt.load_state_dict(saved)
    assert any(bool(s[first_state].abs().max() > 0) for s in source.state.values())
    assert seen and all(not bool(s[first_state].abs().max() > 0) for s in opt.state.values())
    assert all(seen[0][p][k] is opt.state[p][k] for p in opt.state for k in opt.state[p])

    def one_step_of_every_state(opt):
        for state in opt.state.values():
            state["step"].fill_(1.0)

    opt = LearnedOptimizer(make_model().parameters(), make_rule(family))
    opt.register_load_state_dict_post_hook(one_step_of_every_state)
    source.step()
    opt.load_state_dict(source.state_dict())
    assert all(float(s["step"]) == 1.0 for s in opt.state.values())

    bigger = nn.Sequential(*make_model(), nn.Linear(3, 2))  # the checkpoint of a model with one more layer
    bigger_opt = LearnedOptimizer(bigger.parameters(), make_rule(family))
    nn.functional.mse_loss(bigger(batch(0)[0]), torch.zeros(16, 2)).backward()
    bigger_opt.step()

    def drop_the_last_layer(opt, state_dict):
        group = state_dict["param_groups"][0]
        dropped = group["params"][-2:]
        state_dict["param_groups"] = [{**group, "params": group["params"][:-2]}]
        state_dict["state"] = {k: v for k, v in state_dict["state"].items() if k not in dropped}

    opt = LearnedOptimizer(make_model().parameters(), make_rule(family))
    opt.register_load_state_dict_pre_hook(drop_the_last_layer)  # edits the (shallow) copy in place, returns None
    opt.load_state_dict(bigger_opt.state_dict())
    for p, q in zip(opt.param_groups[0]["params"], bigger_opt.param_groups[0]["params"][:-2], strict=True):
        assert all(torch.equal(opt.state[p][k], bigger_opt.state[q][k]) for k in bigger_opt.state[q])


# ------------------------------------------------------------------------------------------ copies and hooks


def test_a_step_under_torch_compile_is_the_eager_step(family, make_rule):
    """``torch.compile`` of a function that calls ``opt.step()`` (a compiled training step, or the step itself)
    leaves the step to eager mode, with the eager step's bits: Dynamo does not trace into it (its native calls and
    data-dependent checks would only break the graph), and nothing of it is compiled."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    rule = make_rule(family)
    model, reference = make_model(), make_model()
    opt = LearnedOptimizer(model.parameters(), rule, lr=0.01, weight_decay=0.1)
    reference_opt = LearnedOptimizer(reference.parameters(), copy.deepcopy(rule), lr=0.01, weight_decay=0.1)
    compiled_step = torch.compile(opt.step)
    for seed in range(2):
        backward(model, opt, seed)
        compiled_step()
        backward(reference, reference_opt, seed)
        reference_opt.step()
    assert_identical(snapshot(model, opt), snapshot(reference, reference_opt))
    assert not counters["stats"]["unique_graphs"]
    assert all("torch.compiler.disable()" in reason for reason in counters["graph_break"])  # the one break: the step


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_the_net_and_step_identically(family, make_rule, how):
    """deepcopy/pickle of (model, optimizer) keep the net's weights, config and options."""
    model = make_model()
    opt = LearnedOptimizer(
        model.parameters(), make_rule(family), chunk_size=7, nonfinite="skip", sharded_step="every_rank"
    )
    for seed in range(2):
        backward(model, opt, seed)
        opt.step()
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.rule is not opt.rule and type(opt2.rule) is type(opt.rule)
    assert opt2.rule.config == opt.rule.config
    assert (opt2.chunk_size, opt2.nonfinite, opt2.state_dtype, opt2.sharded_step) == (
        7,
        "skip",
        torch.float32,
        "every_rank",
    )
    weights, weights2 = opt.rule.state_dict(), opt2.rule.state_dict()
    assert weights.keys() == weights2.keys() and all(torch.equal(weights[k], weights2[k]) for k in weights)
    assert_identical(snapshot(model, opt), snapshot(model2, opt2))
    for seed in range(2, 4):
        backward(model, opt, seed)
        opt.step()
        backward(model2, opt2, seed)
        opt2.step()
    assert_identical(snapshot(model, opt), snapshot(model2, opt2))


def test_step_hooks_fire(family, make_rule):
    """Step pre/post hooks run around every step (and not after removal), as in torch.optim."""
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), make_rule(family))
    events = []

    def pre(optimizer, args, kwargs):
        events.append(("pre", float(optimizer.state[model[0].weight]["step"]) if optimizer.state else 0.0))

    def post(optimizer, args, kwargs):
        events.append(("post", float(optimizer.state[model[0].weight]["step"])))

    handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
    for seed in range(2):
        backward(model, opt, seed)
        opt.step()
    assert events == [("pre", 0.0), ("post", 1.0), ("pre", 1.0), ("post", 2.0)]
    for handle in handles:
        handle.remove()
    opt.step()
    assert len(events) == 4


# ------------------------------------------------------------------------------------------ chunking


def _param(shape: tuple[int, ...], noncontiguous: bool) -> nn.Parameter:
    gen = torch.Generator().manual_seed(sum(shape))
    if noncontiguous:  # a transposed view: the parameter's memory is not in its logical order
        p = nn.Parameter(torch.randn(shape[::-1], generator=gen).t())
        assert not p.is_contiguous()
        return p
    return nn.Parameter(torch.randn(shape, generator=gen))


CHUNK_SHAPES = [
    ((5,), False),
    ((7,), False),
    ((23,), False),
    ((13, 9), False),
    ((3, 4, 5), False),
    ((13, 9), True),
    ((8, 3), True),
    ((301,), False),
    ((20, 17), True),
]


def test_chunked_equals_unchunked(family, make_rule):
    """chunk_size=7, 100 and None give bit-identical params and state, whatever the tensor size.

    Tensors from 5 to 340 coordinates, some non-contiguous, so that there are one or several chunks
    (the runtime rounds chunks up to multiples of ``ROW_ALIGN`` rows) and partial last chunks.
    """
    results = []
    for chunk_size in (7, 100, None):
        params = [_param(shape, nc) for shape, nc in CHUNK_SHAPES]
        opt = LearnedOptimizer(params, make_rule(family), chunk_size=chunk_size, weight_decay=0.1)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results.append(
            (
                [p.detach().clone() for p in params],
                {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)},
            )
        )
        assert all(not p.is_contiguous() for p, (_, nc) in zip(params, CHUNK_SHAPES, strict=True) if nc)
    assert_identical(results[0], results[2])
    assert_identical(results[1], results[2])


def test_noncontiguous_param_matches_contiguous(family, make_rule):
    """A non-contiguous parameter is updated as its contiguous copy would be."""
    values = []
    for noncontiguous in (True, False):
        p = _param((6, 4), True)
        if not noncontiguous:
            p = nn.Parameter(p.detach().contiguous())
        opt = LearnedOptimizer([p], make_rule(family), chunk_size=5)
        gen = torch.Generator().manual_seed(3)
        for _ in range(2):
            p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        values.append(p.detach().clone())
    assert torch.equal(*values)


# ------------------------------------------------------------------------------------------ rejected input


def test_sparse_gradients_raise(family, make_rule):
    """A sparse gradient is rejected with a clear error before anything changes."""
    emb = nn.Embedding(10, 3, sparse=True)
    opt = LearnedOptimizer(emb.parameters(), make_rule(family))
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(before, emb.weight) and not opt.state


def test_integer_params_raise(family, make_rule):
    """A gradient on a parameter that is not floating point is rejected with a clear error before anything changes."""
    weight, count = nn.Parameter(torch.randn(3)), nn.Parameter(torch.arange(4), requires_grad=False)
    opt = LearnedOptimizer([weight, count], make_rule(family))
    weight.grad, count.grad = torch.ones(3), torch.ones(4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="floating-point parameters only.*torch.int64"):
        opt.step()
    assert not opt.state and torch.equal(count, torch.arange(4))


def test_complex_params_raise(family, make_rule):
    """Complex parameters are rejected (the nets are real-valued coordinatewise rules)."""
    p = nn.Parameter(torch.randn(4, dtype=torch.complex64))
    opt = LearnedOptimizer([p], make_rule(family))
    (p.abs() ** 2).sum().backward()
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()
    assert not opt.state


def test_invalid_arguments_raise(family, make_rule):
    """Invalid constructor arguments fail at construction, not at the first step."""
    params = list(make_model().parameters())
    rule = make_rule(family)
    for kwargs in (
        {"lr": -1.0},
        {"weight_decay": -0.1},
        {"chunk_size": 0},
        {"nonfinite": "ignore"},
        {"state_dtype": torch.int32},
        {"sharded_step": "all"},
    ):
        with pytest.raises(ValueError):
            LearnedOptimizer(params, rule, **kwargs)
    with pytest.raises(TypeError, match="UpdateRule"):
        LearnedOptimizer(params, nn.Linear(2, 1))
    for name, value, why in (
        ("betas", (0.9, 0.99), "fixes its own moment decays"),
        ("eps", 1e-6, "fixes its own"),
        ("amsgrad", True, "fixes its own"),
        ("fused", True, "no fused, capturable or differentiable variant"),
        ("capturable", False, "no fused"),
        ("differentiable", False, "functional_update"),
        ("momentum", 0.9, "unexpected keyword argument 'momentum'"),
    ):
        with pytest.raises(TypeError, match=why):
            LearnedOptimizer(params, rule, **{name: value})


@pytest.mark.parametrize("named", [False, True], ids=["unnamed", "named"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_gradient_raises_naming_the_param_before_any_change(family, make_rule, named, bad_value):
    """A NaN/inf gradient raises NonFiniteGradientError naming the parameter; params and state untouched."""
    model = make_model()
    opt = LearnedOptimizer(model.named_parameters() if named else model.parameters(), make_rule(family))
    backward(model, opt, 0)
    opt.step()
    backward(model, opt, 1)
    model[3].weight.grad[1, 2] = bad_value  # the 5th parameter; the ones before it are finite
    before = snapshot(model, opt)
    with pytest.raises(NonFiniteGradientError, match=r"'3\.weight'" if named else r"#4 of param group 0"):
        opt.step()
    assert_identical(before, snapshot(model, opt))


def test_nonfinite_gradient_skip_policy(family, make_rule):
    """nonfinite='skip' skips the whole step (counted in skipped_steps); the next good step is normal."""
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), make_rule(family), nonfinite="skip")
    backward(model, opt, 0)
    opt.step()
    backward(model, opt, 1)
    model[0].bias.grad[0] = float("nan")
    before = snapshot(model, opt)
    opt.step()
    assert opt.skipped_steps == 1
    assert_identical(before, snapshot(model, opt))
    backward(model, opt, 2)
    expected = predict_step(opt)
    opt.step()
    assert_step_matches(opt, expected)


def test_huge_finite_gradients_are_not_taken_for_nonfinite_ones():
    """The non-finite check sums squares (fast) and rechecks a tensor whose sum overflows with its exact max |g|:
    gradients of 1e18 (each square finite in float32, their sum not) step, an inf among them still raises."""
    p = nn.Parameter(torch.zeros(1000))
    opt = LearnedOptimizer([p], learned_optim.MLPUpdate(), lr=1.0)
    p.grad = torch.full((1000,), 1e18)
    assert torch.isinf(torch.linalg.vector_norm(p.grad))  # the sum of squares does overflow
    opt.step()
    assert opt.state[p]["step"] == 1.0 and all(bool(v.isfinite().all()) for v in opt.state[p].values())
    p.grad[2] = float("inf")
    with pytest.raises(NonFiniteGradientError):
        opt.step()


@pytest.mark.parametrize("use_kernels", [False, True], ids=["aten", "kernels"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float64])
def test_a_gradient_whose_square_overflows_counts_as_nonfinite(family, make_rule, use_kernels, grad_dtype):
    """One finite entry whose square overflows float32 (1e20; 1e39 in a float64 gradient, inf once cast) would make
    the second moments inf for good: the adafac net then stepped every coordinate by the same amount (kernels) or
    made the tensor NaN (ATen), and no non-finite check fired. It is refused as a NaN is, nothing changed; skipped
    with nonfinite='skip'. An entry of 1e18 steps."""
    model = make_model().to(grad_dtype)
    opt = LearnedOptimizer(model.parameters(), make_rule(family))
    with kernels.enabled_as(use_kernels):
        backward(model, opt, 0)
        opt.step()
        for huge in (1e20, 1e39) if grad_dtype == torch.float64 else (1e20,):
            backward(model, opt, 1)
            model[3].weight.grad[1, 2] = huge
            before = snapshot(model, opt)
            with pytest.raises(NonFiniteGradientError, match="whose square overflows the net's torch.float32"):
                opt.step()
            assert_identical(before, snapshot(model, opt))
            opt.nonfinite = "skip"
            opt.step()
            assert opt.skipped_steps >= 1
            assert_identical(before, snapshot(model, opt))
            opt.nonfinite = "raise"
        backward(model, opt, 2)
        model[3].weight.grad[1, 2] = 1e18
        opt.step()
    for state in opt.state.values():
        assert all(bool(v.isfinite().all()) for v in state.values())
    assert all(bool(p.isfinite().all()) for p in model.parameters())


# ------------------------------------------------------------------------------------------ mixed precision


@pytest.mark.parametrize("autocast", [None, torch.float16, torch.bfloat16], ids=["plain", "fp16", "bf16"])
def test_grad_scaler(family, make_rule, autocast):
    """scaler.step(opt) steps with unscaled grads, and skips (nothing modified) on an overflow."""
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), make_rule(family))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    reference = make_model()
    reference_opt = LearnedOptimizer(reference.parameters(), make_rule(family))
    for seed in range(2):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = loss_of(model, seed)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        backward(reference, reference_opt, seed)
        reference_opt.step()
    assert float(opt.state[model[0].weight]["step"]) == 2.0
    if autocast is None:  # power-of-two scaling is exact: the same step as without the scaler
        assert_identical(snapshot(model, opt), snapshot(reference, reference_opt))
    else:
        for a, b in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0.05, atol=2e-3)
    before = snapshot(model, opt)
    scale = scaler.get_scale()
    opt.zero_grad()
    scaler.scale(loss_of(model, 3) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale
    assert_identical(before, snapshot(model, opt))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_step_inside_autocast_is_the_step_outside_it(family, make_rule, dtype):
    """A training step written wholly inside ``torch.autocast`` (the step too) steps exactly as one outside it: the
    step runs with autocast off, on every path (a pack of small tensors, a tensor alone, one above the blocked path's
    block, where the whole-tensor rule runs block by block)."""

    def params(seed):
        model = make_model(seed)
        gen = torch.Generator().manual_seed(seed)
        lone = nn.Parameter(torch.randn(7, generator=gen))
        large = nn.Parameter(torch.randn(300, 300, generator=gen) / 300)  # above AdafacMLP.coordinate_block
        return [list(model.parameters()), [lone], [large]]

    for under, plain in zip(params(0), params(0), strict=True):
        opts = [LearnedOptimizer(ps, make_rule(family), lr=0.01, weight_decay=0.1) for ps in (under, plain)]
        for seed in range(2):
            gen = torch.Generator().manual_seed(seed)
            grads = [torch.randn(p.shape, generator=gen) * 1e-2 for p in under]
            for p, q, g in zip(under, plain, grads, strict=True):
                p.grad, q.grad = g.clone(), g.clone()
            with torch.autocast("cpu", dtype=dtype):
                opts[0].step()
            opts[1].step()
        for p, q in zip(under, plain, strict=True):
            assert torch.equal(p, q)
            assert all(torch.equal(opts[0].state[p][k], opts[1].state[q][k]) for k in opts[1].state[q])


# ------------------------------------------------------------------------------------------ differentiability


def test_float64_gradcheck_of_one_functional_step(family, make_rule):
    """gradcheck of functional_update (delta and new state) w.r.t. the net's weights, in float64."""
    rule = make_rule(family, hidden_size=3).double()
    if family == "adafac_mlp":
        # its Adam init puts hidden units exactly at ReLU kinks (relu(x), relu(-x)), and so can a random init with
        # zero biases (torch 2.11's init streams left every unit of a coordinate dead): weights drawn here instead
        weight_gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for w in rule.parameters():
                w.copy_(torch.randn(w.shape, generator=weight_gen, dtype=w.dtype) * 0.5)
    names = [name for name, _ in rule.named_parameters()]
    weights = tuple(w.detach().clone().requires_grad_(True) for w in rule.parameters())
    gen = torch.Generator().manual_seed(0)
    n = 5
    grad = torch.randn(n, generator=gen, dtype=torch.float64)
    param = torch.randn(n, generator=gen, dtype=torch.float64)
    shapes = {k: (n, *shape) for k, shape in rule.state_shapes().items()} | rule.tensor_state_shapes((n,))
    state = {k: 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64) for k, shape in shapes.items()}
    for k in ("v", "row", "col"):  # second moments are non-negative
        if k in state:
            state[k] = state[k].abs()
    step = torch.tensor(3.0, dtype=torch.float64)

    def one_step(*w: Tensor) -> tuple[Tensor, ...]:
        delta, new_state = functional_update(rule, dict(zip(names, w, strict=True)), grad, param, state, step)
        return (delta, *new_state.values())

    assert torch.autograd.gradcheck(one_step, weights)
    # gradcheck is vacuous if the step ignores the weights: the Jacobian must not be zero
    jacobian = torch.autograd.grad(one_step(*weights)[0].sum(), weights, allow_unused=True)
    assert any(j is not None and j.abs().sum() > 0 for j in jacobian)
    # the functional caller with the module's own weights equals its forward; other weights, another step
    own_delta, _ = functional_update(rule, None, grad, param, state, step)
    assert torch.equal(own_delta, one_step(*weights)[0].detach())
    assert not torch.equal(own_delta, one_step(*(w.detach() * 1.5 + 0.1 for w in weights))[0])


@cuda
def test_cuda_step_matches_cpu(family, make_rule):
    """The same steps on a CUDA model as on CPU (up to GPU rounding)."""
    model = make_model()
    cuda_model = make_model().cuda()
    opt = LearnedOptimizer(model.parameters(), make_rule(family))
    cuda_opt = LearnedOptimizer(cuda_model.parameters(), make_rule(family))  # moves the net to the params' device
    assert all(w.is_cuda for w in cuda_opt.rule.parameters())
    for seed in range(2):
        backward(model, opt, seed)
        opt.step()
        x, y = (t.cuda() for t in batch(seed))
        cuda_opt.zero_grad()
        nn.functional.mse_loss(cuda_model(x), y).backward()
        cuda_opt.step()
    for a, b in zip(model.parameters(), cuda_model.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach().cpu(), rtol=1e-4, atol=1e-5)


def test_public_api_exports():
    """The names the README documents are importable from the top level."""
    for name in (
        "LearnedOptimizer",
        "NonFiniteGradientError",
        "CheckpointError",
        "from_pretrained",
        "list_pretrained",
        "save_pretrained",
        "load_rule",
        "FAMILIES",
        "functional_update",
    ):
        assert hasattr(learned_optim, name), name
    assert set(FAMILY_NAMES) >= {"dm_lstm", "rnnprop", "mlp"}


def test_a_zero_size_parameter_is_stepped_as_nothing_beside_the_others(family, make_rule):
    """An empty parameter (a zero-width layer) with a gradient changes nothing and stops nothing: every family
    steps the other parameters as it would without it (the MLP net raised on the empty tensor's statistics)."""
    model = make_model()
    empty = nn.Parameter(torch.zeros(0, 3))
    with_empty = copy.deepcopy(model)
    plain = LearnedOptimizer(model.parameters(), make_rule(family))
    both = LearnedOptimizer([*with_empty.parameters(), empty], make_rule(family))
    for opt, m in ((plain, model), (both, with_empty)):
        backward(m, opt, 0)
    empty.grad = torch.zeros(0, 3)
    plain.step()
    both.step()
    for a, b in zip(model.parameters(), with_empty.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert empty.shape == (0, 3)


def test_float64_parameters_are_stepped_in_float64(family, make_rule):
    """The net runs in float32, but a float64 parameter is updated in float64, on every path (packed small tensors,
    a tensor alone): it was rounded to float32 on every step, which wiped its low bits and lost every step below
    float32's spacing."""
    params = [nn.Parameter(torch.full((n,), 1000.0, dtype=torch.float64) + 1e-9) for n in (3, 7, 200_000)]
    before = [p.detach().clone() for p in params]
    opt = LearnedOptimizer(params, make_rule(family), lr=1e-20)
    for p in params:
        p.grad = torch.linspace(-1.0, 1.0, p.numel(), dtype=torch.float64)
    opt.step()  # a step far below float64's spacing at 1000 changes nothing, low bits included
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    for group in opt.param_groups:
        group["lr"] = 1e-6 * (1e-3 if family == "adafac_mlp" else 1.0)  # below float32's spacing at 1000 (6e-5)
    for _ in range(3):
        opt.step()
    for p, b in zip(params, before, strict=True):
        assert p.dtype == torch.float64 and not torch.equal(p, b)
        assert not torch.equal(p.detach().float().double(), p.detach())  # not float32 values


def test_a_parameter_listed_twice_in_a_group_is_refused(family, make_rule):
    """torch only warns; the learned step would advance the step count twice and update once (AdamW updates twice)."""
    weight = next(make_model().parameters())
    with pytest.raises(ValueError, match="listed twice in one param group"):
        LearnedOptimizer([weight, weight], make_rule(family))
    opt = LearnedOptimizer([weight], make_rule(family))
    with pytest.raises(ValueError, match="listed twice"):
        opt.add_param_group({"params": [("a", torch.nn.Parameter(torch.ones(2)))] * 2})


def test_a_parameter_resized_in_place_is_named_before_any_change(family, make_rule):
    """A parameter whose storage was replaced by a larger one (a grown vocabulary) no longer fits its state: the
    step names it and changes nothing, the step counts included (they advanced before the failure)."""
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), make_rule(family))
    backward(model, opt, 0)
    opt.step()
    first = next(iter(model.parameters()))
    first.data = torch.cat([first.data, first.data[:1]])
    first.grad = torch.ones_like(first)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"has \d+ elements, but its optimizer state was made for \d+"):
        opt.step()
    assert_identical(before, snapshot(model, opt))


def test_a_parameter_reshaped_in_place_is_named_before_any_change(make_rule):
    """A reshape that keeps the element count (a (6, 4) weight made (4, 6)) leaves a whole-tensor rule's per-tensor
    state (adafac_mlp's row and column statistics) of the wrong shape: named, nothing changed (the step failed
    inside the kernel or an ATen op after every step count had advanced)."""
    model = make_model()
    opt = LearnedOptimizer(model.parameters(), make_rule("adafac_mlp"))
    backward(model, opt, 0)
    opt.step()
    weight = next(p for p in model.parameters() if p.dim() == 2 and p.shape[0] != p.shape[1])
    weight.data = weight.data.t().contiguous()
    weight.grad = torch.ones_like(weight)
    before = snapshot(model, opt)
    for use_kernels in (False, True):
        with kernels.enabled_as(use_kernels), pytest.raises(ValueError, match="made for another shape than"):
            opt.step()
        assert_identical(before, snapshot(model, opt))
