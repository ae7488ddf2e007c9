"""Configuration objects: one small dataclass per method, one file each, validated when built.

``checks`` holds what they share (value checks, the base class, the registry behind
``config_from_dict``); each method's file registers its class with ``register_config``.
"""
from .checks import (
    ALL_LINEAR,
    CONFIG_CLASSES,
    PEFT_NAMES,
    MethodConfig,
    Targets,
    WrongType,
    check_bool,
    check_number,
    config_from_dict,
    register_config,
)
from .lora import LoRAConfig
from .lofit import LoFiTConfig
from .selective_lora import SelectiveLoRAConfig
from .dsee import DSEEConfig
from .loss import LossConfig
from .qat import ROTATIONS, QATConfig
from .s2ft import S2FTConfig
from .sparse import SparseConfig
from .qgoft import QGOFTConfig

__all__ = [
    "ALL_LINEAR", "CONFIG_CLASSES", "PEFT_NAMES", "MethodConfig", "Targets", "WrongType", "check_bool",
    "check_number", "config_from_dict", "register_config", "LoRAConfig", "LossConfig", "QATConfig", "ROTATIONS",
    "S2FTConfig", "SparseConfig", "LoFiTConfig", "SelectiveLoRAConfig", "DSEEConfig", "QGOFTConfig",
]
