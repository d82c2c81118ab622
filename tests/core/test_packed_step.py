"""The packed step (small tensors of a param group stepped in one net call) equals the per-tensor step.

With the native kernels (forced on, whatever the guard measured) every row is computed alone, so the
packed step is bit-identical; on ATen the bound is one float32 ulp of each new value (BLAS may round a
GEMM row differently by the row count). Also: packs follow step counts and dtypes, per-tensor state
stays in ``opt.state[p]`` and resumes bit-identically, and :class:`Segments` reduces by segment.
No timing here.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import learned_optim
from learned_optim import LearnedOptimizer, kernels
from learned_optim.nets.base import Segments
from learned_optim.testing import PerTensorSteps

FAMILIES = sorted(learned_optim.FAMILIES)


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 6, 5), nn.ReLU(), nn.Conv1d(6, 8, 3), nn.Flatten(), nn.Linear(8 * 10, 4))
    return nn.Sequential(model, nn.LayerNorm(4)).to(dtype)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    first = next(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 1, 16, generator=gen).to(first)).square().mean().backward()
        opt.step()


def _run(family, make_rule, cls, use_kernels, dtype=torch.float32, steps=3, **kwargs):
    model = _model(dtype)
    opt = cls(model.parameters(), make_rule(family), weight_decay=0.01, **kwargs)
    with kernels.forced() if use_kernels else kernels.enabled_as(False):
        _train(model, opt, steps)
    return model, opt


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "aten"])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_step_equals_the_per_tensor_step(family, use_kernels, make_rule):
    if use_kernels and not kernels.available():
        pytest.skip(f"native kernels unavailable: {kernels.build_error()}")
    packed, opt = _run(family, make_rule, LearnedOptimizer, use_kernels)
    alone, ref = _run(family, make_rule, PerTensorSteps, use_kernels)
    assert len(opt._plan_packs(list(packed.parameters()))[0]) == 1  # all 8 tensors in one pack
    if learned_optim.FAMILIES[family].whole_tensor:
        _assert_whole_tensor_rounding(packed, opt, alone, ref)
        return
    tol = dict(rtol=0, atol=0) if use_kernels else dict(rtol=1.2e-7, atol=1e-12)
    for p, q in zip(packed.parameters(), alone.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tol)
        for k in ref.state[q]:
            torch.testing.assert_close(opt.state[p][k], ref.state[q][k], **(tol if k == "step" else {}))


def _assert_whole_tensor_rounding(packed, opt, alone, ref, bound=2e-3, make_model=_model):
    """adafac_mlp's packed step (ATen, whatever the kernels) multiplies the features by their per-tensor
    normaliser where the per-tensor step folds it into the first layer (or the kernel fuses it), and sums by
    segment in float64: equal to float rounding, which the per-tensor normalisations of a random net amplify.
    The bound, ``bound`` of each tensor's RMS displacement (parameters) or RMS value (state) after 3 steps,
    is about what the per-tensor step's own two paths differ by here (kernel vs ATen: up to 1.4e-3)."""
    for p, q, p0 in zip(packed.parameters(), alone.parameters(), make_model().parameters(), strict=True):
        moved = (q - p0).square().mean().sqrt()
        assert (p - q).abs().max() <= bound * moved
        for k, v in ref.state[q].items():
            assert (opt.state[p][k] - v).abs().max() <= bound * v.float().square().mean().sqrt() + 1e-12, k


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_bf16_params_and_bf16_state(family, make_rule):
    """bf16 params (and bf16 state where the rule keeps an LSTM state) step as the per-tensor path does."""
    state_dtype = {"lstm": torch.bfloat16} if "lstm" in make_rule(family).state_shapes() else torch.float32
    runs = [
        _run(family, make_rule, cls, False, dtype=torch.bfloat16, state_dtype=state_dtype)
        for cls in (LearnedOptimizer, PerTensorSteps)
    ]
    for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters(), strict=True):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p, q, rtol=8e-3, atol=1e-6)  # within one bf16 rounding of the update
        for k, v in runs[0][1].state[p].items():
            assert v.dtype == runs[1][1].state[q][k].dtype


