"""Fitting decoded blocks to parameter shapes, and prediction on models beyond the references."""

from __future__ import annotations

import pytest
import timm
import torch

from timm_ghn import predict_parameters
from timm_ghn.predict import fit_block, normalize_block, write_block_

# (decoded block shape, parameter shape): tiling, slicing, remainders, classifier, 1-D, 3-D.
CASES = [
    ((2, 64), (100,)),
    ((2, 64), (20,)),
    ((64, 64, 3, 3), (512, 256, 3, 3)),
    ((64, 4, 7, 7), (64, 3, 7, 7)),
    ((64, 64, 1, 1), (1000, 2048)),
    ((10, 64), (1000, 512)),
    ((10, 64), (7, 20)),
    ((64, 12, 3, 3), (200, 9, 3, 3)),
    ((128, 1, 1), (300, 1, 1)),
    ((64, 64, 16, 16), (1, 768, 14, 14)),
    ((64, 1, 7, 7), (130, 1, 7, 7)),
    ((16, 16, 5, 3), (33, 40, 5, 3)),
]


@pytest.mark.parametrize("block_shape, target", CASES)
@pytest.mark.parametrize("is_weight", [True, False])
def test_write_block_equals_fit_then_normalize(block_shape, target, is_weight):
    block = torch.randn(block_shape, generator=torch.Generator().manual_seed(0))
    expected = normalize_block(fit_block(block, target), is_weight)
    param = torch.full(target, float("nan"))

    write_block_(param, block, is_weight, weight_norm=True)

    assert torch.equal(param, expected)


def test_fit_block_tiles_rows_and_columns():
    block = torch.arange(6.0).view(2, 3, 1, 1)
    tiled = fit_block(block, (5, 7, 1, 1))[:, :, 0, 0]

    assert tiled[4, 6] == block[4 % 2, 6 % 3, 0, 0]
    assert torch.equal(tiled[2:4, 3:6], block[:, :, 0, 0])


def test_normalize_block_ranges():
    values = torch.linspace(-50, 50, 101)

    scales = normalize_block(values, is_weight=True)
    biases = normalize_block(values, is_weight=False)
    conv = normalize_block(torch.ones(8, 4, 3, 3), is_weight=True)
    depthwise = normalize_block(torch.ones(8, 1, 3, 3), is_weight=True)

    assert scales.min() >= 0
    assert scales.max() <= 2
    assert biases.min() >= -1
    assert biases.max() <= 1
    assert torch.allclose(conv, torch.full_like(conv, (2 / 36) ** 0.5))
    assert torch.allclose(depthwise, torch.full_like(depthwise, (1 / 9) ** 0.5))


@pytest.mark.parametrize("name", ["convnext_atto", "efficientnet_b0", "vit_tiny_patch16_224", "regnety_002"])
def test_prediction_covers_timm_families(name, imagenet_ghn):
    torch.manual_seed(0)
    model = timm.create_model(name)
    before = {k: v.clone() for k, v in model.named_parameters()}

    result = predict_parameters(model, imagenet_ghn)

    assert result.predicted, "nothing was predicted"
    for param_name, param in model.named_parameters():
        changed = not torch.equal(param, before[param_name])
        assert changed == (param_name in result.predicted), param_name
        assert torch.isfinite(param).all(), param_name
    assert result.fraction_predicted > 0.95


def test_predict_tensors_is_differentiable(imagenet_ghn):
    from timm_ghn.hypernet import GHN2
    from timm_ghn.graph import build_graph
    from timm_ghn.predict import predict_tensors

    network = GHN2(imagenet_ghn.model.config)
    network.load_state_dict(imagenet_ghn.model.state_dict())
    model = timm.create_model("resnet18", num_classes=10)
    graph = build_graph(model)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}

    tensors = predict_tensors(network, graph, shapes)
    output = torch.func.functional_call(model, tensors, (torch.randn(2, 3, 32, 32),), strict=False)
    output.square().mean().backward()

    reference = timm.create_model("resnet18", num_classes=10)
    predict_parameters(reference, imagenet_ghn, predict_classifier=True)
    for name, value in tensors.items():
        assert torch.equal(value.detach(), dict(reference.named_parameters())[name]), name
    assert network.decoder.fc[0].weight.grad is not None
    assert network.embed.weight.grad.abs().sum() > 0
