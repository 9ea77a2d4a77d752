"""Check the CUDA path against the CPU: prediction, GHN-orth and the written file.

For each GHN and model, the model is predicted once on the CPU and once on the GPU, and the
script prints the largest relative L2 difference per step (expected: float rounding, about 1e-6
for prediction; GHN-orth differs more on rank-deficient weights, see the reference README) and
the times of both. It exits with status 1 if any predicted tensor differs by more than 1e-4
relative, if a GHN-orth layer's columns are not orthonormal to 1e-4, or if the file written from
the GPU model does not load into timm strictly.

Usage (on a machine with a GPU)::

    python benchmarks/device_check.py --ghn ../shared/reference/ghn2/ghn2_imagenet_random_seed0.pt \\
        ../shared/reference/ghn3/ghn3tm8_rand_seed0.pt --models resnet50 convnext_base
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def relative_difference(a, b) -> float:
    import torch

    return (torch.linalg.vector_norm(a.double().cpu() - b.double().cpu()) / torch.linalg.vector_norm(b.double().cpu()).clamp(min=1e-30)).item()


def check(model_name: str, ghn_path: str, device: str) -> bool:
    import timm
    import torch

    from timm_ghn import ghn_orth_, load_ghn, predict_parameters
    from timm_ghn.export import save_state_dict
    from timm_ghn.postprocess import weight_modules

    ok = True
    models = {}
    seconds = {}
    for where in ("cpu", device):
        ghn = load_ghn(ghn_path, device=where)
        torch.manual_seed(0)
        model = timm.create_model(model_name).to(where)
        if where != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        predict_parameters(model, ghn)
        if where != "cpu":
            torch.cuda.synchronize()
        seconds[f"predict {where}"] = time.perf_counter() - start
        models[where] = model

    worst = max(
        relative_difference(p_gpu, p_cpu)
        for (_, p_cpu), (_, p_gpu) in zip(models["cpu"].named_parameters(), models[device].named_parameters())
    )
    ok &= worst <= 1e-4
    print(f"{model_name} with {Path(ghn_path).name}: prediction, max relative difference {device} vs cpu {worst:.2e}")

    for where, model in models.items():
        start = time.perf_counter()
        report = ghn_orth_(model, seed=0, model_name=model_name)
        if where != "cpu":
            torch.cuda.synchronize()
        seconds[f"ghn_orth {where}"] = time.perf_counter() - start
    for name, module in weight_modules(models[device]):
        if name not in report.transformed:
            continue
        view = module.weight.detach().reshape(module.weight.shape[0], -1)
        tall = view if view.shape[0] >= view.shape[1] else view.t()
        identity = torch.eye(tall.shape[1], device=tall.device)
        error = (tall.t() @ tall - identity).abs().max().item()
        if error > 1e-4:
            ok = False
            print(f"  {name}: columns not orthonormal on {device} (max error {error:.1e})")

    with tempfile.TemporaryDirectory() as directory:
        path = save_state_dict(models[device], Path(directory) / "gpu.safetensors", {})
        fresh = timm.create_model(model_name)
        try:
            timm.models.load_checkpoint(fresh, str(path), strict=True)
        except Exception as error:  # report any loading failure as a failed check
            ok = False
            print(f"  file written from {device} does not load strictly: {error}")
    print("  " + ", ".join(f"{step} {value:.3f} s" for step, value in seconds.items()))
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ghn", nargs="+", required=True, help="GHN checkpoints to check")
    parser.add_argument("--models", nargs="+", default=["resnet50", "convnext_base"], help="timm models (default: %(default)s)")
    parser.add_argument("--device", default="cuda", help="GPU device (default: %(default)s)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("error: CUDA is not available; run this on a machine with a GPU", file=sys.stderr)
        return 2
    ok = all([check(model, ghn, args.device) for ghn in args.ghn for model in args.models])
    print("all checks passed" if ok else "some checks failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
