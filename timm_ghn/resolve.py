"""Resolving a request: the local cache, then the Hub repo(s), then a prediction that is stored.

``resolve_initialization`` is what the CLI and the timm overlay call. Concurrent processes that
resolve the same key hold one file lock, so the prediction runs once and the others read its
file. With ``HF_HUB_OFFLINE=1`` or an unreachable Hub, the Hub step is skipped with one warning
and the initialization is predicted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from timm_ghn.cache import InitRequest, LocalCache, atomic_copy, make_request, read_header
from timm_ghn.errors import CheckpointError, OutputPathError, TimmGhnError
from timm_ghn.export import check_output_path, save_state_dict
from timm_ghn.hub import HubAccessError, HubUnavailableError, download_entry, hub_repos, push_entries
from timm_ghn.options import InitOptions, with_overrides
from timm_ghn.pipeline import Coverage, InitReport, initialize_model

__all__ = ["Resolved", "copy_entry", "entry_coverage", "resolve_initialization"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Resolved:
    """A resolved initialization: its file, its request and its source (``cache``, ``hub`` or ``predicted``)."""

    path: Path
    request: InitRequest
    source: str
    repo_id: str | None = None
    report: InitReport | None = None
    pushed: str | None = None
    seconds: float = 0.0
    coverage: Coverage | None = None
    """Share of the parameters that the GHN predicted, from the report or the entry's header; ``None`` if the header lacks it."""


def copy_entry(source: Path, output: str | os.PathLike) -> Path:
    """Copy a cache entry to ``output`` through a temporary file, so no partial file is left."""
    output = Path(output).expanduser()
    check_output_path(output)
    try:
        return atomic_copy(source, output)
    except OSError as error:
        raise OutputPathError(f"cannot write {output}: {error.strerror or error}") from error


def entry_coverage(path: Path, model_name: str, required: float | None = None) -> Coverage | None:
    """Return the coverage recorded in the header of an entry of ``model_name``.

    Raises:
        CoverageError: the recorded fraction is below ``required``.
        TimmGhnError: ``required`` is set and the header does not record the fraction.
    """
    header, _ = read_header(path)
    try:
        coverage = Coverage.from_metadata(header.get("__metadata__") or {}, path)
    except TimmGhnError:
        if required is None:
            return None
        raise
    logger.info("%s: the entry %s records %.2f%% of parameter elements predicted", model_name, path.name, 100 * coverage.fraction)
    coverage.check(model_name, required)
    return coverage


def _from_hub(request: InitRequest, cache: LocalCache, repos: list[str], push_to: str | None) -> tuple[Path, str] | None:
    for repo_id in repos:
        try:
            path = download_entry(repo_id, request, cache)
        except HubUnavailableError as error:
            logger.warning("%s; predicting %s locally", error, request.model_name)
            return None
        except HubAccessError:
            if repo_id == push_to:
                # The repo may not exist yet: the push at the end creates it.
                logger.info("%s is not readable yet; it is created by the push", repo_id)
                continue
            raise
        if path is not None:
            return path, repo_id
    return None


def resolve_initialization(
    model_name: str,
    options: InitOptions | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    hub_repo: str | Sequence[str] | None = None,
    push_to_hub: str | None = None,
    output: str | os.PathLike | None = None,
    **fields: Any,
) -> Resolved:
    """Return a checked file for an initialization: cached, downloaded from the Hub, or predicted.

    ``options`` and ``fields`` are those of :func:`timm_ghn.initialize_model`. With
    ``require_coverage``, an entry from the cache or the Hub is checked against the fraction in
    its header before it is copied to ``output`` or pushed.

    Args:
        cache_dir: the cache directory (default :func:`timm_ghn.cache.default_cache_dir`).
        hub_repo: Hub repo id(s) to look the entry up in (default ``$TIMM_GHN_HUB_REPO``).
        push_to_hub: repo id to upload the entry to afterwards (created if needed).
        output: also write the file here. A prediction is written here first and then copied
            into the cache, so a failed write names this path.

    Raises:
        HubAccessError: a repo returned 401, 403 or 404 (other than ``push_to_hub`` before it exists).
        CoverageError: the GHN predicted less than ``require_coverage``; nothing is written or pushed.
        TimmGhnError: any error of :func:`timm_ghn.initialize_model` or of the output path.
    """
    start = time.perf_counter()
    if output is not None:
        check_output_path(Path(output).expanduser())
    options = with_overrides(options, fields)
    request, ghn_value = make_request(model_name, options)
    cache = LocalCache(cache_dir)
    repos = hub_repos(hub_repo)
    if push_to_hub and push_to_hub not in repos:
        repos.append(push_to_hub)

    options = dataclasses.replace(options, ghn=ghn_value)
    resolved = _resolve_locked(request, options, cache, repos, push_to_hub, output)
    if push_to_hub and not (resolved.source == "hub" and resolved.repo_id == push_to_hub):
        resolved.pushed = push_entries(push_to_hub, [resolved.path]) or "already on the Hub"
    resolved.seconds = time.perf_counter() - start
    return resolved


def _resolve_locked(
    request: InitRequest,
    options: InitOptions,
    cache: LocalCache,
    repos: list[str],
    push_to: str | None,
    output: str | os.PathLike | None,
) -> Resolved:
    path = cache.lookup(request)
    if path is None:
        with cache.lock(request):
            path = cache.lookup(request)
            if path is None:
                return _fill(request, options, cache, repos, push_to, output)
    coverage = entry_coverage(path, request.model_name, options.require_coverage)
    if output is not None:
        copy_entry(path, output)
    return Resolved(path, request, "cache", coverage=coverage)


def _fill(
    request: InitRequest,
    options: InitOptions,
    cache: LocalCache,
    repos: list[str],
    push_to: str | None,
    output: str | os.PathLike | None,
) -> Resolved:
    """Fetch or predict the entry while holding its lock."""
    found = _from_hub(request, cache, repos, push_to)
    if found is not None:
        path, repo_id = found
        coverage = entry_coverage(path, request.model_name, options.require_coverage)
        if output is not None:
            copy_entry(path, output)
        return Resolved(path, request, "hub", repo_id=repo_id, coverage=coverage)

    logger.info("predicting %s %s (key %s)", request.model_name, request.method, request.key[:12])
    # The request's resolved start layer and JSON-normalised kwargs are what the key describes.
    options = dataclasses.replace(options, start_layer=request.start_layer, model_kwargs=request.model_kwargs)
    model, report = initialize_model(request.model_name, options)
    if report.ghn_sha256 != request.ghn_sha256:
        raise CheckpointError(
            f"the GHN checkpoint {report.ghn_name} changed while predicting (sha256 {report.ghn_sha256[:12]}, "
            f"expected {request.ghn_sha256[:12]}); run the command again"
        )
    metadata = report.metadata() | request.metadata()
    if output is not None:
        written = save_state_dict(model, output, metadata)
        path = cache.store_file(request, written)
    else:
        cache.ensure_root()
        path = save_state_dict(model, cache.path_for(request), metadata)
    return Resolved(path, request, "predicted", report=report, coverage=Coverage.of_prediction(report.prediction))
