"""Meta-training throughput: several task instances batched with ``torch.func.vmap`` vs one at a time.

::

    python benchmarks/meta_throughput.py                     # every family, 8 digits-MLP tasks, 10-step segments
    python benchmarks/meta_throughput.py --tasks 4 16 --families dm_lstm

One meta-step = a truncated segment of ``--segment`` learned-optimizer steps on each of ``--tasks``
instances of the digits MLP task family (``learned_optim.tasks.make_family("mlp")``: different
initialisations and batches per instance), the train-by-train meta-loss (mean over instances of the
sum over steps of the loss at the new point), its backward into the net's weights and an Adam step.
Each inner step is the trainer's: detached task gradient, ``apply_rule`` (``functional_update``:
the net's forward through ``functional_call``), ``theta + delta``.

* ``one at a time``: a Python loop over the instances (what the trainer does today, one trajectory
  per meta-step; here all instances contribute to one meta-step so the two columns compute the same
  meta-gradient, which is checked);
* ``vmap``: the same per-instance function under ``torch.func.vmap`` over stacked parameters,
  net states and batches, with the task gradient from ``torch.func.grad``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine_header, measure, table  # noqa: E402

import learned_optim  # noqa: E402
from learned_optim.functional import apply_rule  # noqa: E402
from learned_optim.tasks import make_family  # noqa: E402


class Setup:
    def __init__(self, family: str, tasks: int, segment: int) -> None:
        torch.manual_seed(0)
        self.rule = learned_optim.FAMILIES[family]()
        self.segment = segment
        task_family = make_family("mlp")
        gens = [torch.Generator().manual_seed(100 + i) for i in range(tasks)]
        self.tasks = [task_family.sample(g) for g in gens]
        self.params = [t.init_params(g) for t, g in zip(self.tasks, gens, strict=True)]
        self.states = [{n: self.rule.init_state(p.numel()) for n, p in ps.items()} for ps in self.params]
        self.batches = [[t.batch("train", g) for _ in range(segment)] for t, g in zip(self.tasks, gens, strict=True)]
        self.loss = self.tasks[0].loss  # same architecture for every instance: the same function
        self.meta_opt = torch.optim.Adam(self.rule.parameters(), lr=1e-4)

    def inner(self, weights, params, state, batch, t):
        grads = torch.func.grad(self.loss)(params, batch)
        grads = {k: v.detach() for k, v in grads.items()}
        deltas, new_state = apply_rule(self.rule, weights, grads, params, state, t)
        new_params = {k: params[k] + deltas[k] for k in params}
        return new_params, new_state, self.loss(new_params, batch)

    def meta_loss_loop(self, weights) -> torch.Tensor:
        total = 0.0
        for params, state, batches in zip(self.params, self.states, self.batches, strict=True):
            for t, batch in enumerate(batches, start=1):
                params, state, loss = self.inner(weights, params, state, batch, t)
                total = total + loss
        return total / len(self.params)

    def meta_loss_vmap(self, weights) -> torch.Tensor:
        params = {k: torch.stack([p[k] for p in self.params]) for k in self.params[0]}
        state = {
            k: {s: torch.stack([st[k][s] for st in self.states]) for s in self.states[0][k]} for k in self.states[0]
        }
        total = 0.0
        for t in range(1, self.segment + 1):
            batch = tuple(torch.stack([b[t - 1][i] for b in self.batches]) for i in range(2))
            params, state, loss = torch.func.vmap(functools.partial(self.inner, weights, t=t))(params, state, batch)
            total = total + loss.sum()
        return total / len(self.params)

    def meta_step(self, batched: bool) -> None:
        weights = dict(self.rule.named_parameters())
        loss = self.meta_loss_vmap(weights) if batched else self.meta_loss_loop(weights)
        self.meta_opt.zero_grad()
        loss.backward()
        # no meta_opt.step(): every timed meta-step computes the same meta-gradient (same work, comparable)

    def gradients(self, batched: bool) -> list[torch.Tensor]:
        self.meta_step(batched)
        return [p.grad.clone() for p in self.rule.parameters()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["dm_lstm", "rnnprop", "mlp"])
    parser.add_argument("--tasks", nargs="+", type=int, default=[8])
    parser.add_argument("--segment", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# Meta-training throughput (digits MLP task, segments of {args.segment} steps)\n\n{machine_header()}\n")
    rows = []
    for family in args.families:
        for tasks in args.tasks:
            setup = Setup(family, tasks, args.segment)
            loop, batched = setup.gradients(False), setup.gradients(True)
            agree = max(
                float((a - b).abs().max() / (a.abs().max() + 1e-30)) for a, b in zip(loop, batched, strict=True)
            )
            timings = measure(
                {"loop": functools.partial(setup.meta_step, False), "vmap": functools.partial(setup.meta_step, True)},
                repeats=args.repeats,
            )
            lt, vt = timings["loop"].best, timings["vmap"].best
            rows.append(
                [
                    family,
                    tasks,
                    f"{1 / lt:.3g}",
                    f"{tasks / lt:.3g}",
                    f"{1 / vt:.3g}",
                    f"{tasks / vt:.3g}",
                    f"{lt / vt:.2f}x",
                    f"{agree:.1e}",
                ]
            )
            print(f"  measured {family} x{tasks}", file=sys.stderr, flush=True)
    print(
        table(
            [
                "net",
                "task instances",
                "one at a time: meta-steps/s",
                "task-segments/s",
                "vmap: meta-steps/s",
                "task-segments/s",
                "vmap speed-up",
                "max rel. diff of meta-gradients",
            ],
            rows,
        )
    )
    print(f"\nLoad at the end: {machine_header().split('load average ')[1]}")


if __name__ == "__main__":
    main()
