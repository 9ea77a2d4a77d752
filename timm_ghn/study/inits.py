"""The initializations a fine-tuning study compares.

* ``rand``: timm's own initialization of the model.
* ``orth``: timm's initialization, then ``torch.nn.init.orthogonal_`` on every convolution and
  linear weight except the classifier's.
* ``ghn``: all parameters the GHN can place, predicted (:func:`timm_ghn.initialize_model` with
  ``method="ghn"``).
* ``ghn_orth``: the GHN's prediction, then GHN-orth with noise scale β from start layer L.
* ``oracle``: a pretrained checkpoint file given by the user.

In every init the classifier keeps timm's fresh initialization for the target classes, so the
inits differ only in the body of the network. Every init is seeded: equal arguments give equal
models.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from torch import nn

from timm_ghn.errors import InvalidOptionError
from timm_ghn.hypernet.checkpoint import LoadedGHN
from timm_ghn.pipeline import initialize_model
from timm_ghn.postprocess import default_start_layer, weight_modules

__all__ = ["INITS", "INIT_LABELS", "build_model", "classifier_names", "model_kwargs", "resolve_start_layer"]

logger = logging.getLogger(__name__)

#: Init names in the order the table lists them.
INITS = ("rand", "orth", "ghn", "ghn_orth", "oracle")

#: Row labels of the results table.
INIT_LABELS = {"rand": "Rand", "orth": "Orth", "ghn": "GHN", "ghn_orth": "GHN-orth", "oracle": "Pretrained (oracle)"}


def model_kwargs(model_name: str, num_classes: int, image_size: int) -> dict[str, Any]:
    """Return the ``timm.create_model`` arguments for ``num_classes`` classes and ``image_size`` pixels.

    Models that take an ``img_size`` argument (ViTs, MLP-Mixers) get it; convolutional networks
    take any input size and are built without it. The check builds the model on the ``meta``
    device, so it allocates no weights.
    """
    kwargs = {"num_classes": num_classes, "img_size": image_size}
    try:
        with torch.device("meta"):
            timm.create_model(model_name, pretrained=False, **kwargs)
    except TypeError:
        del kwargs["img_size"]
    return kwargs


def create_timm_model(model_name: str, kwargs: Mapping[str, Any], seed: int) -> nn.Module:
    """Build ``model_name`` with timm's init drawn after ``torch.manual_seed(seed)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(model_name, pretrained=False, **kwargs)


def classifier_names(model: nn.Module) -> set[str]:
    """Return the parameter names of the model's classifier (timm's ``get_classifier()``)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return set()
    ids = {id(p) for p in head.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def resolve_start_layer(start_layer: str | int | float | None, num_layers: int, model_name: str) -> int:
    r"""Turn a start-layer setting into a 1-based layer index ``L`` for a model with ``M`` layers.

    ``None`` or ``"default"`` gives :func:`timm_ghn.postprocess.default_start_layer`. An integer
    >= 1 is used as given. A fraction ``f`` in (0, 1) gives ``L = ⌊f·M⌋ + 1``, so that one
    grid value means the same relative depth in models of different sizes.
    """
    if start_layer is None or start_layer == "default":
        return default_start_layer(num_layers, model_name)
    value = float(start_layer)
    if value >= 1 and value == int(value):
        return int(value)
    if 0 < value < 1:
        return int(math.floor(value * num_layers)) + 1
    raise InvalidOptionError(
        f"invalid start layer {start_layer!r}: expected 'default', an integer >= 1 or a fraction in (0, 1)"
    )


def _orthogonal_(model: nn.Module, seed: int) -> None:
    """Draw an orthogonal matrix for every conv/linear weight except the classifier's."""
    head = classifier_names(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in weight_modules(model):
            if f"{name}.weight" in head or not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                continue
            nn.init.orthogonal_(module.weight, generator=generator)


def _load_oracle_(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Load a pretrained checkpoint into ``model``, keeping its fresh classifier."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise InvalidOptionError(f"pretrained checkpoint not found: {path}; pass an existing .safetensors or .pth file")
    state = timm.models.load_state_dict(str(path))
    head = classifier_names(model)
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own and k not in head and v.shape == own[k].shape}
    missing = sorted(set(own) - set(kept) - head)
    if missing:
        raise InvalidOptionError(
            f"pretrained checkpoint {path} does not fit {type(model).__name__}: {len(missing)} tensors missing or "
            f"of another shape, such as {', '.join(missing[:3])}; pass a checkpoint of the same architecture"
        )
    model.load_state_dict(kept, strict=False)


def build_model(
    model_name: str,
    init: str,
    *,
    num_classes: int,
    image_size: int = 32,
    seed: int = 0,
    ghn: LoadedGHN | None = None,
    beta: float = 3e-5,
    start_layer: str | int | float | None = None,
    pretrained: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``model_name`` with the initialization ``init`` and a fresh ``num_classes`` head.

    Args:
        model_name: a timm model name.
        init: one of :data:`INITS`.
        num_classes: classes of the target task.
        image_size: input side in pixels, for models that need it at construction.
        seed: seeds timm's init, the orthogonal draws and the GHN-orth noise.
        ghn: the loaded GHN, required by ``ghn`` and ``ghn_orth``.
        beta: GHN-orth noise scale β (``ghn_orth`` only).
        start_layer: GHN-orth start layer, see :func:`resolve_start_layer` (``ghn_orth`` only).
        pretrained: checkpoint file, required by ``oracle``.
        device: where the model lives and the GHN runs (``cpu``, ``cuda``).

    Returns:
        The model in training mode, on ``device``, and a dict of what the init did (resolved start layer,
        predicted fraction) for the results file.
    """
    if init not in INITS:
        raise InvalidOptionError(f"invalid init {init!r}: expected one of {', '.join(INITS)}")
    info: dict[str, Any] = {}
    kwargs = model_kwargs(model_name, num_classes, image_size)
    if init in ("rand", "orth", "oracle"):
        model = create_timm_model(model_name, kwargs, seed)
        if init == "orth":
            _orthogonal_(model, seed)
        elif init == "oracle":
            if pretrained is None:
                raise InvalidOptionError(f"the oracle init of {model_name} needs a checkpoint; pass --pretrained {model_name}=FILE")
            _load_oracle_(model, pretrained)
            info["pretrained"] = str(pretrained)
        return model.to(device).train(), info

    if ghn is None:
        raise InvalidOptionError(f"the {init} init needs a GHN; pass --ghn CHECKPOINT")
    resolved = None
    if init == "ghn_orth":
        with torch.device("meta"):
            num_layers = len(weight_modules(timm.create_model(model_name, pretrained=False, **kwargs)))
        resolved = resolve_start_layer(start_layer, num_layers, model_name)
    model, report = initialize_model(
        model_name,
        method=init,
        ghn=ghn,
        beta=beta,
        start_layer=resolved,
        seed=seed,
        device=device,
        predict_classifier=False,
        model_kwargs=kwargs,
    )
    info["predicted_fraction"] = report.prediction.fraction_predicted
    if report.orth is not None:
        info["start_layer"] = report.orth.start_layer
        info["num_layers"] = report.orth.num_layers
    return model.train(), info
