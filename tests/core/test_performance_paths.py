"""The fast paths of the update rules compute what the plain definitions compute.

* :func:`learned_optim.nets.cells.lstm_cell` (fused gate GEMM, ``tanh`` via ``sigmoid``) equals
  ``nn.LSTMCell`` with the same weights (to float rounding);
* its ATen in-place branch (taken under ``no_grad`` when the native kernel does not apply) is
  bit-identical to the differentiable branch (taken by meta-training), and the branch choice follows the autograd
  context;
* the differentiable path still supports ``torch.func`` (``jvp`` of ``grad``, ``vmap``);
* the optimizer's ``compile=True`` path (``torch.compile`` of the same ``forward``) matches eager;
* ``state_dtype`` for the recurrent state (bf16 option) halves its memory and stays close to fp32.

No timing here: speed is measured by ``benchmarks/`` (ratios in one run), never asserted in tests.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

import learned_optim
from learned_optim import LearnedOptimizer, functional_update, kernels
from learned_optim.nets.cells import inplace_allowed, lstm_cell

RECURRENT = ["dm_lstm", "rnnprop"]


def _inputs(rule, n: int, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    grad_ = (torch.randn(n, generator=gen, dtype=dtype) * 10 ** torch.randint(-6, 1, (n,), generator=gen)).to(dtype)
    param = torch.randn(n, generator=gen, dtype=dtype)
    shapes = {k: (n, *s) for k, s in rule.state_shapes().items()} | rule.tensor_state_shapes((n,))
    state = {k: 0.5 * torch.randn(s, generator=gen, dtype=dtype) for k, s in shapes.items()}
    for k in ("v", "row", "col"):  # second moments are non-negative
        if k in state:
            state[k] = state[k].abs()
    return grad_, param, state, torch.tensor(4.0, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lstm_cell_equals_nn_lstmcell(dtype):
    torch.manual_seed(0)
    cell = nn.LSTMCell(7, 5).to(dtype)
    x, h, c = (torch.randn(300, k, dtype=dtype) * 2 for k in (7, 5, 5))
    with torch.no_grad():
        h_ref, c_ref = cell(x, (h, c))
        for grad_mode in (False, True):
            with torch.set_grad_enabled(grad_mode):
                h_new, c_new = lstm_cell(x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
            tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(h_new, h_ref, **tol)
            torch.testing.assert_close(c_new, c_ref, **tol)


def test_inplace_allowed_follows_the_autograd_context():
    t = torch.ones(3)
    assert not inplace_allowed(t)
    with torch.no_grad():
        assert inplace_allowed(t)
        seen = []
        jvp(lambda x: seen.append(inplace_allowed(x)) or x, (t,), (t,))
        vmap(lambda x: seen.append(inplace_allowed(x)) or x)(t.view(3, 1))
        with torch.autograd.forward_ad.dual_level():
            seen.append(inplace_allowed(t))
        assert seen == [False, False, False]


@pytest.mark.parametrize("family", RECURRENT)
def test_inplace_branch_is_bit_identical_to_the_differentiable_one(family, make_rule):
    """The ATen in-place branch (native kernels off; their own tests are in test_kernels.py)."""
    rule = make_rule(family)
    grad_, param, state, step = _inputs(rule, 333)
    with torch.no_grad(), kernels.enabled_as(False):
        fast = rule(grad_, param, state, step)
    slow = rule(grad_, param, state, step)
    assert torch.equal(fast[0], slow[0])
    for k in state:
        assert torch.equal(fast[1][k], slow[1][k]), k
    # the inputs are not modified by the in-place branch
    again = _inputs(rule, 333)
    assert all(torch.equal(state[k], again[2][k]) for k in state)


@pytest.mark.parametrize("family", RECURRENT)
def test_forward_mode_hvp_through_functional_update(family, make_rule):
    """``jvp(grad(f))`` (the Hessian-vector product of meta-training) works and matches double backward."""
    rule = make_rule(family, hidden_size=4).double()
    names = [n for n, _ in rule.named_parameters()]
    weights = {n: w.detach().clone() for n, w in rule.named_parameters()}
    grad_, param, state, step = _inputs(rule, 17, dtype=torch.float64)

    def loss(w):
        delta, new_state = functional_update(rule, w, grad_, param, state, step)
        return (param + delta).square().sum() + sum(v.square().sum() for v in new_state.values())

    tangent = {n: torch.randn_like(w) for n, w in weights.items()}
    _, hvp = jvp(grad(loss), (weights,), (tangent,))
    w = {n: v.clone().requires_grad_(True) for n, v in weights.items()}
    g = torch.autograd.grad(loss(w), list(w.values()), create_graph=True)
    dot = sum((gi * tangent[n]).sum() for gi, n in zip(g, names, strict=True))
    reference = torch.autograd.grad(dot, list(w.values()))
    for n, r in zip(names, reference, strict=True):
        torch.testing.assert_close(hvp[n], r, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("family", sorted(learned_optim.FAMILIES))
def test_vmap_over_task_instances_equals_a_loop(family, make_rule):
    """Batched meta-training (``vmap`` over stacked states of several task instances) = one at a time."""
    rule = make_rule(family)
    weights = {n: w.detach() for n, w in rule.named_parameters()}
    batches = [_inputs(rule, 64, seed=s) for s in range(3)]
    stacked = [torch.stack([b[i] for b in batches]) for i in (0, 1)]
    stacked_state = {k: torch.stack([b[2][k] for b in batches]) for k in batches[0][2]}

    def one(g, p, s):
        return functional_update(rule, weights, g, p, s, torch.tensor(4.0))

    delta, new_state = vmap(one)(stacked[0], stacked[1], stacked_state)
    for i, (g, p, s, step) in enumerate(batches):
        ref_delta, ref_state = functional_update(rule, weights, g, p, s, step)
        torch.testing.assert_close(delta[i], ref_delta, rtol=1e-5, atol=1e-7)
        for k in ref_state:
            torch.testing.assert_close(new_state[k][i], ref_state[k], rtol=1e-5, atol=1e-7)


def test_functional_call_still_substitutes_the_cell_weights(make_rule):
    rule = make_rule("dm_lstm")
    grad_, param, state, step = _inputs(rule, 50)
    weights = {n: w.detach() * 1.3 for n, w in rule.named_parameters()}
    moved = functional_call(rule, weights, (grad_, param, state, step))
    own = rule(grad_, param, state, step)
    assert not torch.equal(moved[0], own[0])
    rule.load_state_dict(weights)
    torch.testing.assert_close(rule(grad_, param, state, step)[0], moved[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ torch.compile path


def _compile_available() -> bool:
    import shutil

    return shutil.which("g++") is not None or shutil.which("c++") is not None or torch.cuda.is_available()


@pytest.mark.skipif(not _compile_available(), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_step_matches_eager_and_is_chunk_invariant(make_rule):
    """``compile=True`` runs the same forward: close to eager, and bit-identical across chunk sizes.

    One family (RNNProp: moments, Linear+ELU, the LSTM cell, tanh head) with a small net to keep the
    compilation short; the benchmark exercises every family compiled at scale.
    """
    shapes = [(300,), (7, 9), (5,)]

    def run(compile_, chunk_size):
        gen = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = LearnedOptimizer(
            params, make_rule("rnnprop", hidden_size=6), compile=compile_, chunk_size=chunk_size, weight_decay=0.01
        )
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 0.1
            opt.step()
        return opt, [p.detach().clone() for p in params], [opt.state[p]["lstm"].clone() for p in params]

    _, eager, eager_state = run(False, 128)
    opt, compiled, compiled_state = run(True, 128)
    _, unchunked, unchunked_state = run(True, None)
    for a, b, c in zip(eager, compiled, unchunked, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        assert torch.equal(b, c)
    for a, b, c in zip(eager_state, compiled_state, unchunked_state, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        assert torch.equal(b, c)
    # the compiled wrapper is not pickled: copies keep the option and compile again lazily
    clone = copy.deepcopy(opt)
    assert clone.compile is True and clone._compiled_rule is None


# ------------------------------------------------------------------------------------------ bf16 RNN state


@pytest.mark.parametrize("family", RECURRENT)
def test_bf16_recurrent_state_option(family, make_rule):
    """``state_dtype={"lstm": torch.bfloat16}``: half the recurrent state's bytes, moments stay float32,
    the dtype survives a state_dict round trip, and the trajectory stays close to the float32 one."""

    def run(state_dtype, steps=5):
        gen = torch.Generator().manual_seed(0)
        p = nn.Parameter(torch.randn(500, generator=gen))
        opt = LearnedOptimizer([p], make_rule(family), state_dtype=state_dtype)
        for _ in range(steps):
            p.grad = torch.randn(500, generator=gen) * 0.1
            opt.step()
        return p, opt

    p32, opt32 = run(torch.float32)
    p16, opt16 = run({"lstm": torch.bfloat16})
    s32, s16 = opt32.state[p32], opt16.state[p16]
    assert s16["lstm"].dtype == torch.bfloat16
    assert s16["lstm"].nbytes * 2 == s32["lstm"].nbytes
    assert all(s16[k].dtype == torch.float32 for k in s16 if k != "lstm")
    moved = (p32.detach() - run(torch.float32, steps=0)[0].detach()).abs().max()
    assert (p16 - p32).abs().max() < 0.05 * moved  # bf16 rounding of h, c: a small perturbation
    clone = LearnedOptimizer([p16], make_rule(family), state_dtype={"lstm": torch.bfloat16})
    clone.load_state_dict(opt16.state_dict())
    assert clone.state[p16]["lstm"].dtype == torch.bfloat16 and torch.equal(clone.state[p16]["lstm"], s16["lstm"])
    with pytest.raises(ValueError, match="keeps"):
        LearnedOptimizer([p16], make_rule(family), state_dtype={"hidden": torch.bfloat16})


# ------------------------------------------------------------------------------------------ shipped weights


@pytest.mark.parametrize("name", [e["name"] for e in learned_optim.list_pretrained()])
def test_pretrained_fast_path_matches_the_functional_path(name):
    """A zoo entry's update from the optimizer (chunked, in-place, no_grad) equals the meta-training
    path (``functional_update`` over the whole tensor, differentiable) to float rounding (~1e-6 relative)."""
    rule, _ = learned_optim.load_rule(name)
    gen = torch.Generator().manual_seed(0)
    n = 3000  # not a multiple of the chunk or of the row alignment: padded chunks are exercised
    p = nn.Parameter(torch.randn(n, generator=gen))
    opt = LearnedOptimizer([p], rule, chunk_size=1024)
    state = rule.init_state(n)
    for t in range(1, 4):
        g = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-6, 0, (n,), generator=gen)
        weights = {k: w.detach().clone().requires_grad_(True) for k, w in rule.named_parameters()}
        delta, state = functional_update(rule, weights, g, p.detach().clone(), state, torch.tensor(float(t)))
        before = p.detach().clone()
        p.grad = g
        opt.step()
        lr = opt.param_groups[0]["lr"]  # the checkpoint's default: 1.0, or a real learning rate (adafac-mlp)
        scale = float(delta.abs().max()) * lr
        torch.testing.assert_close(p.detach(), before + lr * delta.detach(), rtol=1e-6, atol=2e-6 * scale)
        for k, v in state.items():
            torch.testing.assert_close(opt.state[p][k], v.detach(), rtol=1e-5, atol=1e-6)
        state = {k: v.detach() for k, v in state.items()}


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "aten"])
@pytest.mark.parametrize("family", sorted(learned_optim.FAMILIES))
def test_state_written_in_place_equals_the_returned_state(family, use_kernels, make_rule):
    """The optimizer lets rules write the new state into its storage (``out_state``, aliasing ``state``);
    the step is bit-identical to the rule's out-of-place calls on copies, padded last chunk included."""
    rule = make_rule(family)
    if rule.whole_tensor:
        pytest.skip("a whole-tensor rule is called once per tensor, never on chunks or padded rows")
    n, chunk = 3 * 128 + 5, 128  # two full chunks and a padded one
    grad_, param, state, step = _inputs(rule, n)
    p = nn.Parameter(param.clone())
    p.grad = grad_.clone()
    opt = LearnedOptimizer([p], rule, chunk_size=chunk)
    opt.state[p].update({"step": step - 1, **{k: v.clone() for k, v in state.items()}})
    with kernels.forced() if use_kernels else kernels.enabled_as(False):  # forced: whatever the guard says
        opt.step()
        with torch.no_grad():
            stats = rule.tensor_stats(grad_, param, state, step)
            deltas, new_states = [], {}
            for start in range(0, n, chunk):
                s = slice(start, min(start + chunk, n))
                rows = s.stop - start
                pad = (-rows) % 64

                def padded(t, s=s, pad=pad):
                    return torch.cat([t[s], t.new_zeros((pad, *t.shape[1:]))])

                d, new = rule(padded(grad_), padded(param), {k: padded(v) for k, v in state.items()}, step, stats)
                deltas.append(d[:rows])
                for k, v in new.items():
                    new_states.setdefault(k, []).append(v[:rows])
    assert torch.equal(p.detach(), param + 1.0 * torch.cat(deltas))  # lr = 1 (the default)
    for k, parts in new_states.items():
        assert torch.equal(opt.state[p][k], torch.cat(parts)), k
