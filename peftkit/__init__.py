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
from peftkit.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from peftkit.methods.adalora import AdaLoraConfig
from peftkit.methods.adapters import AdapterConfig
from peftkit.methods.bitfit import BitFitConfig
from peftkit.methods.composite import CompositeConfig, MAMConfig
from peftkit.methods.fusion import AdapterFusionConfig
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.lora import LoraConfig
from peftkit.methods.lora_data_init import get_eva_state_dict, initialize_lora_eva_weights, preprocess_corda
from peftkit.methods.lora_init import CordaConfig, EvaConfig, LoftQConfig
from peftkit.methods.lora_loftq import replace_lora_weights_loftq
from peftkit.methods.p_tuning import PromptEncoderConfig, PTuningConfig
from peftkit.methods.parallel_adapter import ParallelAdapterConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig, PTuningV2Config
from peftkit.methods.prompt_tuning import PromptTuningConfig
from peftkit.methods.trainable_tokens import TrainableTokensConfig
from peftkit.methods.unipelt import UniPELTConfig
from peftkit.optimizers import create_loraplus_optimizer
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
    "CordaConfig",
    "EvaConfig",
    "IA3Config",
    "LoftQConfig",
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
    "TrainableTokensConfig",
    "UniPELTConfig",
    "__version__",
    "create_loraplus_optimizer",
    "get_layer_status",
    "get_model_status",
    "get_peft_config",
    "get_peft_model",
    "get_eva_state_dict",
    "get_peft_model_state_dict",
    "hotswap_adapter",
    "initialize_lora_eva_weights",
    "inject_adapter_in_model",
    "load_peft_weights",
    "prepare_model_for_compiled_hotswap",
    "prepare_model_for_kbit_training",
    "preprocess_corda",
    "quantize_model",
    "register",
    "replace_lora_weights_loftq",
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
