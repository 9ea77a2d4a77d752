"""GHN-3: released container format, safe loading, and predictions against the original code."""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import pickle
from pathlib import Path

import pytest
import timm
import torch

from conftest import SHARED
from timm_ghn import CheckpointError, load_ghn, predict_parameters, save_ghn
from timm_ghn.graph import build_graph
from timm_ghn.hypernet import GHN3
from timm_ghn.hypernet.safe_pickle import load_joblib_state_dict

GHN3_REFERENCE = SHARED / "reference" / "ghn3"
TM8 = GHN3_REFERENCE / "ghn3tm8_rand_seed0.pt"


def _require_ghn3() -> None:
    if not TM8.is_file():
        pytest.skip(f"GHN-3 reference files not found under {GHN3_REFERENCE}")


@pytest.fixture(scope="module")
def tm8():
    _require_ghn3()
    return load_ghn(TM8)


def test_container_matches_manifest():
    _require_ghn3()
    manifest = json.loads((GHN3_REFERENCE / "ghn3tm8_rand_seed0.manifest.json").read_text())
    state = load_joblib_state_dict(TM8)

    assert list(state) == list(manifest["tensors"])
    for name, expected in manifest["tensors"].items():
        tensor = state[name]
        assert list(tensor.shape) == expected["shape"], name
        assert tensor.flatten()[:8].tolist() == expected["first8"], name
        assert math.isclose(tensor.double().sum().item(), expected["sum"], rel_tol=1e-9, abs_tol=1e-9), name


def test_inferred_config_is_tm8(tm8):
    config = tm8.model.config

    assert isinstance(tm8.model, GHN3)
    assert (config.hid, config.layers, config.heads) == (64, 3, 8)
    assert config.max_shape == (64, 64, 16, 16)
    assert config.num_classes == 1000
    assert sum(p.numel() for p in tm8.model.parameters()) == 6_906_632


@pytest.mark.parametrize(
    "reference_file, arch",
    [("torchvision_resnet50.json", "resnet50"), ("timm_vit_tiny_patch16_224.json", "vit_tiny_patch16_224")],
)
def test_prediction_matches_reference(tm8, reference_file, arch):
    reference = json.loads((GHN3_REFERENCE / reference_file).read_text())
    torch.manual_seed(0)
    model = timm.create_model(arch)

    # The original builder leaves ViT's tokens unplaced; ``extended=False`` reproduces its graph.
    graph = build_graph(model, style="ghn3", extended=False)
    result = predict_parameters(model, tm8, graph=graph, keep_embeddings=True)

    assert graph.num_nodes == reference["graph"]["n_nodes"]
    assert graph.edges.tolist() == reference["graph"]["edges"]
    assert sorted(result.unpredicted) == sorted(reference["not_set_by_ghn"])
    final = result.embeddings.final.double()
    for row, (row_sum, row_sum_sq, _) in zip(final, reference["ghn_activations"]["per_node_final"]):
        assert abs(row.sum().item() - row_sum) <= 1e-4 * math.sqrt(row.numel() * row_sum_sq)
    state = model.state_dict()
    compared = 0
    for name, expected in reference["state_dict"].items():
        if not expected["compare"]:
            continue
        compared += 1
        values = state[name].double().flatten()
        n = values.numel()
        assert abs(values.sum().item() - expected["sum"]) <= 1e-5 * math.sqrt(n * expected["sumsq"]), name
        assert abs((values**2).sum().item() - expected["sumsq"]) <= 1e-5 * expected["sumsq"], name
        rms = math.sqrt(expected["sumsq"] / n)
        for got, want in zip(values[:8].tolist(), expected["first8"]):
            assert abs(got - want) <= 1e-4 * abs(want) + 1e-5 * rms, name
    assert compared == len(result.predicted)


