"""learned_optim: meta-trained optimizers for PyTorch.

>>> import learned_optim
>>> params = model.parameters()  # doctest: +SKIP
>>> opt = learned_optim.from_pretrained(learned_optim.FLAGSHIP, params, lr=1e-3, weight_decay=0.0)  # doctest: +SKIP

Keep AdamW's tuned lr, weight decay and schedule: the flagship replaces ``torch.optim.AdamW`` in a training loop.
Passing neither lr nor weight decay takes the flagship's defaults (lr 1e-2, weight decay 0.3, for users who tune
nothing).
"""

from importlib import metadata as _metadata

from .adapt import AdaptationError, AdaptationResult, adapt
from .hub import (
    FLAGSHIP,
    CheckpointError,
    HubUploadError,
    from_pretrained,
    list_pretrained,
    load_rule,
    save_pretrained,
)
from .nets import DMLSTM, FAMILIES, AdafacMLP, MLPUpdate, RNNProp, UpdateRule, build_rule, functional_update
from .optimizer import LearnedOptimizer, NonFiniteGradientError

try:  # the one place the version is written is pyproject.toml; installs record it in the package metadata
    __version__ = _metadata.version("learned-optim")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "LearnedOptimizer",
    "NonFiniteGradientError",
    "CheckpointError",
    "HubUploadError",
    "FLAGSHIP",
    "from_pretrained",
    "list_pretrained",
    "load_rule",
    "save_pretrained",
    "adapt",
    "AdaptationError",
    "AdaptationResult",
    "UpdateRule",
    "DMLSTM",
    "RNNProp",
    "MLPUpdate",
    "AdafacMLP",
    "FAMILIES",
    "build_rule",
    "functional_update",
]

from .integrations.timm import register_timm_optimizers as _register_timm_optimizers

_register_timm_optimizers()
