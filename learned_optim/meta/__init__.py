"""Meta-training: tasks (optimizees), differentiable unrolls, objectives, curricula and the trainer.

>>> from learned_optim.meta import MetaTrainer
>>> MetaTrainer("learned_optim/meta/configs/smoke.yaml", out_dir="runs/smoke").train()  # doctest: +SKIP

The names below are imported on first use, so importing ``learned_optim.tasks`` stays light. The
unroll function itself is ``learned_optim.meta.unroll.unroll`` (the submodule owns the name ``unroll``).
"""

import importlib

_LAZY = {
    "MetaTrainer": ".trainer",
    "MetaTrainConfig": ".config",
    "load_config": ".config",
    "start_trajectory": ".unroll",
    "Trajectory": ".unroll",
    "MetaLossHook": ".unroll",
    "meta_objective": "..objectives",  # the shipped core's (adapt uses it too)
    "Curriculum": ".curriculum",
    "imitation_unroll": ".imitation",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
