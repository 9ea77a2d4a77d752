"""Gated graph neural network of GHN-1/GHN-2: one forward and one backward sweep of GRU updates."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["MLP", "GatedGNN", "sweep_levels"]


class MLP(nn.Module):
    """``Linear, ReLU, Linear[, ReLU]`` stored as ``fc.0`` and ``fc.2`` (ppuda's key layout)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, last_activation: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features)]
        if last_activation:
            layers.append(nn.ReLU())
        self.fc = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def sweep_levels(adjacency: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Group topologically sorted nodes into levels that a sweep may update at the same time.

    A node's forward level is the length of the longest path reaching it, its backward level the
    longest path leaving it. No edge joins two nodes of one level, so updating a whole level at
    once equals updating its nodes one by one in index order.
    """
    n = adjacency.shape[0]
    connected = adjacency > 0
    forward = np.zeros(n, dtype=np.int64)
    for v in range(n):
        parents = np.flatnonzero(connected[:v, v])
        if parents.size:
            forward[v] = forward[parents].max() + 1
    backward = np.zeros(n, dtype=np.int64)
    for v in range(n - 1, -1, -1):
        children = np.flatnonzero(connected[v, v + 1 :]) + v + 1
        if children.size:
            backward[v] = backward[children].max() + 1
    forward_levels = [np.flatnonzero(forward == k) for k in range(forward.max() + 1)] if n else []
    backward_levels = [np.flatnonzero(backward == k) for k in range(backward.max() + 1)] if n else []
    return forward_levels, backward_levels


class GatedGNN(nn.Module):
    """Message passing of GHN-2 (ppuda ``GatedGNN`` with one round).

    Forward sweep over nodes in topological order, then backward sweep in reverse order; each node
    is updated once per sweep with ``h_v <- GRU(m_v, h_v)``, where the message is

        m_v = Σ_{u: A[u,v] = 1} MLP(h_u) + Σ_{u: A[u,v] >= 1} MLP_ve(h_u) / A[u,v]

    in the forward sweep (predecessors ``u``, already updated in this sweep) and the same over
    successors ``w`` with ``A[v, w]`` in the backward sweep. Without virtual edges (GHN-1) the
    second sum is absent.
    """

    def __init__(self, hid: int, ve: bool) -> None:
        super().__init__()
        self.ve = ve
        self.mlp = MLP(hid, hid // 2 if ve else hid, hid)
        if ve:
            self.mlp_ve = MLP(hid, hid // 2, hid)
        self.gru = nn.GRUCell(hid, hid)

    def _sweep(self, h: torch.Tensor, real: torch.Tensor, inverse: torch.Tensor, levels, active) -> torch.Tensor:
        messages = self.mlp(h)
        messages_ve = self.mlp_ve(h) if self.ve else None
        for level in levels:
            level = level[active[level]]
            if level.size == 0:
                continue
            index = torch.from_numpy(level).to(h.device)
            m = real[index] @ messages
            if self.ve:
                m = m + inverse[index] @ messages_ve
            h = h.index_copy(0, index, self.gru(m, h[index]))
            messages = messages.index_copy(0, index, self.mlp(h[index]))
            if self.ve:
                messages_ve = messages_ve.index_copy(0, index, self.mlp_ve(h[index]))
        return h

    def forward(self, h: torch.Tensor, adjacency: np.ndarray) -> torch.Tensor:
        """Update node states ``h`` ``[N, hid]`` over the graph with distance matrix ``adjacency``."""
        distances = torch.as_tensor(adjacency, dtype=h.dtype, device=h.device)
        real = (distances == 1).to(h.dtype)
        inverse = torch.where(distances > 0, 1.0 / distances.clamp(min=1), torch.zeros_like(distances))
        forward_levels, backward_levels = sweep_levels(adjacency)

        # ppuda updates nodes up to the largest edge target only; later nodes keep their state.
        targets = np.flatnonzero((adjacency > 0).any(axis=0))
        last = targets.max() if targets.size else -1
        active = np.arange(adjacency.shape[0]) <= last

        h = self._sweep(h, real.t(), inverse.t(), forward_levels, active)
        h = self._sweep(h, real, inverse, backward_levels, active)
        return h
