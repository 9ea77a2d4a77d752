"""``--require-coverage``: a prediction that covers less of the model than required fails and writes nothing.

The model is a two-block ViT-Tiny on 32-pixel images with a 10-class head. The bundled GHN was
trained on 5 classes, so it leaves the head at timm's init, and the graph may leave more
parameters (``build_graph(model).unplaced``). The expected numbers come from timm and the graph,
never from the prediction.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open

from conftest import assert_one_error, bundled_ghn_unpredicted

MODEL = "vit_tiny_patch16_224"
MODEL_ARGS = ["--model-kwargs", '{"img_size": 32, "depth": 2}', "--num-classes", "10"]


@pytest.fixture(autouse=True)
def _bundled_ghn(monkeypatch):
    """Predict with the bundled GHN even where ``$TIMM_GHN_CHECKPOINT`` names another."""
    monkeypatch.delenv("TIMM_GHN_CHECKPOINT", raising=False)


@dataclasses.dataclass(frozen=True)
class Expected:
    unpredicted: list[str]
    params_predicted: int
    params_total: int

    @property
    def fraction(self) -> float:
        return self.params_predicted / self.params_total

    @property
    def kinds(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name in self.unpredicted})


@pytest.fixture(scope="module")
def expected() -> Expected:
    with torch.device("meta"):
        model = timm.create_model(MODEL, img_size=32, depth=2, num_classes=10)
    params = dict(model.named_parameters())
    unpredicted = bundled_ghn_unpredicted(model)
    total = sum(p.numel() for p in params.values())
    return Expected(unpredicted, total - sum(params[name].numel() for name in unpredicted), total)


def predict(run_cli, output: Path, *options: str):
    return run_cli("predict", MODEL, *MODEL_ARGS, "-o", str(output), *options)


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def cache_entries() -> list[str]:
    root = Path(os.environ["TIMM_GHN_CACHE"])
    return sorted(p.name for p in root.glob("*.safetensors")) if root.is_dir() else []


def above(fraction: float) -> str:
    """Return a threshold 1e-6 above ``fraction``, as text."""
    return repr(fraction + 1e-6)


# --- what is recorded ----------------------------------------------------------------------------


def test_metadata_records_coverage(run_cli, tmp_path, expected):
    output = tmp_path / "vit.safetensors"
    result = predict(run_cli, output, "--no-cache")
    assert result.status == 0, result.error_lines

    metadata = metadata_of(output)
    assert metadata["timm_ghn.params_predicted"] == str(expected.params_predicted)
    assert metadata["timm_ghn.params_total"] == str(expected.params_total)
    assert metadata["timm_ghn.predicted_fraction"] == f"{expected.fraction:.6f}"
    assert json.loads(metadata["timm_ghn.unpredicted"]) == expected.unpredicted
    assert expected.fraction < 1


def test_prediction_logs_fraction(run_cli, tmp_path, caplog, expected):
    caplog.set_level(logging.INFO, logger="timm_ghn")
    predict(run_cli, tmp_path / "vit.safetensors", "--no-cache")
    percent = f"({100 * expected.fraction:.2f}%)"
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and r.name == "timm_ghn.pipeline"]
    assert any(line.startswith(f"{MODEL}: ") and percent in line for line in lines), lines


# --- fresh predictions ------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [["--no-cache"], []], ids=["no_cache", "cache"])
def test_threshold_above_fails(run_cli, tmp_path, expected, cache):
    threshold = above(expected.fraction)
    result = predict(run_cli, tmp_path / "vit.safetensors", "--require-coverage", threshold, *cache)

    line = assert_one_error(result, MODEL, f"{expected.fraction:.6f}", threshold, "--require-coverage")
    kinds = line.split("left at timm's init: ", 1)[1]
    for kind in expected.kinds:
        assert kind in kinds
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []
    assert cache_entries() == []


@pytest.mark.parametrize("threshold", ["exact", "0", "0.5"])
def test_threshold_at_or_below_passes(run_cli, tmp_path, expected, threshold):
    if threshold == "exact":
        threshold = repr(expected.fraction)
    output = tmp_path / "vit.safetensors"
    result = predict(run_cli, output, "--require-coverage", threshold, "--no-cache")
    assert result.status == 0, result.error_lines
    assert output.is_file()
    assert f"({100 * expected.fraction:.2f}%)" in result.stdout


# --- entries from the cache ------------------------------------------------------------------------


def test_cache_hit_checked(run_cli, tmp_path, expected):
    first = predict(run_cli, tmp_path / "first.safetensors")
    assert first.status == 0, first.error_lines
    assert len(cache_entries()) == 1

    rejected = tmp_path / "rejected.safetensors"
    result = predict(run_cli, rejected, "--require-coverage", above(expected.fraction))
    assert_one_error(result, MODEL, f"{expected.fraction:.6f}", "--require-coverage")
    assert not rejected.exists()

    accepted = tmp_path / "accepted.safetensors"
    result = predict(run_cli, accepted, "--require-coverage", repr(expected.fraction))
    assert result.status == 0, result.error_lines
    assert "from the cache" in result.stdout
    assert f"{100 * expected.fraction:.2f}% of parameters predicted" in result.stdout
    assert accepted.is_file()


def test_pull_checks_coverage(run_cli, tmp_path, expected):
    first = predict(run_cli, tmp_path / "first.safetensors")
    assert first.status == 0, first.error_lines

    rejected = tmp_path / "pulled.safetensors"
    result = run_cli("pull", MODEL, *MODEL_ARGS, "--require-coverage", above(expected.fraction), "-o", str(rejected))
    assert_one_error(result, MODEL, f"{expected.fraction:.6f}")
    assert not rejected.exists()

    result = run_cli("pull", MODEL, *MODEL_ARGS, "--require-coverage", "0.5", "-o", str(rejected))
    assert result.status == 0, result.error_lines
    assert rejected.is_file()


# --- invalid thresholds ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-0.1", "1.5", "abc", "nan", "99%"])
def test_invalid_threshold_rejected(run_cli, tmp_path, value):
    result = predict(run_cli, tmp_path / "vit.safetensors", "--require-coverage", value)
    line = assert_one_error(result, "--require-coverage", "from 0 to 1")
    assert repr(value) in line or value in line
    assert list(tmp_path.iterdir()) == []


# --- entries with older or damaged headers -------------------------------------------------------


def edit_metadata(path: Path, changes: dict[str, str | None]) -> None:
    """Set (or, for ``None``, delete) header metadata values of a safetensors file, keeping its length."""
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        for name, value in changes.items():
            if value is None:
                del header["__metadata__"][name]
            else:
                header["__metadata__"][name] = value
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= length
        handle.seek(8)
        handle.write(text.ljust(length, b" "))


def cached_entry(run_cli, tmp_path) -> Path:
    first = predict(run_cli, tmp_path / "first.safetensors")
    assert first.status == 0, first.error_lines
    (entry,) = Path(os.environ["TIMM_GHN_CACHE"]).glob("*.safetensors")
    return entry


def test_entry_without_counts_uses_fraction(run_cli, tmp_path, expected):
    entry = cached_entry(run_cli, tmp_path)
    edit_metadata(entry, {"timm_ghn.params_predicted": None, "timm_ghn.params_total": None})

    result = predict(run_cli, tmp_path / "rejected.safetensors", "--require-coverage", above(expected.fraction))
    assert_one_error(result, MODEL, f"{expected.fraction:.6f}")
    assert not (tmp_path / "rejected.safetensors").exists()

    result = predict(run_cli, tmp_path / "accepted.safetensors", "--require-coverage", f"{expected.fraction:.6f}")
    assert result.status == 0, result.error_lines


def test_entry_without_fraction(run_cli, tmp_path):
    entry = cached_entry(run_cli, tmp_path)
    edit_metadata(entry, {"timm_ghn.params_predicted": None, "timm_ghn.params_total": None, "timm_ghn.predicted_fraction": None})

    result = predict(run_cli, tmp_path / "rejected.safetensors", "--require-coverage", "0.5")
    assert_one_error(result, entry.name, "cache clear")
    assert not (tmp_path / "rejected.safetensors").exists()

    result = predict(run_cli, tmp_path / "accepted.safetensors")
    assert result.status == 0, result.error_lines
    assert "parameters predicted" not in result.stdout


# --- Python ------------------------------------------------------------------------------------------


def test_python_overlay_raises(tmp_path, expected):
    import timm_ghn

    output = tmp_path / "vit.safetensors"
    with pytest.raises(timm_ghn.CoverageError, match=MODEL):
        timm_ghn.ghn_orth(
            MODEL, num_classes=10, model_kwargs={"img_size": 32, "depth": 2},
            output=output, require_coverage=float(above(expected.fraction)),
        )
    assert not output.exists()
    assert cache_entries() == []
