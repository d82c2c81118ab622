"""The step's large intermediates on the CPU's ATen path live in buffers kept from step to step (``Scratch``).

The buffers are reused by name and never escape: a step the rule returns, or a new state it was not given storage
for, is a fresh tensor. The arithmetic is the out-of-place one bit for bit (``ema`` / ``rsqrt_features`` /
``bias_corrected`` / ``decoupled_update`` into buffers), and a second step of the ATen path allocates a few bytes
per coordinate instead of ~60 floats. No timing here (``benchmarks/suite_iteration_time.py --step-only``).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from learned_optim import LearnedOptimizer, kernels
from learned_optim._scratch import Scratch
from learned_optim.features import (
    bias_corrected,
    ema,
    newton_schulz_orthogonalize,
    rsqrt_features,
    takes_gram_route,
)
from learned_optim.functional import decoupled_update
from learned_optim.nets.base import Segments
from learned_optim.packing import align_rows


@pytest.fixture
def keep_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep buffers of any size (by default those under ``Scratch.min_kept_bytes`` are allocated anew)."""
    monkeypatch.setattr(Scratch, "min_kept_bytes", 0)


def test_small_buffers_are_allocated_anew():
    scratch, like = Scratch(), torch.zeros(1)
    small = Scratch.min_kept_bytes // 4 - 1
    with torch.no_grad():
        first = scratch.take("a", (small,), like)
        assert scratch.take("a", (small,), like).data_ptr() != first.data_ptr() and scratch.nbytes == 0
        large = scratch.take("a", (small + 1,), like)
        assert scratch.take("a", (small + 1,), like).data_ptr() == large.data_ptr()
        assert scratch.nbytes == Scratch.min_kept_bytes


@pytest.mark.usefixtures("keep_every_size")
def test_take_reuses_a_buffer_per_name_and_grows_it():
    scratch, like = Scratch(), torch.zeros(1)
    with torch.no_grad():
        a = scratch.take("a", (4, 8), like)
        assert a.shape == (4, 8) and a.is_contiguous() and a.dtype == torch.float32
        smaller = scratch.take("a", (3, 2), like)
        assert smaller.data_ptr() == a.data_ptr() and smaller.shape == (3, 2)
        assert scratch.take("b", (4, 8), like).data_ptr() != a.data_ptr()
        doubles = scratch.take("a", (4, 8), like, dtype=torch.float64)
        assert doubles.dtype == torch.float64 and doubles.data_ptr() != a.data_ptr()
        larger = scratch.take("a", (5, 8), like)
        assert larger.shape == (5, 8) and larger.data_ptr() != a.data_ptr()
        assert scratch.take("a", (4, 8), like).data_ptr() == larger.data_ptr()
        assert scratch.nbytes == (40 + 32) * 4 + 32 * 8
        scratch.clear()
        assert scratch.nbytes == 0


@pytest.mark.usefixtures("keep_every_size")
def test_take_keeps_at_most_its_byte_limit():
    scratch, like = Scratch(), torch.zeros(1)
    scratch.kept_bytes_limit = 1000
    with torch.no_grad():
        kept = scratch.take("a", (200,), like)
        assert scratch.take("a", (200,), like).data_ptr() == kept.data_ptr() and scratch.nbytes == 800
        over = scratch.take("b", (100,), like)
        assert over.shape == (100,) and scratch.nbytes == 800
        assert scratch.take("b", (100,), like).data_ptr() != over.data_ptr()
        assert scratch.take("a", (250,), like).shape == (250,) and scratch.nbytes == 1000  # grown, within the limit
        assert scratch.take("a", (300,), like).shape == (300,) and scratch.nbytes == 1000  # past it: the 250 kept


@pytest.mark.usefixtures("keep_every_size")
def test_take_keeps_nothing_under_autograd_and_copies_start_empty():
    scratch, like = Scratch(), torch.zeros(1)
    with torch.enable_grad():
        assert not Scratch.keeps(like)
        first, second = scratch.take("a", (16,), like), scratch.take("a", (16,), like)
        assert first.data_ptr() != second.data_ptr() and scratch.nbytes == 0
    with torch.no_grad():
        scratch.take("a", (1024,), like)
    assert scratch.nbytes == 4096
    assert copy.deepcopy(scratch).nbytes == 0 and pickle.loads(pickle.dumps(scratch)).nbytes == 0


