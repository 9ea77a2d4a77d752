r"""Diagnostics of initializations (``timm-ghn diagnose MODEL``).

**Channel correlations.** For a weight of shape ``[K, ...]`` viewed as ``V = [K, D]``, the
correlation between output channels is the ``K x K`` Pearson correlation of the rows of ``V``.
Only its off-diagonal entries (``i ≠ j``) are reported, because the diagonal is always 1. With
``Z`` the rows centred and scaled to unit norm, ``R = Z Zᵀ`` and

.. math::
    \sum_{i \ne j} R_{ij} = \lVert \mathbf{1}^\top Z \rVert^2 - K, \qquad
    \sum_{i \ne j} R_{ij}^2 = \lVert Z^\top Z \rVert_F^2 - K,

so the standard deviation of the ``K(K - 1)`` off-diagonal entries needs only the Gram matrix of
the smaller side. Rows with zero variance have no correlation and are left out. This spread is
what GHN-orth removes: predicted weights are tiled from small blocks, so their channels are
strongly correlated, while orthogonal rows are uncorrelated up to their means. It differs from
:func:`timm_ghn.postprocess.correlation_std`, which includes the diagonal and, in the released
variant, correlates the rows of the tall view; that one sets the GHN-orth noise scale.

**Tiled values.** For each weight, the number of entries that repeat a value found elsewhere in
the same tensor: ``numel - number of distinct values``. A random init has almost none.

**Graph embeddings.** For each architecture, the mean over nodes of the GHN's final node
embeddings, projected on the two first principal components of all architectures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from timm_ghn.errors import InvalidOptionError
from timm_ghn.hypernet.checkpoint import LoadedGHN
from timm_ghn.postprocess import default_start_layer, weight_modules
from timm_ghn.study.inits import INIT_LABELS, build_model

__all__ = [
    "DEFAULT_EMBEDDING_MODELS",
    "LayerStats",
    "channel_correlations",
    "correlation_spread",
    "diagnose_model",
    "graph_embeddings",
    "layer_stats",
    "tiled_values",
    "add_parser",
    "run",
]

logger = logging.getLogger(__name__)

#: Architectures whose graph embeddings ``timm-ghn diagnose`` projects by default.
DEFAULT_EMBEDDING_MODELS = (
    "resnet18", "resnet50", "resnext50_32x4d", "convnext_atto", "convnext_tiny", "efficientnet_b0",
    "mobilenetv3_small_100", "regnetx_002", "vit_tiny_patch16_224", "vit_small_patch16_224",
)

HISTOGRAM_BINS = 100


@dataclasses.dataclass
class LayerStats:
    """Statistics of one weight (``index`` is the 1-based layer of :func:`weight_modules`)."""

    index: int
    name: str
    shape: list[int]
    corr_std: float
    """Standard deviation of the off-diagonal output-channel correlations; ``nan`` when undefined."""
    tiled: int
    """Entries that repeat a value found elsewhere in the tensor."""
    numel: int


def _unit_rows(weight: torch.Tensor) -> torch.Tensor:
    """Return the rows of ``[K, D]`` that vary, centred and scaled to unit L2 norm (float64)."""
    matrix = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    centred = matrix - matrix.mean(dim=1, keepdim=True)
    norms = torch.linalg.vector_norm(centred, dim=1, keepdim=True)
    varying = (norms.squeeze(1) > 0) & ~(matrix == matrix[:, :1]).all(dim=1)
    return centred[varying] / norms[varying]


def channel_correlations(weight: torch.Tensor) -> torch.Tensor:
    """Return the off-diagonal entries of the output-channel correlation matrix (1-D, float32).

    Rows with zero variance are left out. The result is empty when fewer than two rows vary.
    """
    rows = _unit_rows(weight)
    if rows.shape[0] < 2 or rows.shape[1] < 2:
        return torch.empty(0)
    matrix = rows.to(torch.float32) @ rows.to(torch.float32).t()
    off_diagonal = ~torch.eye(matrix.shape[0], dtype=torch.bool)
    return matrix[off_diagonal].to(torch.float32)


def correlation_spread(weight: torch.Tensor) -> float:
    """Return the standard deviation (``ddof = 0``) of the off-diagonal output-channel correlations,
    or ``nan`` when fewer than two rows vary.

    It comes from the Gram matrix of the smaller side (module docstring), computed in float32 and
    summed in float64.
    """
    rows = _unit_rows(weight).to(torch.float32)
    count, width = rows.shape
    if count < 2 or width < 2:
        return math.nan
    gram = rows @ rows.t() if count <= width else rows.t() @ rows
    pairs = count * (count - 1)
    entry_sum = float(rows.sum(dim=0).double().square().sum()) - count
    square_sum = float(gram.double().square().sum()) - count
    mean = entry_sum / pairs
    return math.sqrt(max(square_sum / pairs - mean * mean, 0.0))


def tiled_values(weight: torch.Tensor) -> int:
    """Return how many entries of ``weight`` repeat a value found elsewhere in it."""
    # NumPy's sort is about ten times faster than torch.unique on a CPU for tensors of millions
    # of entries (measured with a 25 M float32 vector: 0.45 s against 5.6 s).
    values = np.sort(weight.detach().cpu().flatten().numpy())
    return int(values.size - 1 - np.count_nonzero(values[1:] != values[:-1])) if values.size else 0


def layer_stats(model: nn.Module) -> list[LayerStats]:
    """Return :class:`LayerStats` of every module with a weight of at least 2 dims, in layer order."""
    stats = []
    for index, (name, module) in enumerate(weight_modules(model), start=1):
        weight = module.weight
        stats.append(LayerStats(index, name, list(weight.shape), correlation_spread(weight), tiled_values(weight),
                                weight.numel()))
    return stats


def graph_embeddings(ghn: LoadedGHN, model_names: Sequence[str]) -> dict[str, Any]:
    """Embed each architecture with the GHN and project the embeddings on two principal components.

    An architecture's embedding is the mean of the GHN's final node embeddings over its graph's
    nodes. Models are built on the ``meta`` device, so no weights are allocated.

    Returns:
        ``names``, the ``[n, hid]`` ``embeddings``, their 2-D ``pca`` coordinates and the
        ``explained_variance_ratio`` of the two components. Architectures that cannot be built or
        traced are logged and listed in ``skipped``.
    """
    import timm

    from timm_ghn.graph import build_graph

    config = ghn.model.config
    names, vectors, skipped = [], [], []
    for name in model_names:
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
            graph = build_graph(model, ve_cutoff=config.ve_cutoff, style=config.graph_style)
        except Exception as error:  # timm or tracing can fail in many ways, so log the error and skip the model
            logger.warning("graph embedding of %s skipped: %s: %s", name, type(error).__name__, error)
            skipped.append(name)
            continue
        with torch.no_grad():
            vectors.append(ghn.model.embed_nodes(graph).final.mean(dim=0).cpu().double())
        names.append(name)
    if len(names) < 3:
        raise InvalidOptionError(f"graph embeddings need at least 3 architectures, got {names}; pass more names to --embed")
    matrix = torch.stack(vectors)
    centred = matrix - matrix.mean(dim=0, keepdim=True)
    _, singular, right = torch.linalg.svd(centred, full_matrices=False)
    coordinates = centred @ right[:2].t()
    variance = singular.square()
    return {
        "names": names,
        "embeddings": matrix.tolist(),
        "pca": coordinates.tolist(),
        "explained_variance_ratio": (variance[:2] / variance.sum()).tolist(),
        "skipped": skipped,
    }


def _finite(value: float) -> float | None:
    """Return ``value``, or ``None`` for NaN, which JSON cannot hold."""
    return None if math.isnan(value) else value


def _histogram_layers(num_layers: int, start_layer: int) -> list[int]:
    """Return a first, a shallow and a deep layer: 1, ``⌊M/4⌋ + 1`` and the deepest of
    ``max(L, ⌊0.9·M⌋)`` that is not the classifier (layer ``M``)."""
    deep = min(max(start_layer, int(0.9 * num_layers)), num_layers - 1)
    return sorted({1, num_layers // 4 + 1, max(deep, 1)})


def diagnose_model(
    model_name: str,
    ghn: LoadedGHN,
    *,
    inits: Sequence[str] = ("rand", "orth", "ghn", "ghn_orth"),
    pretrained: str | None = None,
    num_classes: int = 1000,
    image_size: int = 224,
    beta: float = 3e-5,
    start_layer: str | int | None = None,
    seed: int = 0,
    layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Build ``model_name`` with every init and measure its channel correlations and tiled values.

    Args:
        model_name: a timm model name.
        ghn: the GHN for the ``ghn`` and ``ghn_orth`` inits.
        inits: inits to compare; ``oracle`` is added when ``pretrained`` is given.
        pretrained: checkpoint file of the same architecture for the ``oracle`` init.
        num_classes: classes of the head (the head keeps timm's init except in the oracle).
        image_size: input side in pixels, for models that take it at construction.
        beta: GHN-orth noise scale β.
        start_layer: GHN-orth start layer (default: :func:`default_start_layer`).
        seed: seed of every init.
        layers: 1-based layers to histogram (default: a first, a shallow and a deep one).

    Returns:
        A dict with per-init ``layers`` (:class:`LayerStats` as dicts), per-init ``histograms``
        of the chosen layers (``HISTOGRAM_BINS`` bins over [-1, 1]) and the resolved
        ``start_layer``.
    """
    inits = list(inits) + (["oracle"] if pretrained and "oracle" not in inits else [])
    result: dict[str, Any] = {"model": model_name, "inits": {}, "seed": seed, "beta": beta}
    for init in inits:
        started = time.perf_counter()
        model, info = build_model(model_name, init, num_classes=num_classes, image_size=image_size, seed=seed,
                                  ghn=ghn, beta=beta, start_layer=start_layer, pretrained=pretrained)
        modules = weight_modules(model)
        if "start_layer" in info:
            result["start_layer"] = info["start_layer"]
        if layers is None:
            layers = _histogram_layers(len(modules), result.get("start_layer") or default_start_layer(len(modules), model_name))
        bad = [i for i in layers if not 1 <= i <= len(modules)]
        if bad:
            raise InvalidOptionError(f"invalid --layers {bad}: {model_name} has layers 1 to {len(modules)}")
        histograms = {}
        for index in layers:
            name, module = modules[index - 1]
            counts = torch.histc(channel_correlations(module.weight), bins=HISTOGRAM_BINS, min=-1.0, max=1.0)
            histograms[str(index)] = {"name": name, "counts": counts.long().tolist()}
        stats = layer_stats(model)
        rows = [{**dataclasses.asdict(s), "corr_std": _finite(s.corr_std)} for s in stats]
        result["inits"][init] = {"layers": rows, "histograms": histograms, **info}
        result["num_layers"] = len(modules)
        logger.info("%s %s: %.1f s", model_name, init, time.perf_counter() - started)
    result["histogram_layers"] = list(layers or [])
    result.setdefault("start_layer", default_start_layer(result["num_layers"], model_name))
    return result


