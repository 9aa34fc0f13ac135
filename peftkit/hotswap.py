"""Hot-swapping LoRA adapters of different ranks and scales in a ``torch.compile``d model, without recompiling.

Hugging Face peft's ``peft.utils.hotswap`` with the same names. A compiled graph is specialised on the shapes of
the tensors it reads and on the Python numbers it reads: a swap to a rank-8 adapter from a rank-4 one changes
``A (r, in)`` and ``B (out, r)``, and a new ``α/r`` changes a constant, so either recompiles.
:func:`prepare_model_for_compiled_hotswap`, called once before compiling, removes both causes:

- ranks: ``A`` and ``B`` are zero-padded to ``target_rank``; ``B A`` is unchanged, because the extra rows of ``A``
  meet the extra (zero) columns of ``B``: ``[B 0] [A; 0] = B A``;
- scales: ``α/r`` becomes a 0-d tensor, which the graph reads as an input, so a new value is filled in place.

:func:`hotswap_adapter` then copies a saved adapter into the padded tensors (zeros beyond its rank) and fills its
scale in place: values change, shapes and graph inputs do not. Saving a padded adapter is not supported (its
config keeps the original rank); load the original files instead.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Literal

import torch
from torch import nn

from peftkit.core.config import PeftConfig
from peftkit.core.errors import CheckpointError, PeftConfigError
from peftkit.core.registry import method_for
from peftkit.core.targets import logical_name
from peftkit.functional import load_peft_weights
from peftkit.methods.lora import LoraConfig, LoraLayer, LoraMethod

__all__ = ["hotswap_adapter", "prepare_model_for_compiled_hotswap"]

# Config fields that change the output beyond what the weights and the scale carry (HF peft's list).
CONFIG_KEYS_TO_CHECK = ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora")
# The checkpoint attribute of each LoRA factor, and the dimension that holds the rank in its tensor.
_RANK_DIM = {"lora_A": 0, "lora_B": 1, "lora_embedding_A": 0, "lora_embedding_B": 1}


def _is_compiled(model: nn.Module) -> bool:
    return hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None


def _lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _factor(layer: LoraLayer, attr: str, name: str) -> nn.Parameter:
    item = getattr(layer, attr)[name]
    return item if isinstance(item, nn.Parameter) else item.weight


def _pad(layer: LoraLayer, attr: str, name: str, rank: int) -> None:
    """Zero-pad one factor of adapter ``name`` to ``rank`` along its rank dimension, keeping its trainability."""
    dim, old = _RANK_DIM[attr], _factor(layer, attr, name)
    if old.shape[dim] == rank:
        return
    shape = list(old.shape)
    shape[dim] = rank
    padded = old.new_zeros(shape)
    padded.narrow(dim, 0, old.shape[dim]).copy_(old.detach())
    param = nn.Parameter(padded, requires_grad=old.requires_grad)
    container = getattr(layer, attr)
    if isinstance(container[name], nn.Parameter):  # embeddings hold bare parameters
        container[name] = param
        return
    module = copy.copy(container[name])  # a shallow copy of nn.Linear / nn.ConvNd with the padded weight
    module._parameters = dict(module._parameters, weight=param)
    for size in (("out_features", "out_channels") if dim == 0 else ("in_features", "in_channels")):
        if hasattr(module, size):
            setattr(module, size, rank)
    container[name] = module


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: LoraConfig | dict[str, LoraConfig] | None = None,
    check_compiled: Literal["error", "warn", "ignore"] = "error",
) -> None:
    """Pad every LoRA adapter to ``target_rank`` and turn its scales into tensors, so later :func:`hotswap_adapter`
    calls with other ranks (up to ``target_rank``) and alphas never recompile the compiled model.

    Call it after loading the first adapter and before ``torch.compile``. Outputs do not change.

    Args:
        model: The ``PeftModel`` (or a module holding peftkit LoRA layers).
        target_rank: The largest rank among the adapters that will be swapped in; None pads nothing.
        config: ``LoraConfig``s (one, or a ``{name: config}`` dict such as ``model.peft_config``) whose ``r`` and
            ``rank_pattern`` values are set to ``target_rank``, as HF peft does.
        check_compiled: What to do if ``model`` is compiled already: ``"error"``, ``"warn"`` or ``"ignore"``.

    Raises:
        PeftConfigError: the model is compiled (with ``"error"``), has no LoRA layer, or holds an adapter whose rank
            exceeds ``target_rank``; nothing changes.
    """
    if check_compiled not in ("error", "warn", "ignore"):
        raise PeftConfigError(f"check_compiled must be 'error', 'warn' or 'ignore', got {check_compiled!r}.")
    if _is_compiled(model):
        message = ("prepare_model_for_compiled_hotswap was called on a compiled model: call it before torch.compile, "
                   "or the compiled graph is rebuilt on the next call.")
        if check_compiled == "error":
            raise PeftConfigError(message)
        if check_compiled == "warn":
            warnings.warn(message, stacklevel=2)
    layers = _lora_layers(getattr(model, "_orig_mod", model))
    if not layers:
        raise PeftConfigError("No LoRA layer found: call prepare_model_for_compiled_hotswap after loading the first "
                              "LoRA adapter and before compiling.")
    if target_rank is not None:
        too_large = {f"{layer.module_name or type(layer).__name__}[{n}]": r
                     for layer in layers for n, r in layer.r.items() if r > target_rank}
        if too_large:
            raise PeftConfigError(f"target_rank={target_rank} is smaller than the rank of {too_large}; pass the "
                                  "largest rank of every adapter you will swap in.")
    with torch.no_grad():
        for layer in layers:
            weight = layer.get_base_layer().weight
            for name, value in layer.scaling.items():
                if not isinstance(value, torch.Tensor):
                    # fp32 0-d tensor: a 0-d tensor does not promote the dtype of the activations it multiplies.
                    layer.scaling[name] = torch.tensor(float(value), device=weight.device)
            if target_rank is not None:
                for name in list(layer.r):
                    for attr in _RANK_DIM:
                        if name in getattr(layer, attr, {}):
                            _pad(layer, attr, name, target_rank)
                    layer.r[name] = target_rank  # shapes (mixed batches stack by it); the scale keeps α/r_original
            layer._refresh_slots()
    if config is None or target_rank is None:
        return
    for lora_config in (config.values() if isinstance(config, dict) else [config]):
        lora_config.r = target_rank
        lora_config.rank_pattern = dict.fromkeys(lora_config.rank_pattern, target_rank)


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str | os.PathLike,
    adapter_name: str,
    torch_device: str | torch.device | None = None,
    **kwargs: object,
) -> None:
    """Replace the weights and scales of the loaded LoRA adapter ``adapter_name`` with a saved adapter's, in place.

    The saved adapter may have another rank (up to the padded rank, see :func:`prepare_model_for_compiled_hotswap`)
    and other alphas; layers it does not target get zero factors. A compiled model (``torch.compile(peft_model)``)
    may be passed as it is. ``kwargs`` are Hub arguments (``revision``, ``subfolder``, ``token``, ...).

    Raises:
        PeftConfigError: not a LoRA adapter, a config difference no value swap can carry (``use_rslora``,
            ``lora_dropout``, ``alpha_pattern``, ``use_dora``), or the adapter is merged.
        CheckpointError: the saved adapter targets modules this one does not, or has a larger rank than an
            uncompiled swap allows here (compiled: than ``target_rank``). Nothing changes on any error.
    """
    peft_model = getattr(model, "_orig_mod", model)
    if not hasattr(peft_model, "peft_config") or not hasattr(peft_model, "get_adapter_state_dict"):
        raise PeftConfigError(f"hotswap_adapter needs a peftkit PeftModel (or its compiled form), got "
                              f"{type(peft_model).__name__}.")
    peft_model._check_known([adapter_name])
    loaded = peft_model.peft_config[adapter_name]
    saved = PeftConfig.from_pretrained(model_name_or_path, **kwargs)
    for config in (loaded, saved):
        if method_for(config) is not LoraMethod:
            raise PeftConfigError(f"hotswap_adapter swaps LoRA adapters only; got {config.peft_type}.")
    ours, theirs = loaded.to_dict(), saved.to_dict()
    differ = {k: (ours.get(k), theirs.get(k)) for k in CONFIG_KEYS_TO_CHECK if ours.get(k) != theirs.get(k)}
    if differ:
        raise PeftConfigError(f"Cannot hot-swap {model_name_or_path} into {adapter_name!r}: the configs differ in "
                              f"{differ} (loaded, saved), which a swap of weights and scales cannot carry.")
    merged = [logical_name(p) for p, layer in peft_model._layers() if adapter_name in layer.merged_adapters]
    if merged:
        raise PeftConfigError(f"Adapter {adapter_name!r} is merged into {merged[:3]}; call unmerge_adapter() before "
                              "hot-swapping (swapping merged weights would corrupt them).")
    weights = load_peft_weights(model_name_or_path, device=torch_device, **kwargs)
    plan = _plan(peft_model, adapter_name, weights, compiled=_is_compiled(model))
    with torch.no_grad():
        for layer, attr, param, new in plan:
            if new is None:  # a layer the saved adapter does not target: its factors contribute nothing
                param.zero_()
            elif new.shape == param.shape:
                param.copy_(new)
            elif all(n <= o for n, o in zip(new.shape, param.shape)):
                param.zero_()
                param[tuple(slice(0, n) for n in new.shape)].copy_(new)
            else:  # a larger rank, uncompiled model: the parameter object keeps its identity, with new storage
                torch.utils.swap_tensors(param, nn.Parameter(new, requires_grad=param.requires_grad))
                layer.r[adapter_name] = new.shape[_RANK_DIM[attr]]
        for layer in {id(x[0]): x[0] for x in plan if x[0] is not None}.values():
            _set_scale(layer, adapter_name, saved)


def _plan(peft_model: nn.Module, adapter_name: str, weights: dict[str, torch.Tensor], compiled: bool) -> list:
    """Every write of the swap as ``(layer or None, attribute, live tensor, new tensor or None)``, checked first."""
    live = peft_model.get_adapter_state_dict(adapter_name, live=True)  # checkpoint key -> the parameter itself
    owners = {id(_factor(layer, attr, adapter_name)): (layer, attr) for layer in _lora_layers(peft_model)
              for attr in _RANK_DIM if adapter_name in getattr(layer, attr, {})}
    plan, problems = [], []
    for key, param in live.items():
        layer, attr = owners.get(id(param), (None, None))
        new = weights.get(key)
        if new is None:
            if layer is not None:
                plan.append((layer, attr, param, None))
            continue  # other tensors (a head copy) the saved adapter lacks stay as they are
        new = new.to(device=param.device, dtype=param.dtype)
        if new.shape != param.shape:
            dim = _RANK_DIM[attr] if layer is not None else None
            same_rest = dim is not None and new.dim() == param.dim() and all(
                n == o for i, (n, o) in enumerate(zip(new.shape, param.shape)) if i != dim)
            if not same_rest or (compiled and new.shape[dim] > param.shape[dim]):
                why = ("a larger rank than the model was padded to: pass a larger target_rank to "
                       "prepare_model_for_compiled_hotswap before compiling" if same_rest else "another shape")
                problems.append(f"{key}: saved {tuple(new.shape)}, loaded {tuple(param.shape)} ({why})")
                continue
        plan.append((layer, attr, param, new))
    problems += [f"{key}: not part of adapter {adapter_name!r} (the saved adapter targets other modules)"
                 for key in weights if key not in live]
    if problems:
        raise CheckpointError(
            f"Cannot hot-swap into {adapter_name!r}; nothing changed:\n  - " + "\n  - ".join(problems))
    return plan


def _set_scale(layer: LoraLayer, adapter_name: str, config: LoraConfig) -> None:
    r, alpha = config.rank_and_alpha(layer.module_name)
    scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    layer.unscaled.pop(adapter_name, None)  # a set_scale factor belonged to the old adapter
    current = layer.scaling[adapter_name]
    if isinstance(current, torch.Tensor):
        current.fill_(scale)  # in place: the compiled graph reads this tensor
    else:
        layer.scaling[adapter_name] = scale
        layer._refresh_slots()