@pytest.mark.usefixtures("keep_every_size")
def test_rules_own_a_scratch_that_copies_do_not_share(make_rule):
    rule = make_rule("adafac_mlp")
    with torch.no_grad():
        rule.scratch.take("a", (1024,), torch.zeros(1))
    assert isinstance(rule.scratch, Scratch) and copy.deepcopy(rule).scratch.nbytes == 0
    assert "scratch" not in "".join(rule.state_dict())
    assert rule.to(torch.float64) is rule and rule.scratch.nbytes == 0  # a conversion empties it


def test_the_buffered_arithmetic_is_the_out_of_place_one_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    m, g, v = torch.randn(3, 1000, generator=gen), torch.randn(1000, generator=gen), torch.rand(1000, generator=gen)
    beta = torch.tensor([[0.9], [0.99], [0.999]])
    with torch.no_grad():
        out, work = m.clone(), torch.empty(3, 1000)
        assert torch.equal(ema(out, g, beta, out=out, work=work), ema(m, g, beta))
        assert torch.equal(ema(v, g, 0.999, out=torch.empty(1000), work=work[0]), ema(v, g, 0.999))
        step = torch.tensor(7.0)
        assert torch.equal(bias_corrected(v, 0.999, step, out=torch.empty(1000)), bias_corrected(v, 0.999, step))
        rs = torch.empty(1, 1000)
        ratio, rsqrt = rsqrt_features(m, v.unsqueeze(0).clone(), 1e-8, out=(torch.empty(3, 1000), rs))
        expected = rsqrt_features(m, v.unsqueeze(0), 1e-8)
        assert rsqrt is rs and torch.equal(ratio, expected[0]) and torch.equal(rsqrt, expected[1])
        for lr in (3e-3, torch.tensor(3e-3)):
            theta, delta = v.clone(), g.clone()
            updated = decoupled_update(theta, delta, lr, 0.1, work=delta)
            assert updated is theta and torch.equal(theta, decoupled_update(v, g, lr, 0.1))


def _model() -> nn.Module:
    torch.manual_seed(0)
    # 250 x 300 (75k) is stepped alone, blocked; the others pack (the 60 x 300 one, 18k, is above the one-shot bound)
    return nn.Sequential(nn.Linear(300, 250), nn.Tanh(), nn.Linear(250, 60), nn.Tanh(), nn.Linear(60, 300))


