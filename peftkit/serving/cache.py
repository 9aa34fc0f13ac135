"""The host-side cache of adapter weights: least recently used first out, under a count and a byte budget.

A slot fill served from here costs one copy into the slot tensors; a miss re-reads the adapter's files. The budget
is a hard limit: an entry that cannot fit once every unpinned older entry is gone is not cached at all (its files
are read again when it is next needed), and nothing is evicted for it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["HostCache", "SlotWeights"]


@dataclass(frozen=True)
class SlotWeights:
    """One adapter as the slots take it, on the host.

    Attributes:
        pairs: Per module name, ``A (r, in)`` and ``s·B (out, r)``, the scale ``s`` folded in.
        rank: The largest ``r`` among the modules.
        nbytes: Bytes the tensors hold.
    """

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    nbytes: int


class HostCache:
    """LRU of :class:`SlotWeights` by adapter name, holding at most ``max_entries`` and ``max_bytes``.

    Args:
        max_entries: Most adapters held (0: cache nothing).
        max_bytes: Most bytes held; None: no byte limit.
    """

    def __init__(self, max_entries: int, max_bytes: int | None) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[str, SlotWeights] = OrderedDict()
        self.nbytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> SlotWeights | None:
        """The entry, marked as just used; None on a miss."""
        weights = self._entries.get(name)
        if weights is not None:
            self._entries.move_to_end(name)
        return weights

    def pop(self, name: str) -> None:
        weights = self._entries.pop(name, None)
        if weights is not None:
            self.nbytes -= weights.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def put(self, name: str, weights: SlotWeights, pinned: Callable[[str], bool]) -> bool:
        """Cache ``weights`` under ``name`` (replacing an older entry of that name), evicting the least recently
        used entries that ``pinned`` does not protect. Return False, and evict nothing, if it cannot fit."""
        self.pop(name)
        count, size = len(self._entries) + 1, self.nbytes + weights.nbytes
        victims: list[str] = []
        for old in self._entries:  # oldest first
            if count <= self.max_entries and (self.max_bytes is None or size <= self.max_bytes):
                break
            if not pinned(old):
                victims.append(old)
                count, size = count - 1, size - self._entries[old].nbytes
        if count > self.max_entries or (self.max_bytes is not None and size > self.max_bytes):
            return False
        for old in victims:
            self.pop(old)
            self.evictions += 1
        self._entries[name] = weights
        self.nbytes += weights.nbytes
        return True
