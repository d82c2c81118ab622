"""The ``torch.optim.Optimizer`` that runs a learned update rule in place of Adam."""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import chain
from typing import Any, Literal, TypeVar, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import kernels, packing, schedules, sharded_step
from .functional import decoupled_update_, stepped_parameter
from .nets.base import UpdateRule
from .packing import PACK_MAX_BYTES, ROW_ALIGN, is_dtensor
from .packing import local_tensor as _local
from .sharded_step import SHARDED_STEPS, ShardedStep

__all__ = [
    "LearnedOptimizer",
    "NonFiniteGradientError",
    "DEFAULT_CHUNK_SIZE",
    "KERNEL_CHUNK_SIZE",
    "ROW_ALIGN",
    "PACK_MAX_BYTES",
]

logger = logging.getLogger(__name__)

#: What ``torch.optim.AdamW`` takes and this optimizer does not, and why (a user swapping the class keeps ``lr``,
#: ``weight_decay``, ``maximize`` and the LR schedule).
_UNSUPPORTED_ARGUMENTS = {
    **dict.fromkeys(
        ("betas", "eps", "amsgrad"),
        "{} has no {!r}: the learned net fixes its own moment decays and epsilons (the checkpoint's config.json, "
        "under 'net'); keep AdamW's lr, weight_decay and LR schedule and drop this argument",
    ),
    **dict.fromkeys(
        ("fused", "capturable", "differentiable"),
        "{} does not take {!r}: its step is the learned net's own code (a native CPU kernel where one is measured "
        "faster), with no fused, capturable or differentiable variant (learned_optim.functional_update is the "
        "differentiable step)",
    ),
}

#: The key of the net's family and weights in :meth:`LearnedOptimizer.state_dict`.
NET_STATE_KEY = "learned_net"

_F = TypeVar("_F", bound=Callable[..., Any])


def _eager_under_compile(fn: _F) -> _F:
    """``fn``, which Dynamo skips: inside a ``torch.compile``d region it runs eagerly (``torch.compiler.disable``)."""
    return cast(_F, torch.compiler.disable(fn))


#: Coordinates per net call on the ATen path. Bounds the transient memory of a step independently of model
#: size (DM-LSTM: roughly 1.5 KB of temporaries per coordinate, so ~12 MB per chunk). 8192 rows keep a
#: chunk's gate activations near the size of a core's L2 cache; on the benchmark machine larger chunks
#: were up to 1.8x slower (``benchmarks/step_time.py``). A net may size its own
#: (:meth:`~learned_optim.nets.base.UpdateRule.cpu_chunk_size`).
DEFAULT_CHUNK_SIZE = 1 << 13

#: Coordinates per net call when the native kernels run it (:mod:`learned_optim.kernels`: CPU, float32):
#: their temporaries are tens of bytes per coordinate (~4-10 MB per chunk), and larger chunks save
#: per-call overhead (1M-parameter step 5-25% faster than with 8192 on the benchmark machine).
KERNEL_CHUNK_SIZE = 1 << 17

#: Coordinates per net call on a GPU: a step's cost there is kernel launches, not cache misses, so chunks
#: are as large as a bounded transient allows (DM-LSTM: ~1.5 GB of temporaries at 1M coordinates).
ACCELERATOR_CHUNK_SIZE = 1 << 20

NonFinitePolicy = Literal["raise", "skip"]


class NonFiniteGradientError(RuntimeError):
    """A gradient holds NaN or inf, or an entry whose square overflows the net's dtype (about 1.8e19 in float32: the
    second moments would become inf for good); raised before any parameter or state is modified."""


