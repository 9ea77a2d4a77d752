"""The main job: build a timm model, predict its parameters, post-process them, write a file.

``initialize_model`` runs the steps and returns the model with a report; ``write_initialization``
writes the model's state dict with header metadata that records every input of the result.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from timm.models import split_model_name_tag
from torch import nn

import timm_ghn
from timm_ghn.errors import CoverageError, InvalidOptionError, TimmGhnError, UnknownModelError
from timm_ghn.export import METADATA_PREFIX, encode_json, save_state_dict
from timm_ghn.hypernet.checkpoint import LoadedGHN, load_ghn
from timm_ghn.options import METHODS, InitOptions, with_overrides
from timm_ghn.registry import download_named_ghn, is_named_ghn
from timm_ghn.postprocess import OrthReport, ghn_orth_
from timm_ghn.predict import PredictionResult, predict_parameters

__all__ = [
    "METHODS",
    "DEFAULT_GHN",
    "GHN_ENV",
    "Coverage",
    "InitOptions",
    "InitReport",
    "check_model_name",
    "initialize_model",
    "resolve_ghn",
    "write_initialization",
]

logger = logging.getLogger(__name__)

#: Environment variable naming the GHN checkpoint used when none is passed.
GHN_ENV = "TIMM_GHN_CHECKPOINT"

#: GHN shipped inside the package and used when neither an argument nor ``$TIMM_GHN_CHECKPOINT``
#: names one: a GHN-2 trained by ``timm-ghn pretrain`` on five CIFAR-10 classes (MODEL_CARD.md).
DEFAULT_GHN = Path(__file__).resolve().parent / "data" / "ghn2-cifar5.safetensors"


@dataclasses.dataclass
class InitReport:
    """Everything that determined an initialization, and what it did (times in seconds)."""

    model_name: str
    model_kwargs: dict[str, Any]
    method: str
    beta: float | None
    start_layer: int | None
    variant: str | None
    seed: int
    ghn_name: str
    ghn_sha256: str
    prediction: PredictionResult
    orth: OrthReport | None
    create_seconds: float
    postprocess_seconds: float

    def metadata(self) -> dict[str, str]:
        """Header metadata for the safetensors file (all values are strings)."""
        values = {
            "model_name": self.model_name,
            "model_kwargs": encode_json(self.model_kwargs),
            "method": self.method,
            "beta": "" if self.beta is None else repr(self.beta),
            "start_layer": "" if self.start_layer is None else str(self.start_layer),
            "variant": self.variant or "",
            "seed": str(self.seed),
            "ghn_name": self.ghn_name,
            "ghn_sha256": self.ghn_sha256,
            "predicted_fraction": f"{self.prediction.fraction_predicted:.6f}",
            "params_predicted": str(self.prediction.num_params_predicted),
            "params_total": str(self.prediction.num_params_total),
            "classifier_predicted": str(self.prediction.classifier_predicted).lower(),
            "unpredicted": encode_json(self.prediction.unpredicted),
            "timm_version": timm.__version__,
            "torch_version": torch.__version__,
            "version": timm_ghn.__version__,
        }
        return {METADATA_PREFIX + k: v for k, v in values.items()}

    def summary(self) -> str:
        seconds = self.prediction.graph_seconds + self.prediction.ghn_seconds + self.postprocess_seconds
        return f"{self.model_name}: {self.method}, {self.prediction.summary()}, {seconds:.2f} s"


@dataclasses.dataclass(frozen=True)
class Coverage:
    """The share of a model's parameter elements that the GHN predicted, and the tensors it left."""

    fraction: float
    unpredicted: tuple[str, ...]
    classifier_predicted: bool
    num_params_predicted: int | None = None
    num_params_total: int | None = None

    @classmethod
    def of_prediction(cls, prediction: PredictionResult) -> Coverage:
        return cls(
            prediction.fraction_predicted,
            tuple(prediction.unpredicted),
            prediction.classifier_predicted,
            prediction.num_params_predicted,
            prediction.num_params_total,
        )

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], source: str | os.PathLike) -> Coverage:
        """Read the coverage that :meth:`InitReport.metadata` recorded in the header of ``source``.

        Files written before the exact counts were recorded give the fraction rounded to 6 digits.

        Raises:
            TimmGhnError: the header lacks the predicted fraction, or a value in it is invalid.
        """
        values = {key[len(METADATA_PREFIX):]: value for key, value in metadata.items() if key.startswith(METADATA_PREFIX)}
        try:
            unpredicted = tuple(json.loads(values["unpredicted"]))
            predicted = int(values["params_predicted"]) if "params_predicted" in values else None
            total = int(values["params_total"]) if "params_total" in values else None
            if predicted is not None and total:
                fraction = predicted / total
            else:
                fraction = float(values["predicted_fraction"])
        except (KeyError, TypeError, ValueError) as error:
            raise TimmGhnError(
                f"{source}: the header does not record how much the GHN predicted ({error!r}), so the required "
                "coverage cannot be checked; remove the entry with `timm-ghn cache clear KEY` or predict with --no-cache"
            ) from error
        return cls(fraction, unpredicted, values.get("classifier_predicted") == "true", predicted, total)

    @property
    def unpredicted_kinds(self) -> list[str]:
        """The last name components of the tensors left at the model's own init, such as ``pos_embed``."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.unpredicted})

    def check(self, model_name: str, required: float | None) -> None:
        """Raise :class:`CoverageError` when the predicted fraction is below ``required`` (``None``: no minimum)."""
        if required is None or self.fraction >= required:
            return
        counts = ""
        if self.num_params_predicted is not None and self.num_params_total is not None:
            counts = f" ({self.num_params_predicted:,} of {self.num_params_total:,})"
        kinds = ", ".join(self.unpredicted_kinds) or "none"
        first_names = ", ".join(self.unpredicted[:3]) + (", ..." if len(self.unpredicted) > 3 else "")
        tensors = f" ({len(self.unpredicted)} tensors: {first_names})" if self.unpredicted else ""
        head = "" if self.classifier_predicted else "; the classifier was not predicted (see --predict-classifier)"
        raise CoverageError(
            f"{model_name}: the GHN predicted {self.fraction:.6f} of the parameter elements{counts}, below "
            f"--require-coverage {required!r}; parameter kinds left at timm's init: {kinds}{tensors}{head}; "
            "lower --require-coverage (Python: require_coverage) or use a model whose graph places these parameters"
        )


def check_model_name(model_name: str) -> None:
    """Raise :class:`UnknownModelError` with close matches if timm does not know ``model_name``."""
    architecture, _ = split_model_name_tag(model_name)
    if timm.is_model(architecture):
        return
    suggestions = difflib.get_close_matches(architecture, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else "; see timm.list_models() for valid names"
    raise UnknownModelError(f"unknown timm model {model_name!r}{hint}")


def resolve_ghn(ghn: str | os.PathLike | LoadedGHN | None, device: str | torch.device = "cpu") -> LoadedGHN:
    """Return a loaded GHN from a path, a released GHN's name (see :mod:`timm_ghn.registry`), an
    already loaded GHN, ``$TIMM_GHN_CHECKPOINT``, or else the bundled :data:`DEFAULT_GHN`."""
    if isinstance(ghn, LoadedGHN):
        ghn.model.to(device)
        return ghn
    if ghn is None:
        ghn = os.environ.get(GHN_ENV)
        if not ghn:
            if not DEFAULT_GHN.is_file():
                raise TimmGhnError(
                    f"no GHN checkpoint given and the bundled GHN {DEFAULT_GHN} is missing: pass --ghn PATH "
                    f"(Python: ghn=PATH), set {GHN_ENV}, or reinstall timm-ghn"
                )
            ghn = DEFAULT_GHN
    if isinstance(ghn, str) and is_named_ghn(ghn) and not Path(ghn).exists():
        ghn = download_named_ghn(ghn)
    return load_ghn(ghn, device=device)


def initialize_model(model_name: str, options: InitOptions | None = None, **fields: Any) -> tuple[nn.Module, InitReport]:
    """Create the timm model ``model_name`` and initialize it with a GHN.

    Args:
        model_name: a name from ``timm.list_models()``, optionally with a pretrained tag.
        options: method, GHN, GHN-orth settings, seed, device, model arguments and required
            coverage (see :class:`InitOptions`); default ``InitOptions()``.
        fields: :class:`InitOptions` fields that replace those of ``options``, such as
            ``method="ghn"`` or ``model_kwargs={"num_classes": 10}``.

    Returns:
        The model (in training mode, on the options' device) and its :class:`InitReport`.

    Raises:
        CoverageError: the GHN predicted less than ``require_coverage`` of the parameter elements.
        TimmGhnError: an unknown model, an invalid option or an unusable GHN checkpoint.
    """
    options = with_overrides(options, fields)
    check_model_name(model_name)
    kwargs = options.timm_kwargs
    loaded = resolve_ghn(options.ghn, options.device)

    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        try:
            model = timm.create_model(model_name, pretrained=False, **kwargs)
        except TypeError as error:
            raise InvalidOptionError(f"timm cannot build {model_name!r} with {kwargs}: {error}") from error
    model.to(options.device)
    create_seconds = time.perf_counter() - start

    prediction = predict_parameters(model, loaded, predict_classifier=options.predict_classifier)
    logger.info("%s: %s", model_name, prediction.summary())
    Coverage.of_prediction(prediction).check(model_name, options.require_coverage)

    orth = None
    start = time.perf_counter()
    if options.method == "ghn_orth":
        generator = torch.Generator().manual_seed(options.seed)
        orth = ghn_orth_(
            model, beta=options.beta, start_layer=options.start_layer, generator=generator,
            variant=options.variant, model_name=model_name,
        )
    postprocess_seconds = time.perf_counter() - start

    report = InitReport(
        model_name=model_name,
        model_kwargs=kwargs,
        method=options.method,
        beta=float(options.beta) if orth else None,
        start_layer=orth.start_layer if orth else None,
        variant=options.variant if orth else None,
        seed=options.seed,
        ghn_name=loaded.name,
        ghn_sha256=loaded.sha256,
        prediction=prediction,
        orth=orth,
        create_seconds=create_seconds,
        postprocess_seconds=postprocess_seconds,
    )
    return model, report


def write_initialization(model: nn.Module, report: InitReport, path: str | os.PathLike) -> Path:
    """Write the initialized model's state dict to ``path`` (safetensors) with the report's metadata."""
    path = save_state_dict(model, path, report.metadata())
    logger.info("wrote %s (%s, ghn sha256 %s...)", path, report.model_name, report.ghn_sha256[:12])
    return path
