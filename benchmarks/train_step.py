"""End-to-end training step (forward + backward + optimizer step) with each learned optimizer vs Adam.

::

    python benchmarks/train_step.py                         # conv, resnet18, mlp1m; every family
    python benchmarks/train_step.py --models conv --no-compile
    python benchmarks/train_step.py --models cnn5k transformer resnet18 --no-compile --per-tensor --overhead
    python benchmarks/train_step.py --device cuda --models transformer resnet18 mlp1m --overhead
    python benchmarks/train_step.py --models transformer mlp1m resnet18 --families adafac_mlp --step-only --threads 2
    python benchmarks/train_step.py --models transformer cnn5k --families adafac_mlp --step-only --step-counts 4

Models (random data of the right shape; the speed does not depend on the values):

* ``conv``: the papers' Conv-MNIST CNN (``learned_optim.tasks.neural.build_conv_net``: conv 3x3x16,
  conv 5x5x32, max-pool, one FC; 75.7k parameters) on 28x28x1 images, batch 128;
* ``resnet18``: ``timm.create_model("resnet18", num_classes=10)`` (11.2M parameters) on 32x32x3 images, batch 128;
* ``mlp1m``: a 2-layer MLP 784 -> 1262 -> 10 (1.0M parameters), batch 128;
* ``cnn5k``: a 1-D ConvNet (conv 1->24 k5, 24->24 k5, 24->24 k3, global mean, FC 24->10: 5.0k parameters in
  8 tensors) on sequences of 64, batch 128;
* ``transformer``: a char-level transformer (vocab 64, width 64, 3 post-norm layers of 4 heads and FF 128,
  learned positions, causal mask; 113k parameters in 42 tensors) on 64 tokens, batch 32, next-token loss.

``--per-tensor`` adds each family with the packed step switched off (one net call per tensor, as before
the packed step), ``--overhead`` times the step alone on 200 tensors of 1k parameters against one tensor of
200k (the per-tensor overhead), for Adam and every family. ``--step-only`` times the optimizer step alone
on each model's parameters (fixed gradients) instead of the iteration; with ``--threads`` above 1 read its wall
column, as the CPU time adds up every thread's. ``--step-counts N`` (step alone) spreads the parameters over N
step counts, as when layers are unfrozen at different times or some parameters get no gradient at some steps.

Every optimizer gets its own copy of the model; one iteration (``zero_grad``, forward, cross-entropy,
backward, ``step``) of each is timed round-robin in the same process (CPU time; with ``--device cuda``
the model, the batch and the optimizers live on the GPU and the figure is the synchronised wall time: see
``benchmarks/_common.py``). The optimizer's share is the same iteration minus the forward/backward
alone, measured in the same rotation.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import Timing, clock_name, machine_header, measure, table  # noqa: E402

import learned_optim  # noqa: E402
from learned_optim import LearnedOptimizer  # noqa: E402

FAMILIES = ["dm_lstm", "rnnprop", "mlp", "adafac_mlp"]


class PerTensor(LearnedOptimizer):
    """The optimizer with the packed step switched off: every tensor gets its own net call."""

    def _plan_packs(self, params):
        return [], params


class CharTransformer(nn.Module):
    """Embedding + learned positions, post-norm encoder layers with a causal mask, linear head."""

    def __init__(self, vocab: int = 64, width: int = 64, layers: int = 3, length: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.norm(self.body(x, mask=self.mask, is_causal=True)))


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name == "cnn5k":
        return nn.Sequential(
            nn.Conv1d(1, 24, 5),
            nn.ReLU(),
            nn.Conv1d(24, 24, 5),
            nn.ReLU(),
            nn.Conv1d(24, 24, 3),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(24, 10),
        ), (1, 64)
    if name == "transformer":
        return CharTransformer(), (64,)
    if name == "conv":
        from learned_optim.tasks.neural import build_conv_net

        return build_conv_net((1, 28, 28), (16, 32), (3, 5), 10, "relu", 2), (1, 28, 28)
    if name == "resnet18":
        import timm

        return timm.create_model("resnet18", num_classes=10), (3, 32, 32)
    if name == "mlp1m":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 1262), nn.ReLU(), nn.Linear(1262, 10)), (1, 28, 28)
    raise ValueError(name)


def iteration(
    model: nn.Module, opt: torch.optim.Optimizer | None, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    """One training iteration on the batch ``(x, y)``: forward, backward and (if ``opt``) a step."""

    def run() -> None:
        model.zero_grad(set_to_none=True)
        out = model(x)
        nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y).backward()
        if opt is not None:
            opt.step()

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["conv", "resnet18", "mlp1m"])
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--per-tensor", action="store_true", help="also the per-tensor step (packing off)")
    parser.add_argument("--overhead", action="store_true", help="also 200 x 1k tensors vs 1 x 200k, step only")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (then wall time, synchronised)")
    parser.add_argument("--step-only", action="store_true", help="the step alone on each model's parameters")
    parser.add_argument("--step-counts", type=int, default=1, help="step alone: parameters at this many step counts")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.step_only:
        print(f"# Optimizer step alone ({device}, {args.threads} thread(s))\n\n{machine_header(device)}\n")
        print(step_only_table(args.models, args.families, args.repeats, device, args.step_counts))
        print(f"\nLoad at the end: {machine_header().split('load average ')[1]}")
        return
    print(f"# End-to-end training step (batch {args.batch}, {device})\n\n{machine_header(device)}\n")
    rows = []
    for name in args.models:
        base, shape = build(name)
        base.to(device)
        gen = torch.Generator().manual_seed(1)
        batch = 32 if name == "transformer" else args.batch
        if name == "transformer":
            x = torch.randint(0, 64, (batch, *shape), generator=gen)
            y = torch.randint(0, 64, (batch * shape[0],), generator=gen)
        else:
            x = torch.randn(batch, *shape, generator=gen)
            y = torch.randint(0, 10, (batch,), generator=gen)
        x, y = x.to(device), y.to(device)

        candidates = {"fwd+bwd only": iteration(copy.deepcopy(base), None, x, y)}
        model = copy.deepcopy(base)
        candidates["Adam"] = iteration(model, torch.optim.Adam(model.parameters(), lr=1e-3), x, y)
        for family in args.families:
            torch.manual_seed(0)
            rule = learned_optim.FAMILIES[family]()
            variants = [("eager", False, LearnedOptimizer)]
            variants += [] if args.no_compile else [("compiled", True, LearnedOptimizer)]
            variants += [("per-tensor", False, PerTensor)] if args.per_tensor else []
            for label, compile_, cls in variants:
                model = copy.deepcopy(base)
                opt = cls(model.parameters(), rule, compile=compile_)
                candidates[f"{family} {label}"] = iteration(model, opt, x, y)
        for f in candidates.values():  # compile / warm up outside the timed rotation
            f()
        timings = measure(candidates, repeats=args.repeats, device=device)
        fb, adam = timings["fwd+bwd only"].best, timings["Adam"].best
        for label, t in timings.items():
            if label == "fwd+bwd only":
                continue
            rows.append(
                [*_row_head(name, base, label, t), f"{t.best / adam:.2f}x", f"{max(t.best - fb, 0.0) * 1e3:.4g}"]
            )
        rows.append([*_row_head(name, base, "fwd+bwd only", timings["fwd+bwd only"]), f"{fb / adam:.2f}x", "0"])
        print(f"  measured {name}", file=sys.stderr, flush=True)
    print(
        table(
            [
                "model",
                "params / tensors",
                "optimizer",
                f"iteration ms ({clock_name(device)}, best)",
                "wall ms (median)",
                "vs Adam iteration",
                "optimizer share ms",
            ],
            rows,
        )
    )
    if args.overhead:
        print(f"\n## Step alone: 200 tensors of 1k parameters vs one tensor of 200k (ms {clock_name(device)}, best)\n")
        print(overhead_table(args.families, args.repeats, args.per_tensor, device))
    print(f"\nLoad at the end: {machine_header().split('load average ')[1]}")


def _row_head(name: str, model: nn.Module, label: str, t: Timing) -> list[str]:
    """A table row's model, its size, the optimizer, the best time and the median wall time (ms)."""
    size = f"{sum(p.numel() for p in model.parameters()) / 1e6:.3g}M / {sum(1 for _ in model.parameters())}"
    return [name, size, label, f"{t.best * 1e3:.4g}", f"{t.wall_median * 1e3:.4g}"]


