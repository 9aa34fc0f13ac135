"""P-tuning (Liu et al. 2021, "GPT Understands, Too"): virtual tokens produced by a prompt encoder.

``P = head(encoder(E))`` with ``E ∈ R^{n×d}`` learned inputs; ``"LSTM"``: a 2-layer bidirectional LSTM followed by
Linear–ReLU–Linear, ``"MLP"``: Linear–ReLU–Linear–ReLU–Linear (HF peft's two encoders, same shapes). The virtual
tokens sit anywhere in the input: without a template they go in front of the text; for an infix template put
``model.virtual_token_ids()`` where the prompt belongs, e.g. ``[P0 P1 P2] x [P3 P4 P5] [MASK]``. A checkpoint
stores the encoder's output ``P`` as plain embeddings (HF peft's ``prompt_embeddings``), so a loaded adapter runs
without the encoder.
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

__all__ = ["PromptEncoderConfig", "PTuningConfig", "PromptEncoder"]


@dataclass(kw_only=True)
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning's prompt encoder.

    Args:
        encoder_reparameterization_type: ``"MLP"`` (HF peft's default) or ``"LSTM"`` (the paper's).
        encoder_hidden_size: Hidden width of the encoder; None: ``token_dim``.
        encoder_num_layers: LSTM layers (the MLP always has two hidden layers, as in HF peft).
        encoder_dropout: Dropout between LSTM layers.
    """

    peft_type = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise PeftConfigError(
                f"encoder_reparameterization_type={self.encoder_reparameterization_type!r}; use 'MLP' or 'LSTM'."
            )


PTuningConfig = PromptEncoderConfig


class PromptEncoder(VirtualTokenModule):
    """``P = head(encoder(E))``; after ``materialize`` (a loaded checkpoint) ``P`` is a plain parameter."""

    def __init__(self, config: PromptEncoderConfig, device: torch.device) -> None:
        super().__init__(config)
        dim = config.token_dim
        hidden = config.encoder_hidden_size or dim
        self.embedding = nn.Embedding(self.total_virtual_tokens, dim, device=device)
        self.lstm_head: nn.LSTM | None = None
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True, device=device)
            self.mlp_head: nn.Sequential | None = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden, device=device), nn.ReLU(), nn.Linear(2 * hidden, dim, device=device)
            )
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden, device=device), nn.ReLU(), nn.Linear(hidden, hidden, device=device), nn.ReLU(),
                nn.Linear(hidden, dim, device=device),
            )

    def prompt_table(self) -> torch.Tensor:
        table = self.embedding.weight
        if self.mlp_head is None:
            return table
        if self.lstm_head is not None:
            table = self.lstm_head(table.unsqueeze(0))[0].squeeze(0)
        return self.mlp_head(table)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        # Evaluated as inference evaluates it: the CPU LSTM rounds differently with autograd on (~1e-7).
        with torch.no_grad():
            return {"prompt_embeddings": self.prompt_table()}

    def materialize(self) -> None:
        if self.mlp_head is None:
            return
        with torch.no_grad():
            table = self.prompt_table().detach().clone()
        self.embedding.weight = nn.Parameter(table, requires_grad=self.embedding.weight.requires_grad)
        self.lstm_head = None
        self.mlp_head = None


@register(PromptEncoderConfig)
class PTuning(VirtualTokenMethod):
    @classmethod
    def adapter_module(cls, peft_model: Any, config: PromptEncoderConfig, adapter_name: str) -> PromptEncoder:
        return PromptEncoder(config, input_embedding(peft_model.get_base_model()).weight.device)
