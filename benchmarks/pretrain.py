"""Measure GHN training throughput: architectures and images per second of ``timm-ghn pretrain``.

The script runs :func:`timm_ghn.train.train` for ``--steps`` steps on the CIFAR-10 JPEG archive
(five classes), or on a generated ImageFolder of random images when the archive is missing. It
reads the per-step wall times that the trainer stores in its ``.state.pt`` history. The first
``--skip`` steps are left out because they build the graphs of architectures seen for the first
time. One step predicts the parameters of ``--arch-batch`` networks, runs ``--image-batch``
images through each, backpropagates into the GHN and updates it.

Usage::

    python benchmarks/pretrain.py --steps 40 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
CIFAR = REPOSITORY_ROOT.parent / "shared" / "data" / "cifar10-jpeg.zip"
SOURCE_CLASSES = ["airplane", "automobile", "bird", "cat", "deer"]


def _random_folder(root: Path, classes: int = 5, per_class: int = 64, size: int = 32) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / "train" / f"class{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps to run (default: %(default)s)")
    parser.add_argument("--skip", type=int, default=10, help="first steps left out of the statistics (default: %(default)s)")
    parser.add_argument("--arch-batch", type=int, default=8, help="architectures per step (default: %(default)s)")
    parser.add_argument("--image-batch", type=int, default=32, help="images per architecture (default: %(default)s)")
    parser.add_argument("--hid", type=int, default=64, help="GHN width (default: %(default)s)")
    parser.add_argument("--num-architectures", type=int, default=40, help="pool size (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = parser.parse_args()
    if args.steps <= args.skip:
        parser.error(f"--steps {args.steps} must exceed --skip {args.skip}")

    from timm_ghn.train import TrainConfig, checkpoint_paths, train

    with tempfile.TemporaryDirectory() as directory:
        data, classes = (CIFAR, SOURCE_CLASSES) if CIFAR.is_file() else (_random_folder(Path(directory) / "images"), None)
        output = Path(directory) / "ghn.safetensors"
        config = TrainConfig(
            data=str(data), output=str(output), classes=classes, steps=args.steps, arch_batch=args.arch_batch,
            image_batch=args.image_batch, hid=args.hid, num_architectures=args.num_architectures,
            checkpoint_every=args.steps, threads=args.threads,
        )
        train(config)
        history = torch.load(checkpoint_paths(output)[1], weights_only=True)["history"]

    seconds = [record["seconds"] for record in history[args.skip:]]
    median = statistics.median(seconds)
    result = {
        "data": str(data) if classes else "random 32x32 images",
        "steps_measured": len(seconds),
        "arch_batch": args.arch_batch,
        "image_batch": args.image_batch,
        "hid": args.hid,
        "threads": args.threads,
        "median_step_seconds": round(median, 3),
        "mean_step_seconds": round(statistics.fmean(seconds), 3),
        "architectures_per_second": round(args.arch_batch / median, 2),
        "images_per_second": round(args.arch_batch * args.image_batch / median, 1),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
