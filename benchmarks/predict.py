"""Time GHN-2 parameter prediction and GHN-orth against timm's own initialization.

For each model the script measures, in one fresh Python process per model:

* ``timm.create_model``: timm's own random initialization of the same model (the baseline);
* ``build_graph`` on a model created on the meta device, and on the real model;
* the GHN forward pass, including fitting the blocks and copying them into the model
  (``predict_parameters`` with a prebuilt graph);
* GHN-orth (``ghn_orth_``) with the published start layer ``L`` and ``β = 3e-5``;
* ``torch.linalg.qr`` alone on the tall views that GHN-orth just factored. GHN-orth runs the
  same calls, so this is a lower bound on its time on this machine;
* writing the state dict with ``save_state_dict`` to a temporary directory;
* the peak resident set size (``ru_maxrss``), which is why each model gets its own process.

Every time is the minimum over ``--repeats`` rounds after one warm-up round, and the median is
printed next to it. The ratio is ``(graph on the real model + GHN forward + GHN-orth) /
timm.create_model`` from those minimums, and is also computed within each round.

Usage::

    python benchmarks/predict.py --models resnet50 convnext_base --repeats 3 --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GHN = REPOSITORY_ROOT.parent / "shared" / "reference" / "ghn2" / "ghn2_imagenet_random_seed0.pt"
DEFAULT_MODELS = ("resnet50", "convnext_base")
BETA = 3e-5

# Published GHN-orth start layers as (L, variant, source), as timm_ghn.postprocess documents them:
# L = 37 for ResNet-50, and for ConvNeXt-Base L = 100 from the GHN-orth report and L = 94 from the
# ppuda README. default_start_layer returns the same values today. They are fixed here so that the
# benchmark keeps measuring them if the defaults change. Other models get default_start_layer with
# the "released" variant.
ORTH_PRESETS: dict[str, list[tuple[int, str, str]]] = {
    "resnet50": [(37, "released", "paper and released")],
    "convnext_base": [(100, "paper", "paper"), (94, "released", "released")],
}

# Peak RSS from ru_maxrss is in KiB on Linux and in bytes on macOS.
RSS_UNIT_BYTES = 1 if sys.platform == "darwin" else 1024


# ---------------------------------------------------------------------------------------------
# Child process: measure one model


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RSS_UNIT_BYTES / 2**20


def _make_synchronize(device: str) -> Callable[[], None]:
    import torch

    if device.startswith("cuda"):
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class _Recorder:
    """Wall-clock and process CPU seconds of each run of each step, in run order."""

    def __init__(self, synchronize: Callable[[], None]) -> None:
        self.synchronize = synchronize
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    def time(self, step: str, function: Callable[[], Any]) -> Any:
        self.synchronize()
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        result = function()
        self.synchronize()
        self.wall.setdefault(step, []).append(time.perf_counter() - wall_start)
        self.cpu.setdefault(step, []).append(time.process_time() - cpu_start)
        return result


def _orth_settings(model_name: str, model) -> list[tuple[int, str, str]]:
    from timm.models import split_model_name_tag

    from timm_ghn.postprocess import default_start_layer, weight_modules

    base_name, _ = split_model_name_tag(model_name)
    if base_name in ORTH_PRESETS:
        return ORTH_PRESETS[base_name]
    start_layer = default_start_layer(len(weight_modules(model)), model_name, "released")
    return [(start_layer, "released", "default: deepest third")]


def _orth_step(start_layer: int, variant: str) -> str:
    return f"orth {start_layer}/{variant}"


def _qr_step(start_layer: int, variant: str) -> str:
    return f"qr {start_layer}/{variant}"


def _tall_views(model, module_names: list[str]) -> list:
    """Return the float32 tall 2-D views that GHN-orth factors for ``module_names``."""
    from timm_ghn.postprocess import _tall_view

    modules = dict(model.named_modules())
    return [_tall_view(modules[name].weight.detach())[0].float() for name in module_names]


def measure_model(model_name: str, ghn_path: str, repeats: int, device: str) -> dict[str, Any]:
    """Run the whole job ``repeats + 1`` times on ``model_name`` and return the raw timings.

    Each round runs the steps in the order of a real job (create the model, build the graphs,
    then predict, post-process and save once per GHN-orth setting), so the steps that the ratio
    compares are measured close together in time.
    """
    import logging
    import tempfile

    rss_before_import = _peak_rss_mib()
    import timm
    import torch
    from timm.models import split_model_name_tag

    import timm_ghn
    from timm_ghn.export import save_state_dict
    from timm_ghn.graph import build_graph

    # Unpredicted tensors (ConvNeXt's layer-scale gamma) are logged as warnings in every round.
    # The fraction of predicted parameters is recorded in the result instead.
    logging.getLogger("timm_ghn").setLevel(logging.ERROR)

    if not timm.is_model(split_model_name_tag(model_name)[0]):
        raise SystemExit(f"unknown timm model {model_name!r}; see timm.list_models() for valid names")

    recorder = _Recorder(_make_synchronize(device))
    rss_after_import = _peak_rss_mib()

    def create_model():
        torch.manual_seed(0)
        return timm.create_model(model_name, pretrained=False).to(device)

    with torch.device("meta"):
        meta_model = timm.create_model(model_name, pretrained=False)

    metadata = {"timm_ghn.model_name": model_name, "timm_ghn.method": "ghn_orth", "timm_ghn.beta": repr(BETA)}
    model = ghn = settings = prediction = None
    rss_after_create = 0.0
    file_bytes = 0
    with tempfile.TemporaryDirectory(prefix="timm_ghn_benchmark_") as directory:
        path = Path(directory) / f"{model_name}.safetensors"
        for round_index in range(repeats + 1):
            model = None  # free the previous model so that the peak RSS counts one model only
            model = recorder.time("create_model", create_model)
            if round_index == 0:
                rss_after_create = _peak_rss_mib()
                ghn = recorder.time("load_ghn", lambda: timm_ghn.load_ghn(ghn_path, device=device))
                settings = _orth_settings(model_name, model)

            style = ghn.model.config.graph_style
            meta_graph = recorder.time("graph_meta", lambda: build_graph(meta_model, style=style))
            graph = recorder.time("graph_real", lambda: build_graph(model, style=style))

            # GHN-orth changes the weights in place, so each setting starts from a fresh prediction.
            for start_layer, variant, _ in settings:
                prediction = recorder.time("predict", lambda: timm_ghn.predict_parameters(model, ghn, graph=graph))
                report = recorder.time(
                    _orth_step(start_layer, variant),
                    lambda: timm_ghn.ghn_orth_(model, BETA, start_layer, seed=0, variant=variant, model_name=model_name),
                )
                views = _tall_views(model, report.transformed)
                recorder.time(_qr_step(start_layer, variant), lambda: [torch.linalg.qr(view) for view in views])
                recorder.time("save", lambda: save_state_dict(model, path, metadata))
                file_bytes = path.stat().st_size

    return {
        "model": model_name,
        "ghn": f"{Path(ghn_path).name} ({type(ghn.model).__name__})",
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "timm_ghn": timm_ghn.__version__,
            "threads": torch.get_num_threads(),
            "device": device,
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "graph_nodes": graph.num_nodes,
        "graph_nodes_meta": meta_graph.num_nodes,
        "fraction_predicted": prediction.fraction_predicted,
        "file_bytes": file_bytes,
        "orth_settings": [
            {"step": _orth_step(layer, variant), "start_layer": layer, "variant": variant, "source": source}
            for layer, variant, source in settings
        ],
        # Per step, one value per run in run order, warm-up round first. predict and save run
        # once per GHN-orth setting in each round.
        "wall_seconds": recorder.wall,
        "cpu_seconds": recorder.cpu,
        # ru_maxrss is monotonic, so each value is the peak up to that point of the process.
        "peak_rss_mib": {
            "before_import": rss_before_import,
            "after_import": rss_after_import,
            "after_create_model": rss_after_create,
            "end": _peak_rss_mib(),
        },
    }


# ---------------------------------------------------------------------------------------------
# Parent process: run one child per model and print the tables


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _per_round(values: list[float], runs_per_round: int) -> list[list[float]]:
    return [values[k : k + runs_per_round] for k in range(0, len(values), runs_per_round)]


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Return one table row per GHN-orth setting, with the minimum and median seconds after the warm-up.

    ``ratio`` divides the sum of the minimum times by the minimum create time. The minimums may
    come from different rounds, so on a busy machine they can mix quiet and loaded moments.
    ``round_ratios`` compute the same quotient within each timed round, whose steps ran within
    seconds of each other.
    """
    wall = result["wall_seconds"]
    settings = result["orth_settings"]

    def stats(values: list[float]) -> tuple[float, float]:
        return min(values), statistics.median(values)

    # Round 0 is the warm-up. predict and save run once per setting in each round.
    create = wall["create_model"][1:]
    graph_meta = wall["graph_meta"][1:]
    graph_real = wall["graph_real"][1:]
    predict_rounds = _per_round(wall["predict"], len(settings))[1:]
    save = wall["save"][len(settings) :]
    predict_all = [value for runs in predict_rounds for value in runs]

    rows = []
    for position, setting in enumerate(settings):
        orth = wall[setting["step"]][1:]
        qr = wall[_qr_step(setting["start_layer"], setting["variant"])][1:]
        ratio = (min(graph_real) + min(predict_all) + min(orth)) / min(create)
        round_ratios = [
            (graph_real[k] + predict_rounds[k][position] + orth[k]) / create[k] for k in range(len(create))
        ]
        rows.append(
            {
                "model": result["model"],
                "start_layer": setting["start_layer"],
                "variant": setting["variant"],
                "source": setting["source"],
                "create_model": stats(create),
                "graph_meta": stats(graph_meta),
                "graph_real": stats(graph_real),
                "predict": stats(predict_all),
                "orth": stats(orth),
                "qr": stats(qr),
                "qr_ratio": min(qr) / min(create),
                "save": stats(save),
                "load_ghn": wall["load_ghn"][0],
                "peak_rss_create_mib": result["peak_rss_mib"]["after_create_model"],
                "peak_rss_mib": result["peak_rss_mib"]["end"],
                "ratio": ratio,
                "round_ratios": round_ratios,
            }
        )
    return rows


