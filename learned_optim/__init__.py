"""learned_optim: meta-trained optimizers for PyTorch.

>>> import learned_optim
>>> opt = learned_optim.from_pretrained("l2o-lstm", model.parameters())  # doctest: +SKIP
"""

from .adapt import AdaptationError, AdaptationResult, adapt
from .hub import CheckpointError, from_pretrained, list_pretrained, load_rule, save_pretrained
from .nets import DMLSTM, FAMILIES, AdafacMLP, MLPUpdate, RNNProp, UpdateRule, build_rule, functional_update
from .optimizer import LearnedOptimizer, NonFiniteGradientError

__version__ = "0.1.0"

__all__ = [
    "LearnedOptimizer",
    "NonFiniteGradientError",
    "CheckpointError",
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
