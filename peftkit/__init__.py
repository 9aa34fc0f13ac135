"""peftkit: parameter-efficient fine-tuning for PyTorch, with Hugging Face peft's API and checkpoints.

    from peftkit import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
"""

from __future__ import annotations

import importlib
from typing import Any

from peftkit import methods  # noqa: F401  (registers every method)
from peftkit.core import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    AdapterLayer,
    AdapterNotFoundError,
    CheckpointError,
    NotMergeableError,
    PeftConfig,
    PeftConfigError,
    PeftMethod,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    TargetModuleError,
    TaskType,
    get_peft_model,
    register,
)
from peftkit.core.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from peftkit.functional import (
    get_peft_config,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    load_peft_weights,
    rescale_adapter_scale,
    set_peft_model_state_dict,
    set_requires_grad,
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
from peftkit.peft_types import PeftType

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "AdapterConfig",
    "AdapterFusionConfig",
    "AdapterLayer",
    "AdapterNotFoundError",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "BitFitConfig",
    "CheckpointError",
    "CompositeConfig",
    "IA3Config",
    "LoraConfig",
    "MAMConfig",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "NotMergeableError",
    "PTuningConfig",
    "PTuningV2Config",
    "ParallelAdapterConfig",
    "PeftConfig",
    "PeftConfigError",
    "PeftMethod",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "TargetModuleError",
    "TaskType",
    "TunerLayerStatus",
    "TunerModelStatus",
    "UniPELTConfig",
    "__version__",
    "get_layer_status",
    "get_model_status",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "load_peft_weights",
    "prepare_model_for_kbit_training",
    "quantize_model",
    "register",
    "rescale_adapter_scale",
    "set_peft_model_state_dict",
    "set_requires_grad",
]

# Quantisation helpers resolve on first use, so `import peftkit` never imports bitsandbytes (an optional extra);
# AutoPeftModel* import transformers' Auto classes, also only when used.
_LAZY = {"quantize_model": "peftkit.integrations.bitsandbytes",
         "prepare_model_for_kbit_training": "peftkit.integrations.bitsandbytes",
         **{name: "peftkit.auto" for name in __all__ if name.startswith("AutoPeftModel")}}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
