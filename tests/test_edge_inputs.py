"""Inputs a new user tries: special output paths, odd constructor arguments, out-of-range options."""

from __future__ import annotations

import os

import pytest
import timm
import torch

from conftest import IMAGENET_GHN, require_reference
from timm_ghn import InvalidOptionError, OutputPathError, ghn_orth_
from timm_ghn.cli import main
from timm_ghn.export import check_output_path
from timm_ghn.graph import build_graph, default_input_size


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("timm-ghn: error:")
    return lines[0]


def test_output_symlink_rejected(tmp_path):
    target = tmp_path / "target.safetensors"
    target.write_bytes(b"keep")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)

    with pytest.raises(OutputPathError, match="not a regular file"):
        check_output_path(link)


def test_output_fifo_rejected(tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)

    with pytest.raises(OutputPathError, match="not a regular file"):
        check_output_path(fifo)


def test_convert_onto_input_rejected(tmp_path, capsys):
    require_reference()
    copy = tmp_path / "ghn.pt"
    copy.write_bytes(IMAGENET_GHN.read_bytes())
    before = copy.read_bytes()

    status = main(["convert", str(copy), "-o", str(copy)])

    assert status == 1
    assert "is the input checkpoint" in _error_line(capsys)
    assert copy.read_bytes() == before


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("resnet18", {"in_chans": 1}, (1, 224, 224)),
        ("vit_tiny_patch16_224", {"img_size": 64}, (3, 64, 64)),
        ("vit_tiny_patch16_224", {"in_chans": 4}, (4, 224, 224)),
    ],
)
def test_input_size_follows_constructor(name, kwargs, expected):
    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)

    assert default_input_size(model) == expected
    assert build_graph(model).num_nodes > 0


def test_start_layer_past_last_rejected():
    model = timm.create_model("resnet18")

    with pytest.raises(InvalidOptionError, match="at most 20"):
        ghn_orth_(model, start_layer=21)


def test_start_layer_zero_means_one():
    first = timm.create_model("test_resnet")
    second = timm.create_model("test_resnet")
    second.load_state_dict(first.state_dict())

    zero = ghn_orth_(first, start_layer=0, seed=3)
    one = ghn_orth_(second, start_layer=1, seed=3)

    assert zero.start_layer == one.start_layer == 1
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (["--seed", "99999999999999999999"], "invalid seed"),
        (["--num-classes", "5", "--model-kwargs", '{"num_classes": 7}'], "conflicts"),
    ],
)
def test_predict_option_errors(arguments, fragment, tmp_path, capsys):
    require_reference()
    output = tmp_path / "out.safetensors"

    status = main(["predict", "resnet18", "--ghn", str(IMAGENET_GHN), "-o", str(output), *arguments])

    assert status == 1
    assert fragment in _error_line(capsys)
    assert not output.exists()


def test_cache_dir_that_is_a_file(tmp_path, monkeypatch, capsys):
    require_reference()
    not_a_directory = tmp_path / "cache"
    not_a_directory.write_text("")
    monkeypatch.setenv("TIMM_GHN_CACHE", str(not_a_directory))

    status = main(["predict", "resnet18", "--ghn", str(IMAGENET_GHN), "-o", str(tmp_path / "out.safetensors")])

    assert status == 1
    assert "is not a directory" in _error_line(capsys)


def test_checkpoint_directory_gives_one_line(tmp_path, capsys):
    status = main(["predict", "resnet18", "--ghn", str(tmp_path), "-o", str(tmp_path / "out.safetensors")])

    assert status == 1
    assert "not a file" in _error_line(capsys)
