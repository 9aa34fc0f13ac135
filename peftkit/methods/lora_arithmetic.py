"""Adapter arithmetic for LoRA: a new adapter made from a weighted combination of loaded ones.

Hugging Face peft's ``add_weighted_adapter`` (``peft/tuners/lora/model.py``), reached as
``peft_model.add_weighted_adapter(...)`` through ``LoraMethod.model_api``. Per wrapped layer, with adapters ``t``
of factors ``A_t (r_t, in)``, ``B_t (out, r_t)``, scales ``s_t`` and user weights ``w_t``:

- ``cat``: ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]``, so ``B A = Σ_t w_t s_t B_t A_t``
  exactly, at rank ``Σ_t r_t``;
- ``svd`` (and ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``): merge the full deltas
  ``ΔW_t = s_t B_t A_t`` with :mod:`peftkit.merge_utils` (``svd``: ``Σ_t w_t ΔW_t``), then the best rank-``k``
  factorisation ``ΔW ≈ (U_k S_k) V_kᵀ``: ``B = U_k S_k``, ``A = V_kᵀ`` (``k = svd_rank``, default the largest rank);
- ``linear`` (and ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``): merge the factors themselves,
  ``A = f(A_t; sign(c_t)·√|c_t|)``, ``B = f(B_t; √|c_t|)`` with ``c_t = w_t s_t``; an approximation (the product of
  sums is not the sum of products) that needs equal ranks.

The new adapter has scale 1 (``lora_alpha = r``), is inactive until ``set_adapter``, and saves and loads like any
LoRA adapter (HF peft reads it). Layers whose rank differs from ``r`` get ``rank_pattern`` entries.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from peftkit import merge_utils
from peftkit.core.errors import PeftConfigError
from peftkit.core.layer import ModulesToSaveWrapper
from peftkit.core.registry import method_for
from peftkit.core.targets import logical_name
from peftkit.methods.lora import LoraConfig, LoraLayer, LoraMethod

if TYPE_CHECKING:
    from peftkit.core.model import PeftModel

__all__ = ["COMBINATION_TYPES", "add_weighted_adapter"]

_SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
_FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
COMBINATION_TYPES = ("cat", *_SVD_TYPES, *_FACTOR_TYPES)
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # and their _svd forms


def _merge_fn(combination_type: str, density: float | None, sign_method: str) -> Callable:
    """The :mod:`peftkit.merge_utils` function behind a combination type, as ``f(tensors, weights)``."""
    kind = combination_type.removesuffix("_svd")
    if kind in ("svd", "linear", "cat"):  # cat concatenates the factors; its merge function is never called
        return merge_utils.task_arithmetic
    if kind in ("ties", "dare_ties"):
        fn = getattr(merge_utils, kind)
        return lambda tensors, weights: fn(tensors, weights, density, sign_method)
    fn = getattr(merge_utils, kind)  # dare_linear, magnitude_prune
    return lambda tensors, weights: fn(tensors, weights, density)


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A, B)`` of adapter ``name`` in ``layer`` (linear/conv modules or embedding parameters), or None."""
    if name in getattr(layer, "lora_A", {}):
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    if name in getattr(layer, "lora_embedding_A", {}):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return None


