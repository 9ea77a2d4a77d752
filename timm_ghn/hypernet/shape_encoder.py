"""Embedding of a parameter's shape: four table look-ups, one per dimension."""

from __future__ import annotations

import bisect
import math
from typing import Sequence

import torch
from torch import nn

__all__ = ["ShapeEncoder", "channel_vocabulary", "spatial_vocabulary", "to_4d"]


def channel_vocabulary(num_classes: int) -> list[int]:
    """Return the sorted channel counts that have their own embedding row.

    ``{1, 3, C} ∪ {8, 16, …, 56} ∪ {64, 80, …, 4080} ∪ {4096, 4128, …, 8192}``: 391 values when
    ``C`` is not already one of them.
    """
    values = {1, 3, num_classes}
    values.update(range(8, 64, 8))
    values.update(range(64, 4096, 16))
    values.update(range(4096, 8192 + 1, 32))
    return sorted(values)


def spatial_vocabulary(max_kernel: int) -> list[int]:
    """Return the sorted kernel sizes that have their own row: odd sizes below ``max(12, S)``, 14, 16."""
    return sorted(set(range(1, max(12, max_kernel), 2)) | {14, 16})


def _nearest_index(vocabulary: Sequence[int], value: int) -> int:
    """Index of the vocabulary value nearest to ``value``, ties towards the smaller value."""
    right = bisect.bisect_left(vocabulary, value)
    if right == 0:
        return 0
    if right == len(vocabulary):
        return len(vocabulary) - 1
    left = right - 1
    return left if value - vocabulary[left] <= vocabulary[right] - value else right


def to_4d(shape: Sequence[int]) -> tuple[int, int, int, int]:
    """Pad a shape to four dims: ``(a) -> (a,1,1,1)``, ``(a,b) -> (a,b,1,1)``,
    ``(1,a,b) -> (1,b,⌊√a⌋,⌊√a⌋)`` for ``a, b > 1`` (a ViT position embedding), other 3-D
    ``(a,b,c) -> (a,b,c,1)``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        return (shape[0], 1, 1, 1)
    if len(shape) == 2:
        return (shape[0], shape[1], 1, 1)
    if len(shape) == 3:
        if shape[0] == 1 and shape[1] > 1 and shape[2] > 1:
            side = math.isqrt(shape[1])
            return (1, shape[2], side, side)
        return (shape[0], shape[1], shape[2], 1)
    if len(shape) == 4:
        return shape  # type: ignore[return-value]
    raise ValueError(f"shapes with more than 4 dims have no shape embedding: {shape}")


class ShapeEncoder(nn.Module):
    """Look-up tables for channel counts (first two dims) and kernel sizes (last two dims).

    A node's shape embedding is ``concat(E_ch[i0], E_ch[i1], E_sp[i2], E_sp[i3])``, each part
    ``hid / 4`` wide. Nodes without a shape use the last row of each table.
    """

    def __init__(self, hid: int, num_classes: int, max_kernel: int) -> None:
        super().__init__()
        self.channels = channel_vocabulary(num_classes)
        self.kernels = spatial_vocabulary(max_kernel)
        self.embed_spatial = nn.Embedding(len(self.kernels) + 1, hid // 4)
        self.embed_channel = nn.Embedding(len(self.channels) + 1, hid // 4)

    def channel_index(self, count: int) -> int:
        if count in self.channels:
            return self.channels.index(count)
        if 4 <= count <= 7:
            return self.channels.index(8)
        if 1 <= count < 8192:
            return _nearest_index(self.channels, count)
        return len(self.channels) - 1

    def kernel_index(self, size: int) -> int:
        if size in self.kernels:
            return self.kernels.index(size)
        if size == 2:
            return self.kernels.index(3)
        if 1 <= size < 16:
            return _nearest_index(self.kernels, size)
        return len(self.kernels) - 1

    def indices(self, shapes: Sequence[Sequence[int] | None]) -> torch.Tensor:
        """Return ``[N, 4]`` int64 table indices for a list of shapes (None: the dummy rows)."""
        rows = []
        for shape in shapes:
            if shape is None:
                rows.append((len(self.channels), len(self.channels), len(self.kernels), len(self.kernels)))
                continue
            a, b, h, w = to_4d(shape)
            rows.append((self.channel_index(a), self.channel_index(b), self.kernel_index(h), self.kernel_index(w)))
        return torch.tensor(rows, dtype=torch.long)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """Embed ``[N, 4]`` indices into ``[N, hid]`` shape embeddings."""
        channel = self.embed_channel(indices[:, :2]).flatten(1)
        spatial = self.embed_spatial(indices[:, 2:]).flatten(1)
        return torch.cat([channel, spatial], dim=1)
