"""The registration's diagnostic: single runs of Muon variants and of the orthogonalised rules on one selection task.

::

    python benchmarks/results/bench/orthogonal-fixed-rms/tuning_seed_diagnostic.py select-copy-lstm 1000000 \\
        muon:0.03:0.1 muon-nonest:0.03:0.1 harness:0.03:0.3 unit:0.01:0.3 flagrms:0.03:0.3

Each ``VARIANT:LR:WD`` is one run of :func:`learned_optim.bench.run.train` (warm-up + cosine, the task's seed
given); prints one JSON line per run with the final validation loss. Runs are not stored.
"""

import json
import sys
import time
from typing import Any

import torch

from learned_optim.bench import run as bench_run
from learned_optim.bench.baselines import MuonAdamW
from learned_optim.bench.tasks import get_task

NETS = "benchmarks/results/bench"
LEARNED = {
    "harness": f"{NETS}/orthogonal-ns3/selection-references/nets/untrained-orthogonal-ns3",
    "unit": f"{NETS}/orthogonal-unit-step/nets/untrained-orthogonal-unit-ns3",
    "flag": "pretrained/adafac-mlp-adam-magnitude-tbv-nomup-soup-all8-orthogonal",
    "flagrms": f"{NETS}/orthogonal-fixed-rms/nets/flagship-rms02",
    "handrms": f"{NETS}/orthogonal-fixed-rms/nets/untrained-orthogonal-ns3-rms02",
    "flagfloor": f"{NETS}/orthogonal-fixed-rms/nets/flagship-floor02",
    "flagfloor16": f"{NETS}/orthogonal-fixed-rms/nets/flagship-floor02-min16",
}
MUON: dict[str, dict[str, Any]] = {
    "muon": {},
    "muon-nonest": {"nesterov": False},
    "muon-m09": {"momentum": 0.9, "nesterov": False},
    "muon-ns3": {"ns_steps": 3},
}


def optimizer(variant: str) -> bench_run.BenchOptimizer:
    if variant in LEARNED:
        return bench_run.learned_optimizer(LEARNED[variant])
    kwargs = MUON[variant]
    return bench_run.BenchOptimizer(
        variant, "baseline", lambda params, lr, wd: MuonAdamW(params, lr=lr, weight_decay=wd, **kwargs), kwargs
    )


def main() -> None:
    torch.set_num_threads(1)
    task, seed = sys.argv[1], int(sys.argv[2])
    workload = get_task(task, selection=True).bind()
    for spec in sys.argv[3:]:
        variant, lr, wd = spec.split(":")
        opt, tick = optimizer(variant), time.time()
        record = bench_run.train(workload, opt, bench_run.Setting(opt.name, float(lr), float(wd), "cosine"), seed)
        line = {"variant": variant, "lr": float(lr), "wd": float(wd), "seed": seed}
        print(json.dumps({**line, "val": record["final"]["val_loss"], "s": round(time.time() - tick, 1)}), flush=True)


if __name__ == "__main__":
    main()
