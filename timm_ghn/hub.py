"""Sharing cache entries through a Hugging Face Hub model repo.

A repo contains entries as ``MODEL/MODEL-METHOD-KEY.safetensors`` (the local cache's file names in a
folder per model), an ``index.json`` that describes every entry by key, and a ``README.md`` model
card that lists the entries with the ``pretrained_cfg_overlay`` that loads each one in plain timm.
Every upload is one commit that adds the new entries and rewrites the index and the card.

All traffic goes through ``huggingface_hub``, so ``HF_ENDPOINT``, ``HF_TOKEN`` and
``HF_HUB_OFFLINE`` work as they do for any Hub client.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, get_hf_file_metadata, hf_hub_download, hf_hub_url, is_offline_mode
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)

from timm_ghn.cache import (
    KEY_METADATA,
    NUM_CLASSES_METADATA,
    CacheEntryError,
    InitRequest,
    LocalCache,
    read_header,
    safe_model_name,
    validate_entry,
)
from timm_ghn.errors import TimmGhnError
from timm_ghn.export import METADATA_PREFIX
from timm_ghn.hypernet.checkpoint import file_sha256

__all__ = [
    "HUB_REPO_ENV",
    "INDEX_FILENAME",
    "HubAccessError",
    "HubUnavailableError",
    "download_by_key",
    "download_entry",
    "entry_path",
    "hub_overlay",
    "hub_repos",
    "push_entries",
    "read_index",
]

logger = logging.getLogger(__name__)

#: Environment variable with the Hub repo(s) to look entries up in, comma-separated.
HUB_REPO_ENV = "TIMM_GHN_HUB_REPO"

INDEX_FILENAME = "index.json"
CARD_FILENAME = "README.md"
INDEX_FORMAT = 1

_LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"


class HubAccessError(TimmGhnError):
    """The Hub returned 401, 403 or 404 for a repo. The message names the repo and the fix."""


class HubUnavailableError(TimmGhnError):
    """The Hub cannot be used: ``HF_HUB_OFFLINE`` is set, or the endpoint cannot be reached."""


def hub_repos(repos: str | Sequence[str] | None = None) -> list[str]:
    """Return the repos to look entries up in: ``repos``, else ``$TIMM_GHN_HUB_REPO`` (comma-separated)."""
    if repos is None:
        repos = os.environ.get(HUB_REPO_ENV, "")
    if isinstance(repos, str):
        repos = repos.split(",")
    return [repo.strip() for repo in repos if repo and repo.strip()]


def entry_path(request: InitRequest) -> str:
    """Return the path of ``request``'s entry inside a Hub repo."""
    return f"{safe_model_name(request.model_name)}/{request.filename}"


def _endpoint() -> str:
    return hf_constants.ENDPOINT


def hub_error(error: Exception, repo_id: str, action: str, write: bool = False) -> TimmGhnError:
    """Translate a ``huggingface_hub`` or HTTP error into one that names ``repo_id`` and the fix.

    ``write`` says whether the request was an upload, which decides the fix for a 403.
    """
    if isinstance(error, LocalEntryNotFoundError) and error.__cause__ is not None:
        error = error.__cause__
    if isinstance(error, OfflineModeIsEnabled) or (isinstance(error, LocalEntryNotFoundError) and is_offline_mode()):
        return HubUnavailableError(f"HF_HUB_OFFLINE is set, so {repo_id} was not contacted while {action}")
    if isinstance(error, (httpx2.TransportError, LocalEntryNotFoundError)):
        return HubUnavailableError(f"cannot reach the Hub at {_endpoint()} while {action} ({repo_id}): {error}")
    if isinstance(error, RepositoryNotFoundError):
        return HubAccessError(
            f"Hub repo {repo_id} not found at {_endpoint()}, or private and not readable with the current token, "
            f"while {action}: check the repo id (--hub-repo, --push-to-hub or ${HUB_REPO_ENV}), or {_LOGIN_HINT}"
        )
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status == 401:
            return HubAccessError(f"the Hub rejected the token for {repo_id} (401 Unauthorized) while {action}: {_LOGIN_HINT} with a valid token")
        if status == 403 and write:
            return HubAccessError(
                f"the token has no write access to {repo_id} (403 Forbidden) while {action}: use a token with write "
                "permission for that namespace, or push to a repo you own"
            )
        if status == 403:
            return HubAccessError(
                f"the token has no read access to {repo_id} (403 Forbidden) while {action}: request access to the "
                f"repo on the Hub, or {_LOGIN_HINT} with a token of an account that has it"
            )
        if status == 404:
            return HubAccessError(f"{repo_id} returned 404 Not Found at {_endpoint()} while {action}: check the repo id")
        return HubUnavailableError(f"the Hub at {_endpoint()} returned {status} for {repo_id} while {action}: {error}")
    return HubUnavailableError(f"Hub request for {repo_id} failed while {action}: {error}")


