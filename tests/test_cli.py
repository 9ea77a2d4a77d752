"""``timm-ghn`` on bad input: one error line on stderr, a non-zero status, and no output file.

Each case calls ``timm_ghn.cli.main`` in this process. Python warnings and log records at
WARNING or above count as extra stderr lines, because a real run prints them there.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_ghn.export
from conftest import IMAGENET_GHN, TRACEBACK, CliResult, assert_one_error, require_reference


class CustomConfig:
    """A class that a GHN checkpoint must never need: ``weights_only`` loading rejects it."""

    def __init__(self) -> None:
        self.num_classes = 1000


class ShellCommand:
    """Pickles as a call of ``os.system(command)``, so unpickling it runs the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def ghn_path() -> Path:
    require_reference()
    return IMAGENET_GHN


@pytest.fixture
def out_dir(tmp_path) -> Path:
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


@pytest.fixture
def output(out_dir) -> Path:
    return out_dir / "init.safetensors"


def assert_usage_error(result: CliResult, *named: str) -> str:
    """Check an argparse usage error (status 2, usage text, then one ``error:`` line), and return that line."""
    assert result.status == 2
    assert not any(TRACEBACK in line for line in result.stderr_lines)
    assert not result.warnings
    error_lines = [line for line in result.stderr_lines if ": error: " in line]
    assert len(error_lines) == 1, result.stderr_lines
    line = error_lines[0]
    assert line == result.stderr_lines[-1]
    assert line.startswith("timm-ghn predict: error: "), line
    for value in named:
        assert value in line
    return line


def assert_empty(directory: Path) -> None:
    assert sorted(p.name for p in directory.iterdir()) == []


# --- model name -----------------------------------------------------------------------------------


def test_unknown_model_suggests_match(run_cli, ghn_path, output, out_dir):
    result = run_cli("predict", "resnet5", "--ghn", str(ghn_path), "-o", str(output))
    line = assert_one_error(result, "'resnet5'")
    assert "resnet50" in line
    assert_empty(out_dir)


# --- GHN checkpoints --------------------------------------------------------------------------------


def write_text(path: Path) -> None:
    path.write_text("this is a text file, not a checkpoint\n")


def write_truncated(path: Path) -> None:
    require_reference()
    data = IMAGENET_GHN.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_dict_without_config(path: Path) -> None:
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "epoch": 1}, path)


def write_resnet_state_dict(path: Path) -> None:
    torch.save(timm.create_model("resnet18").state_dict(), path)


def write_resnet_safetensors(path: Path) -> None:
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}, str(path))


# (case id, file name, writer, substrings the error line must contain besides the path)
BAD_CHECKPOINTS = [
    ("text", "ghn.pt", write_text, ["not a GHN checkpoint"]),
    ("truncated", "ghn.pt", write_truncated, ["truncated or corrupt"]),
    ("dict_without_config", "ghn.pt", write_dict_without_config, ["'config'"]),
    ("resnet_state_dict", "resnet18.pt", write_resnet_state_dict, ["not a GHN checkpoint"]),
    ("resnet_safetensors", "resnet18.safetensors", write_resnet_safetensors, ["not a timm_ghn GHN checkpoint"]),
]


@pytest.mark.parametrize(
    "file_name, write, expected", [case[1:] for case in BAD_CHECKPOINTS], ids=[case[0] for case in BAD_CHECKPOINTS]
)
def test_bad_checkpoint_rejected(run_cli, tmp_path, output, out_dir, file_name, write, expected):
    checkpoint = tmp_path / file_name
    write(checkpoint)

    result = run_cli("predict", "resnet18", "--ghn", str(checkpoint), "-o", str(output))

    assert_one_error(result, str(checkpoint), *expected)
    assert_empty(out_dir)


def test_missing_checkpoint(run_cli, tmp_path, output, out_dir):
    checkpoint = tmp_path / "missing.pt"
    result = run_cli("predict", "resnet18", "--ghn", str(checkpoint), "-o", str(output))
    assert_one_error(result, str(checkpoint), "not found")
    assert_empty(out_dir)


@pytest.mark.parametrize(
    "config, global_name",
    [
        (CustomConfig(), f"{CustomConfig.__module__}.{CustomConfig.__qualname__}"),
        (argparse.Namespace(num_classes=1000), "argparse.Namespace"),
    ],
    ids=["custom_class", "namespace"],
)
def test_checkpoint_with_python_object(run_cli, tmp_path, output, out_dir, config, global_name):
    checkpoint = tmp_path / "ghn.pt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "config": config}, checkpoint)

    result = run_cli("predict", "resnet18", "--ghn", str(checkpoint), "-o", str(output))

    assert_one_error(result, str(checkpoint), global_name)
    assert_empty(out_dir)


def write_pickle_protocol_2(path: Path, payload: object) -> None:
    path.write_bytes(pickle.dumps(payload, protocol=2))


def write_pickle_default(path: Path, payload: object) -> None:
    path.write_bytes(pickle.dumps(payload))


def write_torch_save(path: Path, payload: object) -> None:
    torch.save({"state_dict": {}, "config": payload}, path)


@pytest.mark.parametrize(
    "write", [write_pickle_protocol_2, write_pickle_default, write_torch_save], ids=["protocol_2", "protocol_default", "torch_save"]
)
def test_malicious_pickle_not_executed(run_cli, tmp_path, output, out_dir, write):
    marker = tmp_path / "MARKER"
    checkpoint = tmp_path / "ghn.pt"
    write(checkpoint, ShellCommand(f"touch {marker}"))

    result = run_cli("predict", "resnet18", "--ghn", str(checkpoint), "-o", str(output))

    assert not marker.exists()
    line = assert_one_error(result, str(checkpoint))
    assert "refusing to load" in line
    assert_empty(out_dir)


