r"""Screen candidate learned optimizers on the *validation* split (recipe selection; test data is never used).

``python benchmarks/validation_screen.py OUT CANDIDATE... [--tasks A,B] [--seeds 5] [--steps 1000] [--adam]``

Every candidate (zoo name, checkpoint folder, or ``runs/<run>/model``) trains each task for ``--steps`` steps
on seeds ``0..N-1`` (:func:`learned_optim.bench.evaluate.evaluate` with ``eval_split="val"``; ``--adam`` adds Adam
with its learning rate tuned on the validation split as a reference). Prints, per task and candidate, the
validation accuracy and loss after the last step (mean +- 95% t-interval over seeds), the final training loss
(mean of the last 10 minibatch losses) and the mean training loss over all steps,
:math:`\frac1T\sum_{t=1}^{T} f_t`, i.e. how fast the candidate fits; writes the harness's files to ``OUT``.
Unlike ``generalization.py select`` it takes zoo entries (a parent) next to runs and picks nothing itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from learned_optim.bench.evaluate import evaluate, mean_confidence_interval, resolve_optimizer


def label(candidate: str) -> str:
    """``runs/gen-x/model`` -> ``gen-x``; ``pretrained/x`` -> ``x``."""
    return candidate.replace("runs/", "").replace("/model", "").replace("pretrained/", "").strip("/")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("candidates", nargs="+")
    p.add_argument("--tasks", default="digits-mlp20-relu,digits-mlp20x20x20-relu")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--adam", action="store_true", help="add validation-tuned Adam as a reference")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    specs: list = []
    for candidate in args.candidates:
        spec = resolve_optimizer(candidate)
        spec.label = label(candidate)
        specs.append(spec)
    if args.adam:
        specs.append("adam")
    tasks = [t for t in args.tasks.split(",") if t]
    results = evaluate(
        specs,
        tasks,
        args.steps,
        args.seeds,
        eval_split="val",
        progress=False,
        command=" ".join(["python", "benchmarks/validation_screen.py", *sys.argv[1:]]),
    )
    results.write(args.out)
    for task in tasks:
        for name in [s if isinstance(s, str) else s.label for s in specs]:
            runs = [r for r in results.runs if r.optimizer == name and r.task == task]
            acc = mean_confidence_interval([r.final("accuracy") for r in runs])
            loss = mean_confidence_interval([r.final("loss") for r in runs])
            final = mean_confidence_interval([sum(r.train_loss[-10:]) / len(r.train_loss[-10:]) for r in runs])
            mean = mean_confidence_interval([sum(r.train_loss) / len(r.train_loss) for r in runs])
            print(
                f"{task:28s} {name:24s} val acc {100 * acc[0]:.2f} ± {100 * acc[1]:.2f}  "
                f"val loss {loss[0]:.3f} ± {loss[1]:.3f}  final train loss {final[0]:.4f}  "
                f"mean train loss (steps 1-{args.steps}) {mean[0]:.4f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