def format_markdown(header: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """Format the header lines, one table row per model and GHN-orth setting, and per-model notes."""
    lines = ["# timm_ghn prediction benchmark", ""]
    lines.append(f"- command: `{header['command']}`")
    lines.append(
        f"- CPU: {header['cpu']}, {header['logical_cpus']} logical CPUs; load average (1, 5, 15 min) "
        f"{header['load_average']} at start, {header['load_average_end']} at end"
    )
    environment = header.get("environment")
    if environment:
        lines.append(
            f"- Python {environment['python']}, torch {environment['torch']} (intra-op threads: {environment['threads']}), "
            f"timm {environment['timm']}, timm_ghn {environment['timm_ghn']}, device {environment['device']}"
        )
    lines.append(f"- GHN: {', '.join(header['ghn'])}")
    lines.append(
        f"- times in seconds: minimum over {header['repeats']} rounds after 1 warm-up round (median in brackets); "
        f"GHN-orth β = {BETA:g}; peak RSS in MiB"
    )
    lines.append("")
    lines.append(
        "| model | GHN | GHN-orth L (variant) | timm create_model | graph, meta model | graph, real model "
        "| GHN forward | GHN-orth | QR alone | save_state_dict | peak RSS, create only | peak RSS | ratio | ratio per round "
        "| QR alone / create |"
    )
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def cell(pair: tuple[float, float]) -> str:
        return f"{pair[0]:.3f} ({pair[1]:.3f})"

    for result in results:
        for row in summarize(result):
            round_ratios = row["round_ratios"]
            lines.append(
                f"| {row['model']} | {result['ghn']} | {row['start_layer']} ({row['variant']}) | {cell(row['create_model'])} "
                f"| {cell(row['graph_meta'])} | {cell(row['graph_real'])} | {cell(row['predict'])} "
                f"| {cell(row['orth'])} | {cell(row['qr'])} | {cell(row['save'])} | {row['peak_rss_create_mib']:.0f} "
                f"| {row['peak_rss_mib']:.0f} | {row['ratio']:.2f}x "
                f"| {min(round_ratios):.2f}x to {max(round_ratios):.2f}x | {row['qr_ratio']:.2f}x |"
            )
    lines.append("")
    lines.append(
        "ratio = (graph, real model + GHN forward + GHN-orth) / timm create_model, from the minimum times; "
        "ratio per round is the same quotient within each timed round. QR alone is `torch.linalg.qr` on the "
        "tall views that GHN-orth factors, with nothing else, so QR alone / create is a floor under the ratio."
    )
    lines.append("")
    for result in results:
        rss = result["peak_rss_mib"]
        lines.append(
            f"- {result['model']}: {result['parameters'] / 1e6:.1f} M parameters, "
            f"{result['graph_nodes']} graph nodes (meta model: {result['graph_nodes_meta']}), "
            f"{100 * result['fraction_predicted']:.2f}% of parameters predicted, "
            f"file {result['file_bytes'] / 2**20:.0f} MiB, load_ghn {result['wall_seconds']['load_ghn'][0]:.3f} s, "
            f"peak RSS after imports {rss['after_import']:.0f} MiB"
        )
    return "\n".join(lines) + "\n"


def run_child(model_name: str, args: argparse.Namespace, ghn_path: Path) -> dict[str, Any]:
    """Measure ``model_name`` in a fresh interpreter and return its parsed JSON result."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_child",
        model_name,
        "--ghn",
        str(ghn_path),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
    ]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"benchmark of {model_name} failed with exit code {completed.returncode}:\n{tail}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="timm model names (default: %(default)s)")
    parser.add_argument(
        "--ghn",
        type=Path,
        nargs="+",
        default=[DEFAULT_GHN],
        help="GHN checkpoints (GHN-2 or GHN-3), each measured on every model "
        "(default: ../shared/reference/ghn2/ghn2_imagenet_random_seed0.pt next to the repository)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed rounds after one warm-up round; a round runs every step once per GHN-orth setting (default: 3)",
    )
    # NOTE: only --device cpu has been run. The CUDA path synchronizes around every timed step.
    parser.add_argument("--device", default="cpu", help="device of the model and the GHN: cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--json", type=Path, help="also write the raw timings and the summary to this JSON file")
    parser.add_argument("--_child", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"invalid --repeats {args.repeats}: expected an integer >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error(f"invalid --threads {args.threads}: expected an integer >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    if args._child:
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        result = measure_model(args._child, str(args.ghn[0]), args.repeats, args.device)
        print(json.dumps(result))
        return 0

    ghn_paths = [path.expanduser().resolve() for path in args.ghn]
    for ghn_path in ghn_paths:
        if not ghn_path.is_file():
            print(f"error: GHN checkpoint not found: {ghn_path}; pass --ghn PATH", file=sys.stderr)
            return 2

    load_average = " ".join(f"{value:.2f}" for value in os.getloadavg())
    header: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "load_average": load_average,
        "ghn": [str(path) for path in ghn_paths],
        "repeats": args.repeats,
    }

    results = []
    failures = 0
    for ghn_path in ghn_paths:
        for model_name in args.models:
            print(f"measuring {model_name} with {ghn_path.name} ...", file=sys.stderr, flush=True)
            try:
                results.append(run_child(model_name, args, ghn_path))
            except RuntimeError as error:
                print(f"error: {error}", file=sys.stderr)
                failures += 1
    if not results:
        return 1
    header["environment"] = results[0]["environment"]
    header["load_average_end"] = " ".join(f"{value:.2f}" for value in os.getloadavg())

    print(format_markdown(header, results), end="")
    if args.json:
        summary = [row for result in results for row in summarize(result)]
        args.json.write_text(json.dumps({"header": header, "results": results, "summary": summary}, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
