"""Merging several task vectors into one: task arithmetic, TIES, DARE and magnitude pruning.

Hugging Face peft's ``peft.utils.merge_utils``, with the same names and semantics, so a script that calls them
ports by changing its import. Every function takes ``task_tensors``: one tensor per task (a weight delta, or a
LoRA factor), all of one shape, and ``weights``: one float per task (``(T,)``); it returns the merged tensor.

- task arithmetic (Ilharco et al. 2022, https://arxiv.org/abs/2212.04089): ``τ = Σ_t w_t τ_t``;
- TIES (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): trim each ``τ_t`` to its top ``density`` fraction by
  magnitude, elect a sign per entry, and average (with the weights) the entries that agree with it;
- DARE (Yu et al. 2023, https://arxiv.org/abs/2311.03099): drop each entry with probability ``1 - density`` and
  rescale the survivors by ``1 / density``, so every entry keeps its expected value, then sum or TIES-merge.

The random drops draw from torch's global generator: seed it (``torch.manual_seed``) for repeatable merges.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from peftkit.core.errors import PeftConfigError

__all__ = [
    "calculate_majority_sign_mask",
    "dare_linear",
    "dare_ties",
    "disjoint_merge",
    "magnitude_based_pruning",
    "magnitude_prune",
    "prune",
    "random_pruning",
    "reshape_weight_task_tensors",
    "task_arithmetic",
    "ties",
]


def reshape_weight_task_tensors(task_tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights (T,)`` viewed as ``(T, 1, ..., 1)`` so that it broadcasts over stacked ``task_tensors (T, ...)``."""
    return weights.view(weights.shape + (1,) * (task_tensors.dim() - weights.dim()))


def magnitude_based_pruning(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density · numel)`` entries of largest magnitude, zero the rest (TIES' trim step)."""
    keep = int(density * tensor.numel())
    mask = torch.zeros_like(tensor).reshape(-1)
    # topk, not a threshold: with ties at the cut-off exactly ``keep`` entries survive, as in HF peft.
    mask[torch.topk(tensor.abs().reshape(-1), k=keep, largest=True).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE's drop step); ``rescale`` divides the survivors by
    ``density`` so that ``E[result] = tensor``."""
    pruned = tensor * torch.bernoulli(torch.full_like(tensor, density))
    return pruned / density if rescale else pruned


def prune(
    tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"], rescale: bool = False
) -> torch.Tensor:
    """Prune ``tensor`` to a ``density`` fraction by ``method`` (``"magnitude"`` or ``"random"``).

    A density of 1 or more keeps everything (with a warning, as in HF peft).

    Raises:
        PeftConfigError: ``density`` is negative or ``method`` is unknown.
    """
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.",
                      stacklevel=2)
        return tensor
    if density < 0:
        raise PeftConfigError(f"density must be in [0, 1], got {density}.")
    if method == "magnitude":
        return magnitude_based_pruning(tensor, density)
    if method == "random":
        return random_pruning(tensor, density, rescale=rescale)
    raise PeftConfigError(f"Unknown pruning method {method!r}; use 'magnitude' or 'random'.")


def calculate_majority_sign_mask(
    tensor: torch.Tensor, method: Literal["total", "frequency"] = "total"
) -> torch.Tensor:
    """TIES' sign election over stacked task tensors ``(T, ...)``: True where an entry's sign equals the elected one.

    ``"total"`` elects the sign of ``Σ_t τ_t`` (mass), ``"frequency"`` that of ``Σ_t sign(τ_t)`` (votes); a zero
    total elects +1.

    Raises:
        PeftConfigError: ``method`` is neither ``"total"`` nor ``"frequency"``.
    """
    sign = tensor.sign()
    if method == "total":
        elected_by = tensor.sum(dim=0)
    elif method == "frequency":
        elected_by = sign.sum(dim=0)
    else:
        raise PeftConfigError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}.")
    return sign == torch.where(elected_by >= 0, 1, -1)


def disjoint_merge(task_tensors: torch.Tensor, majority_sign_mask: torch.Tensor) -> torch.Tensor:
    """TIES' disjoint mean: ``Σ_t m_t τ_t / max(1, Σ_t m_t)`` per entry, ``m`` the majority-sign mask."""
    kept = majority_sign_mask.sum(dim=0)
    return (task_tensors * majority_sign_mask).sum(dim=0) / torch.clamp(kept, min=1.0)


def _weighted(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(task_tensors, dim=0)  # (T, ...)
    return stacked * reshape_weight_task_tensors(stacked, weights)


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``Σ_t w_t τ_t``."""
    return _weighted(task_tensors, weights).sum(dim=0)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """``Σ_t w_t trim(τ_t, density)``: task arithmetic over magnitude-pruned tensors."""
    return task_arithmetic([prune(t, density, method="magnitude") for t in task_tensors], weights)


def ties(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> torch.Tensor:
    """TIES: trim each ``τ_t`` by magnitude, elect signs on the trimmed (unweighted) tensors, then the disjoint
    mean of ``w_t τ_t`` over the entries that agree with the elected sign."""
    trimmed = torch.stack([prune(t, density, method="magnitude") for t in task_tensors], dim=0)
    return _sign_elected_mean(trimmed, weights, majority_sign_method)


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """DARE + task arithmetic: ``Σ_t w_t (τ_t ⊙ M_t) / density``, ``M_t ~ Bernoulli(density)`` per entry."""
    return task_arithmetic([prune(t, density, method="random", rescale=True) for t in task_tensors], weights)


def dare_ties(
    task_tensors: list[torch.Tensor],
    weights: torch.Tensor,
    density: float,
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> torch.Tensor:
    """DARE + TIES: random drop with rescaling, then sign election and the disjoint mean, as in :func:`ties`."""
    dropped = torch.stack([prune(t, density, method="random", rescale=True) for t in task_tensors], dim=0)
    return _sign_elected_mean(dropped, weights, majority_sign_method)


def _sign_elected_mean(pruned: torch.Tensor, weights: torch.Tensor, majority_sign_method: str) -> torch.Tensor:
    """Signs elected on the pruned (unweighted) stack, then the disjoint mean of the weighted entries that agree."""
    mask = calculate_majority_sign_mask(pruned, method=majority_sign_method)
    return disjoint_merge(pruned * reshape_weight_task_tensors(pruned, weights), mask)
