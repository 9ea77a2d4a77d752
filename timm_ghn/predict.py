"""Predict a model's parameters with a GHN and write them into the model in place.

For every parameter node of the model's graph the GHN decodes a block (at most ``max_shape``),
which is fitted to the parameter's shape (:func:`fit_block`), rescaled (:func:`normalize_block`)
and copied into the parameter. Buffers, such as BatchNorm running statistics, are never written.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from timm_ghn.hypernet.checkpoint import LoadedGHN
from timm_ghn.hypernet.network import GHN2, NodeEmbeddings
from timm_ghn.graph import Graph, GraphNode, build_graph
from timm_ghn.placement import Placement, from_decoded

__all__ = ["PredictionResult", "fit_block", "normalize_block", "predict_parameters", "predict_tensors", "decoded_blocks", "write_block_"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PredictionResult:
    """Outcome of a prediction: parameters set, parameters left at the model's own init, timings (s)."""

    predicted: list[str]
    unpredicted: list[str]
    num_params_predicted: int
    num_params_total: int
    classifier_predicted: bool
    graph: Graph
    embeddings: NodeEmbeddings | None
    graph_seconds: float
    ghn_seconds: float

    @property
    def fraction_predicted(self) -> float:
        """Fraction of the model's parameter elements set by the GHN (1.0 for an empty model)."""
        return self.num_params_predicted / self.num_params_total if self.num_params_total else 1.0

    def summary(self) -> str:
        tensors_total = len(self.predicted) + len(self.unpredicted)
        return (
            f"predicted {len(self.predicted)}/{tensors_total} tensors, "
            f"{self.num_params_predicted:,}/{self.num_params_total:,} parameters "
            f"({100 * self.fraction_predicted:.2f}%)"
        )


def _slice_block(block: torch.Tensor, target: tuple[int, ...]) -> torch.Tensor:
    """Cut ``block`` to at most ``target`` in every dim (step 1 of :func:`fit_block` plus the chop).

    Raises:
        ValueError: the block has a different number of dims than the target after slicing.
    """
    w = block
    if len(target) == 1 and w.dim() >= 2:
        w = w[(slice(0, target[0]),) + (0,) * (w.dim() - 1)]
    elif len(target) == 2 and w.dim() == 4:
        w = w[: target[0], : target[1], 0, 0]
    elif len(target) == 3 and w.dim() == 4:
        w = w[: target[0], : target[1], : target[2], 0]
    elif len(target) == 4 and w.dim() == 2 and target[2:] == (1, 1):
        # A classifier that is a 1x1 convolution (DLA, DPN) receives the classifier matrix.
        w = w[: target[0], : target[1], None, None]
    if w.dim() != len(target):
        raise ValueError(f"cannot fit a block of shape {tuple(block.shape)} to {target}")
    return w[tuple(slice(0, t) for t in target)]


