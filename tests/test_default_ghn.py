"""The GHN bundled with the package: the default of every prediction when no checkpoint is named."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

import timm_ghn.pipeline as pipeline
from conftest import IMAGENET_GHN, require_reference
from timm_ghn.cli import main
from timm_ghn.errors import TimmGhnError
from timm_ghn.pipeline import DEFAULT_GHN, GHN_ENV, resolve_ghn

SOURCE_CLASSES = ["airplane", "automobile", "bird", "cat", "deer"]


def test_bundled_ghn_is_default(monkeypatch):
    monkeypatch.delenv(GHN_ENV, raising=False)
    loaded = resolve_ghn(None)
    assert loaded.path == DEFAULT_GHN
    assert loaded.model.config.num_classes == len(SOURCE_CLASSES)
    assert DEFAULT_GHN.stat().st_size < 20_000_000


def test_bundled_ghn_records_training():
    with safe_open(str(DEFAULT_GHN), framework="pt") as handle:
        metadata = handle.metadata()
    config = json.loads(metadata["timm_ghn.training.config"])
    assert json.loads(metadata["timm_ghn.training.classes"]) == SOURCE_CLASSES
    assert int(metadata["timm_ghn.training.step"]) == config["steps"]


def test_environment_overrides_bundled(monkeypatch):
    require_reference()
    monkeypatch.setenv(GHN_ENV, str(IMAGENET_GHN))
    assert resolve_ghn(None).path == IMAGENET_GHN


def test_missing_bundled_ghn_names_fix(monkeypatch, tmp_path):
    monkeypatch.delenv(GHN_ENV, raising=False)
    monkeypatch.setattr(pipeline, "DEFAULT_GHN", tmp_path / "missing.safetensors")
    with pytest.raises(TimmGhnError, match="--ghn PATH"):
        resolve_ghn(None)


def test_predict_without_ghn_option(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(GHN_ENV, raising=False)
    monkeypatch.setenv("TIMM_GHN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output = tmp_path / "resnet18.safetensors"
    assert main(["predict", "resnet18", "--num-classes", "5", "-o", str(output)]) == 0
    assert output.is_file()
    assert str(output) in capsys.readouterr().out