def add_weighted_adapter(
    model: PeftModel,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add ``adapter_name``: the LoRA adapters ``adapters`` combined with ``weights`` (HF peft's signature).

    Args:
        model: The ``PeftModel`` holding the adapters.
        adapters: Names of loaded LoRA adapters; a single one always combines ``"linear"`` (as in HF peft).
        weights: One weight per adapter; negative weights subtract an adapter.
        adapter_name: Name of the new adapter. If it exists already nothing happens (HF peft's rule), with a warning.
        combination_type: One of ``COMBINATION_TYPES`` (module docstring). ``cat`` and ``svd`` reproduce the weighted
            sum of deltas (``svd`` up to its rank); ``linear`` and the factor-wise types approximate it.
        svd_rank: Rank of an ``*svd`` result (default: the largest rank among ``adapters``).
        svd_clamp: Quantile in (0, 1]: clamp the SVD factors to ``±quantile(|factors|)``; None: no clamping.
        svd_full_matrices: Passed to ``torch.linalg.svd``.
        svd_driver: cuSOLVER driver for ``torch.linalg.svd`` on CUDA (``gesvd``, ``gesvdj``, ``gesvda``).
        density: Fraction of entries kept, in [0, 1], by ``ties``, ``dare_*`` and ``magnitude_prune`` (and ``_svd``).
        majority_sign_method: ``"total"`` or ``"frequency"``, TIES' sign election (``ties``, ``dare_ties``).

    Raises:
        AdapterNotFoundError: an adapter is not loaded.
        PeftConfigError: the adapters or arguments do not allow the combination (other methods, gated or DoRA
            adapters, different ranks for a factor-wise type, a missing density, ...); nothing changes.
    """
    if adapter_name in model.peft_config:
        warnings.warn(f"add_weighted_adapter: adapter {adapter_name!r} exists already; nothing was added (HF peft's "
                      "behaviour). Delete it first or pick another name.", stacklevel=2)
        return
    combination_type = _check(model, adapters, weights, combination_type, density, majority_sign_method, svd_clamp)
    ranks = [_max_rank(model.peft_config[a]) for a in adapters]
    if combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type in _SVD_TYPES:
        new_rank = svd_rank or max(ranks)
    else:
        new_rank = ranks[0]
    merge = _merge_fn(combination_type, density, majority_sign_method)
    # Everything is computed before the model changes: the new adapter is added only once every layer worked.
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, layer in model._layers():
        if not isinstance(layer, LoraLayer):
            continue
        present = [(a, w) for a, w in zip(adapters, weights) if _factors(layer, a) is not None]
        if not present:
            continue
        path = logical_name(path)
        if combination_type == "cat":
            factors[path] = _cat(layer, present)
        elif combination_type in _SVD_TYPES:
            factors[path] = _svd(layer, present, merge, new_rank, svd_clamp, svd_full_matrices, svd_driver)
        else:
            factors[path] = _factor_wise(layer, path, present, merge)
    first = model.peft_config[adapters[0]]
    odd = {re.escape(p): a.shape[0] for p, (a, _) in factors.items() if a.shape[0] != new_rank}
    # Targets: the exact paths of the layers holding any source. A union of the sources' target_modules would also
    # need their exclude_modules and layers_to_transform, which may differ. alpha = r per layer gives scale 1, and
    # the plain init: one that rewrites base weights (PiSSA, OLoRA, ...) must not run again for a copied config.
    config = dataclasses.replace(
        first, r=new_rank, lora_alpha=new_rank, rank_pattern=odd, alpha_pattern=dict(odd), use_rslora=False,
        target_modules=sorted(factors), exclude_modules=None, layers_to_transform=None, layers_pattern=None,
        init_lora_weights=True,
    )
    model.add_adapter(adapter_name, config)
    try:
        with torch.no_grad():
            for path, layer in model._layers():
                if isinstance(layer, LoraLayer) and _factors(layer, adapter_name) is not None:
                    lora_a, lora_b = _factors(layer, adapter_name)
                    new_a, new_b = factors[logical_name(path)]
                    lora_a.copy_(new_a.reshape(lora_a.shape))
                    lora_b.copy_(new_b.reshape(lora_b.shape))
    except BaseException:
        model.delete_adapter(adapter_name)
        raise


def _check(model: PeftModel, adapters: list[str], weights: list[float], combination_type: str,
           density: float | None, sign_method: str, svd_clamp: float | None) -> str:
    """Validate the call; returns the combination type to use (``linear`` for a single adapter)."""
    adapters, weights = list(adapters), list(weights)
    if not adapters or len(adapters) != len(weights):
        raise PeftConfigError(f"add_weighted_adapter needs one weight per adapter and at least one adapter, got "
                              f"adapters={adapters}, weights={weights}.")
    model._check_known(adapters)
    for name in adapters:
        config = model.peft_config[name]
        if method_for(config) is not LoraMethod:
            raise PeftConfigError(
                f"add_weighted_adapter combines LoRA adapters only; {name!r} is {config.peft_type} "
                f"({type(config).__name__}). Combine adapters of one method (LoraConfig).")
        unsupported = {f: getattr(config, f) for f in ("gate", "use_dora", "target_parameters")
                       if getattr(config, f, None) not in (None, False)}
        if unsupported:
            raise PeftConfigError(
                f"add_weighted_adapter cannot combine adapter {name!r} with {unsupported}: its update is not the "
                "plain low-rank product s·B·A this combines. Leave it out of adapters.")
    # HF peft's rule: two adapters with their own trained copy of one module (a task head) cannot be combined.
    for path, layer in model._layers():
        if isinstance(layer, ModulesToSaveWrapper):
            owners = [a for a in adapters if a in layer.modules_to_save]
            if len(owners) > 1:
                raise PeftConfigError(
                    f"Adapters {owners} each train their own copy of {logical_name(path)} (modules_to_save), which "
                    "cannot be combined. Combine adapters where at most one trains that module.")
    if len(adapters) == 1:
        combination_type = "linear"
    if combination_type not in COMBINATION_TYPES:
        raise PeftConfigError(
            f"combination_type={combination_type!r} is not known; use one of {list(COMBINATION_TYPES)}.")
    if combination_type in _FACTOR_TYPES:
        # HF peft's rule, on each adapter's largest rank; layers where rank_pattern differs are checked in turn.
        ranks = {a: _max_rank(model.peft_config[a]) for a in adapters}
        if len(set(ranks.values())) > 1:
            raise PeftConfigError(
                f"combination_type={combination_type!r} combines A and B factor by factor, which needs one rank for "
                f"all adapters; got {ranks}. Use 'cat' (exact, rank = sum of ranks) or 'svd' / '<type>_svd' (any "
                "ranks).")
    if combination_type.removesuffix("_svd") in _NEEDS_DENSITY and (density is None or not 0 <= density <= 1):
        raise PeftConfigError(f"combination_type={combination_type!r} needs density in [0, 1] (the fraction of "
                              f"entries kept), got density={density!r}.")
    if sign_method not in ("total", "frequency"):
        raise PeftConfigError(f"majority_sign_method must be 'total' or 'frequency', got {sign_method!r}.")
    if svd_clamp is not None and not 0 < svd_clamp <= 1:
        raise PeftConfigError(f"svd_clamp is a quantile in (0, 1], got {svd_clamp!r}.")
    return combination_type


def _max_rank(config: LoraConfig) -> int:
    return max([config.r, *config.rank_pattern.values()])


def _scale(layer: LoraLayer, name: str) -> float:
    return float(layer.scaling[name])  # a tensor after prepare_model_for_compiled_hotswap


def _cat(layer: LoraLayer, present: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [(_factors(layer, a), w * _scale(layer, a)) for a, w in present]
    lora_a = torch.cat([a.detach() * c for (a, _), c in parts], dim=0)  # (Σ r_t, in, ...)
    lora_b = torch.cat([b.detach() for (_, b), _ in parts], dim=1)  # (out, Σ r_t, ...)
    return lora_a, lora_b


def _svd(layer: LoraLayer, present: list[tuple[str, float]], merge: Callable, rank: int, clamp: float | None,
         full_matrices: bool, driver: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = []
    for name, _ in present:
        lora_a, lora_b = _factors(layer, name)
        # In B·A layout, (out, in·k·k), whatever the layer stores: embeddings and GPT-2's Conv1D keep W transposed,
        # and a convolution's kernel folds into the columns. fp32: half-precision SVD is not supported on CPU.
        deltas.append((lora_b.detach().float().flatten(1) @ lora_a.detach().float().flatten(1)) * _scale(layer, name))
    weights = torch.tensor([w for _, w in present], device=deltas[0].device)
    delta = merge(deltas, weights)  # (out, in')
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    rank = min(rank, s.shape[0])  # no more singular directions than min(out, in')
    u, vh = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank, :]
    if clamp is not None:  # as kohya-ss/sd-scripts svd_merge_lora.py, which HF peft follows
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    lora_a, lora_b = _factors(layer, present[0][0])
    return vh.reshape(rank, *lora_a.shape[1:]), u.reshape(lora_b.shape[0], rank, *lora_b.shape[2:])


def _factor_wise(layer: LoraLayer, path: str, present: list[tuple[str, float]],
                 merge: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [_factors(layer, a) for a, _ in present]
    ranks = {a: pair[0].shape[0] for (a, _), pair in zip(present, pairs)}
    if len(set(ranks.values())) > 1:  # different rank_pattern entries; raised before the model changes
        raise PeftConfigError(f"Layer {path} holds the adapters at different ranks {ranks} (rank_pattern); "
                              "factor-wise combination needs one rank per layer. Use 'cat' or an '*_svd' type.")
    coeffs = [w * _scale(layer, a) for a, w in present]
    # The sign goes on A alone: on both factors it would cancel in B·A.
    weights_a = torch.tensor([math.copysign(math.sqrt(abs(c)), c) for c in coeffs])
    weights_b = torch.tensor([math.sqrt(abs(c)) for c in coeffs])
    dtype = pairs[0][0].dtype
    lora_a = merge([a.detach() for a, _ in pairs], weights_a.to(pairs[0][0].device))
    lora_b = merge([b.detach() for _, b in pairs], weights_b.to(pairs[0][1].device))
    return lora_a.to(dtype), lora_b.to(dtype)
