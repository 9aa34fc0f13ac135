"""peftkit: parameter-efficient fine-tuning for PyTorch, with Hugging Face peft's API and checkpoints.

    from peftkit import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
"""

from __future__ import annotations

from peftkit import methods  # noqa: F401  (registers every method)
from peftkit.core import (
    AdapterLayer,
    AdapterNotFoundError,
    CheckpointError,
    NotMergeableError,
    PeftConfig,
    PeftConfigError,
    PeftMethod,
    PeftModel,
    TargetModuleError,
    get_peft_model,
    register,
)
from peftkit.methods.lora import LoraConfig

__version__ = "0.1.0"

__all__ = [
    "AdapterLayer",
    "AdapterNotFoundError",
    "CheckpointError",
    "LoraConfig",
    "NotMergeableError",
    "PeftConfig",
    "PeftConfigError",
    "PeftMethod",
    "PeftModel",
    "TargetModuleError",
    "__version__",
    "get_peft_model",
    "register",
]
