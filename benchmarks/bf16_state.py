"""Loss curves with the recurrent state kept in bf16 vs float32 (``state_dtype={"lstm": torch.bfloat16}``).

::

    python benchmarks/bf16_state.py                              # DM-LSTM and RNNProp, nets fitted here
    python benchmarks/bf16_state.py --checkpoint runs/l2o-lstm/model --families dm_lstm

Trains the papers' Conv net on the embedded digits data (8x8, batch 128, the same initialisation and
batches for both runs) with the same learned optimizer twice: recurrent state in float32, then in
bf16 (moments stay float32), and prints the state memory and the difference between the two loss
curves. Without ``--checkpoint`` each net is first fitted for a few seconds to imitate sign descent
(:func:`learned_optim.testing.fit_sign_descent`; a stand-in for a meta-trained net, so that the curves
actually descend).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine_header, table  # noqa: E402

import learned_optim  # noqa: E402
from learned_optim import LearnedOptimizer  # noqa: E402
from learned_optim.testing import fit_sign_descent  # noqa: E402

#: The fit used for the README's numbers: 150 quadratics of 64 coordinates, gradients over 4 decades.
FIT = dict(iters=150, n=64, unroll=8, target=0.003, seed=0, max_first_step=0, grad_decades=3)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return (x - x.mean()) / x.std(), torch.tensor(data.target)


def curve(rule, state_dtype, steps: int, batch: int) -> tuple[list[float], int, float]:
    """Train losses, the optimizer state's bytes and the held-out accuracy (last 297 digits)."""
    from learned_optim.tasks.neural import build_conv_net

    x, y = digits()
    (x, x_test), (y, y_test) = (x[:1500], x[1500:]), (y[:1500], y[1500:])
    torch.manual_seed(0)
    model = build_conv_net((1, 8, 8), (16, 32), (3, 5), 10, "relu", 2)
    opt = LearnedOptimizer(model.parameters(), rule, state_dtype=state_dtype)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    state_bytes = sum(v.nbytes for s in opt.state.values() for k, v in s.items() if k != "step")
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return losses, state_bytes, accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["dm_lstm", "rnnprop"], choices=["dm_lstm", "rnnprop"])
    parser.add_argument("--checkpoint", default=None, help="a zoo folder / name to use instead of a fitted net")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# bf16 recurrent state vs float32 (Conv net on digits, batch {args.batch}, {args.steps} steps)\n")
    print(machine_header() + "\n")
    rows = []
    for family in args.families:
        if args.checkpoint:
            rule, _ = learned_optim.load_rule(args.checkpoint)
            source = args.checkpoint
        else:
            torch.manual_seed(0)
            rule, source = fit_sign_descent(learned_optim.FAMILIES[family](), **FIT), "fitted to sign descent"
        if rule.family != family:
            continue
        ref, bytes32, acc32 = curve(rule, torch.float32, args.steps, args.batch)
        low, bytes16, acc16 = curve(rule, {"lstm": torch.bfloat16}, args.steps, args.batch)
        w = 10  # compare 10-step window means (single-batch losses are noisy)
        mean32 = [sum(ref[i : i + w]) / w for i in range(0, args.steps - w + 1, w)]
        mean16 = [sum(low[i : i + w]) / w for i in range(0, args.steps - w + 1, w)]
        diff = [abs(a - b) for a, b in zip(mean32, mean16, strict=True)]
        rows.append(
            [
                family,
                source,
                f"{bytes32 / 1024:.0f} / {bytes16 / 1024:.0f}",
                f"{ref[0]:.4f}",
                " / ".join(f"{m[i]:.4f}" for m in (mean32, mean16) for i in (len(m) // 3,)),
                f"{mean32[-1]:.4f} / {mean16[-1]:.4f}",
                f"{max(diff):.3g}",
                f"{sum(diff) / sum(mean32):.1%}",
                f"{acc32:.1%} / {acc16:.1%}",
            ]
        )
        print(
            "  "
            + family
            + " 10-step means, every 3rd: fp32 "
            + " ".join(f"{v:.3f}" for v in mean32[::3])
            + " | bf16 "
            + " ".join(f"{v:.3f}" for v in mean16[::3]),
            file=sys.stderr,
        )
    print(
        table(
            [
                "net",
                "weights",
                "state KiB fp32 / bf16-lstm",
                "loss at step 1",
                "loss at 1/3 fp32 / bf16 (10-step mean)",
                "final loss fp32 / bf16 (last 10)",
                "max |diff| of 10-step means",
                "sum |diff| / sum fp32 loss",
                "held-out accuracy fp32 / bf16",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
