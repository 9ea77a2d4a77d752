"""Coverage of every timm architecture: does the graph build, and how much does the GHN predict?

For each name in ``timm.list_models()`` (or those matching ``--pattern``), with default
constructor arguments:

1. build the model on the ``meta`` device and its graph (no weights are allocated), and record
   the graph's size and time, the parameter tensors and elements the graph places, and the kinds
   of parameters it leaves (the last component of their names);
2. with ``--predict-max-params N``, build the real model on the CPU when it has at most ``N``
   parameters and predict it with the GHN given by ``--ghn``, recording the predicted fraction
   and any error.

Results go to a JSON file (resumable: models already in it are skipped) and a Markdown report
with one table per family (the leading letters of the name: ``resnet``, ``convnext``, ``vit``).

Usage::

    python benchmarks/zoo_coverage.py --json benchmarks/results/zoo_coverage.json \\
        --markdown benchmarks/results/zoo_coverage.md [--predict-max-params 30000000 --ghn GHN]
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import logging
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def measure(name: str, ghn, max_params: int | None) -> dict[str, Any]:
    """Return the coverage record of one architecture; failures are recorded, not raised."""
    import timm
    import torch

    from timm_ghn.graph import build_graph
    from timm_ghn.predict import predict_parameters

    record: dict[str, Any] = {}
    try:
        with torch.device("meta"):
            model = timm.create_model(name)
    except Exception as error:  # any constructor failure is reported per model
        record["error"] = f"create: {type(error).__name__}: {str(error)[:300]}"
        return record

    params = dict(model.named_parameters())
    record["tensors"] = len(params)
    record["params"] = sum(p.numel() for p in params.values())
    style = ghn.model.config.graph_style if ghn is not None else "ghn2"
    try:
        start = time.perf_counter()
        graph = build_graph(model, style=style)
        record["graph_seconds"] = time.perf_counter() - start
    except Exception as error:  # the sweep reports every failing architecture with its reason
        record["error"] = f"graph: {type(error).__name__}: {str(error)[:300]}"
        return record

    record["nodes"] = graph.num_nodes
    record["edges"] = int((graph.adjacency > 0).sum())
    record["placed_tensors"] = len(params) - len(graph.unplaced)
    record["placed_params"] = record["params"] - sum(params[n].numel() for n in graph.unplaced)
    record["unplaced_kinds"] = sorted({n.rsplit(".", 1)[-1] for n in graph.unplaced})

    if ghn is not None and max_params is not None and record["params"] <= max_params:
        try:
            torch.manual_seed(0)
            real = timm.create_model(name)
            start = time.perf_counter()
            result = predict_parameters(real, ghn)
            record["predict_seconds"] = time.perf_counter() - start
            record["predicted_params"] = result.num_params_predicted
        except Exception as error:  # prediction failures are caught per model and reported
            record["predict_error"] = f"{type(error).__name__}: {str(error)[:300]}"
    return record


def fraction(record: dict[str, Any]) -> float:
    return record["placed_params"] / record["params"] if record.get("params") else 1.0


def write_markdown(results: dict[str, dict[str, Any]], path: Path, command: str) -> None:
    """Write the summary and one table per family."""
    built = {k: v for k, v in results.items() if "error" not in v}
    full = [k for k, v in built.items() if fraction(v) >= 0.99]
    kinds = collections.Counter(kind for v in built.values() for kind in v["unplaced_kinds"])
    times = [v["graph_seconds"] for v in built.values()]
    predicted = [k for k, v in built.items() if "predicted_params" in v]
    failed_predictions = [k for k, v in built.items() if "predict_error" in v]

    lines = ["# timm architecture coverage", "", f"Command: `{command}`", ""]
    lines.append(f"- architectures: {len(results)}; graph built: {len(built)} ({len(built) / max(1, len(results)):.1%})")
    lines.append(f"- at least 99% of parameters placed in the graph: {len(full)} ({len(full) / max(1, len(built)):.1%} of built)")
    if times:
        lines.append(f"- graph time per model: median {statistics.median(times):.3f} s, max {max(times):.2f} s")
    if predicted or failed_predictions:
        lines.append(f"- predicted on CPU: {len(predicted)}; prediction failures: {len(failed_predictions)}")
    lines.append("- parameter kinds left unplaced (models): " + ", ".join(f"`{k}` {n}" for k, n in kinds.most_common(30)))
    lines.append("")
    failures = {k: v["error"] for k, v in results.items() if "error" in v}
    if failures:
        lines += ["## Graph failures", "", "| model | error |", "| --- | --- |"]
        lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in sorted(failures.items())]
        lines.append("")
    families: dict[str, list[str]] = collections.defaultdict(list)
    for name in sorted(built):
        families[re.match(r"[a-z]*", name).group() or name].append(name)
    for family, names in sorted(families.items()):
        lines += [f"## {family}", "", "| model | nodes | graph (s) | tensors placed | params placed | unplaced kinds |", "| --- | --- | --- | --- | --- | --- |"]
        for name in names:
            v = built[name]
            lines.append(
                f"| {name} | {v['nodes']} | {v['graph_seconds']:.3f} | {v['placed_tensors']}/{v['tensors']} "
                f"| {100 * fraction(v):.2f}% | {', '.join(v['unplaced_kinds'])} |"
            )
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pattern", default="*", help="fnmatch pattern of model names (default: all)")
    parser.add_argument("--json", type=Path, required=True, help="results file; models already in it are skipped")
    parser.add_argument("--markdown", type=Path, help="Markdown report to write")
    parser.add_argument("--ghn", help="GHN checkpoint for the prediction step")
    parser.add_argument("--predict-max-params", type=int, help="predict only models with at most this many parameters")
    parser.add_argument("--models-per-process", type=int, default=40, help="models measured by one worker process (default: %(default)s)")
    parser.add_argument("--memory-limit-gb", type=float, default=8.0, help="address-space limit of a worker process (default: %(default)s)")
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args._worker:
        return run_workers(args, argv if argv is not None else sys.argv[1:])

    import resource

    import timm

    from timm_ghn import load_ghn

    # A model that allocates real tensors while built on the meta device fails with MemoryError
    # here instead of exhausting the machine's memory.
    limit = int(args.memory_limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.disable(logging.WARNING)
    ghn = load_ghn(args.ghn) if args.ghn else None
    results: dict[str, dict[str, Any]] = json.loads(args.json.read_text()) if args.json.is_file() else {}
    names = [n for n in timm.list_models() if fnmatch.fnmatch(n, args.pattern)]
    start = time.perf_counter()
    measured = 0
    for index, name in enumerate(names):
        if name in results:
            continue
        if measured >= args.models_per_process:
            break
        measured += 1
        try:
            results[name] = measure(name, ghn, args.predict_max_params)
        except MemoryError:
            results[name] = {"error": f"create: MemoryError above {args.memory_limit_gb} GB while building on the meta device"}
        if measured % 10 == 0:
            print(f"{index}/{len(names)} {name} {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            args.json.write_text(json.dumps(results, indent=1))
    args.json.write_text(json.dumps(results, indent=1))
    return 0


def run_workers(args: argparse.Namespace, argv: list[str]) -> int:
    """Run worker processes until every model is in the JSON file, then write the report.

    Memory that a model leaves behind in the interpreter is returned when its worker exits, so a
    sweep over all architectures fits in a bounded amount of memory.
    """
    import subprocess

    import timm

    names = [n for n in timm.list_models() if fnmatch.fnmatch(n, args.pattern)]
    while True:
        done = json.loads(args.json.read_text()) if args.json.is_file() else {}
        if all(name in done for name in names):
            break
        before = len(done)
        subprocess.run([sys.executable, __file__, *argv, "--_worker"], check=False)
        after = len(json.loads(args.json.read_text())) if args.json.is_file() else 0
        if after == before:
            # The worker died before saving (for example killed); record the next model as failed.
            missing = next(name for name in names if name not in done)
            done[missing] = {"error": "worker process died while measuring this model"}
            args.json.write_text(json.dumps(done, indent=1))
    if args.markdown:
        write_markdown(json.loads(args.json.read_text()), args.markdown, " ".join(["python", "benchmarks/zoo_coverage.py", *argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
