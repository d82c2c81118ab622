"""The native CPU kernels (``learned_optim.kernels``) compute what the ATen path computes.

The kernels are built on first use with the system C++ compiler; where there is none the tests that
need them skip with the build error (the ATen fallback is tested either way). The kernels run here under
``kernels.forced()`` (whatever the guard measured on this machine); the guard's dispatch is tested with
planted measurements. No timing here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import learned_optim
import learned_optim._files
from learned_optim import LearnedOptimizer, kernels
from learned_optim.kernels import _build, _guard, _runtime
from learned_optim.kernels.__main__ import main as kernels_cli
from learned_optim.nets.cells import fused_gate_weights, lstm_cell
from learned_optim.testing import PerTensorSteps

needs_kernels = pytest.mark.skipif(
    not kernels.available(), reason=f"native kernels unavailable: {kernels.build_error()}"
)


@pytest.fixture(autouse=True)
def _kernels_forced():
    """The kernels' results are tested wherever they are built, whether or not the guard lets them run."""
    with kernels.forced():
        yield


def _fused(cell: nn.LSTMCell) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t.detach() for t in fused_gate_weights(cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh))


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """torch (and the kernels it hands its thread count to) on ``count`` threads inside the block."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_kernel(cell, x, h, c):
    """The kernel on strided (h, c) views of a state tensor, as the optimizer calls it."""
    n, hidden = h.shape
    out = torch.full((n, 2, hidden), float("nan"))
    ran = kernels.lstm_cell_into(x, h, c, *_fused(cell), out[:, 0], out[:, 1])
    return ran, out[:, 0], out[:, 1]


def _case(n: int, inputs: int, hidden: int, seed: int = 0, scale: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cell = nn.LSTMCell(inputs, hidden).requires_grad_(False)
    x = torch.randn(n, inputs, generator=gen) * scale
    state = torch.randn(n, 2, hidden, generator=gen)  # h and c as strided views, like the optimizer's state
    return cell, x, state[:, 0], state[:, 1]


@needs_kernels
@pytest.mark.parametrize("inputs,hidden", [(2, 20), (20, 20), (3, 7), (5, 33), (4, 64), (1, 1)])
@pytest.mark.parametrize("n", [1, 3, 4, 5, 257])
def test_lstm_kernel_equals_nn_lstmcell(n, inputs, hidden):
    cell, x, h, c = _case(n, inputs, hidden)
    ran, h_new, c_new = _run_kernel(cell, x, h, c)
    largest = min(64, 8 * kernels.vector_lanes())  # 4H <= min(256, 32 L) floats (csrc/lstm_cell.cpp)
    assert ran == (hidden <= largest)
    if not ran:
        return
    h_ref, c_ref = cell(x, (h, c))
    torch.testing.assert_close(h_new, h_ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(c_new, c_ref, rtol=2e-6, atol=2e-6)


@needs_kernels
def test_lstm_kernel_saturates_like_aten_on_huge_inputs():
    cell, x, h, c = _case(64, 1, 20)  # one input: every gate's pre-activation is w x + O(1), no cancellation
    x[:, 0] = torch.tensor([3e38, -3e38, 1e30, -1e30, 1e6, -1e6, 88.0, -88.0]).repeat(8)
    ran, h_new, c_new = _run_kernel(cell, x, h, c)
    assert ran
    h_ref, c_ref = cell(x, (h, c))
    assert torch.isfinite(h_new).all() and torch.isfinite(c_new).all()
    torch.testing.assert_close(h_new, h_ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(c_new, c_ref, rtol=2e-6, atol=2e-6)


@needs_kernels
def test_lstm_kernel_propagates_nan_only_in_its_row():
    cell, x, h, c = _case(9, 2, 20)
    clean = _run_kernel(cell, x, h, c)
    x[4, 1] = float("nan")
    _, h_new, c_new = _run_kernel(cell, x, h, c)
    assert torch.isnan(h_new[4]).all() and torch.isnan(c_new[4]).all()
    rows = [i for i in range(9) if i != 4]
    assert torch.equal(h_new[rows], clean[1][rows]) and torch.equal(c_new[rows], clean[2][rows])


@needs_kernels
@pytest.mark.parametrize("hidden", [20, 7])
def test_lstm_kernel_rows_do_not_depend_on_blocking_or_threads(hidden):
    """Each row gets the same bits whatever the row count, the split and the thread count."""
    cell, x, h, c = _case(10_001, 3, hidden)
    _, h_all, c_all = _run_kernel(cell, x, h, c)
    for cut in (1, 4, 4097):
        parts = [_run_kernel(cell, x[s], h[s], c[s]) for s in (slice(0, cut), slice(cut, None))]
        assert torch.equal(torch.cat([parts[0][1], parts[1][1]]), h_all)
        assert torch.equal(torch.cat([parts[0][2], parts[1][2]]), c_all)
    with _torch_threads(2):
        _, h_two, c_two = _run_kernel(cell, x, h, c)
    assert torch.equal(h_two, h_all) and torch.equal(c_two, c_all)


def test_lstm_kernel_declines_what_it_does_not_handle():
    cell, x, h, c = _case(8, 2, 65)
    assert not _run_kernel(cell, x, h, c)[0]  # hidden size above 64
    cell, x, h, c = _case(8, 2, 20)
    assert not _run_kernel(cell, x.double(), h.double(), c.double())[0]  # not float32
    assert not _run_kernel(cell, x.t().contiguous().t(), h, c)[0]  # columns not contiguous
    with kernels.enabled_as(False):
        assert not _run_kernel(cell, x, h, c)[0]
    # whatever the kernel declines, lstm_cell still computes the cell (ATen path)
    cell, x, h, c = _case(8, 2, 65)
    with torch.no_grad():
        h_new, c_new = lstm_cell(x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    torch.testing.assert_close(h_new, cell(x, (h, c))[0], rtol=1e-5, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("family", ["dm_lstm", "rnnprop"])
def test_optimizer_steps_with_and_without_kernels_agree(family, make_rule):
    rule = make_rule(family)
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(5000, generator=gen)
    grads = [torch.randn(5000, generator=gen) * 10.0**-i for i in range(5)]
    results = []
    for use in (True, False):
        p = nn.Parameter(start.clone())
        opt = LearnedOptimizer([p], rule, chunk_size=1024)
        with kernels.enabled_as(use):
            for g in grads:
                p.grad = g.clone()
                opt.step()
        results.append((p.detach().clone(), opt.state[p]["lstm"].clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("n", [1, 15, 16, 17, 100_003])
def test_elu_kernel_equals_aten(n):
    gen = torch.Generator().manual_seed(n)
    z = torch.randn(n, generator=gen) * torch.logspace(-8, 2, n).flip(0)[torch.randperm(n, generator=gen)]
    z[: min(n, 8)] = torch.tensor([0.0, -0.0, -0.5, -0.49999997, -0.50000006, -1e-30, -100.0, 1e-30])[: min(n, 8)]
    expected = nn.functional.elu(z)
    out = kernels.elu_(z)
    assert out.data_ptr() == z.data_ptr()
    torch.testing.assert_close(out, expected, rtol=3e-7, atol=1e-30)


@needs_kernels
def test_elu_kernel_nan_and_fallbacks():
    z = torch.tensor([1.0, float("nan"), -1.0, float("-inf"), float("inf")])
    out = kernels.elu_(z.clone())
    assert torch.isnan(out[1]) and out[3] == -1.0 and out[4] == float("inf")
    torch.testing.assert_close(out[[0, 2]], nn.functional.elu(z[[0, 2]]))
    strided = torch.randn(10, 4).t()  # not contiguous: ATen's elu_
    expected = nn.functional.elu(strided)
    torch.testing.assert_close(kernels.elu_(strided), expected, rtol=0, atol=0)


def _mlp_case(n: int, seed: int = 0, **config):
    gen = torch.Generator().manual_seed(seed)
    rule = learned_optim.MLPUpdate(**config).requires_grad_(False)
    grad_ = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-6, 0, (n,), generator=gen)
    param = torch.randn(n, generator=gen)
    state = {"m": torch.randn(n, 5, generator=gen) * 1e-3, "v": torch.rand(n, 5, generator=gen) * 1e-5}
    return rule, grad_, param, state, torch.tensor(7.0)


@needs_kernels
@pytest.mark.parametrize("n", [1, 15, 17, 5000])
@pytest.mark.parametrize("hidden", [32, 13], ids=["hidden32", "hidden13"])  # 13: the 8-, 4- and 1-unit blocks
def test_mlp_kernels_equal_the_aten_path(n, hidden):
    rule, grad_, param, state, step = _mlp_case(n, hidden_size=hidden)
    with torch.no_grad():
        stats = rule.tensor_stats(grad_, param, state, step)
        delta, new = rule(grad_, param, state, step, stats)
        with kernels.enabled_as(False):
            stats_ref = rule.tensor_stats(grad_, param, state, step)
            delta_ref, new_ref = rule(grad_, param, state, step, stats_ref)
    assert kernels.mlp_feature_mean_square(grad_, param, state["m"], state["v"], rule.decay, 1e-6) is not None
    torch.testing.assert_close(stats, stats_ref, rtol=2e-6, atol=0)
    torch.testing.assert_close(delta, delta_ref, rtol=2e-5, atol=1e-9)
    for k in ("m", "v"):  # EMAs can cancel: compare at the operands' float32 precision
        torch.testing.assert_close(new[k], new_ref[k], rtol=1e-6, atol=1e-6 * float(state[k].abs().max()))


@needs_kernels
def test_mlp_statistics_do_not_depend_on_threads_and_update_rows_not_on_blocking():
    rule, grad_, param, state, step = _mlp_case(20_011)
    args = (grad_, param, state["m"], state["v"], rule.decay, 1e-6)
    one = kernels.mlp_feature_mean_square(*args)
    with _torch_threads(2):
        two = kernels.mlp_feature_mean_square(*args)
    assert torch.equal(one, two)
    with torch.no_grad():
        whole = rule(grad_, param, state, step, one)[0]
        cut = 4099
        parts = [
            rule(grad_[s], param[s], {k: v[s] for k, v in state.items()}, step, one)[0]
            for s in (slice(0, cut), slice(cut, None))
        ]
    assert torch.equal(torch.cat(parts), whole)


def test_mlp_kernel_declines_what_it_does_not_handle(make_rule):
    rule, grad_, param, state, step = _mlp_case(40)
    assert (
        kernels.mlp_update(
            grad_,
            param,
            state["m"].t().contiguous().t(),
            state["v"],
            rule.decay,
            1e-6,
            torch.zeros(32, 22),
            torch.zeros(32),
            torch.zeros(2, 32),
            torch.zeros(2),
            1e-3,
            1e-3,
        )
        is None
    )
    deep = make_rule("mlp", num_hidden_layers=2)  # two hidden layers: the ATen path, which must still work
    with torch.no_grad():
        stats = deep.tensor_stats(grad_, param, state, step)
        delta, _ = deep(grad_, param, state, step, stats)
        with kernels.enabled_as(False):
            reference = deep(grad_, param, state, step, deep.tensor_stats(grad_, param, state, step))[0]
    torch.testing.assert_close(delta, reference, rtol=2e-5, atol=1e-9)


def _adafac_case(shape: tuple[int, ...], seed: int = 0, **config):
    """An AdafacMLP with random weights *and biases* (the Adam init reads one feature only) and a random state."""
    torch.manual_seed(seed)
    rule = learned_optim.AdafacMLP(**config).requires_grad_(False)
    for weight in rule.parameters():
        weight.normal_(0.0, 0.5)
    rule.set_lr_ratio(0.3)  # read by nets with lr_ratio_input only
    n = math.prod(shape)
    grad, param = torch.randn(n) * 10.0 ** torch.randint(-4, 0, (n,)), torch.randn(n)
    state = rule.init_state(n, shape=shape)
    for name, value in state.items():
        value.copy_(torch.rand_like(value) * 0.1 + (0.01 if name in ("v", "row", "col") else 0.0))
    return rule, grad, param, state, torch.tensor(7.0)


def _adafac_step(rule, grad, param, state, step, shape, in_place):
    """One step on a copy of ``state``: the rule's direction, its new state, and the copy it was given."""
    given = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        delta, new = rule(grad, param, given, step, shape=shape, **({"out_state": given} if in_place else {}))
    return delta, new, given


