"""The per-tensor normalised Adafactor-feature MLP (``adafac_mlp``): features, step size, μP scale, Adam init.

The runtime battery (``tests/core/test_optimizer.py``, ``tests/core/test_checkpoints.py``) covers it like every family;
these tests check its own math against direct, loop-based computations.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from learned_optim import AdafacMLP, LearnedOptimizer, functional_update, kernels
from learned_optim.features import (
    GRAM_MAX_STEPS,
    GRAM_MIN_SAVED_MULTIPLY_ADDS,
    NEWTON_SCHULZ_COEFFICIENTS,
    checked_sums,
    ema,
    factored_moments,
    factored_pack_layout,
    factored_preconditioner,
    matrix_view,
    newton_schulz_orthogonalize,
    overflowed,
    wide_sums,
)
from learned_optim.nets.adafac_mlp import mup_scale
from learned_optim.testing import PerTensorSteps

SHAPES = [(7,), (5, 3), (4, 2, 3, 3), (1, 6), (6, 1)]


def direct_features(rule: AdafacMLP, grads: list[Tensor], params: list[Tensor]) -> Tensor:
    """The 28 features after ``len(grads)`` steps, element by element from the definitions (no vectorised helper)."""
    c = rule.config
    shape = grads[0].shape
    rows, cols = matrix_view(shape)
    t = len(grads)
    g = grads[-1].reshape(rows, cols).double()
    p = params[-1].reshape(rows, cols).double()

    def ema_of(values: list[Tensor], beta: float) -> Tensor:
        out = torch.zeros_like(values[0])
        for x in values:
            out = beta * out + (1 - beta) * x
        return out

    sq = [x.reshape(rows, cols).double() ** 2 + c.factored_eps for x in grads]
    feats = [g, p]
    ms = [ema_of([x.reshape(rows, cols).double() for x in grads], b) for b in c.momentum_decays]
    v = ema_of([x.reshape(rows, cols).double() ** 2 for x in grads], c.second_moment_decay)
    feats += ms + [v]
    v_hat = v / (1 - c.second_moment_decay**t)
    feats += [m / (1 - b**t) / torch.sqrt(v_hat + c.moment_eps) for m, b in zip(ms, c.momentum_decays, strict=True)]
    feats.append(1 / torch.sqrt(v_hat + c.moment_eps))
    row_vals, col_vals, precs = [], [], []
    for b in c.factored_decays:
        r = torch.stack([ema_of([s[i].mean() for s in sq], b) for i in range(rows)])  # (R,)
        col = torch.stack([ema_of([s[:, j].mean() for s in sq], b) for j in range(cols)])  # (C,)
        v_fac = r[:, None] * col[None, :] / r.mean()  # Adafactor's rank-1 second moment
        precs.append(1 / torch.sqrt(v_fac))
        row_vals.append(r[:, None].expand(rows, cols))
        col_vals.append(col[None, :].expand(rows, cols))
    feats += [g * q for q in precs] + [m * q for m, q in zip(ms, precs, strict=True)]
    feats += row_vals + [1 / torch.sqrt(r + c.factored_rsqrt_eps) for r in row_vals]
    feats += col_vals + [1 / torch.sqrt(x + c.factored_rsqrt_eps) for x in col_vals]
    return torch.stack([f.reshape(-1) for f in feats])


def run_steps(rule: AdafacMLP, shape: tuple[int, ...], steps: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    state = rule.init_state(n, shape=shape)
    grads, params = [], []
    param = torch.randn(n, generator=gen)
    for t in range(1, steps + 1):
        grad = torch.randn(n, generator=gen) * 10.0 ** float(torch.randint(-4, 1, (), generator=gen))
        grads.append(grad.reshape(shape))
        params.append(param.reshape(shape))
        blocks, scale, row_f, col_f, _ = rule.features(grad, param, state, torch.tensor(float(t)), shape)
        rows, cols = matrix_view(shape)
        index = torch.arange(n)
        features = torch.cat([torch.cat(blocks) * scale[:, None], row_f[:, index // cols], col_f[:, index % cols]])
        delta, state = functional_update(rule, None, grad, param, state, torch.tensor(float(t)), shape)
        param = param + 1e-2 * delta
    return features, delta, state, grads, params


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_features_and_factored_statistics_match_a_direct_computation(shape):
    rule = AdafacMLP(init="random")
    features, delta, state, grads, params = run_steps(rule, shape, steps=4)
    direct = direct_features(rule, grads, params)
    assert features.shape == (28, math.prod(shape)) == direct.shape
    torch.testing.assert_close(features.double(), direct, rtol=2e-4, atol=0)
    # the whole step from the direct features: per-tensor RMS normalisation, the MLP, normalised direction
    x = direct / torch.sqrt(direct.square().mean(dim=1, keepdim=True) + rule.config.feature_rms_eps)
    d = rule.mlp.double()(x.t()).squeeze(1)
    rule.float()
    expected = -rule.step_scale(shape) * d / torch.sqrt(d.square().mean() + rule.config.direction_rms_eps)
    torch.testing.assert_close(delta.double(), expected, rtol=2e-3, atol=2e-4)
    rows, cols = matrix_view(shape)
    assert state["row"].shape == (rows, 3) and state["col"].shape == (cols, 3)


def test_vector_factored_statistics_are_the_full_second_moment():
    gen = torch.Generator().manual_seed(0)
    decays = torch.tensor([0.9, 0.99])
    row, col = torch.zeros(6, 2), torch.zeros(1, 2)
    full = torch.zeros(6, 2)
    for _ in range(5):
        g = torch.randn(6, 1, generator=gen)
        row, col = factored_moments(g.square(), row, col, decays, 0.0)
        full = full * decays + (1 - decays) * g.square()
    torch.testing.assert_close(factored_preconditioner(row, col), torch.rsqrt(full).t())


@pytest.mark.parametrize("decay", [torch.tensor([0.9, 0.99, 0.999]), 0.9])
def test_ema_into_storage_equals_the_out_of_place_average(decay):
    """``ema(..., out=)``, the blocked step's update of the row statistics in their storage: a ``(n, 1)`` value
    broadcast against ``(K,)`` decays (or one float decay), into ``out`` or into the average itself, equals the
    out-of-place average up to rounding, and the average is left as it was unless it is ``out``."""
    gen = torch.Generator().manual_seed(0)
    average, value = torch.rand(50, 3, generator=gen), torch.rand(50, 1, generator=gen)
    want = ema(average, value, decay)
    out = torch.empty(50, 3)
    kept = average.clone()
    assert ema(average, value, decay, out=out) is out
    torch.testing.assert_close(out, want)
    assert torch.equal(average, kept)
    assert ema(average, value, decay, out=average) is average
    torch.testing.assert_close(average, want)


@pytest.mark.parametrize("mup", [True, False])
def test_applied_update_has_rms_lr_times_scale_per_tensor(mup):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 200), nn.ReLU(), nn.Conv1d(200, 30, 1), nn.Flatten(), nn.LayerNorm(30))
    lr = 3e-3
    opt = LearnedOptimizer(model.parameters(), AdafacMLP(init="random", mup=mup), lr=lr)
    x = torch.randn(16, 8)
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        model[4](model[2](model[1](model[0](x)).unsqueeze(-1)).squeeze(-1)).square().mean().backward()
        opt.step()
        for b, p in zip(before, model.parameters(), strict=True):
            rms = (p.detach() - b).square().mean().sqrt()
            scale = opt.rule.step_scale(p.shape)
            assert scale == (mup_scale(p.shape, 64) if mup else 1.0)
            torch.testing.assert_close(float(rms / (lr * scale)), 1.0, rtol=1e-4, atol=0)


def test_direction_normalisation_switch():
    """normalize_direction=False (the ablation) applies the MLP output as is: its RMS follows the input scale."""
    gen = torch.Generator().manual_seed(0)
    grad, param = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
    on, off = AdafacMLP(init="random"), AdafacMLP(init="random", normalize_direction=False)
    off.load_state_dict(on.state_dict())
    step = torch.tensor(1.0)
    d_on, _ = on(grad, param, on.init_state(40), step)
    d_off, _ = off(grad, param, off.init_state(40), step)
    torch.testing.assert_close(d_on.square().mean().sqrt(), torch.tensor(1.0))
    torch.testing.assert_close(d_on, d_off / d_off.square().mean().sqrt())  # the same direction, unnormalised
    assert abs(float(d_off.detach().square().mean().sqrt()) - 1.0) > 1e-3


def test_the_direction_clip_bounds_each_normalised_coordinate_on_every_path():
    """``direction_clip`` kappa: the normalised direction clamped at +-kappa, coordinates under the bound unchanged;
    the one-shot, packed and blocked paths and the native kernel agree (float rounding) and equal the unclipped
    step clamped at kappa times its RMS; a clip without the normalisation, or at 0, is refused."""
    torch.manual_seed(0)
    clipped = AdafacMLP(mup=False, direction_clip=2.0)
    with torch.no_grad():  # heavy-tailed directions: random weights
        for weight in clipped.parameters():
            weight.normal_(0.0, 0.7)
    free = AdafacMLP(mup=False)
    free.load_state_dict(clipped.state_dict())
    gen = torch.Generator().manual_seed(1)
    grad, param = torch.randn(600, generator=gen) ** 3, torch.randn(600, generator=gen)
    d_clip, _ = clipped(grad, param, clipped.init_state(600), torch.tensor(1.0))
    d_free, _ = free(grad, param, free.init_state(600), torch.tensor(1.0))
    assert float(d_free.detach().abs().max()) > 2.5  # the bound binds on some coordinates
    torch.testing.assert_close(d_clip, d_free.clamp(-2.0, 2.0))
    shapes = [(64, 32), (32,), (16, 8), (300, 300), (70_000,)]  # a pack, the one-shot path, the blocked path
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) ** 3 for s in shapes]
    moved = []
    with kernels.enabled_as(False):  # the free net on the same ATen paths as the clipped one
        for cls, rule in ((LearnedOptimizer, clipped), (PerTensorSteps, clipped), (LearnedOptimizer, free)):
            params = [nn.Parameter(x.clone()) for x in start]
            opt = cls(params, rule, lr=1.0)
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
            moved.append([p.detach() - x for p, x in zip(params, start, strict=True)])
    if kernels.available():  # the native kernel's clip: the same steps to float rounding
        params = [nn.Parameter(x.clone()) for x in start]
        opt = LearnedOptimizer(params, clipped, lr=1.0)
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        with kernels.forced():
            opt.step()
        for p, x, aten in zip(params, start, moved[0], strict=True):
            torch.testing.assert_close(p.detach() - x, aten, rtol=0, atol=5e-4 * float(aten.abs().max()))
    for packed, alone, unclipped in zip(*moved, strict=True):
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)
        # the free step is s a d / rms(d), of RMS s a: the clipped one is it clamped at 2 s a
        bound = 2.0 * float(unclipped.square().mean().sqrt())
        torch.testing.assert_close(packed, unclipped.clamp(-bound, bound), rtol=1e-4, atol=1e-6 * bound)
    for bad in ({"direction_clip": 0.0}, {"direction_clip": 2.0, "normalize_direction": False}):
        with pytest.raises(ValueError, match="direction_clip bounds the normalised direction"):
            AdafacMLP(**bad)


def test_mup_scale_per_shape():
    assert mup_scale((10,), 64) == 1.0  # bias / norm gain
    assert mup_scale((), 64) == 1.0
    assert mup_scale((512, 64), 64) == 1.0  # input layer: fan-in at most the base
    assert mup_scale((256, 512), 64) == 64 / 512  # hidden matrix: 1/fan_in relative to the base
    assert mup_scale((10, 128), 64) == 0.5  # output matrix too (μP's Adam output-layer rule)
    assert mup_scale((32, 16, 3, 3), 64) == 64 / 144  # conv: fan-in in * kh * kw
    assert AdafacMLP(mup=False).step_scale((256, 512)) == 1.0


def _model_and_twin() -> tuple[nn.Module, nn.Module]:
    """A small MLP and an identical copy, for stepping with two optimizers side by side."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    twin = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    twin.load_state_dict(model.state_dict())
    return model, twin


