"""Device handling of prediction, checked on the ``meta`` device because the tests have no GPU.

An operation that mixes a tensor on the ``meta`` device with a CPU tensor of one or more dims
raises, and PyTorch raises a similar device-mismatch error for CUDA tensors. Running the whole GHN forward pass with the model and the
GHN on ``meta`` therefore finds every tensor that the prediction code creates on the CPU and
then combines with the GHN's or the model's tensors. ``meta`` tensors have no values, so this
cannot check numbers, and GHN-orth (which reads values to check them) is not covered.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from conftest import SHARED
from timm_ghn.graph import build_graph
from timm_ghn.hypernet import load_ghn
from timm_ghn.pipeline import DEFAULT_GHN, initialize_model
from timm_ghn.predict import predict_parameters

GHN3_REFERENCE = SHARED / "reference" / "ghn3" / "ghn3tm8_rand_seed0.pt"

MODELS = ["resnet18", "test_vit", "test_convnext", "test_efficientnet", "test_coatnet"]


@pytest.fixture(scope="module", params=["ghn2", "ghn3"])
def loaded_ghn(request):
    if request.param == "ghn2":
        return load_ghn(DEFAULT_GHN)
    if not GHN3_REFERENCE.is_file():
        pytest.skip(f"GHN-3 reference checkpoint not found: {GHN3_REFERENCE}")
    return load_ghn(GHN3_REFERENCE)


@pytest.mark.parametrize("model_name", MODELS)
def test_predict_on_meta_device(loaded_ghn, model_name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10)
    graph = build_graph(model, style=loaded_ghn.model.config.graph_style)
    on_cpu = predict_parameters(copy.deepcopy(model), loaded_ghn, graph=graph, predict_classifier=True)

    ghn = copy.deepcopy(loaded_ghn)
    ghn.model.to("meta")
    model.to("meta")
    on_meta = predict_parameters(model, ghn, graph=graph, predict_classifier=True)

    assert on_meta.predicted == on_cpu.predicted
    assert on_meta.unpredicted == on_cpu.unpredicted
    assert {parameter.device.type for parameter in model.parameters()} == {"meta"}


def test_meta_device_catches_cpu_tensor() -> None:
    # The checks above rely on this error. PyTorch raises a similar device-mismatch error for
    # CUDA tensors, which these CPU-only tests cannot run.
    with pytest.raises(RuntimeError, match="device"):
        torch.ones(3, device="meta") + torch.ones(3)


def test_initialize_model_on_meta_device() -> None:
    model, report = initialize_model("test_convnext", method="ghn", ghn=str(DEFAULT_GHN), device="meta")

    assert {parameter.device.type for parameter in model.parameters()} == {"meta"}
    assert report.method == "ghn"