@needs_kernels
@pytest.mark.parametrize(
    ("shape", "config"),
    [
        ((37, 23), {}),
        ((2, 5000), {"time_scales": (10.0, 100.0)}),  # rows longer than the kernel's blocks (4096 coordinates)
        ((37, 23), {"lr_ratio_input": True}),  # the lr ratio in the first bias (set to 0.3 by _adafac_case)
        ((10_001,), {"hidden_size": 5, "num_hidden_layers": 1}),  # a vector: lanes along the rows, 3 blocks
        ((70_000,), {"hidden_size": 5}),  # longer than pass 2's spans of 16 x 4096 rows; units padded to 8
        ((6, 4, 3, 3), {"hidden_size": 32, "num_hidden_layers": 3, "mup": False}),  # a conv weight (6, 36)
        ((12, 40), {"hidden_size": 16}),  # the kernel's other width compiled in (8: the default)
        ((3, 1), {"momentum_decays": (0.5,), "factored_decays": (0.9,), "adam_feature_decay": 0.5}),
        ((1, 7), {"normalize_direction": False}),
        ((9, 4), {"step_magnitude": "unit"}),
        ((37, 23), {"second_moment_decay": 0.95, "step_magnitude": "adam"}),
        ((37, 23), {"newton_schulz_steps": 5, "step_magnitude": "adam"}),  # the kernel's step orthogonalised after
        ((6, 4, 3, 3), {"newton_schulz_steps": 3}),
        ((37, 23), {"newton_schulz_steps": 5, "newton_schulz_dtype": "bfloat16"}),
        ((37, 23), {"newton_schulz_steps": 3, "step_magnitude": "adam", "orthogonal_step_rms": 0.2}),  # s rho
        ((37, 23), {"newton_schulz_steps": 3, "step_magnitude": "adam", "orthogonal_step_floor": 0.5}),
    ],
    ids=str,
)
@pytest.mark.parametrize("in_place", [False, True])
def test_adafac_kernels_equal_the_aten_path(shape, config, in_place):
    """Direction and new state of the kernel path equal the ATen blocked path's (the reference: tested against
    the one-shot, differentiable path in tests/nets/test_adafac_mlp.py), with the state in place or separate."""
    rule, grad, param, state, step = _adafac_case(shape, **config)
    assert kernels.uses("adafac_mlp")  # forced
    delta, new, given = _adafac_step(rule, grad, param, state, step, shape, in_place)
    with kernels.enabled_as(False):
        rule.coordinate_block = 64  # the ATen blocked path, several blocks
        want, want_new, _ = _adafac_step(rule, grad, param, state, step, shape, in_place)
    torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert set(new) == set(want_new)
    for name, value in want_new.items():
        torch.testing.assert_close(new[name], value, rtol=1e-6, atol=1e-9)
        assert (new[name].data_ptr() == given[name].data_ptr()) == in_place
        if not in_place:
            assert torch.equal(given[name], state[name])  # the given state is left as it was


class PacksOnly(LearnedOptimizer):
    """The rule's in-place step off: small tensors go in packs (copied in and out), large ones alone."""

    def _step_in_place(self, params, states, lr, weight_decay, maximize):
        return params


class PerTensor(PacksOnly, PerTensorSteps):
    """Neither the in-place step nor packs: one call per tensor."""


