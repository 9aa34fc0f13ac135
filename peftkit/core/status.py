"""``get_layer_status`` / ``get_model_status``: what every adapter layer holds and does, in HF peft's shape.

A model whose layers disagree (some merged, some not; an adapter trainable in one layer and frozen in another)
is the footprint of an interrupted operation or a hand edit; these reports say ``"irregular"`` there instead of
picking one layer's answer, so the disagreement is visible.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from peftkit.core.inject import adapter_layers
from peftkit.core.layer import AdapterLayer, ModulesToSaveWrapper
from peftkit.core.targets import logical_name

__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    """One adapter layer: its module name (``model.<path>``, HF peft's spelling), class, whether adapters are
    enabled, which are active / merged / present, per adapter whether its weights require grad, and per adapter
    the devices its weights are on."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]


@dataclass
class TunerModelStatus:
    """The layers' statuses folded into one; a field the layers disagree on reads ``"irregular"``."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular] = field(default_factory=dict)
    available_adapters: list[str] = field(default_factory=list)
    devices: dict[str, list[str]] = field(default_factory=dict)


def _peft_parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(the model whose layers to read, the PeftModel or None)."""
    from peftkit.core.model import PeftModel

    if isinstance(model, PeftModel):
        return model.base_model.model, model
    return model, None


def _layers(model: nn.Module) -> Iterable[tuple[str, AdapterLayer]]:
    # Task-head copies are not adapter layers in HF peft's report either.
    return ((n, layer) for n, layer in adapter_layers(model) if not isinstance(layer, ModulesToSaveWrapper))


def _flag(values: Iterable[bool]) -> bool | Irregular:
    values = set(values)
    return values.pop() if len(values) == 1 else "irregular"


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every adapter layer of a ``PeftModel`` (or of a model given adapters by
    ``inject_adapter_in_model``).

    Raises:
        ValueError: the model holds no adapter layer.
    """
    inner, _ = _peft_parts(model)
    statuses = []
    for path, layer in _layers(inner):
        names = layer.adapter_names
        requires_grad: dict[str, bool | Irregular] = {}
        devices: dict[str, list[str]] = {}
        for name in names:
            params = list(layer.iter_adapter_parameters(name))
            requires_grad[name] = _flag(p.requires_grad for p in params) if params else False
            devices[name] = sorted({p.device.type for p in params})
        statuses.append(TunerLayerStatus(
            name=f"model.{logical_name(path)}", module_type=type(layer).__name__, enabled=not layer.disable_adapters,
            active_adapters=list(layer.active_adapters), merged_adapters=list(layer.merged_adapters),
            requires_grad=requires_grad, available_adapters=sorted(names), devices=devices,
        ))
    if not statuses:
        raise ValueError(f"{type(model).__name__} holds no adapter layer; get_peft_model adds them.")
    return statuses


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """One summary of :func:`get_layer_status` plus parameter counts and each adapter's method.

    Raises:
        ValueError: the model holds no adapter layer and is not a ``PeftModel``.
    """
    inner, peft_model = _peft_parts(model)
    layers = list(_layers(inner))
    if not layers and peft_model is None:
        raise ValueError(f"{type(model).__name__} holds no adapter layer; get_peft_model adds them.")
    statuses = get_layer_status(model) if layers else []
    params = list((peft_model or inner).parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    peft_types: dict[str, str] = {}
    if peft_model is not None:
        peft_types = {name: config.peft_type for name, config in peft_model.peft_config.items()}
    enabled: Any = _flag(s.enabled for s in statuses) if statuses else not peft_model._adapters_disabled
    available = sorted({n for s in statuses for n in s.available_adapters} | set(peft_types))
    active: Any = _agree(statuses, available, "active_adapters") if statuses else peft_model.active_adapters
    merged: Any = _agree(statuses, available, "merged_adapters") if statuses else []
    requires_grad: dict[str, Any] = {}
    devices: dict[str, set[str]] = {}
    for status in statuses:
        for name, flag in status.requires_grad.items():
            requires_grad[name] = flag if requires_grad.get(name, flag) == flag else "irregular"
            devices.setdefault(name, set()).update(status.devices[name])
    return TunerModelStatus(
        base_model_type=type(inner).__name__,
        adapter_model_type=type(peft_model).__name__ if peft_model is not None else "None",
        peft_types=peft_types, trainable_params=trainable, total_params=sum(p.numel() for p in params),
        num_adapter_layers=len(statuses), enabled=enabled, active_adapters=active, merged_adapters=merged,
        requires_grad=requires_grad, available_adapters=available,
        devices={name: sorted(d) for name, d in devices.items()},
    )


def _agree(statuses: list[TunerLayerStatus], names: list[str], attr: str) -> list[str] | Irregular:
    """The adapters that are ``attr`` (active, merged) in every layer holding them; "irregular" when some layers
    holding an adapter say yes and others no."""
    agreed = []
    for name in names:
        flags = {name in getattr(s, attr) for s in statuses if name in s.available_adapters}
        if len(flags) > 1:
            return "irregular"
        if flags == {True}:
            agreed.append(name)
    return agreed
