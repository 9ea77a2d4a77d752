"""Graphormer message passing of GHN-3 (Knyazev et al., ICML 2023).

A stack of pre-norm transformer layers over all nodes of one graph. The first layer adds
structural embeddings (in-degree, out-degree and distance from the input node) to the node
states and computes an attention bias per head from the pairwise distances, which every layer
reuses.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["Graphormer", "GraphormerLayer"]

MAX_DEGREE = 100
MAX_INPUT_DISTANCE = 1000
EDGE_TABLE_ROWS = 257
# Edge table rows are offset by 2: row 2 is "no edge", row 3 distance 1, row 52 distance 50.
EDGE_OFFSET = 2


class _EdgeEmbedding(nn.Module):
    def __init__(self, hid: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(EDGE_TABLE_ROWS, hid)


class _Attention(nn.Module):
    def __init__(self, hid: int, heads: int, edge_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(hid, 3 * hid, bias=False)
        self.to_out = nn.Sequential(nn.Linear(hid, hid), nn.Identity())
        if edge_bias:
            self.edge_embed = _EdgeEmbedding(hid)
            self.proj_e = nn.Sequential(nn.Linear(2 * hid, hid), nn.ReLU(), nn.Linear(hid, heads))

    def edge_bias(self, adjacency: np.ndarray) -> torch.Tensor:
        """Return the ``[H, N, N]`` attention bias ``proj_e(concat(E[A[i,j]+2], E[A[j,i]+2]))``.

        ``proj_e`` is evaluated once per distinct ``(A[i,j], A[j,i])`` pair and gathered, which
        gives the same values as evaluating it for all ``N²`` pairs. The distinct pairs are found
        with numpy on the CPU, in the sorted order ``torch.unique`` would give, so no
        data-dependent operation runs on the GHN's device. Each pair is encoded as one integer
        ``forward * base + backward``, whose sorted order is the lexicographic order of the pairs.
        """
        distances = np.asarray(adjacency, dtype=np.int64)
        forward = distances.ravel() + EDGE_OFFSET
        backward = distances.T.ravel() + EDGE_OFFSET
        base = int(max(forward.max(initial=0), backward.max(initial=0))) + 1
        keys, inverse = np.unique(forward * base + backward, return_inverse=True)

        table = self.edge_embed.embed.weight
        unique_forward = torch.from_numpy(keys // base).to(table.device)
        unique_backward = torch.from_numpy(keys % base).to(table.device)
        inverse = torch.from_numpy(inverse.reshape(-1)).to(table.device)
        features = torch.cat([table[unique_forward], table[unique_backward]], dim=1)
        bias = self.proj_e(features)[inverse]
        n = distances.shape[0]
        return bias.view(n, n, self.heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, hid = x.shape
        head_dim = hid // self.heads
        q, k, v = self.to_qkv(x).view(n, 3, self.heads, head_dim).permute(1, 2, 0, 3)
        scores = q @ k.transpose(1, 2) * head_dim**-0.5 + bias
        out = scores.softmax(dim=-1) @ v
        return self.to_out(out.permute(1, 0, 2).reshape(n, hid))


class _FeedForward(nn.Module):
    def __init__(self, hid: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hid, 4 * hid), nn.GELU(), nn.Identity(), nn.Linear(4 * hid, hid), nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GraphormerLayer(nn.Module):
    """``X += Attn(LN1(X), bias)``, then ``X += FF(LN2(X))`` (hidden ``4·hid``, exact GELU)."""

    def __init__(self, hid: int, heads: int, first: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hid)
        self.attn = _Attention(hid, heads, edge_bias=first)
        self.ln2 = nn.LayerNorm(hid)
        self.ff = _FeedForward(hid)
        if first:
            self.centrality_embed_in = nn.Embedding(MAX_DEGREE + 1, hid)
            self.centrality_embed_out = nn.Embedding(MAX_DEGREE + 1, hid)
            self.input_dist_embed = nn.Embedding(MAX_INPUT_DISTANCE + 1, hid)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), bias)
        return x + self.ff(self.ln2(x))


class Graphormer(nn.ModuleList):
    """The layer stack, stored as ``gnn.{l}`` like the original code."""

    def __init__(self, hid: int, layers: int, heads: int) -> None:
        super().__init__([GraphormerLayer(hid, heads, first=index == 0) for index in range(layers)])

    def forward(self, x: torch.Tensor, adjacency: np.ndarray) -> torch.Tensor:
        """Update node states ``x`` ``[N, hid]`` with distance matrix ``adjacency`` (node 0 = input).

        Structural embeddings: ``deg_in(v) = #{u: A[u,v] = 1}`` and ``deg_out(v) = #{w: A[v,w] =
        1}`` clipped to 100, ``dist(v) = A[0, v]`` clipped to 1000 (0 when unreachable within the
        cutoff).
        """
        first = self[0]
        distances = torch.as_tensor(adjacency, dtype=torch.long, device=x.device)
        real = distances == 1
        degree_in = real.sum(dim=0).clamp(max=MAX_DEGREE)
        degree_out = real.sum(dim=1).clamp(max=MAX_DEGREE)
        input_distance = distances[0].clamp(min=0, max=MAX_INPUT_DISTANCE)
        x = (
            x
            + first.centrality_embed_in(degree_in)
            + first.centrality_embed_out(degree_out)
            + first.input_dist_embed(input_distance)
        )

        bias = first.attn.edge_bias(adjacency)
        for layer in self:
            x = layer(x, bias)
        return x