def fit_block(block: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
    """Slice and tile a decoded block to the ``target`` shape (ppuda's ``_tile_params``).

    1. Slice: a 1-D target takes ``block[:t0, 0, ...]`` of a multi-dim block; a 2-D target the
       ``[:t0, :t1, 0, 0]`` corner of a 4-D block; a 3-D target ``[:t0, :t1, :t2, 0]``; a 4-D
       target the top-left ``[:t0, :t1, :t2, :t3]`` corner, or ``[:t0, :t1]`` with two unit
       dims added when the block is a 2-D classifier matrix and the target a 1x1 convolution.
    2. Tile: repeat along dim 0 while it is shorter than ``t0`` (row ``o`` becomes row
       ``o mod s0``), then likewise along dim 1. Kernel dims are never tiled here.
    3. Chop every dim to the target.

    Raises:
        ValueError: the block cannot be brought to the target shape.
    """
    target = tuple(int(t) for t in target)
    w = _slice_block(block, target)
    for dim in range(min(2, w.dim())):
        if target[dim] > w.shape[dim]:
            repeats = [1] * w.dim()
            repeats[dim] = math.ceil(target[dim] / w.shape[dim])
            w = w.repeat(*repeats)
    w = w[tuple(slice(0, t) for t in target)]
    if tuple(w.shape) != target:
        raise ValueError(f"cannot fit a block of shape {tuple(block.shape)} to {target}")
    return w


def normalize_block(p: torch.Tensor, is_weight: bool) -> torch.Tensor:
    """Rescale a fitted tensor as GHN-2's ``weight_norm`` does.

    * ≥ 2 dims: ``p * sqrt(β / fan_in)`` with ``fan_in = p[0].numel()``, ``β = 1`` for depthwise
      kernels (``p.shape[1] == 1``) and kernels wider than tall, else ``β = 2`` (He scaling).
      Tensors with ``p.shape[0] == 1`` and a third dim of at least 11 (positional encodings) stay.
    * 1-D weights (norm scales): ``2 · sigmoid(p / 2)``, in (0, 2).
    * 1-D biases: ``tanh(p / 5)``, in (−1, 1).
    """
    if p.dim() >= 2:
        if p.dim() > 2 and p.shape[2] >= 11 and p.shape[0] == 1:
            return p
        narrow = p.dim() > 2 and (p.shape[1] == 1 or (p.dim() > 3 and p.shape[2] < p.shape[3]))
        beta = 1.0 if narrow else 2.0
        return p * math.sqrt(beta / p[0].numel())
    if is_weight:
        return 2.0 * torch.sigmoid(0.5 * p)
    return torch.tanh(0.2 * p)


def _normalization(target: Sequence[int], is_weight: bool, block: torch.Tensor) -> torch.Tensor:
    """Apply :func:`normalize_block` for a tensor of shape ``target`` to a block tiled into it.

    The rescaling depends only on the target shape (≥ 2 dims) or is elementwise (1-D), so it
    commutes with tiling and can run on the small block.
    """
    if len(target) >= 2:
        if len(target) > 2 and target[2] >= 11 and target[0] == 1:
            return block
        narrow = len(target) > 2 and (target[1] == 1 or (len(target) > 3 and target[2] < target[3]))
        beta = 1.0 if narrow else 2.0
        return block * math.sqrt(beta / math.prod(target[1:]))
    return normalize_block(block, is_weight)


def write_block_(param: torch.Tensor, block: torch.Tensor, is_weight: bool, weight_norm: bool) -> torch.Tensor:
    """Fit ``block`` to ``param`` as :func:`fit_block` does, rescale it, and copy it in place.

    Equal to ``param.copy_(normalize_block(fit_block(block, param.shape), is_weight))`` but the
    tiled tensor is never materialised: each tile is written by a broadcasting copy into a strided
    view of ``param``.
    """
    target = tuple(param.shape)
    w = _slice_block(block, target)
    if any(w.shape[d] != target[d] for d in range(2, len(target))):
        raise ValueError(f"cannot fit a block of shape {tuple(block.shape)} to {target}")
    if weight_norm:
        w = _normalization(target, is_weight, w)
    w = w.to(device=param.device, dtype=param.dtype)

    rows, cols = w.shape[0], (w.shape[1] if w.dim() > 1 else 1)
    whole_rows = target[0] // rows * rows
    if w.dim() == 1:
        param[:whole_rows].unflatten(0, (-1, rows)).copy_(w)
        param[whole_rows:].copy_(w[: target[0] - whole_rows])
        return param
    whole_cols = target[1] // cols * cols
    row_parts = [(slice(0, whole_rows), w, True), (slice(whole_rows, target[0]), w[: target[0] - whole_rows], False)]
    for row_slice, row_block, repeated_rows in row_parts:
        if row_block.shape[0] == 0:
            continue
        col_parts = [(slice(0, whole_cols), row_block, True), (slice(whole_cols, target[1]), row_block[:, : target[1] - whole_cols], False)]
        for col_slice, piece, repeated_cols in col_parts:
            if piece.shape[1] == 0:
                continue
            region = param[row_slice, col_slice]
            if repeated_cols:
                region = region.unflatten(1, (-1, cols))
                piece = piece.unsqueeze(1)
            if repeated_rows:
                region = region.unflatten(0, (-1, rows))
            region.copy_(piece)
    return param


def _classifier_matches(nodes: list[GraphNode], params: dict[str, nn.Parameter], num_classes: int) -> bool:
    for node in nodes:
        if node.last_weight and node.param_name is not None:
            return params[node.param_name].shape[0] == num_classes
    return True


def decoded_blocks(
    network: GHN2,
    graph: Graph,
    embeddings: torch.Tensor,
    shapes: Mapping[str, tuple[int, ...]],
    predict_classifier: bool = True,
) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """Decode the block of every parameter node, grouped by decoder key.

    Yields ``(parameter name, raw block, is_weight)``; a norm node yields its weight (row 0 of
    the 1-D decoder) and its bias (row 1). Classifier nodes are skipped unless
    ``predict_classifier``. Differentiable: no ``no_grad`` and no in-place writes.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    seen: set[str] = set()
    for index, node in enumerate(graph.nodes):
        # A parameter used by several operations has a node per use; its first use in
        # topological order decodes it.
        if node.param_name is None or node.param_name in seen:
            continue
        seen.add(node.param_name)
        if (node.last_weight or node.last_bias) and not predict_classifier and _is_classifier_key(node, shapes):
            continue
        shape = shapes[node.param_name] if node.placement is None else node.placement.decoded_shape
        key = network.group_key(shape, node.last_weight, node.last_bias)
        groups.setdefault(key, []).append(index)

    for key, members in groups.items():
        blocks = network.decode(embeddings[members], key)
        # A 1-D key decodes two rows: row 0 for a norm weight, row 1 for a bias.
        is_1d = len(key) == 2 and key[1] <= 0
        for block, index in zip(blocks, members):
            node = graph.nodes[index]
            if not is_1d:
                yield node.param_name, block, node.is_weight
            elif node.is_weight:
                yield node.param_name, block[0], True
                if node.bias_name is not None:
                    yield node.bias_name, block[1], False
            else:
                yield node.param_name, block[1], False


def predict_tensors(
    network: GHN2,
    graph: Graph,
    shapes: Mapping[str, tuple[int, ...]],
    predict_classifier: bool = True,
) -> dict[str, torch.Tensor]:
    """Return the predicted tensor of every placed parameter, keeping the autograd graph.

    For GHN training: pass the result to ``torch.func.functional_call`` so that a loss on the
    model's output reaches the GHN's weights. ``shapes`` maps parameter names to shapes.
    """
    embeddings = network.embed_nodes(graph).final
    placements = _placements(graph)
    tensors: dict[str, torch.Tensor] = {}
    for name, raw, is_weight in decoded_blocks(network, graph, embeddings, shapes, predict_classifier):
        tensors[name] = _decoded_tensor(raw, shapes[name], placements.get(name), is_weight, network.config.weight_norm)
    return tensors


def _placements(graph: Graph) -> dict[str, Placement]:
    """Map each parameter (and norm bias) with an extended placement to it."""
    placements: dict[str, Placement] = {}
    for node in graph.nodes:
        if node.placement is not None and node.param_name is not None:
            placements.setdefault(node.param_name, node.placement)
            if node.bias_name is not None:
                placements.setdefault(node.bias_name, dataclasses.replace(node.placement, is_weight=False))
    return placements


def _decoded_tensor(
    raw: torch.Tensor, shape: tuple[int, ...], placement: Placement | None, is_weight: bool, weight_norm: bool
) -> torch.Tensor:
    """Fit and rescale a decoded block to the parameter ``shape``, through its placement if any."""
    target = shape if placement is None else placement.decoded_shape
    value = fit_block(raw, target)
    if weight_norm:
        value = normalize_block(value, is_weight)
    if placement is not None:
        value = from_decoded(value, placement, shape)
    return value


def predict_parameters(
    model: nn.Module,
    ghn: GHN2 | LoadedGHN,
    *,
    predict_classifier: bool | None = None,
    graph: Graph | None = None,
    keep_embeddings: bool = False,
) -> PredictionResult:
    """Predict the parameters of ``model`` with ``ghn`` and copy them into the model in place.

    Args:
        model: the network; its parameters may live on any real device and dtype.
        ghn: the hypernetwork (on CPU or CUDA); see :func:`timm_ghn.hypernet.load_ghn`.
        predict_classifier: write the classifier (the graph's last weight and bias). Default: only
            when its number of outputs equals the GHN's ``num_classes``, because the GHN's classes
            carry no meaning for a new label set; the head then keeps the model's own init.
        graph: a graph built earlier with :func:`timm_ghn.graph.build_graph`.
        keep_embeddings: return the node embeddings for inspection.

    Returns:
        The predicted and unpredicted parameter names, counts and timings. Parameters that the
        graph cannot place keep the model's initialization and are logged as a warning.
    """
    network = ghn.model if isinstance(ghn, LoadedGHN) else ghn
    config = network.config
    params = dict(model.named_parameters())

    start = time.perf_counter()
    if graph is None:
        graph = build_graph(model, ve_cutoff=config.ve_cutoff, style=config.graph_style)
    graph_seconds = time.perf_counter() - start

    if predict_classifier is None:
        predict_classifier = _classifier_matches(graph.nodes, params, config.num_classes)

    start = time.perf_counter()
    predicted: list[str] = []
    failed: list[str] = []
    with torch.no_grad():
        embeddings = network.embed_nodes(graph)
        shapes = {name: tuple(param.shape) for name, param in params.items()}
        placements = _placements(graph)
        for name, raw, is_weight in decoded_blocks(network, graph, embeddings.final, shapes, predict_classifier):
            try:
                if name in placements:
                    # Extended placements are small next to the model: build the tensor, then copy.
                    value = _decoded_tensor(raw, shapes[name], placements[name], is_weight, config.weight_norm)
                    params[name].copy_(value)
                else:
                    write_block_(params[name], raw, is_weight, config.weight_norm)
            except ValueError as error:
                logger.warning("parameter %s keeps its initialization: %s", name, error)
                failed.append(name)
                continue
            predicted.append(name)
    ghn_seconds = time.perf_counter() - start

    predicted_set = set(predicted)
    unpredicted = [name for name in params if name not in predicted_set]
    result = PredictionResult(
        predicted=[name for name in params if name in predicted_set],
        unpredicted=unpredicted,
        num_params_predicted=sum(params[name].numel() for name in predicted_set),
        num_params_total=sum(p.numel() for p in params.values()),
        classifier_predicted=predict_classifier,
        graph=graph,
        embeddings=embeddings if keep_embeddings else None,
        graph_seconds=graph_seconds,
        ghn_seconds=ghn_seconds,
    )
    head = {node.param_name for node in graph.nodes if node.param_name and (node.last_weight or node.last_bias)}
    skipped_head = [name for name in unpredicted if name in head and not predict_classifier]
    others = [name for name in unpredicted if name not in skipped_head]
    if skipped_head:
        # The head is left to timm on purpose when its classes differ from the GHN's.
        logger.info("%s: the classifier keeps the model's own initialization: %s", type(model).__name__, ", ".join(skipped_head))
    if others:
        logger.warning(
            "%s: %d parameter tensors keep the model's own initialization: %s",
            type(model).__name__,
            len(others),
            ", ".join(others[:8]) + (" ..." if len(others) > 8 else ""),
        )
    logger.info("%s: %s", type(model).__name__, result.summary())
    return result


def _is_classifier_key(node: GraphNode, shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """True for the classifier weight (2-D, flagged last weight) and classifier bias (1-D, last)."""
    shape = shapes[node.param_name]
    return (node.last_weight and len(shape) >= 2) or (node.last_bias and len(shape) == 1)