def test_untrained_net_is_adamw_with_normalised_updates():
    """init="adam": each tensor's step is Adam's (betas 0.9, 0.999) rescaled to RMS lr * scale."""
    model, twin = _model_and_twin()
    opt = LearnedOptimizer(model.parameters(), AdafacMLP(), lr=1e-3, weight_decay=0.1)
    adam = torch.optim.Adam(twin.parameters(), lr=1.0)  # its step, before our normalisation
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)
        for m, o in ((model, opt), (twin, adam)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
        ours_before = [p.detach().clone() for p in model.parameters()]
        adam_before = [p.detach().clone() for p in twin.parameters()]
        opt.step()
        adam.step()
        for a, p, b, q in zip(ours_before, model.parameters(), adam_before, twin.parameters(), strict=True):
            adam_dir = q.detach() - b
            expected = (
                -1e-3 * 0.1 * a + 1e-3 * opt.rule.step_scale(p.shape) * adam_dir / adam_dir.square().mean().sqrt()
            )
            # eps differs (Adam: 1e-8 outside the sqrt; ours 1e-16 inside): 0.3% of the step at most
            torch.testing.assert_close(p.detach() - a, expected, rtol=1e-3, atol=3e-6)
            q.data.copy_(p.detach())  # follow our trajectory so both see the same gradients


@pytest.mark.parametrize("beta2", [0.999, 0.95])
@pytest.mark.parametrize("block", [None, 16])
def test_untrained_net_with_adam_magnitude_is_exactly_adamw(block, beta2):
    """init="adam", step_magnitude="adam", mup off: the normalised direction times the RMS of Adam's own
    step is Adam's step, so the untrained optimizer is torch.optim.AdamW (one-shot and blocked paths), with
    the net's second-moment decay as AdamW's beta2."""
    model, twin = _model_and_twin()
    rule = AdafacMLP(step_magnitude="adam", mup=False, second_moment_decay=beta2)
    if block is not None:
        rule.coordinate_block = block
    opt = LearnedOptimizer(model.parameters(), rule, lr=1e-2, weight_decay=0.1)
    adamw = torch.optim.AdamW(twin.parameters(), lr=1e-2, betas=(0.9, beta2), weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)
        for m, o in ((model, opt), (twin, adamw)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
    # eps differs (Adam: 1e-8 outside the sqrt; ours 1e-16 inside)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path", ["kernel", "aten"])
@pytest.mark.parametrize("steps", [0, 3])
def test_untrained_net_with_momentum_init_steps_along_the_orthogonalised_momentum(steps, path):
    """init="momentum": the direction is the EMA momentum at adam_feature_decay (through Newton-Schulz with
    newton_schulz_steps, Muon's direction without the look-ahead), moved by AdamW's per-tensor step RMS
    (step_magnitude="adam"); the kernel and ATen paths give the same steps."""
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(6, 10))
    rule = AdafacMLP(
        init="momentum", adam_feature_decay=0.99, step_magnitude="adam", mup=False, newton_schulz_steps=steps
    )
    opt = LearnedOptimizer([param], rule, lr=1e-2)
    twin = nn.Parameter(param.detach().clone())
    adam = torch.optim.Adam([twin], lr=1.0, betas=(0.99, 0.999), eps=0.0)  # its step's RMS is the magnitude
    momentum = torch.zeros_like(param)
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):
        grad = torch.randn(6, 10, generator=gen)
        momentum.mul_(0.99).add_(grad, alpha=0.01)
        before = param.detach().clone()
        param.grad, twin.grad = grad.clone(), grad.clone()
        twin.data.copy_(before)
        with kernels.forced() if path == "kernel" else kernels.enabled_as(False):
            opt.step()
        adam.step()
        magnitude = (twin.detach() - before).square().mean().sqrt()
        direction = newton_schulz_orthogonalize(momentum.unsqueeze(0), steps).squeeze(0) if steps else momentum
        expected = -1e-2 * magnitude * direction / direction.square().mean().sqrt()
        torch.testing.assert_close(param.detach() - before, expected, rtol=1e-4, atol=1e-7)