@needs_kernels
@pytest.mark.parametrize("config", [{}, {"newton_schulz_steps": 5}], ids=["plain", "orthogonalized"])
def test_adafac_pack_step_equals_the_aten_packed_step(config):
    """The native pack step (every tensor of a pack in one kernel call) equals the ATen packed forward (per-tensor
    statistics by runs of one shape), tensor by tensor: three optimizer steps over vectors, matrices and conv
    weights in one pack, with random net weights and biases and time features; with the orthogonalisation, the
    kernel's steps orthogonalised after the call equal the ATen path's orthogonalised direction."""
    shapes = [(6,), (6,), (40,), (4, 5), (4, 5), (3, 2, 2), (7, 1), (5, 3, 2)]
    gen = torch.Generator().manual_seed(1)
    values = [torch.randn(s, generator=gen) for s in shapes]
    scales = [[10.0 ** torch.randint(-4, 0, s, generator=gen) for s in shapes] for _ in range(3)]
    grads = [[torch.randn(x.shape, generator=gen) * x for x in step] for step in scales]
    runs, calls = [], []
    original = kernels.adafac_pack_step
    for use_kernels in (True, False):
        rule = _adafac_case((1,), time_scales=(10.0, 100.0), **config)[0]
        params = [nn.Parameter(v.clone()) for v in values]
        opt = PacksOnly(params, rule, lr=0.1, weight_decay=0.01)
        with kernels.forced() if use_kernels else kernels.enabled_as(False), pytest.MonkeyPatch.context() as patch:
            patch.setattr(kernels, "adafac_pack_step", lambda *a, **k: calls.append(original(*a, **k)) or calls[-1])
            for step_grads in grads:
                for p, g in zip(params, step_grads, strict=True):
                    p.grad = g.clone()
                opt.step()
        packs, singles = opt._plan_packs(params)
        assert len(packs) == 1 and not singles
        runs.append((params, opt))
    assert len(calls) == 3 and all(c is not None for c in calls)  # one call per step with the kernel, none off
    (native, native_opt), (aten, aten_opt) = runs
    for p, q, v in zip(native, aten, values, strict=True):
        moved, want = p.detach() - v, q.detach() - v
        torch.testing.assert_close(moved, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
        for name, value in aten_opt.state[q].items():
            torch.testing.assert_close(native_opt.state[p][name], value, rtol=1e-5, atol=1e-9)


@needs_kernels
@pytest.mark.parametrize("setup", ["float32", "maximize", "bf16"])
@pytest.mark.parametrize("cls", ["LearnedOptimizer", "PacksOnly"], ids=["in-place", "pack"])
def test_adafac_kernel_steps_several_step_counts_in_one_call_bit_for_bit(cls, setup):
    """Tensors of different step counts go to the kernel in one call (in place, or in one pack: maximize and bf16
    parameters are packed), each with its own count's bias corrections and time features: the parameters and
    state of stepping each tensor alone, bit for bit."""
    calls = []
    originals = {name: getattr(kernels, name) for name in ("adafac_tensors_step", "adafac_pack_step")}
    runs = []
    dtype = torch.bfloat16 if setup == "bf16" else torch.float32
    for optimizer in (globals()[cls], PerTensor):
        rule = _adafac_case((1,), time_scales=(10.0, 100.0))[0]
        model = _in_place_model().to(dtype)
        opt = optimizer(model.parameters(), rule, lr=0.01, weight_decay=0.1, maximize=setup == "maximize")
        gen = torch.Generator().manual_seed(0)
        with kernels.forced(), pytest.MonkeyPatch.context() as patch:
            for name, fn in originals.items():
                patch.setattr(kernels, name, lambda *a, fn=fn, name=name, **k: calls.append(name) or fn(*a, **k))
            for step in range(3):
                if step == 2:
                    for i, p in enumerate(model.parameters()):
                        opt.state[p]["step"] += 5.0 * (i % 4)  # four step counts
                    calls.clear()
                opt.zero_grad()
                model(torch.randn(4, 1, 16, generator=gen).to(dtype)).square().mean().backward()
                opt.step()
        runs.append((model, opt, list(calls)))
    (model, opt, mixed_calls), (alone, ref, _) = runs
    in_place = cls == "LearnedOptimizer" and setup == "float32"
    assert mixed_calls == (["adafac_tensors_step"] if in_place else ["adafac_pack_step"])
    for p, q in zip(model.parameters(), alone.parameters(), strict=True):
        assert torch.equal(p, q)
        for name, value in ref.state[q].items():
            assert torch.equal(opt.state[p][name], value), name


def _in_place_model() -> nn.Module:
    """Vectors, narrow and wide matrices, conv weights, and a matrix above the pack's byte limit."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(1, 6, 5), nn.Conv1d(6, 8, 3), nn.Flatten(), nn.Linear(80, 300), nn.Linear(300, 10),
        nn.Linear(10, 3), nn.LayerNorm(3), nn.Linear(3, 12000),
    )  # fmt: skip


def _train_in_place(cls, steps=3, **kwargs):
    model = _in_place_model()
    opt = cls(model.parameters(), _adafac_case((1,), seed=3)[0], lr=0.01, weight_decay=0.1, **kwargs)
    gen = torch.Generator().manual_seed(0)
    with kernels.forced():
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(4, 1, 16, generator=gen)).square().mean().backward()
            opt.step()
    return model, opt


@needs_kernels
def test_adafac_in_place_step_equals_the_packed_and_per_tensor_steps_bit_for_bit(monkeypatch):
    """The default step runs the kernel over every tensor's own storage in one call per step (nothing packed):
    the same kernel arithmetic as the packed and per-tensor steps, so the same parameters and state bit for bit,
    and each parameter's autograd version advances as with an in-place op."""
    calls = {"tensors": 0, "pack": 0}
    originals = kernels.adafac_tensors_step, kernels.adafac_pack_step

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(kernels, "adafac_tensors_step", counted("tensors", originals[0]))
    monkeypatch.setattr(kernels, "adafac_pack_step", counted("pack", originals[1]))
    model, opt = _train_in_place(LearnedOptimizer)
    assert calls == {"tensors": 3, "pack": 0}
    for cls in (PacksOnly, PerTensor):
        other, other_opt = _train_in_place(cls)
        for p, q in zip(model.parameters(), other.parameters(), strict=True):
            assert torch.equal(p, q)
            for name, value in other_opt.state[q].items():
                assert torch.equal(opt.state[p][name], value), name
    assert calls["pack"] > 0  # PacksOnly packed the small tensors
    p = next(model.parameters())
    version = p._version
    p.grad = torch.randn_like(p)
    with kernels.forced():
        opt.step()
    assert p._version > version


@needs_kernels
def test_adafac_in_place_step_leaves_what_it_cannot_take_to_the_usual_step(monkeypatch):
    """A non-contiguous parameter, parameters sharing memory and ``maximize`` go the packed or per-tensor way (with
    the per-tensor step's result); tensors of several step counts go in one in-place call."""
    taken = []
    original = kernels.adafac_tensors_step

    def recording(shapes, *args, **kwargs):
        taken.append(list(shapes))
        return original(shapes, *args, **kwargs)

    monkeypatch.setattr(kernels, "adafac_tensors_step", recording)
    model, opt = _train_in_place(LearnedOptimizer, steps=1)
    assert len(taken) == 1 and len(taken[0]) == len(list(model.parameters()))
    params = list(model.parameters())
    with torch.no_grad():  # the (12000, 3) weight transposed in memory (non-contiguous)
        params[-2].data = params[-2].data.t().contiguous().t()
    opt.state[params[1]]["step"] += 5  # another step count
    taken.clear()
    with kernels.forced():
        opt.step()
    assert len(taken) == 1 and len(taken[0]) == len(params) - 1
    assert (12000, 3) not in [view for call in taken for view in call]
    taken.clear()
    buffer = torch.randn(300)
    overlapping = [nn.Parameter(buffer[:200]), nn.Parameter(buffer[100:])]  # two views of one storage
    for q in overlapping:
        q.grad = torch.randn_like(q)
    with kernels.forced():
        LearnedOptimizer(overlapping, _adafac_case((1,))[0]).step()
    assert not taken  # stepped one after the other (never on two threads at once)
    maximizing, max_opt = _train_in_place(LearnedOptimizer, maximize=True)
    reference, ref_opt = _train_in_place(PerTensor, maximize=True)
    assert not taken
    for p, q in zip(maximizing.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


def test_adafac_kernel_count_terms_are_the_bias_corrections_of_the_float32_decays():
    """The step-count terms the kernel takes, computed on the host (``_count_terms``), are the bias corrections
    :math:`1 / (1 - \\beta^t)` of the float32 decays the tensor paths hold, exact to float32 rounding (not of the
    decimal decays: at t = 1 the float32 rounding of 0.999 moves ``1 / (1 - beta)`` by 1.3e-5), and the tensor
    paths' own float32 expressions (``_v_correction``, ``_feature_scale``, which lose up to ~1e-5 to cancellation at
    small t) to that; for one count and per tensor."""
    rule = learned_optim.AdafacMLP(momentum_decays=[0.9, 0.99, 0.999], second_moment_decay=0.999)
    beta = rule.momentum_decay.squeeze(1)
    decays = torch.tensor([0.999, 0.9, 0.99, 0.999]).double()
    counts = torch.tensor([1.0, 2.0, 7.0, 1000.0, 123456.0])
    for t in counts:
        v_correction, feature_scale, bias = rule._count_terms(t, t)
        assert v_correction.dtype == feature_scale.dtype == torch.float32 and bias is rule.mlp[0].bias
        exact = (1.0 / (1.0 - decays ** t.double())).float()
        assert torch.equal(v_correction, exact[0]) and torch.equal(feature_scale[6:9], exact[1:])
        assert torch.equal(feature_scale[:6], torch.ones(6)) and torch.equal(feature_scale[9:], torch.ones(7))
        torch.testing.assert_close(v_correction, rule._v_correction(t), rtol=3e-5, atol=0.0)
        torch.testing.assert_close(feature_scale, rule._feature_scale(beta, t, t), rtol=3e-5, atol=0.0)
    v_correction, feature_scale, bias = rule._count_terms(counts, counts)
    assert v_correction.shape == (5,) and feature_scale.shape == (5, 16) and bias.shape == (5, rule.config.hidden_size)
    for i, t in enumerate(counts):
        assert torch.equal(v_correction[i], rule._count_terms(t, t)[0])
        assert torch.equal(feature_scale[i], rule._count_terms(t, t)[1])


def test_adafac_kernel_layers_follow_every_change_of_the_weights():
    """The kernel's flat copy of the later layers (its buffer kept per set of layer storages) is refilled at every
    call: a change through ``.data`` (which no version counter sees), a new storage and a non-contiguous weight all
    reach it."""
    from learned_optim.kernels._ops import _mlp_layers

    rule = learned_optim.AdafacMLP(num_hidden_layers=2, hidden_size=4)
    hidden, out = rule.mlp[2], rule.mlp[4]

    def expected() -> list[Tensor]:
        return [hidden.weight.detach().reshape(-1), hidden.bias.detach(), out.weight.detach().reshape(-1)]

    def flat() -> tuple[Tensor, Tensor, Tensor]:
        return _mlp_layers([(hidden.weight, hidden.bias)], out.weight)

    first = flat()
    assert all(torch.equal(a, b) for a, b in zip(first, expected(), strict=True))
    hidden.weight.data.mul_(2.0)
    assert all(torch.equal(a, b) for a, b in zip(flat(), expected(), strict=True))
    hidden.weight.data = torch.randn(4, 4)
    assert all(torch.equal(a, b) for a, b in zip(flat(), expected(), strict=True))
    hidden.weight.data = torch.randn(4, 4).t()  # non-contiguous: copied, not kept
    assert all(torch.equal(a, b) for a, b in zip(flat(), expected(), strict=True))
    no_hidden = _mlp_layers([], out.weight)
    assert no_hidden[0].numel() == no_hidden[1].numel() == 1 and torch.equal(no_hidden[2], out.weight.reshape(-1))


@needs_kernels
def test_adafac_in_place_plan_is_kept_per_list_of_tensors():
    """What the in-place step derives from its tensors' addresses and shapes is made once and kept: the same plan
    at every step of one list of parameters, another for another list or when a parameter's storage changes, and
    at most ``kept_in_place_plans`` of them; the steps equal the per-tensor step's bit for bit throughout."""
    model, opt = _train_in_place(LearnedOptimizer, steps=2)
    reference, ref_opt = _train_in_place(PerTensor, steps=2)
    rule, params = opt.rule, list(model.parameters())
    assert len(rule._in_place_plans) == 1
    (plan,) = rule._in_place_plans.values()

    def step_both() -> None:
        with kernels.forced():
            for p, q in zip(params, reference.parameters(), strict=True):
                p.grad = q.grad = torch.randn_like(p)
            opt.step()
            ref_opt.step()

    step_both()
    assert list(rule._in_place_plans.values()) == [plan]
    with torch.no_grad():  # a new storage for one parameter (same values): a new plan, the same steps
        params[3].data = params[3].data.clone()
    step_both()
    assert len(rule._in_place_plans) == 2 and plan in rule._in_place_plans.values()
    for p, q in zip(params, reference.parameters(), strict=True):
        assert torch.equal(p, q)
    rule.in_place_step_coordinates = 1000  # a setting the plan reads: another plan
    step_both()
    assert len(rule._in_place_plans) == 3
    for p, q in zip(params, reference.parameters(), strict=True):
        assert torch.equal(p, q)
    rule.kept_in_place_plans = 3
    other = [nn.Parameter(torch.randn(4, 5))]
    other[0].grad = torch.randn(4, 5)
    with kernels.forced():
        LearnedOptimizer(other, rule).step()
    assert len(rule._in_place_plans) == 1  # the kept ones cleared before the third was kept


@needs_kernels
def test_adafac_in_place_step_does_not_depend_on_threads():
    """With several threads the tensors too small to be split by blocks go to the threads whole (here 24 of two
    blocks, 180k coordinates: two runs): parameters and state bit for bit those of one thread, and those of the
    per-tensor step."""

    def run(cls, threads):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(100, 64 + i)) for i in range(24)]
        opt = cls(params, _adafac_case((1,), seed=3)[0], lr=0.01, weight_decay=0.1)
        gen = torch.Generator().manual_seed(0)
        with _torch_threads(threads), kernels.forced():
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
        return params, opt

    params, opt = run(LearnedOptimizer, 2)
    for other, other_opt in (run(LearnedOptimizer, 1), run(PerTensor, 2)):
        for p, q in zip(params, other, strict=True):
            assert torch.equal(p, q)
            assert all(torch.equal(opt.state[p][k], v) for k, v in other_opt.state[q].items())


