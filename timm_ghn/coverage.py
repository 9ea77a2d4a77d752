"""Coverage of timm architectures: does the graph build, and how much of each model does it place?

:func:`measure_architecture` measures one architecture with its default constructor arguments.
It builds the model on the ``meta`` device (no weights are allocated) and its graph, and counts
the parameter tensors and elements the graph places. Optionally it builds the real model on the
CPU and predicts it with a GHN. ``timm-ghn coverage`` (:mod:`timm_ghn.coverage_cli`) runs it over
the names that match a pattern, and ``benchmarks/zoo_coverage.py`` runs it over the whole zoo in
worker processes.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import fnmatch
import logging
import statistics
import time
from typing import Any, Iterable

import timm
import torch

from timm_ghn.errors import InvalidOptionError
from timm_ghn.graph import build_graph
from timm_ghn.hypernet.checkpoint import LoadedGHN
from timm_ghn.predict import predict_parameters

__all__ = [
    "ArchitectureCoverage",
    "CoverageSummary",
    "DEFAULT_PREDICT_MAX_PARAMS",
    "FULL_COVERAGE",
    "match_models",
    "measure_architecture",
    "summarize",
]

logger = logging.getLogger(__name__)

#: Models with at least this fraction of their parameter elements placed count as covered.
FULL_COVERAGE = 0.99

#: Largest model (in parameters) that ``timm-ghn coverage --predict`` builds and predicts by default.
#: Its float32 weights take 4 bytes per parameter, so 30 M parameters take about 120 MB.
DEFAULT_PREDICT_MAX_PARAMS = 30_000_000

# Error messages are cut to this many characters, so one model's record stays one short line.
_MAX_ERROR_CHARS = 300


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error)[:_MAX_ERROR_CHARS]}"


@dataclasses.dataclass
class ArchitectureCoverage:
    """Coverage of one architecture: its graph's placed parameters and a GHN's prediction (times in seconds).

    ``None`` marks a value that was not measured: a step failed before it, or it was not requested.
    """

    name: str
    tensors: int | None = None
    """Parameter tensors of the model."""
    params: int | None = None
    """Parameter elements of the model."""
    graph_seconds: float | None = None
    nodes: int | None = None
    edges: int | None = None
    placed_tensors: int | None = None
    placed_params: int | None = None
    unplaced_kinds: list[str] | None = None
    """Last name components of the parameters the graph leaves, such as ``pos_embed``."""
    predict_seconds: float | None = None
    """Time of :func:`timm_ghn.predict_parameters`, graph building included."""
    predicted_tensors: int | None = None
    predicted_params: int | None = None
    error: str | None = None
    """``create: ...`` or ``graph: ...`` when the model or its graph could not be built."""
    predict_error: str | None = None

    @property
    def graph_built(self) -> bool:
        return self.error is None

    @property
    def placed_fraction(self) -> float | None:
        """Fraction of the parameter elements placed in the graph (1.0 for a model without parameters)."""
        if self.placed_params is None:
            return None
        return self.placed_params / self.params if self.params else 1.0

    @property
    def predicted_fraction(self) -> float | None:
        """Fraction of the parameter elements the GHN predicted, when the model was predicted."""
        if self.predicted_params is None:
            return None
        return self.predicted_params / self.params if self.params else 1.0

    def to_record(self) -> dict[str, Any]:
        """Return the JSON record of ``benchmarks/zoo_coverage.py``: the measured fields without the name."""
        values = dataclasses.asdict(self)
        del values["name"]
        return {key: value for key, value in values.items() if value is not None}

    @classmethod
    def from_record(cls, name: str, record: dict[str, Any]) -> ArchitectureCoverage:
        return cls(name=name, **record)


def measure_architecture(
    name: str, ghn: LoadedGHN | None = None, predict_max_params: int | None = None
) -> ArchitectureCoverage:
    """Measure the coverage of ``timm.create_model(name)``. Any failure is recorded in the result, not raised.

    The graph follows ``ghn``'s graph style (GHN-2 rules without a GHN). With ``ghn`` and
    ``predict_max_params``, a model with at most that many parameters is also built on the CPU
    and predicted, with timm's init seeded by 0 and the caller's random state kept.
    """
    result = ArchitectureCoverage(name)
    try:
        with torch.device("meta"):
            model = timm.create_model(name)
    except Exception as error:  # a constructor can fail in any way; the record names it
        result.error = f"create: {_describe(error)}"
        return result

    params = dict(model.named_parameters())
    result.tensors = len(params)
    result.params = sum(p.numel() for p in params.values())
    style = ghn.model.config.graph_style if ghn is not None else "ghn2"
    try:
        start = time.perf_counter()
        graph = build_graph(model, style=style)
        result.graph_seconds = time.perf_counter() - start
    except Exception as error:  # tracing can fail in any way; the record names it
        result.error = f"graph: {_describe(error)}"
        return result

    result.nodes = graph.num_nodes
    result.edges = int((graph.adjacency > 0).sum())
    result.placed_tensors = len(params) - len(graph.unplaced)
    result.placed_params = result.params - sum(params[n].numel() for n in graph.unplaced)
    result.unplaced_kinds = sorted({n.rsplit(".", 1)[-1] for n in graph.unplaced})

    if ghn is not None and predict_max_params is not None and result.params <= predict_max_params:
        _predict(result, ghn)
    return result


def _predict(result: ArchitectureCoverage, ghn: LoadedGHN) -> None:
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(result.name)
        start = time.perf_counter()
        # The head is predicted too, whatever its class count: the sweep measures what the GHN
        # can predict. With the default ``predict_classifier=None`` a head whose class count
        # differs from the GHN's keeps timm's init.
        prediction = predict_parameters(model, ghn, predict_classifier=True)
        result.predict_seconds = time.perf_counter() - start
    except Exception as error:  # a failed prediction is part of the coverage report
        result.predict_error = _describe(error)
        logger.info("%s: prediction failed: %s", result.name, result.predict_error)
        return
    result.predicted_tensors = len(prediction.predicted)
    result.predicted_params = prediction.num_params_predicted
    logger.info("%s: %s", result.name, prediction.summary())


@dataclasses.dataclass
class CoverageSummary:
    """Totals over measured architectures (times in seconds)."""

    models: int
    built: int
    fully_placed: int
    """Models with at least :data:`FULL_COVERAGE` of their parameter elements placed."""
    median_graph_seconds: float | None
    max_graph_seconds: float | None
    predicted: int
    predict_failures: int
    unplaced_kinds: collections.Counter
    """For each unplaced parameter kind, the number of models that leave it."""

    def line(self) -> str:
        """Return the one-line summary that ``timm-ghn coverage`` prints last."""
        text = (
            f"models: {self.models}, graphs built: {self.built}, "
            f"with >= {FULL_COVERAGE:.0%} of parameters placed: {self.fully_placed}"
        )
        if self.median_graph_seconds is not None:
            text += f", median graph time: {self.median_graph_seconds:.3f} s"
        if self.predicted or self.predict_failures:
            text += f", predicted: {self.predicted}, prediction failures: {self.predict_failures}"
        return text


def summarize(results: Iterable[ArchitectureCoverage]) -> CoverageSummary:
    results = list(results)
    built = [r for r in results if r.graph_built]
    times = [r.graph_seconds for r in built]
    return CoverageSummary(
        models=len(results),
        built=len(built),
        fully_placed=sum(1 for r in built if r.placed_fraction >= FULL_COVERAGE),
        median_graph_seconds=statistics.median(times) if times else None,
        max_graph_seconds=max(times) if times else None,
        predicted=sum(1 for r in built if r.predicted_params is not None),
        predict_failures=sum(1 for r in built if r.predict_error is not None),
        unplaced_kinds=collections.Counter(kind for r in built for kind in r.unplaced_kinds),
    )


def match_models(pattern: str) -> list[str]:
    """Return the names of ``timm.list_models()`` that match the fnmatch ``pattern``, in timm's order.

    Raises:
        InvalidOptionError: no name matches; the message suggests close names.
    """
    names = timm.list_models()
    matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
    if matched:
        return matched
    literal = pattern.translate(str.maketrans("", "", "*?[]"))
    suggestions = difflib.get_close_matches(literal, names, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(suggestions)}? " if suggestions else ""
    raise InvalidOptionError(
        f"no timm model matches {pattern!r}; {hint}PATTERN is an fnmatch pattern over timm.list_models(), "
        "such as 'resnet*' or 'vit_*_patch16_224'"
    )
