"""``pretrained_cfg_overlay`` values that make ``timm.create_model(..., pretrained=True)`` load a
GHN initialization.

Example::

    model = timm.create_model(
        "resnet50", pretrained=True,
        pretrained_cfg_overlay=timm_ghn.ghn_orth("resnet50", ghn="ghn2_imagenet.pt"),
    )

The overlay points timm's ``file`` source at a safetensors file for the same model arguments,
taken from the local cache, else from the Hub repo(s) in ``hub_repo`` or ``$TIMM_GHN_HUB_REPO``,
else predicted and stored in the cache (see :mod:`timm_ghn.resolve`). Pass the same ``num_classes`` (and other constructor arguments) to both calls: the
overlay records the file's class count, so timm loads the head strictly instead of discarding it.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from timm_ghn.cache import CACHE_ENV, default_cache_dir, make_request
from timm_ghn.hub import hub_overlay as _hub_overlay
from timm_ghn.hub import hub_repos
from timm_ghn.errors import InvalidOptionError, TimmGhnError
from timm_ghn.options import InitOptions
from timm_ghn.pipeline import initialize_model, write_initialization
from timm_ghn.resolve import resolve_initialization

__all__ = ["CACHE_ENV", "default_cache_dir", "ghn", "ghn_orth", "hub_overlay", "pretrained_cfg_overlay"]


def _file_overlay(path: os.PathLike | str, num_classes: int) -> dict[str, Any]:
    return {
        "file": str(path),
        "source": "timm_ghn",
        "num_classes": int(num_classes),
        "custom_load": False,
        "label_offset": 0,
    }


def pretrained_cfg_overlay(
    model_name: str,
    method: str,
    *,
    ghn: Any = None,
    num_classes: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    output: str | os.PathLike | None = None,
    use_cache: bool = True,
    hub_repo: str | Sequence[str] | None = None,
    push_to_hub: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Return the timm overlay dict of an initialization of ``model_name``, resolving it first.

    Args:
        model_name: timm model name.
        method: ``ghn`` or ``ghn_orth``.
        ghn: GHN checkpoint path or loaded GHN (default ``$TIMM_GHN_CHECKPOINT``).
        num_classes: classes of the model; pass the same value to ``timm.create_model``.
        model_kwargs: other ``timm.create_model`` arguments, to pass there too.
        output: also write the file here, and point the overlay at it.
        use_cache: ``False`` predicts without reading or writing the cache or the Hub; the file
            is then written to ``output`` (required).
        hub_repo: Hub repo id(s) to look the entry up in (default ``$TIMM_GHN_HUB_REPO``).
        push_to_hub: upload the entry to this Hub repo.
        options: the other :class:`timm_ghn.options.InitOptions` fields: ``beta``, ``start_layer``,
            ``variant``, ``seed``, ``device``, ``predict_classifier``, ``require_coverage``.

    Returns:
        ``{'file': path, 'source': 'timm_ghn', 'num_classes': n, 'custom_load': False, 'label_offset': 0}``.
    """
    init_options = InitOptions(method=method, ghn=ghn, num_classes=num_classes, model_kwargs=model_kwargs, **options)

    if not use_cache:
        if hub_repo or push_to_hub:
            raise TimmGhnError("hub_repo and push_to_hub need the cache, so they cannot be combined with use_cache=False; drop one of them")
        if output is None:
            raise TimmGhnError("use_cache=False needs an output path: pass output=PATH")
        model, report = initialize_model(model_name, init_options)
        path = write_initialization(model, report, output)
        classes = getattr(model, "num_classes", None)
        return _file_overlay(path, classes if isinstance(classes, int) else report.model_kwargs.get("num_classes", 1000))

    resolved = resolve_initialization(
        model_name, init_options, hub_repo=hub_repo, push_to_hub=push_to_hub, output=output,
    )
    path = output if output is not None else resolved.path
    return _file_overlay(path, resolved.request.architecture.num_classes)


def hub_overlay(
    model_name: str,
    method: str = "ghn_orth",
    *,
    hub_repo: str | None = None,
    ghn: Any = None,
    num_classes: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Return the overlay that loads an entry from a Hub repo with plain timm (no timm_ghn needed).

    The entry must already be on the Hub (``timm-ghn predict ... --push-to-hub REPO``); this only
    computes its key and checks that the file exists. The result holds ``hf_hub_id``,
    ``hf_hub_filename`` and ``num_classes``, and contains nothing local, so it can be copied
    into code that runs without timm_ghn.

    Args:
        hub_repo: the repo id (default the first of ``$TIMM_GHN_HUB_REPO``).
        options: the other :class:`timm_ghn.options.InitOptions` fields (``beta``, ``start_layer``,
            ``variant``, ``seed``, ``predict_classifier``); ``device`` is ignored.

    Raises:
        InvalidOptionError: ``require_coverage`` is given; the entry is not downloaded, so its
            header cannot be checked.
    """
    repos = hub_repos(hub_repo)
    if not repos:
        raise TimmGhnError("no Hub repo given: pass hub_repo='user/repo' or set TIMM_GHN_HUB_REPO")
    if options.get("require_coverage") is not None:
        raise InvalidOptionError(
            "hub_overlay cannot check require_coverage, because it does not download the entry; "
            "use timm_ghn.ghn_orth(..., hub_repo=REPO, require_coverage=...) instead"
        )
    # The overlay only names a file, so nothing runs on the device.
    options.pop("device", None)
    request, _ = make_request(model_name, method=method, ghn=ghn, num_classes=num_classes, model_kwargs=model_kwargs, **options)
    return _hub_overlay(request, repos[0])


def ghn(model_name: str, **kwargs: Any) -> dict[str, Any]:
    """Overlay for the raw GHN prediction of ``model_name``; see :func:`pretrained_cfg_overlay`."""
    return pretrained_cfg_overlay(model_name, "ghn", **kwargs)


def ghn_orth(model_name: str, **kwargs: Any) -> dict[str, Any]:
    """Overlay for the GHN-orth initialization of ``model_name``; see :func:`pretrained_cfg_overlay`."""
    return pretrained_cfg_overlay(model_name, "ghn_orth", **kwargs)
