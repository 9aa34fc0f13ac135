"""Full embedding matrices in adapter checkpoints: HF peft's ``save_embedding_layers`` and loading them back.

A checkpoint normally holds deltas only. When the vocabulary was resized for fine-tuning (new chat-template tokens),
the new rows of the base embedding are random and no one can rebuild them, so HF peft also saves the input and
output embedding matrices: with ``save_embedding_layers=True``, or by default (``"auto"``) when the base model's
``config.json`` has another ``vocab_size`` than the model being saved (HF: also when an embedding is a
target; pass True for that).
Keys follow HF: ``<embedding>.weight`` for a module no adapter wraps, ``<embedding>.<prefix>base_layer.weight``
for a wrapped one (``AdapterLayer.checkpoint_base_prefix``). Loading writes them into the base (``unload()`` puts
the originals back).
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from peftkit.core.checkpoint import KEY_PREFIX
from peftkit.core.config import TunerConfig
from peftkit.core.layer import AdapterLayer, base_layer_of
from peftkit.core.targets import ALL_LINEAR, logical_name

if TYPE_CHECKING:
    from peftkit.core.model import PeftModel

__all__ = ["embedding_layer_tensors", "embedding_load_targets"]

# HF peft's EMBEDDING_LAYER_NAMES: what "the embedding is a target" means for save_embedding_layers="auto".
_EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def _embedding_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(logical name, module) of the input and output embeddings, as the model's getters return them."""
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        module = get() if callable(get) else None
        if module is None:
            continue
        for name, candidate in model.named_modules():
            if candidate is module:
                found.append((logical_name(name), module))
                break
    return found


def _embedding_targeted(model: nn.Module, config: object) -> bool:
    targets = getattr(config, "target_modules", None) if isinstance(config, TunerConfig) else None
    if isinstance(targets, str) and targets != ALL_LINEAR:
        names = [logical_name(n) for n, _ in model.named_modules()]
        return any(re.fullmatch(targets, n) for n in names
                   if any(re.match(rf"(.*\.)?{e}$", n) for e in _EMBEDDING_NAMES))
    return isinstance(targets, list) and any(e in targets for e in _EMBEDDING_NAMES)


def _base_vocab_size(base_name: str | None, model: nn.Module) -> int | None:
    """``vocab_size`` in the base model's ``config.json`` (a local directory or the Hub cache; never the network)."""
    if not base_name:
        return None
    path = os.path.join(base_name, "config.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        with contextlib.suppress(Exception):  # not a repo id, or nothing cached
            cached = try_to_load_from_cache(base_name, "config.json")
            path = cached if isinstance(cached, str) else ""
    if not os.path.isfile(path):
        return None
    return type(model.config).from_pretrained(os.path.dirname(path)).vocab_size


def embedding_layer_tensors(peft_model: PeftModel, adapter_name: str, save_embedding_layers: bool | str
                            ) -> dict[str, torch.Tensor]:
    """The embedding matrices ``save_embedding_layers`` adds to ``adapter_name``'s checkpoint (HF's rule), keyed as
    HF peft keys them; ``{}`` when none are saved.

    Raises:
        ValueError: ``save_embedding_layers`` is not True, False or ``"auto"``.
    """
    if save_embedding_layers not in (True, False, "auto"):
        raise ValueError(f"save_embedding_layers must be True, False or 'auto', got {save_embedding_layers!r}.")
    if save_embedding_layers is False:
        return {}
    model = peft_model.base_model.model
    config = peft_model.peft_config[adapter_name]
    targeted = _embedding_targeted(model, config)
    if save_embedding_layers == "auto":
        # Only a resized vocabulary: HF's "auto" also saves the matrices whenever "embed_tokens" / "lm_head" is a
        # target module, a full vocabulary-sized copy in every such checkpoint that the base model already holds.
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        base_name = peft_model._saved_config(adapter_name).base_model_name_or_path
        if vocab is None or _base_vocab_size(base_name, model) in (None, vocab):
            return {}
    out: dict[str, torch.Tensor] = {}
    for name, module in _embedding_modules(model):
        wrapped = isinstance(module, AdapterLayer)
        if targeted and not wrapped:  # HF saves a targeted embedding only through the layer wrapping it
            continue
        base = base_layer_of(module)
        prefix = f"{KEY_PREFIX}{name}.{module.checkpoint_base_prefix(adapter_name) if wrapped else ''}"
        out.update({prefix + key: tensor for key, tensor in base.state_dict(keep_vars=True).items()})
        if wrapped and not targeted:  # HF saves every tensor under the wrapper, tied copies included
            out.update({f"{KEY_PREFIX}{name}.{k}": t for k, t in module.load_aliases(adapter_name).items()})
    return out


def embedding_load_targets(peft_model: PeftModel, adapter_name: str) -> tuple[dict[str, torch.Tensor],
                                                                               dict[str, str]]:
    """Checkpoint keys a load may hold beyond the adapter's own tensors: ``({key: live tensor}, {key: parameter
    name})``, the second for base parameters (snapshotted so ``unload()`` restores them), not for aliases."""
    model = peft_model.base_model.model
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    targets: dict[str, torch.Tensor] = {}
    base_names: dict[str, str] = {}
    for name, module in _embedding_modules(model):
        wrapped = isinstance(module, AdapterLayer)
        prefix = f"{KEY_PREFIX}{name}.{module.checkpoint_base_prefix(adapter_name) if wrapped else ''}"
        for key, param in base_layer_of(module).named_parameters(recurse=False):
            targets[prefix + key], base_names[prefix + key] = param, names[id(param)]
    for path, layer in peft_model._layers():
        for key, tensor in layer.load_aliases(adapter_name).items():
            targets[f"{KEY_PREFIX}{logical_name(path)}.{key}"] = tensor
    return targets, base_names
