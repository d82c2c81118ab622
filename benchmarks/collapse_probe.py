"""Watch a benchmark run's first steps for collapse: the training loss and, after each ReLU, the fraction of units
dead on the whole batch (never positive), for AdamW and learned optimizers from the same initialisation and
batches, at one lr, weight decay and the suite's warm-up + cosine schedule.

Made for the runs of `select-shapes24-cnn` seed 1 that end at chance (ln 6) for many fine-tunes
(`benchmarks/results/bench/soups/README.md`):

    python benchmarks/collapse_probe.py --task select-shapes24-cnn --seed 1 --lr 1e-2 --weight-decay 0.1 \
        adamw pretrained/adafac-mlp-adam-magnitude-tbv-nomup-entropy benchmarks/results/bench/soups/nets/soup-entropy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from learned_optim.bench.run import BASELINE_NAMES, baseline_optimizer, learned_optimizer  # noqa: E402
from learned_optim.bench.tasks import SELECTION_TASKS, get_task  # noqa: E402
from learned_optim.schedules import lr_factor  # noqa: E402


def probe(task: str, optimizer: str, seed: int, lr: float, weight_decay: float, steps: int, every: int) -> None:
    workload = get_task(task, selection=task in SELECTION_TASKS).bind()
    model = workload.build_model(seed)
    params = list(model.parameters())
    contender = baseline_optimizer(optimizer) if optimizer in BASELINE_NAMES else learned_optimizer(optimizer)
    opt = contender.build(params, lr, weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor("cosine", t, workload.steps))
    generator = torch.Generator().manual_seed(seed)
    alive: dict[int, torch.Tensor] = {}
    relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    for i, relu in enumerate(relus):  # a unit (channel x position) is dead when no example of the batch activates it
        relu.register_forward_hook(lambda m, a, out, i=i: alive.__setitem__(i, (out > 0).any(dim=0).flatten()))
    for t in range(steps):
        opt.zero_grad()
        loss = workload.loss(model, workload.batch(generator))
        loss.backward()
        opt.step()
        schedule.step()
        if t % every == 0 or t == steps - 1:
            dead = " ".join(f"{1 - float(alive[i].float().mean()):.2f}" for i in range(len(relus)))
            print(f"{contender.name:>48} step {t:4d}  loss {loss.item():.3f}  dead after each ReLU: {dead}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "optimizers", nargs="+", help="suite baselines (adamw, ...) or learned optimizers (zoo names, folders)"
    )
    parser.add_argument("--task", default="select-shapes24-cnn", help="a suite or selection-set task")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=100, help="steps to run (the schedule keeps the task's horizon)")
    parser.add_argument("--every", type=int, default=10, help="print every N steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.optimizers:
        probe(args.task, name, args.seed, args.lr, args.weight_decay, args.steps, args.every)


if __name__ == "__main__":
    main()
