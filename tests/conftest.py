"""Shared fixtures: reference vectors from the sibling ``shared/`` folder and loaded GHNs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GHN2_REFERENCE = SHARED / "reference" / "ghn2"
IMAGENET_GHN = GHN2_REFERENCE / "ghn2_imagenet_random_seed0.pt"
CIFAR_GHN = GHN2_REFERENCE / "ghn2_cifar10_random_seed1.pt"


def require_reference() -> None:
    if not IMAGENET_GHN.is_file():
        pytest.skip(f"GHN-2 reference files not found under {GHN2_REFERENCE}")


def load_reference(name: str) -> dict:
    require_reference()
    return json.loads((GHN2_REFERENCE / name).read_text())


@pytest.fixture(scope="session")
def imagenet_ghn():
    from timm_ghn import load_ghn

    require_reference()
    return load_ghn(IMAGENET_GHN)


@pytest.fixture(scope="session")
def cifar_ghn():
    from timm_ghn import load_ghn

    require_reference()
    return load_ghn(CIFAR_GHN)


def fingerprint_errors(tensor: torch.Tensor, reference: dict) -> tuple[float, float, float]:
    """Return the three normalised errors of the reference README: sum, sum of squares, first 8."""
    values = tensor.detach().double().flatten()
    n = values.numel()
    sum_sq_ref = reference.get("sum_sq", reference.get("sumsq"))
    scale = math.sqrt(n * sum_sq_ref) if sum_sq_ref > 0 else 1.0
    rms = math.sqrt(sum_sq_ref / n) if sum_sq_ref > 0 else 1.0
    d_sum = abs(values.sum().item() - reference["sum"]) / scale
    d_sum_sq = abs((values**2).sum().item() - sum_sq_ref) / (sum_sq_ref if sum_sq_ref > 0 else 1.0)
    first = values[: len(reference["first8"])].tolist()
    d_first = max(abs(a - b) for a, b in zip(first, reference["first8"])) / rms
    return d_sum, d_sum_sq, d_first


@pytest.fixture(scope="session", autouse=True)
def _session_cache_dir(tmp_path_factory):
    """Keep every test, module-scoped fixtures included, away from the user's cache and Hub repos."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIMM_GHN_CACHE", str(tmp_path_factory.mktemp("timm_ghn_session_cache")))
        patch.delenv("TIMM_GHN_HUB_REPO", raising=False)
        yield


@pytest.fixture(autouse=True)
def _test_cache_dir(tmp_path_factory, monkeypatch):
    """Give each test a fresh, empty cache directory, so no test reads another's entries."""
    monkeypatch.setenv("TIMM_GHN_CACHE", str(tmp_path_factory.mktemp("timm_ghn_cache")))