def test_malicious_pickle_names_global(run_cli, tmp_path, output):
    checkpoint = tmp_path / "ghn.pt"
    write_pickle_protocol_2(checkpoint, ShellCommand(f"touch {tmp_path / 'MARKER'}"))
    result = run_cli("predict", "resnet18", "--ghn", str(checkpoint), "-o", str(output))
    assert_one_error(result, f"{os.system.__module__}.{os.system.__name__}")


# --- output path ----------------------------------------------------------------------------------


def test_output_directory_missing(run_cli, ghn_path, tmp_path):
    missing = tmp_path / "missing"
    result = run_cli("predict", "resnet18", "--ghn", str(ghn_path), "-o", str(missing / "init.safetensors"))
    assert_one_error(result, str(missing), "does not exist")
    assert not missing.exists()


def test_output_is_directory(run_cli, ghn_path, out_dir):
    target = out_dir / "init.safetensors"
    target.mkdir()
    result = run_cli("predict", "resnet18", "--ghn", str(ghn_path), "-o", str(target))
    assert_one_error(result, str(target), "is a directory")
    assert sorted(p.name for p in out_dir.iterdir()) == ["init.safetensors"]
    assert_empty(target)


def test_output_parent_is_file(run_cli, ghn_path, tmp_path):
    parent = tmp_path / "notes.txt"
    parent.write_text("keep me\n")
    result = run_cli("predict", "resnet18", "--ghn", str(ghn_path), "-o", str(parent / "init.safetensors"))
    assert_one_error(result, str(parent), "not a directory")
    assert parent.read_text() == "keep me\n"


def test_failed_write_leaves_no_file(run_cli, ghn_path, output, out_dir, monkeypatch):
    def fail_after_some_bytes(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 16)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(timm_ghn.export, "save_file", fail_after_some_bytes)

    result = run_cli("predict", "resnet18", "--ghn", str(ghn_path), "-o", str(output))

    assert_one_error(result, str(output), "No space left on device")
    assert_empty(out_dir)


# --- option values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, named",
    [
        ("--beta", "-1", "beta -1"),
        ("--beta", "nan", "beta nan"),
        ("--start-layer", "-3", "start layer -3"),
        ("--num-classes", "0", "--num-classes 0"),
        ("--model-kwargs", "{drop_rate: 0.1}", "{drop_rate: 0.1}"),
        ("--model-kwargs", "[1, 2]", "[1, 2]"),
    ],
    ids=["beta_negative", "beta_nan", "start_layer_negative", "num_classes_zero", "kwargs_not_json", "kwargs_not_object"],
)
def test_invalid_option_value(run_cli, ghn_path, output, out_dir, option, value, named):
    result = run_cli("predict", "resnet18", "--ghn", str(ghn_path), "-o", str(output), option, value)
    line = assert_one_error(result, named)
    assert re.search(r"\binvalid\b", line)
    assert_empty(out_dir)


def test_model_kwargs_unknown_argument(run_cli, ghn_path, output, out_dir):
    result = run_cli("predict", "resnet18", "--ghn", str(ghn_path), "-o", str(output), "--model-kwargs", '{"bogus": 1}')
    assert_one_error(result, "'resnet18'", "bogus")
    assert_empty(out_dir)


def test_no_checkpoint_given(run_cli, output, out_dir, monkeypatch):
    import timm_ghn.cache
    import timm_ghn.pipeline

    monkeypatch.delenv("TIMM_GHN_CHECKPOINT", raising=False)
    missing = out_dir / "no-bundled-ghn.safetensors"
    monkeypatch.setattr(timm_ghn.pipeline, "DEFAULT_GHN", missing)
    monkeypatch.setattr(timm_ghn.cache, "DEFAULT_GHN", missing)
    result = run_cli("predict", "resnet18", "-o", str(output))
    assert_one_error(result, "--ghn", "TIMM_GHN_CHECKPOINT")
    assert_empty(out_dir)


@pytest.mark.parametrize("option", ["--variant", "--method"])
def test_invalid_choice_is_usage_error(run_cli, ghn_path, output, out_dir, option):
    result = run_cli("predict", "resnet18", "--ghn", str(ghn_path), "-o", str(output), option, "bogus")
    assert_usage_error(result, option, "'bogus'")
    assert_empty(out_dir)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available, so --device cuda is valid here")
def test_cuda_device_without_cuda(run_cli, ghn_path, output, out_dir):
    result = run_cli("predict", "resnet18", "--ghn", str(ghn_path), "-o", str(output), "--device", "cuda")
    line = assert_one_error(result, "'cuda'")
    assert "--device cpu" in line
    assert_empty(out_dir)


# --- help ----------------------------------------------------------------------------------------

PREDICT_OPTIONS = ["--method", "--ghn", "--num-classes", "--beta", "--start-layer", "--variant", "--seed", "--device", "-o"]


def test_top_level_help(run_cli):
    result = run_cli("--help")
    assert result.status == 0
    assert "predict" in result.stdout
    assert "--verbose" in result.stdout
    assert result.stderr_lines == []


@pytest.mark.parametrize("option", PREDICT_OPTIONS)
def test_predict_help_lists_option(run_cli, option):
    result = run_cli("predict", "--help")
    assert result.status == 0
    assert re.search(rf"(^|[\s\[,]){re.escape(option)}\b", result.stdout), result.stdout
    assert result.stderr_lines == []
