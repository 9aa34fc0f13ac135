"""HF peft's per-task ``PeftModel`` classes, so that ``isinstance(model, PeftModelForCausalLM)`` holds after a port.

Each class is a ``PeftModel`` that serves one ``task_type``: a config without a task type gets the class's (the
classifier of ``PeftModelForSequenceClassification`` is then trained and saved, as in HF peft), and one naming
another task is refused. Defining a class registers it, so ``get_peft_model`` and ``PeftModel.from_pretrained``
return it for configs of its task type. The computation is the base model's in every case: what a task changes
(which head is trained whole) is read off the config, not off the class.
"""

from __future__ import annotations

from peftkit.core.config import TaskType
from peftkit.core.model import TASK_MODEL_CLASSES, PeftModel

__all__ = [
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
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
