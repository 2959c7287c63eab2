#!/usr/bin/env python3
"""What the graph passes buy: -O0 vs -O2 (and -O3 for ONNX Runtime) artifacts of one model, timed in one run.

Run by hand::

    .venv/bin/python benchmarks/bench_passes.py
    .venv/bin/python benchmarks/bench_passes.py --models cnn,resnet18,bert4 --repeat 50 --json passes.json

For each model (zoo models, plus `resnet18`: a ResNet-18-like net at 1x3x224x224, and `bert4`: a 4-layer
BERT-like encoder at 2x128 tokens, both with random weights), one process exports it to `onnx` and `openvino`
at -O0 and -O2, and to `onnx` at -O3 (fp32; every artifact passes Kiln's parity gate). Then, `--rounds`
times: one fresh process per runtime loads that runtime's artifacts with `--threads` threads (OpenVINO with
INFERENCE_PRECISION_HINT f32, as the target does) and times them in turn on the example inputs (a median of
`--repeat` runs after `--warmup`, re-run while disturbed: kiln.compiler.perf.timing), and another process times PyTorch
eager; a row's latency is the median over rounds. ONNX nodes: nodes of the graph the runtime was given.
-O0/this = -O0 ms / this level's ms (>1: faster than the unoptimized export of the same runtime).

The check after the table: no Kiln pass may make an artifact slower than the plain -O0 export on the same
runtime. Each round times -O0 and the other levels in the same process, one after the other, so each round
gives a ratio this/-O0; a level is "slower" only when it is slower in every round and the median ratio is
above 1 + NOISE (outside the noise), "faster" likewise, else "within noise". The script exits 1 on "slower".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_MODELS = ("cnn", "mobilenet", "transformer", "decoder", "unet", "resnet18", "bert4")
# (runtime, -O level) pairs exported per model; -O3 adds only ONNX Runtime's own passes
LEVELS = (("onnx", 0), ("onnx", 2), ("onnx", 3), ("openvino", 0), ("openvino", 2))


def model_factory(name: str) -> Callable[[], tuple[Any, tuple[Any, ...]]]:
    """The factory of a zoo model or of one of the benchmarks' larger models (benchmarks/models.py)."""
    from kiln.compiler.capture.zoo import ZOO

    from benchmarks.models import MODELS

    return MODELS.get(name) or ZOO[name]


def onnx_nodes(path: Path) -> int:
    """Nodes of the main graph of an ONNX file."""
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _setup(threads: int) -> None:
    """Quiet converter chatter; `threads` threads for torch (OMP_NUM_THREADS is inherited)."""

    import torch
    from kiln.compiler.progress import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(threads)


def measure_artifacts(name: str, directories: list[str], threads: int, repeat: int, warmup: int) -> dict[str, Any]:
    """In a fresh process: latency (ms) of each export of one runtime, taken in turn, on the example inputs."""
    _setup(threads)
    from kiln.compiler.export.loading import load
    from kiln.compiler.perf.timing import least_disturbed, runner_with_threads

    _, example_inputs = model_factory(name)()
    runs = []
    for directory in directories:
        loaded = load(directory)
        loaded.runner, _ = runner_with_threads(loaded, threads)
        feeds = {s.name: t.numpy() for s, t in zip(loaded.inputs, example_inputs)}
        runs.append(lambda loaded=loaded, feeds=feeds: loaded.run(feeds))
    return {"ms": [least_disturbed(run, repeat, warmup).median_ms for run in runs]}


def measure_eager(name: str, threads: int, repeat: int, warmup: int) -> dict[str, Any]:
    """In a fresh process: latency (ms) of the PyTorch module on its example inputs."""
    _setup(threads)
    import torch
    from kiln.compiler.perf.timing import least_disturbed

    module, example_inputs = model_factory(name)()

    def run() -> Any:
        with torch.no_grad():
            return module(*example_inputs)

    return {"ms": least_disturbed(run, repeat, warmup).median_ms}