def _download(repo_id: str, filename: str, directory: Path, action: str) -> Path | None:
    """Download ``filename`` of ``repo_id`` into ``directory``; ``None`` if the repo has no such file.

    Raises:
        HubAccessError, HubUnavailableError: see :func:`hub_error`.
        OSError: the download was incomplete (``huggingface_hub`` checks the size).
    """
    if is_offline_mode():
        raise HubUnavailableError(f"HF_HUB_OFFLINE is set, so {repo_id} was not contacted while {action}")
    try:
        # A HEAD without retries first: hf_hub_download retries an unreachable Hub for about 30 s
        # with backoff before it gives up, and the caller falls back to a prediction anyway.
        get_hf_file_metadata(hf_hub_url(repo_id, filename))
        return Path(hf_hub_download(repo_id, filename, local_dir=directory))
    except RemoteEntryNotFoundError:
        return None
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, httpx2.TransportError) as error:
        raise hub_error(error, repo_id, action) from error


def download_entry(repo_id: str, request: InitRequest, cache: LocalCache) -> Path | None:
    """Download ``request``'s entry from ``repo_id``, check it and move it into ``cache``.

    Returns the cached path, or ``None`` when the repo has no such entry or the downloaded file
    is incomplete or damaged (logged as a warning; nothing is stored then).

    Raises:
        HubAccessError, HubUnavailableError: see :func:`hub_error`.
    """
    filename = entry_path(request)
    cache.ensure_root()
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=cache.root))
    try:
        try:
            downloaded = _download(repo_id, filename, staging, f"downloading {filename}")
        except OSError as error:
            logger.warning("download of %s from %s failed (%s); predicting instead", filename, repo_id, error)
            return None
        if downloaded is None:
            logger.info("%s has no entry %s", repo_id, filename)
            return None
        try:
            validate_entry(downloaded, request)
        except CacheEntryError as error:
            logger.warning("discarding damaged entry %s from %s: %s", filename, repo_id, error)
            return None
        path = cache.path_for(request)
        os.chmod(downloaded, 0o644)
        os.replace(downloaded, path)
        logger.info("downloaded %s from %s into the cache: %s", filename, repo_id, path)
        return path
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_by_key(
    repo_id: str, key_prefix: str, cache: LocalCache, model_name: str | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """Download the entry whose key starts with ``key_prefix``, as ``index.json`` of ``repo_id`` lists it.

    This needs no GHN checkpoint: the file is checked against the index record's SHA-256 and
    key, and stored in ``cache`` under its own name. Returns the cached path and the record, or
    ``None`` when the index lists no such key.

    Raises:
        HubAccessError, HubUnavailableError: see :func:`hub_error`.
        TimmGhnError: the prefix matches several entries, the entry is not for ``model_name``
            (when given), or the file differs from its record.
    """
    index = read_index(repo_id)
    matches = sorted(key for key in index["entries"] if key.startswith(key_prefix.lower()))
    if not matches:
        return None
    if len(matches) > 1:
        raise TimmGhnError(f"key prefix {key_prefix!r} matches {len(matches)} entries in {repo_id}; give more characters")
    key = matches[0]
    record = index["entries"][key]
    if model_name is not None and record["model_name"] != model_name:
        raise TimmGhnError(f"key {key_prefix!r} in {repo_id} is an entry for {record['model_name']}, not {model_name}; check the model name and the key")

    cache.ensure_root()
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=cache.root))
    try:
        downloaded = _download(repo_id, record["filename"], staging, f"downloading {record['filename']}")
        if downloaded is None:
            raise TimmGhnError(f"{repo_id} lists {record['filename']} in {INDEX_FILENAME} but has no such file; push the entry again")
        digest = file_sha256(downloaded)
        if digest != record["sha256"]:
            raise TimmGhnError(
                f"{record['filename']} from {repo_id} has SHA-256 {digest[:12]}, but {INDEX_FILENAME} lists "
                f"{record['sha256'][:12]}; retry, or push the entry again"
            )
        header, _ = read_header(downloaded)
        found_key = (header.get("__metadata__") or {}).get(KEY_METADATA)
        if found_key != key:
            raise TimmGhnError(f"{record['filename']} from {repo_id} has key {found_key!r} in its header, not {key}; push the entry again")
        path = cache.root / Path(record["filename"]).name
        os.chmod(downloaded, 0o644)
        os.replace(downloaded, path)
        logger.info("downloaded %s (key %s) from %s into the cache: %s", record["filename"], key[:12], repo_id, path)
        return path, record
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_index(repo_id: str) -> dict[str, Any]:
    """Return the ``index.json`` of ``repo_id``, or an empty index if the repo has none yet.

    Raises:
        HubAccessError, HubUnavailableError: see :func:`hub_error`.
        TimmGhnError: the index is not valid JSON.
    """
    with tempfile.TemporaryDirectory(prefix="timm_ghn-index-") as directory:
        path = _download(repo_id, INDEX_FILENAME, Path(directory), f"reading {INDEX_FILENAME}")
        if path is None:
            return {"format": INDEX_FORMAT, "entries": {}}
        try:
            index = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise TimmGhnError(f"{INDEX_FILENAME} of {repo_id} is not valid JSON ({error}); fix or delete it on the Hub") from error
    if not isinstance(index, dict) or not isinstance(index.get("entries"), dict):
        raise TimmGhnError(f"{INDEX_FILENAME} of {repo_id} has no 'entries' object; fix or delete it on the Hub")
    return index


