"""What peftkit knows about Hugging Face transformers models: architecture names and task heads."""

from __future__ import annotations

from torch import nn

__all__ = ["model_type", "task_head_names"]

# Heads trained from scratch for a task; HF peft puts the same names into modules_to_save.
_TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def model_type(model: nn.Module) -> str | None:
    """The transformers ``config.model_type`` (``"gpt2"``, ``"llama"``, ...), or None for other models."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def task_head_names(model: nn.Module, task_type: str | None, present: bool = True) -> list[str]:
    """Names of the task head modules for ``task_type`` that exist in ``model`` (or, with
    ``present=False``, that do not: HF peft writes ``["classifier", "score"]`` whichever the model has)."""
    wanted = _TASK_HEADS.get(task_type or "", ())
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [name for name in wanted if (name in leaves) == present]