def benchmark_model(name: str, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Export `name` at each level; then, in rounds, time each runtime's exports together (one fresh process
    per runtime, so that no other runtime's thread pool competes) and eager (in its own process)."""
    from kiln.compiler.export.options import export_options
    from kiln.compiler.export.pipeline import export_targets

    from benchmarks.bench_export import in_fresh_process

    module, example_inputs = model_factory(name)()
    rows: list[dict[str, Any]] = []
    for level in sorted({lv for _, lv in LEVELS}):
        runtimes = [rt for rt, lv in LEVELS if lv == level]
        started = time.perf_counter()
        results = export_targets(
            module, runtimes, work / f"{name}-O{level}", export_options(opt_level=level), example_inputs
        )
        export_s = time.perf_counter() - started
        onnx_graph = next(onnx_nodes(r.directory / "model.onnx") for r in results if r.target == "onnx")
        rows += [
            {
                "model": name,
                "runtime": result.target,
                "level": level,
                "published": result.published,
                "export_s": export_s,
                "directory": str(result.directory),
                "onnx_nodes": onnx_graph,  # the openvino IR is converted from this same ONNX graph
                "passes_changed": [p.name for p in result.manifest.passes if p.changed],
                "times_ms": [],
            }
            for result in results
        ]
    del module
    timeout = args.timeout
    eager_ms: list[float] = []
    for _ in range(args.rounds):
        for runtime in dict.fromkeys(row["runtime"] for row in rows):
            mine = [row for row in rows if row["runtime"] == runtime]
            measured = in_fresh_process(
                measure_artifacts,
                name,
                [row["directory"] for row in mine],
                args.threads,
                args.repeat,
                args.warmup,
                timeout=timeout,
            )
            for row, ms in zip(mine, measured["ms"]):
                row["times_ms"].append(ms)
        eager_ms.append(
            in_fresh_process(measure_eager, name, args.threads, args.repeat, args.warmup, timeout=timeout)["ms"]
        )
    baseline = {row["runtime"]: statistics.median(row["times_ms"]) for row in rows if row["level"] == 0}
    zero = {row["runtime"]: row["times_ms"] for row in rows if row["level"] == 0}
    for row in rows:
        row.pop("directory")
        row["ratio_rounds"] = [ms / base for ms, base in zip(row["times_ms"], zero[row["runtime"]]) if base > 0]
        row["verdict_vs_O0"] = verdict(row["ratio_rounds"])
        row["ms"] = statistics.median(row["times_ms"])
        row["ratio_vs_O0"] = baseline[row["runtime"]] / row["ms"]
        row["eager_ms"] = statistics.median(eager_ms)
        row["speedup_vs_eager"] = row["eager_ms"] / row["ms"]
    return sorted(rows, key=lambda row: (row["runtime"], row["level"]))


NOISE = 0.05  # a median per-round ratio within 5% of 1 is noise on a shared machine


def verdict(ratios: list[float]) -> str:
    """ "slower", "faster" or "within noise" from the per-round ratios this level ms / -O0 ms (see the docstring);
    "one round: no verdict" with fewer than two rounds (no spread to judge the noise by)."""
    if len(ratios) < 2:
        return "one round: no verdict"
    middle = statistics.median(ratios)
    if min(ratios) > 1.0 and middle > 1 + NOISE:
        return "slower"
    if max(ratios) < 1.0 and middle < 1 - NOISE:
        return "faster"
    return "within noise"


def slower_check(rows: list[dict[str, Any]]) -> tuple[list[str], bool]:
    """The lines of the check that no pass makes an artifact slower than -O0 (median ratio with its spread over
    the rounds, and the verdict), and whether every level passed it."""
    lines, ok = [], True
    for row in rows:
        if "error" in row or row["level"] == 0:
            continue
        ratios = row["ratio_rounds"]
        ok = ok and row["verdict_vs_O0"] != "slower"
        lines.append(
            f"{row['model']} {row['runtime']} -O{row['level']}: ms/-O0 median {statistics.median(ratios):.3f} "
            f"[{min(ratios):.3f}, {max(ratios):.3f}] over {len(ratios)} rounds: {row['verdict_vs_O0']}"
        )
    return lines, ok


HEAD = ["model", "runtime", "level", "ONNX nodes", "ms", "-O0/this", "eager ms", "vs eager", "passes that changed"]


def markdown_table(rows: list[dict[str, Any]], header: bool = True) -> str:
    """One line per model, runtime and level (with the header unless `header` is False)."""
    head = HEAD
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * 5 + "---|"] if header else []
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | failed: {row['error'][:100]} |" + " |" * (len(head) - 2))
            continue
        changed = ", ".join(p for p in row["passes_changed"] if p != "dead-node-elimination") or "-"
        cells = [
            row["model"],
            row["runtime"] + ("" if row["published"] else " (rejected)"),
            f"-O{row['level']}",
            str(row["onnx_nodes"]),
            f"{row['ms']:.3f}",
            f"{row['ratio_vs_O0']:.2f}",
            f"{row['eager_ms']:.3f}",
            f"{row['speedup_vs_eager']:.2f}x",
            changed,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma list (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=50, help="timed runs per measurement (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="threads per runtime (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per timing process (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write every measurement as JSON to FILE")
    args = parser.parse_args(argv)
    if min(args.repeat, args.rounds, args.threads) < 1 or args.warmup < 0:
        parser.error("--repeat, --rounds and --threads must be >= 1, --warmup >= 0")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    from kiln.compiler.capture.zoo import ZOO
    from kiln.compiler.host import host_info, versions

    from benchmarks.models import MODELS as BENCHMARK_MODELS

    _setup(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in ZOO and m not in BENCHMARK_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join([*ZOO, *BENCHMARK_MODELS])}")
    host = host_info()
    print(f"CPU: {host['cpu']} ({host['cores']} logical cores)")
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in versions("torch", "onnxruntime", "openvino").items()))
    print(
        f"Settings: fp32, {args.threads} threads; latency = median over {args.rounds} interleaved rounds of the "
        f"median of {args.repeat} runs after {args.warmup} warm-up; load average {os.getloadavg()[0]:.2f} at start"
    )
    print()
    print(markdown_table([]), flush=True)  # rows follow as each model is done
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-passes-") as work:
        for name in models:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            try:
                done = benchmark_model(name, args, Path(work))
            except Exception as exc:  # report the failure in the table, keep going
                done = [{"model": name, "error": f"{type(exc).__name__}: {exc}"}]
            rows += done
            print(markdown_table(done, header=False), flush=True)
    print(f"\ntook {time.perf_counter() - started:.0f}s; load average {os.getloadavg()[0]:.2f} at the end")
    lines, no_slower = slower_check(rows)
    print("\nCheck: no pass slower than -O0 on the same runtime (per-round ratio this/-O0, interleaved)")
    print("\n".join(f"  {line}" for line in lines) or "  nothing to compare")
    print("  OK" if no_slower else "  FAILED: a pass made an artifact slower (outside the noise)")
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host, "results": rows}, indent=2, default=str) + "\n")
    return 1 if any("error" in r for r in rows) or not no_slower else 0


if __name__ == "__main__":
    sys.exit(main())
