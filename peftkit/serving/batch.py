"""A batch of sequences of different lengths sharing one KV cache, for continuous batching.

The cache is transformers' ``DynamicCache`` with tensors ``(B, H, T, D)``, left-padded so that every row's real
tokens end at column ``T`` (right-aligned). Each decode step appends one column to every row, so the alignment
holds, and a row's length is all its attention mask needs::

    row 0  . . . a a a a a      lengths = [5, 2, 8]; mask[i, j] = j >= T - lengths[i]
    row 1  . . . . . . b b      positions of the next token = lengths (each row counts from 0, as if alone)
    row 2  c c c c c c c c

Rows join by left-padding the shorter of two caches and concatenating along the batch dimension, and leave by
``index_select``; columns that became padding for every row are trimmed. Only plain ``DynamicLayer`` caches are
re-padded: a sliding-window layer drops columns once its window is full, and other layer types hold state whose
padding this module does not know.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["RaggedBatch"]

Row = TypeVar("Row")


class RaggedBatch(Generic[Row]):
    """Rows (any per-row objects) with one right-aligned cache, their lengths and their next input tokens.

    Args:
        rows: One object per batch row (the engine's running requests).
        cache: The rows' KV cache, ``(B, H, T, D)`` per layer.
        lengths: ``(B,)`` real tokens of each row in the cache.
        next_ids: ``(B,)`` the token each row feeds at the next step.
    """

    def __init__(self, rows: list[Row], cache: DynamicCache, lengths: torch.Tensor, next_ids: torch.Tensor) -> None:
        self.rows, self.cache, self.lengths, self.next_ids = rows, cache, lengths, next_ids

    @property
    def mergeable(self) -> bool:
        """Whether rows can join: every layer is a plain ``DynamicLayer`` (see the module docstring)."""
        return all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def mask(self, extra: int) -> torch.Tensor:
        """``(B, T + extra)`` attention mask: ones on each row's real tokens plus ``extra`` new ones."""
        width = self.cache.get_seq_length()
        cols = torch.arange(width + extra, device=self.lengths.device)
        return (cols[None, :] >= (width - self.lengths)[:, None]).long()

    def keep(self, index: list[int]) -> None:
        """Keep only the rows at ``index``, then trim the columns that are padding for all of them."""
        picked = torch.tensor(index, device=self.lengths.device)
        self.rows = [self.rows[i] for i in index]
        self.lengths, self.next_ids = self.lengths[picked], self.next_ids[picked]
        for layer in _layers(self.cache):  # a batch-dimension select is valid for any layer type
            layer.keys, layer.values = layer.keys[picked], layer.values[picked]
        unused = self.cache.get_seq_length() - int(self.lengths.max())
        if unused > 0 and self.mergeable:
            for layer in _layers(self.cache):
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]

    def extend(self, other: RaggedBatch[Row]) -> None:
        """Append ``other``'s rows (``other`` is consumed); the shorter cache is left-padded to the longer."""
        width = max(self.cache.get_seq_length(), other.cache.get_seq_length())
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            if mine.is_initialized and theirs.is_initialized:
                mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
                mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self.rows = self.rows + other.rows
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.next_ids = torch.cat([self.next_ids, other.next_ids])


def _layers(cache: DynamicCache) -> Iterator[DynamicLayer]:
    return (layer for layer in cache.layers if layer.is_initialized)


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, H, T, D)`` → ``(B, H, width, D)`` with zeros on the left (masked positions)."""
    missing = width - t.shape[-2]
    if missing == 0:
        return t
    return torch.cat([t.new_zeros(*t.shape[:2], missing, t.shape[-1]), t], dim=-2)