def test_packs_follow_step_counts_and_chunk_limits(make_rule):
    model = _model()
    opt = LearnedOptimizer(model.parameters(), make_rule("dm_lstm"), chunk_size=128)
    _train(model, opt, 1)
    params = list(model.parameters())
    packs, singles = opt._plan_packs(params)
    assert all(sum(p.numel() for p in pack) <= 128 for pack in packs)
    assert [p.numel() for p in singles] == [p.numel() for p in params if p.numel() >= 128]
    opt.state[params[1]]["step"] += 5  # another step count: never in a pack with the others
    packs, singles = opt._plan_packs(params)
    assert any(q is params[1] for q in singles) and not any(q is params[1] for pack in packs for q in pack)
    assert opt._plan_packs(params[:1]) == ([], params[:1])


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
    ],
)
@pytest.mark.parametrize(
    "config",
    [
        {},
        {"time_scales": (10.0, 100.0)},
        {"lr_ratio_input": True},
        {"magnitude_head_bound": 2.0},
        {"newton_schulz_steps": 5},
        {"newton_schulz_steps": 3, "step_magnitude": "adam", "orthogonal_step_rms": 0.2},
        {"newton_schulz_steps": 3, "step_magnitude": "adam", "orthogonal_step_floor": 0.5},
    ],
    ids=[
        "plain",
        "time-features",
        "lr-ratio",
        "magnitude-head",
        "orthogonalized",
        "orthogonal-step-rms",
        "orthogonal-step-floor",
    ],
)
def test_adafac_packs_tensors_of_several_step_counts_together(config, device):
    """adafac_mlp takes one step count per packed tensor (``per_tensor_steps``): tensors of different counts
    (layers unfrozen at different times) share one ATen pack, each with its own bias corrections and time features,
    and step as they do alone (the packed step's rounding bound)."""
    runs = []
    for cls in (LearnedOptimizer, PerTensorSteps):
        torch.manual_seed(0)
        rule = learned_optim.AdafacMLP(**config).requires_grad_(False)
        for weight in rule.parameters():  # random weights and biases: every feature and time feature counts
            weight.normal_(0.0, 0.5)
        model = _model().to(device)
        opt = cls(model.parameters(), rule, lr=0.01, weight_decay=0.01)
        opt.param_groups[0]["peak_lr"] = 0.04  # an lr ratio of 0.25 (read with lr_ratio_input only)
        with kernels.enabled_as(False):
            _train(model, opt, 2)
            for i, p in enumerate(model.parameters()):
                opt.state[p]["step"] += 7.0 * i  # eight step counts
            _train(model, opt, 1, seed=1)
        runs.append((model, opt))
    (packed, opt), (alone, ref) = runs
    params = list(packed.parameters())
    assert len({float(opt.state[p]["step"]) for p in params}) == len(params)
    packs, singles = opt._plan_packs(params)
    assert len(packs) == 1 and len(packs[0]) == len(params) and not singles
    _assert_whole_tensor_rounding(packed, opt, alone, ref, make_model=lambda: _model().to(device))


def test_segment_stats_give_each_segment_its_own_step_count():
    """The default segment statistics call ``tensor_stats`` once per segment with that segment's count when the
    step is one count per tensor (``per_tensor_steps``), and with the one count otherwise."""

    class CountStats(learned_optim.AdafacMLP):
        def tensor_stats(self, grad, param, state, step):
            return step.reshape(1)  # the count it was given

    rule, segments = CountStats(), Segments((2, 3), 64)
    grad = torch.zeros(64)
    per_tensor = rule.segment_stats(grad, grad, {}, torch.tensor([4.0, 9.0]), segments)
    assert per_tensor.tolist() == [[4.0], [9.0]]
    assert rule.segment_stats(grad, grad, {}, torch.tensor(5.0), segments).tolist() == [[5.0], [5.0]]


def test_tensors_above_the_byte_limit_are_stepped_alone(make_rule, monkeypatch):
    import learned_optim.packing as packing_module

    model = _model()
    opt = LearnedOptimizer(model.parameters(), make_rule("dm_lstm"))
    _train(model, opt, 1)
    params = list(model.parameters())
    per_coordinate = 4 + 4 + 4 * 2 * 2 * 20  # float32 value, gradient and (2, 2, 20) LSTM state
    floats = {k: math.prod(shape) for k, shape in opt.rule.state_shapes().items()}
    assert packing_module._bytes_per_coordinate(params[0], opt.state[params[0]], floats) == per_coordinate
    monkeypatch.setattr(packing_module, "PACK_MAX_BYTES", 30 * per_coordinate)  # 30 coordinates and up: alone
    packs, singles = opt._plan_packs(params)
    assert sorted(p.numel() for p in singles) == sorted(p.numel() for p in params if p.numel() >= 30)
    assert all(p.numel() < 30 for pack in packs for p in pack)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_step_on_cuda_matches_the_per_tensor_step(family, make_rule):
    """Same ATen code on CUDA: packed and per-tensor steps agree to float rounding (cuBLAS may round a
    row differently by the row count), and the state stays on the device, per parameter."""
    runs = []
    for cls in (LearnedOptimizer, PerTensorSteps):
        model = _model().cuda()
        opt = cls(model.parameters(), make_rule(family), weight_decay=0.01)
        _train(model, opt, 3)
        runs.append((model, opt))
    for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
        assert all(v.device.type == "cuda" for k, v in runs[0][1].state[p].items() if k != "step")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("counts", ["one count", "counts per tensor"])
