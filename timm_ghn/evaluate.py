"""Zero-shot evaluation of a GHN: top-1 accuracy of predicted parameters without any training.

GHNs do not predict BatchNorm running statistics, so every network is evaluated with batch
statistics (BatchNorm layers in training mode, everything else in eval mode), as the original GHN-2
code does, on batches of shuffled test images. A batch that contains a single class loses its class
signal to the normalization, so the images are shuffled before they are split into batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from typing import Mapping, Sequence

import torch
from torch import nn

from timm_ghn.architectures import HELD_OUT
from timm_ghn.data import ImageDataset, normalize_batch
from timm_ghn.errors import InvalidOptionError
from timm_ghn.hypernet import GHN2

__all__ = [
    "EvaluationRow",
    "add_parser",
    "batch_statistics_mode",
    "evaluate_accuracy",
    "evaluate_ghn",
    "format_table",
    "predicted_accuracy",
    "run",
]

logger = logging.getLogger(__name__)


def batch_statistics_mode(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode except its BatchNorm layers, which then normalise by batch statistics."""
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
    return model


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    dataset: ImageDataset,
    batch_size: int = 100,
    seed: int = 0,
    parameters: Mapping[str, torch.Tensor] | None = None,
) -> float:
    """Return the top-1 accuracy in [0, 1] of ``model`` on ``dataset`` with batch statistics.

    The images are shuffled with ``seed`` and split into ``ceil(N / batch_size)`` batches of
    nearly equal size, so no batch is much smaller than ``batch_size``. ``parameters`` are used in
    place of the model's own through ``torch.func.functional_call``; BatchNorm running statistics
    of the model change, nothing else does.
    """
    if len(dataset) == 0:
        raise InvalidOptionError(f"cannot evaluate on an empty dataset ({dataset.source})")
    was_training = model.training
    batch_statistics_mode(model)
    device = next(iter(model.parameters())).device
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    chunks = torch.tensor_split(order, max(1, -(-len(dataset) // batch_size)))
    correct = 0
    for indices in chunks:
        x = normalize_batch(dataset.images[indices]).to(device)
        if parameters is None:
            logits = model(x)
        else:
            logits = torch.func.functional_call(model, dict(parameters), (x,), strict=False)
        correct += int((logits.argmax(1).cpu() == dataset.labels[indices]).sum())
    model.train(was_training)
    return correct / len(dataset)


def predicted_accuracy(
    ghn: GHN2,
    model: nn.Module,
    dataset: ImageDataset,
    image_size: int = 32,
    batch_size: int = 100,
    seed: int = 0,
) -> float:
    """Predict all parameters of ``model`` (classifier included) with ``ghn`` and return its top-1 accuracy."""
    from timm_ghn.graph import build_graph
    from timm_ghn.predict import predict_tensors

    graph = build_graph(model, (3, image_size, image_size), ve_cutoff=ghn.config.ve_cutoff)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    with torch.no_grad():
        tensors = predict_tensors(ghn, graph, shapes, predict_classifier=True)
    return evaluate_accuracy(model, dataset, batch_size=batch_size, seed=seed, parameters=tensors)


@dataclasses.dataclass
class EvaluationRow:
    """Zero-shot result of one architecture (accuracies in [0, 1], times in seconds)."""

    architecture: str
    family: str
    num_params: int
    ghn_accuracy: float
    random_accuracy: float
    seconds: float


def _build_named(name: str, num_classes: int, image_size: int) -> tuple[nn.Module, str]:
    """Build a held-out architecture by name, or a timm model by its registered name."""
    if name in HELD_OUT:
        spec = HELD_OUT[name]
        return spec.build(num_classes, image_size), spec.family
    import timm

    from timm_ghn.pipeline import check_model_name

    check_model_name(name)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=image_size)
    except TypeError:
        # Convolutional timm models take no img_size argument.
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    model.expected_input_sz = (3, image_size, image_size)
    return model, "timm"


def evaluate_ghn(
    ghn: GHN2,
    dataset: ImageDataset,
    architectures: Sequence[str] | None = None,
    image_size: int = 32,
    batch_size: int = 100,
    seed: int = 0,
) -> list[EvaluationRow]:
    """Evaluate predicted parameters and timm's random init of every architecture on ``dataset``.

    ``architectures`` are names from :data:`timm_ghn.architectures.HELD_OUT` (the default is all of
    them) or timm model names. Both inits are evaluated with batch statistics on the same shuffled
    batches; timm's init is drawn with ``torch.manual_seed(seed)``.
    """
    if ghn.config.num_classes != len(dataset.classes):
        raise InvalidOptionError(
            f"the GHN predicts {ghn.config.num_classes}-class heads but the dataset has {len(dataset.classes)} "
            f"classes ({', '.join(dataset.classes)}); pass --classes with {ghn.config.num_classes} class names"
        )
    names = list(architectures) if architectures else list(HELD_OUT)
    rows = []
    for name in names:
        start = time.perf_counter()
        torch.manual_seed(seed)
        model, family = _build_named(name, len(dataset.classes), image_size)
        random_accuracy = evaluate_accuracy(model, dataset, batch_size=batch_size, seed=seed)
        ghn_accuracy = predicted_accuracy(ghn, model, dataset, image_size=image_size, batch_size=batch_size, seed=seed)
        row = EvaluationRow(name, family, sum(p.numel() for p in model.parameters()), ghn_accuracy,
                            random_accuracy, time.perf_counter() - start)
        logger.info("%s: GHN %.2f%%, timm init %.2f%% (%.1f s)", name, 100 * ghn_accuracy, 100 * random_accuracy, row.seconds)
        rows.append(row)
    return rows


def format_table(rows: Sequence[EvaluationRow]) -> str:
    """Format rows as a Markdown table with a final row of means."""
    lines = [
        "| architecture | family | parameters | GHN top-1 (%) | timm init top-1 (%) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(f"| {row.architecture} | {row.family} | {row.num_params:,} | {100 * row.ghn_accuracy:.1f} | "
                     f"{100 * row.random_accuracy:.1f} |")
    if rows:
        ghn_mean = sum(r.ghn_accuracy for r in rows) / len(rows)
        random_mean = sum(r.random_accuracy for r in rows) / len(rows)
        lines.append(f"| **mean of {len(rows)}** | | | **{100 * ghn_mean:.1f}** | **{100 * random_mean:.1f}** |")
    return "\n".join(lines)


def _training_classes(path) -> list[str] | None:
    """Return the class names stored by ``timm-ghn pretrain`` in a GHN file's header, if any."""
    from safetensors import safe_open

    from timm_ghn.train import METADATA_PREFIX

    if path is None or str(path).endswith(".pt"):
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:  # a ppuda file or an unreadable header: no stored classes
        return None
    import json

    classes = json.loads(metadata.get(METADATA_PREFIX + "classes", "[]") or "[]")
    return classes or None


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``timm-ghn evaluate-ghn``."""
    parser = subparsers.add_parser(
        "evaluate-ghn",
        help="report zero-shot top-1 accuracy of predicted parameters next to timm's random init",
        description="Predict the parameters of each architecture with a GHN and report top-1 accuracy on a "
        "test split without any training, next to timm's random init, as a Markdown table. BatchNorm "
        "layers use batch statistics on shuffled, class-mixed batches.",
    )
    parser.add_argument("data", metavar="DATA", help="ImageFolder directory or .zip with <split>/<class>/<image>")
    parser.add_argument("--ghn", default=None, metavar="CHECKPOINT", help="GHN checkpoint or name (default: $TIMM_GHN_CHECKPOINT, else the bundled GHN)")
    parser.add_argument("--split", default="test", help="split folder to evaluate on (default: %(default)s)")
    parser.add_argument("--classes", default=None, metavar="A,B,...", help="classes in label order (default: the classes stored in the GHN file by timm-ghn pretrain, else all)")
    parser.add_argument("--architectures", default=None, metavar="A,B,...", help=f"held-out names ({', '.join(HELD_OUT)}) or timm model names (default: all held-out)")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per batch; BatchNorm uses each batch's statistics (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image order and of timm's init (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``timm-ghn evaluate-ghn`` from parsed arguments and print the table."""
    from timm_ghn.data import load_image_folder
    from timm_ghn.pipeline import resolve_ghn

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 2:
        raise InvalidOptionError(f"invalid --batch-size {args.batch_size}: BatchNorm needs at least 2 images per batch")
    loaded = resolve_ghn(args.ghn)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else _training_classes(loaded.path)
    dataset = load_image_folder(args.data, args.split, classes, args.image_size)
    architectures = [a.strip() for a in args.architectures.split(",")] if args.architectures else None
    rows = evaluate_ghn(loaded.model, dataset, architectures, args.image_size, args.batch_size, args.seed)
    print(f"GHN {loaded.name} (sha256 {loaded.sha256[:12]}), {len(dataset)} images of {dataset.source}, "
          f"classes {', '.join(dataset.classes)}")
    print(format_table(rows))
    return 0
