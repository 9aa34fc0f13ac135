"""Errors of the adapter pool that are about its state, not about an adapter's files (those raise
``PeftConfigError`` / ``CheckpointError``); a server answers these with "try again later"."""

from __future__ import annotations

__all__ = ["PoolFullError", "AdapterInUseError"]


class PoolFullError(RuntimeError):
    """A batch needs more adapter slots than are free or can be freed (every slot is pinned by running batches,
    or the batch mixes more than ``max_loras`` adapters)."""


class AdapterInUseError(RuntimeError):
    """An adapter cannot be unloaded or replaced while a running batch uses it."""