def test_momentum_init_needs_its_decay_among_the_momenta():
    with pytest.raises(ValueError, match="adam_feature_decay 0.95 is not in momentum_decays"):
        AdafacMLP(init="momentum", adam_feature_decay=0.95)
    with pytest.raises(ValueError, match="init must be 'adam', 'momentum' or 'random'"):
        AdafacMLP(init="muon")


def test_reconfigured_keeps_the_weights_dtype_and_provenance_and_refuses_a_change_of_shape():
    rule = AdafacMLP(hidden_size=4).double().requires_grad_(False)
    changed = rule.reconfigured(second_moment_decay=0.95, direction_clip=3.0)
    assert (changed.config.second_moment_decay, changed.config.direction_clip) == (0.95, 3.0)
    assert changed.config.hidden_size == 4 and changed.provenance is rule.provenance
    assert changed.compute_dtype == torch.float64 and not any(p.requires_grad for p in changed.parameters())
    assert all(torch.equal(v, rule.state_dict()[k]) for k, v in changed.state_dict().items())
    assert rule.config.second_moment_decay == 0.999  # the original is left as it was
    with pytest.raises(ValueError, match="change the net's weights"):
        rule.reconfigured(hidden_size=8)
    with pytest.raises(ValueError, match="momentum_decays"):
        rule.reconfigured(momentum_decays=(0.9,))  # fewer features: the first layer's shape changes


def test_bad_shape_and_config_raise_clear_errors():
    rule = AdafacMLP()
    with pytest.raises(ValueError, match="step_magnitude must be"):
        AdafacMLP(step_magnitude="huge")
    with pytest.raises(ValueError, match="does not match a flat tensor"):
        rule(torch.zeros(6), torch.zeros(6), rule.init_state(6), torch.tensor(1.0), shape=(4, 2))
    with pytest.raises(ValueError, match="same length"):
        AdafacMLP(momentum_decays=(0.9,))
    with pytest.raises(ValueError, match="init must be"):
        AdafacMLP(init="zeros")


def test_adapt_fine_tunes_the_net_with_a_real_lr():
    """adapt (M-L2O) runs through the whole-tensor rule: the net changes, the model does not, training goes on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = LearnedOptimizer(model.parameters(), AdafacMLP(hidden_size=4), lr=1e-2, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(6)]
    net_before = {k: v.clone() for k, v in opt.rule.state_dict().items()}
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    opt.adapt(model, nn.functional.cross_entropy, batches, steps=2, unroll=2)
    assert any(not torch.equal(net_before[k], v) for k, v in opt.rule.state_dict().items())
    assert all(torch.equal(model_before[k], v) for k, v in model.state_dict().items())
    opt.zero_grad()
    nn.functional.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    ("shape", "block", "config"),
    [
        ((37, 23), 100, {}),  # blocks of 4 rows, the last one shorter
        ((5, 300), 100, {"time_scales": (10.0, 100.0)}),  # a row longer than the block: one row per block
        ((37, 23), 100, {"time_scales": (10.0,), "lr_ratio_input": True}),  # both per-tensor constants
        ((900,), 128, {"normalize_direction": False}),  # a vector: one column, its row terms block by block
        ((290, 2), 20, {}),  # a tall matrix: row terms made 20 rows (two blocks) at a time, the last span shorter
        ((6, 4, 3, 3), 50, {"mup": False, "step_magnitude": "adam"}),  # a conv weight as (out, in*kh*kw)
        ((37, 23), 100, {"second_moment_decay": 0.95, "step_magnitude": "adam"}),
        ((37, 23), 100, {"num_hidden_layers": 3}),  # the activations' two buffers taken in turn, twice
        ((900,), 128, {"num_hidden_layers": 1}),  # the output layer straight after the first
        ((37, 23), 100, {"magnitude_head_bound": 3.0}),  # the head's mean activations summed over blocks
        ((900,), 128, {"magnitude_head_bound": 3.0, "num_hidden_layers": 1, "direction_clip": 2.0}),
        ((37, 23), 100, {"newton_schulz_steps": 5}),  # the whole direction orthogonalised after the blocks
        ((6, 4, 3, 3), 50, {"newton_schulz_steps": 3, "step_magnitude": "adam", "direction_clip": 1.5}),
        ((37, 23), 100, {"newton_schulz_steps": 3, "step_magnitude": "adam", "orthogonal_step_rms": 0.2}),
        ((900,), 128, {"newton_schulz_steps": 3, "step_magnitude": "adam", "orthogonal_step_rms": 0.2}),  # Adam's a
        ((37, 23), 100, {"newton_schulz_steps": 3, "step_magnitude": "adam", "orthogonal_step_floor": 0.5}),
    ],
)
@pytest.mark.parametrize("in_place", [False, True])
def test_blocked_inference_path_matches_the_one_shot_path(shape, block, config, in_place):
    """Without autograd, tensors above ``coordinate_block`` coordinates are stepped in two passes (the first over
    chunks of ``sums_block_factor`` blocks, here several, the last one shorter; the second block by block); the
    update and the new state equal the one-shot (differentiable) computation's."""
    torch.manual_seed(0)
    rule = AdafacMLP(**config)
    with torch.no_grad():  # every feature matters (the Adam init reads one): random weights and biases
        for weight in rule.parameters():
            weight.normal_(0.0, 0.5)
    rule.set_lr_ratio(0.3)  # read by nets with lr_ratio_input only
    n = math.prod(shape)
    grad, param = torch.randn(n), torch.randn(n)
    state = rule.init_state(n, shape=shape)
    for name, value in state.items():
        value.copy_(torch.rand_like(value) * 0.1 + (0.01 if name in ("v", "row", "col") else 0.0))
    step = torch.tensor(7.0)
    with torch.enable_grad():  # autograd on: the one-shot path
        want, want_state = rule(grad, param, state, step, shape=shape)
    rule.coordinate_block, rule.sums_block_factor = block, 3
    blocked_state = {k: v.clone() for k, v in state.items()}
    with torch.no_grad(), kernels.enabled_as(False):  # the ATen blocked path (the kernel: tests/core/test_kernels.py)
        extra = {"out_state": blocked_state} if in_place else {}
        got, got_state = rule(grad, param, blocked_state, step, shape=shape, **extra)
    torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-6)
    for name, value in want_state.items():
        torch.testing.assert_close(got_state[name], value.detach(), rtol=1e-5, atol=1e-7)
        if in_place:
            assert got_state[name].data_ptr() == blocked_state[name].data_ptr()
    if not in_place:  # the given state is left as it was
        for name, value in blocked_state.items():
            assert torch.equal(value, state[name])


