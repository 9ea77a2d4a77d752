"""The safetensors file that ``timm-ghn predict`` and the timm overlay write, checked against timm.

Every prediction here runs the real GHN-2 checkpoints on CPU with small models (resnet18,
convnext_atto).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models import load_checkpoint

import timm_ghn
from conftest import CIFAR_GHN, IMAGENET_GHN, require_reference
from timm_ghn.cli import main

# resnet18 has 21 modules with a weight of >= 2 dims (20 convolutions and fc). GHN-orth's default
# start layer for a model without a preset is floor(2 * M / 3) + 1.
RESNET18_WEIGHT_LAYERS = 21
RESNET18_START_LAYER = 2 * RESNET18_WEIGHT_LAYERS // 3 + 1

DTYPE_SIZES = {"F32": 4, "F64": 8, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@pytest.fixture(scope="module", autouse=True)
def _reference_files():
    require_reference()


def predict(output: Path, model_name: str = "resnet18", *options: str, ghn: Path = IMAGENET_GHN) -> Path:
    """Run ``timm-ghn predict`` in this process and return the written file."""
    status = main(["predict", model_name, "--ghn", str(ghn), "-o", str(output), *options])
    assert status == 0
    assert output.is_file()
    return output


def read_header(path: Path) -> dict:
    """Return the JSON header of a safetensors file (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def file_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def seeded_timm_state(model_name: str, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    """Return the state dict of timm's own init after ``torch.manual_seed(seed)``, as the pipeline seeds it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(model_name, **kwargs).state_dict()


def weight_layer_names(model: torch.nn.Module) -> list[str]:
    """Return the modules with a weight of >= 2 dims in registration order (GHN-orth's layers 1..M)."""
    return [name for name, module in model.named_modules() if getattr(module, "weight", None) is not None and module.weight.dim() >= 2]


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> Path:
    """``timm-ghn predict resnet18 --ghn IMAGENET -o FILE`` with every other option at its default."""
    return predict(tmp_path_factory.mktemp("resnet18") / "resnet18.safetensors")


@pytest.fixture(scope="module")
def resnet18_tensors(resnet18_file) -> dict[str, torch.Tensor]:
    return load_file(str(resnet18_file))


@pytest.fixture(scope="module")
def timm_resnet18_state() -> dict[str, torch.Tensor]:
    return timm.create_model("resnet18").state_dict()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("TIMM_GHN_CACHE", str(directory))
    return directory


# --- file content against timm's resnet18 -------------------------------------------------------


def test_keys_equal_timm_state_dict(resnet18_file, timm_resnet18_state):
    keys = file_keys(resnet18_file)
    assert set(keys) == set(timm_resnet18_state)
    assert len(keys) == len(timm_resnet18_state)


def test_shapes_equal_timm(resnet18_tensors, timm_resnet18_state):
    for name, expected in timm_resnet18_state.items():
        assert resnet18_tensors[name].shape == expected.shape, name


def test_dtypes_equal_timm(resnet18_tensors, timm_resnet18_state):
    for name, expected in timm_resnet18_state.items():
        assert resnet18_tensors[name].dtype == expected.dtype, name


def test_buffers_included(resnet18_tensors):
    buffers = dict(timm.create_model("resnet18").named_buffers())
    assert buffers, "resnet18 should have BatchNorm buffers"
    assert set(buffers) <= set(resnet18_tensors)


def test_tensors_contiguous(resnet18_file, resnet18_tensors):
    """Each tensor is a dense block of its own bytes in the file, and loads contiguous."""
    header = read_header(resnet18_file)
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        numel = 1
        for size in entry["shape"]:
            numel *= size
        assert end - begin == numel * DTYPE_SIZES[entry["dtype"]], name
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, name), (begin, _, next_name) in zip(spans, spans[1:]):
        assert end <= begin, f"{name} overlaps {next_name}"
    for name, tensor in resnet18_tensors.items():
        assert tensor.is_contiguous(), name


def test_loads_strictly_into_timm(resnet18_file, resnet18_tensors):
    model = timm.create_model("resnet18")
    load_checkpoint(model, str(resnet18_file), strict=True)
    state = model.state_dict()
    assert set(state) == set(resnet18_tensors)
    for name, value in state.items():
        assert torch.equal(value, resnet18_tensors[name]), name


def test_batchnorm_stats_are_defaults(resnet18_tensors):
    running_means = [name for name in resnet18_tensors if name.endswith(".running_mean")]
    running_vars = [name for name in resnet18_tensors if name.endswith(".running_var")]
    batch_counts = [name for name in resnet18_tensors if name.endswith(".num_batches_tracked")]
    assert len(running_means) == len(running_vars) == len(batch_counts) == 20
    for name in running_means:
        assert torch.equal(resnet18_tensors[name], torch.zeros_like(resnet18_tensors[name])), name
    for name in running_vars:
        assert torch.equal(resnet18_tensors[name], torch.ones_like(resnet18_tensors[name])), name
    for name in batch_counts:
        assert resnet18_tensors[name].item() == 0, name


# --- header metadata ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def expected_metadata() -> dict[str, str]:
    return {
        "timm_ghn.model_name": "resnet18",
        "timm_ghn.model_kwargs": "{}",
        "timm_ghn.method": "ghn_orth",
        "timm_ghn.beta": "3e-05",
        "timm_ghn.start_layer": str(RESNET18_START_LAYER),
        "timm_ghn.variant": "released",
        "timm_ghn.seed": "0",
        "timm_ghn.ghn_name": IMAGENET_GHN.name,
        "timm_ghn.ghn_sha256": hashlib.sha256(IMAGENET_GHN.read_bytes()).hexdigest(),
        "timm_ghn.timm_version": timm.__version__,
        "timm_ghn.version": timm_ghn.__version__,
        "timm_ghn.predicted_fraction": "1.000000",
        "timm_ghn.classifier_predicted": "true",
        "timm_ghn.unpredicted": "[]",
    }


@pytest.mark.parametrize(
    "key",
    [
        "timm_ghn.model_name",
        "timm_ghn.model_kwargs",
        "timm_ghn.method",
        "timm_ghn.beta",
        "timm_ghn.start_layer",
        "timm_ghn.variant",
        "timm_ghn.seed",
        "timm_ghn.ghn_name",
        "timm_ghn.ghn_sha256",
        "timm_ghn.timm_version",
        "timm_ghn.version",
        "timm_ghn.predicted_fraction",
        "timm_ghn.classifier_predicted",
        "timm_ghn.unpredicted",
    ],
)
def test_metadata_value(resnet18_file, expected_metadata, key):
    metadata = metadata_of(resnet18_file)
    assert key in metadata
    assert metadata[key] == expected_metadata[key]


def test_metadata_ghn_method_has_no_orth_values(tmp_path):
    metadata = metadata_of(predict(tmp_path / "ghn.safetensors", "resnet18", "--method", "ghn"))
    assert metadata["timm_ghn.method"] == "ghn"
    assert metadata["timm_ghn.beta"] == ""
    assert metadata["timm_ghn.start_layer"] == ""
    assert metadata["timm_ghn.variant"] == ""


# --- console script ---------------------------------------------------------------------------


def test_console_script_writes_same_file(tmp_path, resnet18_file, monkeypatch):
    executable = shutil.which("timm-ghn")
    assert executable is not None, "the timm-ghn console script is not on PATH; run pip install -e ."
    monkeypatch.setenv("TIMM_GHN_CACHE", str(tmp_path / "cache"))
    output = tmp_path / "cli.safetensors"

    result = subprocess.run(
        [executable, "predict", "resnet18", "--ghn", str(IMAGENET_GHN), "-o", str(output)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert lines[0].startswith(f"{output}: resnet18 ghn_orth, predicted 62/62 tensors and 11,689,512/11,689,512 parameters (100.00%)")
    assert f"GHN-orth from layer {RESNET18_START_LAYER} (beta 3e-05)" in lines[0]
    assert result.stderr == ""
    assert output.read_bytes() == resnet18_file.read_bytes()


# --- determinism and what each option changes --------------------------------------------------


def test_same_command_byte_identical(tmp_path, resnet18_file):
    again = predict(tmp_path / "again.safetensors")
    assert again.read_bytes() == resnet18_file.read_bytes()


def test_seed_changes_only_noised_layers(tmp_path, resnet18_file, resnet18_tensors):
    seeded = predict(tmp_path / "seed1.safetensors", "resnet18", "--seed", "1")
    tensors = load_file(str(seeded))
    layers = weight_layer_names(timm.create_model("resnet18"))
    noised = {f"{name}.weight" for name in layers[RESNET18_START_LAYER - 1 : -1]}

    assert seeded.read_bytes() != resnet18_file.read_bytes()
    assert metadata_of(seeded)["timm_ghn.seed"] == "1"
    for name, value in tensors.items():
        if name in noised:
            assert not torch.equal(value, resnet18_tensors[name]), name
        else:
            assert torch.equal(value, resnet18_tensors[name]), name


def test_ghn_orth_changes_layers_from_start(tmp_path, resnet18_tensors):
    raw = load_file(str(predict(tmp_path / "ghn.safetensors", "resnet18", "--method", "ghn")))
    layers = weight_layer_names(timm.create_model("resnet18"))
    assert len(layers) == RESNET18_WEIGHT_LAYERS
    assert layers[-1] == "fc"
    changed = {f"{name}.weight" for name in layers[RESNET18_START_LAYER - 1 : -1]}
    assert "fc.weight" not in changed
    assert len(changed) == RESNET18_WEIGHT_LAYERS - RESNET18_START_LAYER

    assert set(raw) == set(resnet18_tensors)
    for name, value in raw.items():
        if name in changed:
            assert not torch.equal(value, resnet18_tensors[name]), name
        else:
            assert torch.equal(value, resnet18_tensors[name]), name


# --- head prediction with a class count that differs from the GHN's ----------------------------


def test_cli_predict_classifier_flag(tmp_path):
    default = predict(tmp_path / "default.safetensors", "resnet18", "--num-classes", "10")
    forced = predict(tmp_path / "forced.safetensors", "resnet18", "--num-classes", "10", "--predict-classifier")
    timm_head = seeded_timm_state("resnet18", num_classes=10)["fc.weight"]

    assert metadata_of(default)["timm_ghn.classifier_predicted"] == "false"
    assert metadata_of(forced)["timm_ghn.classifier_predicted"] == "true"
    assert torch.equal(load_file(str(default))["fc.weight"], timm_head)
    assert load_file(str(forced))["fc.weight"].shape == (10, 512)
    assert not torch.equal(load_file(str(forced))["fc.weight"], timm_head)


# --- timm's pretrained_cfg_overlay ------------------------------------------------------------


def create_from_overlay(overlay: dict, num_classes: int = 10) -> torch.nn.Module:
    return timm.create_model("resnet18", pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay)


def assert_state_equals_file(model: torch.nn.Module, path: Path) -> None:
    tensors = load_file(str(path))
    state = model.state_dict()
    assert set(state) == set(tensors)
    for name, value in state.items():
        assert torch.equal(value, tensors[name]), name


@pytest.mark.parametrize("make_overlay", [timm_ghn.ghn_orth, timm_ghn.ghn], ids=["ghn_orth", "ghn"])
def test_overlay_model_equals_file(cache_dir, make_overlay):
    overlay = make_overlay("resnet18", num_classes=10, ghn=IMAGENET_GHN)
    path = Path(overlay["file"])
    model = create_from_overlay(overlay)

    assert path.parent == cache_dir
    assert path.is_file()
    assert overlay["num_classes"] == 10
    assert model.fc.weight.shape == (10, 512)
    assert_state_equals_file(model, path)


def test_overlay_keeps_timm_head_by_default(cache_dir):
    overlay = timm_ghn.ghn_orth("resnet18", num_classes=10, ghn=IMAGENET_GHN)
    model = create_from_overlay(overlay)
    timm_state = seeded_timm_state("resnet18", num_classes=10)

    assert metadata_of(Path(overlay["file"]))["timm_ghn.classifier_predicted"] == "false"
    assert torch.equal(model.fc.weight, timm_state["fc.weight"])
    assert torch.equal(model.fc.bias, timm_state["fc.bias"])


def test_overlay_predict_classifier_true(cache_dir):
    overlay = timm_ghn.ghn_orth("resnet18", num_classes=10, ghn=IMAGENET_GHN, predict_classifier=True)
    model = create_from_overlay(overlay)
    timm_state = seeded_timm_state("resnet18", num_classes=10)

    assert metadata_of(Path(overlay["file"]))["timm_ghn.classifier_predicted"] == "true"
    assert model.fc.weight.shape == (10, 512)
    assert not torch.equal(model.fc.weight, timm_state["fc.weight"])
    assert_state_equals_file(model, Path(overlay["file"]))


def test_overlay_cifar_ghn_predicts_head(cache_dir):
    overlay = timm_ghn.ghn_orth("resnet18", num_classes=10, ghn=CIFAR_GHN)
    model = create_from_overlay(overlay)
    metadata = metadata_of(Path(overlay["file"]))
    timm_state = seeded_timm_state("resnet18", num_classes=10)

    assert metadata["timm_ghn.classifier_predicted"] == "true"
    assert metadata["timm_ghn.ghn_name"] == CIFAR_GHN.name
    assert not torch.equal(model.fc.weight, timm_state["fc.weight"])
    assert_state_equals_file(model, Path(overlay["file"]))


# --- convnext_atto: layer scales are predicted as channel scales -------------------------------


def test_convnext_atto_loads_with_predicted_gamma(tmp_path):
    path = predict(tmp_path / "convnext_atto.safetensors", "convnext_atto")
    model = timm.create_model("convnext_atto")
    load_checkpoint(model, str(path), strict=True)
    tensors = load_file(str(path))
    gammas = sorted(name for name in model.state_dict() if name.endswith(".gamma"))
    unpredicted = json.loads(metadata_of(path)["timm_ghn.unpredicted"])

    assert_state_equals_file(model, path)
    assert len(gammas) == 12
    for name in gammas:
        # The 1-D weight rule 2·sigmoid(p/2) puts every scale in (0, 2); timm's init is 1e-6.
        assert tensors[name].min() > 0, name
        assert tensors[name].max() < 2, name
        assert tensors[name].std() > 0, name
    assert not set(gammas) & set(unpredicted)
