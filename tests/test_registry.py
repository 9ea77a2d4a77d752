"""Named GHNs resolved through the Hugging Face cache, offline."""

from __future__ import annotations

import shutil

import pytest
from huggingface_hub import constants

from conftest import SHARED
from timm_ghn import CheckpointError
from timm_ghn.hypernet import GHN3, file_sha256
from timm_ghn.pipeline import resolve_ghn

TM8 = SHARED / "reference" / "ghn3" / "ghn3tm8_rand_seed0.pt"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _cache_file(cache, source, digest):
    """Lay out ``source`` in the Hub cache as SamsungSAILMontreal/ghn3 ghn3tm8.pt (blob named by SHA-256)."""
    repo = cache / "models--SamsungSAILMontreal--ghn3"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    blob = repo / "blobs" / digest
    shutil.copyfile(source, blob)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT / "ghn3tm8.pt").symlink_to(blob)
    return blob


def test_offline_name_without_cache_says_how(offline_cache):
    with pytest.raises(CheckpointError) as error:
        resolve_ghn("ghn3-tm8")

    message = str(error.value)
    assert "ghn3-tm8" in message
    assert "--ghn PATH" in message
    assert "SamsungSAILMontreal/ghn3" in message


def test_cached_name_resolves_and_loads(offline_cache):
    if not TM8.is_file():
        pytest.skip(f"GHN-3 reference file not found: {TM8}")
    _cache_file(offline_cache, TM8, file_sha256(TM8))

    loaded = resolve_ghn("ghn3-tm8")

    assert isinstance(loaded.model, GHN3)
    assert loaded.sha256 == file_sha256(TM8)


def test_cached_file_with_wrong_hash_is_rejected(offline_cache):
    if not TM8.is_file():
        pytest.skip(f"GHN-3 reference file not found: {TM8}")
    _cache_file(offline_cache, TM8, "0" * 64)

    with pytest.raises(CheckpointError, match="corrupt"):
        resolve_ghn("ghn3-tm8")
