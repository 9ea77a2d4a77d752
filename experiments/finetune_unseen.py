"""Fine-tune held-out architectures on few images of classes the GHN never saw, from two inits.

For each architecture and seed the script compares timm's default init with ``ghn_orth`` from a
GHN (the bundled one by default): the GHN predicts every parameter, GHN-orth then adds noise and
orthogonalises the deepest third of the layers. The classifier keeps timm's init, because the
new classes have nothing to do with the GHN's. Both networks are then trained with the same
recipe (AdamW, cosine schedule, random crop and flip) on ``--shots`` training images per class.
The classes are the five CIFAR-10 classes that the bundled GHN was not trained on (dog, frog,
horse, ship, truck), and all their test images are evaluated after every epoch.

Accuracies use BatchNorm batch statistics on shuffled batches of 100 images at every epoch,
including epoch 0 (before any training), where running statistics do not exist yet for a
predicted network.

Usage::

    python experiments/finetune_unseen.py --architectures resnet-basic-s convnext-k7 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from timm_ghn.architectures import HELD_OUT
from timm_ghn.data import augment_batch, load_image_folder, normalize_batch
from timm_ghn.evaluate import evaluate_accuracy
from timm_ghn.pipeline import resolve_ghn
from timm_ghn.postprocess import ghn_orth_
from timm_ghn.predict import predict_parameters

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
CIFAR = REPOSITORY_ROOT.parent / "shared" / "data" / "cifar10-jpeg.zip"
UNSEEN_CLASSES = ["dog", "frog", "horse", "ship", "truck"]

logger = logging.getLogger("finetune_unseen")


def build(name: str, init: str, ghn, seed: int) -> torch.nn.Module:
    """Build a held-out architecture with timm's init (seeded), then apply ``ghn_orth`` if asked."""
    torch.manual_seed(seed)
    model = HELD_OUT[name].build(num_classes=len(UNSEEN_CLASSES), img_size=32)
    if init == "ghn_orth":
        predict_parameters(model, ghn, predict_classifier=False)
        ghn_orth_(model, beta=3e-5, generator=torch.Generator().manual_seed(seed))
    return model


def finetune(model, train_set, test_set, epochs: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """Train ``model`` and return the test accuracy before training and after every epoch."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    total = epochs * steps_per_epoch
    curve = [evaluate_accuracy(model, test_set, seed=seed)]
    step = 0
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_set), generator=generator)
        for indices in torch.tensor_split(order, steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            x = normalize_batch(augment_batch(train_set.images[indices], generator))
            loss = F.cross_entropy(model(x), train_set.labels[indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        curve.append(evaluate_accuracy(model, test_set, seed=seed))
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(CIFAR), help="CIFAR-10 ImageFolder directory or zip (default: %(default)s)")
    parser.add_argument("--ghn", default=None, help="GHN checkpoint (default: the bundled GHN)")
    parser.add_argument("--architectures", nargs="+", default=["resnet-basic-s"], choices=sorted(HELD_OUT))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--shots", type=int, default=100, help="training images per class (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=50, help="training batch size (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default: %(default)g)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write all curves to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("timm_ghn").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    ghn = resolve_ghn(args.ghn)
    full_train = load_image_folder(args.data, "train", UNSEEN_CLASSES)
    test_set = load_image_folder(args.data, "test", UNSEEN_CLASSES)
    results = []
    for name in args.architectures:
        for seed in args.seeds:
            train_set = full_train.per_class(args.shots, torch.Generator().manual_seed(seed))
            for init in ("timm", "ghn_orth"):
                start = time.perf_counter()
                model = build(name, init, ghn, seed)
                curve = finetune(model, train_set, test_set, args.epochs, args.batch_size, args.lr, seed)
                logger.info("%s seed %d %s: %s (%.0f s)", name, seed, init,
                            " ".join(f"{100 * a:.1f}" for a in curve), time.perf_counter() - start)
                results.append({"architecture": name, "seed": seed, "init": init, "curve": curve})

    print(f"GHN {ghn.name} (sha256 {ghn.sha256[:12]}); {args.shots} images per class of {', '.join(UNSEEN_CLASSES)}; "
          f"{args.epochs} epochs; test accuracy (%) as mean ± std over seeds {args.seeds}")
    print("| architecture | init | epoch 0 | epoch 1 | epoch 3 | final |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name in args.architectures:
        for init in ("timm", "ghn_orth"):
            curves = [r["curve"] for r in results if r["architecture"] == name and r["init"] == init]

            def cell(epoch: int) -> str:
                values = [100 * c[epoch] for c in curves]
                spread = statistics.pstdev(values) if len(values) > 1 else 0.0
                return f"{statistics.fmean(values):.1f} ± {spread:.1f}"

            print(f"| {name} | {init} | {cell(0)} | {cell(1)} | {cell(min(3, args.epochs))} | {cell(args.epochs)} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
