"""GHN training: architecture sampler, in-memory image data, trainer, resume, DDP and evaluation."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from timm_ghn.architectures import FAMILIES, HELD_OUT, ArchitectureSampler, held_out_specs
from timm_ghn.data import DatasetError, augment_batch, load_image_folder
from timm_ghn.errors import InvalidOptionError
from timm_ghn.graph import build_graph
from timm_ghn.hypernet import GHN2, GHNConfig, load_ghn
from timm_ghn.train import GHNLoss, TrainConfig, checkpoint_paths, train

ROOT = Path(__file__).resolve().parents[1]

# A tiny training setup: 16x16 images, small ResNets and ViTs, a GHN of width 16.
TINY = dict(
    classes=None, steps=4, arch_batch=2, image_batch=8, hid=16, max_shape=(16, 16, 3, 3), image_size=16,
    num_architectures=3, families=["resnet", "vit"], min_params=5_000, max_params=150_000,
    checkpoint_every=2, warmup_steps=1, threads=1,
)


def _write_folder(root: Path, classes: dict[str, int], size: int = 16, seed: int = 0) -> Path:
    """Write ``train/<class>/<i>.png`` images whose mean colour depends on the class."""
    rng = np.random.default_rng(seed)
    for label, (name, count) in enumerate(classes.items()):
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            pixels = rng.integers(0, 80, (size, size, 3)) + 80 * label
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index:03d}.png")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("images"), {"ant": 12, "bee": 12, "cat": 12})


def _config(data: Path, output: Path, **overrides) -> TrainConfig:
    values = dict(TINY)
    values.update(overrides)
    return TrainConfig(data=str(data), output=str(output), **values)


# ---------------------------------------------------------------------------------------------
# Sampler


def test_sampler_same_seed_same_specs():
    first = [s.key() for s in ArchitectureSampler(num_classes=5, seed=3).sample_many(8)]
    second = [s.key() for s in ArchitectureSampler(num_classes=5, seed=3).sample_many(8)]
    other = [s.key() for s in ArchitectureSampler(num_classes=5, seed=4).sample_many(8)]
    assert first == second
    assert first != other


def test_sampler_respects_budget_per_family():
    sampler = ArchitectureSampler(num_classes=5, min_params=100_000, max_params=400_000, seed=0)
    for family in FAMILIES:
        for _ in range(2):
            spec = sampler.sample(family)
            count = spec.num_params(5)
            assert spec.family == family
            assert 100_000 <= count <= 400_000, (spec.key(), count)


def test_sampler_skips_excluded_spec():
    first = ArchitectureSampler(num_classes=5, seed=11).sample()
    again = ArchitectureSampler(num_classes=5, seed=11, exclude=[first]).sample(first.family)
    assert again.key() != first.key()


def test_sampler_rejects_bad_options():
    with pytest.raises(InvalidOptionError, match="unknown architecture families"):
        ArchitectureSampler(families=["lenet"])
    with pytest.raises(InvalidOptionError, match="invalid parameter budget"):
        ArchitectureSampler(min_params=10, max_params=5)


def test_held_out_specs_cover_families():
    specs = held_out_specs()
    assert len(specs) >= 8
    assert len({spec.family for spec in specs}) >= 4
    pool = {s.key() for s in ArchitectureSampler(num_classes=5, seed=0).sample_many(30)}
    assert not pool & {spec.key() for spec in specs}


@pytest.mark.parametrize("name", sorted(HELD_OUT))
def test_held_out_spec_builds_and_traces(name):
    model = HELD_OUT[name].build(num_classes=5, img_size=32)
    graph = build_graph(model, (3, 32, 32))
    output = model.eval()(torch.randn(2, 3, 32, 32))
    assert output.shape == (2, 5)
    assert graph.num_nodes > 10


# ---------------------------------------------------------------------------------------------
# Data


def test_folder_and_zip_load_equal(image_folder, tmp_path):
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(image_folder.rglob("*.png")):
            handle.write(path, path.relative_to(image_folder).as_posix())
    from_dir = load_image_folder(image_folder, "train", image_size=16)
    from_zip = load_image_folder(archive, "train", image_size=16)
    assert from_dir.classes == ["ant", "bee", "cat"]
    assert from_dir.images.shape == (36, 3, 16, 16)
    assert from_dir.images.dtype == torch.uint8
    assert torch.equal(from_dir.images, from_zip.images)
    assert torch.equal(from_dir.labels, from_zip.labels)


def test_class_filter_relabels_in_given_order(image_folder):
    data = load_image_folder(image_folder, "train", classes=["cat", "ant"], image_size=16)
    assert data.classes == ["cat", "ant"]
    assert data.labels.bincount().tolist() == [12, 12]
    # cat images are brighter than ant images (mean colour grows with the sorted label).
    assert data.images[data.labels == 0].float().mean() > data.images[data.labels == 1].float().mean()


def test_data_errors_name_the_fix(image_folder, tmp_path):
    with pytest.raises(DatasetError, match="dataset not found"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty" / "train" / "ant").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images found"):
        load_image_folder(tmp_path / "empty")
    with pytest.raises(DatasetError, match="unknown classes"):
        load_image_folder(image_folder, classes=["dog"])
    with pytest.raises(DatasetError, match="split directory not found"):
        load_image_folder(image_folder, split="test")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="cannot read"):
        load_image_folder(tmp_path / "bad.zip")


def test_augment_keeps_shape_and_pixels():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = augment_batch(images, torch.Generator().manual_seed(0), padding=0)
    assert out.shape == images.shape
    for index in range(2):
        assert torch.equal(out[index], images[index]) or torch.equal(out[index], images[index].flip(-1))


# ---------------------------------------------------------------------------------------------
# Trainer


def test_train_step_changes_ghn(image_folder, tmp_path):
    output = tmp_path / "ghn.safetensors"
    ghn = train(_config(image_folder, output, steps=1))
    torch.manual_seed(0)
    initial = GHN2(ghn.config)
    changed = [name for name, value in ghn.state_dict().items() if not torch.equal(value, initial.state_dict()[name])]
    assert changed
    assert output.is_file()
    assert checkpoint_paths(output)[1].is_file()


def test_loss_decreases_on_fixed_batch(image_folder):
    data = load_image_folder(image_folder, image_size=16)
    torch.manual_seed(0)
    ghn = GHN2(GHNConfig(max_shape=(16, 16, 3, 3), num_classes=3, hid=16))
    sampler = ArchitectureSampler(["resnet"], 5_000, 150_000, num_classes=3, img_size=16, seed=1)
    models = [spec.build(3, 16).train().requires_grad_(False) for spec in sampler.sample_many(2)]
    graphs = [build_graph(model, (3, 16, 16)) for model in models]
    images = [(data.images.float() / 255 - 0.5) / 0.25] * 2
    labels = [data.labels] * 2
    module = GHNLoss(ghn, label_smoothing=0.0)
    optimizer = torch.optim.Adam(ghn.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss, _, _ = module(models, graphs, images, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_resume_matches_uninterrupted_run(image_folder, tmp_path):
    whole = train(_config(image_folder, tmp_path / "whole.safetensors"))
    interrupted = tmp_path / "parts.safetensors"
    train(_config(image_folder, interrupted, stop_after=2))
    assert torch.load(checkpoint_paths(interrupted)[1], weights_only=True)["step"] == 2
    resumed = train(_config(image_folder, interrupted))
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)


def test_resume_rejects_other_ghn_config(image_folder, tmp_path):
    output = tmp_path / "ghn.safetensors"
    train(_config(image_folder, output, steps=1))
    with pytest.raises(InvalidOptionError, match="cannot resume"):
        train(_config(image_folder, output, steps=2, hid=32))


def test_checkpoint_loads_into_prediction_path(image_folder, tmp_path):
    from timm_ghn.pipeline import initialize_model

    output = tmp_path / "ghn.safetensors"
    train(_config(image_folder, output, steps=1))
    loaded = load_ghn(output)
    assert loaded.model.config.num_classes == 3
    model, report = initialize_model("resnet18", ghn=str(output), model_kwargs={"num_classes": 3}, method="ghn")
    assert report.prediction.classifier_predicted
    assert report.prediction.fraction_predicted > 0.99
    assert torch.isfinite(model.fc.weight).all()


def test_train_reports_bad_data(tmp_path):
    with pytest.raises(DatasetError, match="dataset not found"):
        train(_config(tmp_path / "missing.zip", tmp_path / "ghn.safetensors"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images found"):
        train(_config(tmp_path / "empty", tmp_path / "ghn.safetensors"))


def test_cli_rejects_bad_options(image_folder, tmp_path, capsys):
    from timm_ghn.cli import main

    status = main(["pretrain", str(image_folder), "-o", str(tmp_path / "g.safetensors"), "--steps", "0"])
    assert status == 1
    assert "invalid --steps 0" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def test_ddp_two_gloo_processes(image_folder, tmp_path):
    output = tmp_path / "ddp.safetensors"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), "-m", "timm_ghn.cli", "pretrain", str(image_folder), "-o", str(output),
        "--steps", "2", "--arch-batch", "1", "--image-batch", "8", "--hid", "16", "--max-shape", "16,16,3,3",
        "--image-size", "16", "--num-architectures", "3", "--families", "resnet,vit", "--min-params", "5000",
        "--max-params", "150000", "--warmup-steps", "1", "--threads", "1",
    ]
    environment = dict(os.environ, OMP_NUM_THREADS="1", TIMM_GHN_BACKEND="gloo")
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    from safetensors import safe_open

    with safe_open(str(output), framework="pt") as handle:
        assert handle.metadata()["timm_ghn.training.world_size"] == "2"
    # Rank 1's gradients are averaged in, so the result differs from one process alone.
    single = train(_config(image_folder, tmp_path / "single.safetensors", steps=2, arch_batch=1))
    distributed = load_ghn(output).model
    differs = [n for n, v in single.state_dict().items() if not torch.allclose(v, distributed.state_dict()[n])]
    assert differs


# ---------------------------------------------------------------------------------------------
# Evaluation


def test_evaluate_ghn_prints_table(image_folder, tmp_path, capsys):
    from timm_ghn.cli import main

    output = tmp_path / "ghn.safetensors"
    train(_config(image_folder, output, steps=1))
    status = main([
        "evaluate-ghn", str(image_folder), "--ghn", str(output), "--split", "train", "--image-size", "16",
        "--architectures", "resnet-basic-s,vit-p4-d6", "--batch-size", "12",
    ])
    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert "classes ant, bee, cat" in lines[0]
    assert lines[1].startswith("| architecture | family |")
    assert lines[3].startswith("| resnet-basic-s | resnet |")
    assert lines[4].startswith("| vit-p4-d6 | vit |")
    assert lines[5].startswith("| **mean of 2** |")


def test_evaluate_rejects_class_mismatch(image_folder, tmp_path):
    from timm_ghn.evaluate import evaluate_ghn

    data = load_image_folder(image_folder, classes=["ant", "bee"], image_size=16)
    ghn = GHN2(GHNConfig(max_shape=(16, 16, 3, 3), num_classes=3, hid=16))
    with pytest.raises(InvalidOptionError, match="3-class heads but the dataset has 2 classes"):
        evaluate_ghn(ghn, data, ["resnet-basic-s"], image_size=16)
