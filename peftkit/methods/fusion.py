"""AdapterFusion: attention over the outputs of several trained serial adapters.

Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning",
https://arxiv.org/abs/2005.00247. Reference behaviour: AdapterHub ``adapters`` (``Fuse``, ``BertFusion``).

Stage 1 trains N task adapters (:class:`~peftkit.methods.adapters.AdapterConfig`); stage 2 freezes them and learns,
at every layer holding all of them, a query/key/value attention whose query is the adapters' input ``u``::

    a_n = A_n(u)                                 each frozen adapter's output          (..., N, d)
    p   = softmax_n((W_Q u + b_Q) · (W_K a_n + b_K) / T)                               (..., N)
    o   = Σ_n p_n W_V a_n                        W_V starts as the identity, no bias   (..., d)

``o`` replaces ``A(u)`` in the adapter's residual and LayerNorm (``LN(x + h + o)`` for Pfeiffer). The fusion modules
live in the same :class:`~peftkit.methods.adapters.SerialAdapterLayer` as the adapters they fuse, save and load as
an adapter of their own (``adapter_config.json`` names the fused adapters), and add ``λ‖I − W_V‖²`` to the loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from peftkit.core.config import PeftConfig, TunerConfig
from peftkit.core.errors import PeftConfigError, TargetModuleError
from peftkit.core.inject import adapter_layers
from peftkit.core.layer import AdapterLayer
from peftkit.core.registry import PeftMethod, register
from peftkit.core.targets import logical_name
from peftkit.methods.adapters import SerialAdapterLayer
from peftkit.methods.bottleneck import set_skip_layers

__all__ = ["AdapterFusionConfig", "AdapterFusionAttention", "AdapterFusionMethod"]


@dataclass(kw_only=True)
class AdapterFusionConfig(TunerConfig):
    """An AdapterFusion over serial adapters already on the model.

    Args:
        adapters: Names of the fused adapters (two or more; one is allowed for a pruned fusion). Serial adapters
            (:class:`~peftkit.methods.adapters.AdapterConfig`) present on the model before the fusion is added.
        temperature: T of the softmax (default 1).
        value_reg_weight: λ of ``λ‖I − W_V‖²_F`` summed over layers, added to the training loss (default 0.01, as
            AdapterHub; 0 switches it off).
        target_modules: None: every layer that holds all fused adapters (the usual choice).

    Raises:
        PeftConfigError: no or repeated adapter names, or a bad temperature / weight.
    """

    peft_type: ClassVar[str] = "ADAPTER_FUSION"

    adapters: list[str] = field(default_factory=list)
    temperature: float = 1.0
    value_reg_weight: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        self.adapters = list(self.adapters)
        if not self.adapters or len(set(self.adapters)) != len(self.adapters):
            raise PeftConfigError(f"AdapterFusionConfig.adapters must name distinct adapters to fuse, got "
                                  f"{self.adapters!r}.")
        if not self.temperature > 0:
            raise PeftConfigError(f"AdapterFusionConfig.temperature must be positive, got {self.temperature!r}.")
        if self.value_reg_weight < 0:
            raise PeftConfigError(f"AdapterFusionConfig.value_reg_weight must be >= 0, got {self.value_reg_weight!r}.")


class AdapterFusionAttention(nn.Module):
    """Attention over adapter outputs: ``o = Σ_n softmax_n(q · k_n / T) W_V a_n``, ``q = W_Q u``, ``k_n = W_K a_n``.

    Args:
        adapters: The fused adapters, in the order of ``outputs``' adapter axis.
        hidden_size: d.
        temperature: T.

    Shapes: ``query (..., d)``, ``outputs (..., N, d)`` → ``(..., d)``. With ``record_attention`` set, the last
    probabilities ``(..., N)`` are kept (detached) in ``last_attention`` for inspection.
    """

    def __init__(self, adapters: list[str], hidden_size: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.adapters = list(adapters)
        self.temperature = temperature
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size, bias=False)
        self.record_attention = False
        self.last_attention: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Q, K ~ N(0, 0.02) with zero bias (AdapterHub's BERT init), so attention starts near uniform; ``W_V = I``
        so that at step 0 the fusion outputs the mean of the adapters (Pfeiffer et al. Sec. 3.2)."""
        for lin in (self.query, self.key):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(self.value.weight.shape[0]))

    def forward(self, query: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        q = self.query(query).unsqueeze(-1)  # (..., d, 1)
        scores = (self.key(outputs) @ q).squeeze(-1) / self.temperature  # (..., N)
        probs = torch.softmax(scores, dim=-1)
        if self.record_attention:
            self.last_attention = probs.detach()
        return (probs.unsqueeze(-2) @ self.value(outputs)).squeeze(-2)  # (..., d)


def _serial_layers(model: nn.Module) -> list[tuple[str, SerialAdapterLayer]]:
    return [(logical_name(n), layer) for n, layer in adapter_layers(model) if isinstance(layer, SerialAdapterLayer)]


def _fusions(peft_model: nn.Module, fusion_name: str) -> list[tuple[str, AdapterFusionAttention]]:
    return [(n, layer.adapter_fusion[fusion_name]) for n, layer in _serial_layers(peft_model.base_model.model)
            if fusion_name in layer.adapter_fusion]


@register(AdapterFusionConfig)
class AdapterFusionMethod(PeftMethod):
    """Adds :class:`AdapterFusionAttention` modules to the serial adapter layers holding the fused adapters."""

    layer_class = SerialAdapterLayer
    mergeable = False
    model_api = ("set_skip_layers", "prune_fusion", "record_fusion_attention", "fusion_regularization_loss")

    @classmethod
    def prepare_config(cls, model: nn.Module, config: PeftConfig) -> PeftConfig:
        assert isinstance(config, AdapterFusionConfig)
        if config.target_modules is not None:
            return config
        wanted = set(config.adapters)
        full, partial = [], []
        for name, layer in _serial_layers(model):
            held = wanted & set(layer.scaling)
            if held == wanted:
                full.append(name)
            elif held:
                partial.append(f"{name} holds {sorted(held)}")
        if not full:
            raise PeftConfigError(
                f"No layer holds all of the adapters {config.adapters} to fuse"
                + (f" ({'; '.join(partial[:3])})" if partial else "")
                + ". Add or load them first; AdapterFusion fuses serial adapters (AdapterConfig) at the same modules."
            )
        return dataclasses.replace(config, target_modules=full)

    @classmethod
    def layer_for(
        cls, target: nn.Module, config: AdapterFusionConfig, adapter_name: str, module_name: str
    ) -> AdapterLayer:
        raise TargetModuleError(
            f"{module_name} holds no serial adapter; an AdapterFusion attaches where its adapters "
            f"{config.adapters} are. Add or load them first."
        )

    @classmethod
    def update_layer(
        cls, layer: AdapterLayer, config: AdapterFusionConfig, adapter_name: str, module_name: str
    ) -> None:
        assert isinstance(layer, SerialAdapterLayer)
        missing = [a for a in config.adapters if a not in layer.scaling]
        if missing:
            raise TargetModuleError(f"{module_name} lacks the fused adapter(s) {missing}; load them first.")
        fusion = AdapterFusionAttention(config.adapters, layer.out_features, config.temperature)
        ref = layer.adapter_up[config.adapters[0]].weight
        layer.adapter_fusion[adapter_name] = fusion.to(device=ref.device, dtype=ref.dtype)

    @classmethod
    def auxiliary_loss(cls, peft_model: nn.Module, adapter_name: str) -> torch.Tensor | None:
        weight = peft_model.member_config(adapter_name, cls).value_reg_weight
        return cls.fusion_regularization_loss(peft_model, adapter_name) if weight else None

    @classmethod
    def fusion_regularization_loss(cls, peft_model: nn.Module, fusion_name: str | None = None) -> torch.Tensor | None:
        """``λ Σ_layers ‖I − W_V‖²_F`` of a fusion (default: the active ones) whose ``W_V`` trains, or None.

        ``PeftModel.forward`` adds it to ``outputs.loss`` in training; a loop computing its own loss adds this.
        """
        names = [fusion_name] if fusion_name else [
            n for n in peft_model.active_adapters if isinstance(peft_model.peft_config[n], AdapterFusionConfig)]
        total = None
        for name in names:
            weight = peft_model.peft_config[name].value_reg_weight
            for _, fusion in _fusions(peft_model, name):
                w = fusion.value.weight
                if w.requires_grad:
                    term = weight * (torch.eye(w.shape[0], device=w.device, dtype=w.dtype) - w).pow(2).sum()
                    total = term if total is None else total + term
        return total

    @classmethod
    @contextlib.contextmanager
    def record_fusion_attention(cls, peft_model: nn.Module, fusion_name: str) -> Iterator[dict[str, torch.Tensor]]:
        """``with model.record_fusion_attention("fusion") as att: model(**batch)``; afterwards ``att`` maps each
        layer's module name to the last softmax weights ``(batch, seq, N)`` over ``config.adapters``."""
        fusions = _fusions(peft_model, fusion_name)
        found: dict[str, torch.Tensor] = {}
        try:
            for _, fusion in fusions:
                fusion.record_attention, fusion.last_attention = True, None
            yield found
        finally:
            for name, fusion in fusions:
                if fusion.last_attention is not None:
                    found[name] = fusion.last_attention
                fusion.record_attention, fusion.last_attention = False, None

    @classmethod
    def prune_fusion(cls, peft_model: nn.Module, fusion_name: str, remove: list[str]) -> None:
        """AdapterDrop for fusion: take adapters out of a fusion (e.g. the least attended); the rest keep their
        trained Q/K/V. Removed adapters are no longer run by the fusion, which saves their compute.

        Raises:
            ValueError: an adapter is not fused, or none would remain.
        """
        config = peft_model.peft_config[fusion_name]
        unknown = [a for a in remove if a not in config.adapters]
        kept = [a for a in config.adapters if a not in remove]
        if unknown or not kept:
            raise ValueError(f"Fusion {fusion_name!r} fuses {config.adapters}; cannot remove {remove}.")
        for _, fusion in _fusions(peft_model, fusion_name):
            fusion.adapters = [a for a in fusion.adapters if a in kept]
        peft_model.peft_config[fusion_name] = dataclasses.replace(config, adapters=kept)

    @classmethod
    def set_skip_layers(cls, peft_model: nn.Module, layers: list[int] | None) -> None:
        set_skip_layers(peft_model, layers)