@needs_kernels
def test_adafac_tensors_step_refuses_tensors_it_does_not_take():
    """The in-place kernel entry returns False and writes nothing for a wrong size, dtype or layout; a step buffer
    given with an update, neither, or of the wrong size or dtype is an error; given alone it receives the step the
    update would apply."""
    rule, grad, param, state, step = _adafac_case((6, 5))
    net = rule._kernel_net(step, grad)
    shape, g, p = (6, 5), grad.clone(), param.clone()
    m = [[state[f"m{i}"].clone()] for i in range(3)]
    v, row, col = [state["v"].clone()], [state["row"].clone()], [state["col"].clone()]
    before = [p.clone(), v[0].clone(), row[0].clone()]
    scales = torch.ones(1)
    with kernels.forced():
        for bad in (
            dict(shapes=[(5, 6)], grads=[g], params=[p]),  # the row statistics are (6, K)
            dict(shapes=[shape], grads=[g.double()], params=[p]),
            dict(shapes=[shape], grads=[g], params=[torch.randn(30, 2)[:, 0]]),  # strided
            dict(shapes=[shape], grads=[g[:29]], params=[p]),
        ):
            assert not kernels.adafac_tensors_step(
                bad["shapes"], bad["grads"], bad["params"], m, v, row, col, net, scales, (0.1, 0.0)
            )
        assert all(torch.equal(x, y) for x, y in zip(before, [p, v[0], row[0]], strict=True))
        for update, direction, match in (
            ((0.1, 0.0), torch.empty(30), "either update .* or direction"),
            (None, None, "either update .* or direction"),
            (None, torch.empty(29), "direction of 29"),
            (None, torch.empty(30, dtype=torch.float64), "direction of 30 torch.float64"),
        ):
            with pytest.raises(ValueError, match=match):
                kernels.adafac_tensors_step([shape], [g], [p], m, v, row, col, net, scales, update, direction)
        assert all(torch.equal(x, y) for x, y in zip(before, [p, v[0], row[0]], strict=True))
        direction = torch.full((30,), float("nan"))  # the steps written, the parameter left as it was
        assert kernels.adafac_tensors_step([shape], [g], [p], m, v, row, col, net, scales, None, direction)
        assert torch.equal(p, before[0]) and torch.isfinite(direction).all() and not torch.equal(v[0], before[1])
        m = [[state[f"m{i}"].clone()] for i in range(3)]  # the same state again
        v, row, col = [state["v"].clone()], [state["row"].clone()], [state["col"].clone()]
        assert kernels.adafac_tensors_step([shape], [g], [p], m, v, row, col, net, scales, (0.1, 0.0))
    assert not torch.equal(p, before[0]) and not torch.equal(v[0], before[1])
    torch.testing.assert_close(p, before[0] + 0.1 * direction)  # the same step, applied


@needs_kernels
def test_kernel_entry_points_refuse_widths_they_would_read_or_write_past():
    """The public kernel functions check every width the C++ code indexes with and raise before the call, where the
    kernel read past the weight (an input wider than it) or wrote past an output narrower than the hidden size."""
    cell, x, h, c = _case(8, 5, 20)
    w, b = _fused(cell)
    out = torch.full((8, 2, 20), float("nan"))
    for bad in (
        (torch.randn(8, 6), h, c, w, b, out[:, 0], out[:, 1]),  # x one column wider than the weight
        (x, h, c, w, b, torch.empty(8, 19), out[:, 1]),  # h_out narrower than H
        (x, h, c, w, b[:-1], out[:, 0], out[:, 1]),
    ):
        with pytest.raises(ValueError, match="lstm_cell: .* do not fit one cell"):
            kernels.lstm_cell_into(*bad)
    rule, grad, param, state, step = _adafac_case((6, 5))
    net = rule._kernel_net(step, grad)
    m = [[state[f"m{i}"].clone()] for i in range(3)]
    v, row, col = [state["v"].clone()], [state["row"].clone()], [state["col"].clone()]
    p = param.clone()
    with kernels.forced():
        with pytest.raises(ValueError, match="one step scale per tensor"):  # the kernel reads step_scales[s]
            kernels.adafac_tensors_step([(6, 5)], [grad], [p], m, v, row, col, net, torch.ones(0), (0.1, 0.0))
        narrow = net._replace(bias=net.bias[:-1])
        with pytest.raises(ValueError, match="adafac kernel: a net of hidden size"):
            kernels.adafac_tensors_step([(6, 5)], [grad], [p], m, v, row, col, narrow, torch.ones(1), (0.1, 0.0))
    assert torch.equal(p, param)
    rule, grad_, param, state, step = _mlp_case(40)
    layers = (torch.zeros(32, 22), torch.zeros(32), torch.zeros(2, 32), torch.zeros(2))
    moments = (grad_, param, state["m"], state["v"], rule.decay, 1e-6)
    with kernels.forced():
        assert kernels.mlp_update(*moments, *layers, 1e-3, 1e-3) is not None
        with pytest.raises(ValueError, match="mlp_update: layers"):
            kernels.mlp_update(
                *moments, torch.zeros(32, 22), torch.zeros(32), torch.zeros(2, 31), torch.zeros(2), 1e-3, 1e-3
            )
        with pytest.raises(ValueError, match="mlp kernel: grad"):
            kernels.mlp_feature_mean_square(grad_[:-1], *moments[1:])