class _RunsCommand:
    """Pickles as a call of ``os.system``: what a malicious checkpoint would contain."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_pickle_rejected_without_running(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    state = collections.OrderedDict(weight=torch.zeros(2), payload=_RunsCommand(f"touch {marker}"))
    path.write_bytes(pickle.dumps(state, protocol=4))

    with pytest.raises(CheckpointError, match="system"):
        load_ghn(path)

    assert not marker.exists()


def test_other_globals_named_in_error(tmp_path):
    path = tmp_path / "namespace.pt"
    path.write_bytes(pickle.dumps({"args": argparse.Namespace(lr=1.0)}, protocol=4))

    with pytest.raises(CheckpointError, match="argparse.Namespace"):
        load_ghn(path)


def test_truncated_container_gives_clear_error(tmp_path):
    _require_ghn3()
    data = TM8.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointError, match="truncated"):
        load_ghn(path)


def test_plain_pickle_of_state_dict_loads(tmp_path, tm8):
    """A dump of a state dict with pickle (what joblib writes for tensors) reads back exactly."""
    path = tmp_path / "dump.pt"
    state = {k: v.clone() for k, v in tm8.model.state_dict().items()}
    path.write_bytes(pickle.dumps(collections.OrderedDict(state), protocol=4))

    loaded = load_joblib_state_dict(path)

    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_convert_round_trip_predicts_identically(tmp_path, tm8):
    converted_path = save_ghn(tm8.model, tmp_path / "ghn3tm8.safetensors")
    converted = load_ghn(converted_path)
    first = timm.create_model("resnet18")
    second = timm.create_model("resnet18")

    predict_parameters(first, tm8)
    predict_parameters(second, converted)

    assert isinstance(converted.model, GHN3)
    assert converted.model.config == tm8.model.config
    assert all(torch.equal(a, b) for a, b in zip(converted.model.state_dict().values(), tm8.model.state_dict().values()))
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name


def test_trainer_checkpoint_layout_loads(tmp_path, tm8):
    """The GHN-3 trainer's ``torch.save`` dict, with its config and tables under ``gnn.0``."""
    config = tm8.model.config.to_dict() | {"is_ghn2": False}
    path = tmp_path / "trainer.pt"
    torch.save({"state_dict": tm8.model.state_dict(), "config": config, "epoch": 3}, path)

    loaded = load_ghn(path)

    assert isinstance(loaded.model, GHN3)
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), tm8.model.state_dict().values()))


def test_convert_command_writes_loadable_file(tmp_path, capsys):
    from timm_ghn.cli import main

    _require_ghn3()
    output = tmp_path / "tm8.safetensors"

    status = main(["convert", str(TM8), "-o", str(output)])

    assert status == 0
    assert "GHN3 with 6,906,632 parameters" in capsys.readouterr().out
    assert isinstance(load_ghn(output).model, GHN3)


@pytest.mark.parametrize("arch", ["mobilenetv3_small_100", "efficientnet_b0"])
def test_ghn3_graph_rules_for_squeeze_excitation(arch):
    """GHN-3 keeps a hard-sigmoid gate's product as ``cse`` and drops the SE means; GHN-2 keeps
    the means as ``glob_avg`` and drops the product."""
    from timm_ghn.graph import build_graph

    with torch.device("meta"):
        model = timm.create_model(arch)
    ghn2 = build_graph(model, style="ghn2").primitive_histogram()
    ghn3 = build_graph(model, style="ghn3").primitive_histogram()

    assert ghn2["glob_avg"] > 1
    assert "cse" not in ghn2
    assert ghn3.get("glob_avg", 0) <= 1
    if arch == "mobilenetv3_small_100":
        assert ghn3["cse"] == 9


@pytest.mark.parametrize("reference_file, arch", [("torchvision_resnet50.json", "resnet50"), ("timm_vit_tiny_patch16_224.json", "vit_tiny_patch16_224")])
def test_ghn3_graph_style_equals_reference(reference_file, arch):
    from timm_ghn.graph import build_graph

    _require_ghn3()
    reference = json.loads((GHN3_REFERENCE / reference_file).read_text())["graph"]
    with torch.device("meta"):
        model = timm.create_model(arch)

    graph = build_graph(model, style="ghn3", extended=False)

    rows = [[i, n.primitive, n.param_name, list(n.shape) if n.shape else None] for i, n in enumerate(graph.nodes)]
    assert rows == [row[:4] for row in reference["nodes"]]
    assert graph.edges.tolist() == reference["edges"]


def test_ghn3_graph_of_cascaded_heads_is_acyclic():
    """EfficientViT feeds each attention head's output into the next head, which the softmax
    re-routing of the GHN-3 rules turned into a cycle."""
    with torch.device("meta"):
        model = timm.create_model("efficientvit_m0")

    graph = build_graph(model, style="ghn3")

    assert graph.unplaced == []
    assert graph.nodes[0].primitive == "input"
    assert sum(node.primitive == "msa" for node in graph.nodes) > 0
