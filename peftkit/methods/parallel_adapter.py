"""Parallel adapters (He et al. 2022, https://arxiv.org/abs/2110.04366): a bottleneck beside a sub-layer.

Reference behaviour: AdapterHub ``adapters`` ``ParBnConfig``. The bottleneck, placements and AdapterDrop are shared
with the serial adapters (:mod:`peftkit.methods.bottleneck`); this module holds what differs: where ``A`` reads.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core.errors import PeftConfigError, TargetModuleError
from peftkit.core.layer import AdapterLayer, base_layer_of
from peftkit.core.registry import register
from peftkit.core.targets import layer_index
from peftkit.methods.bottleneck import (
    BottleneckConfigBase,
    BottleneckLayer,
    BottleneckMethodBase,
    add_to_output,
    first_input,
    linear_sizes,
)

__all__ = ["ParallelAdapterConfig", "ParallelAdapterLayer", "ParallelAdapterMethod"]


@dataclass(kw_only=True)
class ParallelAdapterConfig(BottleneckConfigBase):
    """A parallel adapter (He et al. 2022): ``out = LN(x + h + s · A(x))``, the adapter reading the sub-layer input.

    Args:
        r: Bottleneck width (default 512, the paper's best on the FFN; use less on small models).
        scaling: s (default 4).
        target: ``"ffn"`` (default) or ``"attn"``: which sub-layer the adapter runs beside.
        Other fields as :class:`AdapterConfig` (``init_weights=True`` zero-initialises ``W_up``).
    """

    peft_type: ClassVar[str] = "PARALLEL_BOTTLENECK"

    r: int | None = 512
    scaling: float = 4.0
    target: str = "ffn"

    def __post_init__(self) -> None:
        if self.target not in ("ffn", "attn"):
            raise PeftConfigError(f"ParallelAdapterConfig.target must be 'ffn' or 'attn', got {self.target!r}.")
        super().__post_init__()

    def placement(self) -> str:
        return self.target


class ParallelAdapterLayer(BottleneckLayer):
    """Parallel adapter beside a sub-layer (He et al. 2022): ``out = M(z) + Σ s·A(z)``.

    A module whose forward takes ``(hidden_states, input_tensor)`` (the BERT-family output blocks that add the
    residual and apply the LayerNorm) gets the adapter on the residual input instead: ``M(h, x + Σ s·A(x)) =
    LN(x + h + Σ s·A(x))``. ``z`` is what the sub-layer receives: ``x`` on post-LN models, ``LN(x)`` on pre-LN ones.

    Raises:
        TargetModuleError: the module holds no linear layer to read the sizes from.
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: ParallelAdapterConfig, module_name: str
    ) -> None:
        base = base_layer_of(base_layer)
        sizes = linear_sizes(base)
        if not sizes:
            raise TargetModuleError(
                f"A parallel adapter cannot read the sizes of {module_name} ({type(base).__name__}): wrap a sub-layer "
                "module (an FFN or attention block) that contains linear layers."
            )
        self_residual = "input_tensor" in inspect.signature(base.forward).parameters
        in_features = sizes[-1][1] if self_residual else sizes[0][0]
        super().__init__(base_layer, in_features, sizes[-1][1], layer_index(module_name, config.layers_pattern))
        self.residual_arg = self_residual
        self.update_layer(adapter_name, config, module_name)

    def _with_residual(self, args: tuple, kwargs: dict, delta_of: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        if len(args) >= 2:
            x = args[1]
            args = (args[0], x + delta_of(x).to(x.dtype), *args[2:])
        else:
            x = kwargs["input_tensor"]
            kwargs = {**kwargs, "input_tensor": x + delta_of(x).to(x.dtype)}
        return self.base_layer(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.batch_adapter_names is not None:
            if self.disable_adapters or self.skipped:
                return self.base_layer(*args, **kwargs)
            return self._apply(args, kwargs, self._batch_delta)
        names = self._running()
        if not names:
            return self.base_layer(*args, **kwargs)
        return self._apply(args, kwargs, lambda z: sum(self._delta(n, z) for n in names))

    def _apply(self, args: tuple, kwargs: dict, delta_of: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        if self.residual_arg:
            return self._with_residual(args, kwargs, delta_of)
        z = first_input(args, kwargs, self._input_name)
        return add_to_output(self.base_layer(*args, **kwargs), delta_of(z))


@register(ParallelAdapterConfig)
class ParallelAdapterMethod(BottleneckMethodBase):
    """Parallel adapters: wraps each target sub-layer in a :class:`ParallelAdapterLayer`."""

    layer_class = ParallelAdapterLayer
    model_api = ("set_skip_layers",)

    @classmethod
    def layer_for(
        cls, target: nn.Module, config: ParallelAdapterConfig, adapter_name: str, module_name: str
    ) -> AdapterLayer:
        return ParallelAdapterLayer(target, adapter_name, config, module_name)
