r"""A meta-training task *distribution* (``meta-mix``): many small architectures on embedded and generated data.

Each draw picks a kind (weights ``kinds``), then its architecture, data, batch size and an optional
per-tensor parameter rescaling, all from the task's ``torch.Generator``:

========================= ===========================================================================
``mlp``                   MLP classifier, random width (``widths``), depth (``depths``) and activation
                          (``activations``), on the 8x8 digits or a Gaussian-mixture problem
``teacher``               MLP regression (MSE) of a random teacher MLP's outputs plus noise
``conv``                  small CNN (two 3x3 conv layers of ``c, 2c`` channels, max-pool, linear) on digits
``autoencoder``           MLP autoencoder ``64 -> w -> w/4 -> w -> 64`` (MSE) on digits
``transformer``           one-block causal transformer LM (pre-norm, 2 heads) on synthetic sequences
``gru``                   GRU LM on synthetic sequences
========================= ===========================================================================

Data: the embedded digits (:func:`learned_optim.tasks.data.load_splits`: train / val splits), or generated
per task and drawn fresh for every batch (so ``val`` batches are held-out draws of the same
distribution, for train-by-validation): Gaussian mixtures (``k`` classes in ``d`` dimensions, centres
:math:`N(0, 9 r^2 I / d)`, unit noise), random-teacher regression
(:math:`y = T(x) + 0.1\,\epsilon`, :math:`x \sim N(0, I)`), and synthetic sequences from a random sparse
Markov chain over a small vocabulary (each token's successors: a few tokens with Dirichlet weights). None
of the benchmark suite's tasks or data.

Finite training sets: with ``finite_train_probability`` :math:`p > 0`, each draw, with probability
:math:`p`, trains on a fixed pool of :math:`n` examples (``train_set_sizes``): drawn once per task from its
train distribution (for digits, a random subset of the train split); train batches are drawn from the pool,
val and test batches stay held-out draws. Fitting and generalizing then part ways within a trajectory, so
train-by-validation rewards steps that generalize rather than steps that memorize the pool; on fresh-draw
data the two objectives agree in expectation.

Task augmentation (Celo): with ``rescale=(lo, hi)`` each parameter tensor :math:`k` gets a factor
:math:`s_k` drawn log-uniformly in ``[lo, hi]``; the optimizee's variables are :math:`\phi_k = \theta_k/s_k`
and the loss is :math:`f(s \odot \phi)`, so gradients scale by :math:`s_k` and parameters by :math:`1/s_k`
(:class:`RescaledTask`).

``widths`` spans several sizes so that a per-tensor μP step scale is learnt across them. Every net is
small (an inner step is a few milliseconds on one CPU core).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .._numerics import functorch_wrapped
from . import data as data_lib
from ._common import (
    build_functional_module,
    check_split,
    child_seed,
    family_config,
    resolve_dtype,
    sample_choice,
    seeded_global_rng,
)
from .base import Params, Task, TaskFamily
from .neural import ACTIVATIONS, build_conv_net, build_mlp

__all__ = [
    "KINDS",
    "MetaMixFamily",
    "ModuleTask",
    "RescaledTask",
    "TinyTransformerLM",
    "GRULM",
    "markov_chain",
]

#: The architecture kinds :class:`MetaMixFamily` draws from.
KINDS = ("mlp", "teacher", "conv", "autoencoder", "transformer", "gru")

Sampler = Callable[[str, torch.Generator, int], tuple[Tensor, Tensor]]


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    r"""Causal scaled dot-product attention :math:`\mathrm{softmax}(q k^\top / \sqrt{d} + M)\,v` (:math:`M`:
    :math:`-\infty` above the diagonal): ``F.scaled_dot_product_attention``, or the formula written out inside
    ``torch.func`` transforms, where ``vmap`` has no batching rule for the CPU kernel (it would fall back to a loop,
    3x slower than one call per particle in :func:`~learned_optim.meta.unroll.unroll_particles`)."""
    if not functorch_wrapped(q):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    t = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v


class TinyTransformerLM(nn.Module):
    """Token + position embedding, one pre-norm causal self-attention block with an MLP, a linear head."""

    def __init__(self, vocab: int, d_model: int, heads: int, max_len: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not a multiple of heads {heads}")
        self.heads = heads
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(max_len, d_model))
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        b, t = tokens.shape
        x = self.embed(tokens) + self.pos[:t]
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = causal_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, -1))
        x = x + self.mlp(self.norm2(x))
        return self.head(x)


class GRULM(nn.Module):
    """Token embedding, a one-layer GRU, a linear head."""

    def __init__(self, vocab: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.gru(self.embed(tokens))
        return self.head(out)


def markov_chain(vocab: int, successors: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """A random sparse transition matrix ``(vocab, vocab)``: each row puts Dirichlet(1) weights on
    ``successors`` distinct random tokens."""
    gamma = -torch.log(torch.rand(vocab, successors, generator=generator, dtype=torch.float64))  # Gamma(1) draws
    probs = gamma / gamma.sum(dim=1, keepdim=True)
    idx = torch.argsort(torch.rand(vocab, vocab, generator=generator), dim=1)[:, :successors]
    return torch.zeros(vocab, vocab, dtype=torch.float64).scatter_(1, idx, probs).to(dtype)


class ModuleTask(Task):
    r"""The loss of an ``nn.Module`` on batches from ``sampler`` (pure in ``params``, via ``functional_call``).

    ``loss_kind``: ``"ce"`` (mean cross-entropy of logits ``(B, C)``), ``"seq_ce"`` (mean next-token
    cross-entropy of logits ``(B, T, V)``) or ``"mse"`` (mean squared error of the flattened output).
    ``sampler(split, generator, batch_size) -> (x, y)``; train batches have ``batch_size`` rows, val/test
    batches ``eval_batch_size``.
    """

    def __init__(
        self,
        build_module: Callable[[], nn.Module],
        sampler: Sampler,
        *,
        loss_kind: str,
        batch_size: int,
        eval_batch_size: int,
        dtype: torch.dtype,
        device: torch.device,
        name: str,
    ) -> None:
        if loss_kind not in ("ce", "seq_ce", "mse"):
            raise ValueError(f"loss_kind must be 'ce', 'seq_ce' or 'mse', got {loss_kind!r}")
        self._build, self.sampler, self.loss_kind = build_module, sampler, loss_kind
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.dtype, self.device, self.name = dtype, device, name
        self.module = self._fresh_module(0)

    def _fresh_module(self, seed: int) -> nn.Module:
        return build_functional_module(self._build, seed, self.device, self.dtype)

    def init_params(self, generator: torch.Generator) -> Params:
        return {n: p.detach() for n, p in self._fresh_module(child_seed(generator)).named_parameters()}

    def batch(self, split: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        check_split(split)
        x, y = self.sampler(split, generator, self.batch_size if split == "train" else self.eval_batch_size)
        return x.to(self.device), y.to(self.device)

    def loss(self, params: Mapping[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        out = functional_call(self.module, dict(params), (x,))
        if self.loss_kind == "ce":
            return F.cross_entropy(out, y)
        if self.loss_kind == "seq_ce":
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return F.mse_loss(out.reshape(out.shape[0], -1), y.reshape(y.shape[0], -1))


class RescaledTask(Task):
    r"""``task`` in rescaled variables :math:`\phi_k = \theta_k / s_k`: ``loss(phi) = task.loss(s * phi)``."""

    def __init__(self, task: Task, scales: Mapping[str, float]) -> None:
        self.task, self.scales = task, dict(scales)
        self.name = f"{task.name}-rescaled"

    def init_params(self, generator: torch.Generator) -> Params:
        return {k: v / self.scales[k] for k, v in self.task.init_params(generator).items()}

    def batch(self, split: str, generator: torch.Generator) -> Any:
        return self.task.batch(split, generator)

    def loss(self, params: Mapping[str, Tensor], batch: Any) -> Tensor:
        return self.task.loss({k: v * self.scales[k] for k, v in params.items()}, batch)


class MetaMixFamily(TaskFamily):
    """The ``meta-mix`` distribution (see the module docstring).

    Args:
        kinds: relative weights of the kinds in :data:`KINDS` (default: all equal).
        widths: hidden widths drawn per task (MLP/teacher/autoencoder width, CNN ``c`` = width / 8,
            transformer ``d_model`` = width / 4, GRU hidden = width / 4; at least 4, 8, 8).
        depths: hidden layers of the MLPs.
        activations: activations of the MLPs, teachers and autoencoders.
        batch_sizes: training batch sizes drawn per task.
        eval_batch_size: val/test batch size.
        mixture_data_probability: chance that an ``mlp`` task classifies a Gaussian mixture instead of digits.
        seq_len, vocab: synthetic sequence length and vocabulary size (transformer and GRU).
        rescale: ``(lo, hi)`` range of the log-uniform per-tensor parameter rescaling, or ``None``.
        finite_train_probability: chance that a draw trains on a finite pool of examples (0: never).
        train_set_sizes: pool sizes drawn per finite-data task.
        dtype, device: of the data and parameters.
    """

    name = "meta-mix"

    def __init__(
        self,
        *,
        kinds: Mapping[str, float] | None = None,
        widths: Sequence[int] = (16, 32, 64, 128),
        depths: Sequence[int] = (1, 2, 3),
        activations: Sequence[str] = ("relu", "tanh", "gelu", "sigmoid", "elu"),
        batch_sizes: Sequence[int] = (16, 32, 64, 128),
        eval_batch_size: int = 256,
        mixture_data_probability: float = 0.5,
        seq_len: int = 16,
        vocab: int = 16,
        rescale: Sequence[float] | None = None,
        finite_train_probability: float = 0.0,
        train_set_sizes: Sequence[int] = (128, 256, 512),
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.config = family_config(locals())
        weights = dict.fromkeys(KINDS, 1.0) if kinds is None else dict(kinds)
        unknown = sorted(set(weights) - set(KINDS))
        if unknown:
            raise ValueError(f"meta-mix: unknown kind(s) {unknown}; known: {list(KINDS)}")
        for a in activations:
            if a not in ACTIVATIONS:
                raise ValueError(f"meta-mix: unknown activation {a!r}; choose from {sorted(ACTIVATIONS)}")
        if not widths or min(widths) < 8 or not depths or not batch_sizes:
            raise ValueError("meta-mix: widths (each >= 8), depths and batch_sizes must be non-empty")
        if rescale is not None and not (len(rescale) == 2 and 0 < rescale[0] <= rescale[1]):
            raise ValueError(f"meta-mix: rescale must be (lo, hi) with 0 < lo <= hi, got {rescale}")
        if not 0.0 <= finite_train_probability <= 1.0:
            raise ValueError(f"meta-mix: finite_train_probability must be in [0, 1], got {finite_train_probability}")
        if finite_train_probability > 0 and (not train_set_sizes or min(train_set_sizes) < 1):
            raise ValueError(f"meta-mix: train_set_sizes must be positive, got {list(train_set_sizes)}")
        self.kind_names = [k for k in KINDS if weights.get(k, 0.0) > 0]
        if not self.kind_names:
            raise ValueError("meta-mix: at least one kind needs a positive weight")
        self.kind_weights = torch.tensor([float(weights[k]) for k in self.kind_names], dtype=torch.float64)
        self.widths, self.depths = [int(w) for w in widths], [int(d) for d in depths]
        self.activations, self.batch_sizes = list(activations), [int(b) for b in batch_sizes]
        self.eval_batch_size, self.mixture_p = int(eval_batch_size), float(mixture_data_probability)
        self.seq_len, self.vocab = int(seq_len), int(vocab)
        self.rescale = None if rescale is None else (float(rescale[0]), float(rescale[1]))
        self.finite_p, self.train_set_sizes = float(finite_train_probability), [int(n) for n in train_set_sizes]
        self.dtype, self.device = resolve_dtype(dtype), torch.device(device)
        digits = data_lib.load_splits("digits")
        self.digits = {s: (digits[s].x.to(self.dtype), digits[s].y) for s in ("train", "val", "test")}

    # ---------------------------------------------------------------------------------- data samplers
    def _digits_sampler(self, target: str) -> Sampler:
        def sample(split: str, generator: torch.Generator, size: int) -> tuple[Tensor, Tensor]:
            x, y = self.digits[split]
            idx = torch.randperm(len(y), generator=generator)[: min(size, len(y))]
            return x[idx], (x[idx].flatten(1) if target == "self" else y[idx])

        return sample

    def _mixture_sampler(self, generator: torch.Generator) -> tuple[Sampler, int, int]:
        k, d = int(sample_choice([2, 4, 8], generator)), int(sample_choice([8, 16, 32], generator))
        radius = float(sample_choice([1.0, 2.0, 3.0], generator))
        centres = 3.0 * radius * torch.randn(k, d, generator=generator, dtype=self.dtype) / math.sqrt(d)

        def sample(split: str, gen: torch.Generator, size: int) -> tuple[Tensor, Tensor]:
            y = torch.randint(k, (size,), generator=gen)
            return centres[y] + torch.randn(size, d, generator=gen, dtype=self.dtype), y

        return sample, k, d

    def _teacher_sampler(self, generator: torch.Generator, d_in: int, d_out: int, act: str) -> Sampler:
        with seeded_global_rng(child_seed(generator)):
            teacher = build_mlp((d_in,), (32,), d_out, act).to(self.dtype).requires_grad_(False)

        def sample(split: str, gen: torch.Generator, size: int) -> tuple[Tensor, Tensor]:
            x = torch.randn(size, d_in, generator=gen, dtype=self.dtype)
            return x, teacher(x) + 0.1 * torch.randn(size, d_out, generator=gen, dtype=self.dtype)

        return sample

    def _sequence_sampler(self, generator: torch.Generator) -> Sampler:
        successors = int(sample_choice([2, 3, 4], generator))
        transitions = markov_chain(self.vocab, successors, generator, torch.float64)
        length = self.seq_len

        cdf = transitions.cumsum(dim=1)
        cdf[:, -1] = 1.0

        def sample(split: str, gen: torch.Generator, size: int) -> tuple[Tensor, Tensor]:
            tokens = torch.empty(size, length + 1, dtype=torch.long)
            tokens[:, 0] = torch.randint(self.vocab, (size,), generator=gen)
            u = torch.rand(length, size, 1, generator=gen, dtype=torch.float64)
            for t in range(length):  # inverse-CDF draw of each successor
                tokens[:, t + 1] = torch.searchsorted(cdf[tokens[:, t]], u[t]).squeeze(1)
            return tokens[:, :-1], tokens[:, 1:]

        return sample

    @staticmethod
    def _finite_train(sampler: Sampler, size: int, generator: torch.Generator) -> Sampler:
        """``sampler`` with its train split replaced by a fixed pool of ``size`` of its train examples."""
        pool_x, pool_y = sampler("train", generator, size)
        pool_size = len(pool_y)

        def sample(split: str, gen: torch.Generator, batch: int) -> tuple[Tensor, Tensor]:
            if split != "train":
                return sampler(split, gen, batch)
            idx = torch.randperm(pool_size, generator=gen)[: min(batch, pool_size)]
            return pool_x[idx], pool_y[idx]

        return sample

    # ---------------------------------------------------------------------------------------- sampling
    def sample(self, generator: torch.Generator) -> Task:
        kind = self.kind_names[int(torch.multinomial(self.kind_weights, 1, generator=generator))]
        width = int(sample_choice(self.widths, generator))
        act = str(sample_choice(self.activations, generator))
        batch = int(sample_choice(self.batch_sizes, generator))
        build: Callable[[], nn.Module]
        if kind == "mlp":
            hidden = (width,) * int(sample_choice(self.depths, generator))
            if float(torch.rand((), generator=generator)) < self.mixture_p:
                sampler, classes, d = self._mixture_sampler(generator)
                shape: tuple[int, ...] = (d,)
                data = f"gmm{classes}x{d}"
            else:
                sampler, classes, shape, data = self._digits_sampler("label"), 10, (1, 8, 8), "digits"
            build, loss_kind = (lambda: build_mlp(shape, hidden, classes, act)), "ce"
            name = f"mix-mlp{'x'.join(map(str, hidden))}-{act}-{data}"
        elif kind == "teacher":
            hidden = (width,) * int(sample_choice(self.depths, generator))
            d_in, d_out = int(sample_choice([4, 8, 16], generator)), int(sample_choice([1, 4], generator))
            sampler = self._teacher_sampler(generator, d_in, d_out, act)
            build, loss_kind = (lambda: build_mlp((d_in,), hidden, d_out, act)), "mse"
            name = f"mix-teacher{'x'.join(map(str, hidden))}-{act}"
        elif kind == "conv":
            c = max(width // 8, 4)
            sampler = self._digits_sampler("label")
            build, loss_kind = (lambda: build_conv_net((1, 8, 8), (c, 2 * c), (3, 3), 10, "relu", 2)), "ce"
            name = f"mix-conv{c}-{2 * c}"
        elif kind == "autoencoder":
            hidden = (width, max(width // 4, 2), width)
            sampler = self._digits_sampler("self")
            build, loss_kind = (lambda: build_mlp((1, 8, 8), hidden, 64, act)), "mse"
            name = f"mix-autoencoder{width}-{act}"
        elif kind == "transformer":
            d_model = max(width // 4, 8)
            sampler = self._sequence_sampler(generator)
            vocab, length = self.vocab, self.seq_len
            build, loss_kind = (lambda: TinyTransformerLM(vocab, d_model, 2, length)), "seq_ce"
            name = f"mix-transformer{d_model}"
        else:  # gru
            hidden_size = max(width // 4, 8)
            sampler = self._sequence_sampler(generator)
            vocab = self.vocab
            build, loss_kind = (lambda: GRULM(vocab, 16, hidden_size)), "seq_ce"
            name = f"mix-gru{hidden_size}"
        if self.finite_p > 0 and float(torch.rand((), generator=generator)) < self.finite_p:
            train_size = int(sample_choice(self.train_set_sizes, generator))
            sampler = self._finite_train(sampler, train_size, generator)
            name = f"{name}-n{train_size}"
        task: Task = ModuleTask(
            build,
            sampler,
            loss_kind=loss_kind,
            batch_size=batch,
            eval_batch_size=self.eval_batch_size,
            dtype=self.dtype,
            device=self.device,
            name=f"{name}-b{batch}",
        )
        if self.rescale is not None:
            lo, hi = math.log(self.rescale[0]), math.log(self.rescale[1])
            names = [n for n, _ in task.module.named_parameters()]  # type: ignore[attr-defined]
            draws = torch.rand(len(names), generator=generator, dtype=torch.float64)
            task = RescaledTask(
                task, {n: math.exp(lo + (hi - lo) * float(u)) for n, u in zip(names, draws, strict=True)}
            )
        return task
