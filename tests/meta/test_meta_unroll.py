"""The differentiable unroll: exact meta-gradients, checkpointing, the guard, hooks, train-by-validation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from learned_optim import build_rule
from learned_optim.functional import apply_rule
from learned_optim.meta import unroll as unroll_module
from learned_optim.meta.config import UnrollConfig
from learned_optim.meta.unroll import Trajectory, start_trajectory, unroll, unroll_particles
from learned_optim.objectives import meta_objective
from learned_optim.schedules import group_lr_ratio, lr_factor, lr_ratio
from learned_optim.tasks.base import Task, TaskFamily
from learned_optim.tasks.registry import make_family

FAMILIES = ["dm_lstm", "rnnprop", "mlp"]


class QuarticTask(Task):
    """f(x) = mean((Wx - y)^2) + 0.1 * mean(x^4) on a fixed train batch and a different fixed val batch;
    non-quadratic so the second-order terms of the meta-gradient do not vanish."""

    name = "quartic"

    def __init__(self, W, y, Wv, yv, scale: float = 0.5):
        self.data = {"train": (W, y), "val": (Wv, yv)}
        self.scale = scale

    def init_params(self, generator):
        d = self.data["train"][0].shape[1]
        W = self.data["train"][0]
        return {
            "x": self.scale * torch.randn(d, generator=generator, dtype=W.dtype),
            "b": self.scale * torch.randn(2, 1, generator=generator, dtype=W.dtype),
        }

    def batch(self, split, generator):
        W, y = self.data[split]
        return {"W": W, "y": y}

    def loss(self, params, batch):
        residual = batch["W"] @ params["x"] + params["b"].sum() - batch["y"]
        return residual.square().mean() + 0.1 * params["x"].pow(4).mean() + 0.05 * params["b"].square().sum()


class QuarticFamily(TaskFamily):
    name = "quartic"

    def __init__(self, dim: int = 4, dtype: str = "float64"):
        self.dim, self.dtype = dim, getattr(torch, dtype)

    def sample(self, generator):
        def draw(*shape):
            return torch.randn(*shape, generator=generator, dtype=self.dtype)

        return QuarticTask(draw(6, self.dim), draw(6), draw(6, self.dim), draw(6))


def make(family: str, seed: int = 0, **overrides):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rule = build_rule(family, overrides).double()
    task = QuarticFamily().sample(torch.Generator().manual_seed(seed))
    trajectory = start_trajectory(rule, task, torch.Generator().manual_seed(seed + 1))
    return rule, task, trajectory


def segment_loss(rule, weights, task, trajectory, steps=2, kind="sum", **cfg):
    config = UnrollConfig(**cfg)
    result = unroll(rule, weights, task, trajectory, steps, generator=torch.Generator().manual_seed(7), config=config)
    return meta_objective(kind, result.losses, initial_loss=result.end.initial_loss, last_step=result.end.step), result


@pytest.mark.parametrize("family", FAMILIES)
def test_two_step_meta_gradient_matches_central_differences_float64(family):
    overrides = {"output_scale": 0.3} if family != "mlp" else {"step_scale": 0.05}
    rule, task, trajectory = make(family, **overrides)
    weights = {k: v.detach().clone().requires_grad_(True) for k, v in rule.named_parameters()}
    loss, _ = segment_loss(rule, weights, task, trajectory, second_order=True)
    grads = torch.autograd.grad(loss, list(weights.values()))
    gen = torch.Generator().manual_seed(3)
    eps = 1e-6
    for _ in range(3):
        direction = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in weights.items()}
        analytic = sum((g * direction[k]).sum() for g, k in zip(grads, weights, strict=True))
        with torch.no_grad():
            plus = {k: v + eps * direction[k] for k, v in weights.items()}
            minus = {k: v - eps * direction[k] for k, v in weights.items()}
        numeric = (
            segment_loss(rule, plus, task, trajectory, second_order=True)[0]
            - segment_loss(rule, minus, task, trajectory, second_order=True)[0]
        ) / (2 * eps)
        assert abs(float(analytic)) > 1e-6
        assert float(analytic) == pytest.approx(float(numeric.detach()), rel=1e-6, abs=1e-9)


def test_first_order_meta_gradient_drops_second_order_terms():
    rule, task, trajectory = make("rnnprop", output_scale=0.3)
    weights = dict(rule.named_parameters())
    exact = torch.autograd.grad(
        segment_loss(rule, weights, task, trajectory, steps=3, second_order=True)[0], list(weights.values())
    )
    first = torch.autograd.grad(segment_loss(rule, weights, task, trajectory, steps=3)[0], list(weights.values()))
    assert all(torch.isfinite(g).all() for g in first)
    assert not all(torch.allclose(a, b) for a, b in zip(exact, first, strict=True))


@pytest.mark.parametrize("second_order", [False, True])
def test_step_checkpointing_gives_the_same_meta_gradient(second_order):
    rule, task, trajectory = make("dm_lstm", output_scale=0.3)
    weights = dict(rule.named_parameters())
    plain = torch.autograd.grad(
        segment_loss(rule, weights, task, trajectory, steps=4, second_order=second_order)[0], list(weights.values())
    )
    ckpt = torch.autograd.grad(
        segment_loss(rule, weights, task, trajectory, steps=4, second_order=second_order, checkpoint_steps=True)[0],
        list(weights.values()),
    )
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def replay(rule, task, trajectory, steps, lr=1.0, weight_decay=0.0):
    """The trajectory's points stepped by hand: apply_rule (the same functional_update) on plain autograd
    gradients of the (fixed-batch) task, theta (1 - lr wd) + lr delta."""
    params, state, points = {k: v.clone() for k, v in trajectory.params.items()}, trajectory.opt_state, []
    for t in range(1, steps + 1):
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        loss = task.loss(leaves, task.batch("train", None))
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
        with torch.no_grad():
            deltas, state = apply_rule(rule, None, grads, leaves, state, t)
            params = {k: leaves[k] * (1 - lr * weight_decay) + lr * deltas[k] for k in leaves}
        points.append(params)
    return points


def test_unroll_applies_the_shared_update_and_tracks_the_trajectory():
    rule, task, trajectory = make("mlp")
    weights = dict(rule.named_parameters())
    result = unroll(rule, weights, task, trajectory, 3, generator=torch.Generator().manual_seed(0), keep_points=True)
    points = replay(rule, task, trajectory, 3)
    for point, params in zip(result.points, points, strict=True):
        torch.testing.assert_close(point["x"].detach(), params["x"])
    params = points[-1]
    assert result.end.step == 3 and len(result.losses) == 3
    torch.testing.assert_close(result.losses[-1].detach(), task.loss(params, task.batch("train", None)))
    assert result.losses.requires_grad and not result.end.params["x"].requires_grad


def test_segments_detach_state_and_continue_the_step_count():
    rule, task, trajectory = make("rnnprop")
    weights = dict(rule.named_parameters())
    gen = torch.Generator().manual_seed(0)
    first = unroll(rule, weights, task, trajectory, 2, generator=gen)
    second = unroll(rule, weights, task, first.end, 2, generator=gen)
    assert second.end.step == 4 and second.end.initial_loss == first.end.initial_loss
    assert all(not v.requires_grad for st in first.end.opt_state.values() for v in st.values())
    # one long segment reaches the same point as two short ones (same batches, same steps)
    whole = unroll(rule, weights, task, trajectory, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(whole.end.params["x"], second.end.params["x"])


@pytest.mark.parametrize("horizon", [None, 8])
def test_the_inner_lr_schedule_scales_each_step(horizon):
    """``unroll.schedule``: step t of a T-step trajectory moves by lr * lr_factor(schedule, t, T), exactly what
    one-step segments at that lr do; T is the trajectory's ``horizon``, else the config's trajectory_length."""
    rule, task, trajectory = make("adafac_mlp", hidden_size=4)
    trajectory.lr, trajectory.horizon = 0.05, horizon
    T = horizon or 6
    cosine = UnrollConfig(trajectory_length=6, schedule="cosine")
    whole = unroll(rule, None, task, trajectory, 5, generator=torch.Generator().manual_seed(3), config=cosine)
    gen, end = torch.Generator().manual_seed(3), trajectory
    for t in range(5):
        step = dataclasses.replace(end, lr=0.05 * lr_factor("cosine", t, T))
        end = unroll(rule, None, task, step, 1, generator=gen, config=UnrollConfig(trajectory_length=6)).end
    torch.testing.assert_close(whole.end.params["x"], end.params["x"], rtol=0, atol=0)
    assert whole.end.horizon == horizon and whole.end.lr == 0.05
    constant = unroll(rule, None, task, trajectory, 5, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(constant.end.params["x"], whole.end.params["x"])
    with pytest.raises(ValueError, match="schedule must be one of"):
        UnrollConfig(schedule="linear").validate("unroll")


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
@pytest.mark.parametrize("steps", [1, 7, 20, 333])
def test_the_lr_ratio_is_the_schedule_against_its_running_peak(schedule, steps):
    """``lr_ratio(schedule, t, T)`` = lr_factor(t) / max over s <= t of lr_factor(s), computed directly."""
    factors = [lr_factor(schedule, t, steps) for t in range(steps)]
    for t in range(steps):
        assert lr_ratio(schedule, t, steps) == pytest.approx(factors[t] / max(factors[: t + 1]), rel=1e-12)
    assert group_lr_ratio({"lr": 0.5, "peak_lr": 2.0}) == (2.0, 0.25)
    assert group_lr_ratio({"lr": 3.0, "peak_lr": 2.0}) == (3.0, 1.0)  # a new peak
    assert group_lr_ratio({"lr": 0.0}) == (0.0, 1.0)  # nothing has run at a positive lr
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_ratio("linear", 0, 10)


def test_the_unroll_gives_a_net_with_the_lr_ratio_input_its_trajectorys_ratio():
    """Each inner step of a trajectory under ``unroll.schedule`` sets the net's lr ratio before the net runs: the
    schedule's ratio over the trajectory's horizon, what the runtime optimizer computes from the lr a scheduler
    sets (tests/core/test_optimizer.py), so meta-training sees what users run."""
    rule, task, trajectory = make("adafac_mlp", hidden_size=4, lr_ratio_input=True)
    trajectory.lr, trajectory.horizon = 0.05, 40
    seen = []
    set_ratio = rule.set_lr_ratio
    rule.set_lr_ratio = lambda ratio: (seen.append(ratio), set_ratio(ratio))  # type: ignore[method-assign]
    cosine = UnrollConfig(trajectory_length=6, schedule="cosine")
    first = unroll(rule, None, task, trajectory, 5, generator=torch.Generator().manual_seed(3), config=cosine)
    unroll(rule, None, task, first.end, 30, generator=torch.Generator().manual_seed(4), config=cosine)
    assert seen == [lr_ratio("cosine", t, 40) for t in range(35)]
    assert seen[0] == seen[2] == 1.0 and seen[-1] < seen[3] < 1.0  # a warm-up of 2 steps, then the decay
    assert float(rule.lr_ratio) == seen[-1]


def test_a_trajectory_keeps_its_lr_horizon_and_weight_decay_through_a_checkpoint():
    _, _, trajectory = make("mlp")
    trajectory.lr, trajectory.horizon, trajectory.weight_decay = 0.02, 300, 0.3
    back = Trajectory.from_tensors("t", *trajectory.to_tensors("t"), device="cpu")
    assert (back.lr, back.horizon, back.weight_decay) == (0.02, 300, 0.3)


def test_inner_weight_decay_is_decoupled_as_adamw():
    """``unroll.weight_decay`` (or the trajectory's own): each step is theta (1 - lr wd) + lr delta, AdamW's
    decoupled decay, with delta the net's output at the undecayed theta; the trajectory's value wins."""
    rule, task, trajectory = make("adafac_mlp", hidden_size=4)
    trajectory.lr = 0.05
    config = UnrollConfig(weight_decay=0.5)
    result = unroll(rule, None, task, trajectory, 3, generator=torch.Generator().manual_seed(1), config=config)
    params = replay(rule, task, trajectory, 3, lr=0.05, weight_decay=0.5)[-1]
    torch.testing.assert_close(result.end.params["x"], params["x"])
    plain = unroll(rule, None, task, trajectory, 3, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(plain.end.params["x"], params["x"])
    own = dataclasses.replace(trajectory, weight_decay=0.5)  # the trajectory's decay over the config's 0
    again = unroll(rule, None, task, own, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again.end.params["x"], result.end.params["x"], rtol=0, atol=0)
    assert again.end.weight_decay == 0.5


def test_train_by_validation_losses_use_the_val_batch():
    rule, task, trajectory = make("dm_lstm", output_scale=0.3)
    result = unroll(
        rule,
        dict(rule.named_parameters()),
        task,
        trajectory,
        3,
        generator=torch.Generator().manual_seed(0),
        meta_split="val",
        keep_points=True,
    )
    val = task.batch("val", None)
    for point, value in zip(result.points, result.losses, strict=True):
        torch.testing.assert_close(value.detach(), task.loss(point, val).detach())
    torch.testing.assert_close(
        torch.tensor(result.end.initial_loss, dtype=torch.float64), task.loss(trajectory.params, val)
    )


def test_hook_terms_are_added_at_every_point():
    rule, task, trajectory = make("dm_lstm", output_scale=0.3)
    calls = []

    def hook(params, task_, batch, step):
        calls.append(step)
        return 0.5 * params["x"].square().sum()

    result = unroll(
        rule,
        dict(rule.named_parameters()),
        task,
        trajectory,
        3,
        generator=torch.Generator().manual_seed(0),
        hook=hook,
        keep_points=True,
    )
    assert calls == [1, 2, 3]
    expected = sum(0.5 * p["x"].square().sum() for p in result.points)
    torch.testing.assert_close(result.extra, expected)
    assert result.extra.requires_grad


def test_divergence_guard_freezes_the_run_without_nan():
    rule, task, trajectory = make("dm_lstm", output_scale=50.0)
    weights = dict(rule.named_parameters())
    loss, result = segment_loss(rule, weights, task, trajectory, steps=6, max_param_norm=20.0)
    assert result.end.diverged and result.diverged_at is not None
    assert torch.isfinite(result.losses).all() and math.isfinite(float(loss.detach()))
    frozen = result.losses[result.diverged_at - 1 :]
    penalty = result.end.penalty
    assert penalty >= 10.0 * result.end.initial_loss
    assert torch.equal(frozen, torch.full_like(frozen, penalty))
    assert float(sum(p.double().square().sum() for p in result.end.params.values()).sqrt()) <= 20.0
    grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    # a frozen trajectory stays frozen and costs nothing
    again = unroll(rule, weights, task, result.end, 3, generator=torch.Generator())
    assert torch.equal(again.losses, torch.full((3,), penalty, dtype=again.losses.dtype))
    assert again.end.step == result.end.step + 3


def test_divergence_guard_catches_non_finite_losses_without_a_norm_bound():
    class Exploding(QuarticTask):
        def loss(self, params, batch):
            return torch.exp(params["x"].square().sum() * 30.0) * super().loss(params, batch)

    rule, _, _ = make("dm_lstm", output_scale=3.0)
    base = QuarticFamily().sample(torch.Generator().manual_seed(0))
    task = Exploding(*base.data["train"], *base.data["val"])
    trajectory = start_trajectory(rule, task, torch.Generator().manual_seed(1))
    trajectory.params["x"] = torch.full_like(trajectory.params["x"], 0.1)
    loss, result = segment_loss(rule, dict(rule.named_parameters()), task, trajectory, steps=8, max_param_norm=None)
    assert result.end.diverged
    assert torch.isfinite(result.losses).all() and math.isfinite(float(loss.detach()))


def test_evaluation_mode_builds_no_graph():
    rule, task, trajectory = make("dm_lstm")
    result = unroll(rule, None, task, trajectory, 5, generator=torch.Generator(), track_graph=False)
    assert not result.losses.requires_grad and len(result.losses) == 5


def test_hooks_follow_one_declared_protocol():
    """A plain function becomes a FunctionHook with the protocol's no-op defaults; anything else is refused."""
    from learned_optim.meta.unroll import FunctionHook, MetaLossHook, as_hook

    hook = as_hook(lambda params, task, batch, step: None)
    assert isinstance(hook, FunctionHook) and not hook.wants_step_inputs
    hook.begin_trajectory(10)
    assert hook.pop_values() == {}
    assert as_hook(None) is None
    own = MetaLossHook()
    assert as_hook(own) is own
    with pytest.raises(TypeError, match="callable"):
        as_hook(3)


@pytest.mark.parametrize("family", [*FAMILIES, "adafac_mlp"])
def test_apply_rule_with_weights_is_each_tensors_functional_update(family):
    """apply_rule substitutes the net's weights once for all the tensors of a step: every delta, new state and
    meta-gradient is the per-tensor functional_update's, bit for bit."""
    from learned_optim.nets.base import functional_update

    torch.manual_seed(0)
    rule = build_rule(family)
    weights = {k: v.detach().clone().requires_grad_(True) for k, v in rule.named_parameters()}
    params = {"w": torch.randn(5, 3), "b": torch.randn(5), "v": torch.randn(7)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    state = {k: rule.init_state(v.numel(), shape=v.shape) for k, v in params.items()}
    deltas, new_state = apply_rule(rule, weights, grads, params, state, 3)
    (together,) = [torch.autograd.grad(sum(d.square().sum() for d in deltas.values()), list(weights.values()))]
    alone = {}
    for name, p in params.items():
        delta, s = functional_update(
            rule, weights, grads[name].reshape(-1), p.reshape(-1), state[name], torch.tensor(3.0), p.shape
        )
        alone[name] = delta.reshape(p.shape)
        assert torch.equal(deltas[name], alone[name]), name
        assert all(torch.equal(new_state[name][k], s[k]) for k in s), name
    separate = torch.autograd.grad(sum(d.square().sum() for d in alone.values()), list(weights.values()))
    assert all(torch.equal(a, b) for a, b in zip(together, separate, strict=True))
    assert any(g.abs().sum() > 0 for g in together)


# ------------------------------------------------------------------------------ particles unrolled together


def particle_weights(rule, count, scale=0.05, seed=3):
    """``count`` perturbations of the rule's weights, stacked on a leading axis."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: v.detach() + scale * torch.randn((count, *v.shape), generator=gen, dtype=v.dtype)
        for k, v in rule.named_parameters()
    }


def one_by_one(rule, weights, task, trajectories, steps, seed=7, **options):
    return [
        unroll(
            rule,
            {k: v[p] for k, v in weights.items()},
            task,
            trajectory,
            steps,
            generator=torch.Generator().manual_seed(seed),
            track_graph=False,
            **options,
        )
        for p, trajectory in enumerate(trajectories)
    ]


def together(rule, weights, task, trajectories, steps, seed=7, **options):
    return unroll_particles(
        rule, weights, task, trajectories, steps, generator=torch.Generator().manual_seed(seed), **options
    )


def assert_same_segments(expected, got, rtol, noise_only=()):
    """Each particle's segment alike to ``rtol``; the end state of the tensors ``noise_only`` (whose gradient is
    rounding noise alone) is not compared."""
    assert len(expected) == len(got)
    for a, b in zip(expected, got, strict=True):
        assert (a.end.diverged, a.diverged_at, a.end.step) == (b.end.diverged, b.diverged_at, b.end.step)
        torch.testing.assert_close(b.losses, a.losses, rtol=rtol, atol=0)
        torch.testing.assert_close(b.train_losses, a.train_losses, rtol=rtol, atol=0)
        for k in set(a.end.params) - set(noise_only):
            torch.testing.assert_close(b.end.params[k], a.end.params[k], rtol=rtol, atol=rtol)
            for s in a.end.opt_state[k]:
                torch.testing.assert_close(b.end.opt_state[k][s], a.end.opt_state[k][s], rtol=rtol, atol=rtol)
        for field in ("initial_loss", "last_loss", "penalty"):
            x, y = getattr(a.end, field), getattr(b.end, field)
            assert (x is None) == (y is None) and (x is None or math.isclose(x, y, rel_tol=rtol))


@pytest.mark.parametrize("meta_split", ["train", "val"])
@pytest.mark.parametrize("family", [*FAMILIES, "adafac_mlp"])
def test_particles_unrolled_together_are_the_particles_unrolled_one_by_one(family, meta_split):
    """Every family, float64: each particle's losses, end point and net state equal its own unroll's to rounding,
    over two segments (the second continues the first's ends)."""
    rule, task, trajectory = make(family, **({"hidden_size": 4} if family == "adafac_mlp" else {}))
    weights = particle_weights(rule, 3)
    config = UnrollConfig(lr=0.05 if family == "adafac_mlp" else None)
    expected = [trajectory.detached() for _ in range(3)]
    got = [trajectory.detached() for _ in range(3)]
    for _ in range(2):
        loop = one_by_one(rule, weights, task, expected, 3, config=config, meta_split=meta_split)
        batched = together(rule, weights, task, got, 3, config=config, meta_split=meta_split)
        assert_same_segments(loop, batched, rtol=1e-9)
        expected, got = [r.end for r in loop], [r.end for r in batched]
    assert not torch.equal(loop[0].losses, loop[1].losses)  # the particles really differ


def test_particles_unrolled_together_share_the_batches_each_would_draw():
    """A task with random batches, train-by-validation: one draw of train and val batches serves every particle
    in the order each would draw its own."""
    family = make_family("mlp", dataset="digits", hidden_sizes=[8], batch_size=16)
    task = family.sample(torch.Generator().manual_seed(0))
    rule = build_rule("adafac_mlp", {"hidden_size": 4})
    trajectory = start_trajectory(rule, task, torch.Generator().manual_seed(1))
    weights = particle_weights(rule, 2)
    config = UnrollConfig(lr=0.01)
    loop = one_by_one(rule, weights, task, [trajectory] * 2, 4, config=config, meta_split="val")
    batched = together(rule, weights, task, [trajectory] * 2, 4, config=config, meta_split="val")
    assert_same_segments(loop, batched, rtol=1e-4)
    shifted = together(rule, weights, task, [trajectory] * 2, 4, seed=8, config=config, meta_split="val")
    assert not torch.allclose(shifted[0].losses, loop[0].losses, rtol=1e-3)


def test_particles_unrolled_together_each_see_their_own_batch_stream():
    """One generator per stream (e.g. per task instance): each particle sees its stream's batches, as its own
    unroll with that generator; particles on different instances start from different points."""
    family = make_family("mlp", dataset="digits", hidden_sizes=[8], batch_size=16)
    task = family.sample(torch.Generator().manual_seed(0))
    rule = build_rule("adafac_mlp", {"hidden_size": 4})
    starts = [start_trajectory(rule, task, torch.Generator().manual_seed(s)) for s in (1, 2)]
    trajectories, streams = [starts[0], starts[1], starts[1], starts[0]], [0, 1, 1, 0]
    weights = particle_weights(rule, 4)
    config = UnrollConfig(lr=0.01)
    loop = [
        one_by_one(
            rule,
            {k: v[p : p + 1] for k, v in weights.items()},
            task,
            [trajectories[p]],
            3,
            seed=7 + streams[p],
            config=config,
            meta_split="val",
        )[0]
        for p in range(4)
    ]
    generators = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    batched = unroll_particles(
        rule, weights, task, trajectories, 3, generator=generators, streams=streams, config=config, meta_split="val"
    )
    assert_same_segments(loop, batched, rtol=1e-4)
    with pytest.raises(ValueError, match="streams"):
        unroll_particles(rule, weights, task, trajectories, 1, generator=generators, streams=[0, 1, 2, 0])


@pytest.mark.parametrize("kind", ["gru", "transformer", "conv"])
def test_particles_unrolled_together_on_sequence_models_and_convolutions(kind):
    """The meta-mix kinds whose ops vmap treats apart (nn.GRU batches only under a grad transform; the transformer's
    attention is written out under vmap, F.scaled_dot_product_attention in the loop; a convolution with per-particle
    weights), float64: the particles' own unrolls to rounding. (The attention's key bias has a gradient of rounding
    noise only, softmax being blind to a shift of every score, and the net's per-tensor RMS normalisation turns two
    different noises into different steps of Adam's size: its state is left out, and the rest is compared to 1e-6.)"""
    family = make_family(
        "meta-mix", kinds={kind: 1.0}, widths=[16], batch_sizes=[8], eval_batch_size=16, dtype="float64"
    )
    task = family.sample(torch.Generator().manual_seed(0))
    rule = build_rule("adafac_mlp", {"hidden_size": 4}).double()
    trajectory = start_trajectory(rule, task, torch.Generator().manual_seed(1))
    weights = particle_weights(rule, 2)
    config = UnrollConfig(lr=0.01)
    loop = one_by_one(rule, weights, task, [trajectory] * 2, 3, config=config, meta_split="val")
    batched = together(rule, weights, task, [trajectory] * 2, 3, config=config, meta_split="val")
    assert_same_segments(loop, batched, rtol=1e-6, noise_only=("qkv.bias",))


@pytest.mark.parametrize("meta_split", ["train", "val"])
def test_the_guard_freezes_each_particle_unrolled_together_as_its_own_unroll(meta_split):
    """Particles whose steps differ in size: the guard freezes some (at their own steps, with their own
    penalties) while the others go on, as in their own unrolls."""
    rule, task, trajectory = make("dm_lstm", output_scale=2.0)
    weights = particle_weights(rule, 4, scale=0.6, seed=0)
    config = UnrollConfig(max_param_norm=12.0)
    loop = one_by_one(rule, weights, task, [trajectory] * 4, 8, config=config, meta_split=meta_split)
    batched = together(rule, weights, task, [trajectory] * 4, 8, config=config, meta_split=meta_split)
    assert_same_segments(loop, batched, rtol=1e-9)
    assert [r.diverged_at for r in loop] == [3, None, 2, 5]  # frozen at different steps, one never
    options = {"config": config, "meta_split": meta_split}
    again = together(rule, weights, task, [r.end for r in batched], 2, **options)
    assert_same_segments(one_by_one(rule, weights, task, [r.end for r in loop], 2, **options), again, 1e-9)


def test_large_tensors_of_a_net_with_a_native_kernel_step_one_particle_at_a_time(monkeypatch):
    """Where the net runs a native kernel, tensors of NATIVE_LOOP_MIN_COORDINATES or more are stepped per particle
    (vmap cannot batch the kernel), the others batched: the same results either way."""
    rule, task, trajectory = make("adafac_mlp", hidden_size=4)
    weights = particle_weights(rule, 3)
    config = UnrollConfig(lr=0.05)
    loop = one_by_one(rule, weights, task, [trajectory] * 3, 3, config=config)
    monkeypatch.setattr(unroll_module, "NATIVE_LOOP_MIN_COORDINATES", 3)  # x (4,) one at a time, b (2, 1) batched
    calls = []
    original = unroll_module.apply_rule

    def counting(rule, weights, grads, *args):
        calls.append(sorted(grads))
        return original(rule, weights, grads, *args)

    monkeypatch.setattr(rule, "steps_natively", lambda device: True)
    monkeypatch.setattr(unroll_module, "apply_rule", counting)
    batched = together(rule, weights, task, [trajectory] * 3, 3, config=config)
    assert_same_segments(loop, batched, rtol=1e-9)
    assert calls.count(["b"]) == 3 and calls.count(["x"]) == 9  # one batched call, three per-particle calls a step


def test_unroll_particles_refuses_particles_that_do_not_stand_together():
    rule, task, trajectory = make("dm_lstm")
    weights = particle_weights(rule, 2)
    later = dataclasses.replace(trajectory.detached(), step=3)
    with pytest.raises(ValueError, match="must share"):
        together(rule, weights, task, [trajectory, later], 2)
    with pytest.raises(ValueError, match="not stacked over 3"):
        together(rule, weights, task, [trajectory] * 3, 2)


# ------------------------------------------------------------------- task instances unrolled together, with a graph


def instance_starts(rule, task, seeds):
    return [start_trajectory(rule, task, torch.Generator().manual_seed(s)) for s in seeds]


def summed_meta_gradient(rule, results):
    weights = [p for _, p in rule.named_parameters()]
    objective = sum(r.losses.sum() for r in results)
    return objective.detach(), torch.cat([g.reshape(-1) for g in torch.autograd.grad(objective, weights)])


def instances_one_by_one(rule, task, starts, steps, generators, **options):
    weights = dict(rule.named_parameters())
    return [
        unroll(rule, weights, task, s, steps, generator=g, **options) for s, g in zip(starts, generators, strict=True)
    ]


def instances_together(rule, task, starts, steps, generators, **options):
    weights = dict(rule.named_parameters())
    streams = list(range(len(generators))) if len(generators) > 1 else None
    return unroll_particles(
        rule, weights, task, starts, steps, generator=generators, streams=streams, shared_weights=True,
        track_graph=True, **options,
    )  # fmt: skip


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("meta_split", ["train", "val"])
@pytest.mark.parametrize("family", ["dm_lstm", "mlp", "adafac_mlp"])
def test_instances_unrolled_together_with_a_graph_give_their_unrolls_meta_gradients(family, meta_split, second_order):
    """Truncated BPTT over task instances: instances from their own starting points and batch streams, unrolled
    together with the graph kept (one net, ``shared_weights``), give the losses, ends and summed meta-gradient of
    their own unrolls (float64), first and second order."""
    rule, task, _ = make(family, **({"hidden_size": 4} if family == "adafac_mlp" else {}))
    starts = instance_starts(rule, task, (1, 5))
    config = UnrollConfig(lr=0.05 if family == "adafac_mlp" else None, second_order=second_order)

    def generators():
        return [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]

    options = {"config": config, "meta_split": meta_split}
    loop = instances_one_by_one(rule, task, starts, 3, generators(), **options)
    batched = instances_together(rule, task, starts, 3, generators(), **options)
    assert_same_segments(loop, batched, rtol=1e-9)
    (objective, gradient), (objective_b, gradient_b) = (
        summed_meta_gradient(rule, loop),
        summed_meta_gradient(rule, batched),
    )
    torch.testing.assert_close(objective_b, objective, rtol=1e-12, atol=0)
    torch.testing.assert_close(gradient_b, gradient, rtol=1e-9, atol=1e-12)
    assert gradient.abs().max() > 0


@pytest.mark.parametrize("kind", ["gru", "transformer", "conv"])
def test_instances_of_sequence_models_and_convolutions_unrolled_together_with_a_graph(kind):
    """The meta-mix kinds vmap treats apart (see the particles' test above), with the graph kept: the summed
    meta-gradient of the instances' own unrolls (float64, 1e-6)."""
    family = make_family(
        "meta-mix", kinds={kind: 1.0}, widths=[16], batch_sizes=[8], eval_batch_size=16, dtype="float64"
    )
    task = family.sample(torch.Generator().manual_seed(0))
    rule = build_rule("adafac_mlp", {"hidden_size": 4}).double()
    starts = instance_starts(rule, task, (1, 2))
    options = {"config": UnrollConfig(lr=0.01), "meta_split": "val"}

    def generators():
        return [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]

    loop = instances_one_by_one(rule, task, starts, 3, generators(), **options)
    batched = instances_together(rule, task, starts, 3, generators(), **options)
    torch.testing.assert_close(
        summed_meta_gradient(rule, batched)[1], summed_meta_gradient(rule, loop)[1], rtol=1e-6, atol=1e-12
    )


def test_the_guard_freezes_instances_unrolled_together_with_a_graph_as_their_own_unrolls():
    """Instances frozen at their own steps by the norm bound: the losses, penalties and meta-gradient of their own
    unrolls (a frozen instance's rejected step adds nothing to it)."""
    rule, task, _ = make("dm_lstm", output_scale=2.0)
    starts = instance_starts(rule, task, range(4))
    options = {"config": UnrollConfig(max_param_norm=3.0), "meta_split": "val"}
    loop = instances_one_by_one(rule, task, starts, 8, [torch.Generator().manual_seed(7)] * 4, **options)
    batched = instances_together(rule, task, starts, 8, [torch.Generator().manual_seed(7)], **options)
    assert [r.diverged_at for r in loop] == [None, 7, 8, 8]
    assert_same_segments(loop, batched, rtol=1e-9)
    torch.testing.assert_close(summed_meta_gradient(rule, batched)[1], summed_meta_gradient(rule, loop)[1])


class KinkTask(Task):
    r"""f(x) = sum(sqrt|x - 1|) + |x|^2: a finite loss whose gradient is not finite where a coordinate is 1."""

    name = "kink"

    def init_params(self, generator):
        return {"x": torch.randn(5, generator=generator, dtype=torch.float64)}

    def batch(self, split, generator):
        return {}

    def loss(self, params, batch):
        return (params["x"] - 1.0).abs().sqrt().sum() + params["x"].square().sum()


@pytest.mark.parametrize("family", ["dm_lstm", "adafac_mlp"])
def test_an_instance_with_a_non_finite_gradient_leaves_the_others_meta_gradient_finite(family):
    """An instance whose gradient is NaN at its first step is frozen there, as in its own unroll, and the
    meta-gradient of the others is theirs: its step runs from a zero gradient, so no NaN enters the graph that the
    batch backpropagates through (a NaN step masked out by ``torch.where`` would still make the gradient NaN)."""
    torch.manual_seed(0)
    rule = build_rule(family, {"hidden_size": 4} if family == "adafac_mlp" else {}).double()
    task = KinkTask()
    starts = instance_starts(rule, task, range(3))
    starts[1] = starts[1].detached()
    starts[1].params = {"x": starts[1].params["x"].clone().index_fill_(0, torch.tensor([2]), 1.0)}
    options = {"config": UnrollConfig(lr=0.05 if family == "adafac_mlp" else None)}
    loop = instances_one_by_one(rule, task, starts, 4, [torch.Generator().manual_seed(7)] * 3, **options)
    batched = instances_together(rule, task, starts, 4, [torch.Generator().manual_seed(7)], **options)
    assert [r.diverged_at for r in batched] == [r.diverged_at for r in loop] == [None, 1, None]
    gradient = summed_meta_gradient(rule, batched)[1]
    assert torch.isfinite(gradient).all()
    torch.testing.assert_close(gradient, summed_meta_gradient(rule, loop)[1])


def test_unroll_particles_with_a_graph_refuses_gradient_checkpointing():
    rule, task, trajectory = make("dm_lstm")
    with pytest.raises(ValueError, match="checkpoint_steps is not supported with track_graph"):
        instances_together(
            rule, task, [trajectory] * 2, 2, [torch.Generator()], config=UnrollConfig(checkpoint_steps=True)
        )
