"""Peak memory of loading a large GHN-3 container, against the size of its weights.

The released GHN-3-XL file is 2.6 GB and cannot be downloaded here, so this script writes a
GHN-3 with random weights in the same container format (a pickle of the state dict, as
``joblib.dump`` writes it) at a chosen size, then loads it in a fresh process with
``timm_ghn.load_ghn`` and with the same file converted to safetensors, and prints the peak
resident memory of each load minus the process's memory before it, as a multiple of the file
size. One copy of the weights is a ratio of about 1.0.

Usage::

    python benchmarks/ghn_memory.py --hid 256 --layers 2
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(path: str) -> None:
    import torch  # noqa: F401  (imported before the baseline so torch's own memory is excluded)
    import timm

    from timm_ghn import load_ghn, predict_parameters

    before = _status_mb("VmRSS")
    start = time.perf_counter()
    loaded = load_ghn(path)
    load_seconds = time.perf_counter() - start
    after_load = _status_mb("VmRSS")
    # VmHWM belongs to this process image; ru_maxrss would include the parent's peak before exec.
    peak_load = _status_mb("VmHWM")

    model = timm.create_model("resnet50")
    start = time.perf_counter()
    predict_parameters(model, loaded)
    predict_seconds = time.perf_counter() - start
    print(json.dumps({
        "baseline_mb": before,
        "after_load_mb": after_load,
        "peak_during_load_mb": peak_load,
        "load_seconds": load_seconds,
        "resnet50_predict_seconds": predict_seconds,
    }))


def _write_container(path: Path, hid: int, layers: int) -> int:
    import torch

    from timm_ghn.hypernet import GHN3, GHN3Config

    torch.manual_seed(0)
    heads = 16 if hid > 64 else 8
    network = GHN3(GHN3Config(max_shape=(hid, hid, 16, 16), hid=hid, layers=layers, heads=heads))
    state = collections.OrderedDict((k, v.detach()) for k, v in network.state_dict().items())
    with open(path, "wb") as handle:
        pickle.dump(state, handle, protocol=4)
    return sum(v.numel() for v in state.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hid", type=int, default=256, help="hidden size of the synthetic GHN-3 (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=2, help="Graphormer layers (default: %(default)s)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        _child(args._child)
        return

    with tempfile.TemporaryDirectory() as directory:
        container = Path(directory) / "ghn3_synthetic.pt"
        parameters = _write_container(container, args.hid, args.layers)
        converted = Path(directory) / "ghn3_synthetic.safetensors"
        subprocess.run([sys.executable, "-m", "timm_ghn.cli", "convert", str(container), "-o", str(converted)], check=True, capture_output=True)

        print(f"synthetic GHN-3: hid {args.hid}, {args.layers} layers, {parameters:,} parameters")
        print("| file | size (MB) | load (s) | RSS growth after load (MB) | peak RSS minus baseline (MB) | peak / size | ResNet-50 prediction (s) |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for path in (container, converted):
            size_mb = os.path.getsize(path) / 2**20
            result = subprocess.run([sys.executable, __file__, "--_child", str(path)], check=True, capture_output=True, text=True)
            numbers = json.loads(result.stdout.strip().splitlines()[-1])
            growth = numbers["after_load_mb"] - numbers["baseline_mb"]
            peak = numbers["peak_during_load_mb"] - numbers["baseline_mb"]
            print(
                f"| {path.suffix} | {size_mb:.0f} | {numbers['load_seconds']:.2f} | {growth:.0f} | {peak:.0f} | "
                f"{peak / size_mb:.2f} | {numbers['resnet50_predict_seconds']:.2f} |"
            )


if __name__ == "__main__":
    main()
