"""The GHN-1/GHN-2 network: node embeddings, message passing and decoding of parameter blocks."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from timm_ghn.hypernet.config import GHN3Config, GHNConfig
from timm_ghn.hypernet.decoder import ConvDecoder, ConvDecoder3, make_decoder_1d
from timm_ghn.hypernet.gatedgnn import MLP, GatedGNN
from timm_ghn.hypernet.graphormer import Graphormer
from timm_ghn.hypernet.shape_encoder import ShapeEncoder
from timm_ghn.graph import PRIMITIVES, Graph, group_key

__all__ = ["GHN2", "GHN3", "NodeEmbeddings"]


@dataclasses.dataclass
class NodeEmbeddings:
    """Intermediate node states of one forward pass, ``[N, hid]`` each, for debugging."""

    shape_indices: torch.Tensor
    initial: torch.Tensor
    after_gnn: torch.Tensor
    final: torch.Tensor


class GHN2(nn.Module):
    """Graph HyperNetwork of ppuda (GHN-1, GHN-2 and the MLP baseline).

    Module names and shapes equal ppuda's ``GHN``, so its checkpoints load with a strict
    ``load_state_dict``. ``forward`` returns the raw decoded block of every parameter node; fitting
    blocks to parameter shapes is done by :mod:`timm_ghn.predict`.
    """

    def __init__(self, config: GHNConfig) -> None:
        super().__init__()
        self.config = config
        hid = config.hid
        if config.layernorm:
            self.ln = nn.LayerNorm(hid)
        self.embed = nn.Embedding(len(PRIMITIVES), hid)
        self.shape_enc = ShapeEncoder(hid, config.num_classes, config.max_shape[2])
        self.gnn = self._make_message_passing(config)
        self.decoder = self._make_decoder(config)
        self.decoder_1d = make_decoder_1d(hid, config.max_channels)
        self.bias_class = nn.Sequential(nn.ReLU(), nn.Linear(config.max_channels, config.num_classes))

    def _make_message_passing(self, config: GHNConfig) -> nn.Module:
        if config.hypernet == "gatedgnn":
            return GatedGNN(config.hid, config.ve)
        return MLP(config.hid, config.hid, config.hid)

    def _make_decoder(self, config: GHNConfig) -> nn.Module:
        return ConvDecoder(config.hid, config.max_shape, config.num_classes)

    def embed_nodes(self, graph: Graph) -> NodeEmbeddings:
        """Compute the node embeddings that the decoders read."""
        device = self.embed.weight.device
        indices = self.shape_enc.indices([node.shape for node in graph.nodes]).to(device)
        types = graph.node_types.to(device)
        initial = self.embed(types) + self.shape_enc(indices)
        if isinstance(self.gnn, (GatedGNN, Graphormer)):
            after_gnn = self.gnn(initial, graph.adjacency)
        else:
            after_gnn = self.gnn(initial)
        final = self.ln(after_gnn) if self.config.layernorm else after_gnn
        return NodeEmbeddings(indices, initial, after_gnn, final)

    def decode(self, embeddings: torch.Tensor, key: Sequence[int]) -> torch.Tensor:
        """Decode embeddings ``[B, hid]`` of one group with group ``key`` (see :func:`group_key`).

        Shapes returned per node, by key:

        * 4-D ``(k0, k1, kh, kw)``: ``[min(K0,k0), min(K1,k1), kh, kw]``;
        * classifier weight ``(k0, k1)``: ``[C, min(K1,k1)]``;
        * 1-D ``(k0, 0)``: ``[2, max_ch]``, row 0 for norm weights and row 1 for biases;
        * classifier bias ``(k0, -1)``: ``[2, C]``, of which row 1 is used;
        * 3-D: ``[2 * max_ch, 1, 1]``.
        """
        key = tuple(int(k) for k in key)
        if len(key) == 4:
            return self.decoder(embeddings, key)
        if len(key) == 2 and key[1] > 0:
            return self.decoder(embeddings, (key[0], key[1], 1, 1), classifier=True)
        rows = self.decoder_1d(embeddings)
        if len(key) == 3:
            return rows.view(rows.shape[0], -1, 1, 1)
        rows = rows.view(rows.shape[0], 2, -1)
        if key[1] == -1:
            return self.bias_class(rows)
        return rows

    def group_key(self, shape: Sequence[int], last_weight: bool = False, last_bias: bool = False) -> tuple[int, ...]:
        return group_key(shape, self.config.max_shape, last_weight, last_bias)


class GHN3(GHN2):
    """GHN-3 (``ghn3`` project): GHN-2's embeddings and decoders with Graphormer message passing.

    Differences from GHN-2: the node states pass through ``layers`` Graphormer layers
    (:mod:`timm_ghn.hypernet.graphormer`) and the decoder is :class:`ConvDecoder3` (linear
    layers, centred crop, bilinear resizing). Module names equal the original ``GHN3``.
    """

    config: GHN3Config

    def _make_message_passing(self, config: GHNConfig) -> nn.Module:
        assert isinstance(config, GHN3Config)
        return Graphormer(config.hid, config.layers, config.heads)

    def _make_decoder(self, config: GHNConfig) -> nn.Module:
        return ConvDecoder3(config.hid, config.max_shape, config.num_classes)
