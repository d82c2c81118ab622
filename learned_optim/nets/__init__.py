"""The learned update rules, one file per family, all registered in :data:`FAMILIES`."""

from .adafac_mlp import AdafacMLP, AdafacMLPConfig
from .base import FAMILIES, NetConfig, Segments, UpdateRule, build_rule, functional_update, register_family
from .dm_lstm import DMLSTM, DMLSTMConfig
from .mlp import MLPConfig, MLPUpdate
from .rnnprop import RNNProp, RNNPropConfig

__all__ = [
    "FAMILIES",
    "NetConfig",
    "Segments",
    "UpdateRule",
    "build_rule",
    "functional_update",
    "register_family",
    "AdafacMLP",
    "AdafacMLPConfig",
    "DMLSTM",
    "DMLSTMConfig",
    "MLPUpdate",
    "MLPConfig",
    "RNNProp",
    "RNNPropConfig",
]
