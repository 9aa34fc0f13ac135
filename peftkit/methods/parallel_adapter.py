"""Parallel adapters (He et al. 2022, https://arxiv.org/abs/2110.04366): a bottleneck beside a sub-layer.

Reference behaviour: AdapterHub ``adapters`` ``ParBnConfig``. The bottleneck, placements and AdapterDrop are shared
with the serial adapters (:mod:`peftkit.methods.bottleneck`); this module holds what differs: where ``A`` reads.

A sub-layer that is no module of its own (OPT's FFN: ``fc1``, ``fc2`` sit in the decoder layer) is handled by a
*span*: the adapter layer wraps the block and puts a :class:`ParallelAdapterTap` around the two ends::

    block ─► ... ─► tap(fc1) ─► act ─► tap(fc2) ─► ...       tap(fc1) hands its input z to the block's layer,
                      │ z                  ▲ + Σ s·A(z)      tap(fc2) adds Σ s·A(z) to fc2's output
                      └──── ParallelAdapterLayer(block) ───┘

The taps are adapter layers holding no tensors, so the walker unwraps them with the block's layer (``unload``,
``delete_adapter``) and gradient checkpointing's recomputation of the block runs them again.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core.config import PeftConfig
from peftkit.core.errors import PeftConfigError, TargetModuleError
from peftkit.core.inject import replace_module
from peftkit.core.layer import AdapterLayer, base_layer_of
from peftkit.core.registry import register
from peftkit.core.targets import get_module, layer_index
from peftkit.methods.bottleneck import (
    BottleneckConfigBase,
    BottleneckLayer,
    BottleneckMethodBase,
    add_to_output,
    first_input,
    linear_sizes,
    placements_for,
    refuse_merge,
)

__all__ = ["ParallelAdapterConfig", "ParallelAdapterLayer", "ParallelAdapterTap", "ParallelAdapterMethod"]


@dataclass(kw_only=True)
class ParallelAdapterConfig(BottleneckConfigBase):
    """A parallel adapter (He et al. 2022): ``out = LN(x + h + s · A(x))``, the adapter reading the sub-layer input.

    Args:
        r: Bottleneck width (default 512, the paper's best on the FFN; use less on small models).
        scaling: s (default 4).
        target: ``"ffn"`` (default) or ``"attn"``: which sub-layer the adapter runs beside.
        span: ``[read, write]``, two submodule names of each target module, for a sub-layer that is no module of its
            own: the adapter reads the input of ``read`` and adds to the output of ``write``
            (``out = write(...) + s · A(z)``, ``z`` = ``read``'s input). None (default): the target is the sub-layer.
            Set by default on OPT (``["fc1", "fc2"]`` of each decoder layer).
        Other fields as :class:`AdapterConfig` (``init_weights=True`` zero-initialises ``W_up``).

    Raises:
        PeftConfigError: a field is out of range; the message names it.
    """

    peft_type: ClassVar[str] = "PARALLEL_BOTTLENECK"

    r: int | None = 512
    scaling: float = 4.0
    target: str = "ffn"
    span: list[str] | None = None

    def __post_init__(self) -> None:
        if self.target not in ("ffn", "attn"):
            raise PeftConfigError(f"ParallelAdapterConfig.target must be 'ffn' or 'attn', got {self.target!r}.")
        if self.span is not None:
            self.span = list(self.span)
            if len(self.span) != 2 or not all(isinstance(n, str) and n for n in self.span):
                raise PeftConfigError(
                    f"ParallelAdapterConfig.span must be two submodule names [read, write] or None, got {self.span!r}."
                )
        super().__post_init__()

    def placement(self) -> str:
        return self.target


class ParallelAdapterLayer(BottleneckLayer):
    """Parallel adapter beside a sub-layer (He et al. 2022): ``out = M(z) + Σ s·A(z)``.

    A module whose forward takes ``(hidden_states, input_tensor)`` (the BERT-family output blocks that add the
    residual and apply the LayerNorm) gets the adapter on the residual input instead: ``M(h, x + Σ s·A(x)) =
    LN(x + h + Σ s·A(x))``. ``z`` is what the sub-layer receives: ``x`` on post-LN models, ``LN(x)`` on pre-LN ones.
    With ``config.span = [read, write]`` the layer wraps a block and the sub-layer runs from ``read`` to ``write``
    inside it: ``write``'s output gains ``Σ s·A(z)``, ``z`` being ``read``'s input (module docstring).

    Args:
        base_layer: The sub-layer module, or the block holding the span.
        adapter_name, config, module_name: The first adapter, its config and the module's full name (its layer
            index drives AdapterDrop).

    Raises:
        TargetModuleError: the module holds no linear layer to read the sizes from, or lacks a span end.
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: ParallelAdapterConfig, module_name: str
    ) -> None:
        base = base_layer_of(base_layer)
        if config.span:  # in: the read end's first linear, out: the write end's last
            read, write = (linear_sizes(_span_end(base, name, module_name)) for name in config.span)
            sizes = [read[0], write[-1]] if read and write else []
        else:
            sizes = linear_sizes(base)
        if not sizes:
            raise TargetModuleError(
                f"A parallel adapter cannot read the sizes of {module_name} ({type(base).__name__}): wrap a sub-layer "
                "module (an FFN or attention block) that contains linear layers, or span two of them."
            )
        self_residual = not config.span and "input_tensor" in inspect.signature(base.forward).parameters
        in_features = sizes[-1][1] if self_residual else sizes[0][0]
        super().__init__(base_layer, in_features, sizes[-1][1], layer_index(module_name, config.layers_pattern))
        self.residual_arg = self_residual
        self.span = list(config.span) if config.span else None
        self.span_input: torch.Tensor | None = None  # z, from the read tap to the write tap of one forward
        self.taps: list[ParallelAdapterTap] = []  # a plain list: the taps are submodules of the block already
        for role, name in zip(("read", "write"), self.span or ()):
            tap = ParallelAdapterTap(get_module(base, name), self, role)
            replace_module(base, name, tap)
            self.taps.append(tap)
        self.update_layer(adapter_name, config, module_name)

    def update_layer(self, adapter_name: str, config: ParallelAdapterConfig, module_name: str) -> None:
        span = list(config.span) if config.span else None
        if span != self.span:
            raise TargetModuleError(
                f"{module_name} holds parallel adapters with span={self.span}; adapter {adapter_name!r} asks for "
                f"span={span}. Adapters on one module share its span: give {adapter_name!r} the same one."
            )
        super().update_layer(adapter_name, config, module_name)
        for tap in self.taps:
            tap.span_adapters[adapter_name] = None

    @property
    def weight_effect(self) -> str:
        # M(z) + s·A(z) adds a term of the input beside the module; on a residual argument, A(x) goes through M.
        return "opaque" if self.residual_arg else "add"

    def merge_blocker(self, adapter_names: list[str]) -> str | None:
        return f"{self.method_name}s compute on activations and have no weight form"

    def _with_residual(self, args: tuple, kwargs: dict, delta_of: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        if len(args) >= 2:
            x = args[1]
            args = (args[0], x + delta_of(x).to(x.dtype), *args[2:])
        else:
            x = kwargs["input_tensor"]
            kwargs = {**kwargs, "input_tensor": x + delta_of(x).to(x.dtype)}
        return self.base_layer(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.span:  # the taps inside the block apply the adapters
            self.span_input = None
            return self.base_layer(*args, **kwargs)
        if self.batch_adapter_names is not None:
            if self.disable_adapters or self.skipped:
                return self.base_layer(*args, **kwargs)
            return self._run_beside(args, kwargs, self._batch_delta)
        names = self._running()
        if not names:
            return self.base_layer(*args, **kwargs)
        return self._run_beside(args, kwargs, lambda z: sum(self._delta(n, z) for n in names))

    def _run_beside(self, args: tuple, kwargs: dict, delta_of: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        if self.residual_arg:
            return self._with_residual(args, kwargs, delta_of)
        z = first_input(args, kwargs, self._input_name)
        return add_to_output(self.base_layer(*args, **kwargs), delta_of(z))

    def span_delta(self, z: torch.Tensor) -> torch.Tensor | None:
        """``Σ s·A(z)`` for the write tap (per row in a mixed batch), or None when no adapter runs."""
        if self.batch_adapter_names is not None:
            return None if self.disable_adapters or self.skipped else self._batch_delta(z)
        names = self._running()
        return sum(self._delta(n, z) for n in names) if names else None


def _span_end(block: nn.Module, name: str, module_name: str) -> nn.Module:
    try:
        return get_module(block, name)
    except AttributeError:
        raise TargetModuleError(
            f"{module_name} ({type(block).__name__}) has no submodule {name!r} for the parallel adapter's span; "
            "name two submodules of each target in ParallelAdapterConfig.span, or leave span=None."
        ) from None


class ParallelAdapterTap(AdapterLayer):
    """One end of a parallel adapter's span (OPT's ``fc1`` / ``fc2``): the read end hands its input ``z`` to the
    owning :class:`ParallelAdapterLayer`, the write end adds the owner's ``Σ s·A(z)`` to its output.

    It holds no tensors; ``adapter_names`` lists the owner's adapters, so the walker unwraps it with the owner.

    Args:
        base_layer: The wrapped end module.
        owner: The layer holding the adapters, around the block.
        role: ``"read"`` or ``"write"``.
    """

    adapter_attr_names = ("span_adapters",)
    method_name = "Parallel adapter"
    weight_effect = "add"  # the read end passes through, the write end adds s·A(z): merges pass it unchanged

    def __init__(self, base_layer: nn.Module, owner: ParallelAdapterLayer, role: str) -> None:
        super().__init__(base_layer)
        self.__dict__["owner"] = owner  # not a submodule: the owner contains this tap already (no module cycle)
        self.role = role
        self.span_adapters: dict[str, None] = {}
        self.training = base_layer.training

    @property
    def adapter_names(self) -> list[str]:
        return list(self.span_adapters)

    def __getattr__(self, name: str) -> Any:
        # Model code may read attributes off the module it owns (``fc1.in_features``).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or "base_layer" not in self._modules:
                raise
            return getattr(self._modules["base_layer"], name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(x, *args, **kwargs)
        owner = self.owner
        if self.role == "read":
            owner.span_input = x
            return out
        z, owner.span_input = owner.span_input, None
        delta = None if z is None else owner.span_delta(z)
        return out if delta is None else add_to_output(out, delta)

    # Like the owner's adapters: a nonlinear function of the activations, never folded into a weight.
    check_merge = refuse_merge
    merge = refuse_merge

    def merge_blocker(self, adapter_names: list[str]) -> str | None:
        return f"{self.method_name}s compute on activations and have no weight form"

    def unmerge(self) -> None:
        return None


@register(ParallelAdapterConfig)
class ParallelAdapterMethod(BottleneckMethodBase):
    """Parallel adapters: wraps each target sub-layer in a :class:`ParallelAdapterLayer`."""

    layer_class = ParallelAdapterLayer
    model_api = ("set_skip_layers", "gate_values")

    @classmethod
    def prepare_config(cls, model: nn.Module, config: PeftConfig) -> PeftConfig:
        assert isinstance(config, ParallelAdapterConfig)
        defaults = config.target_modules is None and config.span is None
        config = super().prepare_config(model, config)
        span = placements_for(model).get(f"{config.placement()}_span")
        return dataclasses.replace(config, span=list(span)) if defaults and span is not None else config

    @classmethod
    def layer_for(
        cls, target: nn.Module, config: ParallelAdapterConfig, adapter_name: str, module_name: str
    ) -> AdapterLayer:
        return ParallelAdapterLayer(target, adapter_name, config, module_name)
