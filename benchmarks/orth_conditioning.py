"""Measure the conditioning of the weights that GHN-orth orthogonalises, and which QR methods it allows.

For every layer that GHN-orth transforms, the script prints the tall view's shape, its rank
before the noise, its condition number after the noise (singular values in float64), and the
orthogonality error ``max |QᵀQ - I|`` of two ways to get ``Q``:

* ``torch.linalg.qr`` in float32 (Householder), what ``timm_ghn.postprocess.orthogonalize_`` runs;
* CholeskyQR in float32: ``R = cholesky(VᵀV)``, ``Q = V R⁻¹``. By operation counts it needs
  fewer operations than Householder QR with an explicit ``Q`` (an estimate), all of them matrix
  products. But it loses orthogonality with the square of the condition number and fails once
  that square nears ``1 / eps(float32) ≈ 8e6``.

Usage::

    python benchmarks/orth_conditioning.py [--model convnext_base] [--ghn PATH] [--start-layer 100]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BETA = 3e-5


def _orthogonality_error(q) -> float:
    import torch

    identity = torch.eye(q.shape[1], dtype=torch.float64)
    return float((q.double().t() @ q.double() - identity).abs().max())


def _cholesky_qr_error(view) -> str:
    import torch

    gram = view.t() @ view
    factor, info = torch.linalg.cholesky_ex(gram, upper=True)
    if int(info) != 0:
        return "failed"
    q = torch.linalg.solve_triangular(factor, view, upper=True, left=False)
    return f"{_orthogonality_error(q):.1e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="convnext_base", help="timm model name (default: convnext_base)")
    parser.add_argument("--ghn", type=Path, help="GHN checkpoint (default: the bundled GHN)")
    parser.add_argument("--start-layer", type=int, help="GHN-orth start layer (default: the model's preset or rule)")
    parser.add_argument("--variant", default="paper", choices=("released", "paper"), help="GHN-orth variant (default: paper)")
    args = parser.parse_args(argv)

    import timm
    import torch

    import timm_ghn
    from timm_ghn.pipeline import DEFAULT_GHN
    from timm_ghn.postprocess import _tall_view, add_correlated_noise_, default_start_layer, weight_modules

    ghn_path = args.ghn or DEFAULT_GHN

    model = timm.create_model(args.model)
    timm_ghn.predict_parameters(model, timm_ghn.load_ghn(ghn_path))
    modules = weight_modules(model)
    start_layer = args.start_layer or default_start_layer(len(modules), args.model, args.variant)
    generator = torch.Generator().manual_seed(0)

    print(f"{args.model}, GHN {ghn_path.name}, start layer {start_layer}, variant {args.variant}, beta {BETA:g}")
    print("| layer | module | tall view | rank before noise | condition number after noise "
          "| Householder QR error | CholeskyQR error |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for index, (name, module) in enumerate(modules[:-1], start=1):
        if index < start_layer:
            continue
        weight = module.weight.detach().float().clone()
        rank = int(torch.linalg.matrix_rank(_tall_view(weight)[0].double()))
        add_correlated_noise_(weight, BETA, generator=generator, variant=args.variant)
        view = _tall_view(weight)[0].contiguous()

        singular_values = torch.linalg.svdvals(view.double())
        condition = float(singular_values[0] / singular_values[-1])
        householder = _orthogonality_error(torch.linalg.qr(view).Q)
        print(
            f"| {index} | {name} | {tuple(view.shape)} | {rank} | {condition:.2e} "
            f"| {householder:.1e} | {_cholesky_qr_error(view)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
