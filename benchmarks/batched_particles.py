"""Meta-training with PES particles or truncated-BPTT task instances unrolled one by one against unrolled together
(``estimator.batch_particles``).

::

    python benchmarks/batched_particles.py                       # the flagship's parent recipe, 8 trajectories
    python benchmarks/batched_particles.py --trajectories 4 --processes 0
    python benchmarks/batched_particles.py --processes 0 --set estimator.instances=2   # 2 task instances, 16 particles
    python benchmarks/batched_particles.py --config adafac-mlp-adam-magnitude-tbv-nomup-control \
        --set estimator.instances=4 --trajectories 4      # truncated BPTT over 4 task instances per meta-step

Runs the same recipe (``--trajectories`` trajectories of the bundled ``--config``, the same tasks in the same
order) from scratch through the meta-training command line, one run after the other so that none shares the cores
with another: the particles (PES) or task instances (truncated BPTT, ``estimator.instances`` > 1) unrolled one
after the other (the default), unrolled together (``--set estimator.batch_particles=true``: each inner step one call
batched over them by ``torch.func.vmap``, with truncated BPTT keeping the graph) and, for PES unless ``--processes
0``, both again on each rank of a particle-parallel run (``torchrun --nproc-per-node P ... --parallel particles``);
for truncated BPTT also one instance alone (``--set estimator.instances=1``: what the K instances cost beside it).
Prints each run's wall time and median seconds per meta-step (from its log, the first trajectory left out), their
ratios to the first run, and how far the batched run's first meta-step is from the loop's (they differ by float
rounding only: the relative difference of PES's objectives and estimate's norm, or of truncated BPTT's objective and
meta-gradient norm).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import cpu_flags_line, machine_header, table  # noqa: E402
from particle_parallel import run  # noqa: E402

from learned_optim.meta.config import load_config, resolve_config_path  # noqa: E402


def first_step(out: Path) -> dict[str, float]:
    """The first meta-step's record of a run's log."""
    for line in (out / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "meta_step":
            return record
    raise RuntimeError(f"no meta-step in {out / 'log.jsonl'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", default="adafac-mlp-adam-magnitude-tbv-nomup", help="a bundled PES or truncated-BPTT config"
    )
    parser.add_argument("--trajectories", type=int, default=8, help="meta_epochs of each run")
    parser.add_argument("--processes", type=int, default=2, help="processes of the particle-parallel run (0: none)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every run (repeatable)"
    )
    args = parser.parse_args(argv)
    estimator = load_config(resolve_config_path(args.config), [*args.set]).estimator
    if estimator.kind == "tbptt" and estimator.instances < 2:
        parser.error("a truncated-BPTT config batches its task instances: add --set estimator.instances=K (K >= 2)")
    pes = estimator.kind == "pes"

    train = ["-m", "learned_optim.meta", "train", args.config, "--no-progress", "--set"]
    train.append(f"meta_epochs={args.trajectories}")
    train += [a for override in args.set for a in ("--set", override)]
    batched = ["--set", "estimator.batch_particles=true"]
    runs = {
        "1 process, one by one": [sys.executable, *train],
        "1 process, batched": [sys.executable, *train, *batched],
    }
    if not pes:  # what a meta-step of one instance costs, beside K of them
        runs["1 process, one instance"] = [sys.executable, *train, "--set", "estimator.instances=1"]
    if args.processes and pes:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
        parallel = [*torchrun, str(args.processes), *train, "--parallel", "particles"]
        runs[f"{args.processes} processes, --parallel particles, one by one"] = parallel
        runs[f"{args.processes} processes, --parallel particles, batched"] = [*parallel, *batched]
    what = "PES particles" if pes else f"Truncated-BPTT task instances ({estimator.instances})"
    print(f"# {what} one by one against batched\n\n{machine_header()}\n\n{cpu_flags_line()}\n")
    overrides = "".join(f", --set {o}" for o in args.set)
    print(f"config {args.config}{overrides}, {args.trajectories} trajectories from scratch, run one after the other\n")
    work = Path(tempfile.mkdtemp(prefix="batched-particles-"))
    results, firsts = {}, []
    try:
        for i, (name, command) in enumerate(runs.items()):
            out = work / f"run{i}"
            results[name] = run([*command, "--out", str(out)], out)
            firsts.append(first_step(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base_wall, base_step = results["1 process, one by one"]
    rows = [
        [name, f"{wall:.1f}", f"{step:.3f}", f"{base_wall / wall:.2f}x", f"{base_step / step:.2f}x"]
        for name, (wall, step) in results.items()
    ]
    print(table(["run", "wall s", "median s / meta-step", "wall speed-up", "meta-step speed-up"], rows))
    keys = ("pes_loss_plus", "pes_loss_minus", "pes_grad_norm") if pes else ("objective", "grad_norm")
    gaps = {k: abs(firsts[1][k] - firsts[0][k]) / abs(firsts[0][k]) for k in keys}
    print("\nfirst meta-step, batched against one by one (relative difference): ", end="")
    print(", ".join(f"{k} {v:.1e}" for k, v in gaps.items()))


if __name__ == "__main__":
    main()
