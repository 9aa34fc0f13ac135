"""Every method module; importing one registers it (adding a method = one line here)."""

from __future__ import annotations

from peftkit.methods import (
    adalora,
    adapters,
    bitfit,
    bottleneck,
    composite,
    fusion,
    ia3,
    lora,
    p_tuning,
    parallel_adapter,
    prefix_tuning,
    prompt_learning,
    prompt_tuning,
    trainable_tokens,
    unipelt,
)

__all__ = [
    "adalora", "adapters", "bitfit", "bottleneck", "composite", "fusion", "ia3", "lora", "p_tuning",
    "parallel_adapter", "prefix_tuning", "prompt_learning", "prompt_tuning", "trainable_tokens",
    "unipelt",
]
