"""Placement of parameters that the original GHN-2 and GHN-3 graph rules skip.

The original builders place only the parameters of convolutions, linear layers, BatchNorm,
LayerNorm and a few attention and embedding modules. A timm model has many more kinds, and each of
them is mapped here onto the GHN vocabulary by what it does in the forward pass:

=================  =============================================  ==========  ===================
kind               examples                                       node type   decoded as
=================  =============================================  ==========  ===================
normalization      ``GroupNorm``, ``RmsNorm``, ``EvoNorm2dS0``,   ``ln``      norm weight, with
                   ``FilterResponseNormTlu2d``, ``SimpleNorm2d``,             its bias from the
                   ``GlobalResponseNorm`` (``weight``/``bias``)               same node
channel scale      layer scale ``gamma``/``gamma_1``/``ls1``,     ``cse``     1-D weight
                   ``Scale``, ``temperature``, ``logit_scale``,               ``2·sigmoid(p/2)``
                   ``skipinit_gain``, ``alpha``, EvoNorm ``v``
channel shift      ``q_bias``/``v_bias``, ``mlp_bias``, ``beta``,  ``bias``    1-D bias
                   FRN ``tau``, ``Conv1d``/``ConvTranspose2d``                ``tanh(p/5)``
                   bias
learned embedding  ``pos_embed``, ``cls_token``, ``reg_token``,   ``pos_enc`` ``[1, C, h, w]``
                   ``dist_token``, ``latent``, relative position              position map
                   tables and ``attention_biases``
convolution        ``Conv1d``, ``Conv3d``, ``ConvTranspose2d``,   ``conv``    4-D kernel
                   ``CondConv2d`` experts, weight matrices ``w_*``,           or matrix
                   ``nn.LSTM``/``nn.GRU`` weights
=================  =============================================  ==========  ===================

Why these node types: ``cse`` is the vocabulary's channel-wise product (squeeze-excitation) and a
learned scale is a channel-wise product with a constant. A shift is a bias. Absolute and
relative position tables and tokens are learned vectors added to (or prepended to) the token
sequence, which is what ``pos_enc`` stands for in DeepNets-1M. A 1-D or 3-D convolution is a 2-D
convolution with one kernel side of 1 or with the depth merged into the input channels.

Shapes: a scale or shift of any shape with at most one dimension larger than 1 is decoded as a
vector of its number of elements and reshaped back. An embedding is decoded as a ppuda-style
position map ``[1, C, h, w]`` where ``C`` is its feature dimension and the positions lie on an
``h x w`` grid. The grid is the table's own when it has one, else the largest square that fits.
Rows beyond that square are class-token entries and are set to zero, because the token's own
vector already carries what a learned position adds. They lead in a position embedding and trail
in a relative position table, whose last 3 rows are the class-token entries in timm's BEiT and
``RelPosBias`` (``gen_relative_position_index``, timm 1.0). GHN-2's output scaling applies to the map
as to any 4-D tensor. A map with ``h >= 11`` keeps the decoder's raw values, which is ppuda's
rule for its positional encodings (std about 0.3 with the bundled GHN). A smaller map is
multiplied by ``sqrt(β / (C·h·w))``. The transposed-convolution kernel
``[C_in, C_out, kh, kw]`` is decoded as the convolution kernel of its adjoint
``[C_out, C_in, kh, kw]``.

Recurrent layers (``nn.LSTM``, ``nn.GRU``) are traced through a stand-in that reads each weight
once (:mod:`timm_ghn.trace`); their input and hidden matrices are linear weights (``conv``) and
their biases are biases.

Kinds deliberately left at the model's own initialization (listed as unplaced): rotary-embedding
frequencies (RoPE-Mixed learns them from the RoPE spectrum, a log-spaced set of angles that no
node type or output rule describes) and the differential-attention
``lambda_*`` vectors (their dot products enter an ``exp``, so a predicted scale near 1
overflows). Parameters with no elements are unplaced too, because there is nothing to predict.
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
from torch import nn

__all__ = ["Placement", "extended_placement", "is_norm_like", "to_decoded", "from_decoded"]

_EMBEDDING_NAME = re.compile(r"pos|token|latent|rel|embed|table|biases")
_AXIS_TABLE_NAME = re.compile(r"(^|_)(h|w|height|width)(_|$)")
_RELATIVE_TABLE_NAME = re.compile(r"relative_position")
_SHIFT_NAME = re.compile(r"bias|beta|shift|tau")
_SCALE_NAME = re.compile(r"gamma|scale|alpha|^ls\d|temperature|gain|^weights$|^v$")
_EXCLUDED_NAME = re.compile(r"^lambda_|freqs")
_NORM_CLASS = re.compile(r"norm", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Node type, decoded shape and layout of one parameter that the original rules skip.

    ``primitive`` is the node type, ``decoded_shape`` the shape given to the shape encoder and the
    decoder, and ``layout`` names the map between the decoded tensor and the parameter:
    ``reshape``, ``transposed`` (dims 0 and 1 swapped) or ``embedding`` (see :func:`from_decoded`). ``is_weight`` selects the 1-D rule: a scale (``True``) or a bias.
    ``prefix_rows`` and ``suffix_rows`` are the class-token rows of an embedding before and after
    its grid.
    """

    primitive: str
    decoded_shape: tuple[int, ...]
    layout: str
    is_weight: bool = True
    prefix_rows: int = 0
    channels_first: bool = False
    suffix_rows: int = 0


