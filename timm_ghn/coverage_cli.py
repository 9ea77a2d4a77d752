"""The ``timm-ghn coverage [PATTERN]`` command: one line per matching timm model, then a summary.

Each model is measured in this process by :func:`timm_ghn.coverage.measure_architecture`, which
records a failing model instead of raising, so the run goes on to the next one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from timm_ghn.coverage import DEFAULT_PREDICT_MAX_PARAMS, ArchitectureCoverage, match_models, measure_architecture, summarize
from timm_ghn.errors import InvalidOptionError, TimmGhnError
from timm_ghn.export import check_output_path

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``timm-ghn coverage``."""
    parser = subparsers.add_parser(
        "coverage",
        help="report how much of each timm architecture the graph places (and the GHN predicts)",
        description="Build each timm model that matches PATTERN on the meta device (no weights are allocated) "
        "with its default arguments, trace its graph, and print one line per model: whether the graph was built, "
        "the parameter tensors and the share of parameter elements it places, the graph time in seconds, and the "
        "kinds of parameters it does not place (last name components), which keep timm's init. A failing model "
        "is reported on its line and the run goes on. A summary line comes last; progress goes to stderr on a "
        "terminal.",
    )
    parser.add_argument(
        "pattern", nargs="?", default="*", metavar="PATTERN",
        help="fnmatch pattern over timm.list_models(), such as 'resnet*' (default: every model; timm 1.0.31 lists 1,371)",
    )
    parser.add_argument(
        "--predict", action="store_true",
        help="also build each model of at most --max-params parameters on the CPU, predict it with the GHN and "
        "print the predicted share of parameter elements; it is below the placed share when the head keeps "
        "timm's init because its classes differ from the GHN's",
    )
    parser.add_argument(
        "--max-params", type=int, default=None, metavar="N",
        help=f"with --predict, the largest model to predict, in parameters; larger ones show 'skipped' "
        f"(default: {DEFAULT_PREDICT_MAX_PARAMS:,}, about {DEFAULT_PREDICT_MAX_PARAMS * 4 // 10**6} MB of float32 weights)",
    )
    parser.add_argument(
        "--ghn", default=None, metavar="CHECKPOINT",
        help="GHN whose graph rules (GHN-2 or GHN-3) are measured and that predicts with --predict (default: $TIMM_GHN_CHECKPOINT, "
        "else the bundled GHN)",
    )
    parser.add_argument(
        "--json", default=None, metavar="FILE",
        help="also write every model's record as JSON, in the format of benchmarks/zoo_coverage.py (default: none)",
    )
    parser.set_defaults(handler=run)
    return parser


def _row(name: str, width: int, result: ArchitectureCoverage, predict: bool) -> str:
    if not result.graph_built:
        return f"{name:<{width}}  error  {result.error}"
    tensors = f"{result.placed_tensors}/{result.tensors}"
    columns = f"{name:<{width}}  ok     {tensors:>9}  {100 * result.placed_fraction:7.2f}%  {result.graph_seconds:8.3f}"
    if predict:
        if result.predicted_fraction is not None:
            predicted = f"{100 * result.predicted_fraction:.2f}%"
        elif result.predict_error is not None:
            predicted = "failed"
        else:
            predicted = "skipped"
        columns += f"  {predicted:>9}"
    kinds = ", ".join(result.unplaced_kinds) or "-"
    line = f"{columns}  {kinds}"
    if result.predict_error is not None:
        line += f"  (prediction error: {result.predict_error})"
    return line


def _header(width: int, predict: bool) -> str:
    text = f"{'model':<{width}}  graph  {'tensors':>9}  {'params':>8}  {'graph s':>8}"
    if predict:
        text += f"  {'predicted':>9}"
    return text + "  unplaced kinds"


@contextlib.contextmanager
def _quiet_prediction_warnings(quiet: bool) -> Iterator[None]:
    """Hide the per-model warnings of :mod:`timm_ghn.predict` about tensors left at timm's init.

    Each output line already reports them as unplaced kinds and the predicted share. ``-v`` keeps
    the warnings.
    """
    predict_logger = logging.getLogger("timm_ghn.predict")
    level = predict_logger.level
    if quiet:
        predict_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        predict_logger.setLevel(level)


def run(args: argparse.Namespace) -> int:
    """Run ``timm-ghn coverage`` from parsed arguments."""
    from timm_ghn.pipeline import resolve_ghn

    if args.max_params is not None and not args.predict:
        raise InvalidOptionError(f"--max-params {args.max_params} applies only to predictions; add --predict or drop it")
    if args.max_params is not None and args.max_params < 1:
        raise InvalidOptionError(f"invalid --max-params {args.max_params}: expected a number of parameters >= 1")
    output = Path(args.json).expanduser() if args.json else None
    if output is not None:
        check_output_path(output)
    names = match_models(args.pattern)
    ghn = resolve_ghn(args.ghn, "cpu")
    max_params = (args.max_params or DEFAULT_PREDICT_MAX_PARAMS) if args.predict else None

    width = max(len(name) for name in names)
    tqdm.write(_header(width, args.predict), file=sys.stdout)
    results = []
    start = time.perf_counter()
    with _quiet_prediction_warnings(args.verbose == 0):
        for index, name in enumerate(tqdm(names, unit="model", file=sys.stderr, disable=None, leave=False), 1):
            result = measure_architecture(name, ghn, max_params)
            results.append(result)
            tqdm.write(_row(name, width, result, args.predict), file=sys.stdout)
            if index % 50 == 0:
                logger.info("coverage: %d/%d models measured in %.0f s", index, len(names), time.perf_counter() - start)
    print(summarize(results).line())

    if output is not None:
        records = {result.name: result.to_record() for result in results}
        try:
            output.write_text(json.dumps(records, indent=1))
        except OSError as error:
            raise TimmGhnError(f"cannot write {output}: {error.strerror or error}") from error
    return 0
