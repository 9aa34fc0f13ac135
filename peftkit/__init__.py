"""peftkit: parameter-efficient fine-tuning for PyTorch, with Hugging Face peft's API and checkpoints.

    from peftkit import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
"""

from __future__ import annotations

import importlib
from typing import Any

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
from peftkit.methods.adalora import AdaLoraConfig
from peftkit.methods.adapters import AdapterConfig
from peftkit.methods.bitfit import BitFitConfig
from peftkit.methods.composite import CompositeConfig, MAMConfig
from peftkit.methods.fusion import AdapterFusionConfig
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.lora import LoraConfig
from peftkit.methods.p_tuning import PromptEncoderConfig, PTuningConfig
from peftkit.methods.parallel_adapter import ParallelAdapterConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig, PTuningV2Config
from peftkit.methods.prompt_tuning import PromptTuningConfig
from peftkit.methods.unipelt import UniPELTConfig

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "AdapterConfig",
    "AdapterFusionConfig",
    "AdapterLayer",
    "AdapterNotFoundError",
    "BitFitConfig",
    "CheckpointError",
    "CompositeConfig",
    "IA3Config",
    "LoraConfig",
    "MAMConfig",
    "NotMergeableError",
    "PTuningConfig",
    "PTuningV2Config",
    "ParallelAdapterConfig",
    "PeftConfig",
    "PeftConfigError",
    "PeftMethod",
    "PeftModel",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "TargetModuleError",
    "UniPELTConfig",
    "__version__",
    "get_peft_model",
    "prepare_model_for_kbit_training",
    "quantize_model",
    "register",
]

# Quantisation helpers resolve on first use, so `import peftkit` never imports bitsandbytes (an optional extra).
_LAZY = {"quantize_model": "peftkit.integrations.bitsandbytes",
         "prepare_model_for_kbit_training": "peftkit.integrations.bitsandbytes"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
