"""Decoders from node embeddings to parameter blocks (ppuda's ``ConvDecoder`` and 1-D decoder)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from timm_ghn.hypernet.gatedgnn import MLP

__all__ = ["ConvDecoder", "ConvDecoder3", "make_decoder_1d"]


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

    centred = False

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

    def _window(self, size: int) -> slice:
        """Rows (or columns) of the ``S x S`` feature grid used for a kernel side of ``size``: top-left."""
        return slice(0, min(self.max_shape[2], size))

    def _hidden(self, features: torch.Tensor) -> torch.Tensor:
        """``ReLU(W_c0 F + b_c0)`` at every position of ``features`` ``[B, 4d, h, w]``."""
        return self.conv[1](self.conv[0](features))

    def _output_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_c2 [K0*K1, 8d], b_c2 [K0*K1])``."""
        return self.conv[2].weight.flatten(1), self.conv[2].bias

    def _class_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Wp [C, K0], b [C])`` of the classifier predictor."""
        predictor = self.class_layer_predictor[1]
        return predictor.weight.flatten(1), predictor.bias

    def _resize(self, block: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
        """Enlarge the spatial dims of ``block`` ``[B, o, i, h, w]`` to ``kh x kw`` by tiling."""
        height, width = block.shape[-2:]
        return block.repeat(1, 1, 1, math.ceil(kh / height), math.ceil(kw / width))[..., :kh, :kw]

    def forward(self, z: torch.Tensor, key: tuple[int, int, int, int], classifier: bool = False) -> torch.Tensor:
        """Decode ``z`` ``[B, d]`` for group key ``(k0, k1, kh, kw)``.

        Returns ``[B, min(K0,k0), min(K1,k1), kh, kw]``, or ``[B, C, min(K1,k1)]`` for the classifier.
        """
        big_out, big_in, spatial, _ = self.max_shape
        k0, k1, kh, kw = key
        batch = z.shape[0]

        features = self.fc(z).view(batch, -1, spatial, spatial)[:, :, self._window(kh), self._window(kw)]
        height, width = features.shape[-2:]
        hidden = self._hidden(features)

        n_out = big_out if classifier else min(big_out, k0)
        n_in = min(big_in, k1)
        rows = (torch.arange(n_out, device=z.device)[:, None] * big_in + torch.arange(n_in, device=z.device)).flatten()
        weight, bias = self._output_layer()
        block = torch.einsum("oc,bchw->bohw", weight[rows], hidden) + bias[rows][None, :, None, None]
        block = block.view(batch, n_out, n_in, height, width)

        if classifier:
            centre = width // 2 if self.centred else 0
            activated = torch.relu(block[:, :, :, centre, centre])
            predictor_weight, predictor_bias = self._class_layer()
            return torch.einsum("co,boi->bci", predictor_weight, activated) + predictor_bias[None, :, None]

        if kh > height or kw > width:
            block = self._resize(block, kh, kw)
        return block


class ConvDecoder3(ConvDecoder):
    """GHN-3's decoder: the same computation with linear layers, a centred crop and bilinear resizing.

    The ``S x S`` window is centred (rows ``c - kh//2 … c + ceil(kh/2) - 1`` with ``c = S // 2``,
    clipped to the grid), the classifier reads the centre position, and kernels larger than ``S``
    are resized bilinearly (``align_corners=False``) instead of tiled.
    """

    centred = True

    def __init__(self, hid: int, max_shape: tuple[int, int, int, int], num_classes: int) -> None:
        nn.Module.__init__(self)
        self.max_shape = max_shape
        k0, k1, spatial, _ = max_shape
        self.fc = nn.Sequential(nn.Linear(hid, 4 * hid * spatial * spatial), nn.ReLU())
        self.conv = nn.Sequential(nn.Linear(4 * hid, 8 * hid), nn.ReLU(), nn.Linear(8 * hid, k0 * k1))
        self.class_layer_predictor = nn.Sequential(nn.ReLU(), nn.Linear(k0, num_classes))

    def _window(self, size: int) -> slice:
        spatial = self.max_shape[2]
        centre = spatial // 2
        return slice(max(0, centre - size // 2), min(spatial, centre + math.ceil(size / 2)))

    def _hidden(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.conv[1](self.conv[0](features.permute(0, 2, 3, 1)))
        return hidden.permute(0, 3, 1, 2)

    def _output_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv[2].weight, self.conv[2].bias

    def _resize(self, block: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
        batch, n_out, n_in, height, width = block.shape
        flat = block.reshape(batch, n_out * n_in, height, width)
        resized = F.interpolate(flat, size=(kh, kw), mode="bilinear", align_corners=False)
        return resized.view(batch, n_out, n_in, kh, kw)


def make_decoder_1d(hid: int, max_channels: int) -> MLP:
    """``Linear(d, 2d), ReLU, Linear(2d, 2 * max_ch)``: row 0 for norm weights, row 1 for biases."""
    return MLP(hid, 2 * hid, 2 * max_channels, last_activation=False)
