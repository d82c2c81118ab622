"""PES meta-training on one process against particle-parallel on several (``--parallel particles``), side by side.

::

    python benchmarks/particle_parallel.py                                   # the flagship's parent, 5 trajectories
    python benchmarks/particle_parallel.py --trajectories 2 --processes 2 --config adafac-mlp-adam-magnitude-tbv-nomup

Runs the same PES recipe (``--trajectories`` trajectories of the bundled ``--config``) twice from scratch through
the meta-training command line, one process after the other so that neither shares the cores with the other:
``python -m learned_optim.meta train`` and ``torchrun --nproc-per-node P -m learned_optim.meta train ... --parallel
particles``. Prints each run's wall time (the whole command, start-up included) and its median seconds per meta-step
(from its log, the first trajectory left out), their ratios, and whether the two shipped nets are equal bit for bit
(they must be: the particle split changes where a particle is unrolled, not what it computes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import cpu_flags_line, machine_header, table  # noqa: E402


def run(command: list[str], out: Path) -> tuple[float, float]:
    """Wall seconds of ``command`` and the median seconds of its meta-steps after the first trajectory."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["seconds"] for r in records if r.get("event") == "meta_step" and r["meta_epoch"] > 0]
    return wall, statistics.median(steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="adafac-mlp-adam-magnitude-tbv-nomup", help="a bundled PES config")
    parser.add_argument("--trajectories", type=int, default=5, help="meta_epochs of each run")
    parser.add_argument("--processes", type=int, default=2, help="processes of the particle-parallel run")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="particle-parallel-"))
    train = [
        "-m",
        "learned_optim.meta",
        "train",
        args.config,
        "--no-progress",
        "--set",
        f"meta_epochs={args.trajectories}",
    ]
    launchers = {
        "1 process": [sys.executable],
        f"{args.processes} processes, --parallel particles": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(args.processes),
        ],
    }
    print(f"# PES meta-training: one process against particle-parallel\n\n{machine_header()}\n\n{cpu_flags_line()}\n")
    print(f"config {args.config}, {args.trajectories} trajectories from scratch, run one after the other\n")
    results, nets = {}, []
    try:
        for i, (name, launcher) in enumerate(launchers.items()):
            out = work / f"run{i}"
            extra = ["--parallel", "particles"] if i else []
            results[name] = run([*launcher, *train, "--out", str(out), *extra], out)
            nets.append(load_file(str(out / "model" / "model.safetensors")))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (one_wall, one_step), (par_wall, par_step) = results.values()
    rows = [[name, f"{wall:.1f}", f"{step:.3f}"] for name, (wall, step) in results.items()]
    rows.append(["ratio (1 process / particle-parallel)", f"{one_wall / par_wall:.2f}x", f"{one_step / par_step:.2f}x"])
    print(table(["run", "wall s", "median s / meta-step"], rows))
    same = nets[0].keys() == nets[1].keys() and all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])
    print(f"\nshipped nets equal bit for bit: {same}")
    if not same:
        raise SystemExit("the particle-parallel run is not the single-process run")


if __name__ == "__main__":
    main()