def step_only_table(
    models: list[str], families: list[str], repeats: int, device: torch.device, step_counts: int = 1
) -> str:
    """The step alone on each model's parameters (fixed gradients), Adam and each family, in one rotation;
    with ``step_counts`` above 1, parameter i at step count 1000 + 10 (i mod ``step_counts``)."""
    if step_counts < 1:
        raise SystemExit(f"--step-counts must be at least 1, got {step_counts}")
    rows = []
    for name in models:
        base = build(name)[0].to(device)
        makers: list[tuple[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]]] = [
            ("Adam", lambda ps: torch.optim.Adam(ps))
        ]
        for family in families:
            torch.manual_seed(0)
            rule = learned_optim.FAMILIES[family]()
            makers.append((family, lambda ps, rule=rule: LearnedOptimizer(ps, rule)))
        candidates = {}
        for label, make in makers:
            params = list(copy.deepcopy(base).parameters())
            gen = torch.Generator().manual_seed(0)
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
            opt = make(params)
            if step_counts > 1:
                opt.step()  # the state, then each parameter's count
                for i, p in enumerate(params):
                    opt.state[p]["step"].fill_(1000 + 10 * (i % step_counts))
            candidates[label] = opt.step
        timings = measure(candidates, repeats=repeats, device=device)
        adam = timings["Adam"]
        for label, t in timings.items():
            ratios = [f"{t.best / adam.best:.2f}x", f"{t.wall_median / adam.wall_median:.2f}x"]
            rows.append([*_row_head(name, base, label, t), *ratios])
        print(f"  measured {name}", file=sys.stderr, flush=True)
    header = ["model", "params / tensors", "optimizer", f"step ms ({clock_name(device)}, best)", "wall ms (median)"]
    return table([*header, f"vs Adam ({clock_name(device)})", "vs Adam (wall)"], rows)


