"""Input features shared by the optimizer nets.

Every function here is pure, elementwise over coordinates (or a reduction over one tensor) and
differentiable, so the same code serves the in-place optimizer step and the functional unrolls of
meta-training. Nets import these; no net defines its own copy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from ._numerics import functorch_wrapped
from ._scratch import Scratch

_Sums = TypeVar("_Sums", bound=Tensor | tuple[Tensor, ...])

__all__ = [
    "log_and_sign",
    "ema",
    "bias_corrected",
    "adam_ratio_features",
    "rsqrt_features",
    "time_features",
    "blocked_mean_square",
    "rms_normalize",
    "newton_schulz_orthogonalize",
    "matrix_view",
    "factored_moments",
    "factored_means",
    "checked_factored_means",
    "checked_sums",
    "overflowed",
    "wide_sums",
    "wide_sums_directly",
    "factored_preconditioner",
    "FactoredPackLayout",
    "factored_pack_layout",
    "PackRun",
    "STATS_BLOCK",
]

#: Block length of per-tensor reductions. Reductions are always summed block by block with this
#: length, so a statistic is bit-identical whatever chunk size the runtime applies the net with.
STATS_BLOCK = 1 << 16


def log_and_sign(grad: Tensor, k: float = 5.0, eps: float = 1e-20) -> Tensor:
    r"""Andrychowicz et al. (2016) gradient preprocessing, two features per coordinate.

    .. math::
        \Big[\max\big(\tfrac{\log(|g| + \epsilon)}{k}, -1\big),\;
        \operatorname{clip}(g\,e^{k}, -1, 1)\Big]

    Returns a tensor of shape ``grad.shape + (2,)``.
    """
    magnitude = torch.clamp(torch.log(grad.abs() + eps) / k, min=-1.0)
    sign = torch.clamp(grad * math.exp(k), -1.0, 1.0)
    return torch.stack([magnitude, sign], dim=-1)


def ema(
    average: Tensor, value: Tensor, decay: float | Tensor, out: Tensor | None = None, work: Tensor | None = None
) -> Tensor:
    r"""Exponential moving average :math:`a \leftarrow \beta a + (1-\beta) x`: out of place, or into ``out`` (no
    autograd; ``out`` may be ``average`` itself). With ``work`` (a buffer of the broadcast shape, for
    :math:`(1-\beta) x`) the same arithmetic as out of place, bit for bit; without, no transient of the broadcast
    shape (one multiply-add)."""
    if out is None:
        return average * decay + value * (1.0 - decay)
    torch.mul(average, decay, out=out)
    if work is not None:
        return out.add_(torch.mul(value, 1.0 - decay, out=work))
    return out.addcmul_(value, 1.0 - decay) if isinstance(decay, Tensor) else out.add_(value, alpha=1.0 - decay)


def bias_corrected(average: Tensor, decay: float, step: Tensor, out: Tensor | None = None) -> Tensor:
    r"""Adam's bias correction :math:`\hat a = a / (1 - \beta^t)` for step count ``t >= 1`` (into ``out`` if given)."""
    correction = 1.0 - decay**step
    return average / correction if out is None else torch.div(average, correction, out=out)


def adam_ratio_features(m_hat: Tensor, v_hat: Tensor, grad: Tensor, eps: float = 1e-8) -> Tensor:
    r"""RNNProp inputs :math:`[\hat m/(\sqrt{\hat v}+\epsilon),\; g/(\sqrt{\hat v}+\epsilon)]`."""
    denom = v_hat.sqrt() + eps
    return torch.stack([m_hat / denom, grad / denom], dim=-1)


