"""HF peft's function-level API: state dicts, injection without a wrapper, gradients, scales.

These are the names HF peft exports from ``peft`` / ``peft.functional`` / ``peft.helpers``, with the same
arguments. They work on a ``PeftModel`` (possibly wrapped by ``torch.compile``, DDP, ...) and, where HF's do, on a
plain model given adapters by :func:`inject_adapter_in_model` (keys then start at the model's own module names).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from peftkit.core import checkpoint as ckpt
from peftkit.core.checkpointing import _without_wrapper_hops
from peftkit.core.config import PeftConfig
from peftkit.core.embeddings import embedding_layer_tensors
from peftkit.core.errors import CheckpointError, PeftConfigError
from peftkit.core.inject import adapter_layers
from peftkit.core.model import PeftModel
from peftkit.core.registry import PeftMethod
from peftkit.core.targets import logical_name
from peftkit.integrations.training import unwrap_model

__all__ = [
    "get_peft_config",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "load_peft_weights",
    "rescale_adapter_scale",
    "set_peft_model_state_dict",
    "set_requires_grad",
]


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """The config of the method named by ``config_dict["peft_type"]`` (an ``adapter_config.json`` as a dict)."""
    return PeftConfig.from_dict(config_dict)


def _injected_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Adapter tensors of a plain model given adapters by ``inject_adapter_in_model``, keyed from its own names."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in adapter_layers(model):
        path = _without_wrapper_hops(logical_name(path))
        for key, tensor in layer.adapter_tensors(adapter_name).items():
            out[f"{path}.{key}"] = tensor
    if not out:
        raise ValueError(f"{type(model).__name__} holds no adapter {adapter_name!r}.")
    return out


def _live_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    inner = unwrap_model(model)
    if isinstance(inner, PeftModel):
        return inner.get_adapter_state_dict(adapter_name, live=True)
    return _injected_tensors(inner, adapter_name)


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: str | bool = "auto",
) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed as in ``adapter_model.safetensors`` (what ``save_pretrained`` writes).

    Args:
        state_dict: A full state dict of ``model`` gathered elsewhere (FSDP, DeepSpeed); adapter tensors are read
            from it instead of from the live parameters.
        unwrap_compiled: Accepted for HF compatibility; compiled (and DDP/FSDP1) wrappers are always looked through.
        save_embedding_layers: True, False or ``"auto"``: whether the input and output embedding matrices are
            added (HF's rule, see :mod:`peftkit.core.embeddings`), as ``save_pretrained`` does.
    """
    del unwrap_compiled  # always unwrapped
    tensors = _live_tensors(model, adapter_name)
    if isinstance(unwrap_model(model), PeftModel):
        tensors.update(embedding_layer_tensors(unwrap_model(model), adapter_name, save_embedding_layers))
    elif save_embedding_layers not in ("auto", False):  # adapters injected directly: no config to decide by
        raise ValueError("save_embedding_layers=True needs a PeftModel; save the embeddings with the base model.")
    if state_dict is not None:  # the gathered copy of each tensor, found through the live tensor's name
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        name_of = {id(t): _without_wrapper_hops(n) for n, t in named}
        tensors = {k: state_dict.get(name_of.get(id(t), ""), t) for k, t in tensors.items()}
    return {k: v.detach() for k, v in tensors.items()}


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> _IncompatibleKeys:
    """Load adapter tensors (keyed as :func:`get_peft_model_state_dict` gives them) into ``adapter_name``.

    Stricter than HF peft on purpose: every expected tensor must be present with its shape, or nothing is loaded
    and the error lists every problem; the result's ``missing_keys`` / ``unexpected_keys`` are therefore empty.

    Args:
        ignore_mismatched_sizes: Only False: skipping tensors of another shape would run a half-loaded adapter.
        low_cpu_mem_usage: Accepted for HF compatibility; the tensors are always copied into the existing ones,
            which are small.

    Raises:
        CheckpointError: missing, unexpected or mis-shaped tensors; the model is unchanged.
    """
    del low_cpu_mem_usage
    if ignore_mismatched_sizes:
        raise ValueError(
            "ignore_mismatched_sizes=True is not supported: the adapter would run with some tensors freshly "
            "initialised. Load a checkpoint made for this model (the error without the flag lists what differs)."
        )
    inner = unwrap_model(model)
    if isinstance(inner, PeftModel):
        inner._check_known([adapter_name])
        inner._load_weights(adapter_name, dict(peft_model_state_dict), "the given state dict")
        return _IncompatibleKeys([], [])
    expected = _injected_tensors(inner, adapter_name)
    problems = ckpt.check_against_model(dict(peft_model_state_dict), expected, "the given state dict")
    if problems:
        raise CheckpointError("The state dict does not fit this model; nothing was loaded:\n  - "
                              + "\n  - ".join(problems))
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(peft_model_state_dict[key].to(dtype=target.dtype, device=target.device))
    return _IncompatibleKeys([], [])


