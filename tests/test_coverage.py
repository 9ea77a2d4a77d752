"""``timm-ghn coverage``: one line per matching timm model, checked against ``build_graph``.

The printed counts are compared with the graph of the same model built here. Three small models
registered with timm below cover the failure rows: one whose forward pass fails (no graph), one
whose constructor fails, and one that works.
"""

from __future__ import annotations

import json
import statistics

import pytest
import timm
import torch
from timm.models import register_model
from torch import nn

from conftest import assert_one_error
from timm_ghn.coverage import ArchitectureCoverage, measure_architecture
from timm_ghn.graph import build_graph


@pytest.fixture(autouse=True)
def _bundled_ghn(monkeypatch):
    """Predict with the bundled GHN even where ``$TIMM_GHN_CHECKPOINT`` names another."""
    monkeypatch.delenv("TIMM_GHN_CHECKPOINT", raising=False)


class _FailingForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this forward pass always fails")


class _SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@register_model
def timm_ghn_test_failing_forward(pretrained=False, **kwargs):
    return _FailingForward()


@register_model
def timm_ghn_test_failing_constructor(pretrained=False, **kwargs):
    raise ValueError("this constructor always fails")


@register_model
def timm_ghn_test_small(pretrained=False, **kwargs):
    return _SmallConvNet()


def expected_row(name: str) -> dict:
    """Return the values a coverage row must show for ``name``, from the graph built here."""
    with torch.device("meta"):
        model = timm.create_model(name)
    params = dict(model.named_parameters())
    unplaced = build_graph(model).unplaced
    total = sum(p.numel() for p in params.values())
    placed = total - sum(params[n].numel() for n in unplaced)
    return {
        "tensors": f"{len(params) - len(unplaced)}/{len(params)}",
        "params": f"{100 * placed / total:.2f}%",
        "kinds": ", ".join(sorted({n.rsplit(".", 1)[-1] for n in unplaced})) or "-",
        "fully_placed": placed / total >= 0.99,
    }


def parse_rows(stdout: str, predict: bool = False) -> tuple[str, dict[str, list[str]], str]:
    """Split the output into header, rows by model name, and summary line."""
    lines = stdout.splitlines()
    header, summary = lines[0], lines[-1]
    columns = 6 if predict else 5
    rows = {}
    for line in lines[1:-1]:
        parts = line.split(maxsplit=columns)
        rows[parts[0]] = parts[1:]
    return header, rows, summary


def test_single_model(run_cli):
    result = run_cli("coverage", "resnet18")
    assert result.status == 0, result.error_lines
    header, rows, summary = parse_rows(result.stdout)

    assert header.split()[:5] == ["model", "graph", "tensors", "params", "graph"]
    assert list(rows) == ["resnet18"]
    status, tensors, params, seconds, kinds = rows["resnet18"]
    expected = expected_row("resnet18")
    assert status == "ok"
    assert tensors == expected["tensors"]
    assert params == expected["params"]
    assert kinds == expected["kinds"]
    assert float(seconds) > 0
    assert summary == (
        f"models: 1, graphs built: 1, with >= 99% of parameters placed: {int(expected['fully_placed'])}, "
        f"median graph time: {seconds} s"
    )


def test_pattern_matches_several(run_cli):
    result = run_cli("coverage", "test_convnext*")
    assert result.status == 0, result.error_lines
    _, rows, summary = parse_rows(result.stdout)

    names = ["test_convnext", "test_convnext2", "test_convnext3"]
    assert list(rows) == names
    fully_placed = 0
    for name in names:
        status, tensors, params, _, kinds = rows[name]
        expected = expected_row(name)
        assert status == "ok", name
        assert tensors == expected["tensors"], name
        assert params == expected["params"], name
        assert kinds == expected["kinds"], name
        fully_placed += expected["fully_placed"]
    median = statistics.median(float(rows[name][3]) for name in names)
    assert summary == (
        f"models: 3, graphs built: 3, with >= 99% of parameters placed: {fully_placed}, "
        f"median graph time: {median:.3f} s"
    )


def test_failures_reported_per_model(run_cli):
    result = run_cli("coverage", "timm_ghn_test_*")
    assert result.status == 0, result.error_lines
    _, rows, summary = parse_rows(result.stdout)

    assert sorted(rows) == ["timm_ghn_test_failing_constructor", "timm_ghn_test_failing_forward", "timm_ghn_test_small"]
    constructor = rows["timm_ghn_test_failing_constructor"]
    assert constructor[0] == "error"
    assert "create: ValueError" in " ".join(constructor)
    forward = rows["timm_ghn_test_failing_forward"]
    assert forward[0] == "error"
    assert "graph: " in " ".join(forward)
    assert "this forward pass always fails" in " ".join(forward)
    assert rows["timm_ghn_test_small"][:3] == ["ok", "6/6", "100.00%"]
    assert summary.startswith("models: 3, graphs built: 1, with >= 99% of parameters placed: 1,")


def test_predict_tiny_model(run_cli, tmp_path):
    output = tmp_path / "coverage.json"
    result = run_cli("coverage", "test_vit", "--predict", "--json", str(output))
    assert result.status == 0, result.error_lines
    header, rows, summary = parse_rows(result.stdout, predict=True)
    assert "predicted" in header.split()

    with torch.device("meta"):
        model = timm.create_model("test_vit")
    params = dict(model.named_parameters())
    # The coverage measurement predicts the head whatever its class count, so only what the
    # graph leaves is missing.
    left = build_graph(model).unplaced
    total = sum(p.numel() for p in params.values())
    predicted = total - sum(params[n].numel() for n in left)

    assert rows["test_vit"][4] == f"{100 * predicted / total:.2f}%"
    assert summary.endswith(", predicted: 1, prediction failures: 0")
    record = json.loads(output.read_text())["test_vit"]
    assert record["predicted_params"] == predicted
    assert record["predicted_tensors"] == len(params) - len(left)
    assert record["params"] == total
    assert record["predict_seconds"] > 0


def test_predict_skips_large_model(run_cli):
    result = run_cli("coverage", "test_vit", "--predict", "--max-params", "1000")
    assert result.status == 0, result.error_lines
    _, rows, summary = parse_rows(result.stdout, predict=True)
    assert rows["test_vit"][4] == "skipped"
    assert "predicted:" not in summary


def test_pattern_matching_nothing(run_cli):
    result = run_cli("coverage", "resnt18")
    line = assert_one_error(result, "'resnt18'", "resnet18")
    assert result.stdout == ""
    assert "fnmatch" in line


def test_max_params_needs_predict(run_cli):
    result = run_cli("coverage", "resnet18", "--max-params", "1000")
    assert_one_error(result, "--max-params", "--predict")


def test_help_documents_options(run_cli):
    result = run_cli("coverage", "--help")
    assert result.status == 0
    text = " ".join(result.stdout.split())
    for option in ["PATTERN", "--predict", "--max-params", "--ghn", "--json"]:
        assert option in text
    assert "default: 30,000,000" in text
    assert "in parameters" in text


def test_record_round_trip():
    measured = measure_architecture("timm_ghn_test_small")
    record = measured.to_record()
    assert "name" not in record
    assert ArchitectureCoverage.from_record("timm_ghn_test_small", record) == measured