def _large_allocations(fn) -> int:
    """Bytes of the allocations of at least ``Scratch.min_kept_bytes`` each (as ops' outputs) made by ``fn()``."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage >= Scratch.min_kept_bytes)


@pytest.mark.parametrize("use_kernels", [False, True], ids=["aten", "kernels"])
@pytest.mark.parametrize("orthogonal", [False, True], ids=["plain", "orthogonalising"])
def test_a_second_step_allocates_a_few_bytes_per_coordinate(make_rule, orthogonal, use_kernels):
    if use_kernels and not kernels.available():
        pytest.skip(f"native kernels unavailable: {kernels.build_error()}")
    model = _model()
    rule = make_rule("adafac_mlp", newton_schulz_steps=3 if orthogonal else 0)
    opt = LearnedOptimizer(model.parameters(), rule, lr=1e-3, weight_decay=0.1)
    coordinates = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    with kernels.forced() if use_kernels else kernels.enabled_as(False):
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(32, 300, generator=gen)).square().mean().backward()
            opt.step()
        allocated = _large_allocations(opt.step)
    packs, singles = opt._plan_packs(list(model.parameters()))
    assert packs and [tuple(p.shape) for p in singles] == [(250, 300)]
    # Out of place, the large ones (128 KiB and more) made 190 / 222 bytes per coordinate on ATen, 40 orthogonalising
    # with the kernels (its steps' buffer and the Newton-Schulz matrices); now one is left on ATen, the float64 copy
    # of a tensor's v row that its sum of squares takes (1.3 bytes per coordinate here)
    assert allocated < 2 * coordinates, f"{allocated / coordinates:.1f} bytes per coordinate"
    assert orthogonal == any(name.startswith("newton_schulz.") for name, *_ in rule.scratch._buffers)


@pytest.mark.usefixtures("keep_every_size")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16, 9), (1, 9, 16), (2, 64, 32), (1, 32, 512), (3, 200, 96)])
def test_newton_schulz_in_a_scratch_is_bit_identical(shape, dtype):
    scratch = Scratch()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(shape, generator=gen)
            expected = newton_schulz_orthogonalize(x, 3, dtype=dtype)
            got = newton_schulz_orthogonalize(x, 3, dtype=dtype, scratch=scratch)
            assert torch.equal(got, expected) and got.stride() == expected.stride()
    assert scratch.nbytes > 0
    # the Gram route (float32, wide enough) and the direct one both ran through the scratch
    assert takes_gram_route(torch.empty(1, 32, 512), 3) and not takes_gram_route(torch.empty(1, 16, 9), 3)


@pytest.mark.usefixtures("keep_every_size")
def test_take_like_lays_out_as_an_elementwise_result():
    # a transposed matrix reshaped: its size-1 batch dimension has the stride view() gives it, which an elementwise
    # op keeps, and by which a BLAS product of it may round differently (seen on a 1536 x 256 step in bfloat16)
    y = torch.randn(1, 1536, 256).mT.reshape(1, 256, 1536)
    with torch.no_grad():
        kept = Scratch().take_like("a", y, torch.bfloat16)
    assert kept.shape == y.shape and kept.dtype == torch.bfloat16
    assert kept.stride() == y.to(torch.bfloat16).stride() == (y / 2).stride() != y.contiguous().stride()


def _packed_call(rule, update=None, out_state=None):
    shapes = [(40, 30), (30,), (20, 10)]
    sizes = tuple(torch.Size(s).numel() for s in shapes)
    rows = align_rows(sum(sizes))
    gen = torch.Generator().manual_seed(1)
    grad, param = torch.randn(rows, generator=gen), torch.randn(rows, generator=gen)
    state = {k: torch.zeros(rows, *shape) for k, shape in rule.state_shapes().items()}
    for k in rule.tensor_state_shapes(shapes[0]):
        state[k] = torch.cat([torch.zeros(rule.tensor_state_shapes(s)[k]) for s in shapes])
    step = torch.tensor(3.0)
    segments = Segments(sizes, rows, grad.device)
    out = state if out_state == "state" else None
    with torch.no_grad():
        delta, new = rule(
            grad, param, state, step, None, out_state=out, segments=segments, shapes=shapes, update=update
        )
    return delta, new, param, sum(sizes)


def test_the_one_shot_bound_is_lowered_on_the_cpu_only(make_rule):
    rule = make_rule("adafac_mlp")
    assert rule.one_shot_bound(torch.device("cpu")) == rule.one_shot_coordinates == 1 << 14
    assert rule.one_shot_bound(torch.device("cuda")) == rule.accelerator_coordinate_block


@pytest.mark.usefixtures("keep_every_size")
@pytest.mark.parametrize("path", ["packed", "blocked"])
def test_what_the_aten_step_returns_is_its_own_not_a_kept_buffer(make_rule, path):
    rule = make_rule("adafac_mlp")
    with kernels.enabled_as(False):
        if path == "packed":
            first, first_state, *_ = _packed_call(rule)
            kept = {k: t.clone() for k, t in first_state.items()}
            before = first.clone()
            _packed_call(rule)
        else:
            rule.one_shot_coordinates = 0  # this tensor on the blocked path
            n, gen = 600, torch.Generator().manual_seed(2)
            state = rule.init_state(n, shape=(20, 30))
            with torch.no_grad():
                first, first_state = rule(
                    torch.randn(n, generator=gen), torch.randn(n), state, torch.tensor(2.0), None, shape=(20, 30)
                )
                kept = {k: t.clone() for k, t in first_state.items()}
                before = first.clone()
                rule(torch.randn(n, generator=gen), torch.randn(n), state, torch.tensor(3.0), None, shape=(20, 30))
    assert rule.scratch.nbytes > 0
    assert torch.equal(first, before)
    for k, t in first_state.items():
        assert torch.equal(t, kept[k]), k


def test_the_packed_aten_step_applies_the_update_as_the_optimizer_would(make_rule):
    rule = make_rule("adafac_mlp")
    with kernels.enabled_as(False):
        delta, expected_state, param, total = _packed_call(rule)
        expected = decoupled_update(param[:total], delta[:total], 1e-2, 0.1)
        applied, new_state, param, _ = _packed_call(rule, update=(torch.tensor(1e-2), 0.1), out_state="state")
    assert applied is None
    assert torch.equal(param[:total], expected)
    for k, t in expected_state.items():
        assert torch.equal(new_state[k], t), k
