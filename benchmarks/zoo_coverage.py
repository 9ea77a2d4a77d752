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
Each model is measured by :func:`timm_ghn.coverage.measure_architecture`, which ``timm-ghn
coverage`` also runs; this script adds worker processes with a memory limit and the report.

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
import sys
import time
from pathlib import Path
from typing import Any


def _predicted_cell(result: Any, max_params: int | None) -> str:
    if result.predict_error is not None:
        return "failed"
    if result.predicted_fraction is not None:
        return f"{100 * result.predicted_fraction:.2f}%"
    return "above cap" if max_params is not None and result.params > max_params else "-"


def write_markdown(results: dict[str, dict[str, Any]], path: Path, command: str, max_params: int | None = None) -> None:
    """Write the summary, the architectures below full coverage with their reasons, and one table per family."""
    from timm_ghn.coverage import FULL_COVERAGE, ArchitectureCoverage, summarize

    measured = {name: ArchitectureCoverage.from_record(name, record) for name, record in results.items()}
    built = {name: result for name, result in measured.items() if result.graph_built}
    summary = summarize(measured.values())
    predicted = [r for r in built.values() if r.predicted_fraction is not None]

    lines = ["# timm architecture coverage", "", f"Command: `{command}`", ""]
    lines.append(f"- architectures: {summary.models}; graph built: {summary.built} ({summary.built / max(1, summary.models):.1%})")
    lines.append(f"- at least 99% of parameters placed in the graph: {summary.fully_placed} ({summary.fully_placed / max(1, summary.models):.1%} of all)")
    if summary.median_graph_seconds is not None:
        lines.append(f"- graph time per model: median {summary.median_graph_seconds:.3f} s, max {summary.max_graph_seconds:.2f} s")
    if max_params is not None:
        lines.append(
            f"- predicted on the CPU (models with at most {max_params:,} parameters, classifier included): "
            f"{summary.predicted}; prediction failures: {summary.predict_failures}; "
            f"at least 99% of parameters predicted: {sum(r.predicted_fraction >= FULL_COVERAGE for r in predicted)}"
        )
    kinds = summary.unplaced_kinds.most_common(30)
    lines.append("- parameter kinds left unplaced (models): " + (", ".join(f"`{k}` {n}" for k, n in kinds) or "none"))
    lines.append("")

    failures = {name: result.error for name, result in measured.items() if not result.graph_built}
    if failures:
        lines += ["## Graph failures", "", "| model | error |", "| --- | --- |"]
        lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in sorted(failures.items())]
        lines.append("")
    below = {
        name: result for name, result in built.items()
        if result.placed_fraction < 1.0 or (result.predicted_fraction is not None and result.predicted_fraction < 1.0)
    }
    if below:
        lines += ["## Below 100%", "", "Architectures with parameters left at timm's init, and why.", ""]
        lines += ["| model | params placed | predicted | reason |", "| --- | --- | --- | --- |"]
        for name, result in sorted(below.items()):
            reason = result.predict_error or "unplaced: " + ", ".join(result.unplaced_kinds)
            lines.append(f"| {name} | {100 * result.placed_fraction:.2f}% | {_predicted_cell(result, max_params)} | {reason.replace('|', '/')} |")
        lines.append("")
    predict_failures = {name: r.predict_error for name, r in built.items() if r.predict_error is not None}
    if predict_failures:
        lines += ["## Prediction failures", "", "| model | error |", "| --- | --- |"]
        lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in sorted(predict_failures.items())]
        lines.append("")

    families: dict[str, list[str]] = collections.defaultdict(list)
    for name in sorted(built):
        families[re.match(r"[a-z]*", name).group() or name].append(name)
    header = "| model | nodes | graph (s) | tensors placed | params placed | predicted | unplaced kinds |"
    for family, names in sorted(families.items()):
        lines += [f"## {family}", "", header, "| --- | --- | --- | --- | --- | --- | --- |"]
        for name in names:
            v = built[name]
            lines.append(
                f"| {name} | {v.nodes} | {v.graph_seconds:.3f} | {v.placed_tensors}/{v.tensors} "
                f"| {100 * v.placed_fraction:.2f}% | {_predicted_cell(v, max_params)} | {', '.join(v.unplaced_kinds)} |"
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
    from timm_ghn.coverage import measure_architecture

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
            results[name] = measure_architecture(name, ghn, args.predict_max_params).to_record()
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
        command = " ".join(["python", "benchmarks/zoo_coverage.py", *argv])
        write_markdown(json.loads(args.json.read_text()), args.markdown, command, args.predict_max_params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