def _index_entry(path: Path) -> tuple[str, dict[str, Any]]:
    """Return the key and index record of a local cache entry, read from its header."""
    header, _ = read_header(path)
    metadata = header.get("__metadata__") or {}
    key = metadata.get(KEY_METADATA)
    if not key or not path.name.endswith(f"-{key}.safetensors"):
        raise TimmGhnError(f"{path} is not a timm_ghn cache entry (no cache key in its header); push files from `timm-ghn cache list`")

    def value(name: str) -> str:
        return metadata.get(METADATA_PREFIX + name, "")

    model_name = value("model_name")
    record = {
        "filename": f"{safe_model_name(model_name)}/{path.name}",
        "model_name": model_name,
        "model_kwargs": json.loads(value("model_kwargs") or "{}"),
        "method": value("method"),
        "beta": float(value("beta")) if value("beta") else None,
        "start_layer": int(value("start_layer")) if value("start_layer") else None,
        "variant": value("variant") or None,
        "seed": int(value("seed") or 0),
        "ghn_name": value("ghn_name"),
        "ghn_sha256": value("ghn_sha256"),
        "num_classes": int(metadata.get(NUM_CLASSES_METADATA) or 1000),
        "size": path.stat().st_size,
        "sha256": file_sha256(path),
        "timm_version": value("timm_version"),
        "torch_version": value("torch_version"),
        "timm_ghn_version": value("version"),
    }
    return key, record


def overlay_for(repo_id: str, record: dict[str, Any]) -> dict[str, Any]:
    """Return the ``pretrained_cfg_overlay`` that makes timm load an index record from ``repo_id``."""
    return {
        "hf_hub_id": repo_id,
        "hf_hub_filename": record["filename"],
        "source": "hf-hub",
        "num_classes": record["num_classes"],
        "custom_load": False,
        "label_offset": 0,
    }


