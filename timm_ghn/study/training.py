"""Fine-tuning one model on in-memory images, and measuring its top-1 accuracy.

One run trains with timm's optimizer factory, ``timm.optim.create_optimizer_v2``, in which
``sgd`` is SGD with Nesterov momentum 0.9 and ``adamw`` is AdamW. The factory applies no weight
decay to biases and norm weights. The learning rate follows a cosine schedule
(``timm.scheduler.CosineLRScheduler``) from ``lr`` down to 0 over all updates, with no warm-up,
stepped after every update.
Batches get a random crop after 4-pixel zero padding and a random horizontal flip, are scaled to
``[0, 1]``, normalised with the ImageNet mean and std, and bilinearly resized when the training
image size differs from the stored one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable

import timm.optim
import timm.scheduler
import torch
import torch.nn.functional as F
from torch import nn

from timm_ghn.data import ImageDataset, augment_batch, normalize_batch
from timm_ghn.errors import InvalidOptionError

__all__ = ["OPTIMIZERS", "TrainSettings", "EpochMetrics", "evaluate_model", "fine_tune"]

logger = logging.getLogger(__name__)

#: Optimizer names accepted by :class:`TrainSettings` (timm's names).
OPTIMIZERS = ("sgd", "adamw")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of one fine-tuning run.

    Attributes:
        optimizer: ``sgd`` or ``adamw``.
        lr: peak learning rate.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        epochs: passes over the training images.
        batch_size: images per update.
        image_size: side in pixels of the images fed to the model.
        beta: GHN-orth noise scale β, or ``None`` for other inits.
        start_layer: GHN-orth start-layer setting (``"default"``, an integer or a fraction of the
            depth), or ``None`` for other inits.
    """

    optimizer: str
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    image_size: int
    beta: float | None = None
    start_layer: str | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise InvalidOptionError(f"invalid optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidOptionError(f"invalid learning rate {self.lr!r}: expected a number > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InvalidOptionError(f"invalid weight decay {self.weight_decay!r}: expected a number >= 0")
        if self.epochs < 1:
            raise InvalidOptionError(f"invalid number of epochs {self.epochs}: expected an integer >= 1")
        if self.batch_size < 2:
            raise InvalidOptionError(f"invalid batch size {self.batch_size}: BatchNorm needs at least 2 images per batch")
        if self.image_size < 8:
            raise InvalidOptionError(f"invalid image size {self.image_size}: expected at least 8 pixels")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class EpochMetrics:
    """Metrics after one epoch; accuracies in [0, 1], ``val_acc`` is ``None`` when not measured."""

    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    val_acc: float | None
    seconds: float


def _model_input(images: torch.Tensor, image_size: int, device: torch.device) -> torch.Tensor:
    x = normalize_batch(images.to(device))
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: ImageDataset, image_size: int, batch_size: int = 250) -> float:
    """Return the top-1 accuracy in [0, 1] of ``model`` in eval mode (BatchNorm running statistics)."""
    if len(dataset) == 0:
        raise InvalidOptionError(f"cannot evaluate on an empty dataset ({dataset.source})")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(dataset), batch_size):
        x = _model_input(dataset.images[start:start + batch_size], image_size, device)
        correct += int((model(x).argmax(1).cpu() == dataset.labels[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / len(dataset)


def fine_tune(
    model: nn.Module,
    train: ImageDataset,
    settings: TrainSettings,
    *,
    seed: int,
    val: ImageDataset | None = None,
    val_every: int = 1,
    eval_batch_size: int = 250,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
) -> list[EpochMetrics]:
    """Train ``model`` on ``train`` in place and return the metrics of every epoch.

    The image order and augmentation draw from a generator seeded by ``seed``. A last batch of a
    single image is dropped, because BatchNorm cannot normalise it. ``val`` is measured every
    ``val_every`` epochs and after the last epoch. A non-finite loss stops training, logs a
    warning and leaves the remaining epochs out.
    """
    device = next(model.parameters()).device
    optimizer = timm.optim.create_optimizer_v2(
        model, opt=settings.optimizer, lr=settings.lr, weight_decay=settings.weight_decay, momentum=0.9
    )
    steps_per_epoch = len(train) // settings.batch_size + (1 if len(train) % settings.batch_size > 1 else 0)
    total_steps = max(1, steps_per_epoch * settings.epochs)
    scheduler = timm.scheduler.CosineLRScheduler(optimizer, t_initial=total_steps, lr_min=0.0, t_in_epochs=False)
    generator = torch.Generator().manual_seed(seed)

    history: list[EpochMetrics] = []
    step = 0
    model.train()
    for epoch in range(1, settings.epochs + 1):
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        order = torch.randperm(len(train), generator=generator)
        loss_sum, correct, seen = 0.0, 0, 0
        for start in range(0, len(train), settings.batch_size):
            indices = order[start:start + settings.batch_size]
            if indices.numel() < 2:
                continue
            images = augment_batch(train.images[indices], generator)
            x = _model_input(images, settings.image_size, device)
            y = train.labels[indices].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                logger.warning("loss became %s at epoch %d, step %d (lr %.3g): training stopped", loss.item(), epoch, step, lr)
                return history
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
            loss_sum += loss.item() * indices.numel()
            correct += int((logits.argmax(1) == y).sum())
            seen += indices.numel()

        val_acc = None
        if val is not None and (epoch % val_every == 0 or epoch == settings.epochs):
            val_acc = evaluate_model(model, val, settings.image_size, eval_batch_size)
        metrics = EpochMetrics(epoch, lr, loss_sum / max(seen, 1), correct / max(seen, 1), val_acc,
                               time.perf_counter() - started)
        history.append(metrics)
        logger.debug("epoch %d: loss %.4f, train %.3f, val %s", epoch, metrics.train_loss, metrics.train_acc, val_acc)
        if on_epoch is not None:
            on_epoch(metrics)
    return history
