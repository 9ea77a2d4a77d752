"""The options of one initialization, declared, defaulted and checked in one place.

:class:`InitOptions` is taken by :func:`timm_ghn.initialize_model`,
:func:`timm_ghn.cache.make_request` and :func:`timm_ghn.resolve_initialization`, and the CLI
builds one from its arguments. Those functions also accept the fields as keyword arguments.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import torch

from timm_ghn.errors import InvalidOptionError
from timm_ghn.hypernet.checkpoint import LoadedGHN
from timm_ghn.postprocess import VARIANTS

__all__ = ["METHODS", "InitOptions", "parse_device", "with_overrides"]

#: Initialization methods: raw GHN prediction, or prediction followed by GHN-orth.
METHODS = ("ghn", "ghn_orth")


def parse_device(device: str | torch.device) -> torch.device:
    """Return ``device`` as a :class:`torch.device`.

    Raises:
        InvalidOptionError: the name is not a torch device, or it names CUDA and CUDA is not available.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise InvalidOptionError(f"invalid device {device!r}: expected cpu, cuda or cuda:N") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError(
            f"device {str(device)!r} requested but CUDA is not available; use --device cpu (Python: device='cpu')"
        )
    return parsed


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class InitOptions:
    """Options of one initialization; every value is checked when the object is built.

    ``dataclasses.replace`` checks the new values too. ``model_kwargs`` is stored as a copy, so
    changing the mapping that was passed in does not change the options.

    Raises:
        InvalidOptionError: a value is out of range; the message names the value and the fix.
    """

    method: str = "ghn_orth"
    """``ghn`` (the GHN's prediction as is) or ``ghn_orth`` (prediction, then GHN-orth)."""

    ghn: str | os.PathLike | LoadedGHN | None = None
    """GHN checkpoint path, released GHN name or loaded GHN; ``None`` means ``$TIMM_GHN_CHECKPOINT``,
    else the bundled GHN."""

    beta: float = 3e-5
    """GHN-orth noise scale β, a multiple of the std of each weight's correlations; 0 disables the noise."""

    start_layer: int | None = None
    """First 1-based layer (among modules with a ≥ 2-D weight) that GHN-orth changes; ``None``
    means :func:`timm_ghn.postprocess.default_start_layer`."""

    variant: str = "released"
    """GHN-orth correlation axis: ``released`` (ppuda code) or ``paper`` (output channels)."""

    seed: int = 0
    """Seed of timm's init of unpredicted parameters and of the GHN-orth noise."""

    device: str | torch.device = "cpu"
    """Device of the GHN and the model, such as ``cpu`` or ``cuda:1``; stored as a :class:`torch.device`."""

    predict_classifier: bool | None = None
    """Predict the head; ``None`` predicts it only when its classes equal the GHN's."""

    num_classes: int | None = None
    """Classes of the model's head; ``None`` keeps ``model_kwargs``'s value or the model's own."""

    model_kwargs: Mapping[str, Any] | None = None
    """Other ``timm.create_model`` keyword arguments; ``pretrained`` is ignored."""

    require_coverage: float | None = None
    """Minimum fraction (0 to 1) of parameter elements the GHN must predict; a result below it
    raises :class:`timm_ghn.errors.CoverageError` and nothing is written. ``None`` accepts any."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidOptionError(f"invalid method {self.method!r}: expected one of {', '.join(METHODS)}")
        if not _is_integer(self.seed) or not 0 <= self.seed < 2**63:
            raise InvalidOptionError(f"invalid seed {self.seed!r}: expected an integer from 0 to 2**63 - 1")
        beta = self.beta
        if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
            raise InvalidOptionError(f"invalid beta {beta!r}: expected a finite number >= 0 (the paper uses 3e-5)")
        start_layer = self.start_layer
        if start_layer is not None and (not isinstance(start_layer, int) or start_layer < 0):
            raise InvalidOptionError(f"invalid start layer {start_layer!r}: expected an integer >= 0 (1 is the first layer)")
        if self.variant not in VARIANTS:
            raise InvalidOptionError(f"invalid GHN-orth variant {self.variant!r}: expected one of {', '.join(map(repr, VARIANTS))}")
        if self.predict_classifier not in (None, True, False):
            raise InvalidOptionError(f"invalid predict_classifier {self.predict_classifier!r}: expected True, False or None (auto)")
        object.__setattr__(self, "device", parse_device(self.device))
        self._check_model_kwargs()
        self._check_required_coverage()

    def _check_model_kwargs(self) -> None:
        kwargs = self.model_kwargs
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, Mapping):
            raise InvalidOptionError(
                f"invalid model kwargs {kwargs!r}: expected a mapping of timm.create_model arguments such as {{'drop_rate': 0.1}}"
            )
        object.__setattr__(self, "model_kwargs", dict(kwargs))

        classes = self.num_classes
        if classes is None:
            return
        if not _is_integer(classes) or classes < 1:
            raise InvalidOptionError(f"invalid --num-classes {classes!r} (Python: num_classes={classes!r}): expected an integer >= 1")
        if kwargs.get("num_classes", classes) != classes:
            raise InvalidOptionError(
                f"--num-classes {classes} conflicts with num_classes {kwargs['num_classes']} in --model-kwargs "
                "(Python: num_classes and model_kwargs); give one"
            )

    def _check_required_coverage(self) -> None:
        required = self.require_coverage
        if required is None:
            return
        if isinstance(required, bool) or not isinstance(required, (int, float)) or not 0 <= required <= 1:
            raise InvalidOptionError(
                f"invalid --require-coverage {required!r} (Python: require_coverage={required!r}): expected a fraction "
                "of parameter elements from 0 to 1, such as 0.99 for 99%"
            )

    @property
    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model``: ``model_kwargs`` without ``pretrained``, and
        ``num_classes`` when it is set."""
        kwargs = dict(self.model_kwargs)
        kwargs.pop("pretrained", None)
        if self.num_classes is not None:
            kwargs["num_classes"] = self.num_classes
        return kwargs


def with_overrides(options: InitOptions | None, overrides: Mapping[str, Any]) -> InitOptions:
    """Return ``options`` with the fields in ``overrides`` replaced, or new options from ``overrides``.

    This lets a function take ``options`` and the same fields as keyword arguments.

    Raises:
        TypeError: a name in ``overrides`` is not a field of :class:`InitOptions`.
        InvalidOptionError: a value is out of range.
    """
    if options is None:
        return InitOptions(**overrides)
    if not isinstance(options, InitOptions):
        raise TypeError(f"options must be an InitOptions, not {type(options).__name__}")
    return dataclasses.replace(options, **overrides) if overrides else options
