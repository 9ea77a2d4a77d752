"""Configuration of a GHN-2 network, as stored in ppuda checkpoints."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from timm_ghn.errors import CheckpointError

__all__ = ["GHNConfig", "GHN3Config", "infer_ghn3_config"]


@dataclasses.dataclass(frozen=True)
class GHNConfig:
    """Constructor arguments of a GHN-1/GHN-2 network (the ``config`` dict of a ppuda checkpoint).

    Attributes:
        max_shape: ``(K0, K1, S, S)``, the largest block the decoder produces: output channels,
            input channels and kernel size. Larger tensors are tiled from it.
        num_classes: rows of the predicted classifier.
        hypernet: message passing, ``gatedgnn`` (GHN-1/2) or ``mlp`` (per-node MLP baseline).
        decoder: parameter decoder; only ``conv`` (every released file) is implemented.
        weight_norm: rescale predicted tensors by their fan-in (GHN-2) or not (GHN-1).
        ve: virtual edges up to distance 50 (GHN-2) or real edges only (GHN-1).
        layernorm: LayerNorm on node embeddings before decoding.
        hid: node embedding width ``d``.
    """

    max_shape: tuple[int, int, int, int] = (64, 64, 16, 16)
    num_classes: int = 1000
    hypernet: str = "gatedgnn"
    decoder: str = "conv"
    weight_norm: bool = True
    ve: bool = True
    layernorm: bool = True
    hid: int = 32

    def __post_init__(self) -> None:
        if len(self.max_shape) != 4 or self.max_shape[2] != self.max_shape[3]:
            raise CheckpointError(f"invalid GHN config: max_shape must be (K0, K1, S, S), got {self.max_shape}")
        if self.hypernet not in ("gatedgnn", "mlp"):
            raise CheckpointError(f"invalid GHN config: hypernet must be 'gatedgnn' or 'mlp', got {self.hypernet!r}")
        if self.decoder != "conv":
            # NOTE: ppuda's 'mlp' decoder exists in its code but no released checkpoint uses it.
            raise CheckpointError(f"unsupported GHN config: decoder {self.decoder!r}; only 'conv' is implemented")
        if self.hid % 4 != 0 or self.hid <= 0:
            raise CheckpointError(f"invalid GHN config: hid must be a positive multiple of 4, got {self.hid}")

    @property
    def max_channels(self) -> int:
        return max(self.max_shape[0], self.max_shape[1])

    @property
    def graph_style(self) -> str:
        """Rules of the graph builder this GHN was trained with (see :func:`timm_ghn.graph.build_graph`)."""
        return "ghn2"

    @property
    def ve_cutoff(self) -> int:
        """Maximum shortest-path distance stored as a virtual edge."""
        return 50 if self.ve else 1

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "GHNConfig":
        """Build a config from a ppuda ``config`` dict; unknown keys are rejected by name."""
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise CheckpointError(f"invalid GHN config: unknown keys {unknown}; expected a subset of {sorted(fields)}")
        kwargs = dict(values)
        if "max_shape" in kwargs:
            kwargs["max_shape"] = tuple(int(v) for v in kwargs["max_shape"])
        for key in ("num_classes", "hid"):
            if key in kwargs:
                kwargs[key] = int(kwargs[key])
        for key in ("weight_norm", "ve", "layernorm"):
            if key in kwargs:
                kwargs[key] = bool(kwargs[key])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["max_shape"] = list(self.max_shape)
        return values


@dataclasses.dataclass(frozen=True)
class GHN3Config(GHNConfig):
    """Configuration of a GHN-3 (Graphormer message passing), ``ghn3`` project.

    Released files store no config; :func:`infer_ghn3_config` derives it from tensor shapes.

    Attributes:
        layers: Graphormer layers ``L``.
        heads: attention heads ``H``; ``hid`` must be divisible by it.
    """

    max_shape: tuple[int, int, int, int] = (64, 64, 16, 16)
    hid: int = 64
    layers: int = 3
    heads: int = 8

    @property
    def graph_style(self) -> str:
        return "ghn3"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers < 1 or self.heads < 1 or self.hid % self.heads != 0:
            raise CheckpointError(
                f"invalid GHN-3 config: need layers >= 1 and hid divisible by heads, got "
                f"layers={self.layers}, hid={self.hid}, heads={self.heads}"
            )


def infer_ghn3_config(shapes: Mapping[str, tuple[int, ...]]) -> GHN3Config:
    """Derive a GHN-3 config from the tensor shapes of a released (config-less) state dict.

    Rules of the original loader: ``hid`` is the width of ``embed.weight``; ``layers`` counts the
    ``gnn.*.ln1.weight`` keys; ``heads`` is 16 if ``hid > 64`` else 8; ``max_shape`` is
    ``(m, m, S, S)`` with ``m = sqrt(rows of decoder.conv.2.weight)`` and ``S = 11`` if the spatial
    table has 9 rows, else 16; ``num_classes`` is the rows of the class predictor; ``layernorm``
    is the presence of ``ln.weight``; ``weight_norm`` and ``ve`` are always on.
    """
    required = ["embed.weight", "decoder.conv.2.weight", "shape_enc.embed_spatial.weight"]
    missing = [key for key in required if key not in shapes]
    if missing:
        raise CheckpointError(f"not a GHN-3 state dict: missing tensors {missing}")
    hid = int(shapes["embed.weight"][-1])
    layers = sum(1 for key in shapes if key.startswith("gnn.") and key.endswith("ln1.weight"))
    side = math.isqrt(int(shapes["decoder.conv.2.weight"][0]))
    spatial = 11 if int(shapes["shape_enc.embed_spatial.weight"][0]) == 9 else 16
    classifier = [key for key in shapes if "class_layer_predictor" in key]
    num_classes = int(shapes[classifier[0]][0]) if classifier else 10
    return GHN3Config(
        max_shape=(side, side, spatial, spatial),
        num_classes=num_classes,
        weight_norm=True,
        ve=True,
        layernorm="ln.weight" in shapes,
        hid=hid,
        layers=layers,
        heads=16 if hid > 64 else 8,
    )
