"""Smoke run of the ``adafac-mlp`` recipe: a few minutes of its meta-training, interrupted and resumed.

::

    python benchmarks/adafac_mlp_smoke.py --out runs/adafac-smoke [--meta-epochs 9 --stop-at 45]

Runs ``learned_optim/meta/configs/adafac-mlp.yaml`` (1 torch thread) with ``meta_epochs`` cut down, stops
it after ``--stop-at`` meta-steps as a kill would, resumes it with ``--resume`` semantics to the end, and
prints:

* the time per meta-step, and the extrapolated time of the full recipe (its ``meta_epochs``);
* the meta-objective of the untrained (Adam-initialised) and of the smoke-trained net on the same
  ``--eval-tasks`` fixed evaluation draws of the task distribution (the trainer's evaluation tasks, not
  its training draws): the mean over tasks of :math:`\\log(f_T / f_0)` after ``--eval-steps`` inner steps
  (``MetaTrainer.evaluate_runs(score="log_final")``; lower is better), with the per-task difference;
* that ``model/`` (written by ``save_pretrained``) loads with ``learned_optim.from_pretrained`` and steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import learned_optim
from learned_optim.meta.cli import resolve_config_path
from learned_optim.meta.config import load_config
from learned_optim.meta.trainer import MetaTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/adafac-smoke")
    parser.add_argument("--meta-epochs", type=int, default=9)
    parser.add_argument("--stop-at", type=int, default=45)
    parser.add_argument("--eval-tasks", type=int, default=12)
    parser.add_argument("--eval-steps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = resolve_config_path("adafac-mlp")
    full = load_config(path)
    overrides = [f"meta_epochs={args.meta_epochs}", "checkpoint_every=10"]
    out = Path(args.out)

    def trainer() -> MetaTrainer:
        return MetaTrainer(load_config(path, overrides), out_dir=out, progress=False, command="smoke")

    first = trainer()
    before = first.evaluate_runs(args.eval_steps, args.eval_tasks, score="log_final")
    started = time.perf_counter()
    assert first.train(stop_after=args.stop_at) is None
    second = trainer()
    folder = second.train(resume=True)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "meta_step"]
    resumed = [r for r in records if r["event"] == "resume"]
    per_step = statistics.mean(r["seconds"] for r in steps)
    per_traj = full.unroll.trajectory_length / full.unroll.segment_length
    print(
        f"meta-steps: {len(steps)} in {wall:.0f} s (interrupted after {args.stop_at}, resumed at meta-step "
        f"{resumed[0]['meta_step'] if resumed else None}); {per_step:.2f} s per meta-step"
    )
    full_hours = per_step * per_traj * full.meta_epochs / 3600
    print(
        f"full recipe: {full.meta_epochs} trajectories x {per_traj:.0f} meta-steps -> {full_hours:.2f} h at this rate"
    )
    after = second.evaluate_runs(args.eval_steps, args.eval_tasks, score="log_final")
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    print(
        f"eval ({args.eval_tasks} held-out draws, {args.eval_steps} steps), mean log(f_T/f_0): "
        f"untrained (Adam init) {statistics.mean(before):.4f}, smoke-trained {statistics.mean(after):.4f}; "
        f"per-task change mean {statistics.mean(diffs):+.4f} (sd {statistics.stdev(diffs):.4f}), "
        f"improved on {sum(d < 0 for d in diffs)}/{len(diffs)}"
    )
    first_seg = [r["objective"] for r in steps if r["trajectory_step"] == full.unroll.segment_length]
    print("first-segment objective per trajectory:", " ".join(f"{v:.3f}" for v in first_seg))
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    opt = learned_optim.from_pretrained(str(folder), model.parameters())
    x, y = torch.randn(32, 8), torch.randn(32, 2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    print(
        f"from_pretrained({folder}): {type(opt.rule).__name__}, lr {opt.param_groups[0]['lr']}; "
        f"20 steps on a toy regression: loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    )


if __name__ == "__main__":
    main()
