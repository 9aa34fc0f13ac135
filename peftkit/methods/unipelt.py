"""UniPELT: gated LoRA, prefix tuning and a Pfeiffer adapter under one adapter name.

Mao et al. 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning",
https://arxiv.org/abs/2110.07577. Reference: the authors' code and AdapterHub ``adapters`` ``UniPELTConfig``. Each
submodule is multiplied by its own learned gate ``G = σ(W_g z + b_g)`` of its input ``z`` (see
:mod:`peftkit.methods.gating`), so training can turn each one up or down per example::

    attention input x ─► G_P(x) · [P_K; P_V] prefixes (n = 10)
                     └─► Wq, Wv: W0 x + G_L(x) · B A x (r = 8; G_L replaces α/r)
    FFN block ─► LN(x + h) ─► + G_A(u) · A(u), u = LN(x + h) (Pfeiffer, reduction 16)

The members are a ``LoraConfig``, a ``PrefixTuningConfig`` and an ``AdapterConfig``, each with ``gate`` set; the core
runs them as it runs any composite.
Gated LoRA has no weight form, so UniPELT cannot be merged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit.core.errors import PeftConfigError
from peftkit.core.registry import register
from peftkit.methods.adapters import AdapterConfig
from peftkit.methods.composite import Composite, CompositeConfig
from peftkit.methods.gating import GATE_REDUCTIONS
from peftkit.methods.lora import LoraConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig

__all__ = ["UniPELTConfig"]


@dataclass(kw_only=True)
class UniPELTConfig(CompositeConfig):
    """UniPELT: LoRA on the query and value projections, prefix tuning and a Pfeiffer adapter, each gated.

    Args:
        r: LoRA rank (8).
        lora_alpha: LoRA alpha (2). Used by no forward: the gate takes the place of ``α/r``; kept for the record and
            for configs that turn the LoRA gate off.
        num_virtual_tokens: Prefix length (10), reparametrised by a Linear–Tanh–Linear MLP of width
            ``prefix_hidden_size`` (512) while training, as the authors' code and AdapterHub do.
        prefix_hidden_size: Width of the prefix MLP (512).
        reduction_factor: Pfeiffer adapter's ``d / m`` (16).
        gate_reduce: ``"mean"`` (the reference code: one gate per example, the mean of the per-token gates over all
            positions of the forward call, padding included) or ``"token"`` (the paper's form: one gate per token).
        members: Filled from the fields above when empty (a saved UniPELT config lists them).

    Raises:
        PeftConfigError: ``gate_reduce`` is neither ``"mean"`` nor ``"token"``, or a member is invalid.
    """

    peft_type: ClassVar[str] = "UNIPELT"

    r: int = 8
    lora_alpha: float = 2
    num_virtual_tokens: int = 10
    prefix_hidden_size: int = 512
    reduction_factor: float = 16
    gate_reduce: str = "mean"

    def __post_init__(self) -> None:
        if self.gate_reduce not in GATE_REDUCTIONS:
            raise PeftConfigError(f"UniPELTConfig.gate_reduce={self.gate_reduce!r}; use 'mean' or 'token'.")
        if not self.members:
            self.members = [
                LoraConfig(r=self.r, lora_alpha=self.lora_alpha, gate=self.gate_reduce),
                PrefixTuningConfig(num_virtual_tokens=self.num_virtual_tokens, prefix_projection=True,
                                   encoder_hidden_size=self.prefix_hidden_size, gate=self.gate_reduce),
                AdapterConfig(variant="pfeiffer", reduction_factor=self.reduction_factor, gate=self.gate_reduce),
            ]
        super().__post_init__()


@register(UniPELTConfig)
class UniPELT(Composite):
    pass