@pytest.mark.parametrize("lr", [3e-3, torch.tensor(3e-3)])
def test_optimizer_steps_large_tensors_in_place_like_small_ones(lr):
    """The runtime's in-place path for whole-tensor rules (state written by the rule, parameter updated in
    place, weight decay, a tensor lr) gives the same trajectory as the one-shot path."""
    torch.manual_seed(1)
    rule = AdafacMLP()
    with torch.no_grad():
        for weight in rule.parameters():
            weight.normal_(0.0, 0.5)
    blocked = AdafacMLP(rule.config)
    blocked.load_state_dict(rule.state_dict())
    blocked.coordinate_block = 64
    start = torch.randn(40, 30)
    params = [nn.Parameter(start.clone()) for _ in range(2)]
    optimizers = [
        LearnedOptimizer([p], r, lr=lr, weight_decay=0.1) for p, r in zip(params, (rule, blocked), strict=True)
    ]
    for i in range(4):
        grad = torch.randn(40, 30) * (i + 1)
        for p, opt in zip(params, optimizers, strict=True):
            p.grad = grad.clone()
            opt.step()
    torch.testing.assert_close(params[1], params[0], rtol=1e-5, atol=1e-6)
    for name, value in optimizers[0].state[params[0]].items():
        torch.testing.assert_close(optimizers[1].state[params[1]][name], value, rtol=1e-5, atol=1e-7)
    assert not torch.equal(params[0], start)


def test_inference_blocks_are_large_on_an_accelerator():
    """A GPU block costs its kernel launches, not its memory traffic: blocks there are 16x the CPU's (the device is
    only read, so this runs without one)."""
    rule = AdafacMLP()
    assert rule.block_coordinates(torch.device("cpu")) == rule.coordinate_block
    assert (
        rule.block_coordinates(torch.device("cuda")) == rule.accelerator_coordinate_block >= 16 * rule.coordinate_block
    )


def _never_asked(*sums: Tensor) -> bool:
    raise AssertionError("an accelerator's step reads no overflow flag back")


@pytest.mark.parametrize(
    "path", ["aten-packed", "aten-per-tensor", "aten-packed-as-on-gpu", "aten-per-tensor-as-on-gpu", "kernel"]
)
@pytest.mark.parametrize("scale", [1.0, 1e10, 1e15, 1e17])
def test_every_path_keeps_the_step_at_extreme_gradient_scales(scale, path, monkeypatch):
    """Gradients up to 1e17: the second moment and the row/column statistics (~g^2) have mean squares of up to
    ~1e68, past float32's range, yet each feature's normaliser (~1 / g^2) is an ordinary float. Every path (the
    one-shot and blocked ATen steps, the packed one, the native kernel) takes the steps of a float64 run of the
    same optimizer to float32's precision: a pack of small tensors, a (300, 300) matrix and a (70000,) vector above
    the blocked path's bound, three steps. At 1e17 even float32 sums of g^2 over the vectors (n g^2 ~ 4e38 and 7e38;
    the (40000,) one in the pack, or alone on the one-shot path) overflow, where the ATen steps sum in float64 instead
    (the kernel always does). ``-as-on-gpu``: the float32 run takes the float64 sums directly, as on an
    accelerator (:func:`~learned_optim.features.wide_sums_directly`: no float32 sums, no check), so that the sums a
    GPU takes are checked at every scale against the float64 run's, which has no overflow to redo."""
    if path == "kernel" and not kernels.available():
        pytest.skip(f"native kernels unavailable: {kernels.build_error()}")
    torch.manual_seed(0)
    rule = AdafacMLP(step_magnitude="adam", mup=False)
    with torch.no_grad():  # every feature matters (the Adam init reads one): random weights and biases
        for weight in rule.parameters():
            weight.normal_(0.0, 0.5)
    shapes = [(64, 32), (32,), (16, 8), (40_000,), (300, 300), (70_000,)]
    gen = torch.Generator().manual_seed(1)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) * scale for s in shapes] for _ in range(3)]
    moved = {}
    cls = PerTensorSteps if path.startswith("aten-per-tensor") else LearnedOptimizer
    for dtype in (torch.float64, torch.float32):
        twin = AdafacMLP(rule.config).to(dtype)
        twin.load_state_dict(rule.state_dict())
        params = [nn.Parameter(x.to(dtype, copy=True)) for x in start]
        opt = cls(params, twin, lr=1.0, weight_decay=0.0)
        if path.endswith("-as-on-gpu") and dtype == torch.float32:
            for module in ("learned_optim.features", "learned_optim.nets.adafac_mlp"):
                monkeypatch.setattr(f"{module}.wide_sums_directly", lambda like: wide_sums())
            monkeypatch.setattr("learned_optim.features.overflowed", _never_asked)  # (checked_sums asks it)
        with kernels.forced() if path == "kernel" and dtype == torch.float32 else kernels.enabled_as(False):
            for step in grads:
                for p, g in zip(params, step, strict=True):
                    p.grad = g.to(dtype, copy=True)
                opt.step()
        moved[dtype] = [(p.detach() - x.to(dtype)).double() for p, x in zip(params, start, strict=True)]
    for got, want in zip(moved[torch.float32], moved[torch.float64], strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-4 * float(want.abs().max()))


