"""Serving many LoRA adapters of one base model: an adapter pool with per-row slots (see docs/serving.md)."""

from __future__ import annotations

from peftkit.serving.errors import AdapterInUseError, PoolFullError
from peftkit.serving.layer import LoraSlotLinear
from peftkit.serving.pool import BASE, AdapterPool

__all__ = ["BASE", "AdapterInUseError", "AdapterPool", "LoraSlotLinear", "PoolFullError"]
