"""The cache key, the checks on cached files, the per-key lock and the ``cache`` commands."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import timm_ghn.cache
from conftest import CIFAR_GHN, IMAGENET_GHN, ROOT, require_reference
from timm_ghn.cache import CacheEntryError, LocalCache, make_request, validate_entry
from timm_ghn.cli import main
from timm_ghn.resolve import resolve_initialization

MODEL = "test_resnet"


@pytest.fixture(scope="module", autouse=True)
def _reference_files():
    require_reference()


@pytest.fixture(scope="module")
def entry(tmp_path_factory) -> Path:
    """One predicted cache entry of ``test_resnet`` with default options."""
    resolved = resolve_initialization(MODEL, ghn=IMAGENET_GHN, cache_dir=tmp_path_factory.mktemp("seed_cache"))
    assert resolved.source == "predicted"
    return resolved.path


def key_of(**changes) -> str:
    arguments = {"ghn": IMAGENET_GHN, **changes}
    request, _ = make_request(arguments.pop("model_name", MODEL), **arguments)
    return request.key


def cache_dir() -> Path:
    return Path(os.environ["TIMM_GHN_CACHE"])


def put_in_cache(entry: Path) -> Path:
    cache_dir().mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(entry, cache_dir() / entry.name))


def rewrite_metadata(path: Path, name: str, value: str) -> None:
    """Replace one header metadata value of a safetensors file, keeping the header length."""
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        header["__metadata__"][name] = value
        text = json.dumps(header, separators=(",", ":")).encode()
        assert len(text) <= length
        handle.seek(8)
        handle.write(text.ljust(length, b" "))


# --- key ---------------------------------------------------------------------------------------


def test_key_stable_within_process():
    assert key_of() == key_of()


def test_key_stable_across_processes():
    script = "import sys; from timm_ghn.cache import make_request; print(make_request(sys.argv[1], ghn=sys.argv[2])[0].key)"
    result = subprocess.run(
        [sys.executable, "-c", script, MODEL, str(IMAGENET_GHN)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == key_of()


@pytest.mark.parametrize(
    "changes",
    [
        {"model_name": "resnet10t"},
        {"model_kwargs": {"num_classes": 10}},
        {"model_kwargs": {"drop_rate": 0.1}},
        {"ghn": CIFAR_GHN},
        {"method": "ghn"},
        {"beta": 1e-4},
        {"start_layer": 3},
        {"variant": "paper"},
        {"seed": 1},
        {"predict_classifier": False},
    ],
    ids=lambda changes: next(iter(changes)),
)
def test_key_changes_with_input(changes):
    assert key_of(**changes) != key_of()


def test_key_changes_with_architecture():
    request, _ = make_request(MODEL, ghn=IMAGENET_GHN)
    tensors = request.architecture.tensors
    renamed = dataclasses.replace(request.architecture, digest="0" * 64, tensors=tensors[:-1])
    assert dataclasses.replace(request, architecture=renamed).key != request.key


def test_architecture_follows_kwargs():
    one, _ = make_request(MODEL, ghn=IMAGENET_GHN, model_kwargs={"in_chans": 1})
    three, _ = make_request(MODEL, ghn=IMAGENET_GHN)
    assert one.architecture.digest != three.architecture.digest
    assert one.architecture.tensors[0][1][1] == 1


def test_key_changes_with_format_version(monkeypatch):
    before = key_of()
    monkeypatch.setattr(timm_ghn.cache, "CACHE_FORMAT_VERSION", timm_ghn.cache.CACHE_FORMAT_VERSION + 1)
    assert key_of() != before


@pytest.mark.parametrize(
    "changes",
    [
        {"beta": 0.00003},
        {"model_kwargs": {"pretrained": True}},
        {"start_layer": "default"},
    ],
    ids=["beta_spelling", "pretrained_kwarg", "explicit_default_start_layer"],
)
def test_key_ignores_irrelevant_input(changes):
    if changes.get("start_layer") == "default":
        changes = {"start_layer": make_request(MODEL, ghn=IMAGENET_GHN)[0].start_layer}
    assert key_of(**changes) == key_of()


def test_key_ignores_ghn_path(tmp_path):
    copy = shutil.copy(IMAGENET_GHN, tmp_path / "renamed.pt")
    assert key_of(ghn=copy) == key_of()


def test_key_ignores_kwargs_order():
    assert key_of(model_kwargs={"num_classes": 10, "drop_rate": 0.1}) == key_of(model_kwargs={"drop_rate": 0.1, "num_classes": 10})


def test_ghn_method_ignores_orth_options():
    assert key_of(method="ghn", beta=1.0, variant="paper", start_layer=2) == key_of(method="ghn")


def test_unserializable_kwargs_rejected():
    with pytest.raises(timm_ghn.cache.InvalidOptionError, match="--no-cache"):
        key_of(model_kwargs={"act_layer": object()})


# --- checks on cached files ----------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def break_header(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[8:16] = b"\xff" * 8
    path.write_bytes(bytes(content))


def wrong_key(path: Path) -> None:
    rewrite_metadata(path, "timm_ghn.cache_key", "f" * 64)


@pytest.mark.parametrize("damage", [truncate, break_header, wrong_key], ids=lambda f: f.__name__)
def test_damaged_entry_removed(entry, damage, caplog):
    request, _ = make_request(MODEL, ghn=IMAGENET_GHN)
    path = put_in_cache(entry)
    damage(path)

    with caplog.at_level(logging.WARNING):
        found = LocalCache().lookup(request)

    assert found is None
    assert not path.exists()
    assert len(caplog.records) == 1
    assert "removing damaged cache entry" in caplog.records[0].getMessage()


def test_damaged_entry_rebuilt(entry, caplog):
    truncate(put_in_cache(entry))

    with caplog.at_level(logging.WARNING):
        resolved = resolve_initialization(MODEL, ghn=IMAGENET_GHN)

    assert resolved.source == "predicted"
    assert resolved.path.read_bytes() == entry.read_bytes()
    assert [r.getMessage().split(" (")[0] for r in caplog.records if r.levelno >= logging.WARNING] == [f"removing damaged cache entry {resolved.path}"]


def test_validate_rejects_other_request(entry):
    other, _ = make_request(MODEL, ghn=IMAGENET_GHN, seed=5)
    with pytest.raises(CacheEntryError, match="does not match the request key"):
        validate_entry(entry, other)


def test_cache_hit_returns_same_file(entry):
    path = put_in_cache(entry)
    resolved = resolve_initialization(MODEL, ghn=IMAGENET_GHN)
    assert resolved.source == "cache"
    assert resolved.path == path


# --- two processes, one key ----------------------------------------------------------------------


RACER = """
import hashlib, json, sys, time
from pathlib import Path
from timm_ghn.resolve import resolve_initialization
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.01)
resolved = resolve_initialization("test_resnet", ghn=sys.argv[2])
print(json.dumps({"source": resolved.source, "sha256": hashlib.sha256(resolved.path.read_bytes()).hexdigest()}))
"""


def test_two_processes_predict_once(tmp_path, entry):
    go = tmp_path / "go"
    processes = [
        subprocess.Popen([sys.executable, "-c", RACER, str(go), str(IMAGENET_GHN)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        for _ in range(2)
    ]
    time.sleep(0.5)
    go.touch()
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr
        results.append(json.loads(stdout))

    assert sorted(result["source"] for result in results) == ["cache", "predicted"]
    assert results[0]["sha256"] == results[1]["sha256"]
    assert [p.name for p in cache_dir().glob("*.safetensors")] == [entry.name]
    assert (cache_dir() / entry.name).read_bytes() == entry.read_bytes()


# --- commands ------------------------------------------------------------------------------------


def test_cache_list_shows_entry(entry, capsys):
    put_in_cache(entry)
    request, _ = make_request(MODEL, ghn=IMAGENET_GHN)

    assert main(["cache", "list"]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(request.key[:16])
    assert f"{MODEL} ghn_orth" in lines[0]
    assert lines[-1].startswith("1 entries")


def test_cache_info_shows_metadata(entry, capsys):
    put_in_cache(entry)
    request, _ = make_request(MODEL, ghn=IMAGENET_GHN)

    assert main(["cache", "info", request.key[:10]]) == 0

    out = capsys.readouterr().out
    assert f"timm_ghn.cache_key: {request.key}" in out
    assert f"timm_ghn.model_name: {MODEL}" in out


def test_cache_clear_removes_entries(entry, capsys):
    path = put_in_cache(entry)

    assert main(["cache", "clear"]) == 0

    assert not path.exists()
    assert capsys.readouterr().out.startswith("removed 1 entries")


def test_cache_info_unknown_key(capsys):
    assert main(["cache", "info", "abc123"]) == 1
    assert "no cache entry with key 'abc123'" in capsys.readouterr().err


def test_predict_no_cache_leaves_cache_empty(tmp_path):
    assert main(["predict", MODEL, "--ghn", str(IMAGENET_GHN), "-o", str(tmp_path / "x.safetensors"), "--no-cache"]) == 0
    assert not list(cache_dir().glob("*.safetensors"))


def test_predict_from_cache(entry, tmp_path, capsys):
    put_in_cache(entry)
    output = tmp_path / "x.safetensors"

    assert main(["predict", MODEL, "--ghn", str(IMAGENET_GHN), "-o", str(output)]) == 0

    assert output.read_bytes() == entry.read_bytes()
    assert "from the cache" in capsys.readouterr().out


def test_named_ghn_hashed_from_hf_cache(tmp_path, monkeypatch):
    """A released GHN's name is hashed from its file in the Hugging Face cache, offline."""
    from huggingface_hub import constants

    content = IMAGENET_GHN.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    repo = tmp_path / "hub" / "models--SamsungSAILMontreal--ghn3"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / digest).write_bytes(content)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "ghn3tm8.pt").symlink_to(repo / "blobs" / digest)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(timm_ghn.cache, "_NAMED_GHN_FILES", {})

    found, ghn = timm_ghn.cache.ghn_digest("ghn3-tm8")

    assert found == digest
    assert Path(ghn) == snapshot / "ghn3tm8.pt"


def test_unreadable_entry_is_error(entry):
    request, _ = make_request(MODEL, ghn=IMAGENET_GHN)
    blocking = cache_dir() / entry.name
    blocking.mkdir(parents=True)  # a directory where the entry should be: not damage, an error

    with pytest.raises(timm_ghn.cache.TimmGhnError, match="cannot read cache entry"):
        LocalCache().lookup(request)

    assert blocking.is_dir()


def test_no_cache_with_push_rejected(tmp_path, capsys):
    output = tmp_path / "x.safetensors"

    status = main(["predict", MODEL, "--ghn", str(IMAGENET_GHN), "-o", str(output), "--no-cache", "--push-to-hub", "team/inits"])

    assert status == 1
    assert "--push-to-hub cannot be combined with --no-cache" in capsys.readouterr().err
    assert not output.exists()


def test_default_ghn_from_environment(monkeypatch):
    monkeypatch.setenv("TIMM_GHN_CHECKPOINT", str(IMAGENET_GHN))
    assert key_of(ghn=None) == key_of()