def is_norm_like(module: nn.Module) -> bool:
    """True for a module named like a norm whose weight is a per-channel vector.

    The weight may carry unit dims (``[1, 1, 1, C]``) but at most one dim larger than 1.
    """
    weight = getattr(module, "weight", None)
    if not _NORM_CLASS.search(type(module).__name__) or not isinstance(weight, torch.Tensor):
        return False
    return weight.dim() >= 1 and sum(1 for size in weight.shape if size > 1) <= 1


def _conv_primitive(module: nn.Module) -> str:
    if getattr(module, "groups", 1) > 1:
        dilation = getattr(module, "dilation", (1,))
        dilation = dilation if isinstance(dilation, (tuple, list)) else (dilation,)
        return "dil_conv" if min(dilation) > 1 else "sep_conv"
    return "conv"


def _vector(shape: tuple[int, ...], is_weight: bool, primitive: str) -> Placement:
    return Placement(primitive, (max(1, math.prod(shape)),), "reshape", is_weight=is_weight)


def _is_channels_first(dims: list[int]) -> bool:
    """Tell ``[C, h, w]`` from ``[h, w, C]`` by the square grid, else by the channels being the larger end."""
    if dims[1] == dims[2] and dims[0] != dims[1]:
        return True
    if dims[0] == dims[1]:
        return False
    # NOTE: a guess for a non-square grid (PiT at a non-square image size): it assumes more channels
    # than grid rows, as in timm's position maps, and is wrong for a table with fewer.
    return dims[0] > dims[2]


