"""Reading one LoRA adapter for the pool: its config and weights checked against the base model, the scale folded
into B, every problem collected and raised at once before anything changes.

Checkpoints are HF peft's layout (``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and ``.lora_B.weight``
``(out, r)``, for ``Conv1D`` too), read with :func:`peftkit.core.checkpoint.read_adapter_weights`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peftkit.core.checkpoint import KEY_PREFIX, read_adapter_weights
from peftkit.core.config import PeftConfig
from peftkit.core.errors import CheckpointError, PeftConfigError, TargetModuleError
from peftkit.core.targets import logical_name, match_targets
from peftkit.methods.lora import LoraConfig
from peftkit.serving.cache import SlotWeights
from peftkit.serving.layer import LoraSlotLinear, linear_shape

__all__ = ["read_lora", "check_servable"]

_SUFFIXES = {".lora_A.weight": 0, ".lora_B.weight": 1}


def check_servable(config: PeftConfig, label: str) -> LoraConfig:
    """The config as a ``LoraConfig`` the pool can serve: plain LoRA, rsLoRA, rank and alpha patterns.

    Raises:
        PeftConfigError: another method, or a LoRA feature that does not reduce to a per-module ``B A`` pair.
    """
    if not isinstance(config, LoraConfig) or config.peft_type != LoraConfig.peft_type:
        raise PeftConfigError(
            f"{label} is a {config.peft_type or type(config).__name__} adapter; an AdapterPool serves LoRA adapters "
            "only (LoRA, rsLoRA, rank_pattern / alpha_pattern). Serve it with a PeftModel instead."
        )
    refused = []
    if config.gate is not None:
        refused.append(f"gate={config.gate!r}: a gated LoRA scales B A x by G(x), which the slots cannot hold")
    if config.bias != "none":
        refused.append(f"bias={config.bias!r}: it trains biases of the base model, which every adapter shares")
    if config.modules_to_save:
        refused.append(f"modules_to_save={config.modules_to_save}: whole-module copies are not LoRA pairs")
    # getattr: fields of newer LoraConfigs; each changes the layer beyond one B A pair per module.
    if getattr(config, "use_dora", False):
        refused.append("use_dora=True: DoRA rescales each output row by a norm of W + s·B A, not a B A pair; "
                       "merge_and_unload() it and serve the merged model")
    for name in ("target_parameters", "trainable_token_indices"):
        if getattr(config, name, None):
            refused.append(f"{name}={getattr(config, name)!r}: parameters that are not B A pairs of linear layers")
    if refused:
        raise PeftConfigError(f"{label} cannot be served by an AdapterPool: {'; '.join(refused)}.")
    return config


def read_lora(directory: str, label: str, model: nn.Module, max_lora_rank: int, dtype: torch.dtype) -> SlotWeights:
    """Read and check the adapter in ``directory`` against ``model``; return its pairs, ``B`` scaled, in ``dtype``.

    Raises:
        PeftConfigError: the config is missing, not LoRA (:func:`check_servable`), or a rank exceeds
            ``max_lora_rank``.
        CheckpointError: the weights file is missing or corrupt, or its tensors do not fit the model (missing or
            unknown modules, wrong shapes); every problem is listed.
    """
    config = check_servable(PeftConfig.from_pretrained(directory), label)
    tensors = read_adapter_weights(directory)
    found: dict[str, list[torch.Tensor | None]] = {}
    unexpected: list[str] = []
    for key, tensor in tensors.items():
        path = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
        suffix = next((s for s in _SUFFIXES if path.endswith(s)), None)
        if suffix is None:
            unexpected.append(key)
            continue
        found.setdefault(path[: -len(suffix)], [None, None])[_SUFFIXES[suffix]] = tensor
    problems = [f"tensors that are not LoRA A/B weights of a linear layer: {_show(unexpected)}"] if unexpected else []
    too_big: list[str] = []
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, (a, b) in found.items():
        module = _module(model, path)
        shape = None if module is None else linear_shape(module)
        if module is None:
            problems.append(f"{path}: no such module in {type(model).__name__} (an adapter for another model?)")
            continue
        if shape is None:
            problems.append(f"{path}: a {type(module).__name__}; the pool serves nn.Linear and Conv1D layers")
            continue
        if a is None or b is None:
            problems.append(f"{path}: lora_{'A' if a is None else 'B'}.weight is missing")
            continue
        r, alpha = config.rank_and_alpha(path)
        (n_in, n_out), want_a, want_b = shape, (r, shape[0]), (shape[1], r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            problems.append(f"{path}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but the config's r={r} and "
                            f"the layer ({n_in} -> {n_out}) need {want_a} and {want_b}")
            continue
        if r > max_lora_rank:
            too_big.append(f"{path} (r={r})")
            continue
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        # Fold the scale into B in fp32, then round once to the slots' dtype.
        pairs[path] = (a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous())
    problems += _missing_targets(model, config, set(found))
    if not found and not problems:
        problems.append("no LoRA tensors at all")
    if problems:
        raise CheckpointError(f"The adapter {label} does not fit this base model:\n- " + "\n- ".join(problems))
    if too_big:
        raise PeftConfigError(
            f"The adapter {label} has ranks above the pool's max_lora_rank={max_lora_rank}: {_show(too_big)}. "
            "Create the AdapterPool with a larger max_lora_rank."
        )
    nbytes = sum(t.numel() * t.element_size() for pair in pairs.values() for t in pair)
    return SlotWeights(pairs, max(a.shape[0] for a, _ in pairs.values()), nbytes)


def _module(model: nn.Module, path: str) -> nn.Module | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    return module.base_layer if isinstance(module, LoraSlotLinear) else module


def _is_linear(model: nn.Module, path: str) -> bool:
    module = _module(model, path)
    return module is not None and linear_shape(module) is not None


def _missing_targets(model: nn.Module, config: LoraConfig, found: set[str]) -> list[str]:
    """Modules the config targets whose weights the checkpoint lacks (a truncated or hand-edited file)."""
    if config.target_modules is None:
        return []
    try:
        targets = match_targets(model, config.target_modules, config.exclude_modules, config.layers_to_transform,
                                config.layers_pattern)
    except TargetModuleError as exc:
        return [f"target_modules: {exc}"]
    # Slot layers the pool installed show their wrapped module as "<name>.base_layer".
    expected = {logical_name(name) for name in targets}
    missing = sorted(n for n in expected - found if _is_linear(model, n))
    return [f"modules the config targets have no weights: {_show(missing)}"] if missing else []


def _show(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