def model_card(repo_id: str, index: dict[str, Any]) -> str:
    """Return the README model card that lists every entry of ``index`` with its overlay."""
    lines = [
        "---",
        "library_name: timm",
        "tags:",
        "- timm_ghn",
        "- image-classification",
        "---",
        "",
        f"# {repo_id}",
        "",
        "Initializations of timm models predicted by a Graph HyperNetwork (GHN-2) with "
        "timm_ghn, one safetensors file of `model.state_dict()` per entry. "
        "`index.json` describes every entry; its key is a SHA-256 of the model, its arguments, the GHN "
        "checkpoint, the method and options, and the seed.",
        "",
        "| model | method | β | L | seed | num_classes | GHN sha256 | key | file |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    records = sorted(index["entries"].items(), key=lambda item: (item[1]["model_name"], item[1]["method"], item[0]))
    for key, record in records:
        beta = "" if record.get("beta") is None else f"{record['beta']:g}"
        start = "" if record.get("start_layer") is None else str(record["start_layer"])
        lines.append(
            f"| {record['model_name']} | {record['method']} | {beta} | {start} | {record['seed']} | "
            f"{record['num_classes']} | {record['ghn_sha256'][:12]} | {key[:12]} | `{record['filename']}` |"
        )
    lines += ["", "## Loading an entry with timm alone", ""]
    for key, record in records:
        kwargs = dict(record.get("model_kwargs") or {})
        kwargs.pop("num_classes", None)
        extra = "".join(f", {name}={value!r}" for name, value in sorted(kwargs.items()))
        overlay = json.dumps(overlay_for(repo_id, record), sort_keys=True)
        lines += [
            f"`{record['model_name']}` {record['method']}, key `{key[:12]}`:",
            "",
            "```python",
            "import timm",
            f"overlay = {overlay}",
            f"model = timm.create_model({record['model_name']!r}, pretrained=True, num_classes={record['num_classes']}{extra}, pretrained_cfg_overlay=overlay)",
            "```",
            "",
        ]
    return "\n".join(lines)


def push_entries(repo_id: str, paths: Sequence[str | os.PathLike], *, private: bool | None = None) -> str | None:
    """Upload cache entries to ``repo_id`` in one commit, creating the repo if needed.

    The commit adds the entries that the repo's index does not list yet, and rewrites
    ``index.json`` and ``README.md``. Returns the commit URL, or ``None`` when every entry is
    already there.

    Raises:
        HubAccessError, HubUnavailableError: see :func:`hub_error`.
        TimmGhnError: a path is not a cache entry.
    """
    sources: dict[str, Path] = {}
    records: dict[str, dict[str, Any]] = {}
    for path in paths:
        key, record = _index_entry(Path(path))
        records[key] = record
        sources[key] = Path(path)
    if not records:
        raise TimmGhnError("nothing to push: the cache is empty; run `timm-ghn predict MODEL` first")
    if is_offline_mode():
        raise HubUnavailableError(f"HF_HUB_OFFLINE is set, so nothing was pushed to {repo_id}; unset it to push")

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
    except (HfHubHTTPError, httpx2.TransportError, OfflineModeIsEnabled) as error:
        raise hub_error(error, repo_id, "creating the repo", write=True) from error
    index = read_index(repo_id)

    new = {key: record for key, record in records.items() if index["entries"].get(key, {}).get("sha256") != record["sha256"]}
    if not new:
        logger.info("%s already holds all %d entries; nothing pushed", repo_id, len(records))
        return None
    index["format"] = INDEX_FORMAT
    index["entries"].update(new)

    operations = [
        CommitOperationAdd(path_in_repo=record["filename"], path_or_fileobj=str(sources[key]))
        for key, record in sorted(new.items())
    ]
    operations.append(CommitOperationAdd(INDEX_FILENAME, json.dumps(index, indent=1, sort_keys=True).encode() + b"\n"))
    operations.append(CommitOperationAdd(CARD_FILENAME, model_card(repo_id, index).encode()))
    names = ", ".join(f"{record['model_name']} {record['method']} ({key[:12]})" for key, record in sorted(new.items()))
    if len(new) == 1:
        message = f"Add timm_ghn initialization {names}"
    else:
        message = f"Add {len(new)} timm_ghn initializations"
    description = "Entries added:\n" + "\n".join(f"- {key} {record['filename']}" for key, record in sorted(new.items()))
    # NOTE: the index is read and rewritten without a parent-commit check, so two concurrent pushes
    # to one repo can drop each other's index records (the entry files themselves are kept).
    try:
        commit = api.create_commit(repo_id, operations, commit_message=message[:200], commit_description=description)
    except (HfHubHTTPError, httpx2.TransportError, OfflineModeIsEnabled) as error:
        raise hub_error(error, repo_id, "uploading entries", write=True) from error
    logger.info("pushed %d entries to %s: %s", len(new), repo_id, commit.commit_url)
    return commit.commit_url


def hub_overlay(request: InitRequest, repo_id: str) -> dict[str, Any]:
    """Return the timm overlay (``hf_hub_id``, ``hf_hub_filename``) of ``request``'s entry in ``repo_id``.

    Raises:
        HubAccessError, HubUnavailableError: see :func:`hub_error`.
        TimmGhnError: the repo has no entry for ``request``.
    """
    filename = entry_path(request)
    if is_offline_mode():
        raise HubUnavailableError(f"HF_HUB_OFFLINE is set, so {repo_id} was not checked for {filename}")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename))
    except RemoteEntryNotFoundError as error:
        raise TimmGhnError(
            f"{repo_id} has no entry {filename} (key {request.key[:12]}); upload it with "
            f"`timm-ghn predict {request.model_name} ... --push-to-hub {repo_id}`"
        ) from error
    except (HfHubHTTPError, httpx2.TransportError, OfflineModeIsEnabled) as error:
        raise hub_error(error, repo_id, f"checking {filename}") from error
    record = {"filename": filename, "num_classes": request.architecture.num_classes}
    return overlay_for(repo_id, record)
