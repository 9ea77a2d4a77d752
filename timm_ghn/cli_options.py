"""The command-line form of :class:`timm_ghn.options.InitOptions`, shared by ``predict`` and ``pull``.

Defaults come from the dataclass, and the range checks run when the options are built, so the
CLI only parses text (JSON for ``--model-kwargs``, a number for ``--require-coverage``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from timm_ghn.errors import InvalidOptionError
from timm_ghn.options import METHODS, InitOptions
from timm_ghn.pipeline import GHN_ENV
from timm_ghn.postprocess import VARIANTS
from timm_ghn.registry import NAMED_GHNS

__all__ = ["add_init_options", "init_options", "parse_model_kwargs"]


def parse_model_kwargs(text: str | None) -> dict:
    """Return the JSON object of ``--model-kwargs`` (``{}`` when it is not given)."""
    if not text:
        return {}
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidOptionError(f"invalid --model-kwargs {text!r}: not JSON ({error.msg})") from error
    if not isinstance(values, dict):
        raise InvalidOptionError(f"invalid --model-kwargs {text!r}: expected a JSON object such as '{{\"drop_rate\": 0.1}}'")
    return values


def _parse_required_coverage(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError as error:
        raise InvalidOptionError(
            f"invalid --require-coverage {text!r}: not a number; expected a fraction of parameter elements "
            "from 0 to 1, such as 0.99 for 99%"
        ) from error


def add_init_options(parser: argparse.ArgumentParser, *, device: bool = True) -> None:
    """Add the options of :class:`InitOptions` to ``parser`` (``--device`` only when ``device``)."""
    parser.add_argument(
        "--method", choices=METHODS, default=InitOptions.method,
        help="ghn: raw GHN prediction; ghn_orth: prediction, then noise and orthogonalisation (default: %(default)s)",
    )
    parser.add_argument(
        "--ghn", metavar="CHECKPOINT", default=None,
        help=f"GHN checkpoint: a ppuda GHN-2 .pt, a GHN-3 .pt, a timm_ghn .safetensors file, or a released name "
        f"({', '.join(NAMED_GHNS)}; downloaded once into the Hugging Face cache) "
        f"(default: ${GHN_ENV}, else the bundled GHN)",
    )

    parser.add_argument("--num-classes", type=int, default=None, metavar="N", help="classes of the model's head (default: the model's own, 1000 for ImageNet models)")
    parser.add_argument("--model-kwargs", default=None, metavar="JSON", help="other timm.create_model arguments as a JSON object")

    parser.add_argument(
        "--beta", type=float, default=InitOptions.beta, metavar="B",
        help="GHN-orth noise scale β, a multiple of the std of each weight's correlation matrix; 0 disables noise (default: %(default)g)",
    )
    parser.add_argument(
        "--start-layer", type=int, default=None, metavar="L",
        help="first layer GHN-orth changes, 1-based among modules with a weight of ≥ 2 dims in registration order; "
        "default: 37 for resnet50, 94 for convnext_base (100 with --variant paper), else the deepest third",
    )
    parser.add_argument(
        "--variant", choices=VARIANTS, default=InitOptions.variant,
        help="GHN-orth noise statistic: released = ppuda code (correlation of the tall weight view's rows), "
        "paper = correlation between output channels (default: %(default)s)",
    )

    parser.add_argument("--seed", type=int, default=InitOptions.seed, metavar="S", help="seed of timm's init of unpredicted parameters and of the noise (default: %(default)s)")
    if device:
        parser.add_argument("--device", default=InitOptions.device, metavar="D", help="device for the GHN and the model: cpu, cuda, cuda:N (default: %(default)s)")

    classifier = parser.add_mutually_exclusive_group()
    classifier.add_argument(
        "--predict-classifier", dest="predict_classifier", action="store_true", default=None,
        help="predict the head even when its classes differ from the GHN's (rows are tiled)",
    )
    classifier.add_argument(
        "--no-predict-classifier", dest="predict_classifier", action="store_false",
        help="keep timm's init of the head (default when its classes differ from the GHN's)",
    )

    parser.add_argument(
        "--require-coverage", default=None, metavar="FRACTION",
        help="fail, writing no file, when the GHN predicts less than this fraction (0 to 1) of the model's "
        "parameter elements; the error names the parameter kinds left at timm's init (default: no minimum)",
    )


def init_options(args: argparse.Namespace) -> InitOptions:
    """Build the :class:`InitOptions` of parsed arguments; fields without an option keep their default.

    Raises:
        InvalidOptionError: a value cannot be parsed or is out of range.
    """
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(InitOptions) if hasattr(args, field.name)}
    values["model_kwargs"] = parse_model_kwargs(values.get("model_kwargs"))
    values["require_coverage"] = _parse_required_coverage(values.get("require_coverage"))
    return InitOptions(**values)
