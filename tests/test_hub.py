"""Push, pull and resolution through the real huggingface_hub client against a loopback test Hub.

``tests/hub_server.py`` serves the Hub endpoints on 127.0.0.1; ``use_test_hub`` points
``HF_ENDPOINT`` (and huggingface_hub's constants) at it, so no request leaves the machine.
Predictions use timm's ``test_resnet`` (about 0.5 M parameters, a second or two on a CPU).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import timm_ghn
from conftest import IMAGENET_GHN, require_reference
from hub_server import READ_TOKEN, HubServer, use_test_hub
from timm_ghn.cache import make_request
from timm_ghn.cli import main
from timm_ghn.hub import entry_path
from timm_ghn.resolve import resolve_initialization

MODEL = "test_resnet"
REPO = "team/inits"


@pytest.fixture(scope="module", autouse=True)
def _reference_files():
    require_reference()


@pytest.fixture(scope="module")
def entry(tmp_path_factory) -> Path:
    """One predicted cache entry of ``test_resnet`` (ghn_orth, default options), made without any Hub."""
    directory = tmp_path_factory.mktemp("seed_cache")
    resolved = resolve_initialization(MODEL, ghn=IMAGENET_GHN, cache_dir=directory, hub_repo=[])
    assert resolved.source == "predicted"
    return resolved.path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = HubServer().start()
    server.env = use_test_hub(monkeypatch, server.url, tmp_path / "hf_home")
    yield server
    server.stop()


@pytest.fixture
def request_key():
    request, _ = make_request(MODEL, ghn=IMAGENET_GHN)
    return request


def cache_dir() -> Path:
    return Path(os.environ["TIMM_GHN_CACHE"])


def put_in_cache(entry: Path) -> Path:
    cache_dir().mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(entry, cache_dir() / entry.name))


def put_on_hub(server: HubServer, entry: Path, request, private: bool = False) -> str:
    repo = server.create_repo(REPO, private=private)
    path = entry_path(request)
    repo.files[path] = entry.read_bytes()
    return path


def run(*args: str) -> int:
    return main(list(args))


def warnings_of(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- push ----------------------------------------------------------------------------------------


def test_push_creates_repo_with_index_and_card(hub, entry, request_key, capsys):
    put_in_cache(entry)

    assert run("push", REPO) == 0

    repo = hub.repo(REPO)
    path = entry_path(request_key)
    assert sorted(repo.files) == sorted([path, "index.json", "README.md"])
    assert repo.files[path] == entry.read_bytes()
    assert len(repo.commits) == 2  # the repo's initial commit, then one upload commit
    message = repo.commits[-1][1]
    assert MODEL in message
    assert request_key.key[:12] in message

    index = json.loads(repo.files["index.json"])
    record = index["entries"][request_key.key]
    assert record["filename"] == path
    assert record["model_name"] == MODEL
    assert record["sha256"] == sha256(entry)
    assert record["num_classes"] == 1000
    card = repo.files["README.md"].decode()
    assert request_key.key[:12] in card
    assert f'"hf_hub_filename": "{path}"' in card
    assert f"pushed 1 entries to {REPO}" in capsys.readouterr().out


def test_push_again_makes_no_commit(hub, entry, capsys):
    put_in_cache(entry)
    assert run("push", REPO) == 0
    commits = list(hub.repo(REPO).commits)

    assert run("push", REPO) == 0

    assert hub.repo(REPO).commits == commits
    assert "nothing pushed" in capsys.readouterr().out


def test_predict_pushes_to_hub(hub, tmp_path, request_key, entry, capsys):
    output = tmp_path / "init.safetensors"

    status = run("predict", MODEL, "--ghn", str(IMAGENET_GHN), "-o", str(output), "--push-to-hub", REPO)

    assert status == 0
    line = capsys.readouterr().out.strip()
    assert "predicted" in line
    assert f"pushed to {REPO}" in line
    assert hub.repo(REPO).files[entry_path(request_key)] == output.read_bytes()
    assert output.read_bytes() == entry.read_bytes()


# --- pull ----------------------------------------------------------------------------------------


def test_pull_downloads_entry(hub, entry, request_key, tmp_path, capsys):
    put_on_hub(hub, entry, request_key)
    output = tmp_path / "pulled.safetensors"

    status = run("pull", MODEL, "--ghn", str(IMAGENET_GHN), "--hub-repo", REPO, "-o", str(output))

    assert status == 0
    assert output.read_bytes() == entry.read_bytes()
    assert (cache_dir() / entry.name).read_bytes() == entry.read_bytes()
    assert f"from Hub repo {REPO}" in capsys.readouterr().out


def test_pull_missing_entry_names_fix(hub, request_key, tmp_path, capsys):
    hub.create_repo(REPO)

    status = run("pull", MODEL, "--ghn", str(IMAGENET_GHN), "--hub-repo", REPO, "-o", str(tmp_path / "x.safetensors"))

    assert status == 1
    error = capsys.readouterr().err
    assert REPO in error
    assert request_key.key[:12] in error
    assert "--push-to-hub" in error
    assert not (tmp_path / "x.safetensors").exists()


def test_pull_missing_repo_names_repo(hub, tmp_path, capsys):
    status = run("pull", MODEL, "--ghn", str(IMAGENET_GHN), "--hub-repo", "team/missing", "-o", str(tmp_path / "x.safetensors"))

    assert status == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("timm-ghn: error: Hub repo team/missing not found")
    assert "hf auth login" in error
    assert len(error.splitlines()) == 1


# --- authentication ------------------------------------------------------------------------------


def test_pull_private_repo_without_token(hub, entry, request_key, tmp_path, monkeypatch, capsys):
    put_on_hub(hub, entry, request_key, private=True)
    monkeypatch.delenv("HF_TOKEN")

    status = run("pull", MODEL, "--ghn", str(IMAGENET_GHN), "--hub-repo", REPO, "-o", str(tmp_path / "x.safetensors"))

    assert status == 1
    error = capsys.readouterr().err
    assert REPO in error
    assert "hf auth login" in error


def test_push_with_read_token_forbidden(hub, entry, monkeypatch, capsys):
    put_in_cache(entry)
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)

    assert run("push", REPO) == 1

    error = capsys.readouterr().err
    assert "403" in error
    assert REPO in error
    assert "write permission" in error
    assert REPO not in hub.state.repos


def test_push_with_invalid_token_unauthorized(hub, entry, monkeypatch, capsys):
    put_in_cache(entry)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_valid_token")

    assert run("push", REPO) == 1

    error = capsys.readouterr().err
    assert "401" in error
    assert REPO in error
    assert "HF_TOKEN" in error


# --- resolution order ----------------------------------------------------------------------------


def test_local_cache_before_hub(hub, entry, request_key):
    put_on_hub(hub, entry, request_key)
    put_in_cache(entry)
    hub.state.requests.clear()

    resolved = resolve_initialization(MODEL, ghn=IMAGENET_GHN, hub_repo=REPO)

    assert resolved.source == "cache"
    assert hub.state.requests == []


def test_hub_before_prediction(hub, entry, request_key):
    path = put_on_hub(hub, entry, request_key)

    resolved = resolve_initialization(MODEL, ghn=IMAGENET_GHN, hub_repo=REPO)

    assert resolved.source == "hub"
    assert resolved.repo_id == REPO
    assert resolved.report is None
    assert resolved.path.read_bytes() == entry.read_bytes()
    assert ("GET", f"/{REPO}/resolve/main/{path}") in hub.state.requests


def test_hub_repos_tried_in_order(hub, entry, request_key, monkeypatch):
    hub.create_repo("team/empty")
    put_on_hub(hub, entry, request_key)
    monkeypatch.setenv("TIMM_GHN_HUB_REPO", f"team/empty,{REPO}")

    resolved = resolve_initialization(MODEL, ghn=IMAGENET_GHN)

    assert resolved.source == "hub"
    assert resolved.repo_id == REPO
    heads = [path for method, path in hub.state.requests if method == "HEAD"]
    assert heads[0].startswith("/team/empty/")
    assert heads[1].startswith(f"/{REPO}/")


def test_offline_mode_predicts_with_one_warning(hub, entry, request_key, monkeypatch, caplog):
    put_on_hub(hub, entry, request_key)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    hub.state.requests.clear()

    with caplog.at_level(logging.WARNING):
        resolved = resolve_initialization(MODEL, ghn=IMAGENET_GHN, hub_repo=REPO)

    assert resolved.source == "predicted"
    assert hub.state.requests == []
    messages = warnings_of(caplog)
    assert len(messages) == 1, messages
    assert "HF_HUB_OFFLINE" in messages[0]
    assert REPO in messages[0]
    assert resolved.path.read_bytes() == entry.read_bytes()


def test_unreachable_hub_predicts_with_one_warning(tmp_path, monkeypatch, caplog):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    use_test_hub(monkeypatch, f"http://127.0.0.1:{closed_port}", tmp_path / "hf_home")

    with caplog.at_level(logging.WARNING):
        resolved = resolve_initialization(MODEL, ghn=IMAGENET_GHN, hub_repo=REPO)

    assert resolved.source == "predicted"
    messages = warnings_of(caplog)
    assert len(messages) == 1, messages
    assert "cannot reach the Hub" in messages[0]
    assert str(closed_port) in messages[0]


def cut_transfer(hub: HubServer, path: str, entry: Path) -> None:
    """The server reports the full size but sends half the bytes, as a connection cut short does."""
    hub.state.short_body[path] = entry.stat().st_size // 2


def cut_stored_file(hub: HubServer, path: str, entry: Path) -> None:
    """The repo itself holds a file with its last 4 KiB missing, so sizes agree and the client accepts it."""
    hub.repo(REPO).files[path] = entry.read_bytes()[:-4096]


@pytest.mark.parametrize(
    "damage, expected_warning",
    [(cut_transfer, "download of"), (cut_stored_file, "discarding damaged entry")],
    ids=["truncated_transfer", "truncated_file"],
)
def test_bad_download_not_stored(hub, entry, request_key, caplog, damage, expected_warning):
    damage(hub, put_on_hub(hub, entry, request_key), entry)

    with caplog.at_level(logging.WARNING):
        resolved = resolve_initialization(MODEL, ghn=IMAGENET_GHN, hub_repo=REPO)

    assert resolved.source == "predicted"
    messages = warnings_of(caplog)
    assert len(messages) == 1, messages
    assert expected_warning in messages[0]
    assert REPO in messages[0]
    assert resolved.path.read_bytes() == entry.read_bytes()
    assert sorted(p.name for p in cache_dir().iterdir() if p.name != ".locks") == [entry.name]


# --- plain timm ----------------------------------------------------------------------------------


PLAIN_TIMM = """
import json, sys
sys.modules["timm_ghn"] = None  # importing timm_ghn now fails: this process has only timm
import timm, torch
from safetensors.torch import load_file
overlay = json.loads(sys.argv[1])
model = timm.create_model(sys.argv[2], pretrained=True, pretrained_cfg_overlay=overlay)
expected = load_file(sys.argv[3])
state = model.state_dict()
assert set(state) == set(expected), sorted(set(state) ^ set(expected))[:5]
for name, value in state.items():
    assert torch.equal(value, expected[name]), name
