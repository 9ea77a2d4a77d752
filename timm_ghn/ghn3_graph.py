"""Graph rewriting rules of the GHN-3 code (ghn3 project, commit b3289ac).

GHN-3 reads graphs built by its own builder, which differs from GHN-2's after the autograd walk:
every parameter becomes an entry (unsupported layers and norm biases are filtered afterwards), the
filters run on the discovery order before sorting and decide squeeze-excitation and pooling nodes
by their neighbours' names, linear weights are moved in front of their biases by swapping
records, and an explicit ``softmax`` is kept as an ``msa`` node with the value branch re-routed
through it. :func:`timm_ghn.graph.build_graph` calls these steps with ``style="ghn3"``.
"""

from __future__ import annotations

import numpy as np
from torch import nn

__all__ = [
    "GHN3_OPERATIONS",
    "filter_operations",
    "fix_softmax_edges",
    "fix_weight_edges",
    "is_ghn3_supported",
    "unsupported_patterns",
]

#: Operation names GHN-3 keeps (everything else is removed unless it is a supported parameter).
GHN3_OPERATIONS: dict[str, str] = {
    "Mean": "glob_avg",
    "AdaptiveAvgPool2D": "glob_avg",
    "MaxPool2DWithIndices": "max_pool",
    "AvgPool2D": "avg_pool",
    "Softmax": "msa",
    "Mul": "cse",
    "Add": "sum",
    "Cat": "concat",
    "skip_connect": "sum",
    "input": "input",
}

_HEAD_PREFIXES = ("classifier", "fc", "head")


def _in_degrees(adjacency: np.ndarray) -> np.ndarray:
    return (adjacency != 0).sum(axis=0)


def _bypass(adjacency: np.ndarray, node: int) -> None:
    """Connect every input of ``node`` to every output of it."""
    for source in np.flatnonzero(adjacency[:, node]):
        for target in np.flatnonzero(adjacency[node]):
            if source != target:
                adjacency[source, target] = 1


def filter_operations(entries: list, adjacency: np.ndarray, patterns: list[str]) -> tuple[list, np.ndarray]:
    """One filter of the GHN-3 builder: one pass per pattern over the nodes in their current order.

    Decisions for a matching node at position ``i`` use the lower-cased names ``nb[j]`` at
    ``i + j`` (negative positions wrap around, Python style) and ``head`` = ``nb[-1]`` or ``nb[-2]``
    starts with ``classifier``, ``fc`` or ``head`` (or ``i`` is the last position):

    * ``Mean``: kept iff ``head`` when the graph has a sigmoid or swish, else kept;
    * ``Mul``: kept iff the graph has a sigmoid or swish, not ``head``, and ``nb[-2]`` starts with
      ``hard``/``sigmoid``, or ``nb[-3]`` with ``relu``/``mean``, or ``nb[+1]`` with
      ``hard``/``sigmoid``/``relu``;
    * ``Cat``, ``Add``: kept iff the node had more than one input when the filter started;
    * anything else matching: removed, its inputs connected to its outputs.
    """
    adjacency = adjacency.copy()
    in_degree = list(_in_degrees(adjacency))
    has_gate = any("sigmoid" in e.name.lower() or "swish" in e.name.lower() for e in entries)

    for pattern in patterns:
        removed: list[int] = []
        count = len(entries)
        for i, entry in enumerate(entries):
            if pattern not in entry.name:
                continue
            neighbours = {j: entries[i + j].name.lower() for j in (-1, -2, -3) if i + j >= -count}
            at_end = i + 1 >= count
            following = "" if at_end else entries[i + 1].name.lower()
            head = at_end or any(neighbours.get(j, "").startswith(_HEAD_PREFIXES) for j in (-1, -2))
            name = entry.name
            if name.startswith("Mean"):
                keep = head if has_gate else True
            elif name.startswith("Mul"):
                keep = (
                    has_gate
                    and not head
                    and (
                        neighbours.get(-2, "").startswith(("hard", "sigmoid"))
                        or neighbours.get(-3, "").startswith(("relu", "mean"))
                        or following.startswith(("hard", "sigmoid", "relu"))
                    )
                )
            elif name.startswith(("Cat", "Add")):
                keep = in_degree[i] > 1
            else:
                keep = False
            if not keep:
                removed.append(i)
                _bypass(adjacency, i)
        if removed:
            kept = np.setdiff1d(np.arange(len(entries)), removed)
            entries = [entries[k] for k in kept]
            adjacency = adjacency[np.ix_(kept, kept)]
            in_degree = [in_degree[k] for k in kept]
    return entries, adjacency


def unsupported_patterns(entries: list) -> list[str]:
    """Names the first GHN-3 filter removes: norm-layer biases, unsupported layers' parameters,
    and operations GHN-3 does not keep."""
    names: list[str] = []
    for entry in entries:
        norm_bias = entry.module is not None and "norm" in type(entry.module).__name__.lower() and entry.name.endswith(".bias")
        operation = entry.name.split("Backward")[0]
        placed = getattr(entry, "placement", None) is not None
        dropped = not placed and not is_ghn3_supported(entry.module) and operation not in GHN3_OPERATIONS
        if (norm_bias or dropped) and entry.name not in names:
            names.append(entry.name)
    return names


