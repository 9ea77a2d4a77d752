"""Named study settings: ``cpu`` (small models, 12.5 minutes on 2 idle CPU cores) and
``paper`` (the architectures, epochs, seeds and batch sizes of the GHN-orth report's Table 1).

The ``paper`` preset takes ResNet-50 and ConvNeXt-Base, 300 epochs, 5 seeds and batch sizes 96
and 48 from Knyazev, "Pretraining a Neural Network before Knowing Its Architecture" (ICML 2022
pre-training workshop), with β = 3e-5 and the default start layers (37 for ResNet-50, 94 for
ConvNeXt-Base, see :func:`timm_ghn.postprocess.default_start_layer`). Its learning-rate and
weight-decay grids and its image size are this project's choice, not the report's.

Any option given on the command line replaces the preset's value.
"""

from __future__ import annotations

import copy
from typing import Any

from timm_ghn.errors import InvalidOptionError

__all__ = ["PRESETS", "preset_values"]

PRESETS: dict[str, dict[str, Any]] = {
    # NOTE: the one-hour figure is an estimate from single-epoch timings of resnet18 and
    # convnext_atto with one thread on a busy 2-core CPU; the whole preset has not been run yet.
    "cpu": {
        "models": ["resnet18", "convnext_atto"],
        "inits": ["rand", "orth", "ghn", "ghn_orth"],
        "seeds": [0, 1, 2],
        "epochs": 15,
        "optimizers": ["sgd"],
        "lrs": {"sgd": [0.01, 0.05]},
        "weight_decays": {"sgd": [5e-4]},
        "batch_size": {"resnet18": 64, "convnext_atto": 64},
        "image_size": 32,
        "betas": [3e-5],
        "start_layers": ["default", "0.5"],
        "val_every": 1,
    },
    "paper": {
        "models": ["resnet50", "convnext_base"],
        "inits": ["rand", "orth", "ghn", "ghn_orth"],
        "seeds": [0, 1, 2, 3, 4],
        "epochs": 300,
        "optimizers": ["sgd", "adamw"],
        "lrs": {"sgd": [0.01, 0.03, 0.1], "adamw": [1e-4, 3e-4, 1e-3]},
        "weight_decays": {"sgd": [5e-4], "adamw": [0.05]},
        "batch_size": {"resnet50": 96, "convnext_base": 48},
        "image_size": 32,
        "betas": [3e-5],
        "start_layers": ["default"],
        "val_every": 5,
    },
}


def preset_values(name: str) -> dict[str, Any]:
    """Return a copy of the settings of preset ``name``."""
    if name not in PRESETS:
        raise InvalidOptionError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
