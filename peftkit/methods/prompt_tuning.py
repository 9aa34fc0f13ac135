"""Prompt tuning (Lester et al. 2021), with prompt ensembling.

``n`` learned vectors ``P`` are put in front of the input embeddings, ``[P; E(x)]``; the model is otherwise
unchanged. With ``num_prompts = E > 1`` the adapter holds E prompts for one task: every example runs once with
each of them in the same batch (rows ``example * E + prompt``), and ``model.ensemble_predict(...)`` combines
their logits by mean or majority vote.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.core.errors import PeftConfigError
from peftkit.core.registry import register
from peftkit.methods.prompt_learning import (
    PromptLearningConfig,
    VirtualTokenMethod,
    VirtualTokenModule,
    input_embedding,
)

__all__ = ["PromptTuningConfig", "PromptEmbedding"]

_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclass(kw_only=True)
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: a learned soft prompt prepended to the input embeddings.

    Args:
        prompt_tuning_init: ``"RANDOM"`` (N(0, 1), as HF peft), ``"SAMPLE_VOCAB"`` (embeddings of random
            vocabulary tokens; usually trains better) or ``"TEXT"`` (embeddings of ``prompt_tuning_init_text``,
            repeated to the prompt length).
        prompt_tuning_init_text: Text for ``"TEXT"``, e.g. the task description or the class names.
        tokenizer_name_or_path: A local tokenizer directory for ``"TEXT"``.
        tokenizer_kwargs: Extra arguments for ``AutoTokenizer.from_pretrained``.
        num_prompts: Prompt ensemble size ``E`` (1: a single prompt).
    """

    peft_type = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None
    num_prompts: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prompt_tuning_init not in _INITS:
            raise PeftConfigError(f"prompt_tuning_init={self.prompt_tuning_init!r}; use one of {list(_INITS)}.")
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise PeftConfigError(
                "prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path (a local "
                "tokenizer directory)."
            )
        if not isinstance(self.num_prompts, int) or self.num_prompts < 1:
            raise PeftConfigError(f"num_prompts must be a positive integer, got {self.num_prompts!r}.")


class PromptEmbedding(VirtualTokenModule):
    """The soft prompt table ``P ∈ R^{(E·s·n) × d}`` (E prompts, s submodules); checkpoint key
    ``prompt_embeddings``, as in HF peft."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__(config, num_prompts=config.num_prompts)
        weight = word_embeddings.weight
        self.embedding = nn.Embedding(self.total_virtual_tokens, config.token_dim, device=weight.device)
        if config.prompt_tuning_init != "RANDOM":
            with torch.no_grad():
                ids = self._init_ids(config, word_embeddings.num_embeddings).to(weight.device)
                self.embedding.weight.copy_(word_embeddings(ids).float())

    def _init_ids(self, config: PromptTuningConfig, vocab_size: int) -> torch.Tensor:
        total = self.total_virtual_tokens
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            return torch.randint(0, vocab_size, (total,))
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **(config.tokenizer_kwargs or {}))
        ids = tokenizer(config.prompt_tuning_init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise PeftConfigError("prompt_tuning_init_text tokenizes to nothing; give a non-empty text.")
        repeats = -(-total // len(ids))
        return torch.tensor((ids * repeats)[:total])

    def prompt_table(self) -> torch.Tensor:
        return self.embedding.weight

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embedding.weight}


@register(PromptTuningConfig)
class PromptTuning(VirtualTokenMethod):
    @classmethod
    def adapter_module(cls, peft_model: Any, config: PromptTuningConfig, adapter_name: str) -> PromptEmbedding:
        return PromptEmbedding(config, input_embedding(peft_model.get_base_model()))
