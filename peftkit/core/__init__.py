"""The method-agnostic core: config base, registry, layer contract, injection walker, PeftModel, checkpoints."""

from __future__ import annotations

from peftkit.core.config import PeftConfig, TunerConfig
from peftkit.core.errors import (
    AdapterNotFoundError,
    CheckpointError,
    NotMergeableError,
    PeftConfigError,
    TargetModuleError,
)
from peftkit.core.layer import AdapterLayer, ModulesToSaveWrapper
from peftkit.core.model import PeftModel, get_peft_model
from peftkit.core.registry import PeftMethod, register

__all__ = [
    "AdapterLayer",
    "AdapterNotFoundError",
    "CheckpointError",
    "ModulesToSaveWrapper",
    "NotMergeableError",
    "PeftConfig",
    "PeftConfigError",
    "PeftMethod",
    "PeftModel",
    "TargetModuleError",
    "TunerConfig",
    "get_peft_model",
    "register",
]