def overhead_table(families: list[str], repeats: int, per_tensor: bool, device: torch.device) -> str:
    """Step time on 200 x 1k parameters over step time on 1 x 200k, per optimizer (same run)."""
    gen = torch.Generator().manual_seed(0)

    def params(count: int, size: int) -> list[nn.Parameter]:
        out = [nn.Parameter((torch.randn(size, generator=gen) * 0.1).to(device)) for _ in range(count)]
        for p in out:
            p.grad = (torch.randn(size, generator=gen) * 1e-3).to(device)
        return out

    many, one = params(200, 1000), params(1, 200_000)
    candidates: dict[str, object] = {}
    makers: list[tuple[str, object]] = [("Adam", lambda ps: torch.optim.Adam(ps))]
    for family in families:
        torch.manual_seed(0)
        rule = learned_optim.FAMILIES[family]()
        makers.append((family, lambda ps, rule=rule: LearnedOptimizer(ps, rule)))
        if per_tensor:
            makers.append((f"{family} per-tensor", lambda ps, rule=rule: PerTensor(ps, rule)))
    for label, make in makers:
        candidates[f"{label} 200x1k"] = make(many).step
        candidates[f"{label} 1x200k"] = make(one).step
    timings = measure(candidates, repeats=repeats, device=device)
    rows = []
    for label, _ in makers:
        a, b = timings[f"{label} 200x1k"].best, timings[f"{label} 1x200k"].best
        rows.append([label, f"{a * 1e3:.4g}", f"{b * 1e3:.4g}", f"{a / b:.2f}x"])
    return table(["optimizer", "200 x 1k", "1 x 200k", "ratio (target <= 3x)"], rows)


if __name__ == "__main__":
    main()