def test_the_overflow_check_reads_a_cpu_sum_and_never_an_accelerators():
    """On the CPU the check looks at the float32 sums; on another device it answers True without reading them (a
    read would make the host wait for the device at each check): a ``meta`` tensor, which has no values to read,
    stands in for one. With autograd recording the float32 sums are kept everywhere."""
    finite, past = torch.tensor([1.0, 3e38]), torch.tensor([1.0, math.inf])
    elsewhere = torch.empty(2, device="meta")
    with torch.no_grad():
        assert not overflowed(finite) and overflowed(finite, past) and overflowed(elsewhere)
        # read as each tensor's total: a NaN counts, and so do finite sums whose total is past the range (the float64
        # sums are the better answer there)
        assert overflowed(torch.tensor([1.0, math.nan])) and overflowed(torch.tensor([3e38, 3e38]))
    assert not overflowed(past) and not overflowed(elsewhere)


def test_a_packs_dense_sums_of_squares_are_each_tensors_own_with_one_overflow_check_for_the_pack(monkeypatch):
    """The packed step's dense rows' sums of squares per tensor (``_dense_sum_squares`` with the pack's runs) equal
    each tensor's own, bit for bit, with one overflow check for the whole pack; where one tensor's float32 sums
    overflow, every tensor's are taken in float64 (the second moment's row is always)."""
    rule = AdafacMLP()
    shapes = [(7,), (3, 5), (3, 5), (4, 6), (9,)]
    layout = factored_pack_layout(tuple(shapes))
    dense = torch.randn(16, layout.coordinates + 5, generator=torch.Generator().manual_seed(0))
    checks: list[int] = []

    def counted(*sums: Tensor) -> bool:
        checks.append(len(sums))
        return overflowed(*sums)

    monkeypatch.setattr("learned_optim.features.overflowed", counted)
    with torch.no_grad():
        for scale in (1.0, 1e19):
            dense[:, layout.bounds[3][0][0] : layout.bounds[3][0][1]] *= scale  # the (4, 6) tensor's rows
            checks.clear()
            packed = rule._dense_sum_squares(dense, layout.runs)
            assert checks == [1] and packed.shape == (16, len(shapes)) and packed.dtype == torch.float64
            for s, ((a, b), *_) in enumerate(layout.bounds):
                if scale == 1.0:
                    assert torch.equal(packed[:, s], rule._dense_sum_squares(dense[:, a:b]))
                else:  # every row in float64, as the tensor's own step takes them when its float32 sums overflow
                    wide = torch.linalg.vector_norm(dense[:, a:b], dim=-1, dtype=torch.float64).square()
                    assert torch.equal(packed[:, s], wide) and math.isfinite(float(wide.sum()))
    with pytest.raises(ValueError, match="without autograd"):  # the differentiable step is one tensor's
        rule._dense_sum_squares(dense, layout.runs)


