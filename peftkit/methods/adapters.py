"""Bottleneck adapters: serial (Houlsby, Pfeiffer) and parallel, with AdapterDrop.

Houlsby et al. 2019 (https://arxiv.org/abs/1902.00751), Pfeiffer et al. 2021 (https://arxiv.org/abs/2005.00247),
He et al. 2022 (https://arxiv.org/abs/2110.04366), AdapterDrop: Rücklé et al. 2021 (https://arxiv.org/abs/2010.11918).
Reference behaviour: AdapterHub ``adapters`` (``DoubleSeqBnConfig``, ``SeqBnConfig``, ``ParBnConfig``).

Every adapter is the bottleneck ``A(u) = s · (W_up f(W_down u + b_down) + b_up)``. It attaches by wrapping a named
module of the model, never by copying model code; what it computes depends on the kind of module it wraps::

    serial, any module      y = M(...)            →  y + A(y)             Houlsby: M = attention/FFN output projection
    serial, a norm module   z = x + h (its input) →  LN(z + A(LN(z)))     Pfeiffer on post-LN models: M = that LN
    parallel, sub-layer     y = M(z)              →  y + s·A(z)           M = the FFN / attention module
    parallel, BERT output   M(h, input_tensor=x)  →  M(h, x + s·A(x)) = LN(x + h + s·A(x))
    parallel, span a → b    block B with a, b     →  b's output + s·A(a's input)   OPT's FFN: a = fc1, b = fc2

On pre-LN models (GPT-2, Llama, T5, OPT) Pfeiffer wraps the residual block whose output is ``x + h``, giving
``x + h + A(x + h)`` (AdapterHub passes no layer norm there either). Several active adapters add up. This module
holds the serial variants; :mod:`peftkit.methods.bottleneck` the shared bottleneck layer, placements and AdapterDrop,
:mod:`peftkit.methods.parallel_adapter` the parallel variant and :mod:`peftkit.methods.fusion` AdapterFusion.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core.errors import PeftConfigError, TargetModuleError
from peftkit.core.layer import AdapterLayer, ModulesToSaveWrapper, base_layer_of
from peftkit.core.registry import register
from peftkit.core.targets import layer_index, logical_name, match_targets
from peftkit.methods.bottleneck import (
    BottleneckConfigBase,
    BottleneckLayer,
    BottleneckMethodBase,
    add_to_output,
    first_input,
    is_norm_module,
    linear_sizes,
)

__all__ = ["AdapterConfig", "SerialAdapterLayer", "BottleneckMethod"]

_LAYER_LISTS = ("layers", "layer", "h", "block", "blocks")  # as peftkit.core.targets.layer_index guesses them


@dataclass(kw_only=True)
class AdapterConfig(BottleneckConfigBase):
    """A serial bottleneck adapter: ``A(u) = s · (W_up f(W_down u + b_down) + b_up)`` inserted after a sub-layer.

    Houlsby: after the attention output projection and after the FFN output, ``out = LN(x + h + A(h))``.
    Pfeiffer: after the FFN only, ``out = LN(x + h + A(LN(x + h)))``; on pre-LN models ``x + h + A(x + h)``.

    Args:
        variant: ``"houlsby"`` or ``"pfeiffer"`` (default, AdapterHub's ``SeqBnConfig``); picks the default targets.
        r: Bottleneck width m. None: ``hidden_size // reduction_factor``.
        reduction_factor: d / m when ``r`` is None (default 16).
        non_linearity: f: ``"relu"``, ``"gelu"``, ``"gelu_new"``, ``"silu"``/``"swish"``, ``"tanh"``, ``"leakyrelu"``.
            None: the variant's AdapterHub default (``"swish"`` for Houlsby, ``"relu"`` for Pfeiffer).
        adapter_dropout: Dropout on the adapter's output (default 0).
        scaling: s (default 1).
        init_weights: True: ``W_down`` Kaiming-uniform, ``W_up`` and biases zero, so ``A = 0`` at step 0 (He et al.'s
            and AdapterHub's "mam_adapter" init); ``"bert"``: N(0, 0.02) weights (AdapterHub's default); ``"houlsby"``:
            truncated N(0, 0.01²); False: ``nn.Linear``'s random init for both (the adapter acts at once; for tests).
        train_layer_norms: Train (and save) the layer norms of every transformer layer holding the adapter, as
            Houlsby et al. do. None: True for Houlsby, False for Pfeiffer. They are base parameters shared by all
            adapters of the model, so switching adapters does not switch them and mixed batches refuse them.
        drop_lowest_layers: Robust AdapterDrop: each training step (each ``PeftModel.forward`` in training mode)
            skips the adapters of the lowest k layers, k drawn uniformly from ``[0, drop_lowest_layers]`` (default 0:
            off). Keep it below the number of layers unless something else (a head) trains. Never drops in eval.
        gate: None (default), ``"mean"`` or ``"token"``: multiply the adapter's output by UniPELT's learned gate
            ``G(u) = σ(W_g u + b_g)`` of its input ``u`` (averaged over tokens, or per token). Left out of the saved
            config when None.

    Raises:
        PeftConfigError: a field is out of range; the message names it.
    """

    peft_type: ClassVar[str] = "BOTTLENECK"

    variant: str = "pfeiffer"
    non_linearity: str | None = None
    train_layer_norms: bool | None = None

    def __post_init__(self) -> None:
        if self.variant not in ("houlsby", "pfeiffer"):
            raise PeftConfigError(f"AdapterConfig.variant must be 'houlsby' or 'pfeiffer', got {self.variant!r}.")
        if self.non_linearity is None:
            self.non_linearity = "swish" if self.variant == "houlsby" else "relu"
        if self.train_layer_norms is None:
            self.train_layer_norms = self.variant == "houlsby"
        super().__post_init__()

    def placement(self) -> str:
        return self.variant


class SerialAdapterLayer(BottleneckLayer):
    """Serial adapter (Houlsby / Pfeiffer) around one module; also holds AdapterFusion modules over its adapters.

    Wrapping a norm module (``LayerNorm``, ``RMSNorm``, ``T5LayerNorm``), whose input is ``z = x + h``:
    ``out = LN(z + Σ A(LN(z)))``. Any other module, with output ``y`` (first element when a tuple):
    ``out = y + Σ A(y)``. The sum runs over the active adapters; a fusion contributes its attention-weighted mix.

    Args:
        base_layer: The wrapped module: an output projection, a post-residual norm, or a residual block.
        adapter_name, config, module_name: The first adapter, its config and the module's full name (its layer
            index drives AdapterDrop).

    Raises:
        TargetModuleError: the hidden size cannot be read off the module (it holds no linear layer).
    """

    adapter_param_names = ("adapter_down", "adapter_up", "adapter_gate", "adapter_fusion")
    adapter_attr_names = (*BottleneckLayer.adapter_attr_names, "train_layer_norms")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: AdapterConfig, module_name: str) -> None:
        base = base_layer_of(base_layer)
        post_norm = is_norm_module(base)
        if post_norm:
            size = base.weight.shape[-1] if getattr(base, "weight", None) is not None else base.normalized_shape[-1]
        else:
            sizes = linear_sizes(base)
            if not sizes:
                raise TargetModuleError(
                    f"A serial adapter cannot read the hidden size of {module_name} ({type(base).__name__}): wrap an "
                    "output projection, a norm after a residual add, or a block that contains linear layers."
                )
            size = sizes[-1][1]
        super().__init__(base_layer, size, size, layer_index(module_name, config.layers_pattern))
        self.post_norm = post_norm
        self.adapter_fusion = nn.ModuleDict()  # AdapterFusion modules (peftkit/methods/fusion.py), keyed by name
        self.train_layer_norms: dict[str, bool] = {}
        self.update_layer(adapter_name, config, module_name)

    def update_layer(self, adapter_name: str, config: AdapterConfig, module_name: str) -> None:
        super().update_layer(adapter_name, config, module_name)
        self.train_layer_norms[adapter_name] = bool(config.train_layer_norms)

    def delete_adapter(self, adapter_name: str) -> None:
        users = [f for f, fusion in self.adapter_fusion.items() if adapter_name in fusion.adapters]
        if users:
            raise ValueError(f"Adapter {adapter_name!r} is fused by {users}; delete those fusions first.")
        super().delete_adapter(adapter_name)

    def _delta(self, adapter_name: str, u: torch.Tensor) -> torch.Tensor:
        if adapter_name in self.adapter_fusion:
            fusion = self.adapter_fusion[adapter_name]
            outputs = torch.stack([self.bottleneck(n, u) for n in fusion.adapters], dim=-2)  # (..., N, d)
            return fusion(u.to(outputs.dtype), outputs)
        return self.bottleneck(adapter_name, u)

    def _split(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
        """Run the base module up to the adapter: (adapter input u, function taking Σ A(u) to the layer output)."""
        if self.post_norm:
            z = first_input(args, kwargs, self._input_name)
            return self.base_layer(z), lambda delta: self.base_layer(z + delta.to(z.dtype))
        out = self.base_layer(*args, **kwargs)
        return (out[0] if isinstance(out, tuple) else out), lambda delta: add_to_output(out, delta)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.batch_adapter_names is not None:
            return self._mixed_batch_forward(args, kwargs)
        names = self._running()
        if not names:
            return self.base_layer(*args, **kwargs)
        u, finish = self._split(args, kwargs)
        return finish(sum(self._delta(name, u) for name in names))

    def _mixed_batch_forward(self, args: tuple, kwargs: dict) -> Any:
        if self.disable_adapters or self.skipped:
            return self.base_layer(*args, **kwargs)
        shared = sorted(n for n, on in self.train_layer_norms.items() if on)
        if shared:
            raise NotImplementedError(
                f"Adapter(s) {shared} train the model's shared layer norms (train_layer_norms=True), so rows cannot "
                "see different norms; use train_layer_norms=False for mixed batches."
            )
        u, finish = self._split(args, kwargs)
        return finish(self._batch_delta(u))


# ---- method ------------------------------------------------------------------------------------------------------
def _block_prefix(name: str, layers_pattern: list[str] | str | None) -> str | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or _LAYER_LISTS)
    alternatives = "|".join(re.escape(p) for p in patterns if p)
    found = re.search(rf"^(.*?(?:^|\.)(?:{alternatives})\.\d+)(?:\.|$)", name)
    return found.group(1) if found else None


@register(AdapterConfig)
class BottleneckMethod(BottleneckMethodBase):
    """Serial adapters: wraps each target in a :class:`SerialAdapterLayer`; Houlsby's layer norms train too."""

    layer_class = SerialAdapterLayer
    model_api = ("set_skip_layers", "add_fusion", "gate_values")

    @classmethod
    def layer_for(cls, target: nn.Module, config: AdapterConfig, adapter_name: str, module_name: str) -> AdapterLayer:
        return SerialAdapterLayer(target, adapter_name, config, module_name)

    @classmethod
    def trainable_base_parameters(cls, model: nn.Module, config: AdapterConfig) -> list[str]:
        if not config.train_layer_norms:
            return []
        try:
            targets = match_targets(model, config.target_modules or [], config.exclude_modules,
                                    config.layers_to_transform, config.layers_pattern)
        except TargetModuleError:
            return []
        blocks = {p for p in (_block_prefix(t, config.layers_pattern) for t in targets) if p}
        heads = [n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
        names = []
        for module_name, module in model.named_modules():
            logical = logical_name(module_name)
            if not is_norm_module(module) or not any(logical.startswith(b + ".") for b in blocks):
                continue
            if any(module_name.startswith(h + ".") for h in heads):
                continue
            # Logical names (no base_layer hops): the checkpoint keys must not depend on whether another adapter
            # wraps the norm (Pfeiffer) or its block; they resolve through the wrapper's weight/bias/__getattr__.
            names += [f"{logical}.{p}" for p, _ in module.named_parameters(recurse=False)]
        return sorted(names)

    @classmethod
    def add_fusion(
        cls, peft_model: nn.Module, adapters: list[str], fusion_name: str = "fusion", **kwargs: Any
    ) -> None:
        """``model.add_fusion(["a", "b"], "fusion")``: add an AdapterFusion over serial adapters; ``set_adapter``
        it to train it (only the fusion trains). ``kwargs`` are :class:`AdapterFusionConfig` fields."""
        from peftkit.methods.fusion import AdapterFusionConfig

        peft_model.add_adapter(fusion_name, AdapterFusionConfig(adapters=list(adapters), **kwargs))
