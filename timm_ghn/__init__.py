"""timm_ghn: initialize timm models with parameters predicted by a Graph HyperNetwork.

Three ways in:

* ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=timm_ghn.ghn_orth(name, ghn=PATH))``;
* ``timm-ghn predict NAME --ghn PATH -o init.safetensors`` and timm's ``--initial-checkpoint``;
* ``timm_ghn.hub_overlay(name, hub_repo=REPO, ...)`` for plain timm, from an entry on the Hub;
* :func:`initialize_model`, :func:`predict_parameters` and :func:`ghn_orth_` in Python.
"""

__version__ = "0.1.0"

from timm_ghn.errors import CheckpointError, CoverageError, InvalidOptionError, OutputPathError, TimmGhnError, UnknownModelError
from timm_ghn.graph import Graph, build_graph
from timm_ghn.hypernet import GHN2, GHNConfig, LoadedGHN, load_ghn, save_ghn
from timm_ghn.options import InitOptions
from timm_ghn.pipeline import InitReport, initialize_model, write_initialization
from timm_ghn.postprocess import add_correlated_noise_, ghn_orth_, orthogonalize_
from timm_ghn.predict import PredictionResult, predict_parameters
from timm_ghn.resolve import resolve_initialization
from timm_ghn.timm_plugin import ghn, ghn_orth, hub_overlay, pretrained_cfg_overlay

__all__ = [
    "CheckpointError",
    "CoverageError",
    "GHN2",
    "GHNConfig",
    "Graph",
    "InitOptions",
    "InitReport",
    "InvalidOptionError",
    "LoadedGHN",
    "OutputPathError",
    "PredictionResult",
    "TimmGhnError",
    "UnknownModelError",
    "add_correlated_noise_",
    "build_graph",
    "ghn",
    "ghn_orth",
    "ghn_orth_",
    "hub_overlay",
    "initialize_model",
    "load_ghn",
    "orthogonalize_",
    "predict_parameters",
    "pretrained_cfg_overlay",
    "resolve_initialization",
    "save_ghn",
    "write_initialization",
]
