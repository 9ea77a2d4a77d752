"""Decoders from node embeddings to parameter blocks (ppuda's ``ConvDecoder`` and 1-D decoder)."""

from __future__ import annotations

import math

import torch
from torch import nn

from timm_ghn.hypernet.gatedgnn import MLP

__all__ = ["ConvDecoder"]


class ConvDecoder(nn.Module):
    """Decode an embedding ``z`` into a ``[K0, K1, kh, kw]`` weight block (GHN-1/GHN-2).

    1. ``F = ReLU(W_fc z + b_fc)``, viewed as ``[4d, S, S]``.
    2. Crop the top-left ``min(S, kh) x min(S, kw)`` window.
    3. At each position, ``G = W_c2 ReLU(W_c0 F + b_c0) + b_c2`` with ``K0 * K1`` outputs, output
       index ``o * K1 + i``.
    4. Keep ``[:min(K0, k0), :min(K1, k1)]``; only those outputs are computed.
    5. Classifier: keep all ``K0`` rows, take position ``(0, 0)`` and map
       ``W_cls[c, i] = b_cls[c] + Σ_o Wp[c, o] ReLU(G[o, i])``, giving ``[C, min(K1, k1)]``.

    A kernel larger than ``S`` is tiled from the ``S x S`` block (ppuda tiles 2 x 2 for square
    kernels up to ``2S`` and fails otherwise).
    """

    def __init__(self, hid: int, max_shape: tuple[int, int, int, int], num_classes: int) -> None:
        super().__init__()
        self.max_shape = max_shape
        k0, k1, spatial, _ = max_shape
        self.fc = nn.Sequential(nn.Linear(hid, 4 * hid * spatial * spatial), nn.ReLU())
        self.conv = nn.Sequential(
            nn.Conv2d(4 * hid, 8 * hid, 1),
            nn.ReLU(),
            nn.Conv2d(8 * hid, k0 * k1, 1),
        )
        self.class_layer_predictor = nn.Sequential(nn.ReLU(), nn.Conv2d(k0, num_classes, 1))

    def forward(self, z: torch.Tensor, key: tuple[int, int, int, int], classifier: bool = False) -> torch.Tensor:
        """Decode ``z`` ``[B, d]`` for group key ``(k0, k1, kh, kw)``.

        Returns ``[B, min(K0,k0), min(K1,k1), kh', kw']``, or ``[B, C, min(K1,k1)]`` for the classifier.
        """
        big_out, big_in, spatial, _ = self.max_shape
        k0, k1, kh, kw = key
        batch = z.shape[0]
        height, width = min(spatial, kh), min(spatial, kw)

        features = self.fc(z).view(batch, -1, spatial, spatial)[:, :, :height, :width]
        hidden = self.conv[1](self.conv[0](features))

        n_out = big_out if classifier else min(big_out, k0)
        n_in = min(big_in, k1)
        rows = (torch.arange(n_out, device=z.device)[:, None] * big_in + torch.arange(n_in, device=z.device)).flatten()
        weight = self.conv[2].weight[rows, :, 0, 0]
        bias = self.conv[2].bias[rows]
        block = torch.einsum("oc,bchw->bohw", weight, hidden) + bias[None, :, None, None]
        block = block.view(batch, n_out, n_in, height, width)

        if classifier:
            predictor = self.class_layer_predictor[1]
            activated = torch.relu(block[:, :, :, 0, 0])
            return torch.einsum("co,boi->bci", predictor.weight[:, :, 0, 0], activated) + predictor.bias[None, :, None]

        if kh > height or kw > width:
            block = block.repeat(1, 1, 1, math.ceil(kh / height), math.ceil(kw / width))[..., :kh, :kw]
        return block


def make_decoder_1d(hid: int, max_channels: int) -> MLP:
    """``Linear(d, 2d), ReLU, Linear(2d, 2 * max_ch)``: row 0 for norm weights, row 1 for biases."""
    return MLP(hid, 2 * hid, 2 * max_channels, last_activation=False)
