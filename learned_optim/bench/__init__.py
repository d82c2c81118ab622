"""Research tooling: the benchmark suite of unseen, realistic tasks (``python -m learned_optim bench``).

* :mod:`~learned_optim.bench.data`: offline data (stdlib source text, scikit-learn tables and generators,
  procedurally drawn shapes, synthetic sequences) with disjoint, deterministic splits;
* :mod:`~learned_optim.bench.models` and :mod:`~learned_optim.bench.tasks`: the workloads (:data:`TASKS`);
* :mod:`~learned_optim.bench.run`: baselines, lr rules, the training loop, the run store, tuning;
* :mod:`~learned_optim.bench.stats`: IQM, speed-up, paired outcomes;
* :mod:`~learned_optim.bench.suite`: :func:`run_suite` and :class:`SuiteResults` (tables, files, plots);
* :mod:`~learned_optim.bench.cli`: the command line.
"""

from .run import LR_RULES, SUITE_VERSION
from .suite import SuiteResults, run_suite
from .tasks import QUICK, TASKS, BenchTask, Workload, get_task

__all__ = [
    "run_suite",
    "SuiteResults",
    "TASKS",
    "QUICK",
    "BenchTask",
    "Workload",
    "get_task",
    "LR_RULES",
    "SUITE_VERSION",
]