def test_packed_state_dict_resume_is_bit_identical(family, make_rule, counts):
    """State stays per parameter: save after 2 packed steps, load into a fresh optimizer, step on alike; also with
    the parameters at different step counts (packed together where the rule takes ``per_tensor_steps``)."""
    model, opt = _run(family, make_rule, LearnedOptimizer, False, steps=2)
    assert all(opt.state[p]["step"] == 2 for p in model.parameters())
    if counts == "counts per tensor":
        for i, p in enumerate(model.parameters()):
            opt.state[p]["step"] += 3.0 * i
    clone = copy.deepcopy(model)
    resumed = LearnedOptimizer(clone.parameters(), make_rule(family), weight_decay=0.01)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    with kernels.enabled_as(False):
        _train(model, opt, 2, seed=5)
        _train(clone, resumed, 2, seed=5)
    for p, q in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(p, q)
        per_tensor = opt.rule.tensor_state_shapes(tuple(p.shape))  # e.g. factored row/column statistics
        for k, v in opt.state[p].items():
            assert torch.equal(v, resumed.state[q][k])
            # per parameter, not a packed buffer
            assert v.dim() == 0 or (tuple(v.shape) == per_tensor[k] if k in per_tensor else v.shape[0] == p.numel())


def test_packed_nonfinite_gradient_skips_or_raises(make_rule):
    model = _model()
    opt = LearnedOptimizer(model.parameters(), make_rule("mlp"), nonfinite="skip")
    _train(model, opt, 1)
    before = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    params[2].grad[0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1 and all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    params[2].grad[0] = float("inf")
    opt.nonfinite = "raise"
    with pytest.raises(learned_optim.NonFiniteGradientError, match="#2 of param group 0"):
        opt.step()


def test_segments_reduce_and_expand_by_segment():
    seg = Segments((3, 1, 2), 8)
    assert seg.index.tolist() == [0, 0, 0, 1, 2, 2, 3, 3]
    x = torch.arange(8.0).unsqueeze(1).repeat(1, 2)
    torch.testing.assert_close(seg.sum(x), torch.tensor([[3.0, 3.0], [3.0, 3.0], [9.0, 9.0]]))
    torch.testing.assert_close(seg.mean(x)[:, 0], torch.tensor([1.0, 3.0, 4.5]))
    assert seg.expand(torch.tensor([1.0, 2.0, 3.0])).tolist() == [1, 1, 1, 2, 3, 3, 0, 0]
    with pytest.raises(ValueError, match="must be >= 1 each and fit"):
        Segments((3, 0), 8)
    with pytest.raises(ValueError, match="must be >= 1 each and fit"):
        Segments((5, 5), 8)


def _repeated_shapes_model() -> nn.Module:
    """Three blocks of the same shapes, interleaved (a stack of identical layers, as in a transformer)."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Conv1d(6, 6, 1)) for _ in range(3)]
    return nn.ModuleList(blocks)


def _train_repeated(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(5, 6, generator=gen)
        for linear, norm, conv in model:
            x = conv(norm(torch.tanh(linear(x))).unsqueeze(2)).squeeze(2)
        x.square().mean().backward()
        opt.step()


def test_packs_order_tensors_by_shape_and_runs_equal_the_per_tensor_step(make_rule):
    """A pack lists same-shaped tensors consecutively (adafac_mlp then takes each run's per-tensor statistics
    with one batched operation): the result still equals stepping each tensor alone, to float rounding."""
    runs = []
    for cls in (LearnedOptimizer, PerTensorSteps):
        model = _repeated_shapes_model()
        opt = cls(model.parameters(), make_rule("adafac_mlp"), weight_decay=0.01)
        with kernels.enabled_as(False):
            _train_repeated(model, opt, 3)
        runs.append((model, opt))
    (packed, opt), (alone, ref) = runs
    packs, singles = opt._plan_packs(list(packed.parameters()))
    assert len(packs) == 1 and not singles
    shapes = [tuple(p.shape) for p in packs[0]]
    assert shapes == sorted(shapes, key=lambda s: (len(s), s))  # 12 vectors of 6, then 3 (6, 6), 3 (6, 6, 1)
    layout = learned_optim.features.factored_pack_layout(tuple(shapes))
    assert [(r.count, r.rows, r.cols) for r in layout.runs] == [(12, 6, 1), (6, 6, 6)]  # (6,6,1) views as (6,6)
    _assert_whole_tensor_rounding(packed, opt, alone, ref, make_model=_repeated_shapes_model)
