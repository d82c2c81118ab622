r"""Test-time fast self-adaptation (M-L2O): fine-tune a learned optimizer's own net on your model and data.

>>> opt = learned_optim.from_pretrained("m-l2o", model.parameters())            # doctest: +SKIP
>>> learned_optim.adapt(opt, model, torch.nn.functional.cross_entropy, loader, steps=5)  # doctest: +SKIP
>>> for x, y in loader: ...                                                       # train as usual

:func:`adapt` takes ``steps`` Adam steps (lr ``lr``) on the net's weights :math:`\phi`. Each step runs
a short differentiable unroll of ``unroll`` optimizer steps on *your* model, functionally
(``torch.func.functional_call``), starting from the model's current weights and the optimizer's
current state,

.. math::
    g_t = \nabla_\theta \ell(\theta_{t-1}; B_t),
    \quad (\Delta_t, s_t) = \mathrm{net}_\phi(g_t, \theta_{t-1}, s_{t-1}, t),
    \quad \theta_t = \theta_{t-1}(1 - \eta\lambda) + \eta\,\Delta_t

(exactly the optimizer's step: its ``lr`` :math:`\eta`, decoupled ``weight_decay`` :math:`\lambda` and
``maximize`` per param group; with bf16 parameters the unroll rounds each update to bf16 where the optimizer adds
it in float32, so their trajectories part by a bf16 rounding per step), and descends the meta-objective of the losses
:math:`\ell(\theta_1; B_2), \dots, \ell(\theta_T; B_{T+1})` (``objective="sum"``, the meta-training
default, or ``"log"``, :math:`\frac1T\sum_t \log(\ell_t/\ell_0)`, insensitive to the loss's scale).
With ``chain=True`` (default) each unroll continues where the previous one ended, so 5 unrolls of 20
cover the first 100 steps of training; ``chain=False`` restarts every unroll from the model's weights.
Every batch is used once; a re-iterable ``batches`` (a ``DataLoader``, a list) is cycled when it runs
out, a one-shot iterator that runs out is an error.

Guarantees:

* the user's model is never modified (parameters are substituted functionally and buffers such as
  BatchNorm running statistics are cloned) unless ``restore_model=False``, in which case it is left
  at the end of the last unroll and the optimizer's state is set to match, so training continues
  from there;
* the optimizer's net changes only if every step succeeded: a loss that does not depend on the
  optimized parameters, an empty or exhausted iterator, or a non-finite meta-loss/meta-gradient raise
  before anything is committed (``nonfinite="skip"`` skips such steps instead);
* afterwards the optimizer is ready for ``opt.step()`` (its per-parameter state is untouched), and
  :meth:`LearnedOptimizer.save_pretrained` records what it was adapted on (``training.adaptation``) and,
  for a net loaded by :func:`~learned_optim.from_pretrained`, the checkpoint it came from
  (``training.parent``, a ``<parent>-adapted`` name and the parent's optimizer defaults) in ``config.json``
  and the model card.

Devices: the unrolls run on the device of the optimized parameters (CPU or GPU); when the optimizer's net
lives elsewhere, a copy of it is moved there and the adapted weights are copied back into ``opt.rule``.
(:func:`~learned_optim.from_pretrained` already puts the net on the parameters' device.)

Memory: the unroll keeps the graph of ``unroll`` steps of the model *and* of the net over every
coordinate (RNNProp: ~100 floats per coordinate per step), so adapt large models with a short
``unroll`` or on a subset of their parameters (an optimizer built over that subset).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._numerics import global_norm
from .functional import apply_rule, decoupled_update, to_device
from .nets.base import UpdateRule
from .objectives import OBJECTIVES, meta_objective
from .schedules import group_lr_ratio

__all__ = ["adapt", "adapt_weights", "AdaptationError", "AdaptationResult"]


class AdaptationError(RuntimeError):
    """Adaptation failed (non-finite meta-loss or meta-gradient, ...); the optimizer's net is unchanged."""


