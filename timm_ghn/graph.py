"""Computational graph of an ``nn.Module`` in the form a GHN-2 reads.

The graph is traced from one forward pass: PyTorch's autograd graph is walked backwards from the
output, parameters of supported layers become nodes, and a few parameter-free operations (sums,
concatenations, pools, global means, squeeze-excitation products) are kept as nodes. Every other
operation is removed and its inputs are connected to its outputs. Finally each node is connected to
all of its descendants within 50 steps by a "virtual edge" that carries the shortest-path length.

For the layers and operations that the original GHN-2 code (ppuda, commit 4673a42) supports, every
step follows that code, so torchvision's and timm's ResNets give node for node the same graph. The
builder extends it where it fails on timm models:

* Layer classes are matched with ``isinstance``, so timm's norm subclasses (``LayerNorm``,
  ``LayerNorm2d``, ``BatchNormAct2d``) and convolution subclasses (``Conv2dSame``, ``StdConv2d``)
  are nodes. ppuda matches the exact class and silently drops their parameters.
* A parameter the graph cannot place (an unsupported module, such as timm ConvNeXt's layer-scale
  ``gamma``) is skipped. Operations that then depend on no placed parameter and no input (the
  reshape of that ``gamma``) are pruned instead of becoming a second source node, which made
  ppuda's builder fail. The skipped parameters are listed in ``Graph.unplaced``.
* When more than one source node remains, the ``input`` node feeds all of them.
* Parameter names are used unchanged. ppuda cuts names at ``stem`` and ``pos_enc`` (a convention of
  its DeepNets-1M models), which breaks the name match for timm's ``conv_stem``.
* A kept operation that has no GHN-2 primitive becomes ``sum`` (the GHN-3 rule) instead of
  failing.

The forward pass runs on the ``meta`` device through ``torch.func.functional_call``: no weight is
allocated, nothing is computed, and the model's own parameters and buffers are not touched.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Sequence

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import shortest_path
from torch import nn

from timm_ghn import ghn3_graph
from timm_ghn.errors import TimmGhnError
from timm_ghn.ghn3_graph import GHN3_OPERATIONS
from timm_ghn.placement import Placement, is_norm_like
from timm_ghn.trace import NORM_TYPES, Entry, collect_entries, operation_name, parameter_primitive, trace_output

__all__ = [
    "PRIMITIVES",
    "GraphNode",
    "Graph",
    "build_graph",
    "group_key",
    "default_input_size",
]

logger = logging.getLogger(__name__)

#: Node types of GHN-2 and GHN-3 (the DeepNets-1M vocabulary); a node's type id is its index here.
PRIMITIVES: tuple[str, ...] = (
    "max_pool",
    "avg_pool",
    "sep_conv",
    "dil_conv",
    "conv",
    "msa",
    "cse",
    "sum",
    "concat",
    "input",
    "bias",
    "bn",
    "ln",
    "pos_enc",
    "glob_avg",
)

#: Autograd operation names (class name before ``Backward``) that may stay in the graph.
OPERATION_PRIMITIVES: dict[str, str] = {
    "Mean": "glob_avg",
    "AdaptiveAvgPool2D": "glob_avg",
    "MaxPool2DWithIndices": "max_pool",
    "AvgPool2D": "avg_pool",
    "Clone": "msa",
    "Mul": "cse",
    "Add": "sum",
    "Cat": "concat",
    "input": "input",
}

#: Most autograd entries a traced graph may have (its 0/1 matrix takes this squared, in bytes).
MAX_TRACED_ENTRIES = 16384

#: Largest shortest-path length stored as a virtual edge (GHN-2 and GHN-3 with ``ve``).
VIRTUAL_EDGE_CUTOFF = 50

@dataclasses.dataclass
class GraphNode:
    """One node of the graph.

    ``name`` is the full parameter name for a parameter node, the autograd class name (for
    example ``AddBackward0``) for an operation node, and ``input`` for the input node.
    ``shape`` is the shape given to the GHN's shape encoder: the parameter's shape (its decoded
    shape when ``placement`` is set, see :mod:`timm_ghn.placement`), ``(1, 1, kh, kw)`` for a
    pooling node, None otherwise. ``bias_name`` is the norm-layer bias that is predicted together
    with a norm weight.
    """

    name: str
    primitive: str
    param_name: str | None = None
    shape: tuple[int, ...] | None = None
    module_name: str | None = None
    bias_name: str | None = None
    is_weight: bool = False
    last_weight: bool = False
    last_bias: bool = False
    placement: Placement | None = None


@dataclasses.dataclass
class Graph:
    """A model's computational graph with virtual edges.

    ``adjacency[u, v]`` is 0 without a path from ``u`` to ``v``, 1 for a real edge and the
    shortest-path length (2 to the cutoff) for a virtual edge. Nodes are topologically sorted and
    node 0 is the input.
    """

    nodes: list[GraphNode]
    adjacency: np.ndarray
    unplaced: list[str]
    input_size: tuple[int, ...]
    ve_cutoff: int

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def node_types(self) -> torch.Tensor:
        """Primitive index of every node, int64 ``[N]``."""
        return torch.tensor([PRIMITIVES.index(n.primitive) for n in self.nodes], dtype=torch.long)

    @property
    def edges(self) -> np.ndarray:
        """``[E, 3]`` int64 rows ``(source, target, distance)`` in row-major order of the adjacency."""
        src, dst = np.nonzero(self.adjacency)
        return np.stack([src, dst, self.adjacency[src, dst]], axis=1).astype(np.int64)

    @property
    def placed(self) -> list[str]:
        """Names of the parameters that graph nodes stand for, norm biases included, each once."""
        names: dict[str, None] = {}
        for node in self.nodes:
            if node.param_name is not None:
                names[node.param_name] = None
            if node.bias_name is not None:
                names[node.bias_name] = None
        return list(names)

    def primitive_histogram(self) -> dict[str, int]:
        histogram: dict[str, int] = {}
        for node in self.nodes:
            histogram[node.primitive] = histogram.get(node.primitive, 0) + 1
        return dict(sorted(histogram.items()))


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """Return the per-sample input shape used to trace ``model``.

    An ``expected_input_sz`` attribute wins (an int ``s`` means ``(3, s, s)``, as in ppuda).
    Otherwise the shape is timm's ``pretrained_cfg`` ``input_size`` (default ``(3, 224, 224)``),
    corrected for constructor arguments that the config does not follow: the channels become the
    ``in_channels`` of the first convolution, and the image size becomes the ``img_size`` of a
    ``patch_embed`` (or MLP-Mixer's ``stem``) module, which ViT-like models require exactly.
    """
    size = getattr(model, "expected_input_sz", None)
    if isinstance(size, int):
        return (3, size, size)
    if isinstance(size, (tuple, list)):
        return tuple(int(s) for s in size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels, height, width = (tuple(int(s) for s in cfg["input_size"]) if cfg.get("input_size") else (3, 224, 224))

    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None:
        channels = first_conv.in_channels
    embedders = [getattr(model, "patch_embed", None), getattr(model, "stem", None)]
    patch_size = next((m.img_size for m in embedders if getattr(m, "img_size", None) is not None), None)
    if isinstance(patch_size, (tuple, list)) and len(patch_size) == 2:
        height, width = (int(s) for s in patch_size)
    elif isinstance(patch_size, int):
        height = width = patch_size
    return (channels, height, width)


def group_key(
    shape: Sequence[int], max_shape: Sequence[int], last_weight: bool = False, last_bias: bool = False
) -> tuple[int, ...]:
    """Return the GHN decoder group key of a parameter shape.

    Channel counts are rounded by ``ms``: ``n = min(s, K)``; a multiple of 3 becomes ``n // 3 * 4``;
    ``n >= K / 2`` becomes ``K``. Spatial sizes of 4-D shapes stay exact. The key is
    ``(ms0, -1)`` for the classifier bias, ``(ms0, 0)`` for other 1-D tensors, ``(ms0, ms1)`` for
    the classifier weight, ``(ms0, ms1, 1, 1)`` for 2-D, ``(ms0, ms1, ms2)`` for 3-D and
    ``(ms0, ms1, kh, kw)`` for 4-D tensors.
    """

    def ms(dim: int) -> int:
        limit = max_shape[dim]
        n = min(int(shape[dim]), limit)
        if n % 3 == 0:
            n = n // 3 * 4
        if n >= limit / 2:
            n = limit
        return n

    if len(shape) == 1:
        return (ms(0), -1) if last_bias else (ms(0), 0)
    if last_weight:
        return (ms(0), ms(1))
    if len(shape) == 2:
        return (ms(0), ms(1), 1, 1)
    if len(shape) == 3:
        return (ms(0), ms(1), ms(2))
    return (ms(0), ms(1), int(shape[2]), int(shape[3]))


# ---------------------------------------------------------------------------------------------
# Graph rewriting steps (ppuda order: linear fix, input node, sort, filter, virtual edges)


def _fix_linear_layers(entries: list[Entry], adjacency: np.ndarray) -> None:
    """Reorder ``producer -> bias <- weight`` of ``nn.Linear`` into ``producer -> weight -> bias``.

    Recurrent layers traced through their stand-in (``weight_ih``, ``weight_hh``) get the same fix.
    """
    for i, entry in enumerate(entries):
        recurrent = isinstance(entry.module, nn.RNNBase) and entry.name.rsplit(".", 1)[-1].startswith("weight_")
        if not (recurrent or (isinstance(entry.module, nn.Linear) and ".weight" in "." + entry.name)):
            continue
        for j in np.flatnonzero(adjacency[i]).tolist():
            sources = np.flatnonzero(adjacency[:, j])
            adjacency[sources, i] = 1
            adjacency[:, j] = 0
            adjacency[i, j] = 1
            adjacency[i, i] = 0


def _prune_dangling_operations(entries: list[Entry], adjacency: np.ndarray):
    """Drop operation nodes without inputs, which only depend on skipped parameters."""
    keep = np.ones(len(entries), dtype=bool)
    while True:
        in_degree = adjacency[:, keep][keep].sum(axis=0)
        alive = np.flatnonzero(keep)
        dangling = [alive[k] for k in np.flatnonzero(in_degree == 0) if entries[alive[k]].module is None]
        if not dangling:
            break
        keep[dangling] = False
    index = np.flatnonzero(keep)
    return [entries[i] for i in index], adjacency[np.ix_(index, index)]


def _topological_order(adjacency: np.ndarray) -> list[int]:
    """Kahn's algorithm by generations, successors in increasing index (networkx >= 2.6 order)."""
    n = adjacency.shape[0]
    in_degree = (adjacency != 0).sum(axis=0).astype(np.int64)
    successors = [np.flatnonzero(adjacency[i]).tolist() for i in range(n)]
    generation = [i for i in range(n) if in_degree[i] == 0]
    order: list[int] = []
    while generation:
        order.extend(generation)
        following = []
        for node in generation:
            for child in successors[node]:
                in_degree[child] -= 1
                if in_degree[child] == 0:
                    following.append(child)
        generation = following
    if len(order) != n:
        raise TimmGhnError("the traced graph has a cycle; it cannot be sorted topologically")
    return order


def _filter_operations(entries: list[Entry], adjacency: np.ndarray):
    """Remove parameter-free operations that GHN-2 does not model, bypassing each removed node.

    One pass per pattern over the node list; a node matches when the pattern is a substring of its
    name. Matching ``Mean``, ``Mul``, ``Clone``, ``Add`` and ``Cat`` nodes may be kept by ppuda's
    rules; every other matching node is removed and its inputs are connected to its outputs.
    """
    unsupported: list[str] = []
    for entry in entries:
        if entry.module is None and operation_name(entry.name) not in OPERATION_PRIMITIVES:
            if entry.name not in unsupported:
                unsupported.append(entry.name)
    patterns = ["Mul", "Clone", *unsupported, "Mean", "Add", "Cat"]

    for pattern in patterns:
        removed: list[int] = []
        for i, entry in enumerate(entries):
            if pattern not in entry.name:
                continue
            name = entry.name
            if name.startswith("Mean"):
                if entry.keepdim is not None:
                    keep = entry.keepdim == "True"
                else:
                    keep = i < len(entries) - 1 and not entries[i + 1].name.startswith("cells.")
            elif name.startswith("Mul"):
                keep = entries[i - 2].name.startswith("Hard")
            elif name.startswith("Clone"):
                keep = entries[i - 11].name.startswith("Softmax")
            elif name.startswith(("Cat", "Add")):
                keep = np.count_nonzero(adjacency[:, i]) > 1
            else:
                keep = False
            if keep:
                continue
            removed.append(i)
            sources = np.flatnonzero(adjacency[:, i])
            targets = np.flatnonzero(adjacency[i])
            for a in sources:
                for b in targets:
                    if a != b:
                        adjacency[a, b] = 1
        if removed:
            keep_index = np.setdiff1d(np.arange(len(entries)), removed)
            entries = [entries[k] for k in keep_index]
            adjacency = adjacency[np.ix_(keep_index, keep_index)]
    return entries, adjacency


def _add_virtual_edges(adjacency: np.ndarray, cutoff: int) -> np.ndarray:
    """Store the directed shortest-path length ``1 < d <= cutoff`` between every pair of nodes."""
    adjacency = adjacency.astype(np.int64)
    np.fill_diagonal(adjacency, 0)
    if cutoff <= 1:
        return adjacency
    distances = shortest_path(csr_matrix((adjacency > 0).astype(np.float64)), method="D", unweighted=True)
    reachable = np.isfinite(distances) & (distances > 1) & (distances <= cutoff)
    result = adjacency.copy()
    result[reachable & (adjacency == 0)] = distances[reachable & (adjacency == 0)].astype(np.int64)
    return result


def _parse_kernel_size(text: str | None) -> tuple[int, int, int, int]:
    if text is None:
        return (1, 1, 3, 3)
    pieces = [piece.strip("(").strip(")").strip() for piece in text.split(",")]
    sizes = [int(piece) for piece in pieces if piece]
    if len(sizes) == 1:
        sizes = sizes * 2
    return (1, 1, *sizes[:2])


def _make_nodes(entries: list[Entry], style: str = "ghn2") -> list[GraphNode]:
    nodes: list[GraphNode] = []
    unknown: dict[str, int] = {}
    n = len(entries)
    for v, entry in enumerate(entries):
        if entry.module is not None:
            local = entry.name.rsplit(".", 1)[-1]
            placement = entry.placement
            if placement is None:
                primitive, shape, is_weight = parameter_primitive(entry.module, entry.name), entry.shape, local == "weight"
            else:
                primitive, shape, is_weight = placement.primitive, placement.decoded_shape, placement.is_weight
            bias_name = None
            norm = isinstance(entry.module, NORM_TYPES) or (placement is not None and is_norm_like(entry.module))
            # Only the norm's own weight carries its bias: EvoNorm's scale ``v`` is a weight too.
            if norm and local == "weight" and is_weight and getattr(entry.module, "bias", None) is not None:
                bias_name = f"{entry.module_name}.bias" if entry.module_name else "bias"
            node = GraphNode(
                name=entry.name,
                primitive=primitive,
                param_name=entry.name,
                shape=shape,
                placement=placement,
                module_name=entry.module_name,
                bias_name=bias_name,
                is_weight=is_weight,
                # The original builders' positional flags; ``_flag_heads`` corrects them for
                # models that do not end in their classifier (extended graphs only).
                last_weight=v == n - 2 and (style == "ghn2" or ".weight" in "." + entry.name),
                last_bias=v == n - 1 and (style == "ghn2" or ".bias" in "." + entry.name),
            )
        else:
            operation = operation_name(entry.name)
            operations = OPERATION_PRIMITIVES if style == "ghn2" else GHN3_OPERATIONS
            primitive = operations.get(operation)
            if primitive is None:
                unknown[entry.name] = unknown.get(entry.name, 0) + 1
                primitive = "sum"
            shape = _parse_kernel_size(entry.kernel_size) if "pool" in primitive and primitive != "glob_avg" else None
            node = GraphNode(name=entry.name, primitive=primitive, shape=shape)
        nodes.append(node)
    if unknown:
        counts = ", ".join(f"{name} x{count}" for name, count in unknown.items())
        logger.info("operations without a GHN-2 node type are encoded as 'sum': %s", counts)
    return nodes


def _flag_heads(nodes: list[GraphNode], adjacency: np.ndarray) -> None:
    """Move the classifier flags to every weight whose only later parameter is its own bias.

    The original builders flag the last two nodes, which works when the model ends in its
    classifier. A model that averages two heads (distilled DeiT, LeViT) ends in a sum, and the
    flags then fall on ``head_dist.bias`` and that sum. Here a weight of 2 or more dims is a head
    when no parameter node except its module's bias lies downstream of it. The flags are left as
    they are when no node qualifies; for a model that ends in its classifier the result is the same.
    """
    count = len(nodes)
    children = [np.flatnonzero(adjacency[v] == 1) for v in range(count)]
    param_below = np.zeros(count, dtype=bool)
    for v in range(count - 1, -1, -1):  # nodes are in topological order
        param_below[v] = any(nodes[c].param_name is not None or param_below[c] for c in children[v])

    heads: list[int] = []
    biases: list[int] = []
    for v, node in enumerate(nodes):
        if node.param_name is None or not node.is_weight or node.shape is None or len(node.shape) < 2:
            continue
        bias = None
        qualifies = True
        for c in children[v]:
            child = nodes[c]
            own_bias = child.param_name is not None and child.module_name == node.module_name and not child.is_weight
            if own_bias and not param_below[c]:
                bias = c
            elif child.param_name is not None or param_below[c]:
                qualifies = False
                break
        if qualifies:
            heads.append(v)
            if bias is not None:
                biases.append(bias)
    if not heads:
        return
    for v, node in enumerate(nodes):
        node.last_weight = v in heads
        node.last_bias = v in biases


def _add_input_node(entries: list[Entry], adjacency: np.ndarray, sources) -> tuple[list[Entry], np.ndarray]:
    """Append the ``input`` node with an edge to each of ``sources``."""
    adjacency = np.pad(adjacency, ((0, 1), (0, 1)))
    adjacency[-1, sources] = 1
    return [*entries, Entry("input", None, None)], adjacency


def _sorted(entries: list[Entry], adjacency: np.ndarray) -> tuple[list[Entry], np.ndarray]:
    np.fill_diagonal(adjacency, 0)
    order = _topological_order(adjacency)
    return [entries[i] for i in order], adjacency[np.ix_(order, order)]


def _rewrite_ghn2(entries: list[Entry], adjacency: np.ndarray) -> tuple[list[Entry], np.ndarray]:
    """GHN-2 order: linear fix, input node, topological sort, filtering."""
    _fix_linear_layers(entries, adjacency)
    entries, adjacency = _prune_dangling_operations(entries, adjacency)

    sources = np.flatnonzero(adjacency.sum(axis=0) == 0)
    if len(sources) > 1:
        logger.debug("graph has %d source nodes; the input node feeds all of them", len(sources))
    entries, adjacency = _add_input_node(entries, adjacency, sources)

    entries, adjacency = _sorted(entries, adjacency)
    return _filter_operations(entries, adjacency)


def _rewrite_ghn3(entries: list[Entry], adjacency: np.ndarray) -> tuple[list[Entry], np.ndarray]:
    """GHN-3 order: filter, weight-edge fix, softmax fix, second filter, input node, sort."""
    patterns = ["Mul", *ghn3_graph.unsupported_patterns(entries), "Mean", "Add", "Cat"]
    entries, adjacency = ghn3_graph.filter_operations(entries, adjacency, patterns)
    entries, adjacency = ghn3_graph.fix_weight_edges(entries, adjacency)
    adjacency = ghn3_graph.fix_softmax_edges(entries, adjacency)
    entries, adjacency = ghn3_graph.filter_operations(entries, adjacency, ["Add", "Cat"])

    # Extension: roots placed by the extended rules (tokens, position tables) are fed by the input
    # too, so that the input stays node 0.
    roots = np.flatnonzero(adjacency.sum(axis=0) == 0)
    sources = [i for i in roots if "weight" in entries[i].name or entries[i].placement is not None]
    entries, adjacency = _add_input_node(entries, adjacency, sources)
    return _sorted(entries, adjacency)


def build_graph(
    model: nn.Module,
    input_size: Iterable[int] | None = None,
    ve_cutoff: int = VIRTUAL_EDGE_CUTOFF,
    style: str = "ghn2",
    extended: bool = True,
) -> Graph:
    """Trace ``model`` on the meta device and build its GHN graph.

    Args:
        model: any module; its parameters and buffers are neither read nor changed.
        input_size: per-sample input shape, default from :func:`default_input_size`.
        ve_cutoff: maximum shortest-path length stored as a virtual edge (50 for GHN-2 and
            GHN-3, 1 for GHN-1, which has no virtual edges).
        style: ``ghn2`` (the GHN-2 builder's rules, with the extensions above) or ``ghn3`` (the
            GHN-3 builder's rules, :mod:`timm_ghn.ghn3_graph`), matching the GHN that reads it.
        extended: also place the parameters the original rules skip (layer scales, tokens,
            position tables, other norms and convolutions; :mod:`timm_ghn.placement`). False
            builds exactly the original builder's graph.

    Returns:
        The graph, with the names of parameters it could not place in ``Graph.unplaced``.
    """
    if input_size is not None:
        sizes = [tuple(int(s) for s in input_size)]
    else:
        # The derived size follows constructor arguments; the config's size is the fallback when
        # the first registered convolution is not the one that reads the input.
        cfg = getattr(model, "pretrained_cfg", None) or {}
        sizes = [default_input_size(model)]
        if cfg.get("input_size") and tuple(cfg["input_size"]) != sizes[0]:
            sizes.append(tuple(int(s) for s in cfg["input_size"]))
    for attempt, size in enumerate(sizes):
        try:
            outputs, names = trace_output(model, size)
            break
        except TimmGhnError:
            raise
        except Exception as error:  # a forward pass can fail in many ways; report which model and why
            if attempt + 1 < len(sizes):
                continue
            raise TimmGhnError(
                f"cannot trace {type(model).__name__} with input size {size} on the meta device: "
                f"{type(error).__name__}: {error}; pass input_size=(C, H, W) to build_graph"
            ) from error

    if style not in ("ghn2", "ghn3"):
        raise ValueError(f"invalid graph style {style!r}: expected 'ghn2' or 'ghn3'")
    entries_by_key, edge_keys, skipped = collect_entries(
        outputs, names["param_names"], names["owners"], keep_all=style == "ghn3", extended=extended
    )
    keys = list(entries_by_key)
    index_of = {id(key): i for i, key in enumerate(keys)}
    entries = [entries_by_key[key] for key in keys]
    if len(entries) > MAX_TRACED_ENTRIES:
        # NOTE: the rewriting steps use a dense matrix, so larger traced graphs are not supported.
        # No timm 1.0.31 architecture reaches the limit once recurrent layers use their stand-in.
        raise TimmGhnError(
            f"the traced graph of {type(model).__name__} has {len(entries)} entries, more than the "
            f"{MAX_TRACED_ENTRIES} a dense graph can hold here; this model is not supported"
        )
    adjacency = np.zeros((len(entries), len(entries)), dtype=np.int8)
    for source, target in edge_keys:
        adjacency[index_of[id(source)], index_of[id(target)]] = 1

    if style == "ghn2":
        entries, adjacency = _rewrite_ghn2(entries, adjacency)
    else:
        entries, adjacency = _rewrite_ghn3(entries, adjacency)
    adjacency = _add_virtual_edges(adjacency, ve_cutoff)
    nodes = _make_nodes(entries, style)
    if extended:
        _flag_heads(nodes, adjacency)

    graph = Graph(nodes=nodes, adjacency=adjacency, unplaced=[], input_size=size, ve_cutoff=ve_cutoff)
    placed = set(graph.placed)
    all_names = [name for name, _ in model.named_parameters()]
    graph.unplaced = [name for name in all_names if name not in placed]
    if graph.unplaced:
        logger.info(
            "graph of %s places %d of %d parameter tensors; not placed: %s",
            type(model).__name__,
            len(all_names) - len(graph.unplaced),
            len(all_names),
            ", ".join(graph.unplaced[:10]) + (" ..." if len(graph.unplaced) > 10 else ""),
        )
    return graph
