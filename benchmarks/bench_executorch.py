#!/usr/bin/env python3
"""ExecuTorch against Kiln's other CPU artifacts: `executorch` fp32 and int8 beside `tflite` and `onnx` fp32 and
int8, and PyTorch eager, on several models, timed in one interleaved `kiln bench` run per model.

Run by hand::

    .venv/bin/python benchmarks/bench_executorch.py
    .venv/bin/python benchmarks/bench_executorch.py --models resnet18,bert4 --rounds 7 --json et.json
    .venv/bin/python benchmarks/bench_executorch.py --out bench-et   # keeps the exports: run again to re-time them

For each model, every artifact is made by Kiln's own pipeline (`export_targets`: passes, calibration, parity gate),
one capture for the three targets at each precision; int8 is calibrated on random rows in the example's range (the
timing does not depend on the data; the gate still judges each artifact). Then every published artifact and PyTorch
eager are timed by `kiln.compiler.perf.benchmark.time_candidates` (what `kiln bench` runs): each in its own worker
process, `--rounds` interleaved rounds of `--runs` runs, every runtime at `--threads` threads (ExecuTorch's thread
pool, ONNX Runtime's intra-op threads, the LiteRT interpreter's threads, `torch.set_num_threads`). A figure is the
median of the round medians; `x eager` is the median of the per-round ratios of eager to it; `spread` the widest
ratio between two round medians of one candidate (above 1.25 the machine's speed changed during the run). Nothing is
hard-coded: every figure comes from the run that prints it.

The peer's default is timed in the same rounds: `executorch recipe`, the `.pte` that ExecuTorch's documented recipe
makes of the model (`torch.export.export` -> `to_edge_transform_and_lower` with the XNNPACK partitioner ->
`to_executorch`, no Kiln pass), run by the same runner; `x recipe` is its time over each candidate's (median of
per-round ratios).

Models: `resnet18` (1x3x224x224), `mobilenet224` (the zoo's MobileNetV3-style net at 224x224), `unet128` (the
zoo's UNet at 128x128) and `bert4` (4-layer encoder, 2x128 tokens) from benchmarks/models.py, and the zoo's `lstm`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = {
    "resnet18": "benchmarks/models.py:resnet18",
    "mobilenet224": "benchmarks/models.py:mobilenet224",
    "unet128": "benchmarks/models.py:unet128",
    "bert4": "benchmarks/models.py:bert4",
    "lstm": "zoo:lstm",
}
TARGETS = "onnx,tflite,executorch"
PRECISIONS = ("fp32", "int8")


def export_all(source: str, work: Path, calib_samples: int) -> tuple[list[Path], list[str]]:
    """The model exported to every target at every precision: the published directories, and one line per
    artifact that was not published (failed to build, or rejected by the gate)."""
    from kiln.compiler.export.options import export_options
    from kiln.compiler.export.pipeline import export_targets
    from kiln.compiler.progress import Progress
    from kiln.compiler.types import MANIFEST_NAME

    published, missing = [], []
    for precision in PRECISIONS:
        if (work / precision).is_dir():  # --out of an earlier run: time its exports again
            published += [m.parent for m in sorted((work / precision).glob(f"*/{MANIFEST_NAME}"))]
            continue
        results = export_targets(
            source,
            TARGETS,
            work / precision,
            export_options(precision=precision, calib_samples=calib_samples),
            None,
            Progress(quiet=True),
        )
        for result in results:
            if result.published:
                published.append(result.directory)
            else:
                why = result.failure.message if result.failure else result.parity.summary().splitlines()[0]  # type: ignore[union-attr]
                missing.append(f"not published: {result.target} {precision}: {why}")
    return published, missing


def recipe_export(source: str, directories: list[Path], work: Path) -> tuple[Path | None, str]:
    """The peer's default: ExecuTorch's documented recipe (`torch.export.export(model, example)` ->
    `to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])` -> `to_executorch()`, no Kiln pass),
    written into a copy of Kiln's fp32 executorch export (the manifest's file hashes renewed) so that it is timed by
    the same runner in the same rounds. Its largest error against eager on the example, or why there is none."""
    import shutil

    import numpy as np
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime
    from kiln.compiler.capture.sources import load_source
    from kiln.compiler.export.artifacts import hash_files
    from kiln.compiler.progress import native_stderr_silenced
    from kiln.compiler.types import Manifest

    kiln_fp32 = next((d for d in directories if d.parent.name == "fp32" and d.name == "executorch"), None)
    if kiln_fp32 is None:
        return None, "no published Kiln executorch fp32 export to compare the recipe with"
    model = load_source(source)
    assert model.module is not None
    module = model.module.eval()
    try:
        program = torch.export.export(module, tuple(model.example_inputs))
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    except Exception as exc:  # the recipe's own failure is a result: say it
        return None, f"ExecuTorch's recipe failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    directory = work / "recipe" / "executorch"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(kiln_fp32, directory)
    (directory / "model.pte").write_bytes(lowered.buffer)
    manifest = Manifest.read(directory)
    manifest.files = hash_files(directory)
    manifest.write(directory)
    with native_stderr_silenced():  # the runtime's CPU probing logs from C++
        method = Runtime.get().load_program(directory / "model.pte").load_method("forward")
        got = torch.utils._pytree.tree_leaves(method.execute(list(model.example_inputs)))
    with torch.no_grad():
        want = torch.utils._pytree.tree_leaves(module(*model.example_inputs))
    error = max(float(np.max(np.abs(g.numpy() - w.numpy()))) for g, w in zip(got, want))
    return directory, f"recipe max abs error against eager on the example: {error:.2e}"


def time_model(
    source: str, directories: list[Path], recipe: Path | None, threads: int, rounds: int, runs: int
) -> dict[str, Any]:
    """Every export and PyTorch eager timed in one interleaved run (`kiln bench --compare-eager`, without
    torch.compile)."""
    from kiln.compiler.perf.benchmark import EAGER, BenchOptions, Candidate, find_candidates, time_candidates
    from kiln.compiler.progress import Progress

    options = BenchOptions(threads=threads, rounds=rounds, runs=runs, warmup=5, write=False)
    candidates = find_candidates(directories, options)
    for candidate in candidates:
        candidate.name = f"{candidate.manifest.target} {candidate.manifest.precision}"
    if recipe is not None:
        (peer,) = find_candidates([recipe], options)
        peer.name = "executorch recipe"
        candidates.append(peer)
    first = candidates[0]
    candidates.append(Candidate("pytorch eager", EAGER, first.directory, first.manifest, source))
    return time_candidates(candidates, options, Progress(quiet=True))


def rows(model: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per candidate: median ms, speed-up over eager and over ExecuTorch's recipe (medians of per-round
    ratios, from the same rounds), spread."""
    from kiln.compiler.perf.bench_report import speedup

    out = []
    recipe = next((r for r in result["candidates"] if r["name"] == "executorch recipe"), None)
    for record in result["candidates"]:
        x_recipe = None
        if recipe and "round_medians_ms" in recipe and "round_medians_ms" in record:
            x_recipe = speedup(recipe["round_medians_ms"], record["round_medians_ms"])
        latency = record.get("latency_ms") or {}
        out.append(
            {
                "model": model,
                "candidate": record["name"],
                "ms": latency.get("p50"),
                "x_eager": record.get("speedup_vs_eager"),
                "x_recipe": x_recipe,
                "spread": record.get("spread"),
                "failure": record.get("failure"),
            }
        )
    return out