def _embedding(local: str, shape: tuple[int, ...]) -> Placement:
    """Lay an embedding table out as a ``[1, C, h, w]`` position map."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims = dims[1:]
    channels_first = local == "attention_biases" or (len(dims) == 3 and _is_channels_first(dims))
    if len(dims) <= 1:
        # A vector, or a 0-D scalar, is one position with that many channels.
        channels, positions, grid = math.prod(dims), 1, (1, 1)
    elif channels_first:
        channels, positions = dims[0], math.prod(dims[1:])
        grid = (dims[1], dims[2]) if len(dims) == 3 else None
    else:
        channels, positions = dims[-1], math.prod(dims[:-1])
        grid = (dims[0], dims[1]) if len(dims) == 3 else None

    prefix = suffix = 0
    if grid is None:
        side = math.isqrt(positions)
        if _AXIS_TABLE_NAME.search(local) or positions - side * side > side:
            grid = (1, positions)
        elif _RELATIVE_TABLE_NAME.search(local):
            grid, suffix = (side, side), positions - side * side
        else:
            grid, prefix = (side, side), positions - side * side
    return Placement(
        "pos_enc", (1, channels, *grid), "embedding", prefix_rows=prefix, channels_first=channels_first, suffix_rows=suffix
    )


def extended_placement(module: nn.Module, local: str, shape: tuple[int, ...]) -> Placement | None:
    """Return the placement of parameter ``local`` of ``module``, or None to leave it unplaced.

    Called only for parameters the original rules skip; see the module docstring for the table.
    """
    shape = tuple(int(s) for s in shape)
    if _EXCLUDED_NAME.search(local) or 0 in shape:
        # A parameter with no elements has nothing to predict, and its decoded block has none either.
        return None
    if isinstance(module, nn.RNNBase):
        # Input and hidden weights are the matrices of linear layers, one per gate stacked on dim 0.
        if local.startswith("weight_") and len(shape) == 2:
            return Placement("conv", shape, "reshape")
        return _vector(shape, False, "bias") if local.startswith("bias_") else None

    is_bias = local == "bias"
    if isinstance(module, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d)) or hasattr(module, "weight_shape"):
        if is_bias:
            return _vector(shape, False, "bias")
        if local != "weight":
            return None
        if isinstance(module, nn.Conv1d):
            return Placement(_conv_primitive(module), (shape[0], shape[1], shape[2], 1), "reshape")
        if isinstance(module, nn.Conv3d):
            return Placement(_conv_primitive(module), (shape[0], shape[1] * shape[2], shape[3], shape[4]), "reshape")
        if isinstance(module, nn.ConvTranspose2d):
            return Placement(_conv_primitive(module), (shape[1], shape[0], shape[2], shape[3]), "transposed")
        kernel = tuple(int(s) for s in module.weight_shape)  # CondConv2d: one flattened kernel per expert
        if len(shape) != 2 or shape[1] != math.prod(kernel):
            return None
        return Placement(_conv_primitive(module), (shape[0] * kernel[0], *kernel[1:]), "reshape")

    if is_norm_like(module) and local in ("weight", "bias"):
        return _vector(shape, local == "weight", "ln")
    if _EMBEDDING_NAME.search(local) and not local.endswith(("q_bias", "v_bias", "k_bias", "mlp_bias")):
        return _embedding(local, shape)

    non_unit = sum(1 for s in shape if s > 1)
    if local == "weight" and non_unit > 1:
        # The weight matrix or kernel of a linear or convolution layer that timm implements itself.
        return Placement(_conv_primitive(module), shape, "reshape") if len(shape) in (2, 4) else None
    if _SHIFT_NAME.search(local) and non_unit <= 1:
        return _vector(shape, False, "bias")
    if _SCALE_NAME.search(local) or (non_unit <= 1 and not local.startswith("w_")):
        return _vector(shape, True, "cse")
    if local.startswith("w_") and len(shape) == 2:
        # A weight matrix applied as ``x @ w`` is stored ``[in, out]``.
        return Placement("conv", (shape[1], shape[0]), "transposed")
    return None


def to_decoded(tensor: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Return ``tensor`` in the decoded layout (the inverse of :func:`from_decoded`, class-token rows dropped)."""
    layout = placement.layout
    if layout == "reshape":
        return tensor.reshape(placement.decoded_shape)
    if layout == "transposed":
        return tensor.transpose(0, 1)
    channels, height, width = placement.decoded_shape[1:]
    if placement.channels_first:
        table = tensor.reshape(channels, -1)
    else:
        table = tensor.reshape(-1, channels).t()
    grid_rows = table[:, placement.prefix_rows : table.shape[1] - placement.suffix_rows]
    return grid_rows.reshape(1, channels, height, width)


def from_decoded(decoded: torch.Tensor, placement: Placement, shape: tuple[int, ...]) -> torch.Tensor:
    """Map a tensor of ``placement.decoded_shape`` to the parameter's ``shape``.

    Embeddings: the ``[1, C, h, w]`` map becomes ``C`` channels by ``h·w`` positions, in the
    table's channel order, between ``prefix_rows`` and ``suffix_rows`` zero rows.
    """
    layout = placement.layout
    if layout == "reshape":
        return decoded.reshape(shape)
    if layout == "transposed":
        return decoded.transpose(0, 1).reshape(shape)
    channels = placement.decoded_shape[1]
    table = decoded.reshape(channels, -1)
    if placement.prefix_rows or placement.suffix_rows:
        prefix = table.new_zeros(channels, placement.prefix_rows)
        suffix = table.new_zeros(channels, placement.suffix_rows)
        table = torch.cat([prefix, table, suffix], dim=1)
    if not placement.channels_first:
        table = table.t()
    return table.reshape(shape)
