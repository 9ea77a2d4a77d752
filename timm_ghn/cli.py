"""Command line interface: ``timm-ghn predict MODEL ...``.

User errors (unknown model, bad checkpoint, unwritable output, invalid option) print one line
``timm-ghn: error: ...`` to stderr and exit with status 1; usage errors exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from timm_ghn import coverage_cli, evaluate, train
from timm_ghn.cache_cli import add_predict_options, check_cache_options, predict_with_cache, prediction_line, register_commands
from timm_ghn.cli_options import add_init_options, init_options
from timm_ghn.errors import TimmGhnError
from timm_ghn.export import check_output_path
from timm_ghn.hypernet import save_ghn
from timm_ghn.pipeline import initialize_model, resolve_ghn, write_initialization
from timm_ghn.registry import NAMED_GHNS
from timm_ghn.study import command as study_command
from timm_ghn.study import diagnose

__all__ = ["build_parser", "main"]

logger = logging.getLogger("timm_ghn")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="timm-ghn",
        description="Initialize timm models with parameters predicted by a Graph HyperNetwork (GHN-2 or GHN-3) "
        "and optionally post-processed with GHN-orth.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v: info, -vv: debug)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    predict = commands.add_parser(
        "predict",
        help="predict a model's parameters and write them as safetensors",
        description="Build the timm model MODEL, predict its parameters with a GHN, post-process them "
        "and write model.state_dict() to a safetensors file that timm's train.py loads with "
        "--initial-checkpoint.",
    )
    predict.add_argument("model", metavar="MODEL", help="timm model name, e.g. resnet50 or convnext_base")
    add_init_options(predict)
    predict.add_argument("-o", "--output", default=None, metavar="FILE", help="output file (default: MODEL-METHOD.safetensors in the current directory)")
    add_predict_options(predict)
    register_commands(commands)
    train.add_parser(commands)
    evaluate.add_parser(commands)
    coverage_cli.add_parser(commands)
    _add_convert_parser(commands)
    study_command.add_parser(commands)
    diagnose.add_parser(commands)
    return parser


def _add_convert_parser(commands) -> None:
    convert = commands.add_parser(
        "convert",
        help="convert a GHN checkpoint to the timm_ghn safetensors format",
        description="Read a GHN-1/GHN-2 (ppuda .pt), GHN-3 (released joblib .pt or trainer .pt) or named "
        "checkpoint without executing code from it, and write its tensors as safetensors with the config in "
        "the header. The result loads everywhere a checkpoint is accepted and is memory-mapped when read.",
    )
    convert.add_argument("checkpoint", metavar="CHECKPOINT", help=f"file path or released name ({', '.join(NAMED_GHNS)})")
    convert.add_argument("-o", "--output", required=True, metavar="FILE", help="output .safetensors file")
    convert.set_defaults(handler=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    output = Path(args.output).expanduser()
    check_output_path(output)
    source = Path(args.checkpoint).expanduser()
    if source.is_file() and output.exists() and os.path.samefile(source, output):
        raise TimmGhnError(f"-o {output} is the input checkpoint; choose another output file")
    start = time.perf_counter()
    loaded = resolve_ghn(args.checkpoint)
    path = save_ghn(loaded.model, output, {"timm_ghn.source_sha256": loaded.sha256, "timm_ghn.source_name": loaded.name})
    parameters = sum(p.numel() for p in loaded.model.parameters())
    print(f"{path}: {type(loaded.model).__name__} with {parameters:,} parameters from {loaded.name}, {time.perf_counter() - start:.2f} s")
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    options = init_options(args)
    output = Path(args.output) if args.output else Path(f"{args.model.replace('/', '_')}-{options.method}.safetensors")

    # Fail on an unusable output path before spending time on the prediction.
    check_output_path(output.expanduser())
    check_cache_options(args)
    if not args.no_cache:
        return predict_with_cache(args, options, output)

    start = time.perf_counter()
    model, report = initialize_model(args.model, options)
    path = write_initialization(model, report, output)
    seconds = time.perf_counter() - start

    print(prediction_line(path, args.model, report, seconds))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING
    if args.verbose == 1:
        level = logging.INFO
    elif args.verbose > 1:
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "predict":
            return _run_predict(args)
        if hasattr(args, "handler"):
            return args.handler(args)
    except TimmGhnError as error:
        print(f"timm-ghn: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Output files are renamed into place only when complete, so nothing partial is left.
        print("timm-ghn: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