def test_checked_sums_takes_float32_sums_unless_they_overflowed_and_float64_sums_directly_on_an_accelerator():
    """:func:`~learned_optim.features.checked_sums`: on the CPU the float32 sums when finite (the float64 ones never
    made), the float64 ones when any float32 sum overflowed (in a tuple too); on an accelerator (a ``meta`` tensor
    stands in) the float64 sums without making the float32 ones; under autograd the float32 sums whatever they are."""
    x = torch.tensor([3e19, 1.0])
    made: list[str] = []

    def sums(kind: str, dtype: torch.dtype) -> Callable[[], tuple[Tensor, Tensor]]:
        def make() -> tuple[Tensor, Tensor]:
            made.append(kind)
            return x.to(dtype).square().sum(), x.to(dtype).sum()

        return make

    with torch.no_grad():
        small = checked_sums(x[1:], lambda: x[1:].square().sum(), lambda: pytest.fail("float64 sums made"))
        assert small.item() == 1.0
        narrow_sum, wide_sum = checked_sums(x, sums("narrow", torch.float32), sums("wide", torch.float64))
        assert made == ["narrow", "wide"] and wide_sum.dtype == torch.float64 and math.isfinite(narrow_sum.item())
        on_device = torch.empty(2, device="meta")
        made.clear()
        checked_sums(on_device, sums("narrow", torch.float32), sums("wide", torch.float64))
        assert made == ["wide"]
    made.clear()
    past = checked_sums(x, sums("narrow", torch.float32), sums("wide", torch.float64))
    assert made == ["narrow"] and math.isinf(past[0].item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_step_waits_for_the_device_no_more_often_for_more_or_larger_tensors():
    """The host waits for the device once per step (the non-finite gradient check), not once per tensor, block or
    overflow check: a step of one small tensor and one of a pack, a matrix and a vector above the blocked path's
    bound synchronize as often (counted by ``torch.cuda.set_sync_debug_mode``'s warnings)."""

    def synchronizations(shapes: list[tuple[int, ...]]) -> int:
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
        opt = LearnedOptimizer(params, AdafacMLP().cuda(), lr=1e-3)
        for _ in range(2):  # the first step makes the state
            for p in params:
                p.grad = torch.randn_like(p)
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    opt.step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    above_the_block = 2 * AdafacMLP().accelerator_coordinate_block + 1
    one = synchronizations([(8, 8)])
    many = synchronizations([(8, 8), (64, 32), (32,), (300, 300), (above_the_block,)])
    assert many == one <= 2, (one, many)


# ------------------------------------------------------------------------------------------- the lr ratio input


def _random_net(**config) -> AdafacMLP:
    torch.manual_seed(0)
    rule = AdafacMLP(**config).requires_grad_(False)
    for weight in rule.parameters():
        weight.normal_(0.0, 0.5)
    return rule


def _direction(rule: AdafacMLP, shape=(12, 9)) -> Tensor:
    n = math.prod(shape)
    gen = torch.Generator().manual_seed(3)
    grad, param = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    delta, _ = rule(grad, param, rule.init_state(n, shape=shape), torch.tensor(4.0), shape=shape)
    return delta


def test_the_lr_ratio_input_is_a_per_tensor_constant_of_the_first_layer():
    """With ``lr_ratio_input`` the net's last input is the lr ratio rho (set by the runtime): its step equals that
    of the same net without the input whose first-layer bias is b + w_rho * rho, and differs between ratios."""
    rule = _random_net(lr_ratio_input=True)
    assert rule.uses_lr_ratio and rule.input_names[-1] == "lr_ratio" and rule.num_features == 29
    assert "lr_ratio" not in rule.state_dict()  # set per step, never saved
    plain = AdafacMLP().requires_grad_(False)
    weights = rule.state_dict()
    for ratio in (0.25, 1.0):
        rule.set_lr_ratio(ratio)
        folded = {**weights, "mlp.0.weight": weights["mlp.0.weight"][:, :-1]}
        folded["mlp.0.bias"] = weights["mlp.0.bias"] + ratio * weights["mlp.0.weight"][:, -1]
        plain.load_state_dict(folded)
        torch.testing.assert_close(_direction(rule), _direction(plain), rtol=1e-5, atol=1e-7)
    rule.set_lr_ratio(0.25)
    low = _direction(rule)
    rule.set_lr_ratio(1.0)
    assert not torch.allclose(low, _direction(rule))
    assert not AdafacMLP().uses_lr_ratio


def test_reconfigured_adds_the_lr_ratio_input_with_zero_weight():
    """A trained net fine-tuned with the lr ratio (``init_from`` + ``lr_ratio_input``) starts as the same function:
    the new input's first-layer column is zero, every other weight is the parent's; dropping an input still
    refuses (it would drop trained weights)."""
    parent = _random_net(time_scales=(10.0,))
    child = parent.reconfigured(lr_ratio_input=True)
    assert child.input_names == [*parent.input_names, "lr_ratio"]
    assert torch.equal(child.mlp[0].weight[:, -1], torch.zeros(parent.config.hidden_size))
    assert torch.equal(child.mlp[0].weight[:, :-1], parent.mlp[0].weight)
    for ratio in (0.1, 1.0):
        child.set_lr_ratio(ratio)
        assert torch.equal(_direction(child), _direction(parent))
    with pytest.raises(ValueError, match="change the net's weights"):
        child.reconfigured(lr_ratio_input=False)


# ------------------------------------------------------------------------------------------- the magnitude head


def test_the_magnitude_head_scales_the_step_by_its_factor_of_the_mean_last_activations():
    """With ``magnitude_head_bound`` B the step is the headless step times B^tanh(w . mean(z) + b), z the last hidden
    layer's activations: read through a net whose direction is hidden unit k itself (output weight e_k, no
    normalisation, unit magnitude), the step with the head on unit k is the step without it times
    B^tanh(mean(z_k) + b)."""
    bound, k, bias = 3.0, 2, -0.4
    plain = dict(normalize_direction=False, step_magnitude="unit", mup=False, num_hidden_layers=1)
    rule = _random_net(magnitude_head_bound=bound, **plain)
    rule.mlp[-1].weight.zero_()
    rule.mlp[-1].weight[0, k] = 1.0
    rule.mlp[-1].bias.zero_()
    rule.magnitude_head.weight.zero_()
    rule.magnitude_head.bias.fill_(bias)
    z_k = -_direction(rule) / bound ** math.tanh(bias)  # a head of bias alone: a factor known in closed form
    assert (z_k >= 0).all() and z_k.max() > 0  # a ReLU unit's activations, some of them positive
    rule.magnitude_head.weight[0, k] = 1.0
    factor = bound ** math.tanh(float(z_k.mean()) + bias)
    torch.testing.assert_close(_direction(rule), -factor * z_k, rtol=1e-5, atol=1e-8)
    rule.magnitude_head.bias.fill_(100.0)  # saturated: the bound
    torch.testing.assert_close(_direction(rule), -bound * z_k, rtol=1e-5, atol=1e-8)


def test_reconfigured_adds_a_zero_magnitude_head_that_meta_training_moves():
    """A trained net fine-tuned with the head (``init_from`` + ``magnitude_head_bound``) starts as the same function
    (the head is zero: a factor of exactly 1), and the meta-gradient reaches the head through the one-shot path."""
    parent = _random_net()
    child = parent.reconfigured(magnitude_head_bound=2.0)
    assert torch.equal(child.magnitude_head.weight, torch.zeros(1, parent.config.hidden_size))
    assert torch.equal(_direction(child), _direction(parent))
    child.requires_grad_(True)
    n, shape = 108, (12, 9)
    grad, param = torch.randn(n), torch.randn(n)
    delta, _ = child(grad, param, child.init_state(n, shape=shape), torch.tensor(4.0), shape=shape)
    (delta * param).sum().backward()
    assert child.magnitude_head.weight.grad.abs().sum() > 0 and child.magnitude_head.bias.grad.abs() > 0
    with pytest.raises(ValueError, match="above 1"):
        AdafacMLP(magnitude_head_bound=1.0)


@pytest.mark.parametrize(
    "config", [{"magnitude_head_bound": 2.0}, {"newton_schulz_steps": 5, "direction_clip": 2.0}], ids=str
)
def test_a_net_the_kernel_does_not_compute_steps_on_aten_where_the_kernel_is_on(config):
    """The native kernel computes neither the magnitude head nor an orthogonalised clipped step: with the kernels
    on, ``step_in_place`` takes no tensor and the optimizer's step equals the ATen step with the kernels off."""
    rule = _random_net(hidden_size=8, **config)
    params = []
    for enabled in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
        opt = LearnedOptimizer(model.parameters(), rule, lr=0.01)
        with kernels.enabled_as(enabled):
            for _ in range(3):
                opt.zero_grad()
                model(torch.randn(4, 6)).square().mean().backward()
                opt.step()
            if enabled:
                taken = [p for p in model.parameters()]
                assert rule.step_in_place(taken, [opt.state[p] for p in taken], torch.tensor(1.0), 0.01, 0.0) == taken
        params.append([p.detach().clone() for p in model.parameters()])
    for on, off in zip(*params, strict=True):
        assert torch.equal(on, off)


# ------------------------------------------------------------------------------- the orthogonalised direction


@pytest.mark.parametrize("shape", [(12, 9), (9, 12), (4, 2, 3, 3)], ids=str)
def test_newton_schulz_keeps_the_singular_vectors_and_brings_the_singular_values_near_one(shape):
    """Against an SVD: the result is U f(S) V^T for x = U S V^T (off-diagonal entries of U^T y V vanish), every
    f(sigma) within Muon's iteration's band around 1 after 5 steps, the same for 1000 x, and a batch of matrices
    is each matrix's result."""
    torch.manual_seed(0)
    rows, cols = matrix_view(shape)
    x = torch.randn(rows, cols, dtype=torch.float64)
    y = newton_schulz_orthogonalize(x, 5)
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    core = u.T @ y @ vh.T
    off_diagonal = core - torch.diag(torch.diagonal(core))
    assert off_diagonal.abs().max() < 1e-10
    assert torch.diagonal(core).min() > 0.6 and torch.diagonal(core).max() < 1.25
    torch.testing.assert_close(newton_schulz_orthogonalize(1000.0 * x, 5), y)
    batch = torch.stack([x, 2.0 * torch.randn(rows, cols, dtype=torch.float64)])
    torch.testing.assert_close(newton_schulz_orthogonalize(batch, 5)[1], newton_schulz_orthogonalize(batch[1], 5))
    torch.testing.assert_close(newton_schulz_orthogonalize(batch, 5)[0], y)


@pytest.mark.parametrize("shape", [(12, 9), (4, 2, 3, 3), (30,), (1, 6), (6, 1)], ids=str)
def test_the_step_is_the_normalised_polar_factor_of_the_nets_raw_direction(shape):
    """With ``newton_schulz_steps`` k the step of a matrix is -a * rms_normalize(NS_k(d)) with d the raw direction
    of the same weights (read through ``normalize_direction=False``, unit magnitude, no muP: a step of -d), on the
    matrix view; vectors and single rows or columns step as without it. The meta-gradient flows through it."""
    plain = dict(step_magnitude="unit", mup=False)
    raw = _direction(_random_net(normalize_direction=False, **plain), shape).neg()
    rows, cols = matrix_view(shape)
    rule = _random_net(newton_schulz_steps=4, **plain)
    got = _direction(rule, shape)
    if min(rows, cols) >= 2:
        polar = newton_schulz_orthogonalize(raw.view(rows, cols), 4).reshape(-1)
        want = -polar / polar.square().mean().sqrt()
        assert not torch.allclose(got, _direction(_random_net(**plain), shape), atol=1e-3)
    else:
        want = _direction(_random_net(**plain), shape)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    rule.requires_grad_(True)
    n = math.prod(shape)
    grad, param = torch.randn(n), torch.randn(n)
    delta, _ = rule(grad, param, rule.init_state(n, shape=shape), torch.tensor(4.0), shape=shape)
    (delta * param).sum().backward()
    assert all(torch.isfinite(w.grad).all() for w in rule.parameters()) and rule.mlp[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("native", [False, True], ids=["aten", "kernels"])
def test_newton_schulz_min_side_leaves_thinner_matrices_to_the_nets_direction(native):
    """With ``newton_schulz_min_side`` m a matrix whose smaller side is below m steps as without the
    orthogonalisation and the others as with it, in one optimizer over both (the packed ATen path and the native
    kernel's, whose steps are orthogonalised after it)."""
    shapes = [(12, 9), (40, 30), (30,)]

    def steps(**config) -> list[Tensor]:
        torch.manual_seed(1)
        params = [nn.Parameter(torch.randn(shape)) for shape in shapes]
        opt = LearnedOptimizer(params, _random_net(step_magnitude="adam", mup=False, **config), lr=1e-2)
        before = [p.detach().clone() for p in params]
        with kernels.enabled_as(native):
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn_like(p)
                opt.step()
        return [p.detach() - b for p, b in zip(params, before, strict=True)]

    plain, every = steps(), steps(newton_schulz_steps=3)
    wide_only = steps(newton_schulz_steps=3, newton_schulz_min_side=10)
    torch.testing.assert_close(wide_only[0], plain[0], rtol=1e-4, atol=1e-7)  # 12 x 9: below 10
    torch.testing.assert_close(wide_only[1], every[1], rtol=1e-4, atol=1e-7)  # 40 x 30
    torch.testing.assert_close(wide_only[2], plain[2], rtol=1e-4, atol=1e-7)  # a vector, never
    assert not torch.allclose(every[0], plain[0], atol=1e-4)
    torch.testing.assert_close(steps(newton_schulz_steps=3, newton_schulz_min_side=9)[0], every[0])


@pytest.mark.parametrize(
    ("setting", "size", "want"),
    [
        ("orthogonal_step_rms", 0.2, 0.2),  # fixed below Adam's (1 at step 1)
        ("orthogonal_step_rms", 3.0, 3.0),  # and above it
        ("orthogonal_step_floor", 3.0, 3.0),  # a floor above Adam's size lifts it
        ("orthogonal_step_floor", 0.2, None),  # one below it leaves Adam's
    ],
)
@pytest.mark.parametrize("native", [False, True], ids=["aten", "kernels"])
def test_orthogonal_step_size_settings(native, setting, size, want):
    """With ``orthogonal_step_rms`` rho each orthogonalised matrix moves by RMS exactly lr * s * rho (s its muP
    scale), with ``orthogonal_step_floor`` rho by lr * s * max(a, rho) (a: Adam's step RMS, 1 at the first step), in
    the direction it takes without them; a vector and a matrix left to the net's own direction
    (``newton_schulz_min_side``) step as without them. The packed ATen path and the native kernel's."""
    shapes = [(12, 9), (40, 30), (3, 50), (30,)]
    lr = 1e-2

    def steps(**config) -> list[Tensor]:
        torch.manual_seed(1)
        params = [nn.Parameter(torch.randn(shape)) for shape in shapes]
        rule = _random_net(step_magnitude="adam", newton_schulz_steps=3, newton_schulz_min_side=5, **config)
        opt = LearnedOptimizer(params, rule, lr=lr)
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        with kernels.enabled_as(native):
            opt.step()
        return [p.detach() - b for p, b in zip(params, before, strict=True)]

    adam, sized = steps(), steps(**{setting: size})
    scale = AdafacMLP(mup=True).step_scale
    for shape, a, f in zip(shapes[:2], adam, sized, strict=False):  # orthogonalised
        adam_rms = a.square().mean().sqrt()
        torch.testing.assert_close(adam_rms, torch.tensor(lr * scale(shape)), rtol=1e-3, atol=0)
        expected = adam_rms if want is None else torch.tensor(lr * scale(shape) * want)
        torch.testing.assert_close(f.square().mean().sqrt(), expected, rtol=1e-3, atol=0)
        torch.testing.assert_close(f / f.norm(), a / a.norm(), rtol=1e-4, atol=1e-5)  # p + step rounded
    for a, f in zip(adam[2:], sized[2:], strict=True):  # (3, 50) below the min side, the vector
        torch.testing.assert_close(f, a)


def test_orthogonal_step_size_settings_need_the_orthogonalisation():
    for name in ("orthogonal_step_rms", "orthogonal_step_floor"):
        with pytest.raises(ValueError, match=f"{name} .* newton_schulz_steps > 0"):
            AdafacMLP(**{name: 0.2})
        with pytest.raises(ValueError, match="a size above 0, got 0.0"):
            AdafacMLP(newton_schulz_steps=3, **{name: 0.0})
    with pytest.raises(ValueError, match="set one"):
        AdafacMLP(newton_schulz_steps=3, orthogonal_step_rms=0.2, orthogonal_step_floor=0.2)


def test_orthogonalisation_needs_the_normalised_direction():
    with pytest.raises(ValueError, match="normalize_direction"):
        AdafacMLP(newton_schulz_steps=5, normalize_direction=False)
    with pytest.raises(ValueError, match="0 or more"):
        AdafacMLP(newton_schulz_steps=-1)
    with pytest.raises(ValueError, match="newton_schulz_min_side .* at least 2, got 1"):
        AdafacMLP(newton_schulz_steps=5, newton_schulz_min_side=1)
    with pytest.raises(ValueError, match="newton_schulz_dtype must be 'float32', 'bfloat16' or 'auto'"):
        AdafacMLP(newton_schulz_steps=5, newton_schulz_dtype="float16")


def _plain_newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The iteration written out, unfused, on the wide orientation: X <- a X + (b A + c A^2) X, A = X X^T."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    tall = x.shape[-2] > x.shape[-1]
    y = x.mT if tall else x
    y = y / (torch.linalg.matrix_norm(y, keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = y @ y.mT
        y = a * y + (b * gram + c * gram @ gram) @ y
    return y.mT if tall else y


@pytest.mark.parametrize(
    "shape", [(10, 96), (96, 10), (3, 7), (2, 8, 16), (6, 6), (4, 7), (48, 256), (4, 32, 128), (256, 48)], ids=str
)
@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_newton_schulz_fused_and_on_the_gram_matrix_is_the_plain_iteration(shape, steps, monkeypatch):
    """The fused products (``baddbmm``) and, in float32 on matrices at least twice as wide as high where that saves
    ``GRAM_MIN_SAVED_MULTIPLY_ADDS``, the iteration on the Gram matrix (``X_k = P_k X_0``, ``P_k`` a product of
    polynomials in ``X_0 X_0^T``) give the plain iteration in float64 to float32 rounding; the Gram route is taken
    exactly there, and not where float32 products may run in TF32 or bfloat16 inside
    (`torch.set_float32_matmul_precision("high")`)."""
    import learned_optim.features as features

    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    routes = []
    on_gram = features._newton_schulz_on_gram
    monkeypatch.setattr(
        features, "_newton_schulz_on_gram", lambda y, k, *buffer: routes.append(k) or on_gram(y, k, *buffer)
    )
    got = newton_schulz_orthogonalize(x.float(), steps)
    rows, cols = sorted(shape[-2:])
    saved = (steps - 1) * math.prod(shape[:-2]) * rows**2 * (2 * cols - 3 * rows)
    gram = cols >= 2 * rows and 2 <= steps <= GRAM_MAX_STEPS and saved >= GRAM_MIN_SAVED_MULTIPLY_ADDS
    assert routes == ([steps] if gram else [])
    assert gram == (shape in ((48, 256), (4, 32, 128), (256, 48)) and steps == 3)  # (not worth it below)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), _plain_newton_schulz(x, steps), rtol=0, atol=3e-6)
    torch.testing.assert_close(newton_schulz_orthogonalize(x, steps), _plain_newton_schulz(x, steps))  # float64
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # float32 products may run in TF32 or bfloat16 inside: no Gram route
    try:
        routes.clear()
        newton_schulz_orthogonalize(x.float(), steps)
        assert routes == []
    finally:
        torch.set_float32_matmul_precision(previous)
    backend = torch.backends.mkldnn.matmul
    before = backend.fp32_precision
    backend.fp32_precision = "bf16"  # the per-backend API, whose mix with the legacy one torch refuses to read
    try:
        routes.clear()
        torch.testing.assert_close(newton_schulz_orthogonalize(x.float(), steps), got, rtol=1e-4, atol=1e-5)
        assert routes == []
    finally:
        backend.fp32_precision = before


@pytest.mark.parametrize(("steps", "bound"), [(3, 1e-4), (5, 1e-4), (10, 0.05)])
def test_newton_schulz_of_a_low_rank_matrix_stays_the_plain_iteration(steps, bound):
    """A wide matrix of rank 2 (a gradient from a batch of 2): the result stays the plain float64 iteration's to
    float32 rounding as the direct iteration grows it (by a ~ 3.4 a step in the null space: ~1e-2 after 10 steps);
    on the Gram matrix it would grow by a^2 a step (1e17 after 10), which is taken for at most GRAM_MAX_STEPS."""
    torch.manual_seed(0)
    x = (torch.randn(64, 2) @ torch.randn(2, 256)).double()
    got = newton_schulz_orthogonalize(x.float(), steps).double()
    want = _plain_newton_schulz(x, steps)
    assert float((got - want).norm() / want.norm()) < bound


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (2, 0, 3), (0, 4, 9)], ids=str)
def test_newton_schulz_of_empty_matrices(shape):
    assert newton_schulz_orthogonalize(torch.randn(shape), 3).shape == shape


def test_newton_schulz_in_bfloat16_products():
    """With ``dtype=torch.bfloat16`` the products run in bfloat16 (the result differs from float32's by bfloat16's
    rounding, ~1e-2, not float32's) and come back in the input's dtype, with the same singular vectors to that
    accuracy and the singular values in the same band."""
    torch.manual_seed(0)
    x = torch.randn(40, 24)
    want = newton_schulz_orthogonalize(x, 5)
    got = newton_schulz_orthogonalize(x, 5, dtype=torch.bfloat16)
    assert got.dtype == torch.float32
    error = float((got - want).norm() / want.norm())
    assert 1e-4 < error < 5e-2
    singular = torch.linalg.svdvals(got.double())
    assert singular.min() > 0.55 and singular.max() < 1.3
    torch.testing.assert_close(newton_schulz_orthogonalize(x.double(), 5, dtype=torch.float32).float(), want)


@pytest.mark.parametrize("native", [True, False])
def test_auto_newton_schulz_dtype_is_bfloat16_where_the_hardware_has_it_on_large_matrices(monkeypatch, native):
    """``newton_schulz_dtype="auto"`` runs the products in bfloat16 where :func:`bfloat16_matmul_is_native` says the
    device has bfloat16 units and the matrix's smaller side reaches ``bfloat16_min_side``, in float32 elsewhere: its
    step equals the fixed choice's bit for bit."""
    import learned_optim.nets.adafac_mlp as module

    monkeypatch.setattr(module, "bfloat16_matmul_is_native", lambda device_type: native)
    rule = _random_net(newton_schulz_steps=5, newton_schulz_dtype="auto")
    cpu, side = torch.device("cpu"), rule.bfloat16_min_side
    assert rule.newton_schulz_products_dtype(cpu, side - 1, 4 * side) == torch.float32
    assert rule.newton_schulz_products_dtype(cpu, 4 * side, side - 1) == torch.float32
    expected = torch.bfloat16 if native else torch.float32
    assert rule.newton_schulz_products_dtype(cpu, side, side) == expected
    rule.bfloat16_min_side = 9  # the (12, 9) matrix of _direction counts as large
    fixed = _random_net(newton_schulz_steps=5, newton_schulz_dtype="bfloat16" if native else "float32")
    assert torch.equal(_direction(rule), _direction(fixed))
    other = _random_net(newton_schulz_steps=5, newton_schulz_dtype="float32" if native else "bfloat16")
    assert not torch.allclose(_direction(rule), _direction(other), rtol=0.0, atol=1e-4)


def test_bfloat16_matmul_is_native_reads_the_cpu_flags(monkeypatch):
    """The CPU has native bfloat16 products with AMX tiles or AVX512-BF16, not with neither; other devices without
    CUDA's bfloat16 support have none."""
    from learned_optim._numerics import bfloat16_matmul_is_native

    for amx, avx512_bf16 in [(True, False), (False, True), (False, False)]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        bfloat16_matmul_is_native.cache_clear()
        assert bfloat16_matmul_is_native("cpu") == (amx or avx512_bf16)
    bfloat16_matmul_is_native.cache_clear()
    assert not bfloat16_matmul_is_native("meta")
