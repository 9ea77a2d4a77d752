"""Time a cache hit against ``safetensors.torch.load_file`` of the same file and a fresh prediction.

For each model, in a temporary cache directory and one Python process:

* ``fresh``: ``resolve_initialization`` with an empty cache and no Hub repo, which predicts,
  post-processes and stores the entry (one run);
* ``hit (first)``: the first cache hit after the in-process memos of the architecture and the GHN
  digest are cleared, so it builds the model on the ``meta`` device and hashes the checkpoint;
* ``hit``: ``resolve_initialization`` (key, lookup and header check) followed by
  ``load_file`` of the returned path, median of ``--repeats`` runs;
* ``load_file``: ``safetensors.torch.load_file`` of the same file, median of ``--repeats`` runs,
  interleaved with the hits so that both see the same page cache and CPU load.

``load_file`` maps the file and returns lazily, so both times exclude reading the tensor data.

Usage::

    python benchmarks/cache.py --models resnet50 convnext_base --repeats 50
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import timm_ghn.cache
from timm_ghn.resolve import resolve_initialization

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GHN = REPOSITORY_ROOT.parent / "shared" / "reference" / "ghn2" / "ghn2_imagenet_random_seed0.pt"
DEFAULT_MODELS = ("resnet50", "convnext_base")
#: The cache hit may cost at most this multiple of the plain load.
MAX_RATIO = 1.2


def _timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def measure(model_name: str, ghn: Path, repeats: int, cache_dir: Path) -> dict[str, float]:
    """Return the seconds of a fresh prediction, a first and a warm cache hit, and a plain load."""
    def resolve():
        return resolve_initialization(model_name, ghn=ghn, cache_dir=cache_dir, hub_repo=[])

    fresh_seconds, resolved = _timed(resolve)
    assert resolved.source == "predicted", resolved.source
    path = resolved.path

    timm_ghn.cache._ARCHITECTURES.clear()
    timm_ghn.cache._GHN_DIGESTS.clear()
    first_seconds, _ = _timed(lambda: load_file(str(resolve().path)))

    hits, loads = [], []
    for _ in range(repeats):
        # Each timer stops before the loaded tensors are freed, so neither time includes unmapping them.
        start = time.perf_counter()
        hit = resolve()
        tensors = load_file(str(hit.path))
        hits.append(time.perf_counter() - start)
        assert hit.source == "cache", hit.source
        del tensors

        start = time.perf_counter()
        tensors = load_file(str(path))
        loads.append(time.perf_counter() - start)
        del tensors
    return {
        "fresh": fresh_seconds,
        "first_hit": first_seconds,
        "hit": statistics.median(hits),
        "load_file": statistics.median(loads),
        "size_mb": path.stat().st_size / 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="timm model names (default: %(default)s)")
    parser.add_argument("--ghn", type=Path, default=Path(os.environ.get("TIMM_GHN_CHECKPOINT", DEFAULT_GHN)), help="GHN checkpoint (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=50, help="timed cache hits and loads per model (default: %(default)s)")
    args = parser.parse_args()

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':<16} {'size':>9} {'fresh':>9} {'first hit':>10} {'hit':>9} {'load_file':>10} {'hit/load':>9}")
    failed = False
    with tempfile.TemporaryDirectory(prefix="timm_ghn-bench-") as directory:
        for model_name in args.models:
            result = measure(model_name, args.ghn, args.repeats, Path(directory))
            ratio = result["hit"] / result["load_file"]
            failed |= ratio > MAX_RATIO
            print(
                f"{model_name:<16} {result['size_mb']:>6.0f} MB {result['fresh']:>8.2f}s {result['first_hit'] * 1e3:>8.1f}ms "
                f"{result['hit'] * 1e3:>7.2f}ms {result['load_file'] * 1e3:>8.2f}ms {ratio:>8.2f}x"
            )
    if failed:
        print(f"a cache hit cost more than {MAX_RATIO}x the plain load_file", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
