"""CLI commands for the cache and the Hub: ``push``, ``pull``, ``cache list|info|clear``, and the
``--no-cache``, ``--hub-repo`` and ``--push-to-hub`` options of ``predict``.

``timm_ghn.cli`` registers these with :func:`add_predict_options` and :func:`register_commands`;
each command stores its function as ``args.handler``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from timm_ghn.cache import LocalCache, make_request
from timm_ghn.cli_options import add_init_options, init_options
from timm_ghn.errors import InvalidOptionError, TimmGhnError
from timm_ghn.hub import HUB_REPO_ENV, download_by_key, download_entry, hub_repos, push_entries
from timm_ghn.options import InitOptions
from timm_ghn.pipeline import Coverage, InitReport
from timm_ghn.resolve import copy_entry, entry_coverage, resolve_initialization

__all__ = ["add_predict_options", "check_cache_options", "predict_with_cache", "prediction_line", "register_commands"]


def add_predict_options(predict: argparse.ArgumentParser) -> None:
    """Add ``--no-cache``, ``--hub-repo`` and ``--push-to-hub`` to the ``predict`` parser."""
    predict.add_argument(
        "--no-cache", action="store_true",
        help="predict without reading or writing the local cache or the Hub",
    )
    predict.add_argument(
        "--hub-repo", action="append", default=None, metavar="REPO_ID",
        help=f"Hub repo to look the entry up in before predicting; repeatable (default: ${HUB_REPO_ENV}, comma-separated)",
    )
    predict.add_argument(
        "--push-to-hub", default=None, metavar="REPO_ID",
        help="upload the entry to this Hub model repo (created if needed; needs a write token)",
    )


def check_cache_options(args: argparse.Namespace) -> None:
    """Reject ``--no-cache`` together with ``--hub-repo`` or ``--push-to-hub``, which need the cache."""
    if args.no_cache and (args.hub_repo or args.push_to_hub):
        given = "--push-to-hub" if args.push_to_hub else "--hub-repo"
        raise InvalidOptionError(f"{given} cannot be combined with --no-cache, because Hub entries go through the cache; drop one of them")


def predict_with_cache(args: argparse.Namespace, options: InitOptions, output: Path) -> int:
    """Run ``predict`` through the cache and the Hub, write ``output`` and print one line."""
    resolved = resolve_initialization(
        args.model, options, hub_repo=args.hub_repo, push_to_hub=args.push_to_hub, output=output,
    )
    key = resolved.request.key[:12]
    pushed = f", pushed to {args.push_to_hub}" if resolved.pushed else ""
    if resolved.report is None:
        where = "the cache" if resolved.source == "cache" else f"Hub repo {resolved.repo_id}"
        print(f"{output}: {args.model} {options.method} from {where} (key {key}{_coverage_note(resolved.coverage)}){pushed}, {resolved.seconds:.2f} s")
        return 0

    print(f"{prediction_line(output, args.model, resolved.report, resolved.seconds)} (key {key}){pushed}")
    return 0


def _coverage_note(coverage: Coverage | None) -> str:
    """Return ``", 99.12% of parameters predicted"`` for an entry's header, or ``""`` when it lacks the value."""
    return "" if coverage is None else f", {100 * coverage.fraction:.2f}% of parameters predicted"


def prediction_line(path: Path, model_name: str, report: InitReport, seconds: float) -> str:
    """Return the line ``predict`` prints: the file, the predicted counts, GHN-orth's layer and the time."""
    prediction = report.prediction
    tensors_total = len(prediction.predicted) + len(prediction.unpredicted)
    orth = f", GHN-orth from layer {report.start_layer} (beta {report.beta:g})" if report.orth else ""
    return (
        f"{path}: {model_name} {report.method}, predicted {len(prediction.predicted)}/{tensors_total} tensors and "
        f"{prediction.num_params_predicted:,}/{prediction.num_params_total:,} parameters "
        f"({100 * prediction.fraction_predicted:.2f}%){orth}, {seconds:.2f} s"
    )


