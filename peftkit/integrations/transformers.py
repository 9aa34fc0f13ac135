"""What peftkit knows about Hugging Face transformers models: architecture names, task heads, position ids."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["model_type", "task_head_names", "forward_position_ids"]

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


def forward_position_ids(
    model: nn.Module, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, length: int, past: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The position ids ``model.forward`` computes itself when given none, and which of them count tokens.

    Returns ``(positions, counted)``: positions of shape (rows or 1, length); ``counted`` (bool, same shape) marks
    the entries that move when ``k`` tokens are added in front (None: all of them). Three conventions cover the
    transformers models: RoBERTa-style embeddings number non-pad tokens after ``padding_idx``; OPT numbers
    attended tokens (a cumulative sum of the mask); the rest count up from the cache length.
    """
    if input_ids is not None:
        for module in model.modules():
            number = getattr(module, "create_position_ids_from_input_ids", None)
            if number is not None and getattr(module, "padding_idx", None) is not None:
                return number(input_ids, module.padding_idx, past), input_ids != module.padding_idx
    if model_type(model) == "opt":
        rows = (input_ids if input_ids is not None else attention_mask).shape[0] if (
            input_ids is not None or attention_mask is not None) else 1
        device = input_ids.device if input_ids is not None else None
        mask = attention_mask if attention_mask is not None else torch.ones(rows, past + length, device=device)
        mask = mask.long()
        return ((mask.cumsum(-1) * mask) - 1)[:, -length:], mask[:, -length:].bool()
    device = input_ids.device if input_ids is not None else None
    return torch.arange(past, past + length, device=device).unsqueeze(0), None