def print_table(model: str, table: list[dict[str, Any]], notes: list[str]) -> None:
    timed = [r for r in table if r["ms"] is not None]
    best = min((r for r in timed if r["candidate"] != "pytorch eager"), key=lambda r: r["ms"], default=None)
    print(f"\n{model}")
    print(f"  {'candidate':<18} {'median ms':>10} {'x eager':>8} {'x recipe':>9} {'spread':>7}")
    for r in sorted(timed, key=lambda r: r["ms"]):
        mark = "  <- fastest artifact" if r is best else ""
        x_eager = f"{r['x_eager']:.2f}" if r["x_eager"] else "-"
        x_recipe = f"{r['x_recipe']:.2f}" if r["x_recipe"] else "-"
        spread = f"{r['spread']:.2f}" if r["spread"] else "-"
        print(f"  {r['candidate']:<18} {r['ms']:>10.3f} {x_eager:>8} {x_recipe:>9} {spread:>7}{mark}")
    for r in table:
        if r["failure"]:
            print(f"  {r['candidate']}: not timed: {r['failure']}")
    for line in notes:
        print(f"  {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per candidate per round (default 20)")
    parser.add_argument(
        "--calib-samples", type=int, default=32, help="random calibration rows of each int8 export (default 32)"
    )
    parser.add_argument("--json", help="write every row (and the host) to this file")
    parser.add_argument(
        "--out",
        help="keep the exports here (default: a temporary directory); exports an earlier run "
        "left here are timed again, not rebuilt",
    )
    args = parser.parse_args(argv)

    from kiln.compiler.host import host_info
    from kiln.compiler.progress import quiet_libraries

    quiet_libraries()
    host = host_info()
    print(f"host: {host.get('cpu')}; {args.threads} threads per runtime; {args.rounds} rounds x {args.runs} runs")
    every: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-et-") as scratch:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            source = MODELS[model] if MODELS[model].startswith("zoo:") else str(ROOT / MODELS[model])
            work = Path(args.out or scratch) / model
            directories, missing = export_all(source, work, args.calib_samples)
            recipe, said = recipe_export(source, directories, work)
            table = rows(model, time_model(source, directories, recipe, args.threads, args.rounds, args.runs))
            print_table(model, table, [*missing, said])
            every += table
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host, "rows": every}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
