"""End-to-end training step (forward + backward + optimizer step) with each learned optimizer vs Adam.

::

    python benchmarks/train_step.py                         # conv, resnet18, mlp1m; every family
    python benchmarks/train_step.py --models conv --no-compile

Models (random data of the right shape; the speed does not depend on the values):

* ``conv``: the papers' Conv-MNIST CNN (``learned_optim.meta.tasks.neural.build_conv_net``: conv 3x3x16,
  conv 5x5x32, max-pool, one FC; 75.7k parameters) on 28x28x1 images, batch 128;
* ``resnet18``: ``timm.create_model("resnet18", num_classes=10)`` (11.2M parameters) on 32x32x3 images, batch 128;
* ``mlp1m``: a 2-layer MLP 784 -> 1262 -> 10 (1.0M parameters), batch 128.

Every optimizer gets its own copy of the model; one iteration (``zero_grad``, forward, cross-entropy,
backward, ``step``) of each is timed round-robin in the same process (CPU time, see
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

from _common import machine_header, measure, table  # noqa: E402

import learned_optim  # noqa: E402
from learned_optim import LearnedOptimizer  # noqa: E402

FAMILIES = ["dm_lstm", "rnnprop", "mlp"]


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name == "conv":
        from learned_optim.meta.tasks.neural import build_conv_net

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
        nn.functional.cross_entropy(model(x), y).backward()
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# End-to-end training step (batch {args.batch})\n\n{machine_header()}\n")
    rows = []
    for name in args.models:
        base, shape = build(name)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, *shape, generator=gen)
        y = torch.randint(0, 10, (args.batch,), generator=gen)
        n_params = sum(p.numel() for p in base.parameters())

        candidates = {"fwd+bwd only": iteration(copy.deepcopy(base), None, x, y)}
        model = copy.deepcopy(base)
        candidates["Adam"] = iteration(model, torch.optim.Adam(model.parameters(), lr=1e-3), x, y)
        for family in args.families:
            torch.manual_seed(0)
            rule = learned_optim.FAMILIES[family]()
            variants = [("eager", False)] + ([] if args.no_compile else [("compiled", True)])
            for label, compile_ in variants:
                model = copy.deepcopy(base)
                opt = LearnedOptimizer(model.parameters(), rule, compile=compile_)
                candidates[f"{family} {label}"] = iteration(model, opt, x, y)
        for f in candidates.values():  # compile / warm up outside the timed rotation
            f()
        timings = measure(candidates, repeats=args.repeats)
        fb, adam = timings["fwd+bwd only"].cpu_best, timings["Adam"].cpu_best
        for label, t in timings.items():
            if label == "fwd+bwd only":
                continue
            rows.append(
                [
                    name,
                    f"{n_params / 1e6:.3g}M",
                    label,
                    f"{t.cpu_best * 1e3:.4g}",
                    f"{t.wall_median * 1e3:.4g}",
                    f"{t.cpu_best / adam:.2f}x",
                    f"{max(t.cpu_best - fb, 0.0) * 1e3:.4g}",
                ]
            )
        rows.append(
            [
                name,
                f"{n_params / 1e6:.3g}M",
                "fwd+bwd only",
                f"{fb * 1e3:.4g}",
                f"{timings['fwd+bwd only'].wall_median * 1e3:.4g}",
                f"{fb / adam:.2f}x",
                "0",
            ]
        )
        print(f"  measured {name}", file=sys.stderr, flush=True)
    print(
        table(
            [
                "model",
                "params",
                "optimizer",
                "iteration ms (CPU, best)",
                "wall ms (median)",
                "vs Adam iteration",
                "optimizer share ms",
            ],
            rows,
        )
    )
    print(f"\nLoad at the end: {machine_header().split('load average ')[1]}")


if __name__ == "__main__":
    main()