def rsqrt_features(
    m: Tensor, v: Tensor, eps: float = 1e-6, out: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    r"""Metz et al. (2019) moment features :math:`m/\sqrt{v+\epsilon}` and :math:`1/\sqrt{v+\epsilon}`; ``out``: the
    two buffers to write them into (no autograd; the second may be ``v`` itself), the same arithmetic."""
    if out is None:
        rs = torch.rsqrt(v + eps)
        return m * rs, rs
    ratio, rs = out
    torch.add(v, eps, out=rs).rsqrt_()
    return torch.mul(m, rs, out=ratio), rs


def time_features(step: Tensor, scales: Sequence[float]) -> Tensor:
    r"""Training-time features :math:`\tanh(t/s - 1)` for each timescale ``s``: shape ``(len(scales),)`` for one
    step count ``step`` (0-d), ``(*step.shape, len(scales))`` for several."""
    s = torch.as_tensor(scales, dtype=torch.float32, device=step.device)
    return torch.tanh(step.to(torch.float32).unsqueeze(-1) / s - 1.0)


def blocked_mean_square(features_of: Callable[[slice], Tensor], numel: int) -> Tensor:
    r"""Mean of squares over coordinates, :math:`\frac1n\sum_i x_i^2`, of features made block by block.

    ``features_of(slice)`` returns the features of the coordinates in the slice feature-major, shape
    ``(F, block)`` (each feature a contiguous row, so the sum is a fast inner-dimension reduction); the
    result has shape ``(F,)``. Blocks are always :data:`STATS_BLOCK` long, so the statistic is
    bit-identical however callers chunk the tensor, and transient memory is bounded by one block.
    """
    total = None
    for start in range(0, numel, STATS_BLOCK):
        part = features_of(slice(start, min(start + STATS_BLOCK, numel))).square().sum(dim=1)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("cannot take statistics of an empty tensor")
    return total / numel


def rms_normalize(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    r"""Divide by the root mean square along ``dim``: :math:`x / \sqrt{\overline{x^2} + \epsilon}`."""
    return x * torch.rsqrt(x.square().mean(dim=dim, keepdim=True) + eps)


#: Coefficients :math:`(a, b, c)` of the quintic Newton–Schulz iteration of Muon (K. Jordan, 2024), chosen for
#: the steepest slope at 0: a few steps take every singular value to roughly [0.7, 1.2], not exactly to 1.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

#: :func:`newton_schulz_orthogonalize` iterates on the Gram matrix for at most this many steps: there the rounding
#: noise in the matrix's null space (a low-rank gradient's, e.g. from a batch smaller than the matrix) grows by
#: :math:`a^2 \approx 12` per step instead of the direct iteration's :math:`a \approx 3.4` (then damped by the
#: polynomial): ~1e-4 of the result after 3 steps, far inside bfloat16's 1e-2, but 1e17 after 10.
GRAM_MAX_STEPS = 3

#: ... and only where it saves at least this many multiply-adds, :math:`(k - 1)\, B\, r^2 (2c - 3r)` for ``B``
#: matrices :math:`r \times c` and ``k`` steps: its ~9 more ops cost more than the products save on small
#: matrices (3 steps, one thread, AMD EPYC with AVX-512: 10 x 96 1.5x the direct iteration's time, 64 x 128 1.05x,
#: 32 x 256 0.99x, 4 of 32 x 128 0.86x, 64 x 512 0.59x;
#: ``benchmarks/results/small_model_step_session43_amd_avx512.md``).
GRAM_MIN_SAVED_MULTIPLY_ADDS = 1_000_000


def newton_schulz_orthogonalize(
    x: Tensor, steps: int, eps: float = 1e-7, dtype: torch.dtype | None = None, scratch: Scratch | None = None
) -> Tensor:
    r"""An approximate orthogonal polar factor :math:`U V^\top` of each matrix in ``x`` (``(..., rows, cols)``;
    :math:`x = U \Sigma V^\top`): ``steps`` quintic Newton–Schulz iterations from :math:`X_0 = x / (\lVert x
    \rVert_F + \epsilon)`,

    .. math:: A = X_k X_k^\top,\quad X_{k+1} = a X_k + (b A + c A^2) X_k

    on the wide orientation (the transpose of a tall matrix, so :math:`A` is the smaller Gram matrix), with
    :data:`NEWTON_SCHULZ_COEFFICIENTS`. Each step maps every singular value :math:`\sigma \mapsto a\sigma +
    b\sigma^3 + c\sigma^5` and keeps the singular vectors: the result is :math:`U f(\Sigma) V^\top` with
    :math:`f(\Sigma)` near the identity. Invariant to a positive scale of ``x``; differentiable (matrix products
    only). A step is three products, the last two fused with their sums (``baddbmm``). The products run in
    ``dtype`` (``x``'s when ``None``; ``torch.bfloat16`` as Muon runs them, several times faster where the hardware
    has bfloat16 units, relative error ~1e-2 against ~1e-5 in float32); the result is in ``x``'s dtype. In float32
    (where float32 products run in full precision: not TF32 or bfloat16 inside, see
    :func:`torch.set_float32_matmul_precision`), for at most :data:`GRAM_MAX_STEPS` steps on a matrix at least twice
    as wide as high, the same polynomial runs on the Gram matrix instead, with fewer FLOPs
    (:func:`_newton_schulz_on_gram`), where that saves at least :data:`GRAM_MIN_SAVED_MULTIPLY_ADDS`. With
    ``scratch`` the matrices are its kept buffers where it keeps them (:meth:`Scratch.keeps`), the same arithmetic
    bit for bit: the result may be one of them, valid until the next call with that scratch."""

    def keeps(shape: Sequence[int], of: torch.dtype) -> bool:
        return scratch is not None and Scratch.keeps(x, math.prod(shape) * of.itemsize)

    def buffer(name: str, shape: tuple[int, ...], of: torch.dtype) -> Tensor | None:
        """An ``out=`` buffer of the scratch, or ``None`` (a new tensor)."""
        return scratch.take(f"newton_schulz.{name}", shape, x, of) if scratch and keeps(shape, of) else None

    def laid_out_as(name: str, like: Tensor, of: torch.dtype) -> Tensor | None:
        """An ``out=`` buffer for an elementwise op on ``like`` (a transposed matrix's layout), or ``None``."""
        return scratch.take_like(f"newton_schulz.{name}", like, of) if scratch and keeps(like.shape, of) else None

    tall = x.shape[-2] > x.shape[-1]
    y = x.mT if tall else x
    lead, (rows, cols) = y.shape[:-2], y.shape[-2:]
    shape, products = (math.prod(lead), rows, cols), dtype or x.dtype
    y = y.reshape(shape)
    y = torch.div(y, torch.linalg.matrix_norm(y, keepdim=True) + eps, out=laid_out_as("input", y, x.dtype))
    y = _converted(y, products, laid_out_as("products_input", y, products))
    iterate = _newton_schulz_on_gram if takes_gram_route(y, steps) else _newton_schulz_direct
    y = _converted(iterate(y, steps, buffer), x.dtype, buffer("polar", shape, x.dtype)).reshape(*lead, rows, cols)
    return y.mT if tall else y


#: An ``out=`` buffer by name, shape and dtype, or ``None`` for a new tensor (:func:`newton_schulz_orthogonalize`).
_Buffers = Callable[[str, tuple[int, ...], torch.dtype], "Tensor | None"]


def _no_buffers(name: str, shape: tuple[int, ...], of: torch.dtype) -> None:
    return None


def _converted(x: Tensor, dtype: torch.dtype, out: Tensor | None) -> Tensor:
    """``x`` in ``dtype`` (itself if it is; else into ``out`` when given)."""
    if x.dtype == dtype:
        return x
    return x.to(dtype) if out is None else out.copy_(x)


def takes_gram_route(y: Tensor, steps: int) -> bool:
    """Whether :func:`newton_schulz_orthogonalize` iterates the wide matrices ``y`` (``(B, r, c)``, :math:`r \\le c`,
    in the products' dtype) on their Gram matrices (:func:`_newton_schulz_on_gram`): float32 in full precision, at
    most :data:`GRAM_MAX_STEPS` steps, :math:`c \\ge 2r`, and at least :data:`GRAM_MIN_SAVED_MULTIPLY_ADDS` saved."""
    batch, rows, cols = y.shape
    return (
        2 <= steps <= GRAM_MAX_STEPS
        and cols >= 2 * rows
        and (steps - 1) * batch * rows * rows * (2 * cols - 3 * rows) >= GRAM_MIN_SAVED_MULTIPLY_ADDS
        and y.dtype == torch.float32
        and _full_float32_products(y.device)
    )


def _newton_schulz_direct(y: Tensor, steps: int, buffer: _Buffers = _no_buffers) -> Tensor:
    """:func:`newton_schulz_orthogonalize`'s iteration of the wide matrices ``y`` (``(B, r, c)``) as written: three
    products a step, the last two fused with their sums (``buffer``: where each goes)."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    count, rows, _ = y.shape
    square = (count, rows, rows)
    for k in range(steps):
        gram = torch.bmm(y, y.mT, out=buffer("gram", square, y.dtype))
        inner = torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=buffer("inner", square, y.dtype))
        y = torch.baddbmm(y, inner, y, beta=a, out=buffer(f"iterate{k % 2}", tuple(y.shape), y.dtype))
    return y


def _full_float32_products(device: torch.device) -> bool:
    """Whether float32 matrix products on ``device`` surely run in full float32: not in TF32 or bfloat16 inside
    (:func:`torch.set_float32_matmul_precision` below ``"highest"``, CUDA's ``allow_tf32``; where the per-backend
    ``fp32_precision`` settings are in use, whose mix with the legacy ones torch refuses to read, ``False``)."""
    try:
        if torch.get_float32_matmul_precision() != "highest":
            return False
        return device.type != "cuda" or not torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:  # "mix of the legacy and new APIs"
        return False


def _newton_schulz_on_gram(y: Tensor, steps: int, buffer: _Buffers = _no_buffers) -> Tensor:
    r""":func:`newton_schulz_orthogonalize`'s iteration of the wide matrices ``y`` (``(B, r, c)``, :math:`r \le c`)
    through their Gram matrices. Each step's factor :math:`Q_k = a I + b A_k + c A_k^2` is a polynomial in
    :math:`A_0 = X_0 X_0^\top`, so the factors commute and

    .. math:: X_k = P_k X_0,\quad P_k = Q_{k-1} \cdots Q_0,\quad A_{k+1} = Q_k A_k Q_k^\top = Q_k (Q_k A_k):

    :math:`(4k - 3)\,r^3 + 2\,r^2 c` multiply-adds for :math:`k` steps against :math:`k (r^3 + 2 r^2 c)`, fewer
    from :math:`c > 1.5\,r` on. The same map up to rounding, but its rounding noise grows faster (relative to
    :math:`A`'s largest eigenvalue, and by :math:`a^2` a step in the null space), so it is used with full float32
    products and for at most :data:`GRAM_MAX_STEPS` steps only (in bfloat16 its error was 2-5x the direct
    iteration's). ``buffer``: where each matrix goes."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    count, rows, _ = y.shape
    square = (count, rows, rows)
    gram = torch.bmm(y, y.mT, out=buffer("gram0", square, y.dtype))
    identity = torch.eye(rows, dtype=gram.dtype, device=gram.device)
    product = None
    for k in range(steps):  # (each in a buffer the next step does not read)
        factor = torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=buffer(f"factor{k % 2}", square, y.dtype))
        factor.add_(a * identity)  # (baddbmm's backward does not read its result)
        if product is None:
            product = factor
        else:
            product = torch.bmm(factor, product, out=buffer(f"product{k % 2}", square, y.dtype))
        if k < steps - 1:
            half = torch.bmm(factor, gram, out=buffer("half", square, y.dtype))
            gram = torch.bmm(factor, half, out=buffer(f"gram{(k + 1) % 2}", square, y.dtype))
    assert product is not None
    return torch.bmm(product, y, out=buffer("iterate0", tuple(y.shape), y.dtype))


def matrix_view(shape: Sequence[int]) -> tuple[int, int]:
    r"""The 2-D view ``(rows, cols)`` that factored statistics use for a tensor of ``shape``.

    ``(shape[0], prod(shape[1:]))`` for two or more dimensions (a ``Linear`` weight ``(out, in)`` as is;
    a conv weight ``(out, in, kh, kw)`` as ``(out, in*kh*kw)``: rows are output units, columns fan-in);
    ``(numel, 1)`` for a vector or scalar. With one column the factored statistics reduce to the full
    per-coordinate second moment (see :func:`factored_preconditioner`).
    """
    sizes = [int(s) for s in shape]  # a list, not a generator: torch.compile traces this
    if len(sizes) >= 2:
        return sizes[0], math.prod(sizes[1:])
    return math.prod(sizes), 1


def factored_moments(grad_sq: Tensor, row: Tensor, col: Tensor, decays: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    r"""Adafactor's factored second moments, one EMA per decay :math:`\beta_k`.

    With :math:`G = g^2 + \epsilon` viewed as ``(rows, cols)`` (``grad_sq`` is :math:`g^2` in that shape):

    .. math::
        r_{ik} \leftarrow \beta_k r_{ik} + (1-\beta_k)\,\tfrac{1}{C}\textstyle\sum_j G_{ij},\qquad
        c_{jk} \leftarrow \beta_k c_{jk} + (1-\beta_k)\,\tfrac{1}{R}\textstyle\sum_i G_{ij}

    ``row``: ``(rows, K)``, ``col``: ``(cols, K)``, ``decays``: ``(K,)``. Returns the new ``(row, col)``.
    """
    row_mean, col_mean = checked_factored_means(grad_sq)
    return ema(row, row_mean.unsqueeze(1) + eps, decays), ema(col, col_mean.unsqueeze(1) + eps, decays)


def factored_means(grad_sq: Tensor) -> tuple[Tensor, Tensor]:
    r"""The row and column means of ``grad_sq`` (``(..., rows, cols)``), :math:`\tfrac1C\sum_j G_{ij}` and
    :math:`\tfrac1R\sum_i G_{ij}`, summed in float64 and rounded to its dtype: a float32 sum of :math:`n` squared
    gradients overflows from :math:`n g^2 \approx 3 \cdot 10^{38}` on, where their mean is an ordinary float. The
    steps take the float32 means on the CPU, and these where those overflowed (:func:`overflowed`); on an
    accelerator these alone (:func:`wide_sums_directly`)."""
    wide = torch.float64
    return grad_sq.mean(dim=-1, dtype=wide).to(grad_sq.dtype), grad_sq.mean(dim=-2, dtype=wide).to(grad_sq.dtype)


def checked_factored_means(
    grad_sq: Tensor, float32_means: Callable[[], tuple[Tensor, Tensor]] | None = None
) -> tuple[Tensor, Tensor]:
    """The row and column means of ``grad_sq`` (``(rows, cols)``) as the steps take them (:func:`checked_sums`):
    the float32 means (``float32_means()``, by default ``grad_sq.mean`` over each axis), or :func:`factored_means`."""
    narrow = float32_means or (lambda: (grad_sq.mean(dim=1), grad_sq.mean(dim=0)))
    return checked_sums(grad_sq, narrow, lambda: factored_means(grad_sq))


def checked_sums(like: Tensor, narrow: Callable[[], _Sums], wide: Callable[[], _Sums]) -> _Sums:
    """A step's sums over :math:`g^2`-size terms, where float32's range may not hold them: ``wide()`` (the float64
    sums) directly on an accelerator (:func:`wide_sums_directly`, ``like`` tells the device); elsewhere ``narrow()``
    (the float32 sums, faster on a CPU), and ``wide()`` instead where any of those overflowed (:func:`overflowed`).
    Both return a tensor or a tuple of tensors; ``narrow()`` may be as inexact as float32 where it is finite."""
    if wide_sums_directly(like):
        return wide()
    sums = narrow()
    if overflowed(*((sums,) if isinstance(sums, Tensor) else sums)):
        return wide()
    return sums


def wide_sums() -> bool:
    """Whether a step takes its sums over a tensor of squares of size :math:`g^2` and more in float64: the optimizer's
    steps (no autograd) do, so that they hold at any gradient below the non-finite check's bound; the differentiable
    step of meta-training keeps float32's, as each extra op of its small tensors costs it (float64 sums there made a
    TBPTT meta-step ~20% slower), and its gradients stay far below :math:`10^8`."""
    return not torch.is_grad_enabled()


def wide_sums_directly(like: Tensor) -> bool:
    """Whether a step takes the float64 sums of its :math:`g^2`-size statistics directly, without float32 ones and
    the :func:`overflowed` check first: on an accelerator, where :func:`wide_sums`. Reading the check's flag would
    make the host wait for the device (once per pack or tensor, twice per block of a large one); a float64 sum
    there costs a launch like a float32 one. On the CPU the float32 sums are faster and the check is cheap."""
    return wide_sums() and like.device.type != "cpu"


def overflowed(*sums: Tensor) -> bool:
    """Whether any of ``sums`` is not finite or totals past its dtype's range (a float32 sum past it, or about to
    be), checked eagerly where :func:`wide_sums`.
    Where a data-dependent branch is not possible (under ``torch.compile``, whose graph it would break, or on
    tensors of a ``torch.func`` transform such as ``vmap``) the answer is ``False``: those steps keep the float32
    sums. Never asked of an accelerator's tensors (:func:`wide_sums_directly`), whose answer would be ``True``
    without a look.

    Read as the total of each tensor (two ops, where an elementwise ``isfinite`` costs five): a NaN or an infinity
    makes it non-finite, and so does a total of finite entries past the dtype's range, where the wide sums are the
    better answer anyway, so no overflow goes unseen."""
    if not wide_sums():
        return False
    if any(x.device.type != "cpu" for x in sums):
        return True
    if torch.compiler.is_compiling() or any(functorch_wrapped(x) for x in sums):
        return False
    return not all(math.isfinite(x.sum().item()) for x in sums)


def factored_preconditioner(row: Tensor, col: Tensor) -> Tensor:
    r"""Adafactor's normaliser :math:`(\hat v_{ij})^{-1/2}` per coordinate and decay, shape ``(K, rows*cols)``.

    .. math:: \hat v_{ijk} = \frac{r_{ik}\, c_{jk}}{\tfrac1R\sum_{i'} r_{i'k}},\qquad
        \text{i.e.}\quad \hat v^{-1/2} = \operatorname{rsqrt}(r / \bar r) \cdot \operatorname{rsqrt}(c)

    the rank-1 estimate of the second moment from its row and column means (coordinates in row-major
    order, as ``tensor.reshape(-1)``). With one column (a vector), :math:`c = \bar r` and the estimate
    is the per-coordinate second moment :math:`r` itself.
    """
    row_factor, col_factor = factored_rsqrt_factors(row, col)
    return (row_factor.t().unsqueeze(2) * col_factor.t().unsqueeze(1)).reshape(row.shape[1], -1)


def factored_rsqrt_factors(row: Tensor, col: Tensor) -> tuple[Tensor, Tensor]:
    r"""The two factors of :func:`factored_preconditioner`, :math:`\hat v_{ijk}^{-1/2} = a_{ik} b_{jk}`:
    ``(rsqrt(r / mean(r)), rsqrt(c))``, shapes ``(R, K)`` and ``(C, K)`` (for callers that apply them to a
    block of rows at a time instead of materialising the ``(K, R*C)`` product). Leading batch dimensions
    (several tensors of one shape, ``(..., R, K)`` and ``(..., C, K)``) are kept: the mean is per tensor."""
    return factored_row_factor(row, row.mean(dim=-2, keepdim=True)), torch.rsqrt(col)


def factored_row_factor(row: Tensor, row_mean: Tensor, squared: bool = False) -> Tensor:
    r"""The row factor :math:`a_{ik} = (r_{ik} / \bar r_k)^{-1/2}` of :func:`factored_rsqrt_factors` for ``row``
    ``(..., R', K)``, all rows or a block of them, given ``row_mean`` :math:`\bar r_k`, the mean over all rows;
    ``squared``: :math:`a_{ik}^2 = \bar r_k / r_{ik}`, in one op."""
    return row_mean / row if squared else torch.rsqrt(row / row_mean)


@dataclasses.dataclass(frozen=True)
class PackRun:
    """Consecutive tensors of one :func:`matrix_view` ``(rows, cols)`` in a pack: tensors ``s0:s1``, their
    coordinates ``a:b`` (viewed as ``(s1 - s0, rows, cols)``), packed rows ``r0:r1`` and columns ``c0:c1``."""

    s0: int
    s1: int
    a: int
    b: int
    r0: int
    r1: int
    c0: int
    c1: int
    rows: int
    cols: int

    @property
    def count(self) -> int:
        """How many tensors the run holds."""
        return self.s1 - self.s0


@dataclasses.dataclass(frozen=True)
class FactoredPackLayout:
    """Each tensor's place in a pack of several tensors' coordinates and factored statistics (the packed step,
    :mod:`learned_optim.packing`): its coordinates ``(a, b)``, its rows in the packed row statistics, its columns
    in the packed column statistics, its :func:`matrix_view` ``(rows, cols)``; and the runs of consecutive
    tensors of one view (:class:`PackRun`), which a per-tensor statistic takes with one batched operation."""

    shapes: tuple[tuple[int, ...], ...]
    bounds: tuple[tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]], ...]
    runs: tuple[PackRun, ...]
    coordinates: int
    rows: int
    cols: int

    def counts(self, like: Tensor) -> Tensor:
        """``(3, S)``: each tensor's coordinates, rows and columns (the denominators of its means)."""
        return like.new_tensor(
            [[b - a for (a, b), *_ in self.bounds], *zip(*(v for *_, v in self.bounds), strict=True)]
        )

    def step_scales(self, step_scale: Callable[[tuple[int, ...]], float], like: Tensor) -> Tensor:
        """``(S,)``: ``step_scale`` of each tensor's shape (e.g. a rule's per-tensor muP scale)."""
        return like.new_tensor([step_scale(shape) for shape in self.shapes])


@functools.lru_cache(maxsize=256)
def factored_pack_layout(shapes: tuple[tuple[int, ...], ...]) -> FactoredPackLayout:
    """The :class:`FactoredPackLayout` of tensors of ``shapes`` packed one after the other (cached)."""
    bounds = []
    runs: list[PackRun] = []
    a = r0 = c0 = 0
    for s, shape in enumerate(shapes):
        rows, cols = matrix_view(shape)
        bounds.append(((a, a + rows * cols), (r0, r0 + rows), (c0, c0 + cols), (rows, cols)))
        last = runs[-1] if runs else None
        if last is not None and (last.rows, last.cols) == (rows, cols):
            runs[-1] = dataclasses.replace(last, s1=s + 1, b=a + rows * cols, r1=r0 + rows, c1=c0 + cols)
        else:
            runs.append(PackRun(s, s + 1, a, a + rows * cols, r0, r0 + rows, c0, c0 + cols, rows, cols))
        a, r0, c0 = a + rows * cols, r0 + rows, c0 + cols
    return FactoredPackLayout(shapes, tuple(bounds), tuple(runs), a, r0, c0)
