"""``timm-ghn study``: the command line of the fine-tuning study (:mod:`timm_ghn.study.runner`)."""

from __future__ import annotations

import argparse
import logging
from typing import Any, Callable, Sequence

from timm_ghn.errors import InvalidOptionError
from timm_ghn.study.inits import INITS
from timm_ghn.study.presets import PRESETS, preset_values
from timm_ghn.study.training import OPTIMIZERS

__all__ = ["add_parser", "config_from_args", "run"]

logger = logging.getLogger(__name__)


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _numbers(text: str, cast: Callable[[str], Any], option: str) -> list[Any]:
    try:
        return [cast(item) for item in _items(text)]
    except ValueError as error:
        raise InvalidOptionError(f"invalid {option} {text!r}: expected comma-separated numbers ({error})") from error


def _per_key(entries: Sequence[str] | None, keys: Sequence[str], cast: Callable[[str], Any], option: str,
             many: bool = True) -> dict[str, Any]:
    """Parse repeated ``[KEY=]VALUES`` options: a bare value applies to every key."""
    values: dict[str, Any] = {}
    for entry in entries or []:
        key, _, text = entry.rpartition("=")
        try:
            parsed = [cast(item) for item in _items(text)]
        except ValueError:
            parsed = []
        if not parsed or (not many and len(parsed) != 1):
            raise InvalidOptionError(f"invalid {option} {entry!r}: expected {'VALUES' if many else 'one value'} or KEY={'VALUES' if many else 'VALUE'}")
        for target in ([key] if key else keys):
            values[target] = parsed if many else parsed[0]
    return values


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``timm-ghn study``."""
    parser = subparsers.add_parser(
        "study",
        help="fine-tune models from Rand, Orth, GHN and GHN-orth inits on few labels and compare test accuracy",
        description="Fine-tuning study: draw a fixed split of N labelled training images per class and a disjoint "
        "validation set from train/, tune every init's hyperparameters on the validation set, train the best "
        "settings with several seeds and report test accuracy (mean ± std) on test/. Writes results.json, table.md, "
        "curves_MODEL.png and splits.json to OUTPUT; finished runs in OUTPUT/runs/ are reused when the command is "
        "run again. Options given replace the preset's values.",
    )
    parser.add_argument("data", metavar="DATA", help="ImageFolder directory or .zip with train/<class>/<image> and test/<class>/<image>")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="results directory (created; reused to resume)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="base settings: cpu (resnet18 and convnext_atto, 15 epochs, 3 seeds) or paper (resnet50 and convnext_base, 300 epochs, 5 seeds) (default: %(default)s)")
    parser.add_argument("--ghn", default=None, metavar="CHECKPOINT", help="GHN checkpoint or name for the ghn and ghn_orth inits (default: $TIMM_GHN_CHECKPOINT, else the bundled GHN)")
    parser.add_argument("--models", type=_items, default=None, metavar="A,B,...", help="timm model names")
    parser.add_argument("--inits", type=_items, default=None, metavar="I,J,...", help=f"inits to compare, from {', '.join(INITS)}")
    parser.add_argument("--pretrained", action="append", default=None, metavar="MODEL=FILE", help="pretrained checkpoint of MODEL for the oracle init (repeatable); adds oracle to the inits")
    parser.add_argument("--classes", type=_items, default=None, metavar="A,B,...", help="target classes in label order (default: the classes the GHN was not trained on, or all when the GHN file does not record them)")
    parser.add_argument("--seeds", default=None, metavar="S,T,...", help="seeds of the final runs; the first one also seeds the tuning runs")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every run")
    parser.add_argument("--optimizers", type=_items, default=None, metavar="O,P", help=f"optimizers to tune over, from {', '.join(OPTIMIZERS)}")
    parser.add_argument("--lr", action="append", default=None, metavar="[OPT=]LR,LR", help="learning-rate grid, for every optimizer or for OPT only (repeatable)")
    parser.add_argument("--weight-decay", action="append", default=None, metavar="[OPT=]WD,WD", help="weight-decay grid, for every optimizer or for OPT only (repeatable)")
    parser.add_argument("--batch-size", action="append", default=None, metavar="[MODEL=]N", help="images per update, for every model or for MODEL only (repeatable)")
    parser.add_argument("--image-size", type=int, default=None, help="side in pixels of the images fed to the models; images are upscaled bilinearly from --stored-size")
    parser.add_argument("--betas", default=None, metavar="B,C", help="GHN-orth noise scales β to tune over")
    parser.add_argument("--start-layers", type=_items, default=None, metavar="L,M", help="GHN-orth start layers to tune over: 'default', a 1-based layer index, or a fraction of the depth such as 0.5")
    parser.add_argument("--train-per-class", type=int, default=100, help="labelled training images per class (default: %(default)s)")
    parser.add_argument("--val-size", type=int, default=5000, help="validation images in all, drawn from train/ without overlap with the training images (default: %(default)s)")
    parser.add_argument("--test-per-class", type=int, default=None, help="use only the first N test images of each class (default: the whole test/ split)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the training/validation split (default: %(default)s)")
    parser.add_argument("--stored-size", type=int, default=32, help="side in pixels at which images are decoded and held in memory (default: %(default)s)")
    parser.add_argument("--val-every", type=int, default=None, help="epochs between validation measurements in the final runs")
    parser.add_argument("--eval-batch-size", type=int, default=250, help="images per evaluation batch (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="where models train and the GHN runs: cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.set_defaults(handler=run)
    return parser


def config_from_args(args: argparse.Namespace):
    """Return the :class:`~timm_ghn.study.runner.StudyConfig` of parsed arguments over their preset."""
    from timm_ghn.options import parse_device
    from timm_ghn.study.runner import StudyConfig

    values = preset_values(args.preset)
    for key in ("models", "inits", "epochs", "optimizers", "image_size", "start_layers", "val_every"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.seeds is not None:
        values["seeds"] = _numbers(args.seeds, int, "--seeds")
    if args.betas is not None:
        values["betas"] = _numbers(args.betas, float, "--betas")
    if args.lr is not None:
        values["lrs"] = _per_key(args.lr, values["optimizers"], float, "--lr")
    if args.weight_decay is not None:
        values["weight_decays"] = _per_key(args.weight_decay, values["optimizers"], float, "--weight-decay")
    if args.batch_size is not None:
        values["batch_size"] = {**values["batch_size"], **_per_key(args.batch_size, values["models"], int, "--batch-size", many=False)}
    pretrained: dict[str, str] = {}
    for entry in args.pretrained or []:
        model, separator, path = entry.partition("=")
        if not separator or not model or not path:
            raise InvalidOptionError(f"invalid --pretrained {entry!r}: expected MODEL=FILE, such as resnet18=resnet18.safetensors")
        pretrained[model] = path
    if pretrained and "oracle" not in values["inits"]:
        values["inits"] = [*values["inits"], "oracle"]
    unknown = [o for o in values["optimizers"] if o not in OPTIMIZERS]
    if unknown:
        raise InvalidOptionError(f"invalid --optimizers {unknown}: expected names from {', '.join(OPTIMIZERS)}")
    return StudyConfig(
        data=args.data, output=args.output, ghn=args.ghn, pretrained=pretrained, classes=args.classes,
        train_per_class=args.train_per_class, val_size=args.val_size, test_per_class=args.test_per_class,
        split_seed=args.split_seed, stored_size=args.stored_size, eval_batch_size=args.eval_batch_size,
        threads=args.threads, device=str(parse_device(args.device)), preset=args.preset, **values,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``timm-ghn study`` from parsed arguments and print the table."""
    from timm_ghn.pipeline import resolve_ghn
    from timm_ghn.study.runner import run_study

    config = config_from_args(args)
    config.check()
    ghn = resolve_ghn(config.ghn, config.device) if {"ghn", "ghn_orth"} & set(config.inits) else None
    outcome = run_study(config, ghn, progress=args.progress)
    if ghn is not None:
        print(f"GHN {ghn.name} (sha256 {ghn.sha256[:12]}); {outcome.trained} runs trained, {outcome.reused} reused")
    else:
        print(f"{outcome.trained} runs trained, {outcome.reused} reused")
    print(outcome.files["table"].read_text(), end="")
    print("files:", ", ".join(str(p) for p in outcome.files.values()))
    return 0
