"""The kernels' entry points: each checks that its kernel applies to the tensors (dtype, device, layout, sizes)
and is to run here, calls it, and otherwise returns the signal for the ATen path (see
:mod:`learned_optim.kernels`)."""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ._runtime import kernel_threads, library_for


def _threads(n: int) -> int:
    return kernel_threads() if n >= 4096 else 1


def _cpu_f32(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def plain_f32(t: Tensor) -> bool:
    """Whether ``t`` is a contiguous float32 CPU tensor: what the adafac kernel reads and writes through its
    address (:func:`adafac_tensors_step` makes the same test inline, in its loop over every tensor of a step)."""
    return t.dtype is torch.float32 and t.is_cpu and t.is_contiguous()  # (3x faster than comparing t.device)


def _flat_f32(*tensors: Tensor) -> bool:
    return all(plain_f32(t) for t in tensors)


#: The library's status codes (``vec.h``): done; not supported (nothing written: ATen runs it); out of memory.
DONE, UNSUPPORTED, OUT_OF_MEMORY = 0, 1, 2


def _ran(status: int, kernel: str) -> bool:
    """Whether a kernel call with this status ran (``False``: nothing written, the caller takes the ATen path);
    ``MemoryError`` where a C++ allocation failed part way (its outputs, the state in place, may be partly
    written): an exception out of the library would have ended the process."""
    if status == OUT_OF_MEMORY:
        raise MemoryError(
            f"the native {kernel} kernel ran out of memory part way through; its outputs (the optimizer's state and "
            "parameters where it steps them in place) may be partly written: resume from a checkpoint, or run with "
            "LEARNED_OPTIM_KERNELS=0"
        )
    return status == DONE


def _rows_ok(t: Tensor, n: int) -> bool:
    return t.dim() == 2 and t.shape[0] == n and _cpu_f32(t) and (t.stride(1) == 1 or t.shape[1] == 1)


def lstm_cell_into(x: Tensor, h: Tensor, c: Tensor, weight: Tensor, bias: Tensor, h_out: Tensor, c_out: Tensor) -> bool:
    r"""Run the fused LSTM cell into ``h_out, c_out`` if the kernel applies; return whether it ran.

    ``weight`` is ``[W_ih, W_hh]`` ``(4H, I + H)`` and ``bias`` ``b_ih + b_hh`` ``(4H,)``, both with the
    ``g``-gate rows already doubled (see :func:`learned_optim.nets.cells.lstm_cell`). Applies to float32
    CPU tensors whose rows are contiguous (any row stride) when no autograd graph is being recorded;
    the outputs must not overlap the inputs of *other* rows. Uses :func:`~learned_optim.kernels.kernel_threads`
    threads.
    """
    n, hidden = h.shape[0], h.shape[-1]
    if not (all(_rows_ok(t, n) for t in (x, h, c, h_out, c_out)) and _cpu_f32(weight, bias)):
        return False
    widths = (c.shape[1], h_out.shape[1], c_out.shape[1])
    if widths != (hidden,) * 3 or weight.shape != (4 * hidden, x.shape[1] + hidden) or bias.shape != (4 * hidden,):
        raise ValueError(  # (the kernel would read and write past these tensors)
            f"lstm_cell: x {tuple(x.shape)}, h {tuple(h.shape)}, c, h_out, c_out widths {widths}, weight "
            f"{tuple(weight.shape)} and bias {tuple(bias.shape)} do not fit one cell of hidden size {hidden}"
        )
    lib = library_for("lstm_cell")
    if lib is None:
        return False
    weight, bias = weight.contiguous(), bias.contiguous()
    threads = _threads(n)
    status = lib.lo_lstm_cell_f32(
        n,
        x.shape[1],
        hidden,
        x.data_ptr(),
        x.stride(0),
        h.data_ptr(),
        h.stride(0),
        c.data_ptr(),
        c.stride(0),
        weight.data_ptr(),
        bias.data_ptr(),
        h_out.data_ptr(),
        h_out.stride(0),
        c_out.data_ptr(),
        c_out.stride(0),
        threads,
    )
    return _ran(status, "lstm_cell")


def elu_(z: Tensor) -> Tensor:
    r"""ELU (:math:`\alpha = 1`) in place: :math:`z` for :math:`z > 0`, else :math:`e^z - 1`.

    The native kernel for contiguous float32 CPU tensors, ``torch.nn.functional.elu_`` otherwise
    (or when the kernels are off or unavailable). For inference only: records no autograd graph.
    """
    lib = library_for("elu") if _flat_f32(z) else None
    if lib is None:
        return torch.nn.functional.elu_(z)
    lib.lo_elu_f32(z.numel(), z.data_ptr(), _threads(z.numel()))
    return z


def _check_mlp_moments(grad: Tensor, param: Tensor, m: Tensor, v: Tensor, decay: Tensor) -> None:
    """``ValueError`` unless ``grad, param`` are ``(n,)``-sized and ``m, v`` ``(n, D)`` with ``decay`` ``(D,)``: the
    kernel reads that many floats of each."""
    n, d = m.shape
    if grad.numel() != n or param.numel() != n or v.shape != m.shape or decay.shape != (d,):
        raise ValueError(
            f"mlp kernel: grad {tuple(grad.shape)}, param {tuple(param.shape)}, m {tuple(m.shape)}, v "
            f"{tuple(v.shape)} and decay {tuple(decay.shape)} do not fit {n} coordinates of {d} moments"
        )


def _offsets(sizes: tuple[int, ...] | None, n: int) -> Tensor:
    """int64 segment offsets ``[0, n_1, n_1 + n_2, ..., n]`` (one segment of ``n`` rows when ``sizes`` is None)."""
    if sizes is None:
        return torch.tensor([0, n], dtype=torch.int64, device="cpu")
    return torch.tensor([0, *sizes], dtype=torch.int64, device="cpu").cumsum_(0)


def mlp_feature_mean_square(
    grad: Tensor,
    param: Tensor,
    m: Tensor,
    v: Tensor,
    decay: Tensor,
    eps: float,
    sizes: tuple[int, ...] | None = None,
) -> Tensor | None:
    r"""Mean over coordinates of each MLP feature's square (``MLPUpdate.tensor_stats``), or ``None``.

    ``grad, param`` ``(n,)``, ``m, v`` ``(n, D)`` the moments *before* this step's EMA update, ``decay``
    ``(D,)``. ``sizes``: the rows are that many tensors packed one after the other (``sum(sizes) <= n``;
    rows past the last are ignored); the result is then ``(len(sizes), 2 + 4D)``, each row the bits the call
    on that tensor alone gives. ``None`` when the kernel does not apply (not contiguous float32 CPU,
    ``D > 8``, kernels off, unavailable or not faster here); the caller then computes it with ATen.
    """
    lib = library_for("mlp") if _flat_f32(grad, param, m, v, decay) and m.dim() == 2 and grad.numel() > 0 else None
    if lib is None:
        return None
    n, d = m.shape
    _check_mlp_moments(grad, param, m, v, decay)
    offsets = _offsets(sizes, n)
    k = offsets.numel() - 1
    if int(offsets[-1]) > n or (sizes is not None and min(sizes) < 1):
        raise ValueError(f"segment sizes {sizes} do not fit {n} rows (each must be >= 1)")
    out = torch.empty(k, 2 + 4 * d, dtype=torch.float64, device="cpu")
    status = lib.lo_mlp_feature_sumsq_segments_f32(
        k,
        offsets.data_ptr(),
        d,
        grad.data_ptr(),
        param.data_ptr(),
        m.data_ptr(),
        v.data_ptr(),
        decay.data_ptr(),
        eps,
        out.data_ptr(),
        _threads(n),
    )
    if not _ran(status, "mlp"):
        return None
    means = (out / offsets.diff().unsqueeze(1)).to(torch.float32)
    return means if sizes is not None else means[0]


def mlp_update(
    grad: Tensor,
    param: Tensor,
    m: Tensor,
    v: Tensor,
    decay: Tensor,
    eps: float,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    magnitude_scale: float,
    step_scale: float,
    out: Mapping[str, Tensor] | None = None,
    sizes: tuple[int, ...] | None = None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    r"""The MLP rule's ``(delta, m', v')`` for one hidden layer (``MLPUpdate.forward``), or ``None``.

    ``w1`` ``(H, 2 + 4D)`` with the feature normalisation folded into its columns and ``b1`` ``(H,)``
    with the time features folded in; ``w2`` ``(2, H)``, ``b2`` ``(2,)``. ``out``: optional ``{"m", "v"}``
    tensors to write ``m', v'`` into (they may be ``m, v`` themselves). ``sizes``: the rows are that many
    tensors packed one after the other, and ``w1`` is ``(len(sizes), H, 2 + 4D)``, one per tensor; rows past
    the last tensor are left unset. ``None`` when the kernel does not apply; the caller then computes it
    with ATen.
    """
    lib = library_for("mlp") if _flat_f32(grad, param, m, v, decay) and m.dim() == 2 else None
    if lib is None:
        return None
    n, d = m.shape
    _check_mlp_moments(grad, param, m, v, decay)
    offsets = _offsets(sizes, n)
    k = offsets.numel() - 1
    if int(offsets[-1]) > n or w1.dim() != (2 if sizes is None else 3) or (sizes is not None and w1.shape[0] != k):
        raise ValueError(f"mlp_update: segment sizes {sizes} and first-layer weights {tuple(w1.shape)} do not match")
    hidden = w1.shape[-2]
    if w1.shape[-1] != 2 + 4 * d or b1.shape != (hidden,) or w2.shape != (2, hidden) or b2.shape != (2,):
        raise ValueError(
            f"mlp_update: layers w1 {tuple(w1.shape)}, b1 {tuple(b1.shape)}, w2 {tuple(w2.shape)}, b2 "
            f"{tuple(b2.shape)} do not fit {2 + 4 * d} features"
        )
    if out is not None and not (out["m"].shape == m.shape and out["v"].shape == v.shape):
        raise ValueError(f"mlp_update: out m {tuple(out['m'].shape)}, v {tuple(out['v'].shape)} for {tuple(m.shape)}")
    w1, b1, w2, b2 = (t.detach().to(torch.float32).contiguous() for t in (w1, b1, w2, b2))
    delta = torch.empty_like(grad)
    m_new, v_new = (
        (out["m"], out["v"])
        if out is not None and _flat_f32(out["m"], out["v"])
        else (torch.empty_like(m), torch.empty_like(v))
    )
    status = lib.lo_mlp_update_segments_f32(
        k,
        offsets.data_ptr(),
        d,
        w1.shape[-2],
        grad.data_ptr(),
        param.data_ptr(),
        m.data_ptr(),
        v.data_ptr(),
        decay.data_ptr(),
        eps,
        w1.data_ptr(),
        b1.data_ptr(),
        w2.data_ptr(),
        b2.data_ptr(),
        magnitude_scale,
        step_scale,
        delta.data_ptr(),
        m_new.data_ptr(),
        v_new.data_ptr(),
        _threads(n),
    )
    return (delta, m_new, v_new) if _ran(status, "mlp") else None


#: What the ``adafac_mlp`` kernel handles (``csrc/adafac.cpp``): momenta :math:`J` (``4 + 4J`` dense
#: features) and the MLP's hidden size; beyond them its wrappers return ``None`` (the ATen path runs).
ADAFAC_MAX_MOMENTA = 8
ADAFAC_MAX_HIDDEN = 32


class AdafacNet(NamedTuple):
    """``AdafacMLP``'s net at a step count as the adafac kernel takes it (``AdafacMLP._kernel_net``): the terms
    that depend on the step count (``v_correction``, ``feature_scale``, ``bias``) are either one for every tensor
    or one per tensor (a leading axis of S, where the tensors' step counts differ)."""

    #: ``beta_v``, ``moment_eps``, ``factored_eps``, ``factored_rsqrt_eps``, ``feature_rms_eps``, ``direction_rms_eps``
    config: Mapping[str, float]
    #: the second moment's bias correction :math:`1 / (1 - \beta_v^t)`, ``()`` or ``(S,)`` (float32)
    v_correction: Tensor
    #: the J momentum decays and the K factored decays (K = J)
    beta: Sequence[float]
    factored_decay: Sequence[float]
    #: ``(4 + 4J,)`` or ``(S, 4 + 4J)``: each dense feature's factor q (the bias corrections of the ratio rows, 1
    #: elsewhere)
    feature_scale: Tensor
    #: the first layer's weight ``(H, 4 + 4J + 4K)`` (dense, row, then column features) and bias ``(H,)`` or
    #: ``(S, H)`` (with the time features folded in)
    weight: Tensor
    bias: Tensor
    #: the later layers' ``(weight, bias)``: hidden ``(H, H), (H,)``, then the output ``(1, H), (1,)``
    layers: Sequence[tuple[Tensor, Tensor]]
    #: the dense feature whose RMS is the step's magnitude (an Adam magnitude), ``None`` for a unit magnitude
    adam_index: int | None
    #: RMS-normalise the direction per tensor
    normalize: bool
    #: bound on each coordinate of the normalised direction (0: none)
    direction_clip: float = 0.0


def _mlp_layers(inner: Sequence[tuple[Tensor, Tensor]], w_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The adafac kernel's later MLP layers as flat float32 buffers: hidden weights ``(L - 1, H, H)``, their biases
    ``(L - 1, H)`` (one unused float when there are none) and the output weights ``(H,)``: views of one buffer,
    refilled from the layers by one copy (this runs every step; the flat views of the layers and the buffer are
    kept per set of layer storages, :data:`_LAYER_BUFFERS`)."""
    layers = (*(w for w, _ in inner), *(b for _, b in inner), w_out)
    key = tuple((t.data_ptr(), t.shape, t.dtype, t.is_contiguous()) for t in layers)
    kept = _LAYER_BUFFERS.get(key)
    if kept is None:
        pad = [w_out.new_zeros(1).detach()] if not inner else []
        weights, biases = [w.detach().reshape(-1) for w, _ in inner], [b.detach().reshape(-1) for _, b in inner]
        sources = [*weights, *pad, *biases, *pad, w_out.detach().reshape(-1)]
        sizes = [sum(t.numel() for t in weights) or 1, sum(t.numel() for t in biases) or 1, w_out.numel()]
        flat = torch.empty(sum(sizes), dtype=torch.float32, device="cpu")
        kept = (sources, flat, (flat[: sizes[0]], flat[sizes[0] : sizes[0] + sizes[1]], flat[sizes[0] + sizes[1] :]))
        if all(contiguous for *_, contiguous in key):  # (else a reshape copied: nothing to keep)
            if len(_LAYER_BUFFERS) >= 8:
                _LAYER_BUFFERS.clear()
            _LAYER_BUFFERS[key] = kept
    sources, flat, parts = kept
    torch.cat(sources, out=flat)
    return parts


_LayersKey = tuple[tuple[int, torch.Size, torch.dtype, bool], ...]
#: :func:`_mlp_layers`' flat views of contiguous layers (the views keep their storages, so an address in a key is
#: theirs), its buffer and that buffer's three parts, per layers' (address, shape, dtype, contiguity).
_LAYER_BUFFERS: dict[_LayersKey, tuple[list[Tensor], Tensor, tuple[Tensor, Tensor, Tensor]]] = {}


def adafac_pack_step(
    views: Sequence[tuple[int, int]],
    grad: Tensor,
    param: Tensor,
    m: Sequence[Tensor],
    v: Tensor,
    m_out: Sequence[Tensor],
    v_out: Tensor,
    row: Tensor,
    col: Tensor,
    row_out: Tensor,
    col_out: Tensor,
    net: AdafacNet,
    step_scales: Tensor,
    update: tuple[float | Tensor, float] | None = None,
) -> Tensor | None:
    r"""``AdafacMLP``'s whole inference step for a pack of tensors in one call, or ``None``.

    The tensors' coordinates lie one after the other in ``grad``, ``param``, ``v`` and the :math:`J` momenta
    ``m`` (each tensor its ``views[s] = (rows, cols)`` matrix view, row-major; padding rows past the last
    tensor are left alone), their factored statistics in ``row`` ``(sum of rows, K)`` and ``col`` ``(sum of
    cols, K)``. Per tensor, the kernel updates Adafactor's row and column statistics into ``row_out``,
    ``col_out``, takes their factors and the row/column features' per-tensor RMS, runs pass 1 (one sweep: the
    new momenta and second moment

    .. math:: m_j' = m_j + (1-\beta_j)(g - m_j),\qquad v' = \beta_v v + (1-\beta_v)\,g^2

    into ``m_out``, ``v_out``, which may be the inputs themselves, and the sums over the tensor of the squares of
    the raw dense features

    .. math:: u = \big[g,\ \theta,\ m_j',\ v',\ m_j' s,\ s,\ g\,\phi_k,\ m_k' \phi_k\big],\qquad
        s = (k_v v' + \epsilon)^{-1/2},\qquad \phi_k(r, c) = a_{kr}\, e_{kc}

    with :math:`k_v` the bias correction :math:`1/(1-\beta_v^t)` and :math:`a`, :math:`e` the factored
    preconditioner's row and column factors; sums independent of the thread count), folds each dense feature's
    per-tensor normaliser
    :math:`q_f / \sqrt{q_f^2 \overline{u_f^2} + \epsilon_u}` (``feature_scale`` :math:`q`) into the first layer
    ``weight`` ``(H, 4 + 4J + 4K)`` (dense, row, column features) and its ``bias`` into the row term, runs pass
    2 (one sweep: :math:`u` again from the new state, then per coordinate :math:`(r, c)` the MLP
    :math:`h_1 = \mathrm{relu}(W u + t^{\mathrm{row}}_{:, r} + t^{\mathrm{col}}_{:, c})`,
    :math:`h_l = \mathrm{relu}(W_l h_{l-1} + b_l)`, :math:`d = w_o^\top h + b_o`, with the later ``layers``
    ``(weight, bias)``: hidden ``(H, H), (H,)``, output ``(1, H), (1,)``) and scales the direction by
    ``-step_scales[s]``, the Adam magnitude
    :math:`q_a \sqrt{\overline{u_a^2}}` (``adam_index`` :math:`a`; ``None`` for a unit magnitude) and, with
    ``normalize``, the rsqrt of its mean square: ``AdafacMLP._packed_forward``'s math, tensor by tensor in C++.
    ``feature_scale``, ``weight``, ``bias``, ``layers``, ``adam_index`` and ``normalize`` are fields of ``net``
    (:class:`AdafacNet`, with the decays and the constants). Returns the step :math:`\Delta` (a new vector shaped like
    ``grad``, zero on the padding rows); with ``update = (lr, weight_decay)``, applies the decoupled update
    :math:`\theta \leftarrow \theta (1 - \eta\lambda) + \eta\Delta` to ``param`` in place instead (in the
    sweep that scales the direction, so :math:`\Delta` is never written; padding rows untouched) and returns
    ``param``. ``None`` when the kernel does not apply (not all contiguous float32 CPU tensors, :math:`J` above
    :data:`ADAFAC_MAX_MOMENTA`, ``H`` above :data:`ADAFAC_MAX_HIDDEN`, :math:`K \ne J`, kernels off,
    unavailable or not faster here): the caller then runs the ATen ops.
    """
    j = len(m)
    sizes = [r * c for r, c in views]
    total, rows, cols = sum(sizes), sum(r for r, _ in views), sum(c for _, c in views)
    k = len(net.factored_decay)
    if (
        len(m_out) != j
        or len(net.beta) != j
        or not row.shape == row_out.shape == (rows, k)
        or not (col.shape == col_out.shape == (cols, k))
    ):
        raise ValueError(
            f"adafac_pack_step: state of {j} momenta, row {tuple(row.shape)} -> {tuple(row_out.shape)}, col "
            f"{tuple(col.shape)} -> {tuple(col_out.shape)} for {rows} rows and {cols} columns of {k} statistics"
        )
    weight = net.weight
    if grad.dim() != 1 or grad.numel() < total or weight.shape[1] != 4 + 4 * j + 4 * len(net.factored_decay):
        raise ValueError(f"adafac_pack_step: {grad.numel()} coordinates for {total}, weight {tuple(weight.shape)}")
    vectors = [grad, param, *m, v, *m_out, v_out]
    if not (all(t.shape == grad.shape for t in vectors) and _flat_f32(*vectors, row, col, row_out, col_out)):
        return None
    direction = torch.empty_like(grad)
    direction[total:] = 0.0  # the padding rows

    def places(buffer: Tensor, starts: list[int], floats: int = 1) -> list[int]:
        """The address of each tensor's part of ``buffer`` (``floats`` per coordinate, row or column)."""
        return [buffer.data_ptr() + 4 * floats * start for start in starts]

    a, r0, c0 = _starts(sizes), _starts([r for r, _ in views]), _starts([c for _, c in views])
    table = [
        *(places(t, a) for t in vectors),
        places(row, r0, k),
        places(col, c0, k),
        places(row_out, r0, k),
        places(col_out, c0, k),
        places(direction, a),
    ]
    ran = _adafac_call(views, table, net, step_scales, update)
    if not ran:
        return None
    return direction if update is None else param


def adafac_tensors_step(
    shapes: Sequence[tuple[int, int]],
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    m: Sequence[Sequence[Tensor]],
    v: Sequence[Tensor],
    row: Sequence[Tensor],
    col: Sequence[Tensor],
    net: AdafacNet,
    step_scales: Tensor,
    update: tuple[float | Tensor, float] | None,
    direction: Tensor | None = None,
) -> bool:
    r""":func:`adafac_pack_step`'s step of several tensors, each in its own storage: no pack, nothing copied.

    Tensor ``s`` is the ``shapes[s] = (rows, cols)`` matrix view of ``params[s]`` with gradient ``grads[s]``,
    momenta ``m[k][s]``, second moment ``v[s]`` (each ``rows * cols`` floats) and factored statistics ``row[s]``
    ``(rows, K)``, ``col[s]`` ``(cols, K)``; the new state is written over the state and the decoupled update
    ``update = (lr, weight_decay)`` applied to the parameters, in place; or, with ``update=None``, each tensor's
    step :math:`\Delta` written into ``direction`` (a contiguous float32 vector of every tensor's coordinates, one
    tensor after the other) and the parameters left as they are. Returns whether the kernel ran: ``False``
    (nothing written) where it does not apply (any tensor not a contiguous float32 CPU tensor of the size its
    view gives, or :func:`adafac_pack_step`'s limits), and the caller steps the tensors another way.
    """
    k, count = len(net.factored_decay), len(shapes)
    if not (len(grads) == len(params) == len(v) == len(row) == len(col) == count and all(len(x) == count for x in m)):
        return False
    sizes = [rows * cols for rows, cols in shapes]
    if (update is None) == (direction is None):
        raise ValueError("adafac_tensors_step: give either update (applied in place) or direction (written), not both")
    if direction is not None and not (_flat_f32(direction) and direction.numel() == sum(sizes)):
        raise ValueError(
            f"adafac_tensors_step: direction of {direction.numel()} {direction.dtype} on {direction.device} for "
            f"{sum(sizes)} coordinates (a contiguous float32 CPU vector)"
        )
    f32 = torch.float32
    for i, (rows, cols) in enumerate(shapes):  # plain_f32 and the sizes inline: this runs every step, every tensor
        n = rows * cols
        for t in (grads[i], params[i], *(momentum[i] for momentum in m), v[i]):
            if not (t.dtype is f32 and t.is_cpu and t.is_contiguous() and t.numel() == n):
                return False
        for t, length in ((row[i], rows), (col[i], cols)):
            if not (t.dtype is f32 and t.is_cpu and t.is_contiguous() and t.shape == (length, k)):
                return False

    def addresses(tensors: Sequence[Tensor]) -> list[int]:
        return [t.data_ptr() for t in tensors]

    momenta, second, rows_at, cols_at = [addresses(x) for x in m], addresses(v), addresses(row), addresses(col)
    steps_at = [0] * count if direction is None else [direction.data_ptr() + 4 * a for a in _starts(sizes)]
    table = [  # the new state over the state; the step into direction, or the update to the parameters
        addresses(grads), addresses(params), *momenta, second, *momenta, second,
        rows_at, cols_at, rows_at, cols_at, steps_at,
    ]  # fmt: skip
    return _adafac_call(shapes, table, net, step_scales, update)


def _starts(counts: Sequence[int]) -> list[int]:
    """Where each of consecutive parts of these sizes starts."""
    starts, total = [], 0
    for count in counts:
        starts.append(total)
        total += count
    return starts


def _adafac_call(
    views: Sequence[tuple[int, int]],
    table: Sequence[Sequence[int]],
    net: AdafacNet,
    step_scales: Tensor,
    update: tuple[float | Tensor, float] | None,
) -> bool:
    """The adafac kernel over the tensors of ``views``, their arrays' addresses in ``table``: per array (grad,
    param, the J momenta, v, the J new momenta, new v, row, col, new row, new col, direction) one address per
    tensor. With ``update``, the decoupled update goes to the parameters themselves. Whether it ran."""
    j, s = (len(table) - 9) // 2, len(views)
    hidden, config = net.weight.shape[0], net.config
    *inner, (w_out, b_out) = net.layers
    supported = (
        len(net.factored_decay) == j
        and 1 <= j <= ADAFAC_MAX_MOMENTA
        and hidden <= ADAFAC_MAX_HIDDEN
        and s > 0
        and _cpu_f32(net.weight, net.bias, net.feature_scale, step_scales)
    )
    lib = library_for("adafac_mlp") if supported else None
    if lib is None:
        return False
    dense = 4 + 4 * j
    shapes_fit = (
        net.weight.shape == (hidden, dense + 4 * j)
        and net.bias.shape in ((hidden,), (s, hidden))
        and net.feature_scale.shape in ((dense,), (s, dense))
        and net.v_correction.shape in ((), (s,))
        and step_scales.numel() == s
        and all(w.shape == (hidden, hidden) and b.shape == (hidden,) for w, b in inner)
        and w_out.numel() == hidden
        and (net.adam_index is None or 0 <= net.adam_index < dense)
    )
    if not shapes_fit:  # (the kernel would read past these tensors)
        raise ValueError(
            f"adafac kernel: a net of hidden size {hidden} for {j} momenta takes a weight ({hidden}, {dense + 4 * j}), "
            f"bias ({hidden},), feature_scale ({dense},) and a v_correction, each also one per tensor ({s}), and one "
            f"step scale per tensor; got weight {tuple(net.weight.shape)}, bias {tuple(net.bias.shape)}, "
            f"feature_scale {tuple(net.feature_scale.shape)}, v_correction {tuple(net.v_correction.shape)}, "
            f"{step_scales.numel()} step scales, layers {[tuple(w.shape) for w, _ in net.layers]}"
        )
    per_tensor_counts = net.v_correction.dim() == 1  # the step-count terms one row per tensor (else one for all)
    if (net.bias.dim() == 2, net.feature_scale.dim() == 2) != (per_tensor_counts, per_tensor_counts):
        raise ValueError(
            "adafac kernel: v_correction, bias and feature_scale are all one per tensor or all one for every tensor; "
            f"got {tuple(net.v_correction.shape)}, {tuple(net.bias.shape)}, {tuple(net.feature_scale.shape)}"
        )
    weight, bias, feature_scale, v_correction, step_scales = (
        t if t.dtype is torch.float32 and t.is_contiguous() else t.detach().float().contiguous()
        for t in (net.weight, net.bias, net.feature_scale, net.v_correction, step_scales)
    )  # (read by address only: no need to detach what is already float32 and contiguous)
    inner_w, inner_b, w_out = _mlp_layers(inner, w_out)
    # one int64 (pointer-sized) row of S addresses per array; an array given twice (the same list: a state read and
    # written over) has one row
    index: dict[int, int] = {}
    rows: list[Sequence[int]] = []
    for addresses in table:
        if id(addresses) not in index:
            index[id(addresses)] = len(rows)
            rows.append(addresses)
    pointers = (ctypes.c_int64 * (s * len(rows)))(*(address for addresses in rows for address in addresses))
    row_of = [ctypes.addressof(pointers) + 8 * s * index[id(addresses)] for addresses in table]
    lr, weight_decay = (0.0, 0.0) if update is None else (float(update[0]), float(update[1]))
    status = lib.lo_adafac_pack_step_f32(
        s,
        (ctypes.c_int64 * (2 * s))(*(x for view in views for x in view)),
        j,
        *row_of[:2],
        row_of[2],  # the J momenta: J rows of S
        row_of[2 + j],
        row_of[3 + j],
        row_of[3 + 2 * j],
        *row_of[4 + 2 * j : 8 + 2 * j],
        (ctypes.c_float * j)(*net.beta),
        config["beta_v"],
        v_correction.data_ptr(),
        config["moment_eps"],
        (ctypes.c_float * j)(*net.factored_decay),
        config["factored_eps"],
        config["factored_rsqrt_eps"],
        feature_scale.data_ptr(),
        int(per_tensor_counts),
        config["feature_rms_eps"],
        hidden,
        len(net.layers),
        weight.data_ptr(),
        bias.data_ptr(),
        inner_w.data_ptr(),
        inner_b.data_ptr(),
        w_out.data_ptr(),
        float(b_out),
        -1 if net.adam_index is None else net.adam_index,
        int(net.normalize),
        config["direction_rms_eps"],
        float(net.direction_clip),
        step_scales.data_ptr(),
        row_of[8 + 2 * j],
        row_of[1] if update is not None else None,  # the update in place
        lr,
        weight_decay,
        kernel_threads(),
    )
    return _ran(status, "adafac_mlp")