class LearnedOptimizer(Optimizer):
    r"""Applies a learned coordinatewise update rule to every parameter.

    For each parameter tensor with a gradient, at step :math:`t` (counted per tensor):

    .. math::
        (\Delta\theta, s_t) = \mathrm{net}(\pm g_t, \theta_{t-1}, s_{t-1}, t),\qquad
        \theta_t = \theta_{t-1} - \mathrm{lr}\cdot\lambda\cdot\theta_{t-1} + \mathrm{lr}\cdot\Delta\theta

    where :math:`\lambda` is the decoupled ``weight_decay``, the gradient is negated when
    ``maximize=True``, and :math:`s` is the net's per-coordinate state (kept in ``self.state[p]``
    so ``state_dict()`` carries it, with the net's weights). ``lr`` multiplies the learned step: a real learning rate
    for ``adafac_mlp``, whose step has RMS ``lr`` times a per-tensor scale, a multiplier (default 1.0) for the older
    families; LR schedulers drive it. ``lr == 0`` is an exact no-op (state is created but nothing changes). A net
    that reads where the schedule stands (:attr:`~learned_optim.nets.base.UpdateRule.uses_lr_ratio`, e.g.
    ``adafac_mlp`` with ``lr_ratio_input``) gets each group's :math:`\rho = \mathrm{lr} / \mathrm{peak}` before its
    tensors step, the peak being the largest lr the group has had (its ``"peak_lr"``, kept in ``state_dict()``).

    **In-place step.** First, a rule that offers :meth:`~learned_optim.nets.base.UpdateRule.step_in_place`
    steps the tensors it can in their own storage, nothing copied, in one call (one per step count for a rule
    without :attr:`~learned_optim.nets.base.UpdateRule.per_tensor_steps`): ``adafac_mlp``'s
    native kernel takes every contiguous float32 CPU tensor of a group (eager, not ``maximize``, not FSDP2, no two
    parameters sharing memory), with the per-tensor step's bits, and on several threads steps small tensors side by
    side and splits large ones. The tensors it leaves go on as below.

    **Packed step.** For rules that set ``packs_segments`` (every built-in family), the tensors of a
    param group smaller than one chunk and than :data:`PACK_MAX_BYTES` (value, gradient and state) that
    share device, dtypes and step count (any step counts for a rule with ``per_tensor_steps``: ``adafac_mlp``,
    so that layers unfrozen at different times or parameters that miss some steps' gradients still share packs)
    are stepped together:
    their gradients, parameters and state are concatenated into packs of up to one chunk, the net runs
    once per pack with the per-tensor statistics taken by segment (:class:`learned_optim.nets.Segments`),
    and the results are copied back into each parameter and its own ``self.state[p]``. So the cost of a
    step grows with the number of coordinates, not of tensors. With the native kernels the result is the
    per-tensor step's bits (each row is computed alone); on ATen it is too wherever BLAS rounds a GEMM row
    the same whatever the row count (MKL may not: seen as 1 float32 ulp in rare elements; tested with that
    bound in ``tests/core/test_packed_step.py``). Whole-tensor rules (``adafac_mlp``) pack whole tensors with
    their per-tensor state: in one native call where its kernel runs, else by ATen ops, equal to their
    per-tensor step to float rounding (bound in the same test). Larger tensors, FSDP2 shards, ``compile=True`` and
    ``chunk_size=None`` take the per-tensor path.

    Parameters sharded by FSDP2 (``fully_shard``: ``DTensor`` parameters) are updated shard by shard,
    in place on each rank's local shard; their per-coordinate state is kept as ``DTensor`` with the
    parameter's placements (global shape ``param.shape + state_shape``), so
    ``torch.distributed.checkpoint`` can save and reshard it. Per-tensor statistics (the MLP net's
    feature RMS) are all-reduced over the shards, and a non-finite gradient on any rank skips or
    raises on every rank. A whole-tensor rule (``adafac_mlp``: factored row/column statistics, per-tensor
    normalisation, the orthogonalised direction) steps each sharded tensor whole, with the single-process step's
    result, as ``sharded_step`` says: by default each tensor is stepped by one rank of its shard group, which
    gathers its shards, steps it and scatters the new shards and state back (:mod:`learned_optim.sharded_step`: the
    ranks share the steps' compute out, each holding one whole tensor's parameter, gradient and state at a time);
    with ``"every_rank"`` every rank all-gathers every tensor and steps it. Its per-tensor state (the factored
    statistics, of the whole tensor's rows and columns) is a replicated ``DTensor``.

    Args:
        params: iterable of parameters, named parameters or param-group dicts.
        rule: the update rule (its weights travel with pickling/deepcopy and :meth:`state_dict`, and are saved by
            :meth:`save_pretrained`). It is moved to the parameters' device when they all share one (e.g. a model
            already on CUDA).
        lr: the multiplier of the learned step (float or 0-d tensor); default the rule's ``default_lr``: 1.0 for
            the nets whose step is learned, a real learning rate (1e-3) for nets whose step has RMS ``lr`` times a
            per-tensor scale (``adafac_mlp``).
        weight_decay: decoupled weight decay.
        maximize: maximize the objective instead of minimizing it.
        foreach: accepted for API compatibility with ``torch.optim``; the step is always chunked.
        chunk_size: coordinates per net call (rounded up to a multiple of :data:`ROW_ALIGN`);
            ``None`` applies the net to whole tensors at once; ``"auto"`` (default) takes
            :data:`KERNEL_CHUNK_SIZE` where native kernels run in the net (float32 on CPU, eager, and
            :func:`learned_optim.kernels.serves` the family: built, and measured faster than ATen here),
            :data:`ACCELERATOR_CHUNK_SIZE` on a GPU and elsewhere the net's
            :meth:`~learned_optim.nets.base.UpdateRule.cpu_chunk_size`, else :data:`DEFAULT_CHUNK_SIZE`. On CPU the
            result is bit-identical whatever the chunk size; on GPU, cuBLAS may round differently per
            chunk shape.
        nonfinite: what a NaN/inf gradient (or one with an entry whose square overflows the net's dtype, about
            1.8e19 in float32) does: ``"raise"`` (default) raises
            :class:`NonFiniteGradientError` naming the parameter before anything is modified;
            ``"skip"`` skips the whole step (parameters and state untouched) and counts it in
            ``self.skipped_steps``.
        state_dtype: dtype of the per-coordinate state (float32 default; whatever the param dtype), or a
            mapping from state name to dtype, e.g. ``{"lstm": torch.bfloat16}`` keeps the recurrent
            state of DM-LSTM/RNNProp in bf16 (half its memory) and every other state (moments) in
            float32. The net always computes in its own dtype; state is cast per chunk.
        compile: run the net through ``torch.compile`` (the same ``forward``, compiled once with a
            dynamic row count, applied over the same chunks). ``False`` (default) runs it eagerly.
            ``True`` uses ``torch.compile``'s defaults (Inductor); a mapping is passed to
            ``torch.compile`` as keyword arguments. Compilation happens at the first step (tens of
            seconds on CPU, needs a C++ compiler); if it fails the step raises: there is no silent
            fallback to eager. Results match eager to float rounding, not bit for bit; within the
            compiled path they are still independent of ``chunk_size``.
        sharded_step: how a whole-tensor rule (``adafac_mlp``) steps FSDP2-sharded parameters: ``"owner"``
            (default) one rank of the shard group per tensor (:func:`learned_optim.sharded_step.step_by_owners`),
            ``"every_rank"`` every rank all of them (all-gathered). The same bits either way; parameters sharded
            otherwise than by one ``Shard(d)`` mesh dimension are stepped by every rank.
        **unsupported: AdamW's ``betas``, ``eps``, ``amsgrad`` (the net fixes its own), ``fused``, ``capturable`` and
            ``differentiable`` raise a ``TypeError`` that says why, as does any other unknown keyword.
    """

    def __init__(
        self,
        params: Iterable[Any],
        rule: UpdateRule,
        lr: float | Tensor | None = None,
        *,
        weight_decay: float = 0.0,
        maximize: bool = False,
        foreach: bool | None = None,
        chunk_size: int | None | Literal["auto"] = "auto",
        nonfinite: NonFinitePolicy = "raise",
        state_dtype: torch.dtype | Mapping[str, torch.dtype] = torch.float32,
        compile: bool | Mapping[str, Any] = False,
        sharded_step: ShardedStep = "owner",
        **unsupported: Any,
    ) -> None:
        if unsupported:
            name = next(iter(unsupported))
            why = _UNSUPPORTED_ARGUMENTS.get(name, "{} got an unexpected keyword argument {!r}")
            raise TypeError(why.format(type(self).__name__, name))
        if not isinstance(rule, UpdateRule):
            raise TypeError(f"rule must be a learned_optim UpdateRule, got {type(rule).__name__}")
        if lr is None:
            lr = rule.default_lr if isinstance(rule, UpdateRule) else 1.0
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("a tensor lr must have exactly one element")
        if not 0.0 <= float(lr):
            raise ValueError(f"invalid learning rate: {lr}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        if chunk_size != "auto" and chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer, None or 'auto', got {chunk_size!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if sharded_step not in SHARDED_STEPS:
            raise ValueError(f"sharded_step must be one of {SHARDED_STEPS}, got {sharded_step!r}")
        dtypes = state_dtype.values() if isinstance(state_dtype, Mapping) else [state_dtype]
        if not all(isinstance(d, torch.dtype) and d.is_floating_point for d in dtypes):
            raise ValueError(
                f"state_dtype must be a floating dtype or a mapping of state names to them, got {state_dtype}"
            )
        if isinstance(state_dtype, Mapping):
            unknown = set(state_dtype) - rule.state_names()
            if unknown:
                raise ValueError(
                    f"state_dtype names {sorted(unknown)}, but the {rule.family} net keeps {sorted(rule.state_names())}"
                )
            state_dtype = dict(state_dtype)
        self.rule = rule.requires_grad_(False)
        self.chunk_size = chunk_size
        self.nonfinite = nonfinite
        self.sharded_step = sharded_step
        self.state_dtype = state_dtype
        self.compile = dict(compile) if isinstance(compile, Mapping) else bool(compile)
        self._compiled_rule: Callable[..., Any] | None = None
        self._tensor_state_shapes: dict[torch.Size, list[tuple[str, tuple[int, ...]]]] = {}
        self.skipped_steps = 0
        defaults = dict(lr=lr, weight_decay=weight_decay, maximize=maximize, foreach=foreach, differentiable=False)
        super().__init__(params, defaults)
        devices = {p.device for group in self.param_groups for p in group["params"]}
        if not self.compile and any(d.type == "cpu" for d in devices):
            kernels.available()  # build (or load) the native kernels now rather than inside the first step
        if len(devices) == 1 and next(iter(devices)).type != "meta":  # meta: not materialised yet
            self.rule.to(devices.pop())  # e.g. a model already moved to CUDA

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``, refusing a parameter listed twice in the group (torch only
        warns): the learned step takes each parameter once per step, with one step count, where AdamW applies two
        updates, so the result would match neither."""
        params = param_group.get("params") if isinstance(param_group, dict) else None
        if params is not None and not isinstance(params, (Tensor, set)):  # (torch's own errors for the others)
            param_group["params"] = listed = list(params)  # as torch does (a generator is read once, here)
            tensors = [p[1] if isinstance(p, tuple) else p for p in listed]  # (named parameters: (name, tensor))
            if len({id(p) for p in tensors}) != len(tensors):
                raise ValueError(
                    "a parameter is listed twice in one param group; list each once (tied weights: "
                    "model.parameters() lists a shared tensor once)"
                )
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ pickling / copying
    _EXTRA_ATTRS = ("rule", "chunk_size", "nonfinite", "state_dtype", "skipped_steps", "compile", "sharded_step")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: getattr(self, k) for k in self._EXTRA_ATTRS})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("compile", False)
        state.setdefault("sharded_step", "every_rank")  # (pickled before sharded steps had owners)
        super().__setstate__(state)
        self._compiled_rule = None  # a compiled wrapper is never pickled; rebuilt at the next step
        self._tensor_state_shapes = {}

    def _state_dtype(self, key: str) -> torch.dtype:
        if isinstance(self.state_dtype, Mapping):
            return self.state_dtype.get(key, torch.float32)
        return self.state_dtype

    def _init_state(self, p: Tensor) -> dict[str, Tensor]:
        """Fresh state of ``p``: a float32 step count and the net's zero state in :meth:`_state_dtype`."""
        local = _local(p)
        fresh = self.rule.init_state(local.numel(), device=p.device, dtype=torch.float32, shape=tuple(local.shape))
        state = {k: v.to(self._state_dtype(k)) for k, v in fresh.items()}
        if is_dtensor(p):  # per-coordinate state sharded like the parameter: global shape param.shape + state shape
            from torch.distributed.tensor import DTensor, Replicate

            shapes = self.rule.state_shapes()
            state = {
                k: DTensor.from_local(
                    v.view(*local.shape, *shapes[k]),
                    p.device_mesh,
                    p.placements,
                    run_check=False,
                    shape=torch.Size((*p.shape, *shapes[k])),
                    stride=torch.empty((*p.shape, *shapes[k]), device="meta").stride(),
                )
                for k, v in state.items()
                if k in shapes
            }
            # per-tensor state (a whole-tensor rule's) of the whole tensor, the same on every rank
            replicated = [Replicate()] * p.device_mesh.ndim
            for k, shape in self.rule.tensor_state_shapes(tuple(p.shape)).items():
                zeros = torch.zeros(shape, device=local.device, dtype=self._state_dtype(k))
                state[k] = DTensor.from_local(zeros, p.device_mesh, replicated, run_check=False)
        return {"step": torch.zeros((), dtype=torch.float32), **state}

    def _net(self) -> Callable[..., Any]:
        """The callable applied to each chunk: the rule itself, or its ``torch.compile`` wrapper."""
        if not self.compile:
            return self.rule
        if self._compiled_rule is None:
            options = {"fullgraph": True} if self.compile is True else dict(self.compile)
            logger.info("LearnedOptimizer: compiling the %s net with torch.compile(%s)", self.rule.family, options)
            compiled = torch.compile(self.rule, **options)

            def run(
                grad: Tensor,
                param: Tensor,
                state: dict[str, Tensor],
                step: Tensor,
                stats: Tensor | None,
                **kwargs: Any,
            ) -> tuple[Tensor, dict[str, Tensor]]:
                for t in (grad, param, *state.values()):
                    torch._dynamo.maybe_mark_dynamic(t, 0)  # one graph for every chunk length
                try:
                    return compiled(grad, param, state, step, stats, **kwargs)
                except Exception as err:
                    if not type(err).__module__.startswith(("torch._dynamo", "torch._inductor")):
                        raise
                    raise RuntimeError(
                        f"torch.compile of the {self.rule.family} net failed ({type(err).__name__}: "
                        f"{err}); pass compile=False to run it eagerly"
                    ) from err

            self._compiled_rule = run
        return self._compiled_rule

    def __repr__(self) -> str:
        return f"{type(self).__name__}[{self.rule.family}]" + super().__repr__()[len(type(self).__name__) :]

    # ------------------------------------------------------------------ step
    def _params_with_grad(self) -> list[tuple[dict[str, Any], Tensor]]:
        found = []
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.layout is not torch.strided:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                p_dtype, grad_dtype = p.dtype, grad.dtype
                if not (p_dtype.is_floating_point and grad_dtype.is_floating_point):
                    if p_dtype.is_complex or grad_dtype.is_complex:
                        raise RuntimeError(
                            f"{type(self).__name__} does not support complex parameters; "
                            "optimize torch.view_as_real(param) instead"
                        )
                    raise RuntimeError(
                        f"{type(self).__name__} steps floating-point parameters only; a parameter of dtype {p_dtype} "
                        f"has a gradient of dtype {grad_dtype}"
                    )
                found.append((group, p))
        return found

    def _fits_tensor_state(self, p: Tensor, state: dict[str, Tensor]) -> bool:
        """Whether the per-tensor state in ``state`` has the shapes :meth:`UpdateRule.tensor_state_shapes` gives
        ``p``'s shape (looked up per shape: this runs every step, every parameter)."""
        want = self._tensor_state_shapes.get(p.shape)
        if want is None:
            want = self._tensor_state_shapes[p.shape] = list(self.rule.tensor_state_shapes(tuple(p.shape)).items())
        for k, shape in want:  # (a loop: a generator costs more than the comparisons here)
            if state[k].shape != shape:
                return False
        return True

    def _param_name(self, group: dict[str, Any], p: Tensor) -> str:
        names = group.get("param_names")
        index = next(i for i, q in enumerate(group["params"]) if q is p)
        if names is not None:
            return repr(names[index])
        return f"#{index} of param group {self.param_groups.index(group)} (shape {tuple(p.shape)})"

    def _gradient_limit(self) -> float:
        """The smallest gradient magnitude whose square overflows the net's dtype (~1.8e19 in float32): such an entry
        counts as non-finite (:meth:`_find_nonfinite`)."""
        return float(torch.finfo(self.rule.compute_dtype).max ** 0.5)

    def _find_nonfinite(
        self, items: list[tuple[dict[str, Any], Tensor]], devices: set[torch.device]
    ) -> tuple[dict[str, Any], Tensor] | None:
        if not items:
            return None
        # the 2-norm per tensor (one foreach kernel; NaN and inf propagate, empty tensors are finite), then the exact
        # max |g| of a tensor whose 2-norm is not below the limit, as huge finite values overflow the sum of squares
        # (the inf-norm itself is ~40x slower on CPU: 2.9 ms against 0.07 ms at 1M coordinates). An entry whose
        # square overflows the net's dtype counts as non-finite: it would make the second moments inf (every
        # family keeps g^2 statistics), which no later step recovers from
        limit = self._gradient_limit()
        sharded = any(is_dtensor(p) for _, p in items)
        grads = [cast(Tensor, p.grad) for _, p in items]  # params with grads only
        if sharded:
            grads = [_local(g) for g in grads]
        present = [i for i, g in enumerate(grads) if g.numel() > 0]
        norms = torch._foreach_norm([grads[i] for i in present], 2.0) if present else []
        if len(devices) > 1:
            norms = [m.to(norms[0].device) for m in norms]
        stacked = torch.stack(list(norms)) if norms else None
        # the usual case in one check (the sum of the norms is below the limit only if each is, NaN never is); the
        # rest finds the tensor to name
        if not sharded and (stacked is None or stacked.sum().item() < limit):
            return None
        finite = torch.ones(len(grads), dtype=torch.bool)
        if stacked is not None:
            finite[present] = (stacked < limit).cpu()
            for i in (~finite).nonzero().flatten().tolist():
                finite[i] = bool(torch.linalg.vector_norm(grads[i], float("inf")) < limit)
        if sharded:  # a shard's NaN stops the step on every rank
            import torch.distributed as dist

            flags = finite.to(device=items[0][1].device, dtype=torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
            finite = flags.cpu().bool()
        if bool(finite.all()):
            return None
        return items[int((~finite).nonzero()[0])]

    @_eager_under_compile
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss.

        The step runs with autocast off on the parameters' devices: a training step written wholly inside
        ``torch.autocast`` would otherwise run the net's matrix products in low precision against its float32
        state. Under ``torch.compile`` (a compiled training step, or the step itself) Dynamo skips it and it runs
        eagerly, with the eager step's bits: its native calls and data-dependent checks would only break the graph.
        ``compile=True`` compiles the net inside the step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items = self._params_with_grad()
        devices = {p.device for _, p in items}
        with contextlib.ExitStack() as autocast_off:
            for kind in {device.type for device in devices}:
                if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
                    autocast_off.enter_context(torch.autocast(kind, enabled=False))
            self._update(items, devices)
        return loss

    def _update(self, items: list[tuple[dict[str, Any], Tensor]], devices: set[torch.device]) -> None:
        """The step of the parameters with gradients (``items``: each with its group; ``devices``: theirs), or
        nothing where a gradient is not finite (:attr:`nonfinite`)."""
        bad = self._find_nonfinite(items, devices)
        if bad is not None:
            if self.nonfinite == "skip":
                self.skipped_steps += 1
                return
            raise NonFiniteGradientError(
                f"non-finite gradient (NaN or inf, or an entry of magnitude {self._gradient_limit():.3g} or more, "
                f"whose square overflows the net's {self.rule.compute_dtype}) in parameter {self._param_name(*bad)}; "
                "nothing was updated. Pass nonfinite='skip' to skip such steps, or use torch.amp.GradScaler."
            )
        kept = {"step", *self.rule.state_names()}
        sized = next(iter(self.rule.state_shapes()), None)  # a per-coordinate state: one row per coordinate
        shaped = self.rule.whole_tensor  # per-tensor state shaped by the parameter's shape (tensor_state_shapes)
        todo: dict[int, tuple[list[Tensor], list[dict[str, Tensor]]]] = {}  # per group: its params, their states
        for group, p in items:
            state = self.state[p]
            if kept.isdisjoint(state):  # new, or only a wrapper's keys (Lookahead's slow weights after a skipped step)
                state.update(self._init_state(p))
            elif not kept <= state.keys():  # state put there by a wrapper that loads it (ZeRO), not load_state_dict
                raise ValueError(  # (keys beyond the net's are a wrapper's own, e.g. timm's Lookahead's: fine)
                    f"the state of parameter {self._param_name(group, p)} has keys {sorted(state)}, but this "
                    f"{self.rule.family} net keeps {sorted(kept)}: state from another optimizer? Nothing was updated"
                )
            elif sized is not None and not is_dtensor(p) and state[sized].shape[0] != p.numel():
                raise ValueError(
                    f"parameter {self._param_name(group, p)} has {p.numel()} elements, but its optimizer state was "
                    f"made for {state[sized].shape[0]} (a parameter resized in place?). Nothing was updated"
                )
            elif shaped and not is_dtensor(p) and not self._fits_tensor_state(p, state):
                found = ", ".join(f"{k} {tuple(state[k].shape)}" for k in self.rule.tensor_state_shapes(tuple(p.shape)))
                raise ValueError(
                    f"parameter {self._param_name(group, p)}: its optimizer state ({found}) was made for another "
                    f"shape than {tuple(p.shape)} (a parameter reshaped in place?). Nothing was updated"
                )
            group_params, group_states = todo.setdefault(id(group), ([], []))
            group_params.append(p)
            group_states.append(state)
        for group in self.param_groups:
            if id(group) in todo and float(group["lr"]) == 0.0:
                del todo[id(group)]
        steps = [state["step"] for _, states in todo.values() for state in states]
        if steps:
            torch._foreach_add_(steps, 1.0)
        for group in self.param_groups:
            lr, weight_decay, maximize = group["lr"], group["weight_decay"], group["maximize"]
            if self.rule.uses_lr_ratio:
                group["peak_lr"], ratio = schedules.group_lr_ratio(group)
                self.rule.set_lr_ratio(ratio)
            params, states = todo.get(id(group), ([], []))
            params = self._step_in_place(params, states, lr, weight_decay, maximize)
            packs, singles = self._plan_packs(params)
            singles = self._step_sharded_by_owners(singles, lr, weight_decay, maximize)
            for p in singles:
                self._update_tensor(p, self.state[p], lr, weight_decay, maximize)
            for pack in packs:
                packing.packed_step(
                    pack, [self.state[p] for p in pack], self.rule, self._net(), lr, weight_decay, maximize
                )

    def _step_in_place(
        self,
        params: list[Tensor],
        states: list[dict[str, Tensor]],
        lr: float | Tensor,
        weight_decay: float,
        maximize: bool,
    ) -> list[Tensor]:
        """The rule's in-place step (:meth:`UpdateRule.step_in_place`) over a group's parameters (``states``:
        theirs) in one call (:attr:`UpdateRule.per_tensor_steps`) or one per step count; returns those it left. Not
        compiled, not ``maximize``, not sharded (DTensor) ones."""
        offered = type(self.rule).step_in_place is not UpdateRule.step_in_place
        if not offered or self.compile or maximize or not params:
            return params
        plain = [(p, state) for p, state in zip(params, states, strict=True) if not is_dtensor(p)]
        if not plain:
            return params
        left: list[Tensor] = [p for p in params if is_dtensor(p)]
        for same in packing.by_step_count(plain, self.rule):
            step = packing.step_counts([state for _, state in same], self.rule)
            left += self.rule.step_in_place([p for p, _ in same], [state for _, state in same], step, lr, weight_decay)
        return left

    def _chunk_rows(self, device: torch.device) -> int | None:
        """Coordinates per net call on ``device`` (a multiple of :data:`ROW_ALIGN`), ``None`` for whole tensors."""
        chunk = self.chunk_size
        if chunk is None:
            return None
        if chunk == "auto":
            native = (
                not self.compile
                and device.type == "cpu"
                and self.rule.compute_dtype == torch.float32
                and kernels.serves(self.rule.family)
            )
            if native:
                chunk = KERNEL_CHUNK_SIZE
            elif device.type == "cpu":
                chunk = self.rule.cpu_chunk_size() or DEFAULT_CHUNK_SIZE
            else:
                chunk = ACCELERATOR_CHUNK_SIZE
        return packing.align_rows(chunk)

    def _plan_packs(self, params: list[Tensor]) -> tuple[list[list[Tensor]], list[Tensor]]:
        """Split a group's parameters into packs and the tensors stepped alone (:func:`packing.plan_packs`)."""
        if not self.rule.packs_segments or self.compile or self.chunk_size is None or len(params) < 2:
            return [], params
        return packing.plan_packs(params, self.state, self.rule, self._chunk_rows)

    def _step_sharded_by_owners(
        self, params: list[Tensor], lr: float | Tensor, weight_decay: float, maximize: bool
    ) -> list[Tensor]:
        """A whole-tensor rule's step of the FSDP2-sharded ``params`` that
        :func:`~learned_optim.sharded_step.step_by_owners` takes, each on one rank (``sharded_step="owner"``);
        returns the parameters left to :meth:`_update_tensor`, in order."""
        sharded = [p for p in params if is_dtensor(p)]
        if self.sharded_step != "owner" or not self.rule.whole_tensor or not sharded:
            return params

        def step_whole(whole: Tensor, state: dict[str, Tensor]) -> None:
            self._update_tensor(whole, state, lr, weight_decay, maximize)

        per_coordinate = list(self.rule.state_shapes())
        left = sharded_step.step_by_owners(sharded, [self.state[p] for p in sharded], per_coordinate, step_whole)
        kept = {id(p) for p in left}
        return [p for p in params if not is_dtensor(p) or id(p) in kept]

    def _update_tensor(
        self, p: Tensor, state: dict[str, Tensor], lr: float | Tensor, weight_decay: float, maximize: bool
    ) -> None:
        rule, dtype, net = self.rule, self.rule.compute_dtype, self._net()
        sharded = is_dtensor(p)
        if sharded and rule.whole_tensor:
            self._update_sharded_whole_tensor(p, state, lr, weight_decay, maximize)
            return
        groups = (
            [p.device_mesh.get_group(i) for i, pl in enumerate(p.placements) if pl.is_shard()] if is_dtensor(p) else []
        )
        grad = _local(cast(Tensor, p.grad)).reshape(-1)
        p = _local(p)
        if maximize:
            grad = -grad
        contiguous = p.is_contiguous()
        flat = p.view(-1) if contiguous else p.reshape(-1).clone()
        step = state["step"].to(device=p.device, dtype=dtype)
        n = flat.numel()
        coord_state = {k: _local(state[k]).view(n, *shape) for k, shape in rule.state_shapes().items()}
        if not sharded:
            if n == 0:  # nothing to step (and no statistics of nothing)
                return
            stats = rule.tensor_stats(grad, flat, coord_state, step)
        else:
            stats = self._sharded_stats(grad, flat, coord_state, step, groups)
        if n == 0:  # an empty shard (after joining the statistics' all-reduce)
            return
        if rule.whole_tensor:
            self._update_whole_tensor(flat, grad, state, step, stats, lr, weight_decay, tuple(p.shape))
            if not contiguous:
                p.copy_(flat.view_as(p))
            return
        chunk = self._chunk_rows(p.device) or packing.align_rows(n)
        if isinstance(lr, Tensor):
            lr = lr.to(device=p.device, dtype=dtype)
        for start in range(0, n, chunk):
            part = slice(start, min(start + chunk, n))
            rows = part.stop - start
            padded = packing.align_rows(rows)
            theta = flat[part].to(dtype)
            chunk_state = {k: packing.pad_rows(v[part].to(dtype), padded) for k, v in coord_state.items()}
            # the state storage itself (not a cast or padded copy): the rule may write the new state into it
            in_place = not self.compile and all(
                v.data_ptr() == coord_state[k][part].data_ptr() for k, v in chunk_state.items()
            )
            extra = {"out_state": chunk_state} if in_place else {}
            delta, new_state = net(
                packing.pad_rows(grad[part].to(dtype), padded),
                packing.pad_rows(theta, padded),
                chunk_state,
                step,
                stats,
                **extra,
            )
            flat[part] = stepped_parameter(flat[part], theta, delta[:rows], lr, weight_decay)
            for k, v in new_state.items():
                if not (in_place and v is chunk_state[k]):
                    coord_state[k][part] = v[:rows]
        if not contiguous:
            p.copy_(flat.view_as(p))

    def _update_whole_tensor(
        self,
        flat: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        step: Tensor,
        stats: Tensor | None,
        lr: float | Tensor,
        weight_decay: float,
        shape: tuple[int, ...],
    ) -> None:
        """One call of a whole-tensor rule on the flat tensor (no chunks, no padding); see ``UpdateRule``."""
        rule, dtype, n = self.rule, self.rule.compute_dtype, flat.numel()
        names = [*rule.state_shapes(), *rule.tensor_state_shapes(shape)]
        per_coord = rule.state_shapes()
        current = {k: (state[k].view(n, *per_coord[k]) if k in per_coord else state[k]).to(dtype) for k in names}
        # the state storage itself (not a cast copy): the rule may write the new state into it
        in_place = not self.compile and all(current[k].data_ptr() == state[k].data_ptr() for k in names)
        extra: dict[str, Any] = {"out_state": current} if in_place else {}
        update_in_place = flat.dtype == dtype and not torch.is_grad_enabled()
        if in_place and update_in_place and rule.applies_update:
            extra["update"] = (lr, weight_decay)  # the rule may apply it to flat itself
        delta, new_state = self._net()(grad.to(dtype), flat.to(dtype), current, step, stats, shape=shape, **extra)
        if isinstance(lr, Tensor):
            lr = lr.to(device=flat.device, dtype=dtype)
        if delta is not None:  # (None: the rule applied the update to flat itself)
            if update_in_place:
                decoupled_update_(flat, delta, lr, weight_decay)
            else:
                flat.copy_(stepped_parameter(flat, flat.to(dtype), delta, lr, weight_decay))
        for k in names:
            if not (in_place and new_state[k] is current[k]):
                state[k].copy_(new_state[k].view_as(state[k]))

    def _update_sharded_whole_tensor(
        self, p: Tensor, state: dict[str, Tensor], lr: float | Tensor, weight_decay: float, maximize: bool
    ) -> None:
        """A whole-tensor rule's step of an FSDP2-sharded tensor: the whole tensor, its gradient and per-coordinate
        state gathered on every rank, the unsharded step (:meth:`_update_tensor` of the gathered tensors), each rank's
        shard kept."""
        from torch.distributed.tensor import DTensor, Replicate

        sharded_grad = p.grad
        assert is_dtensor(p) and sharded_grad is not None and is_dtensor(sharded_grad)
        mesh, replicated = p.device_mesh, [Replicate()] * p.device_mesh.ndim
        per_coord = self.rule.state_shapes()
        whole_p = p.full_tensor().contiguous()
        whole_p.grad = sharded_grad.full_tensor().contiguous()
        whole = {
            k: (cast(DTensor, v).full_tensor().contiguous() if k in per_coord else _local(v)) for k, v in state.items()
        }
        if whole_p.numel() == 0:
            return
        self._update_tensor(whole_p, whole, lr, weight_decay, maximize)  # the unsharded step, in place in whole_p

        def keep_shard(target: Tensor, value: Tensor) -> None:  # this rank's shard of ``value``, into ``target``
            placements = cast(DTensor, target).placements
            shard = DTensor.from_local(value, mesh, replicated, run_check=False).redistribute(mesh, placements)
            _local(target).copy_(shard.to_local())

        keep_shard(p, whole_p)
        for k in per_coord:
            keep_shard(state[k], whole[k])

    def _sharded_stats(
        self, grad: Tensor, flat: Tensor, coord_state: dict[str, Tensor], step: Tensor, groups: list[Any]
    ) -> Tensor | None:
        """Per-tensor statistics of a sharded tensor: the shards' means, weighted by their sizes and
        all-reduced over the mesh dimensions that shard it (statistics are means over coordinates)."""
        import torch.distributed as dist

        n = flat.numel()
        if n == 0:  # an empty shard still joins the all-reduce, with zero weight
            one = flat.new_zeros(1)
            local = self.rule.tensor_stats(
                one, one, {k: v.new_zeros((1, *v.shape[1:])) for k, v in coord_state.items()}, step
            )
            local = None if local is None else local * 0.0
        else:
            local = self.rule.tensor_stats(grad, flat, coord_state, step)
        if local is None:
            return None
        total = torch.cat([local.reshape(-1) * n, local.new_tensor([float(n)])])
        for group in groups:
            dist.all_reduce(total, group=group)
        return (total[:-1] / total[-1]).view_as(local)

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load optimizer state; the net's state keeps :attr:`state_dtype` whatever the param dtype.

        ``torch.optim.Optimizer`` casts floating state to the param dtype, which would round RNN
        state to bf16/fp16 for low-precision params; here each state tensor is instead taken from
        ``state_dict`` and moved to the param's device in :attr:`state_dtype`, so a resume is
        bit-identical. Load-state-dict hooks run as with ``torch.optim``: the pre-hooks (which may return a new
        dict) before anything is checked or loaded, the post-hooks on the loaded state.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        if len(saved_ids) != len(params):
            raise ValueError(f"state_dict has {len(saved_ids)} parameters, this optimizer has {len(params)}")
        per_coord = self.rule.state_shapes()
        names = {"step", *self.rule.state_names()}
        for pid, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(pid)
            if not saved or names.isdisjoint(saved):  # no state of the net's (at most a wrapper's own keys)
                continue
            expected = {
                **{k: (*p.shape, *s) if is_dtensor(p) else (p.numel(), *s) for k, s in per_coord.items()},
                **self.rule.tensor_state_shapes(tuple(p.shape)),
            }
            missing = sorted({"step", *expected} - set(saved))
            if missing:  # (keys beyond the net's are a wrapper's, e.g. timm's Lookahead's slow weights: kept)
                raise ValueError(
                    f"state of parameter {pid} has keys {sorted(saved)}, but this {self.rule.family} net keeps "
                    f"{sorted({'step', *expected})} (missing {missing}): state from another optimizer?"
                )
            for k, want in expected.items():
                if tuple(saved[k].shape) != want:
                    raise ValueError(
                        f"state {k!r} of parameter {pid} has shape {tuple(saved[k].shape)}, expected {want}"
                    )
        net = self._checked_net_weights(state_dict.get(NET_STATE_KEY))
        # torch's load must not run the pre-hooks again; the post-hooks see the state as loaded below
        with self._torch_hooks_held("_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"):
            super().load_state_dict(state_dict)
        if net is not None:
            with torch.no_grad():
                for name, value in self.rule.state_dict().items():
                    value.copy_(net[name])
        for pid, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(pid)
            if not saved or names.isdisjoint(saved):
                continue
            state = self.state[p]
            state["step"] = saved["step"].detach().clone().to(torch.float32)
            for k in (names - {"step"}).intersection(saved):  # (a wrapper's keys stay as torch loaded them)
                state[k] = saved[k].detach().to(device=p.device, dtype=self._state_dtype(k), copy=True)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state dict (per-parameter state and param groups) and, under :data:`NET_STATE_KEY`, the
        net's family and weights: the net is part of what the optimizer does, and :func:`learned_optim.adapt` changes
        it, so a training checkpoint taken after an adaptation resumes with the adapted net. Post-hooks see the whole
        dict."""
        with self._torch_hooks_held("_optimizer_state_dict_post_hooks"):
            state_dict = super().state_dict()
        weights = {name: value.detach() for name, value in self.rule.state_dict().items()}
        state_dict[NET_STATE_KEY] = {"family": self.rule.family, "weights": weights}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            state_dict = post_hook(self, state_dict) or state_dict
        return state_dict

    def _checked_net_weights(self, saved: Any) -> dict[str, Tensor] | None:
        """The net weights of a state dict's :data:`NET_STATE_KEY` entry, checked against this optimizer's net
        (``None`` when the state dict has none: one saved before the net was saved with the state, or by DCP)."""
        if saved is None:
            return None
        expected = self.rule.state_dict()
        weights = saved.get("weights") if isinstance(saved, Mapping) else None
        family = saved.get("family") if isinstance(saved, Mapping) else None
        if family != self.rule.family or not isinstance(weights, Mapping) or set(weights) != set(expected):
            raise ValueError(
                f"state_dict's net ({family!r} net with weights {sorted(weights or {})}) is not this optimizer's "
                f"{self.rule.family} net (weights {sorted(expected)}): state from another optimizer?"
            )
        for name, value in expected.items():
            if not isinstance(weights[name], Tensor) or weights[name].shape != value.shape:
                raise ValueError(f"state_dict's net weight {name!r} is not a tensor of shape {tuple(value.shape)}")
        return {name: weights[name].to(device=value.device, dtype=value.dtype) for name, value in expected.items()}

    @contextlib.contextmanager
    def _torch_hooks_held(self, *names: str) -> Iterator[None]:
        """``torch.optim.Optimizer``'s hook tables ``names`` emptied inside the block, where this class calls its
        base's method and runs those hooks itself, at the right moment."""
        held = {name: getattr(self, name) for name in names}
        for name in names:
            setattr(self, name, OrderedDict())
        try:
            yield
        finally:
            for name, hooks in held.items():
                setattr(self, name, hooks)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, save_directory: str, **card: Any) -> None:
        """Write the net as a checkpoint folder (config.json, model.safetensors, README.md).

        After :meth:`adapt`, ``config.json``'s ``training.adaptation`` and ``training.parent`` (and the card)
        say what the net was adapted on and from (see :func:`learned_optim.save_pretrained`).
        """
        from .hub import save_pretrained

        save_pretrained(self.rule, save_directory, **card)

    def adapt(
        self, model: torch.nn.Module, loss_fn: Callable[..., Tensor], batches: Iterable[Any], **kwargs: Any
    ) -> Any:
        """Fine-tune this optimizer's net on ``model`` + ``loss_fn`` (M-L2O); see :func:`learned_optim.adapt`."""
        from .adapt import adapt

        return adapt(self, model, loss_fn, batches, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload the net as a checkpoint to the Hugging Face Hub; returns the commit URL."""
        from .hub import push_to_hub

        return push_to_hub(self.rule, repo_id, **kwargs)
