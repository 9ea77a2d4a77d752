"""``pretrained_cfg_overlay`` values that make ``timm.create_model(..., pretrained=True)`` load a
GHN initialization.

Example::

    model = timm.create_model(
        "resnet50", pretrained=True,
        pretrained_cfg_overlay=timm_ghn.ghn_orth("resnet50", ghn="ghn2_imagenet.pt"),
    )

The overlay points timm's ``file`` source at a safetensors file predicted for the same model
arguments. Pass the same ``num_classes`` (and other constructor arguments) to both calls: the
overlay records the file's class count, so timm loads the head strictly instead of discarding it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from huggingface_hub import constants as hf_constants

from timm_ghn.export import encode_json
from timm_ghn.pipeline import initialize_model, resolve_ghn, write_initialization

__all__ = ["CACHE_ENV", "default_cache_dir", "ghn", "ghn_orth", "pretrained_cfg_overlay"]

#: Environment variable that overrides the directory of predicted files.
CACHE_ENV = "TIMM_GHN_CACHE"


def default_cache_dir() -> Path:
    """``$TIMM_GHN_CACHE``, else ``$HF_HOME/timm_ghn`` (``~/.cache/huggingface/timm_ghn`` by default)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path(hf_constants.HF_HOME).expanduser() / "timm_ghn"


def pretrained_cfg_overlay(
    model_name: str,
    method: str,
    *,
    ghn: Any = None,
    num_classes: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    output: str | os.PathLike | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Predict an initialization of ``model_name``, write it, and return the timm overlay dict.

    Args:
        model_name: timm model name.
        method: ``ghn`` or ``ghn_orth``.
        ghn: GHN checkpoint path or loaded GHN (default ``$TIMM_GHN_CHECKPOINT``).
        num_classes: classes of the model; pass the same value to ``timm.create_model``.
        model_kwargs: other ``timm.create_model`` arguments, to pass there too.
        output: file to write; default a file named by a digest of the inputs in
            :func:`default_cache_dir`.
        options: ``beta``, ``start_layer``, ``variant``, ``seed``, ``device``,
            ``predict_classifier`` of :func:`timm_ghn.initialize_model`.

    Returns:
        ``{'file': path, 'source': 'timm_ghn', 'num_classes': n, 'custom_load': False, 'label_offset': 0}``.
    """
    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    loaded = resolve_ghn(ghn, options.get("device", "cpu"))
    model, report = initialize_model(model_name, method=method, ghn=loaded, model_kwargs=kwargs, **options)

    if output is None:
        # NOTE: the file is predicted again on every call; nothing here reuses an earlier file.
        digest = hashlib.sha256(encode_json(report.metadata() | {"options": repr(sorted(options.items()))}).encode()).hexdigest()
        directory = default_cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        output = directory / f"{model_name.replace('/', '_')}-{method}-{digest[:16]}.safetensors"
    path = write_initialization(model, report, output)

    classes = getattr(model, "num_classes", None)
    if classes is None:
        classes = kwargs.get("num_classes", 1000)
    return {
        "file": str(path),
        "source": "timm_ghn",
        "num_classes": int(classes),
        "custom_load": False,
        "label_offset": 0,
    }


def ghn(model_name: str, **kwargs: Any) -> dict[str, Any]:
    """Overlay for the raw GHN prediction of ``model_name``; see :func:`pretrained_cfg_overlay`."""
    return pretrained_cfg_overlay(model_name, "ghn", **kwargs)


def ghn_orth(model_name: str, **kwargs: Any) -> dict[str, Any]:
    """Overlay for the GHN-orth initialization of ``model_name``; see :func:`pretrained_cfg_overlay`."""
    return pretrained_cfg_overlay(model_name, "ghn_orth", **kwargs)