def register_commands(commands: argparse._SubParsersAction) -> None:
    """Add the ``push``, ``pull`` and ``cache`` commands; ``pull`` takes ``predict``'s options except ``--device``."""
    push = commands.add_parser(
        "push",
        help="upload cache entries to a Hugging Face Hub model repo",
        description="Upload local cache entries (all, or those whose keys start with KEY) to REPO_ID in one "
        "commit, with an index.json and a README model card. The repo is created if needed.",
    )
    push.add_argument("repo_id", metavar="REPO_ID", help="Hub model repo, e.g. my-team/timm-ghn-inits")
    push.add_argument("keys", nargs="*", metavar="KEY", help="key or key prefix of an entry (default: every entry)")
    push.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    push.set_defaults(handler=_run_push)

    pull = commands.add_parser(
        "pull",
        help="download an entry from the Hub (no prediction) for train.py --initial-checkpoint",
        description="Compute the key of MODEL with the given options, take the entry from the local cache or "
        "the Hub repo(s), and copy it to FILE. Nothing is predicted.",
    )
    pull.add_argument("model", metavar="MODEL", help="timm model name, e.g. resnet50 or convnext_base")
    add_init_options(pull, device=False)
    pull.add_argument(
        "--hub-repo", action="append", default=None, metavar="REPO_ID",
        help=f"Hub repo to download from; repeatable (default: ${HUB_REPO_ENV}, comma-separated)",
    )
    pull.add_argument(
        "--key", default=None, metavar="KEY",
        help="take the entry with this key (or key prefix) from the repo's index.json instead of computing the key; "
        "needs no GHN checkpoint, and options other than MODEL and --require-coverage are ignored",
    )
    pull.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the safetensors file")
    pull.set_defaults(handler=_run_pull)

    cache = commands.add_parser("cache", help="list, describe or clear the local cache", description="Manage the local cache of predicted initializations.")
    actions = cache.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list entries with model, method, size and key")
    listing.set_defaults(handler=_run_cache_list)
    info = actions.add_parser("info", help="show the cache directory and totals, or one entry's metadata")
    info.add_argument("key", nargs="?", metavar="KEY", help="key or key prefix of an entry")
    info.set_defaults(handler=_run_cache_info)
    clear = actions.add_parser("clear", help="remove entries (all, or those with the given keys)")
    clear.add_argument("keys", nargs="*", metavar="KEY", help="key or key prefix (default: every entry)")
    clear.set_defaults(handler=_run_cache_clear)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _run_push(args: argparse.Namespace) -> int:
    cache = LocalCache()
    if args.keys:
        entries = [cache.find(key) for key in args.keys]
    else:
        entries = [entry for entry in cache.entries() if entry.error is None]
    if not entries:
        raise TimmGhnError(f"nothing to push: no entries in {cache.root}; run `timm-ghn predict MODEL` first")
    url = push_entries(args.repo_id, [entry.path for entry in entries], private=args.private)
    if url is None:
        print(f"{args.repo_id} already has all {len(entries)} entries; nothing pushed")
    else:
        print(f"pushed {len(entries)} entries to {args.repo_id}: {url}")
    return 0


def _run_pull(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    options = init_options(args)
    if args.key:
        return _pull_by_key(args, options, start)
    repos = hub_repos(args.hub_repo)
    request, _ = make_request(args.model, options)
    cache = LocalCache()
    path = cache.lookup(request)
    source = "the cache"
    if path is None:
        with cache.lock(request):
            path = cache.lookup(request)
            for repo_id in repos:
                if path is not None:
                    break
                path = download_entry(repo_id, request, cache)
                source = f"Hub repo {repo_id}"
    if path is None and not repos:
        raise TimmGhnError(
            f"no entry for {args.model} {args.method} with key {request.key[:12]} in the local cache and no Hub "
            f"repo given: pass --hub-repo REPO_ID (or set {HUB_REPO_ENV}), or create it with `timm-ghn predict`"
        )
    if path is None:
        raise TimmGhnError(
            f"no entry for {args.model} {args.method} with key {request.key[:12]} in {', '.join(repos)}; "
            f"create it with `timm-ghn predict {args.model} ... --push-to-hub {repos[0]}`"
        )
    coverage = entry_coverage(path, args.model, options.require_coverage)
    output = copy_entry(path, args.output)
    print(f"{output}: {args.model} {args.method} from {source} (key {request.key[:12]}{_coverage_note(coverage)}), {time.perf_counter() - start:.2f} s")
    return 0


def _pull_by_key(args: argparse.Namespace, options: InitOptions, start: float) -> int:
    repos = hub_repos(args.hub_repo)
    if not repos:
        raise TimmGhnError(f"no Hub repo given: pass --hub-repo REPO_ID or set {HUB_REPO_ENV}")
    cache = LocalCache()
    for repo_id in repos:
        found = download_by_key(repo_id, args.key, cache, model_name=args.model)
        if found is not None:
            break
    else:
        raise TimmGhnError(f"no entry with key {args.key!r} in the index.json of {', '.join(repos)}; see the repo's README for the keys")
    path, record = found
    coverage = entry_coverage(path, args.model, options.require_coverage)
    output = copy_entry(path, args.output)
    print(f"{output}: {args.model} {record['method']} from Hub repo {repo_id} (key {args.key}{_coverage_note(coverage)}), {time.perf_counter() - start:.2f} s")
    return 0


def _run_cache_list(args: argparse.Namespace) -> int:
    cache = LocalCache()
    entries = cache.entries()
    for entry in entries:
        if entry.error:
            print(f"damaged  {_megabytes(entry.size):>10}  {entry.path.name}: {entry.error}")
        else:
            print(f"{entry.key[:16]}  {_megabytes(entry.size):>10}  {entry.model_name} {entry.method}  {entry.path.name}")
    total = sum(entry.size for entry in entries)
    print(f"{len(entries)} entries, {_megabytes(total)} in {cache.root}")
    return 0


def _run_cache_info(args: argparse.Namespace) -> int:
    cache = LocalCache()
    if args.key:
        entry = cache.find(args.key)
        print(f"path: {entry.path}")
        print(f"size: {_megabytes(entry.size)} ({entry.size} bytes)")
        for name, value in sorted(entry.metadata.items()):
            print(f"{name}: {value}")
        return 0
    entries = cache.entries()
    damaged = sum(1 for entry in entries if entry.error)
    print(f"cache directory: {cache.root}")
    print(f"entries: {len(entries)} ({damaged} damaged)")
    print(f"size: {_megabytes(sum(entry.size for entry in entries))}")
    print(f"hub repos: {', '.join(hub_repos()) or f'none (set {HUB_REPO_ENV})'}")
    return 0


def _run_cache_clear(args: argparse.Namespace) -> int:
    cache = LocalCache()
    removed = cache.clear(args.keys or None)
    print(f"removed {len(removed)} entries ({_megabytes(sum(entry.size for entry in removed))}) from {cache.root}")
    return 0