@needs_kernels
@pytest.mark.parametrize("lr", [0.1, torch.tensor(0.1)], ids=["float", "tensor"])
def test_adafac_kernel_applies_the_decoupled_update_itself(lr):
    """Given ``update=(lr, weight_decay)``, the native step writes theta (1 - lr wd) + lr delta into ``param`` in
    its last sweep and returns no delta (the same new state); the ATen path ignores it and returns delta; the
    optimizer's step on one tensor is the same either way."""
    shape = (37, 23)
    rule, grad, param, state, step = _adafac_case(shape)
    delta, want_new, _ = _adafac_step(rule, grad, param, state, step, shape, True)
    theta, given = param.clone(), {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        none, new = rule(grad, theta, given, step, shape=shape, out_state=given, update=(lr, 0.01))
    assert none is None
    want = param * (1.0 - 0.1 * 0.01) + 0.1 * delta
    torch.testing.assert_close(theta - param, want - param, rtol=1e-5, atol=1e-7 * float(delta.abs().max()))
    for name, value in want_new.items():
        assert torch.equal(new[name], value)
    with kernels.enabled_as(False), torch.no_grad():
        theta = param.clone()
        aten, _ = rule(grad, theta, {k: v.clone() for k, v in state.items()}, step, shape=shape, update=(lr, 0.01))
    assert aten is not None and torch.equal(theta, param)
    moved = []
    for use_kernels in (True, False):
        p = nn.Parameter(param.view(shape).clone())
        opt = LearnedOptimizer([p], rule, lr=lr, weight_decay=0.01)
        with kernels.forced() if use_kernels else kernels.enabled_as(False):
            for _ in range(3):
                p.grad = grad.view(shape).clone()
                opt.step()
        moved.append(p.detach() - param.view(shape))
    torch.testing.assert_close(moved[0], moved[1], rtol=1e-4, atol=1e-5 * float(moved[1].abs().max()))


@needs_kernels
def test_adafac_kernel_does_not_depend_on_threads():
    """The native step's sums (features' and direction's) are taken per block and added in order: its step and
    new state are the same bit for bit with 1 and 2 threads."""
    shape = (300, 600)  # 50 blocks of 6 rows: both passes split them over 2 threads (at least 4 or 16 blocks each)
    rule, grad, param, state, step = _adafac_case(shape)
    results = []
    for count in (1, 2):
        with _torch_threads(count):
            results.append(_adafac_step(rule, grad, param, state, step, shape, False))
    (delta, new, _), (delta2, new2, _) = results
    assert torch.equal(delta, delta2)
    assert all(torch.equal(new[k], new2[k]) for k in new)


@needs_kernels
def test_kernels_share_torchs_openmp_threads_where_torch_runs_gnu_openmp():
    """Where torch loaded GNU OpenMP and the compiler is GCC, the library is built with -fopenmp and links the very
    libgomp torch loaded (no second OpenMP runtime in the process); LEARNED_OPTIM_OPENMP=0 and Clang leave it out."""
    version = subprocess.run([os.environ.get("CXX", "c++"), "--version"], capture_output=True, text=True).stdout
    wanted = _build.openmp_flags(version)
    assert kernels.shares_torch_threads() == bool(wanted)
    assert _build.openmp_flags("clang version 18.1.8") == []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LEARNED_OPTIM_OPENMP", "0")
        assert _build.openmp_flags(version) == []
    if wanted:
        maps = Path("/proc/self/maps").read_text().splitlines()
        runtimes = {line.split()[-1] for line in maps if line.endswith("/libgomp.so.1")}
        assert len(runtimes) == 1, runtimes  # (other packages' renamed copies, libgomp-<hash>.so.*, aside)


@needs_kernels
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_kernels_step_in_a_child_forked_after_their_threads_ran():
    """GNU OpenMP's threads do not survive fork(): a child forked after the kernels ran on 2 threads steps on one
    (``kernel_threads``) instead of waiting for ever on the parent's OpenMP workers, and the parent goes on on 2."""
    code = textwrap.dedent("""
        import os, torch, learned_optim
        from learned_optim import kernels
        torch.set_num_threads(2)
        p = torch.nn.Parameter(torch.randn(1000, 1000))
        grads = [torch.randn(1000, 1000) for _ in range(3)]  # (a large copy in the child would be torch's parallel op)
        opt = learned_optim.LearnedOptimizer([p], learned_optim.AdafacMLP(), lr=1e-3)
        with kernels.forced():
            p.grad = grads[0]
            opt.step()  # the parallel regions run: the OpenMP workers exist
            pid = os.fork()
            if pid == 0:
                p.grad = grads[1]
                opt.step()
                os._exit(0 if kernels.kernel_threads() == (1 if kernels.shares_torch_threads() else 2) else 3)
            _, status = os.waitpid(pid, 0)
            assert kernels.kernel_threads() == 2
            p.grad = grads[2]
            opt.step()
        print("child", os.waitstatus_to_exitcode(status), "finite", bool(torch.isfinite(p).all()))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "child 0 finite True" in proc.stdout, proc.stdout + proc.stderr[-2000:]


@needs_kernels
def test_kernels_with_threads_of_their_own_do_not_depend_on_threads():
    """The build without OpenMP (LEARNED_OPTIM_OPENMP=0: std::thread per task, as where torch runs another OpenMP
    runtime) passes the tests of 1 against 2 threads, bit for bit."""
    env = {**os.environ, "LEARNED_OPTIM_OPENMP": "0", "LEARNED_OPTIM_CACHE": str(_build.cache_dir().parent)}
    selected = "does_not_depend_on_threads"
    check = "from learned_optim import kernels; assert kernels.shares_torch_threads() is False"
    proc = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", selected]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def _recorded_pack_step_call(rule, grad, param, state, step, shape):
    """The arguments the rule passes to ``kernels.adafac_pack_step`` in one step, and what it returned."""
    calls = []
    original = kernels.adafac_pack_step

    def record(*args, **kwargs):
        calls.append((args, kwargs, original(*args, **kwargs)))
        return calls[-1][2]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "adafac_pack_step", record)
        result = _adafac_step(rule, grad, param, state, step, shape, False)
    assert len(calls) == 1
    return calls[0], result


def test_adafac_kernel_declines_what_it_does_not_handle():
    shape = (20, 30)
    rule, grad, param, state, step = _adafac_case(shape, hidden_size=kernels.ADAFAC_MAX_HIDDEN + 1)
    (_, _, returned), (delta, new, _) = _recorded_pack_step_call(rule, grad, param, state, step, shape)
    assert returned is None  # the wrapper declines: the ATen passes run, with the same result
    with kernels.enabled_as(False):
        want, want_new, _ = _adafac_step(rule, grad, param, state, step, shape, False)
    torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    if not kernels.available():
        return
    rule = _adafac_case(shape)[0]
    with kernels.forced():
        (args, kwargs, returned), _ = _recorded_pack_step_call(rule, grad, param, state, step, shape)
    assert returned is not None
    views, grad_, param_, *rest = args
    with kernels.forced():
        assert kernels.adafac_pack_step(views, grad_.double(), param_.double(), *rest, **kwargs) is None  # float64
        with kernels.enabled_as(False):
            assert kernels.adafac_pack_step(*args, **kwargs) is None  # kernels off
        with pytest.raises(ValueError, match="coordinates for"):
            kernels.adafac_pack_step(views, grad_[:100], param_, *rest, **kwargs)
        with pytest.raises(ValueError, match="row \\(20, 3\\)"):  # views that do not fit the statistics
            kernels.adafac_pack_step([(21, 30)], grad_, param_, *rest, **kwargs)


def _probe(env: dict[str, str], tmp_path, extra: str = "") -> str:
    code = (
        textwrap.dedent("""
        import torch, learned_optim
        from learned_optim import kernels
        p = torch.nn.Parameter(torch.ones(100)); p.grad = torch.full((100,), 0.1)
        learned_optim.LearnedOptimizer([p], learned_optim.DMLSTM()).step()
        print("available", kernels.available(), "error", kernels.build_error(), "finite", bool(torch.isfinite(p).all()))
    """)
        + extra
    )
    full = {**os.environ, "LEARNED_OPTIM_CACHE": str(tmp_path), **env}
    proc = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_no_compiler_falls_back_to_aten_with_a_warning(tmp_path):
    # (and no bundled library: a source checkout's, or a wheel's for another version or platform)
    out = _probe({"CXX": "/nonexistent/c++", "LEARNED_OPTIM_PREBUILT": str(tmp_path / "none")}, tmp_path)
    assert "available False" in out and "no C++ compiler found" in out and "finite True" in out
    assert "no bundled kernels" in out
    assert "native kernels unavailable, using the ATen path" in out  # the warning, logged once
    assert not list(tmp_path.rglob("*.so"))


@pytest.fixture(scope="module")
def bundled_kernels(tmp_path_factory) -> Path:
    """A folder of bundled kernels (``prebuild``) for the ``portable`` target: what a wheel ships."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler to build the bundle with")
    folder = tmp_path_factory.mktemp("prebuilt")
    assert _build.prebuild(folder, ["portable"]) == [folder / _build.prebuilt_name("portable")]
    return folder


_BUNDLED_PROBE = textwrap.dedent("""
    import torch
    from learned_optim import AdafacMLP, kernels
    rule = AdafacMLP(hidden_size=8)
    grad, param = torch.randn(4000) * 1e-3, torch.randn(4000)
    state = rule.init_state(4000, shape=(40, 100))
    steps = []
    for native in (True, False):
        with kernels.forced() if native else kernels.enabled_as(False), torch.no_grad():
            steps.append(rule(grad, param, dict(state), torch.tensor(3.0), shape=(40, 100))[0])
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-5, atol=1e-6 * float(steps[1].abs().max()))
    print(kernels.report())
""")


def test_without_a_compiler_the_bundled_kernels_load_and_are_measured(bundled_kernels, tmp_path):
    """No C++ compiler (a slim container): the best bundled library the CPU runs loads instead of the ATen path (here
    the portable one, the only one bundled, though the CPU may run a better one), it computes what ATen does, the
    guard measures it here and keeps its record in the user's cache (the package's folder may be read-only), and
    nothing is compiled."""
    env = {"CXX": "/nonexistent/c++", "LEARNED_OPTIM_PREBUILT": str(bundled_kernels)}
    out = _probe(env, tmp_path, extra=_BUNDLED_PROBE)
    assert "available True" in out and "finite True" in out
    assert "bundled with the package (ISA portable" in out and "loading the bundled native kernels" not in out
    assert not list(tmp_path.rglob("*.so")) and len(list(tmp_path.rglob("*.guard.json"))) == 1
    assert not list(bundled_kernels.glob("*.json"))


@pytest.mark.parametrize("damage", ["other sources", "cut short"])
def test_a_bundled_library_of_other_sources_or_damaged_is_never_loaded(bundled_kernels, tmp_path, damage):
    """A bundled library is loaded only if it was built from the sources whose signatures this package declares (its
    name carries their digest) and is intact (its digest beside it): else the ATen path runs, with the reasons."""
    folder = tmp_path / "prebuilt"
    folder.mkdir()
    name = _build.prebuilt_name("portable")
    for path in bundled_kernels.iterdir():
        target = folder / path.name.replace(
            name, name.replace("-portable-", "-portable-0") if damage == "other sources" else name
        )
        shutil.copy(path, target)
    if damage == "cut short":
        with open(folder / name, "r+b") as f:
            f.truncate(4096)
    env = {"CXX": "/nonexistent/c++", "LEARNED_OPTIM_PREBUILT": str(folder), "LEARNED_OPTIM_ISA": "portable"}
    out = _probe(env, tmp_path / "cache")
    assert "available False" in out and "finite True" in out and "no C++ compiler found" in out
    assert ("no bundled kernels" if damage == "other sources" else "damaged or unrecorded") in out


def test_prebuild_builds_each_target_with_the_bundle_flags_and_removes_bundles_of_other_sources(tmp_path, monkeypatch):
    """``prebuild``: one library per target, with the bundle's flags (no OpenMP), named by the sources' digest; the
    bundled libraries of other sources in the folder are removed (a wheel would ship them for nothing), not the ones
    of these sources nor anything else (a kernel cache's ``learned_optim-<key>.so``)."""
    calls: list[list[str]] = []

    def compile_library(compiler: list[str], flags: list[str], target: Path) -> None:
        calls.append(flags)
        target.write_bytes(b"library")
        target.with_name(target.name + ".sha256").write_text("digest")

    monkeypatch.setattr(_build, "_compiler", lambda: (["c++"], "g++ (GCC) 12"))
    monkeypatch.setattr(_build, "compile_library", compile_library)
    machine = _build.platform.machine().lower()
    stale = [f"learned_optim-{machine}-portable-0123456789abcdef.so", f"learned_optim-{machine}-avx2-0000.so.sha256"]
    kept = [_build.prebuilt_name("avx2"), "learned_optim-0123456789abcdef.so", "notes.txt"]
    for name in stale + kept:
        (tmp_path / name).write_text("x")
    built = _build.prebuild(tmp_path, ["portable"])
    assert built == [tmp_path / _build.prebuilt_name("portable")] and _build.SOURCES_DIGEST in built[0].name
    assert calls == [_build.FLAGS + _build.ISAS["portable"][0] + _build.PREBUILT_FLAGS]
    assert not any("openmp" in flag for flag in calls[0])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([*kept, built[0].name, built[0].name + ".sha256"])


def test_the_guard_without_a_cache_folder_measures_for_this_process(monkeypatch):
    monkeypatch.setattr(_guard, "measure", lambda isa, switched: {"ratios": {k: 2.0 for k in _guard.KERNELS}})
    assert _guard.load_or_measure(None, "portable", _runtime._switched)["ratios"]["adafac_mlp"] == 2.0


def test_prebuild_needs_a_compiler_and_builds_only_this_architectures_targets(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(SystemExit, match="no C[+][+] compiler found"):
        kernels_cli(["prebuild", "--out", str(tmp_path)])
    monkeypatch.setattr(_build.platform, "machine", lambda: "aarch64")
    assert _build.architecture_isas() == ["portable"]
    with pytest.raises(ValueError, match="cannot build"):
        _build.prebuild(tmp_path, ["avx2"])
    assert not list(tmp_path.iterdir())


def _hatch_build() -> Any:
    """The project's ``hatch_build.py`` (the wheel's build hook), imported from the checkout."""
    spec = importlib.util.spec_from_file_location("hatch_build", Path(__file__).parents[2] / "hatch_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_wheel_hook_ships_bundled_kernels_and_tags_the_wheel_for_the_platform(tmp_path):
    """``hatch_build.py``: a standard wheel gets the bundled libraries and their digests, is no longer pure Python
    and is tagged ``py3-none-<platform>``; without libraries, for an editable install or an sdist, nothing changes."""
    hook_module = _hatch_build()

    def built(version: str = "standard", target: str = "wheel") -> dict:
        hook = hook_module.PrebuiltKernelsHook(str(tmp_path), {}, None, None, str(tmp_path / "dist"), target)
        data: dict = {"force_include": {}, "pure_python": True, "infer_tag": False}
        hook.initialize(version, data)
        return data

    assert built() == {"force_include": {}, "pure_python": True, "infer_tag": False}
    folder = tmp_path / hook_module.PREBUILT
    folder.mkdir(parents=True)
    for name in ("learned_optim-x86_64-avx2-0123.so", "learned_optim-x86_64-avx2-0123.so.sha256"):
        (folder / name).write_bytes(b"x")
    data = built()
    assert data["pure_python"] is False and data["tag"] == f"py3-none-{hook_module.platform_tag()}"
    assert sorted(data["force_include"].values()) == [
        f"{hook_module.PREBUILT}/learned_optim-x86_64-avx2-0123.so",
        f"{hook_module.PREBUILT}/learned_optim-x86_64-avx2-0123.so.sha256",
    ]
    assert built("editable")["pure_python"] and built(target="sdist")["pure_python"]
    (folder / "learned_optim-x86_64-avx2-0123.so.sha256").unlink()
    with pytest.raises(FileNotFoundError, match="has no digest"):  # the runtime would refuse it: not shipped
        built()


def test_the_wheel_tag_on_macos_is_the_machines_architecture_and_version(monkeypatch):
    """A macOS interpreter may report ``universal2`` and an old version; the bundled libraries are built for this
    machine's architecture and (by default) its macOS version, so the wheel says that."""
    hook_module = _hatch_build()
    monkeypatch.setattr(hook_module.sysconfig, "get_platform", lambda: "macosx-10.9-universal2")
    monkeypatch.setattr(hook_module.platform, "mac_ver", lambda: ("14.2.1", ("", "", ""), "arm64"))
    monkeypatch.setattr(hook_module.platform, "machine", lambda: "arm64")
    assert hook_module.platform_tag() == "macosx_14_0_arm64"
    monkeypatch.setattr(hook_module.sysconfig, "get_platform", lambda: "linux-x86_64")
    assert hook_module.platform_tag() == "linux_x86_64"


def test_kernels_command_line_reports_the_paths(capsys):
    kernels_cli(["report"])
    assert "learned_optim native kernels on" in capsys.readouterr().out


def test_environment_switch_disables_the_kernels(tmp_path):
    out = _probe({"LEARNED_OPTIM_KERNELS": "0"}, tmp_path, extra="print(kernels.report())")
    assert "available False" in out and "finite True" in out and "switched off" in out
    assert not list(tmp_path.rglob("*.so"))  # not even built, by the step or by report()


@needs_kernels
def test_kernel_is_built_once_into_the_cache(tmp_path):
    # built by a compiler command with a wrapper in front ($CXX = "ccache g++" and the like): the same compiler,
    # so the same library, which the later runs find
    out = _probe({"CXX": f"env {os.environ.get('CXX', 'c++')}"}, tmp_path)
    assert "available True" in out
    built = list(tmp_path.rglob("learned_optim-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert "available True" in _probe({}, tmp_path)
    assert built[0].stat().st_mtime_ns == stamp and len(list(tmp_path.rglob("*.so"))) == 1
    assert _build.intact(built[0])
    # a library cut short (a partial copy of the cache, a crash before the file system wrote it) maps and then
    # dies with SIGBUS at its first call: it is found by its digest and built again
    with open(built[0], "r+b") as f:
        f.truncate(4096)
    assert not _build.intact(built[0])
    out = _probe({}, tmp_path)
    assert "available True" in out and "damaged or unrecorded; building again" in out
    assert _build.intact(built[0]) and len(list(tmp_path.rglob("*.so"))) == 1


def test_auto_chunk_size_follows_the_kernels(make_rule):
    from learned_optim.optimizer import DEFAULT_CHUNK_SIZE, KERNEL_CHUNK_SIZE

    rule = make_rule("dm_lstm")
    rows = []
    rule.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    n = 2 * KERNEL_CHUNK_SIZE + 5
    p = nn.Parameter(torch.zeros(n))
    opt = LearnedOptimizer([p], rule)
    assert opt.chunk_size == "auto"
    for use in (True, False):
        rows.clear()
        with kernels.enabled_as(use):
            p.grad = torch.full((n,), 1e-3)
            opt.step()
        expected = KERNEL_CHUNK_SIZE if use and kernels.serves("dm_lstm") else DEFAULT_CHUNK_SIZE
        assert rows[0] == expected and len(rows) == -(-n // expected)
    with pytest.raises(ValueError, match="chunk_size"):
        LearnedOptimizer([p], rule, chunk_size="big")


@pytest.mark.parametrize("family", ["adafac_mlp", "dm_lstm"])
def test_auto_chunk_size_on_aten_is_the_nets_own(family, make_rule):
    """On the CPU's ATen path a net may size its chunks (``UpdateRule.cpu_chunk_size``): adafac_mlp packs small
    tensors up to its one-shot bound (20 tensors of 1000 coordinates: one call), DM-LSTM keeps DEFAULT_CHUNK_SIZE."""
    from learned_optim.optimizer import DEFAULT_CHUNK_SIZE
    from learned_optim.packing import align_rows

    rule = make_rule(family)
    rows = []
    rule.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    params = [nn.Parameter(torch.zeros(1000)) for _ in range(20)]
    opt = LearnedOptimizer(params, rule)
    with kernels.enabled_as(False):
        expected = align_rows(rule.coordinate_block) if family == "adafac_mlp" else DEFAULT_CHUNK_SIZE
        assert opt._chunk_rows(torch.device("cpu")) == expected
        for p in params:
            p.grad = torch.full((1000,), 1e-3)
        opt.step()
    assert len(rows) == -(-20_000 // expected) and sum(rows) >= 20_000


def test_auto_chunk_size_on_an_accelerator_is_large(make_rule):
    """A GPU step pays per kernel launch: "auto" takes ACCELERATOR_CHUNK_SIZE there, whatever the CPU kernels
    say (the device is only read, so this runs without one); an explicit size is kept."""
    from learned_optim.optimizer import ACCELERATOR_CHUNK_SIZE

    p = nn.Parameter(torch.zeros(4))
    for use in (True, False):
        with kernels.enabled_as(use):
            assert (
                LearnedOptimizer([p], make_rule("dm_lstm"))._chunk_rows(torch.device("cuda")) == ACCELERATOR_CHUNK_SIZE
            )
    assert LearnedOptimizer([p], make_rule("mlp"), chunk_size=4096)._chunk_rows(torch.device("cuda")) == 4096


@pytest.mark.parametrize("isa", [i for i in kernels.ISAS if i != kernels.supported_isas()[0]])
def test_other_instruction_sets_build_and_compute_the_same_cell(isa):
    """Each ISA build this CPU can run but would not pick (``LEARNED_OPTIM_ISA``) compiles, reports its
    vector width and computes the same cell, on the generic path (hidden 7) and the zoo's hidden size 20, and the
    same adafac_mlp step as ATen at hidden widths 8 and 16 (compiled in) and 20 (padded to 24, read at run time),
    over a matrix and a vector."""
    if isa not in kernels.supported_isas():
        pytest.skip(f"this CPU cannot run {isa}")
    code = textwrap.dedent("""
        import torch
        from torch import nn
        import learned_optim
        from learned_optim import kernels
        from learned_optim.nets.cells import fused_gate_weights
        assert kernels.available(), kernels.build_error()
        assert kernels.isa() == ISA and kernels.vector_lanes() == {"avx512": 16, "avx2": 8}.get(ISA, 4)
        torch.manual_seed(0)
        with kernels.forced():  # whatever its guard measured
            for inputs, hidden in [(2, 20), (3, 7)]:
                cell = nn.LSTMCell(inputs, hidden).requires_grad_(False)
                x, state = torch.randn(101, inputs) * 2, torch.randn(101, 2, hidden)
                out = torch.empty(101, 2, hidden)
                w, b = fused_gate_weights(cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
                assert kernels.lstm_cell_into(x, state[:, 0], state[:, 1], w, b, out[:, 0], out[:, 1])
                h, c = cell(x, (state[:, 0], state[:, 1]))
                torch.testing.assert_close(out[:, 0], h, rtol=2e-6, atol=2e-6)
                torch.testing.assert_close(out[:, 1], c, rtol=2e-6, atol=2e-6)
        # the padded widths compiled in (8, 16) and one read at run time (24); a matrix and a vector, each with full
        # spans and a partial one (on AVX2 and SSE the full spans have code of their own)
        for hidden, shape in [(8, (37, 23)), (8, (1001,)), (16, (37, 23)), (20, (37, 23))]:
            rule = learned_optim.AdafacMLP(hidden_size=hidden).requires_grad_(False)
            for weight in rule.parameters():
                weight.normal_(0.0, 0.5)
            n = shape[0] * (shape[1] if len(shape) > 1 else 1)
            grad, param = torch.randn(n) * 1e-3, torch.randn(n)
            state = {k: torch.rand_like(v) * 0.1 + 0.01 for k, v in rule.init_state(n, shape=shape).items()}
            steps = []
            for native in (True, False):
                with kernels.forced() if native else kernels.enabled_as(False), torch.no_grad():
                    steps.append(rule(grad, param, dict(state), torch.tensor(3.0), shape=shape)[0])
            torch.testing.assert_close(steps[0], steps[1], rtol=1e-5, atol=1e-6 * float(steps[1].abs().max()))
        print("ok")
    """)
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    # the usual cache (each ISA's library is built once per machine and source version, like any user's)
    env = {**os.environ, "LEARNED_OPTIM_CACHE": str(_build.cache_dir().parent), "LEARNED_OPTIM_ISA": isa}
    code = f"ISA = {isa!r}\n" + code
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_isa_override_must_name_an_isa_the_cpu_runs(tmp_path):
    out = _probe({"LEARNED_OPTIM_ISA": "sse9"}, tmp_path)
    assert "available False" in out and "is not one of" in out and "finite True" in out


_PLANT_PROBE = textwrap.dedent("""
    import json, torch
    from torch import nn
    from learned_optim import AdafacMLP, kernels
    from learned_optim.nets.cells import fused_gate_weights
    cell = nn.LSTMCell(2, 20).requires_grad_(False)
    x, state = torch.randn(8, 2), torch.randn(8, 2, 20)
    out = torch.empty(8, 2, 20)
    w, b = fused_gate_weights(cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    n = 40
    g, p, m, v = torch.randn(n), torch.randn(n), torch.zeros(n, 5), torch.ones(n, 5)
    mlp = kernels.mlp_feature_mean_square(g, p, m, v, torch.full((5,), 0.9), 1e-6)
    calls, original = [], kernels.adafac_pack_step
    kernels.adafac_pack_step = lambda *a, **k: calls.append(original(*a, **k)) or calls[-1]
    rule = AdafacMLP().requires_grad_(False)
    adafac_state = rule.init_state(n, shape=(8, 5))
    with torch.no_grad():
        rule(g, p, adafac_state, torch.tensor(1.0), shape=(8, 5), out_state=adafac_state)
    print(json.dumps({
        "adafac_mlp_ran": bool(calls) and calls[-1] is not None,
        "lstm_cell_ran": kernels.lstm_cell_into(x, state[:, 0], state[:, 1], w, b, out[:, 0], out[:, 1]),
        "mlp_ran": mlp is not None,
        "uses": {k: kernels.uses(k) for k in kernels.KERNELS},
        "serves": {f: kernels.serves(f) for f in ("dm_lstm", "rnnprop", "mlp", "adafac_mlp")},
        "report": kernels.report(),
    }))
""")


@needs_kernels
def test_dispatch_follows_planted_guard_measurements(tmp_path):
    """A kernel runs only if its cached guard ratio (ATen time / kernel time) reaches MIN_SPEEDUP: the
    built library is copied into a fresh cache with planted measurements beside it, and a new process
    dispatches by them (without rebuilding or measuring again)."""
    library = kernels.library_path()
    assert library is not None and library.with_suffix(".guard.json").exists()  # the guard of this build
    record = json.loads(library.with_suffix(".guard.json").read_text())
    cache = tmp_path / "kernels"
    cache.mkdir()
    shutil.copy(library, cache / library.name)
    planted_path = (cache / library.name).with_suffix(".guard.json")
    threshold = kernels.MIN_SPEEDUP
    for ratios in (
        {"lstm_cell": 0.4, "elu": 9.0, "mlp": threshold - 0.01, "adafac_mlp": 3.0},
        {"lstm_cell": threshold, "elu": 1.0, "mlp": 2.5, "adafac_mlp": threshold - 0.01},
    ):
        planted = {**record, "ratios": ratios}
        planted_path.write_text(json.dumps(planted))
        stamp = planted_path.stat().st_mtime_ns
        env = {**os.environ, "LEARNED_OPTIM_CACHE": str(tmp_path), "LEARNED_OPTIM_KERNELS": "1"}
        proc = subprocess.run(
            [sys.executable, "-c", _PLANT_PROBE], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen = json.loads(proc.stdout.strip().splitlines()[-1])
        expected = {k: v >= threshold for k, v in ratios.items()}
        assert seen["uses"] == expected
        assert seen["lstm_cell_ran"] == expected["lstm_cell"] and seen["mlp_ran"] == expected["mlp"]
        assert seen["adafac_mlp_ran"] == expected["adafac_mlp"]
        assert seen["serves"] == {
            "dm_lstm": expected["lstm_cell"],
            "rnnprop": expected["lstm_cell"],  # its net's kernel decides; the ELU beside it does not
            "mlp": expected["mlp"],
            "adafac_mlp": expected["adafac_mlp"],
        }
        for name, ratio in ratios.items():
            verdict = "used" if expected[name] else "NOT used (ATen runs)"
            assert f"kernel {name}: {verdict}" in seen["report"] and f"= {ratio:.2f}x" in seen["report"]
        assert planted_path.stat().st_mtime_ns == stamp  # read, not measured again
        assert len(list(cache.glob("*.so"))) == 1  # not rebuilt


@needs_kernels
def test_the_orthogonalising_in_place_step_ignores_the_default_dtype():
    """A float64 default dtype (``torch.set_default_dtype``) leaves the float32 model's in-place step as it is: its
    step buffer is float32 (a default-dtype buffer was refused by the kernel entry with a ValueError)."""
    moved = []
    for default in (torch.float32, torch.float64):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
        rule = _adafac_case((1,), newton_schulz_steps=3, step_magnitude="adam")[0]
        opt = LearnedOptimizer(model.parameters(), rule, lr=0.01)
        model(torch.randn(4, 6)).square().mean().backward()
        left: list[list[torch.Tensor]] = []

        def spy(*args, left=left, original=rule.step_in_place):
            left.append(original(*args))
            return left[-1]

        rule.step_in_place = spy
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            with kernels.forced():
                opt.step()
        finally:
            torch.set_default_dtype(previous)
        assert left == [[]]  # every tensor stepped in place
        moved.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(moved[0], moved[1])


@needs_kernels
def test_measuring_the_guard_leaves_the_global_random_stream_alone():
    """The guard runs once per machine, lazily, inside the user's first step: it must not reseed torch's global
    generator (its workloads build nets with seeded initialisations), or a seeded script would draw other numbers
    on its first run on a machine than on every later run."""
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    # (and it measures float32 nets whatever the caller's default dtype and autocast: it failed under both)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            record = _guard.measure(kernels.isa(), _runtime._switched)
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(previous)
    assert torch.equal(torch.get_rng_state(), state)
    assert _guard.valid(record, kernels.isa()) and isinstance(record["busy"], bool)


def test_a_guard_record_that_cannot_be_cached_still_counts(tmp_path, monkeypatch, caplog):
    """A read-only cache: the fresh measurement is used for the process (it raised PermissionError from the
    optimizer's constructor, and the kernels stayed off) and the failed write is logged. Planted record."""
    record = json.loads(_guard_record_path().read_text())
    monkeypatch.setattr(_guard, "measure", lambda isa, switched: record)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(learned_optim._files.os, "open", read_only)
    with caplog.at_level("WARNING", logger="learned_optim"):
        assert _guard.load_or_measure(tmp_path / "guard.json", kernels.isa(), _runtime._switched) == record
    assert "could not cache the kernels' guard record" in caplog.text
    assert not list(tmp_path.iterdir())


def _guard_record_path():
    library = kernels.library_path()
    assert library is not None
    return library.with_suffix(".guard.json")


def test_a_close_guard_call_is_measured_again_and_the_median_round_counts():
    """A ratio (ATen time / kernel time) within CLOSE_CALL_BAND of MIN_SPEEDUP is measured CLOSE_CALL_ROUNDS times and
    the round of median ratio counts: measured once near the bar on a busy machine, the verdict could go either way,
    and it is cached. A clear ratio either side is measured once. Planted rounds, no timing."""
    bar, rounds = _guard.MIN_SPEEDUP, _guard.CLOSE_CALL_ROUNDS

    def planted(ratios):
        left = iter(ratios)  # one more round than planted would raise StopIteration
        return lambda: {"kernel": 2.0, "aten": 2.0 * next(left)}

    for clear in (3.0 * bar, 0.4 * bar):
        assert _guard._median_round(planted([clear])) == {"kernel": 2.0, "aten": 2.0 * clear, "rounds": 1}
    # just under the bar once, then above it: the median round uses the kernel
    close = [0.95 * bar] + [bar * (1.0 + 0.01 * i) for i in range(1, rounds)]
    median = bar * (1.0 + 0.01 * (rounds // 2))
    assert _guard._median_round(planted(close)) == {"kernel": 2.0, "aten": 2.0 * median, "rounds": rounds}
    # just over the bar once, then under it: ATen
    close = [1.05 * bar] + [bar * (1.0 - 0.01 * i) for i in range(1, rounds)]
    assert _guard._median_round(planted(close))["aten"] / 2.0 < bar


def test_a_guard_record_of_other_workloads_is_measured_again():
    """The cached guard is valid only for this ISA, this torch and the workloads it timed (a changed guard
    workload must not reuse ratios measured on the old one)."""
    record = json.loads(_guard_record_path().read_text())
    assert _guard.valid(record, kernels.isa())
    assert not _guard.valid({**record, "workloads": "measured-on-other-workloads"}, kernels.isa())
    assert not _guard.valid({k: v for k, v in record.items() if k != "workloads"}, kernels.isa())
    assert not _guard.valid(record, "another-isa")


def test_a_guard_measured_on_a_busy_machine_is_measured_again_when_it_is_calm(tmp_path, monkeypatch):
    """A record measured while every core had another runnable thread counts for now, and the first process that
    finds the machine calm measures it again (a verdict measured under load is otherwise cached for the build); a
    calm record, or a busy one on a still busy machine, is read as it is. Planted loads and records, no timing."""
    record = json.loads(_guard_record_path().read_text())
    path = tmp_path / "guard.json"
    fresh = {**record, "measured": "just now", "busy": False}
    measured = []
    monkeypatch.setattr(_guard, "measure", lambda isa, switched: measured.append(isa) or fresh)
    for cached_busy, load, remeasured in (
        (True, (0.5, 2), True),
        (True, (2.0, 2), False),
        (True, (3.5, 2), False),
        (False, (0.5, 2), False),
        (False, (3.5, 2), False),
    ):
        monkeypatch.setattr(_guard, "machine_load", lambda load=load: load)
        assert _guard.busy() == (load[0] >= load[1])
        planted = {**record, "busy": cached_busy}
        path.write_text(json.dumps(planted))
        measured.clear()
        got = _guard.load_or_measure(path, kernels.isa(), _runtime._switched)
        assert measured == ([kernels.isa()] if remeasured else [])
        assert got == (fresh if remeasured else planted)
        assert json.loads(path.read_text()) == got  # written where measured again
    monkeypatch.setattr(_guard, "machine_load", lambda: None)  # no load average (not POSIX): never busy
    assert not _guard.busy()


@needs_kernels
@pytest.mark.parametrize("variant", ["plain", "maximize", "column-major grad"])
def test_the_adafac_kernels_parameter_update_counts_as_an_in_place_change(variant):
    """Every native path that writes the parameter (the in-place step, and the whole-tensor step the optimizer takes
    for maximize or a non-contiguous gradient) bumps its version, so autograd refuses a graph that saved the old
    values, as after an ATen step."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(60, 60) * 0.05)
    x = torch.randn(4, 60, requires_grad=True)
    opt = learned_optim.LearnedOptimizer([w], learned_optim.AdafacMLP(), maximize=variant == "maximize")
    loss = (x @ w).square().sum()  # saves w for the gradient of x
    loss.backward(retain_graph=True)
    if variant == "column-major grad":
        w.grad = w.grad.t().contiguous().t()
    before = w._version
    with kernels.forced():  # (the guard may hand this machine's step to ATen)
        opt.step()
    assert w._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@needs_kernels
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status: Linux")
def test_running_out_of_memory_inside_a_kernel_raises_instead_of_ending_the_process():
    """A failed C++ allocation in the adafac kernel (its scratch of a whole tensor, its row statistics) threw
    std::bad_alloc through ctypes and the process aborted (SIGABRT); it now raises MemoryError, which a training
    script can catch (to save a checkpoint). In a child process under an address-space limit."""
    code = textwrap.dedent("""
        import resource, torch, learned_optim
        from learned_optim import kernels
        torch.set_num_threads(1)
        n = 4_000_000
        p = torch.nn.Parameter(torch.zeros(n)); p.grad = torch.full((n,), 1e-3)
        opt = learned_optim.LearnedOptimizer([p], learned_optim.AdafacMLP())
        with kernels.forced():
            opt.step()
            size = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (size + 8 * 2**20, resource.RLIM_INFINITY))
            try:
                opt.step()
                print("stepped")
            except MemoryError as err:
                print("MemoryError:", err)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)  # (its cache)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "MemoryError: the native adafac_mlp kernel ran out of memory" in proc.stdout, proc.stdout


def test_a_build_removes_what_killed_builds_left_in_the_cache(tmp_path):
    """Temporary files older than STALE_TEMPORARY_SECONDS (a killed build's or write's) are removed; a recent one,
    which may be another process's build in progress, and the libraries themselves stay."""
    old, recent = tmp_path / ".learned_optim-abc.so.x1.tmp", tmp_path / ".learned_optim-abc.so.x2.tmp"
    legacy, library = tmp_path / "tmpq1w2e3.so", tmp_path / "learned_optim-abc.so"
    for path in (old, recent, legacy, library):
        path.write_bytes(b"x")
    stale = time.time() - _build.STALE_TEMPORARY_SECONDS - 60
    for path in (old, legacy, library):
        os.utime(path, (stale, stale))
    _build.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([recent.name, library.name])


@needs_kernels
def test_the_library_is_built_from_the_sources_as_imported(tmp_path, monkeypatch):
    """An edit of ``csrc/`` after import (a developer changing a kernel's signature while a long run goes on) changes
    nothing for a running process: its library is keyed and built from the sources it imported, the ones its
    bindings declare the signatures of, not from what the disk holds now."""
    _, library, _ = _build.build()
    edited = tmp_path / "csrc"
    edited.mkdir()
    (edited / "adafac.cpp").write_text("int lo_adafac_pack_step_f32(int changed_signature) { return 0; }\n")
    monkeypatch.setattr(_build, "SOURCE_DIR", edited)
    _, again, _ = _build.build()
    assert again == library and set(_build.SOURCES) >= {"adafac.cpp", "vec.h"}


@needs_kernels
@pytest.mark.parametrize(
    ("lr", "batch"), [(0.01, None), (torch.tensor(0.01), None), (torch.tensor([0.01]), None), (0.01, 40)], ids=str
)
def test_adafac_orthogonalising_in_place_step_equals_the_packed_and_aten_steps(lr, batch):
    """An orthogonalising net's ``step_in_place`` takes every plain float32 tensor: the kernel writes the steps into
    one buffer, the matrices ordered by shape (two of one shape orthogonalised together), then the orthogonalisation
    and the decoupled update; with ``in_place_step_coordinates`` 40, in four batches of at most 40 coordinates (a run
    of one shape split). Over three optimizer steps (a late tensor with its own step count, weight decay, a float or
    tensor lr) it equals the packed step (packs, kernel, orthogonalisation) and the ATen step to float rounding."""
    calls = []
    original_step = kernels.adafac_tensors_step
    moved = []
    for path in ("in-place", "packs", "aten"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2))
        late = nn.Parameter(torch.randn(5, 5))  # joins at the second step: a step count of its own
        params = [*model.parameters(), late]
        start = [p.detach().clone() for p in params]
        rule = _adafac_case((1,), newton_schulz_steps=5, step_magnitude="adam", time_scales=(10.0, 100.0))[0]
        if batch is not None:
            rule.in_place_step_coordinates = batch
        kind = PacksOnly if path == "packs" else LearnedOptimizer
        opt = kind(params, rule, lr=lr, weight_decay=0.1)
        left: list[list[torch.Tensor]] = []

        def spy(*args, left=left, original=rule.step_in_place):
            left.append(original(*args))
            return left[-1]

        rule.step_in_place = spy
        with (
            kernels.forced() if path != "aten" else kernels.enabled_as(False),
            pytest.MonkeyPatch.context() as patch,
        ):
            patch.setattr(
                kernels, "adafac_tensors_step", lambda shapes, *a: calls.append(shapes) or original_step(shapes, *a)
            )
            for i in range(3):
                opt.zero_grad()
                (model(torch.randn(4, 6)).square().mean() + (late.sum() if i > 0 else 0.0)).backward()
                opt.step()
        if path == "in-place":
            assert left == [[]] * 3  # every tensor taken, the last two steps with the late tensor's own count
            sizes = [sum(r * c for r, c in shapes) for shapes in calls[-4 if batch else -1 :]]
            assert sizes == ([12 + 10, 25, 25, 30] if batch else [102])  # the last step's calls (sorted by shape)
            assert int(opt.state[late]["step"]) == 2 and int(opt.state[params[0]]["step"]) == 3
        moved.append([p.detach() - p0 for p, p0 in zip(params, start, strict=True)])
    for in_place, packed, aten in zip(*moved, strict=True):
        torch.testing.assert_close(in_place, packed, rtol=1e-4, atol=1e-5 * float(packed.abs().max()))
        torch.testing.assert_close(in_place, aten, rtol=1e-4, atol=1e-5 * float(aten.abs().max()))
