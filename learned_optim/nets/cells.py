"""The LSTM cell shared by the recurrent update rules, written for coordinatewise batches.

:func:`lstm_cell` computes exactly what ``nn.LSTMCell`` computes, with the cell's own weights (so
state_dict keys and shapes are those of ``nn.LSTMCell``), arranged for speed on millions of rows:

* one fused gate GEMM, ``addmm(b_ih + b_hh, [x, h], [W_ih, W_hh]^T)``, instead of two GEMMs and an add;
* the rows of the cell-input gate ``g`` are scaled by 2 (exact in floating point), so a single
  ``sigmoid`` over all ``4H`` gate columns gives :math:`\\sigma(i), \\sigma(f), \\sigma(2g), \\sigma(o)`,
  and ``tanh`` is evaluated as :math:`\\tanh(u) = 2\\sigma(2u) - 1`. Mathematically identical; it
  differs from ``torch.tanh`` by at most a few float32 ulps of 1 (absolute), and on CPU it is ~6x
  faster than ATen's ``tanh`` kernel, which dominated the step;
* under ``no_grad`` (and outside ``torch.func`` transforms, forward AD and ``torch.compile``
  tracing) the new ``(h, c)`` are written straight into caller-provided output views, by the fused
  native kernel of :mod:`learned_optim.kernels` (float32 on CPU: GEMM, activations and state update in
  one pass over the rows; its ``exp`` differs from ATen's by about an ulp) or, where that does not
  apply, by ATen with the activations applied in place. That ATen branch performs the same
  floating-point operations in the same order as the out-of-place branch, so the two give
  bit-identical results (tested in ``tests/core/test_performance_paths.py``); the out-of-place branch is
  the differentiable one that meta-training, ``gradcheck`` and ``jvp`` go through.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from .. import kernels
from .._numerics import functorch_wrapped

__all__ = ["lstm_cell", "fused_gate_weights", "inplace_allowed"]


def inplace_allowed(*tensors: Tensor) -> bool:
    """Whether activations may be computed in place: nothing records a graph or a tangent.

    True only under ``no_grad``/``inference_mode`` with plain tensors: not inside ``torch.func``
    transforms (wrapped tensors), not while a forward-AD dual level is active, not while
    ``torch.compile`` traces (the compiled graph is functional; Inductor does its own fusion).
    """
    if torch.is_grad_enabled() or _forward_ad._current_level >= 0 or torch.compiler.is_compiling():
        return False
    return not any(functorch_wrapped(t) for t in tensors)


def _gate_scale(hidden_size: int, like: Tensor) -> Tensor:
    """``[1]*2H + [2]*H + [1]*H``: doubles the ``g`` gate rows (PyTorch's gate order is i, f, g, o)."""
    scale = torch.ones(4 * hidden_size, dtype=like.dtype, device=like.device)
    scale[2 * hidden_size : 3 * hidden_size] = 2.0
    return scale


def fused_gate_weights(weight_ih: Tensor, weight_hh: Tensor, bias_ih: Tensor, bias_hh: Tensor) -> tuple[Tensor, Tensor]:
    """``([W_ih, W_hh], b_ih + b_hh)`` with the ``g``-gate rows doubled: the one GEMM's weight and bias."""
    scale = _gate_scale(weight_hh.shape[1], weight_ih)
    return torch.cat([weight_ih, weight_hh], dim=1) * scale.unsqueeze(1), (bias_ih + bias_hh) * scale


def lstm_cell(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor,
    bias_hh: Tensor,
    *,
    out: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    r"""One step of an LSTM cell over a batch of rows, in ``nn.LSTMCell``'s parametrisation.

    .. math::
        [i, f, g, o] = W_{ih} x + b_{ih} + W_{hh} h + b_{hh},\quad
        c' = \sigma(f)\,c + \sigma(i)\tanh(g),\quad h' = \sigma(o)\tanh(c')

    Args:
        x: ``(n, I)`` inputs; h, c: ``(n, H)`` previous state (may be strided views).
        weight_ih, weight_hh, bias_ih, bias_hh: the cell's parameters (``(4H, I)``, ``(4H, H)``, ``(4H,)``).
        out: optional ``(h_out, c_out)`` ``(n, H)`` tensors (e.g. views into the new state) that receive
            the result when :func:`inplace_allowed`; otherwise ignored. They may be ``h, c`` themselves (each
            row is read before it is written) but must not otherwise overlap the inputs.

    Returns:
        ``(h', c')``, the ``out`` tensors when they were written.
    """
    weight, bias = fused_gate_weights(weight_ih, weight_hh, bias_ih, bias_hh)
    if not inplace_allowed(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh):
        gates = torch.sigmoid(torch.addmm(bias, torch.cat([x, h], dim=1), weight.t()))
        i, f, s, o = gates.chunk(4, dim=1)
        c_new = f * c + i * (s * 2 - 1)
        h_new = (torch.sigmoid(c_new * 2) * 2 - 1) * o
        return h_new, c_new
    h_out, c_out = (
        out
        if out is not None
        else (
            torch.empty_like(h, memory_format=torch.contiguous_format),
            torch.empty_like(c, memory_format=torch.contiguous_format),
        )
    )
    if kernels.lstm_cell_into(x, h, c, weight, bias, h_out, c_out):
        return h_out, c_out
    # Same operations, same order, in place (bit-identical to the branch above).
    gates = torch.addmm(bias, torch.cat([x, h], dim=1), weight.t()).sigmoid_()
    i, f, s, o = gates.chunk(4, dim=1)
    c_new = torch.mul(f, c, out=c_out)
    c_new.add_(i.mul_(s.mul_(2).sub_(1)))
    # sigmoid on a contiguous temporary: ATen vectorizes contiguous runs only, and its vector and scalar
    # sigmoid may differ by an ulp, so a strided output view would not be bit-identical.
    t = (c_new * 2).sigmoid_().mul_(2).sub_(1)
    return torch.mul(t, o, out=h_out), c_new
