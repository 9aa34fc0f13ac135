"""The method-agnostic core: config base, registry, layer contract, injection walker, PeftModel, checkpoints."""

from __future__ import annotations

from peftkit.core.config import PeftConfig, TaskType, TunerConfig
from peftkit.core.errors import (
    AdapterNotFoundError,
    CheckpointError,
    NotMergeableError,
    PeftConfigError,
    TargetModuleError,
)
from peftkit.core.layer import AdapterLayer, ModulesToSaveWrapper
from peftkit.core.model import PeftModel
from peftkit.core.registry import PeftMethod, register
from peftkit.core.task_models import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)

__all__ = [
    "AdapterLayer",
    "AdapterNotFoundError",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "CheckpointError",
    "ModulesToSaveWrapper",
    "NotMergeableError",
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
    "TaskType",
    "TargetModuleError",
    "TunerConfig",
    "get_peft_model",
    "register",
]
