"""Fixed, seeded data splits of a fine-tuning study: few labelled training images, a disjoint
validation set for choosing hyperparameters, and the test split for the reported numbers.

The training and validation images both come from the ``train/`` split of the dataset, so they
are drawn without overlap from one index space. The test images are the whole ``test/`` split of
the same classes. A split is stored as indices into the dataset's ImageFolder order (classes in
the given order, files sorted by name within a class), which :func:`timm_ghn.data.load_image_folder`
reproduces for the same dataset and classes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from timm_ghn.errors import InvalidOptionError

__all__ = ["StudySplits", "make_splits", "load_splits", "save_splits"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StudySplits:
    """Indices of the training and validation images inside the dataset's ``train/`` split.

    Attributes:
        classes: target class names; ``classes[i]`` is label ``i``.
        train: sorted indices of the labelled training images.
        val: sorted indices of the validation images, disjoint from ``train``.
        seed: seed of the draw.
        train_per_class: training images requested per class.
        val_size: validation images requested in all.
        source: the dataset the indices refer to.
    """

    classes: tuple[str, ...]
    train: tuple[int, ...]
    val: tuple[int, ...]
    seed: int
    train_per_class: int
    val_size: int
    source: str

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["classes"] = list(self.classes)
        values["train"] = list(self.train)
        values["val"] = list(self.val)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "StudySplits":
        return cls(
            classes=tuple(values["classes"]),
            train=tuple(int(i) for i in values["train"]),
            val=tuple(int(i) for i in values["val"]),
            seed=int(values["seed"]),
            train_per_class=int(values["train_per_class"]),
            val_size=int(values["val_size"]),
            source=str(values["source"]),
        )


def make_splits(
    labels: torch.Tensor,
    classes: Sequence[str],
    train_per_class: int = 100,
    val_size: int = 5000,
    seed: int = 0,
    source: str = "",
) -> StudySplits:
    """Draw ``train_per_class`` training images of every class and ``val_size`` validation images.

    Every class is permuted once with a generator seeded by ``seed``. Its first
    ``train_per_class`` images are training images. The validation set takes
    ``⌊val_size / C⌋`` of the remaining images of every class (``C`` classes), plus one more
    image for the first ``val_size mod C`` classes, so it is class-balanced and never overlaps
    the training set.

    Args:
        labels: ``int64 [N]`` labels of the ``train/`` split, in ``0 .. C - 1``.
        classes: the ``C`` class names in label order.
        train_per_class: labelled training images per class (100 gives the 1,000-label task for
            10 classes).
        val_size: validation images in all.
        seed: seed of the permutations.
        source: the dataset, stored with the split.

    Raises:
        InvalidOptionError: a count is below 1, or a class has fewer images than its share of
            training and validation images.
    """
    if train_per_class < 1:
        raise InvalidOptionError(f"invalid training images per class {train_per_class}: expected an integer >= 1")
    if val_size < 1:
        raise InvalidOptionError(f"invalid validation size {val_size}: expected an integer >= 1")
    num_classes = len(classes)
    generator = torch.Generator().manual_seed(seed)
    train: list[torch.Tensor] = []
    val: list[torch.Tensor] = []
    for label, name in enumerate(classes):
        members = torch.nonzero(labels == label).flatten()
        val_count = val_size // num_classes + (1 if label < val_size % num_classes else 0)
        needed = train_per_class + val_count
        if members.numel() < needed:
            raise InvalidOptionError(
                f"class {name!r} has {members.numel()} training images, fewer than the {train_per_class} training "
                f"and {val_count} validation images requested; lower --train-per-class or --val-size"
            )
        order = members[torch.randperm(members.numel(), generator=generator)]
        train.append(order[:train_per_class])
        val.append(order[train_per_class:needed])

    splits = StudySplits(
        classes=tuple(classes),
        train=tuple(torch.cat(train).sort().values.tolist()),
        val=tuple(torch.cat(val).sort().values.tolist()),
        seed=seed,
        train_per_class=train_per_class,
        val_size=val_size,
        source=source,
    )
    logger.info("split %s: %d training and %d validation images of %d classes (seed %d)",
                source, len(splits.train), len(splits.val), num_classes, seed)
    return splits


def save_splits(splits: StudySplits, path: str | os.PathLike) -> Path:
    """Write ``splits`` as JSON to ``path``."""
    path = Path(path)
    path.write_text(json.dumps(splits.to_dict()) + "\n")
    return path


def load_splits(path: str | os.PathLike) -> StudySplits:
    """Read splits written by :func:`save_splits`."""
    return StudySplits.from_dict(json.loads(Path(path).read_text()))