def fix_weight_edges(entries: list, adjacency: np.ndarray) -> tuple[list, np.ndarray]:
    """Move a weight without inputs in front of the bias it feeds (``prev -> weight -> bias -> next``).

    For each weight entry without inputs and each of its outputs ``j`` of the same module (or a
    softmax): if ``j`` has other inputs, the two node records swap places (the adjacency stays),
    the edge is reversed, and when the weight had a single output, ``j``'s other outputs leave
    from the weight's old position instead.
    """
    entries = list(entries)
    adjacency = adjacency.copy()
    for i in range(len(entries)):
        if adjacency[:, i].any() or "weight" not in entries[i].name:
            continue
        for j in np.flatnonzero(adjacency[i]).tolist():
            same_module = entries[j].module is not None and entries[j].module is entries[i].module
            softmax = not adjacency[:, i].any() and "softmax" in entries[j].name.lower()
            if not (same_module or softmax):
                continue
            outputs = np.count_nonzero(adjacency[i])
            others = [p for p in np.flatnonzero(adjacency[:, j]) if p != i]
            if not others:
                continue
            entries[i], entries[j] = entries[j], entries[i]
            adjacency[i, j] = 0
            adjacency[j, i] = 1
            if outputs == 1:
                for target in np.flatnonzero(adjacency[j]).tolist():
                    if target != i:
                        adjacency[j, target] = 0
                        adjacency[i, target] = 1
    return entries, adjacency


def _path_counts_to(adjacency: np.ndarray, target: int) -> np.ndarray:
    """Number of directed paths from every node to ``target``, capped at 2 (the graph is a DAG)."""
    n = adjacency.shape[0]
    counts = np.full(n, -1, dtype=np.int64)
    counts[target] = 1
    stack = [v for v in range(n) if v != target]
    order: list[int] = []
    visited = np.zeros(n, dtype=bool)
    visited[target] = True
    for start in stack:
        if visited[start]:
            continue
        pending = [(start, False)]
        while pending:
            node, expanded = pending.pop()
            if expanded:
                order.append(node)
                continue
            if visited[node]:
                continue
            visited[node] = True
            pending.append((node, True))
            for child in np.flatnonzero(adjacency[node]):
                if not visited[child]:
                    pending.append((int(child), False))
    for node in order:
        counts[node] = min(2, int(sum(counts[c] for c in np.flatnonzero(adjacency[node]))))
    return counts


def fix_softmax_edges(entries: list, adjacency: np.ndarray) -> np.ndarray:
    """Route attention's value branch through its softmax node.

    For each softmax ``i``, each output ``o`` of it and each other input ``j`` of ``o``: with the
    number of paths ``j -> o`` counted in the graph as it was before this step (capped at 2), the
    edge ``j -> o`` is deleted if there are two or more paths or no edge ``i -> j``, and ``j -> i``
    is added if there is exactly one path and no edge ``i -> j``, unless ``i`` already reaches
    ``j`` (then ``j -> o`` is kept, so that no cycle forms).
    """
    original = adjacency.copy()
    adjacency = adjacency.copy()
    for i, entry in enumerate(entries):
        if "softmax" not in entry.name.lower():
            continue
        for o in np.flatnonzero(original[i]):
            counts = _path_counts_to(original, int(o))
            for j in np.flatnonzero(original[:, o]):
                if j == i:
                    continue
                linked = adjacency[i, j] != 0
                if counts[j] == 1 and not linked and _reaches(adjacency, i, int(j)):
                    # Extension: EfficientViT's cascaded heads feed one head's output into the next
                    # head's input, so ``j -> i`` would close a cycle (the original builder then
                    # fails to sort). The edge ``j -> o`` stays instead.
                    continue
                if counts[j] >= 2 or not linked:
                    adjacency[j, o] = 0
                if counts[j] == 1 and not linked:
                    adjacency[j, i] = 1
    return adjacency


def _reaches(adjacency: np.ndarray, source: int, target: int) -> bool:
    """True when a directed path leads from ``source`` to ``target``."""
    seen = np.zeros(adjacency.shape[0], dtype=bool)
    frontier = [source]
    seen[source] = True
    while frontier:
        node = frontier.pop()
        if node == target:
            return True
        for child in np.flatnonzero(adjacency[node]):
            if not seen[child]:
                seen[child] = True
                frontier.append(int(child))
    return False


def is_ghn3_supported(module: nn.Module | None) -> bool:
    """Layers whose parameters GHN-3 keeps: conv, linear, norm, multi-head attention, embeddings."""
    return isinstance(
        module,
        (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.MultiheadAttention, nn.Embedding),
    )