def load_peft_weights(model_id: str | os.PathLike, device: str | torch.device | None = None,
                      **hf_hub_download_kwargs: Any) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` from a local directory or a Hub id (``revision``, ``subfolder``,
    ``token``, ``cache_dir``, ...) onto ``device`` (CPU by default)."""
    from peftkit.integrations.hub import hub_options, resolve_adapter

    source = resolve_adapter(model_id, hub_options("load_peft_weights", hf_hub_download_kwargs))
    weights = ckpt.read_adapter_weights(source.directory)
    return {k: v.to(device) for k, v in weights.items()} if device is not None else weights


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Put ``peft_config``'s adapter layers into ``model`` in place, without a ``PeftModel`` around it.

    The model's own forward then runs the adapter; base parameters are frozen and the adapter's train. Methods
    that act through the wrapper (prompt tables, prefixes, their hooks) need ``get_peft_model`` and are refused.

    Args:
        state_dict: Adapter tensors to load right away (keys as :func:`get_peft_model_state_dict` gives them for
            the returned model).
    """
    if isinstance(unwrap_model(model), PeftModel):
        raise ValueError("The model is a PeftModel already; use model.add_adapter(name, config).")
    holder = PeftModel(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    wrapper_only = [m.name() for m, _ in holder._leaves(adapter_name)
                    if m.forward_context.__func__ is not PeftMethod.forward_context.__func__]
    if len(holder.adapter_modules) or wrapper_only:
        holder.unload()
        raise PeftConfigError(
            f"{type(peft_config).__name__} adds virtual tokens or prefixes through PeftModel's forward, so it cannot "
            "live inside the bare model; use get_peft_model(model, config)."
        )
    if state_dict is not None:
        try:
            set_peft_model_state_dict(model, state_dict, adapter_name)
        except BaseException:
            holder.unload()
            raise
    return model


def set_requires_grad(model: nn.Module, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
    """Switch the named adapters' gradients on or off (``PeftModel.set_requires_grad``; also for models given
    adapters by :func:`inject_adapter_in_model`)."""
    inner = unwrap_model(model)
    if isinstance(inner, PeftModel):
        inner.set_requires_grad(adapter_names, requires_grad)
        return
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    layers = [layer for _, layer in adapter_layers(inner)]
    unknown = [n for n in names if not any(n in layer.adapter_names for layer in layers)]
    if unknown:
        raise ValueError(f"Adapter(s) {unknown} not found in the model.")
    for layer in layers:
        for name in names:
            layer.set_trainable(name, requires_grad)


@contextlib.contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: float) -> Iterator[None]:
    """Multiply the scale of every adapter (LoRA family: ``α/r``) by ``multiplier`` inside the block, then
    restore it; ``multiplier`` in [0, 1] interpolates between the base and the fine-tuned model (WiSE-FT).

    Raises:
        TypeError: ``multiplier`` is not a number.
        ValueError: no layer of the model has an adapter scale, or an adapter is merged (its merged weights would
            keep the old scale).
    """
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)):
        raise TypeError(f"multiplier must be a float or int, got {type(multiplier).__name__}.")
    inner = unwrap_model(model)
    layers = [layer for _, layer in adapter_layers(inner.base_model.model if isinstance(inner, PeftModel) else inner)]
    scaled = [(layer, name, layer.adapter_scale(name)) for layer in layers for name in layer.adapter_names
              if layer.adapter_scale(name) is not None]
    if not scaled:
        raise ValueError("The model has no adapter layer with a scale (LoRA-family adapters have one); nothing to "
                         "rescale.")
    merged = sorted({n for layer, n, _ in scaled if n in layer.merged_adapters})
    if merged:
        raise ValueError(f"Adapter(s) {merged} are merged; call unmerge_adapter() before rescaling them.")
    try:
        for layer, name, scale in scaled:
            layer.set_scale(name, scale * multiplier)
        yield
    finally:
        for layer, name, scale in scaled:
            layer.set_scale(name, scale)
