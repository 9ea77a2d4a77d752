"""Compatibility with the original GHN-2 code: checkpoints, predictions and GHN-orth.

The reference vectors were made by ppuda (commit 4673a42) from random-weight checkpoints in the
released GHN-2 format; tolerances are those recommended with the vectors.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch

from conftest import CIFAR_GHN, GHN2_REFERENCE, IMAGENET_GHN, fingerprint_errors, load_reference
from timm_ghn import ghn_orth_, load_ghn, predict_parameters, save_ghn

MODEL_FILES = [
    "ghn2_imagenet__tv_resnet18_c1000.json",
    "ghn2_imagenet__tv_resnet50_c1000.json",
    "ghn2_imagenet__timm_resnet50_c1000.json",
    "ghn2_cifar10__tv_resnet18_c1000.json",
    "ghn2_cifar10__tv_resnet50_c1000.json",
    "ghn2_cifar10__timm_resnet50_c1000.json",
]
ORTH_FILES = [
    "ghn2_imagenet__tv_resnet50_c1000__ghn_orth_layer37_beta3e-5.json",
    "ghn2_cifar10__tv_resnet50_c1000__ghn_orth_layer37_beta3e-5.json",
]


def _ghn_for(reference: dict):
    return load_ghn(GHN2_REFERENCE / reference["ghn_checkpoint"])


def _predicted_model(reference: dict, ghn) -> tuple[torch.nn.Module, object]:
    """timm's model of the reference architecture; timm and torchvision ResNets predict identically."""
    torch.manual_seed(0)
    model = timm.create_model(reference["model"]["arch"], num_classes=reference["model"]["num_classes"])
    result = predict_parameters(model, ghn, predict_classifier=True, keep_embeddings=True)
    return model, result


@pytest.mark.parametrize("checkpoint", [IMAGENET_GHN, CIFAR_GHN], ids=["imagenet", "cifar10"])
def test_checkpoint_matches_manifest(checkpoint):
    manifest = load_reference(checkpoint.name.replace(".pt", ".manifest.json"))
    ghn = load_ghn(checkpoint)
    state = ghn.model.state_dict()

    assert list(state) == list(manifest["state_dict"])
    assert ghn.model.config.to_dict() == manifest["config"]
    assert sum(t.numel() for t in state.values()) == manifest["n_parameters"]
    for name, expected in manifest["state_dict"].items():
        assert list(state[name].shape) == expected["shape"], name
        assert max(fingerprint_errors(state[name], expected)) < 1e-9, name


@pytest.mark.parametrize("reference_file", MODEL_FILES)
def test_prediction_matches_reference(reference_file):
    reference = load_reference(reference_file)
    model, result = _predicted_model(reference, _ghn_for(reference))
    state = model.state_dict()
    buffers = set(reference["buffers_changed_by_graph_forward"])

    assert result.unpredicted == reference["params_not_set_by_ghn"] == []
    assert result.embeddings.shape_indices.tolist() == reference["intermediate"]["shape_encoder_indices"]["rows"]
    assert list(state) == list(reference["state_dict"])

    for name, expected in reference["state_dict"].items():
        if name in buffers:
            continue
        d_sum, d_sum_sq, d_first = fingerprint_errors(state[name], expected)
        assert d_sum <= 1e-5, f"{name}: sum differs by {d_sum:.2e} (normalised)"
        assert d_sum_sq <= 1e-5, f"{name}: sum of squares differs by {d_sum_sq:.2e} (relative)"
        assert d_first <= 5e-5, f"{name}: first values differ by {d_first:.2e} (relative to RMS)"


@pytest.mark.parametrize("reference_file", MODEL_FILES[:1] + MODEL_FILES[3:4])
def test_node_embeddings_match_reference(reference_file):
    reference = load_reference(reference_file)
    _, result = _predicted_model(reference, _ghn_for(reference))
    embeddings = result.embeddings
    stages = {
        "after_shape_encoder": embeddings.initial,
        "after_gnn": embeddings.after_gnn,
        "after_layernorm": embeddings.final,
    }
    for stage, tensor in stages.items():
        expected = reference["intermediate"][stage]
        values = tensor.double()
        assert list(values.shape) == expected["shape"]
        assert abs(values.sum().item() - expected["sum"]) <= 1e-5 * math.sqrt(values.numel() * expected["sum_sq"]), stage
        assert abs((values**2).sum().item() - expected["sum_sq"]) <= 1e-5 * expected["sum_sq"], stage
        first = values.flatten()[:8].tolist()
        assert max(abs(a - b) for a, b in zip(first, expected["first8"])) <= 2e-5, stage
        row_sums = values.sum(dim=1).tolist()
        assert max(abs(a - b) for a, b in zip(row_sums, expected["row_sums"])) <= 1e-4, stage


def test_buffers_keep_their_defaults(imagenet_ghn):
    model = timm.create_model("resnet18")
    predict_parameters(model, imagenet_ghn)

    for name, buffer in model.named_buffers():
        if name.endswith("running_mean"):
            assert torch.count_nonzero(buffer) == 0, name
        elif name.endswith("running_var"):
            assert torch.all(buffer == 1), name
        elif name.endswith("num_batches_tracked"):
            assert buffer.item() == 0, name


@pytest.mark.parametrize("reference_file", ORTH_FILES)
def test_ghn_orth_matches_reference(reference_file):
    reference = load_reference(reference_file)
    model_reference = load_reference(reference_file.split("__ghn_orth")[0] + ".json")
    model, _ = _predicted_model(model_reference, _ghn_for(model_reference))
    predicted = {k: v.clone() for k, v in model.state_dict().items()}

    report = ghn_orth_(model, beta=3e-5, start_layer=37, seed=0)

    changed = reference["tensors_changed_by_postprocessing"]
    assert [f"{name}.weight" for name in report.transformed] == changed
    assert report.num_layers == reference["n_2d_weight_layers"]
    state = model.state_dict()
    for name, tensor in state.items():
        if name not in changed:
            assert torch.equal(tensor, predicted[name]), f"{name} changed but is before the start layer"
            continue
        d_sum, d_sum_sq, d_first = fingerprint_errors(tensor, reference["state_dict"][name])
        assert d_sum <= 1e-5, f"{name}: sum differs by {d_sum:.2e}"
        assert d_sum_sq <= 1e-5, f"{name}: sum of squares differs by {d_sum_sq:.2e}"
        assert d_first <= 1e-3, f"{name}: first values differ by {d_first:.2e}"


def test_safetensors_ghn_predicts_identically(tmp_path, imagenet_ghn):
    path = save_ghn(imagenet_ghn.model, tmp_path / "ghn2.safetensors")
    converted = load_ghn(path)
    first = timm.create_model("resnet18")
    second = timm.create_model("resnet18")

    predict_parameters(first, imagenet_ghn)
    predict_parameters(second, converted)

    assert converted.model.config == imagenet_ghn.model.config
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name
