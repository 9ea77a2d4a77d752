"""Image classification data held in memory: an ImageFolder directory or a zip of one.

:func:`load_image_folder` decodes every image of one split once into a ``uint8`` tensor
``[N, 3, H, W]`` with ``int64`` labels, so training and evaluation draw batches without any
decoding. Labels follow ImageFolder: classes sorted by name get 0, 1, ...; with a class filter the
kept classes are relabelled 0, 1, ... in the order given.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from timm_ghn.errors import TimmGhnError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "ImageDataset",
    "augment_batch",
    "list_classes",
    "load_image_folder",
    "normalize_batch",
]

logger = logging.getLogger(__name__)

#: File name endings read as images (the same set as torchvision's ImageFolder, lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: Per-channel mean and std of ImageNet in [0, 1] units, timm's default normalization.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetError(TimmGhnError, ValueError):
    """An image dataset path is missing, has the wrong layout, or contains no images."""


@dataclasses.dataclass
class ImageDataset:
    """Decoded images of one split.

    Attributes:
        images: ``uint8 [N, 3, H, W]`` RGB pixels.
        labels: ``int64 [N]`` class indices into ``classes``.
        classes: class names; ``classes[i]`` is label ``i``.
        source: the directory or zip the images came from, with the split.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, indices: torch.Tensor) -> "ImageDataset":
        """Return the images at ``indices`` (a view-free copy) with the same classes."""
        return ImageDataset(self.images[indices], self.labels[indices], list(self.classes), self.source)

    def per_class(self, count: int, generator: torch.Generator | None = None) -> "ImageDataset":
        """Return ``count`` randomly chosen images of every class (fewer where a class has fewer)."""
        chosen = []
        for label in range(len(self.classes)):
            members = torch.nonzero(self.labels == label).flatten()
            order = torch.randperm(members.numel(), generator=generator)
            chosen.append(members[order[:count]])
        return self.subset(torch.cat(chosen).sort().values)


def _split_root(split: str | None) -> str:
    return f"{split.strip('/')}/" if split else ""


def _class_of(name: str, prefix: str) -> tuple[str, str] | None:
    """Return ``(class, file)`` for ``prefix/class/.../file`` with an image extension, else None."""
    if not name.startswith(prefix) or name.endswith("/"):
        return None
    rest = name[len(prefix):]
    parts = rest.split("/")
    if len(parts) < 2 or not parts[-1].lower().endswith(IMAGE_EXTENSIONS) or parts[-1].startswith("."):
        return None
    return parts[0], rest


def _list_members(path: Path, split: str | None) -> tuple[dict[str, list[str]], zipfile.ZipFile | None]:
    """Map class name -> sorted image paths (relative to the split root) of a directory or zip."""
    prefix = _split_root(split)
    members: dict[str, list[str]] = {}
    if path.is_dir():
        root = path / prefix if prefix else path
        if not root.is_dir():
            raise DatasetError(f"split directory not found: {root}; expected {path}/{split}/<class>/<image>")
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = sorted(
                str(f.relative_to(root)) for f in class_dir.rglob("*")
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
            )
            members[class_dir.name] = files
        return members, None
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}; pass an ImageFolder directory or a .zip of one")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise DatasetError(f"cannot read {path} as a zip archive ({error}); pass an ImageFolder directory or a .zip of one") from error
    for name in archive.namelist():
        found = _class_of(name, prefix)
        if found is not None:
            members.setdefault(found[0], []).append(found[1])
    if not members and prefix:
        archive.close()
        raise DatasetError(f"{path} has no images under {prefix}<class>/; expected the layout {split}/<class>/<image>")
    for files in members.values():
        files.sort()
    return dict(sorted(members.items())), archive


def list_classes(path: str | os.PathLike, split: str | None = "train") -> list[str]:
    """Return the sorted class names of a split (ImageFolder's label order)."""
    members, archive = _list_members(Path(path), split)
    if archive is not None:
        archive.close()
    return list(members)


def _decode(data: bytes, image_size: int | None, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            if image_size is not None and image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as error:
        raise DatasetError(f"cannot decode image {name}: {error}; remove or replace the file") from error


def load_image_folder(
    path: str | os.PathLike,
    split: str | None = "train",
    classes: Sequence[str] | None = None,
    image_size: int | None = 32,
    max_per_class: int | None = None,
) -> ImageDataset:
    """Decode one split of an ImageFolder directory or zip into memory.

    Args:
        path: a directory or ``.zip`` with ``<split>/<class>/<image>`` (or ``<class>/<image>`` when
            ``split`` is None).
        split: the top-level folder, such as ``train`` or ``test``.
        classes: the class names to keep, in label order (default: every class, sorted).
        image_size: side in pixels that every image is resized to (bilinear); None keeps the
            size, which must then be the same for every image.
        max_per_class: keep only the first images of each class in sorted file order.

    Raises:
        DatasetError: the path is missing or unreadable, a class is unknown, or no image is found.
    """
    path = Path(path).expanduser()
    members, archive = _list_members(path, split)
    where = f"{path}" + (f" (split {split!r})" if split else "")
    try:
        if not any(members.values()):
            raise DatasetError(f"no images found in {where}; expected files ending in {', '.join(IMAGE_EXTENSIONS[:3])}, ... under <class>/ folders")
        names = list(classes) if classes is not None else list(members)
        unknown = [name for name in names if name not in members]
        if unknown:
            raise DatasetError(f"unknown classes {unknown} in {where}: available classes are {', '.join(members)}")
        if not names:
            raise DatasetError(f"empty class list for {where}; pass at least one of {', '.join(members)}")
        empty = [name for name in names if not members[name]]
        if empty:
            raise DatasetError(f"classes {empty} in {where} contain no images")

        arrays: list[np.ndarray] = []
        labels: list[int] = []
        root = path / split if (archive is None and split) else path
        prefix = _split_root(split)
        for label, name in enumerate(names):
            files = members[name][:max_per_class] if max_per_class else members[name]
            for relative in files:
                if archive is not None:
                    data = archive.read(prefix + relative)
                else:
                    data = (root / relative).read_bytes()
                arrays.append(_decode(data, image_size, f"{where}/{relative}"))
                labels.append(label)
    finally:
        if archive is not None:
            archive.close()

    shapes = {array.shape for array in arrays}
    if len(shapes) > 1:
        raise DatasetError(f"images in {where} have different sizes {sorted(shapes)[:3]}; pass an image size to resize them")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    logger.info("decoded %d images of %d classes from %s", len(labels), len(names), where)
    return ImageDataset(images, torch.tensor(labels, dtype=torch.long), names, where)


def normalize_batch(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Convert ``uint8 [B, 3, H, W]`` pixels to float ``(x / 255 - mean) / std``."""
    x = images.float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def augment_batch(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop after zero padding by ``padding`` pixels, and random horizontal flip (CIFAR style).

    Works on ``uint8`` or float ``[B, C, H, W]``; every image gets its own offset and flip.
    """
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    rows = dy.view(-1, 1) + torch.arange(height).view(1, -1)
    cols = dx.view(-1, 1) + torch.arange(width).view(1, -1)
    cols = torch.where(flip.view(-1, 1), cols.flip(1), cols)
    index = torch.arange(batch).view(-1, 1, 1)
    out = padded.permute(0, 2, 3, 1)[index, rows.unsqueeze(2), cols.unsqueeze(1)]
    return out.permute(0, 3, 1, 2).contiguous()