print("loaded", len(state))
"""


def test_timm_loads_pushed_entry(hub, entry, request_key, tmp_path):
    put_in_cache(entry)
    assert run("push", REPO) == 0
    overlay = timm_ghn.hub_overlay(MODEL, hub_repo=REPO, ghn=IMAGENET_GHN)
    assert overlay["hf_hub_id"] == REPO
    assert overlay["hf_hub_filename"] == entry_path(request_key)
    assert "file" not in overlay
    hub.state.requests.clear()

    env = {**os.environ, **hub.env}
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_TIMM, json.dumps(overlay), MODEL, str(entry)],
        capture_output=True, text=True, timeout=120, env=env,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("loaded")
    assert ("GET", f"/{REPO}/resolve/main/{entry_path(request_key)}") in hub.state.requests
    downloaded = list((Path(hub.env["HF_HUB_CACHE"])).rglob(entry.name))
    assert downloaded
    assert downloaded[0].read_bytes() == entry.read_bytes()


def test_hub_overlay_missing_entry(hub):
    hub.create_repo(REPO)

    with pytest.raises(timm_ghn.TimmGhnError, match="--push-to-hub team/inits"):
        timm_ghn.hub_overlay(MODEL, hub_repo=REPO, ghn=IMAGENET_GHN)


def test_overlay_reads_hub_entry(hub, entry, request_key):
    put_on_hub(hub, entry, request_key)

    overlay = timm_ghn.ghn_orth(MODEL, ghn=IMAGENET_GHN, hub_repo=REPO)

    assert Path(overlay["file"]).read_bytes() == entry.read_bytes()
    model = timm_ghn_model(overlay)
    tensors = load_file(overlay["file"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, tensors[name]), name


def timm_ghn_model(overlay: dict) -> torch.nn.Module:
    import timm

    return timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=overlay)


# --- pull by key ---------------------------------------------------------------------------------


def test_pull_by_key_without_ghn(hub, entry, request_key, tmp_path, capsys):
    put_in_cache(entry)
    assert run("push", REPO) == 0
    for path in cache_dir().glob("*.safetensors"):
        path.unlink()
    output = tmp_path / "pulled.safetensors"

    status = run("pull", MODEL, "--key", request_key.key[:12], "--hub-repo", REPO, "-o", str(output))

    assert status == 0
    assert output.read_bytes() == entry.read_bytes()
    assert (cache_dir() / entry.name).read_bytes() == entry.read_bytes()
    assert f"from Hub repo {REPO}" in capsys.readouterr().out


def test_pull_by_key_checks_sha256(hub, entry, request_key, tmp_path, capsys):
    put_in_cache(entry)
    assert run("push", REPO) == 0
    files = hub.repo(REPO).files
    path = entry_path(request_key)
    files[path] = files[path][:-8] + b"\x00" * 8  # same size, other bytes

    status = run("pull", MODEL, "--key", request_key.key[:12], "--hub-repo", REPO, "-o", str(tmp_path / "x.safetensors"))

    assert status == 1
    error = capsys.readouterr().err
    assert "SHA-256" in error
    assert REPO in error
    assert not (tmp_path / "x.safetensors").exists()


def test_pull_by_key_other_model(hub, entry, request_key, tmp_path, capsys):
    put_in_cache(entry)
    assert run("push", REPO) == 0

    status = run("pull", "resnet18", "--key", request_key.key[:12], "--hub-repo", REPO, "-o", str(tmp_path / "x.safetensors"))

    assert status == 1
    assert f"an entry for {MODEL}, not resnet18" in capsys.readouterr().err


def test_forbidden_repo_read_is_error(hub, entry, request_key):
    put_on_hub(hub, entry, request_key)
    hub.repo(REPO).forbidden = True

    with pytest.raises(timm_ghn.TimmGhnError) as raised:
        resolve_initialization(MODEL, ghn=IMAGENET_GHN, hub_repo=REPO)

    message = str(raised.value)
    assert "403" in message
    assert REPO in message
    assert "read access" in message
    assert not list(cache_dir().glob("*.safetensors"))


def test_push_two_entries_one_commit(hub, entry, capsys):
    put_in_cache(entry)
    second = resolve_initialization(MODEL, ghn=IMAGENET_GHN, seed=1, hub_repo=[])
    assert second.source == "predicted"

    assert run("push", REPO) == 0

    repo = hub.repo(REPO)
    assert len(repo.commits) == 2
    assert repo.commits[-1][1] == "Add 2 timm_ghn initializations"
    index = json.loads(repo.files["index.json"])
    assert sorted(index["entries"]) == sorted([entry.name.split("-")[-1].removesuffix(".safetensors"), second.request.key])
    card = repo.files["README.md"].decode()
    assert card.count("| test_resnet | ghn_orth |") == 2
