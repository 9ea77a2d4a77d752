"""Fine-tuning study and diagnostics: splits, inits, tuning, resume, report files and correlations."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch

from timm_ghn.cli import main
from timm_ghn.errors import InvalidOptionError
from timm_ghn.study import diagnose, runner, training
from timm_ghn.study.inits import build_model, classifier_names, resolve_start_layer
from timm_ghn.study.runner import StudyConfig, run_study, select_best
from timm_ghn.study.splits import make_splits

from conftest import CIFAR_GHN, require_reference

CLASSES = ["cat", "dog", "frog"]
TINY_MODEL = "test_resnet"


def _write_tiny_zip(path, train_per_class=14, test_per_class=4):
    """Write an ImageFolder zip of 32x32 PNGs whose classes differ in brightness."""
    from PIL import Image

    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            for label, name in enumerate(CLASSES):
                for i in range(count):
                    pixels = (rng.integers(0, 60, (32, 32, 3)) + 80 * label).astype(np.uint8)
                    buffer = io.BytesIO()
                    Image.fromarray(pixels).save(buffer, "PNG")
                    archive.writestr(f"{split}/{name}/{i:04d}.png", buffer.getvalue())
    return path


def _tiny_config(data, output, **overrides):
    values = dict(
        data=str(data), output=str(output), models=[TINY_MODEL], inits=["rand", "ghn_orth"], seeds=[0, 1],
        epochs=1, optimizers=["sgd"], lrs={"sgd": [0.01, 0.1]}, weight_decays={"sgd": [0.0]},
        batch_size={TINY_MODEL: 6}, image_size=32, betas=[3e-5], start_layers=["default"],
        train_per_class=4, val_size=12, threads=1,
    )
    values.update(overrides)
    return StudyConfig(**values)


# Splits


def test_splits_sizes_and_disjointness():
    labels = torch.arange(10).repeat_interleave(600)
    splits = make_splits(labels, [f"c{i}" for i in range(10)], train_per_class=100, val_size=5000, seed=3)

    assert len(splits.train) == 1000
    assert len(splits.val) == 5000
    assert not set(splits.train) & set(splits.val)
    assert torch.bincount(labels[list(splits.train)], minlength=10).tolist() == [100] * 10
    assert torch.bincount(labels[list(splits.val)], minlength=10).tolist() == [500] * 10


def test_splits_fixed_by_seed():
    labels = torch.arange(3).repeat_interleave(50)
    first = make_splits(labels, CLASSES, 5, 20, seed=1)

    assert make_splits(labels, CLASSES, 5, 20, seed=1) == first
    assert make_splits(labels, CLASSES, 5, 20, seed=2).train != first.train


def test_splits_reject_small_class():
    labels = torch.tensor([0] * 10 + [1] * 3)
    with pytest.raises(InvalidOptionError, match="class 'b' has 3 training images"):
        make_splits(labels, ["a", "b"], train_per_class=2, val_size=4)


# Inits and selection


def test_select_best_reads_validation_only():
    records = [
        {"id": "a", "val_acc": 0.40, "train_acc": 0.99, "test_acc": 0.90},
        {"id": "b", "val_acc": 0.60, "train_acc": 0.10, "test_acc": 0.10},
        {"id": "c", "val_acc": 0.60, "train_acc": 0.50, "test_acc": 0.95},
        {"id": "d", "val_acc": None, "train_acc": 1.00, "test_acc": 1.00},
    ]
    assert select_best(records)["id"] == "b"


def test_start_layer_fraction_of_depth():
    assert resolve_start_layer("0.5", 54, "resnet50") == 28
    assert resolve_start_layer("default", 54, "resnet50") == 37
    assert resolve_start_layer(12, 54, "resnet50") == 12
    with pytest.raises(InvalidOptionError, match="invalid start layer"):
        resolve_start_layer("1.5", 54, "resnet50")


def test_orth_init_keeps_fresh_classifier():
    rand, _ = build_model(TINY_MODEL, "rand", num_classes=3, seed=4)
    orth, _ = build_model(TINY_MODEL, "orth", num_classes=3, seed=4)
    head = classifier_names(orth)

    assert head == {"fc.weight", "fc.bias"}
    for name in head:
        assert torch.equal(orth.state_dict()[name], rand.state_dict()[name])
    conv = orth.conv1[0].weight.reshape(orth.conv1[0].weight.shape[0], -1)
    assert torch.allclose(conv @ conv.t(), torch.eye(conv.shape[0]), atol=1e-5)


def test_oracle_rejects_other_architecture(tmp_path):
    from safetensors.torch import save_file

    other, _ = build_model("resnet18", "rand", num_classes=3)
    path = tmp_path / "resnet18.safetensors"
    save_file(other.state_dict(), str(path))
    with pytest.raises(InvalidOptionError, match="does not fit"):
        build_model(TINY_MODEL, "oracle", num_classes=3, pretrained=path)


# The whole study, tiny


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return _write_tiny_zip(tmp_path_factory.mktemp("study_data") / "tiny.zip")


@pytest.fixture(scope="module")
def tiny_ghn():
    from timm_ghn import load_ghn

    require_reference()
    return load_ghn(CIFAR_GHN)


@pytest.fixture(scope="module")
def tiny_study(tiny_data, tiny_ghn, tmp_path_factory):
    """Run the tiny study once, recording which splits each phase evaluated."""
    output = tmp_path_factory.mktemp("study_out")
    seen: list[tuple[str, str]] = []
    phase = {"name": None}
    original_train_run = runner.train_run
    original_evaluate = training.evaluate_model

    def recording_train_run(spec, *args, **kwargs):
        phase["name"] = spec["phase"]
        return original_train_run(spec, *args, **kwargs)

    def recording_evaluate(model, dataset, *args, **kwargs):
        seen.append((phase["name"], dataset.source))
        return original_evaluate(model, dataset, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "train_run", recording_train_run)
        patch.setattr(runner, "evaluate_model", recording_evaluate)
        patch.setattr(training, "evaluate_model", recording_evaluate)
        outcome = run_study(_tiny_config(tiny_data, output), tiny_ghn, progress=False)
    return outcome, seen


def test_study_split_sizes(tiny_study):
    outcome, _ = tiny_study
    results = json.loads(outcome.files["results"].read_text())
    splits = json.loads((outcome.output / "splits.json").read_text())

    assert results["split"]["train"] == 12
    assert results["split"]["val"] == 12
    assert results["split"]["test"] == 12
    assert not set(splits["train"]) & set(splits["val"])
    assert results["classes"] == CLASSES


def test_study_test_split_never_reaches_tuning(tiny_study):
    _, seen = tiny_study
    tuning_sources = {source for phase, source in seen if phase == "tune"}
    final_sources = {source for phase, source in seen if phase == "final"}

    assert tuning_sources and all("'train'" in source for source in tuning_sources)
    assert any("'test'" in source for source in final_sources)


def test_study_final_runs_use_best_validation(tiny_study):
    outcome, _ = tiny_study
    for init in ("rand", "ghn_orth"):
        tuning = [r for r in outcome.runs if r["init"] == init and r["phase"] == "tune"]
        finals = [r for r in outcome.runs if r["init"] == init and r["phase"] == "final"]
        best = max(tuning, key=lambda r: r["val_acc"])
        assert len(tuning) == 2
        assert [r["seed"] for r in finals] == [0, 1]
        assert all(r["settings"] == best["settings"] for r in finals)
        assert all(r["test_acc"] is None for r in tuning)


def test_study_writes_table_plots_and_json(tiny_study):
    outcome, _ = tiny_study
    table = outcome.files["table"].read_text()
    results = json.loads(outcome.files["results"].read_text())
    curves = outcome.files[f"curves_{TINY_MODEL}"]

    assert "| Rand |" in table
    assert "| GHN-orth |" in table
    assert table.count("±") == 2
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(results["runs"]) == 8
    assert all(len(r["epochs"]) == 1 for r in results["runs"])
    assert {s["init"] for s in results["summary"]} == {"rand", "ghn_orth"}


def test_study_resumes_finished_runs(tiny_study, tiny_data, tiny_ghn):
    outcome, _ = tiny_study
    config = _tiny_config(tiny_data, outcome.output)

    again = run_study(config, tiny_ghn, progress=False)
    assert again.trained == 0
    assert again.reused == 8

    (outcome.output / "runs" / f"{outcome.runs[0]['id']}.json").unlink()
    third = run_study(config, tiny_ghn, progress=False)
    assert third.trained == 1
    assert third.reused == 7


def test_study_rejects_changed_split(tiny_study, tiny_data, tiny_ghn):
    outcome, _ = tiny_study
    config = _tiny_config(tiny_data, outcome.output, val_size=9)
    with pytest.raises(InvalidOptionError, match="another --output directory"):
        run_study(config, tiny_ghn, progress=False)


def test_study_cli_rejects_bad_lr(tiny_data, tmp_path, capsys):
    code = main(["study", str(tiny_data), "-o", str(tmp_path), "--lr", "sgd=fast"])
    assert code == 1
    assert "invalid --lr 'sgd=fast'" in capsys.readouterr().err


# Diagnostics


def test_ghn_orth_lowers_correlation_spread(tiny_ghn):
    result = diagnose.diagnose_model(TINY_MODEL, tiny_ghn, inits=("rand", "ghn", "ghn_orth"), num_classes=3, image_size=32)
    start, last = result["start_layer"], result["num_layers"]

    def deep_spread(init):
        values = [s["corr_std"] for s in result["inits"][init]["layers"] if start <= s["index"] < last]
        return sum(values) / len(values)

    assert deep_spread("ghn_orth") < 0.5 * deep_spread("ghn")
    ghn_layers = result["inits"]["ghn"]["layers"]
    rand_layers = result["inits"]["rand"]["layers"]
    assert sum(s["tiled"] for s in ghn_layers) > 10 * sum(s["tiled"] for s in rand_layers)


def test_correlation_spread_matches_numpy():
    weight = torch.randn(6, 4, 3, 3)
    weight[1] = weight[0] * 2 + 1
    reference = np.corrcoef(weight.reshape(6, -1).numpy())
    off_diagonal = reference[~np.eye(6, dtype=bool)]

    assert diagnose.correlation_spread(weight) == pytest.approx(off_diagonal.std(), rel=1e-5)
    assert sorted(diagnose.channel_correlations(weight).tolist()) == pytest.approx(sorted(off_diagonal), abs=1e-5)


def test_tiled_values_counts_repeats():
    assert diagnose.tiled_values(torch.tensor([[1.0, 2.0], [1.0, 1.0]])) == 2
    assert diagnose.tiled_values(torch.arange(6.0).reshape(2, 3)) == 0


def test_diagnose_cli_writes_plots(tmp_path):
    require_reference()
    code = main(["diagnose", TINY_MODEL, "--ghn", str(CIFAR_GHN), "-o", str(tmp_path), "--num-classes", "3",
                 "--embed", "test_resnet,resnet18,test_vit"])
    result = json.loads((tmp_path / "diagnose.json").read_text())

    assert code == 0
    assert (tmp_path / "correlations.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "embeddings.png").read_bytes()[:4] == b"\x89PNG"
    assert set(result["inits"]) == {"rand", "orth", "ghn", "ghn_orth"}
    assert result["embeddings"]["names"] == ["test_resnet", "resnet18", "test_vit"]
    assert np.asarray(result["embeddings"]["pca"]).shape == (3, 2)


# Classes, oracle and command-line settings


def test_target_classes_exclude_ghn_classes(tiny_data, tiny_ghn, tmp_path):
    from timm_ghn import load_ghn
    from timm_ghn.hypernet import save_ghn
    from timm_ghn.train import METADATA_PREFIX

    path = save_ghn(tiny_ghn.model, tmp_path / "ghn.safetensors", {METADATA_PREFIX + "classes": json.dumps(["cat"])})

    assert runner.target_classes(tiny_data, load_ghn(path)) == ["dog", "frog"]
    assert runner.target_classes(tiny_data, tiny_ghn) == CLASSES


def test_oracle_loads_body_keeps_head(tmp_path):
    from safetensors.torch import save_file

    source, _ = build_model(TINY_MODEL, "rand", num_classes=7, seed=11)
    path = tmp_path / "pretrained.safetensors"
    save_file(source.state_dict(), str(path))
    oracle, _ = build_model(TINY_MODEL, "oracle", num_classes=3, seed=2, pretrained=path)
    fresh, _ = build_model(TINY_MODEL, "rand", num_classes=3, seed=2)

    assert torch.equal(oracle.conv1[0].weight, source.conv1[0].weight)
    assert torch.equal(oracle.fc.weight, fresh.fc.weight)


def test_cli_options_override_preset(tmp_path):
    from timm_ghn.cli import build_parser
    from timm_ghn.study.command import config_from_args

    args = build_parser().parse_args([
        "study", "data.zip", "-o", str(tmp_path), "--batch-size", "resnet18=32", "--lr", "0.2",
        "--optimizers", "sgd,adamw", "--weight-decay", "sgd=0.001", "--weight-decay", "adamw=0.05",
        "--pretrained", "resnet18=r18.pth", "--seeds", "4,5",
    ])
    config = config_from_args(args)

    assert config.batch_size == {"resnet18": 32, "convnext_atto": 64}
    assert config.lrs == {"sgd": [0.2], "adamw": [0.2]}
    assert config.weight_decays == {"sgd": [0.001], "adamw": [0.05]}
    assert config.inits[-1] == "oracle"
    assert config.pretrained == {"resnet18": "r18.pth"}
    assert config.seeds == [4, 5]
    assert config.epochs == 15


def test_fine_tune_stops_on_nan_loss(caplog):
    from timm_ghn.data import ImageDataset
    from timm_ghn.study.training import TrainSettings, fine_tune

    model, _ = build_model(TINY_MODEL, "rand", num_classes=3)
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    images = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    dataset = ImageDataset(images, torch.arange(8) % 3, CLASSES, "random")
    history = fine_tune(model, dataset, TrainSettings("sgd", 0.1, 0.0, 2, 4, 32), seed=0, val=dataset)

    assert history == []
    assert "training stopped" in caplog.text
