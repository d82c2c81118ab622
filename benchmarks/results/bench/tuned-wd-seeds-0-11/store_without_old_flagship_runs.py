"""Hard-link ``benchmarks/results/bench/full-runs/runs`` into ``OUT/runs`` without the flagship's evaluation runs of
seeds 0-5, which older code made, so that a bench run with ``--baseline-dir OUT`` makes them again.

    python benchmarks/results/bench/tuned-wd-seeds-0-11/store_without_old_flagship_runs.py OUT
"""

import os
import sys
from pathlib import Path

from learned_optim.bench.run import RECORD_SUFFIX, read_run_record

FLAGSHIP = "adafac-mlp-adam-magnitude-tbv-nomup-soup-all8"
STORE = Path(__file__).resolve().parents[1] / "full-runs" / "runs"


def main(out: Path) -> None:
    target = out / "runs"
    target.mkdir(parents=True, exist_ok=True)
    kept = left_out = 0
    for run in sorted(STORE.glob(f"*{RECORD_SUFFIX}")):
        record = read_run_record([STORE], run.name.removesuffix(RECORD_SUFFIX))
        if record is None:  # (read_run_record warned which file and why)
            continue
        if record["optimizer"] == FLAGSHIP and record["seed"] < 6:
            left_out += 1
            continue
        os.link(run, target / run.name)
        kept += 1
    print(f"{kept} runs linked into {target}, {left_out} of the flagship's seeds 0-5 left out")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
