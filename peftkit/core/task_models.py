"""``get_peft_model`` and HF peft's per-task ``PeftModel`` classes, so that ``isinstance(model,
PeftModelForCausalLM)`` holds after a port.

Each class is a ``PeftModel`` that serves one ``task_type``: a config without a task type gets the class's (the
classifier of ``PeftModelForSequenceClassification`` is then trained and saved, as in HF peft), and one naming
another task is refused. Defining a class registers it, so ``get_peft_model`` and ``PeftModel.from_pretrained``
return it for configs of its task type. The computation is the base model's in every case: what a task changes
(which head is trained whole) is read off the config, not off the class.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from peftkit.core.config import PeftConfig, TaskType
from peftkit.core.model import TASK_MODEL_CLASSES, PeftModel

__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "get_peft_model",
]


class PeftModelForCausalLM(PeftModel):
    """A ``PeftModel`` for decoder-only language models (``task_type="CAUSAL_LM"``)."""

    task_type = TaskType.CAUSAL_LM


class PeftModelForSeq2SeqLM(PeftModel):
    """A ``PeftModel`` for encoder-decoder language models (``task_type="SEQ_2_SEQ_LM"``)."""

    task_type = TaskType.SEQ_2_SEQ_LM


class PeftModelForSequenceClassification(PeftModel):
    """A ``PeftModel`` for sequence classification (``task_type="SEQ_CLS"``); the head (``classifier`` or
    ``score``) gets a trainable copy per adapter."""

    task_type = TaskType.SEQ_CLS


class PeftModelForTokenClassification(PeftModel):
    """A ``PeftModel`` for token classification (``task_type="TOKEN_CLS"``); the head gets a trainable copy."""

    task_type = TaskType.TOKEN_CLS


class PeftModelForQuestionAnswering(PeftModel):
    """A ``PeftModel`` for extractive question answering (``task_type="QUESTION_ANS"``); ``qa_outputs`` is
    trained whole."""

    task_type = TaskType.QUESTION_ANS


class PeftModelForFeatureExtraction(PeftModel):
    """A ``PeftModel`` for embedding models (``task_type="FEATURE_EXTRACTION"``)."""

    task_type = TaskType.FEATURE_EXTRACTION


# HF peft's name for the task type → class table (the same dict object ``get_peft_model`` reads).
MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[TaskType, type[PeftModel]] = TASK_MODEL_CLASSES


def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``peft_config`` (HF peft's entry point and arguments).

    Returns the ``PeftModel`` subclass for ``peft_config.task_type`` (``PeftModelForCausalLM``, ...), so HF peft's
    ``isinstance`` checks hold.

    Args:
        mixed: HF peft returns a ``PeftMixedModel`` that can hold adapters of different methods; every peftkit
            ``PeftModel`` can, so this returns a plain ``PeftModel`` (no task subclass), as HF's mixed model is.
        autocast_adapter_dtype: True (default): adapters of fp16/bf16 weights are kept in fp32. False: in the
            weight's own dtype.
        revision: The base model's Hub revision, recorded in the config (``AutoPeftModel`` loads that revision).
        low_cpu_mem_usage: Only False; see the error True raises.
    """
    if isinstance(model, PeftModel):
        raise ValueError("The model is a PeftModel already; use model.add_adapter(name, config) to add another.")
    if revision is not None:
        peft_config = dataclasses.replace(peft_config, revision=revision)
    if getattr(peft_config, "base_model_name_or_path", None) is None:
        name = getattr(getattr(model, "config", None), "name_or_path", None)
        if name:
            peft_config = dataclasses.replace(peft_config, base_model_name_or_path=name)
    cls = PeftModel if mixed else PeftModel.class_for(peft_config)
    return cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
               low_cpu_mem_usage=low_cpu_mem_usage)