def plot_correlations(result: dict[str, Any], path: Path) -> Path:
    """Plot the histograms of the chosen layers and the per-layer correlation spread to a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = result["histogram_layers"]
    figure, axes = plt.subplots(1, len(layers) + 2, figsize=(4.2 * (len(layers) + 2), 3.8))
    centres = np.linspace(-1, 1, HISTOGRAM_BINS + 1)
    centres = (centres[:-1] + centres[1:]) / 2
    for init, values in result["inits"].items():
        label = INIT_LABELS.get(init, init)
        # GHN and GHN-orth are equal before the start layer, so GHN is dashed to stay visible.
        style = {"linestyle": "--"} if init == "ghn" else {}
        for axis, index in zip(axes, layers):
            entry = values["histograms"][str(index)]
            counts = np.asarray(entry["counts"], dtype=float)
            density = counts / max(counts.sum(), 1.0)
            axis.plot(centres, density, label=label, **style)
            axis.set_title(f"layer {index}: {entry['name']}", fontsize=9)
        indices = [s["index"] for s in values["layers"]]
        spread = [math.nan if s["corr_std"] is None else s["corr_std"] for s in values["layers"]]
        axes[-2].plot(indices, spread, marker=".", label=label, **style)
        axes[-1].plot(indices, [s["tiled"] / s["numel"] for s in values["layers"]], marker=".", label=label, **style)
    for axis in axes[:len(layers)]:
        axis.set_xlabel("correlation between output channels")
        axis.set_yscale("log")
    axes[0].set_ylabel("fraction of channel pairs")
    axes[-2].axvline(result["start_layer"], color="grey", linestyle="--", linewidth=1)
    axes[-2].set_title(f"std of channel correlations (GHN-orth from L = {result['start_layer']})", fontsize=9)
    axes[-2].set_xlabel("layer")
    axes[-1].set_title("fraction of tiled (repeated) values", fontsize=9)
    axes[-1].set_xlabel("layer")
    axes[-2].legend(fontsize=8)
    figure.suptitle(f"{result['model']}: channel correlations per init")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_embeddings(embeddings: dict[str, Any], ghn_name: str, path: Path) -> Path:
    """Scatter the 2-D PCA of the graph embeddings, one labelled point per architecture, to a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 5.5))
    for name, (x, y) in zip(embeddings["names"], embeddings["pca"]):
        axis.scatter(x, y, s=25)
        axis.annotate(name, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ratio = embeddings["explained_variance_ratio"]
    axis.set_xlabel(f"PC 1 ({100 * ratio[0]:.0f}% of variance)")
    axis.set_ylabel(f"PC 2 ({100 * ratio[1]:.0f}% of variance)")
    axis.set_title(f"graph embeddings of {ghn_name}")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _summary_line(result: dict[str, Any]) -> str:
    parts = []
    for init, values in result["inits"].items():
        deep = [s["corr_std"] for s in values["layers"] if s["index"] >= result["start_layer"]
                and s["index"] < result["num_layers"] and s["corr_std"] is not None]
        tiled = sum(s["tiled"] for s in values["layers"]) / max(sum(s["numel"] for s in values["layers"]), 1)
        mean = sum(deep) / len(deep) if deep else math.nan
        parts.append(f"{INIT_LABELS.get(init, init)} {mean:.4f} (tiled {100 * tiled:.1f}%)")
    return (f"{result['model']}: mean std of channel correlations from layer {result['start_layer']} on: "
            + ", ".join(parts))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``timm-ghn diagnose``."""
    parser = subparsers.add_parser(
        "diagnose",
        help="compare channel correlations and tiled values of Rand, Orth, GHN and GHN-orth inits, and plot graph embeddings",
        description="Build MODEL with each init and write correlations.png (histograms of output-channel "
        "correlations of a first, a shallow and a deep layer, the per-layer std of those correlations and the "
        "fraction of tiled values), embeddings.png (2-D PCA of the GHN's graph embeddings of several "
        "architectures) and diagnose.json with the numbers.",
    )
    parser.add_argument("model", metavar="MODEL", help="timm model name, such as resnet50")
    parser.add_argument("-o", "--output", default=None, metavar="DIR", help="output directory (default: diagnose-MODEL)")
    parser.add_argument("--ghn", default=None, metavar="CHECKPOINT", help="GHN checkpoint or name (default: $TIMM_GHN_CHECKPOINT, else the bundled GHN)")
    parser.add_argument("--pretrained", default=None, metavar="FILE", help="pretrained checkpoint of MODEL, compared as a fifth init")
    parser.add_argument("--num-classes", type=int, default=1000, help="classes of the model's head (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=224, help="input side in pixels for models that take it at construction (default: %(default)s)")
    parser.add_argument("--beta", type=float, default=3e-5, help="GHN-orth noise scale β (default: %(default)g)")
    parser.add_argument("--start-layer", default=None, metavar="L", help="GHN-orth start layer: an index, a fraction of the depth, or default")
    parser.add_argument("--seed", type=int, default=0, help="seed of every init (default: %(default)s)")
    parser.add_argument("--layers", default=None, metavar="I,J,K", help="1-based layers to histogram (default: 1, the first of the second quarter, and a deep one)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--embed", default=",".join(DEFAULT_EMBEDDING_MODELS), metavar="A,B,...",
                        help="architectures whose graph embeddings are projected; 'none' skips the projection (default: %(default)s)")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``timm-ghn diagnose`` from parsed arguments."""
    from timm_ghn.pipeline import check_model_name, resolve_ghn

    check_model_name(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = None
    if args.layers:
        try:
            layers = [int(item) for item in args.layers.split(",") if item.strip()]
        except ValueError as error:
            raise InvalidOptionError(f"invalid --layers {args.layers!r}: expected comma-separated layer indices") from error
    output = Path(args.output or f"diagnose-{args.model.replace('/', '_')}")
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ghn = resolve_ghn(args.ghn)
    result = diagnose_model(args.model, ghn, pretrained=args.pretrained, num_classes=args.num_classes,
                            image_size=args.image_size, beta=args.beta, start_layer=args.start_layer,
                            seed=args.seed, layers=layers)
    result["ghn"] = {"name": ghn.name, "sha256": ghn.sha256}
    files = [plot_correlations(result, output / "correlations.png")]
    names = [n.strip() for n in args.embed.split(",") if n.strip()]
    if names and names != ["none"]:
        result["embeddings"] = graph_embeddings(ghn, names)
        files.append(plot_embeddings(result["embeddings"], ghn.name, output / "embeddings.png"))
    files.append(output / "diagnose.json")
    files[-1].write_text(json.dumps(result, indent=1) + "\n")
    print(_summary_line(result))
    print(f"wrote {', '.join(str(f) for f in files)} in {time.perf_counter() - started:.1f} s")
    return 0
