"""Shared fixtures: reference vectors from the sibling ``shared/`` folder and loaded GHNs."""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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


# --- running the CLI in this process -------------------------------------------------------

# Warning categories that Python's default filters hide, so they never reach stderr.
HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)

TRACEBACK = "Traceback (most recent call last)"


@dataclass
class CliResult:
    status: int
    stdout: str
    stderr_lines: list[str]
    warnings: list[warnings.WarningMessage] = field(default_factory=list)
    log_records: list[logging.LogRecord] = field(default_factory=list)

    @property
    def error_lines(self) -> list[str]:
        """Every line a real run would print to stderr: output, warnings and log records."""
        lines = list(self.stderr_lines)
        lines += [f"{w.category.__name__}: {w.message}" for w in self.warnings]
        lines += [f"{r.levelname} {r.name}: {r.getMessage()}" for r in self.log_records]
        return lines


@pytest.fixture
def run_cli(capsys, caplog) -> Callable[..., CliResult]:
    def run(*args: str) -> CliResult:
        from timm_ghn.cli import main

        caplog.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                status = main(list(args))
            except SystemExit as exit_:
                status = exit_.code
        captured = capsys.readouterr()
        visible_warnings = [w for w in caught if not issubclass(w.category, HIDDEN_WARNINGS)]
        records = [r for r in caplog.records if r.levelno >= logging.WARNING]
        return CliResult(status, captured.out, captured.err.splitlines(), visible_warnings, records)

    return run


def assert_one_error(result: CliResult, *named: str, status: int = 1) -> str:
    """Check the status and the single ``timm-ghn: error:`` line, and return that line."""
    assert result.status == status
    assert not any(TRACEBACK in line for line in result.stderr_lines)
    assert len(result.error_lines) == 1, result.error_lines
    line = result.error_lines[0]
    assert line.startswith("timm-ghn: error: "), line
    for value in named:
        assert value in line
    return line


# --- what a prediction with the bundled GHN leaves ---------------------------------------------

#: Classes of the bundled GHN; a head with another number of classes keeps timm's init.
BUNDLED_GHN_CLASSES = 5


def bundled_ghn_unpredicted(model: torch.nn.Module) -> list[str]:
    """Return the parameter names that a prediction with the bundled GHN leaves at timm's init.

    They are the parameters the graph does not place and, when the head's classes differ from the
    bundled GHN's, the head. The names come from timm and the graph, never from a prediction.
    """
    from timm_ghn.graph import build_graph

    left = set(build_graph(model).unplaced)
    if model.num_classes != BUNDLED_GHN_CLASSES:
        left |= {name for name, param in model.named_parameters() if any(param is p for p in model.get_classifier().parameters())}
    return [name for name, _ in model.named_parameters() if name in left]