@dataclasses.dataclass
class AdaptationResult:
    """What :func:`adapt` did: the meta-loss of every step, batches consumed, and the recorded summary."""

    meta_losses: list[float]
    batches_seen: int
    skipped_steps: int
    record: dict[str, Any]


# ------------------------------------------------------------------------------ the transactional core
def adapt_weights(
    rule: UpdateRule,
    segment_loss: Callable[[Mapping[str, Tensor], int], Tensor],
    *,
    steps: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    grad_clip: float | None = None,
    nonfinite: str = "raise",
    device: torch.device | None = None,
    progress: bool = False,
    skipped: list[int] | None = None,
) -> list[float]:
    """``steps`` Adam steps on ``rule``'s weights, committed to ``rule`` only when all succeeded.

    ``segment_loss(weights, k)`` returns the meta-loss of adaptation step ``k`` as a differentiable
    function of ``weights`` (leaf copies of the net's parameters, on ``device``). A non-finite
    meta-loss or meta-gradient raises :class:`AdaptationError` (``nonfinite="raise"``; ``rule`` is
    untouched) or skips that step (``"skip"``; its index is appended to ``skipped``). Returns the
    meta-losses (``nan`` for skipped steps).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    names = [n for n, _ in rule.named_parameters()]
    weights = {n: p.detach().to(device=device).clone().requires_grad_(True) for n, p in rule.named_parameters()}
    optimizer = torch.optim.Adam(list(weights.values()), lr=lr, betas=betas)
    losses: list[float] = []
    iterator: Iterable[int] = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="adapting optimizer", unit="step")
    for k in iterator:
        loss = segment_loss(weights, k)
        value = float(loss.detach())
        problem = None
        grads: list[Tensor] | None = None
        if not math.isfinite(value):
            problem = f"the meta-loss is {value}"
        else:
            if not loss.requires_grad:
                raise AdaptationError(
                    f"adaptation step {k + 1}: the meta-loss does not depend on the optimizer's "
                    "weights (every learned step was a no-op: lr 0, or the run diverged at once)"
                )
            raw = torch.autograd.grad(loss, [weights[n] for n in names], allow_unused=True)
            grads = [torch.zeros_like(weights[n]) if g is None else g for n, g in zip(names, raw, strict=True)]
            norm = global_norm(grads)
            if not math.isfinite(norm):
                problem = f"the meta-gradient norm is {norm}"
        if problem is not None:
            if nonfinite == "raise":
                raise AdaptationError(
                    f"adaptation step {k + 1} of {steps}: {problem}; the adaptation was rolled "
                    "back (the optimizer's net is unchanged). Try a smaller lr or unroll, or "
                    "nonfinite='skip'."
                )
            losses.append(float("nan"))
            if skipped is not None:
                skipped.append(k)
            continue
        assert grads is not None
        if grad_clip is not None:
            total = global_norm(grads)
            if total > grad_clip:
                grads = [g * (grad_clip / total) for g in grads]
        for n, g in zip(names, grads, strict=True):
            weights[n].grad = g
        optimizer.step()
        losses.append(value)
    with torch.no_grad():
        for n, p in rule.named_parameters():
            p.copy_(weights[n].detach().to(device=p.device, dtype=p.dtype))
    return losses


# ------------------------------------------------------------------------------------ user model side
class _Batches:
    """Pulls ``(inputs, targets)`` pairs; cycles a re-iterable source; clear errors when empty/exhausted."""

    def __init__(self, batches: Iterable[Any], needed: int) -> None:
        self.source, self.needed, self.seen = batches, needed, 0
        self.iterator = iter(batches)
        self.reiterable = self.iterator is not batches
        self.example: Any = None

    def next(self) -> tuple[Any, Any]:
        try:
            batch = next(self.iterator)
        except StopIteration:
            if self.seen == 0:
                raise ValueError("adapt: `batches` is empty; pass an iterable of (inputs, targets) pairs") from None
            if not self.reiterable:
                raise ValueError(
                    f"adapt: `batches` ran out after {self.seen} batches; adaptation needs "
                    f"{self.needed} (steps * (unroll + 1)). Pass a re-iterable (a DataLoader or a "
                    "list is cycled) or a longer iterator."
                ) from None
            self.iterator = iter(self.source)
            try:
                batch = next(self.iterator)
            except StopIteration:
                raise ValueError("adapt: `batches` is empty on re-iteration") from None
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                f"adapt: every batch must be an (inputs, targets) pair, got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        self.seen += 1
        if self.example is None:
            self.example = batch
        return batch[0], batch[1]


@dataclasses.dataclass
class _Point:
    """Where an unroll starts: parameter values, net state and step count per parameter, buffers."""

    params: dict[str, Tensor]
    state: dict[str, dict[str, Tensor]]
    steps: dict[str, int]
    buffers: dict[str, Tensor]


def _describe(x: Any) -> Any:
    if isinstance(x, Tensor):
        return {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
    if isinstance(x, (tuple, list)):
        return [_describe(v) for v in x]
    if isinstance(x, Mapping):
        return {str(k): _describe(v) for k, v in x.items()}
    return type(x).__name__


def _single(values: set[float]) -> float | list[float]:
    """The value shared by every param group, else the sorted distinct values."""
    return next(iter(values)) if len(values) == 1 else sorted(values)


def adapt(
    opt: Any,
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    batches: Iterable[Any],
    steps: int = 5,
    unroll: int = 20,
    lr: float = 1e-3,
    restore_model: bool = True,
    *,
    chain: bool = True,
    objective: str = "sum",
    second_order: bool = False,
    grad_clip: float | None = None,
    nonfinite: str = "raise",
    description: str | None = None,
    progress: bool = False,
) -> AdaptationResult:
    """Adapt ``opt``'s learned net to ``model`` + ``loss_fn`` on ``batches`` (see the module docstring).

    Args:
        opt: a :class:`~learned_optim.LearnedOptimizer` over (some of) ``model``'s parameters.
        model: any ``nn.Module``; only its parameters held by ``opt`` move during the unrolls.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``, e.g. ``torch.nn.functional.cross_entropy``.
        batches: iterable of ``(inputs, targets)``; ``steps * (unroll + 1)`` batches are consumed.
        steps: Adam steps on the net's weights (M-L2O: 5).
        unroll: optimizer steps per differentiable unroll (truncation length).
        lr: Adam learning rate on the net's weights (M-L2O: 1e-3).
        restore_model: leave the model as it was (default). ``False`` leaves the model at the end of the
            last unroll and sets the optimizer's state to match (the adaptation steps count as training).
        chain: each unroll continues from the previous one's end (default) instead of the start.
        objective: ``"sum"`` (meta-training default) or ``"log"`` (mean log loss ratio), or any of
            :data:`learned_optim.objectives.OBJECTIVES`.
        second_order: keep the optimizee's second-order terms (differentiate through the gradients).
        grad_clip: clip the meta-gradient's global norm.
        nonfinite: ``"raise"`` (default; nothing is kept) or ``"skip"`` a step whose meta-loss or
            meta-gradient is not finite.
        description: free text recorded with the adaptation (e.g. the data set's name).
        progress: tqdm bar over the steps.

    Returns:
        :class:`AdaptationResult`. Raises ``ValueError``/``TypeError`` for bad inputs (empty ``batches``,
        a loss that does not depend on the parameters) and :class:`AdaptationError` for non-finite
        meta-gradients; in every failure the optimizer and the model are left unchanged.
    """
    from .optimizer import LearnedOptimizer

    if not isinstance(opt, LearnedOptimizer):
        raise TypeError(f"adapt needs a learned_optim.LearnedOptimizer, got {type(opt).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if unroll < 1 or steps < 1:
        raise ValueError(f"steps and unroll must be >= 1, got steps={steps}, unroll={unroll}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = [(n, p) for n, p in model.named_parameters() if id(p) in groups and p.requires_grad]
    if not named:
        raise ValueError("adapt: none of the model's trainable parameters is optimized by `opt`")
    maximize = {bool(groups[id(p)]["maximize"]) for _, p in named}
    if len(maximize) > 1:
        raise ValueError("adapt: param groups mix maximize=True and maximize=False")
    sign = -1.0 if maximize.pop() else 1.0
    if sign < 0 and objective in ("log", "log_last"):
        raise ValueError("adapt: the log objectives need a positive loss; use objective='sum' with maximize=True")
    device = named[0][1].device
    if len({p.device for _, p in named}) > 1:
        raise ValueError(
            "adapt: the optimized parameters are on several devices "
            f"{sorted(str(d) for d in {p.device for _, p in named})}; adapt one device's at a time"
        )
    # the unrolls run a copy of the net on the model's device (buffers included); adapt_weights commits
    # the adapted weights into opt.rule wherever it lives
    rule = opt.rule if next(opt.rule.parameters()).device == device else copy.deepcopy(opt.rule).to(device)
    dtype = rule.compute_dtype
    hyper = {n: (float(groups[id(p)]["lr"]), float(groups[id(p)]["weight_decay"])) for n, p in named}
    # where each group's schedule stands (nets with an lr-ratio input): the optimizer's next step would see this
    lr_ratios = {n: group_lr_ratio(groups[id(p)])[1] for n, p in named}
    if all(lr == 0.0 for lr, _ in hyper.values()):
        raise AdaptationError(
            "adapt: the optimizer's lr is 0 for every parameter (e.g. the first step of a warm-up from 0), so every "
            "unrolled step is a no-op and there is nothing to adapt; adapt where the lr is the one it trains with"
        )
    # the lr the user set (an LR scheduler's `initial_lr`), what a saved adapted checkpoint recommends
    base_lr = {float(groups[id(p)].get("initial_lr", groups[id(p)]["lr"])) for _, p in named}
    source = _Batches(batches, steps * (unroll + 1))

    def initial_point() -> _Point:
        params, state, counts = {}, {}, {}
        for n, p in named:
            saved = opt.state.get(p) or {}
            if saved:
                state[n] = {k: saved[k].detach().to(device=device, dtype=dtype).clone() for k in rule.state_names()}
                counts[n] = int(saved["step"])
            else:
                state[n] = rule.init_state(p.numel(), device=device, dtype=dtype, shape=p.shape)
                counts[n] = 0
            params[n] = p.detach().clone()
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        return _Point(params, state, counts, buffers)

    start = initial_point()
    current: dict[str, Any] = {"point": start, "first_loss": None}
    checked = {"done": False}

    def loss_at(params: Mapping[str, Tensor], buffers: dict[str, Tensor]) -> Tensor:
        inputs, targets = source.next()
        out = functional_call(model, {**params, **buffers}, (to_device(inputs, device),))
        loss = loss_fn(out, to_device(targets, device))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                f"adapt: loss_fn must return a scalar tensor, got "
                f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else tuple(loss.shape)}"
            )
        return sign * loss.reshape(())

    def run(weights: Mapping[str, Tensor], point: _Point) -> tuple[Tensor, _Point]:
        params = {n: v.detach().requires_grad_(True) for n, v in point.params.items()}
        state = {n: {k: v.detach() for k, v in st.items()} for n, st in point.state.items()}
        counts = dict(point.steps)
        buffers = {n: b.detach().clone() for n, b in point.buffers.items()}
        terms: list[Tensor] = []
        for i in range(unroll):
            loss = loss_at(params, buffers)
            if not checked["done"]:
                grads_probe = (
                    torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
                    if loss.requires_grad
                    else [None]
                )
                if all(g is None for g in grads_probe):
                    raise ValueError(
                        "adapt: the loss does not depend on the parameters optimized by `opt` "
                        "(loss_fn(model(inputs), targets) has no gradient with respect to them)"
                    )
                checked["done"] = True
            if current["first_loss"] is None:
                current["first_loss"] = float(loss.detach())
            if i > 0:
                terms.append(loss)
            grads = torch.autograd.grad(
                loss, list(params.values()), create_graph=second_order, retain_graph=True, allow_unused=True
            )
            new_params = dict(params)
            for (n, theta), g in zip(params.items(), grads, strict=True):
                step_lr, wd = hyper[n]
                if g is None or step_lr == 0.0:  # the optimizer skips grad-less params; lr 0 is a no-op
                    continue
                counts[n] += 1
                rule.set_lr_ratio(lr_ratios[n])
                deltas, new_state = apply_rule(rule, weights, {n: g}, {n: theta}, {n: state[n]}, counts[n])
                new_params[n] = decoupled_update(theta, deltas[n], step_lr, wd)
                state[n] = new_state[n]
            params = new_params
        # the meta-objective's last loss is no training step: its forward must not move the end point's buffers
        # (BatchNorm's running statistics), as the next unroll, or the model with restore_model=False, starts there
        terms.append(loss_at(params, {n: b.clone() for n, b in buffers.items()}))
        losses = torch.stack(terms)
        first = current["first_loss"]
        if math.isfinite(first):
            meta = meta_objective(objective, losses, initial_loss=first, last_step=max(counts.values()))
        else:  # no log objective without f_0: a non-finite meta-loss, raised or skipped as `nonfinite` says
            meta = losses.sum() * math.nan
        end = _Point(
            {n: v.detach() for n, v in params.items()},
            {n: {k: v.detach() for k, v in st.items()} for n, st in state.items()},
            counts,
            buffers,
        )
        return meta, end

    def segment_loss(weights: Mapping[str, Tensor], k: int) -> Tensor:
        meta, end = run(weights, current["point"] if chain else start)
        finite = all(bool(torch.isfinite(v).all()) for v in end.params.values())
        if finite:  # else the next unroll starts again from the last finite end point
            current["point"] = end
        return meta

    skipped: list[int] = []
    meta_losses = adapt_weights(
        rule,
        segment_loss,
        steps=steps,
        lr=lr,
        grad_clip=grad_clip,
        nonfinite=nonfinite,
        device=device,
        progress=progress,
        skipped=skipped,
    )
    if len(skipped) == steps:
        raise AdaptationError(
            f"every one of the {steps} adaptation steps was skipped (non-finite meta-loss or meta-gradient: "
            f"{meta_losses[0]}); the optimizer's net is unchanged. Try a smaller lr or unroll."
        )
    if rule is not opt.rule:
        with torch.no_grad():
            for (_, p), (_, q) in zip(opt.rule.named_parameters(), rule.named_parameters(), strict=True):
                p.copy_(q.to(device=p.device, dtype=p.dtype))
        rule = opt.rule
    record = {
        "method": "learned_optim.adapt (M-L2O test-time adaptation)",
        "model": type(model).__name__,
        "num_parameters": sum(p.numel() for _, p in named),
        "loss_fn": getattr(loss_fn, "__qualname__", None) or type(loss_fn).__name__,
        "example_batch": _describe(source.example),
        "batches_seen": source.seen,
        "optimizer_lr": _single({v[0] for v in hyper.values()}),
        "optimizer_base_lr": _single(base_lr),
        "optimizer_weight_decay": _single({v[1] for v in hyper.values()}),
        "steps": steps,
        "unroll": unroll,
        "lr": lr,
        "chain": chain,
        "objective": objective,
        "second_order": second_order,
        "grad_clip": grad_clip,
        "skipped_steps": skipped,
        "meta_loss_first": meta_losses[0] if math.isfinite(meta_losses[0]) else None,  # JSON has no NaN
        "meta_loss_last": meta_losses[-1] if math.isfinite(meta_losses[-1]) else None,
        "description": description,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    rule.provenance.adaptations.append(record)
    if not restore_model:
        end = current["point"]
        state_dtype = opt._state_dtype  # per state name
        with torch.no_grad():
            for n, p in named:
                p.copy_(end.params[n])
                state = opt.state[p]
                state["step"] = torch.tensor(float(end.steps[n]), dtype=torch.float32)
                for k, v in end.state[n].items():
                    state[k] = v.to(dtype=state_dtype(k)).clone()
            for n, b in model.named_buffers():
                if n in end.buffers:
                    b.copy_(end.buffers[n])
    return AdaptationResult(
        meta_losses=meta_losses, batches_seen=source.seen, skipped_steps=len(skipped), record=record
    )
