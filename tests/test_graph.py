"""Graph construction: equality with ppuda's GHN-2 graphs and the extensions for timm models."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import timm
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import shortest_path

from conftest import load_reference
from timm_ghn.graph import build_graph, group_key

MAX_SHAPE = (64, 64, 16, 16)


def _meta_model(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def _node_rows(graph) -> list[list]:
    rows = []
    for index, node in enumerate(graph.nodes):
        shape = list(node.shape) if node.shape is not None else None
        key = list(group_key(node.shape, MAX_SHAPE, node.last_weight, node.last_bias)) if node.param_name else None
        rows.append([index, node.primitive, node.param_name, shape, key])
    return rows


@pytest.mark.parametrize(
    "reference_file, arch",
    [
        ("ghn2_imagenet__tv_resnet18_c1000.json", "resnet18"),
        ("ghn2_imagenet__tv_resnet50_c1000.json", "resnet50"),
        ("ghn2_imagenet__timm_resnet50_c1000.json", "resnet50"),
    ],
)
def test_resnet_graph_equals_reference(reference_file, arch):
    reference = load_reference(reference_file)["graph"]
    graph = build_graph(_meta_model(arch))

    assert graph.num_nodes == reference["n_nodes"]
    assert _node_rows(graph) == reference["nodes"]
    assert graph.edges.tolist() == reference["edges"]
    assert graph.primitive_histogram() == reference["primitive_histogram"]
    assert graph.unplaced == []


def test_torchvision_resnet50_graph_equals_timm():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        tv_model = torchvision.models.resnet50()
    tv_graph = build_graph(tv_model)
    timm_graph = build_graph(_meta_model("resnet50"))

    assert _node_rows(tv_graph) == _node_rows(timm_graph)
    assert (tv_graph.adjacency == timm_graph.adjacency).all()


def test_graph_leaves_model_untouched():
    torch.manual_seed(0)
    model = timm.create_model("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    build_graph(model)

    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_convnext_layer_scale_is_listed_not_dangling(caplog):
    model = _meta_model("convnext_atto")
    with caplog.at_level(logging.INFO, logger="timm_ghn.graph"):
        graph = build_graph(model, extended=False)

    gammas = [name for name, _ in model.named_parameters() if name.endswith(".gamma")]
    assert gammas and sorted(graph.unplaced) == sorted(gammas)
    assert "stages.0.blocks.0.gamma" in caplog.text
    in_degree = (graph.adjacency == 1).sum(axis=0)
    assert graph.nodes[0].primitive == "input"
    assert (in_degree[1:] > 0).all(), "every node but the input has a real incoming edge"


def test_convnext_layer_scale_sits_on_branch():
    model = _meta_model("convnext_atto")
    graph = build_graph(model)
    names = [node.param_name for node in graph.nodes]
    gamma = names.index("stages.0.blocks.0.gamma")
    fc2 = names.index("stages.0.blocks.0.mlp.fc2.weight")
    fc2_bias = names.index("stages.0.blocks.0.mlp.fc2.bias")

    assert graph.unplaced == []
    assert graph.nodes[gamma].primitive == "cse"
    assert graph.nodes[gamma].shape == (40,)
    # The scale multiplies the branch output: fc2 -> bias -> gamma -> sum, not a side input.
    assert graph.adjacency[fc2, fc2_bias] == 1
    assert graph.adjacency[fc2_bias, gamma] == 1
    assert graph.adjacency[0, gamma] != 1
    assert graph.nodes[np.flatnonzero(graph.adjacency[gamma] == 1)[0]].primitive == "sum"


def test_timm_norm_subclasses_become_nodes():
    convnext = build_graph(_meta_model("convnext_atto", conv_mlp=False))
    norms = [n for n in convnext.nodes if n.primitive == "ln"]
    assert norms and all(n.bias_name for n in norms)
    assert "stages.0.blocks.0.norm.weight" in [n.param_name for n in norms]

    efficientnet = _meta_model("efficientnet_b0")
    graph = build_graph(efficientnet)
    assert type(efficientnet.bn1).__name__ == "BatchNormAct2d"
    assert graph.unplaced == []
    assert graph.primitive_histogram()["bn"] == 49


def test_graph_of_convnext_base_is_connected():
    graph = build_graph(_meta_model("convnext_base"))

    assert graph.primitive_histogram()["ln"] == 41
    assert graph.nodes[-2].param_name == "head.fc.weight"
    assert graph.nodes[-1].param_name == "head.fc.bias"
    distances = shortest_path(csr_matrix(graph.adjacency == 1), unweighted=True, indices=0)
    assert np.isfinite(distances).all(), "every node is reachable from the input"
    assert graph.adjacency.max() == 50, "virtual edges stop at the cutoff"


def test_virtual_edges_are_shortest_paths():
    graph = build_graph(_meta_model("resnet18"))
    adjacency = graph.adjacency

    assert adjacency.max() == 20
    assert adjacency[0, graph.num_nodes - 1] == 20
    for source, target, distance in graph.edges[:200]:
        if distance > 1:
            middles = [m for m in range(graph.num_nodes) if adjacency[source, m] == distance - 1 and adjacency[m, target] == 1]
            assert middles, f"virtual edge {source}->{target} ({distance}) has no predecessor on a shorter path"


def test_group_key_rounding():
    assert group_key((64, 3, 7, 7), MAX_SHAPE) == (64, 4, 7, 7)
    assert group_key((10, 9, 3, 3), MAX_SHAPE) == (10, 12, 3, 3)
    assert group_key((24, 18), MAX_SHAPE) == (64, 24, 1, 1)
    assert group_key((1000, 2048), MAX_SHAPE, last_weight=True) == (64, 64)
    assert group_key((1000,), MAX_SHAPE, last_bias=True) == (64, -1)
    assert group_key((16,), MAX_SHAPE) == (16, 0)


def test_graph_of_billion_parameter_model_on_meta():
    model = _meta_model("vit_giant_patch14_224")
    graph = build_graph(model)

    assert sum(p.numel() for p in model.parameters()) > 1e9
    assert all(p.is_meta for p in model.parameters())
    assert graph.primitive_histogram()["ln"] == 81
    assert graph.unplaced == []
    assert sorted(build_graph(model, extended=False).unplaced) == ["cls_token", "pos_embed"]
