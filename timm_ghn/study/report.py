"""Results of a fine-tuning study: a JSON file of every run, a Markdown table and accuracy curves.

* ``results.json``: the study's settings, the split sizes, and every tuning and final run with its
  settings and per-epoch metrics.
* ``table.md``: test accuracy of every init (rows) on every architecture (columns), as the mean ±
  sample standard deviation (``ddof = 1``) over the final runs' seeds, with the settings that
  tuning chose.
* ``curves_MODEL.png``: training and validation accuracy per epoch of the final runs, one line per
  init (mean over seeds, with a band of ± one standard deviation).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import timm
import torch

import timm_ghn
from timm_ghn.study.inits import INIT_LABELS

if TYPE_CHECKING:
    from timm_ghn.study.runner import StudyConfig, StudyData

__all__ = ["CellSummary", "summarize", "format_table", "plot_curves", "write_reports"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CellSummary:
    """Final runs of one architecture and init; accuracies in [0, 1]."""

    model: str
    init: str
    num_params: int
    settings: dict[str, Any]
    start_layer: int | None
    test_accs: list[float]
    val_accs: list[float]
    diverged: int = 0
    """Final runs stopped early by a non-finite loss; their test accuracy still counts."""

    @property
    def mean(self) -> float:
        return statistics.fmean(self.test_accs)

    @property
    def std(self) -> float:
        """Sample standard deviation (``ddof = 1``); 0 for a single seed."""
        return statistics.stdev(self.test_accs) if len(self.test_accs) > 1 else 0.0


def summarize(records: Sequence[dict[str, Any]]) -> list[CellSummary]:
    """Group the final runs by architecture and init, in the order they first appear."""
    cells: dict[tuple[str, str], CellSummary] = {}
    for record in records:
        if record["phase"] != "final":
            continue
        key = (record["model"], record["init"])
        if key not in cells:
            cells[key] = CellSummary(record["model"], record["init"], record["num_params"], record["settings"],
                                     record["init_info"].get("start_layer"), [], [])
        cells[key].test_accs.append(record["test_acc"])
        cells[key].diverged += int(record["diverged"])
        cells[key].val_accs.append(record["val_acc"] if record["val_acc"] is not None else float("nan"))
    return list(cells.values())


def _settings_text(cell: CellSummary) -> str:
    s = cell.settings
    text = f"{s['optimizer']}, lr {s['lr']:g}, wd {s['weight_decay']:g}"
    if s.get("beta") is not None:
        text += f", β {s['beta']:g}, L {cell.start_layer} ({s['start_layer']})"
    return text


def format_table(cells: Sequence[CellSummary]) -> str:
    """Format test accuracy (%) as a Markdown table: inits as rows, architectures as columns.

    A second table lists the settings that tuning chose for every cell.
    """
    models = list(dict.fromkeys(c.model for c in cells))
    inits = list(dict.fromkeys(c.init for c in cells))
    by_key = {(c.model, c.init): c for c in cells}
    params = {c.model: c.num_params for c in cells}

    header = "| init | " + " | ".join(f"{m} ({params[m] / 1e6:.2f} M params)" for m in models) + " |"
    lines = [header, "| --- |" + " ---: |" * len(models)]
    for init in inits:
        row = [INIT_LABELS.get(init, init)]
        for model in models:
            cell = by_key.get((model, init))
            if cell is None:
                row.append("")
            elif len(cell.test_accs) > 1:
                row.append(f"{100 * cell.mean:.1f} ± {100 * cell.std:.1f}")
            else:
                row.append(f"{100 * cell.mean:.1f}")
        lines.append("| " + " | ".join(row) + " |")

    lines += ["", "| architecture | init | seeds | diverged | chosen settings | validation accuracy (%) |",
              "| --- | --- | ---: | ---: | --- | ---: |"]
    for cell in cells:
        val = statistics.fmean(cell.val_accs)
        lines.append(f"| {cell.model} | {INIT_LABELS.get(cell.init, cell.init)} | {len(cell.test_accs)} | "
                     f"{cell.diverged} | {_settings_text(cell)} | {100 * val:.1f} |")
    return "\n".join(lines) + "\n"


def plot_curves(records: Sequence[dict[str, Any]], model: str, path: Path) -> Path:
    """Plot training and validation accuracy per epoch of ``model``'s final runs to a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    inits = list(dict.fromkeys(r["init"] for r in records if r["model"] == model and r["phase"] == "final"))
    for init in inits:
        runs = [r for r in records if r["model"] == model and r["init"] == init and r["phase"] == "final"]
        for axis, key in zip(axes, ("train_acc", "val_acc")):
            epochs = sorted({e["epoch"] for r in runs for e in r["epochs"] if e[key] is not None})
            if not epochs:
                continue
            values = np.full((len(runs), len(epochs)), np.nan)
            for i, run in enumerate(runs):
                for e in run["epochs"]:
                    if e[key] is not None:
                        values[i, epochs.index(e["epoch"])] = 100 * e[key]
            mean = np.nanmean(values, axis=0)
            std = np.nanstd(values, axis=0)
            line, = axis.plot(epochs, mean, marker="o", markersize=3, label=INIT_LABELS.get(init, init))
            axis.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    axes[0].set_title(f"{model}: training accuracy (augmented batches)")
    axes[1].set_title(f"{model}: validation accuracy")
    for axis in axes:
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (%)")
    axes[1].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_reports(output: Path, config: "StudyConfig", data: "StudyData", records: Sequence[dict[str, Any]]) -> dict[str, Path]:
    """Write ``results.json``, ``table.md`` and one ``curves_MODEL.png`` per architecture to ``output``."""
    cells = summarize(records)
    results = {
        "config": dataclasses.asdict(config),
        "classes": list(data.splits.classes),
        "split": {"train": len(data.train), "val": len(data.val), "test": len(data.test), "seed": data.splits.seed,
                  "file": "splits.json"},
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
                        "timm_ghn": timm_ghn.__version__, "machine": platform.machine(),
                        "processor": platform.processor(), "cpu_count": os.cpu_count(),
                        "threads": torch.get_num_threads(),
                        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "summary": [{**dataclasses.asdict(c), "test_mean": c.mean, "test_std": c.std} for c in cells],
        "runs": list(records),
    }
    files = {"results": output / "results.json", "table": output / "table.md"}
    files["results"].write_text(json.dumps(results, indent=1) + "\n")
    files["table"].write_text(format_table(cells))
    for model in dict.fromkeys(c.model for c in cells):
        files[f"curves_{model}"] = plot_curves(records, model, output / f"curves_{model}.png")
    logger.info("wrote %s", ", ".join(str(p) for p in files.values()))
    return files
