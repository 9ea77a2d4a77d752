"""Released GHN-2 names: resolved through the Hugging Face cache, with an offline error that names the fix."""

from __future__ import annotations

import shutil

import pytest

from conftest import IMAGENET_GHN, require_reference
from timm_ghn.errors import CheckpointError
from timm_ghn.pipeline import resolve_ghn
from timm_ghn.registry import NAMED_GHNS, download_named_ghn


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


@pytest.mark.parametrize("name", ["ghn2-imagenet", "ghn2-cifar10"])
def test_offline_error_names_fix(offline_cache, name):
    with pytest.raises(CheckpointError) as caught:
        download_named_ghn(name)
    message = str(caught.value)
    assert "HF_HUB_OFFLINE" in message
    assert "--ghn PATH" in message
    assert NAMED_GHNS[name].url in message


def test_cached_ghn2_loads_offline(offline_cache):
    require_reference()
    cached = offline_cache / "timm_ghn-urls" / "facebookresearch--ppuda" / "ghn2_imagenet.pt"
    cached.parent.mkdir(parents=True)
    shutil.copy(IMAGENET_GHN, cached)
    assert download_named_ghn("ghn2-imagenet") == cached
    loaded = resolve_ghn("ghn2-imagenet")
    assert loaded.path == cached
    assert loaded.model.config.num_classes == 1000
