"""The injection walker: find targets, wrap them in adapter layers, and take the layers out again.

Wrapping replaces a leaf module on its parent with a layer that holds the original as ``base_layer``;
removing puts ``base_layer`` back, so the original module object (and its weights) return untouched.
Layers of different methods nest: each wraps whatever sits at that name.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from peftkit.core.config import PeftConfig, TunerConfig
from peftkit.core.errors import TargetModuleError
from peftkit.core.layer import AdapterLayer, ModulesToSaveWrapper
from peftkit.core.registry import PeftMethod
from peftkit.core.targets import candidate_modules, get_module, match_targets

__all__ = ["adapter_layers", "inject_adapter", "add_modules_to_save", "remove_adapter", "replace_module"]


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Every adapter layer in ``model``, nested ones included, with its name."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name)
    while child not in parent._modules and isinstance(parent, AdapterLayer):  # the parent is wrapped itself
        parent = parent.base_layer
    setattr(parent, child, new)


def _owned_layer(module: nn.Module, layer_class: type[AdapterLayer]) -> AdapterLayer | None:
    while isinstance(module, AdapterLayer):
        if isinstance(module, layer_class):
            return module
        module = module.base_layer
    return None


def inject_adapter(model: nn.Module, method: type[PeftMethod], config: PeftConfig, adapter_name: str) -> list[str]:
    """Add ``adapter_name`` to every module the config targets; return their names.

    The caller removes the adapter again if this raises part way.
    """
    if not isinstance(config, TunerConfig):
        return []
    targets = _wrap_targets(model, method, config, adapter_name) if config.target_modules else []
    beyond = method.inject_beyond_modules(model, config, adapter_name)
    if not targets and not beyond:
        match_targets(model, [], config.exclude_modules)  # raises: the config targets nothing
    return targets + beyond


def _wrap_targets(model: nn.Module, method: type[PeftMethod], config: TunerConfig, adapter_name: str) -> list[str]:
    heads = set(config.modules_to_save or [])
    # Task heads (this adapter's, or copies other adapters own) are trained whole, never wrapped again.
    skip = {
        n for n, m in candidate_modules(model) if n.rsplit(".", 1)[-1] in heads or isinstance(m, ModulesToSaveWrapper)
    }
    targets = match_targets(
        model, config.target_modules or [], config.exclude_modules, config.layers_to_transform,
        config.layers_pattern, skip=skip,
    )
    _refuse_containers(model, targets, "target_modules")
    for name in targets:
        module = get_module(model, name)
        owned = _owned_layer(module, method.layer_class)
        if owned is not None:
            method.update_layer(owned, config, adapter_name, name)
            _follow_training_mode(owned, module.training)
        else:
            layer = method.layer_for(module, config, adapter_name, name)
            _follow_training_mode(layer, module.training)
            replace_module(model, name, layer)
    return targets


def _refuse_containers(model: nn.Module, names: list[str], field: str) -> None:
    """The model iterates or indexes a ModuleList / ModuleDict and never calls it: a wrapper would break its
    forward, so such a selection is refused before anything is wrapped."""
    containers = [n for n in names if isinstance(get_module(model, n), (nn.ModuleList, nn.ModuleDict))]
    if containers:
        raise TargetModuleError(
            f"{field} {containers} name a {type(get_module(model, containers[0])).__name__}, a container the model "
            "does not call; name the modules inside it (e.g. its blocks' layers) instead."
        )


def _follow_training_mode(layer: AdapterLayer, training: bool) -> None:
    # New submodules (dropout!) start in training mode; an adapter added to a model in eval mode must not
    # run dropout, and base_layer keeps whatever mode the user gave it.
    layer.training = training
    for child in layer.children():
        if child is not layer.base_layer:
            child.train(training)


def add_modules_to_save(model: nn.Module, names: list[str], adapter_name: str) -> list[str]:
    """Give each module matching ``names`` (exact or dotted suffix) a trainable copy for ``adapter_name``."""
    matched = [n for n, _ in candidate_modules(model) if any(n == k or n.endswith("." + k) for k in names)]
    missing = [k for k in names if not any(n == k or n.endswith("." + k) for n in matched)]
    if missing:
        raise TargetModuleError(
            f"modules_to_save {missing} match no module of {type(model).__name__}; fix or remove them."
        )
    _refuse_containers(model, matched, "modules_to_save")
    for name in matched:
        module = get_module(model, name)
        if not isinstance(module, ModulesToSaveWrapper):
            module = ModulesToSaveWrapper(module)
            replace_module(model, name, module)
        module.update_layer(adapter_name)
    return matched


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete ``adapter_name`` from every layer and unwrap layers left with no adapter."""
    for name, layer in reversed(list(adapter_layers(model))):
        layer.delete_adapter(adapter_name)
        if not layer.adapter_names:
            replace_module(model, name, layer.base_layer)
