#!/usr/bin/env python3
"""Benchmark Kiln exports: stage times, peak memory, artifact size and artifact latency vs PyTorch eager.

Run by hand (or `make bench`)::

    .venv/bin/python benchmarks/bench_export.py
    .venv/bin/python benchmarks/bench_export.py --models cnn,lstm --targets onnx,openvino --repeat 50 --json bench.json

For every zoo model and every target, one fresh process (multiprocessing "spawn"):

1. exports `zoo:NAME` with `compiler.pipeline.export_targets` into a temporary directory and records the
   wall time of each stage (`Progress.timings`) and of the whole export;
2. reads its own peak RSS (`VmHWM` in /proc/self/status) right after the export, so the figure is the
   peak of the export (imports included), before anything is loaded for timing;
3. times the PyTorch eager module on the model's example inputs, loads the artifact, checks it computes the
   same outputs on those inputs (fed by input name), times it, frees it and times eager again: `--repeat`
   runs each, the same thread count for torch, ONNX Runtime and OpenVINO, and never two runtimes' thread
   pools alive while one is timed. Speed-up = eager ms / artifact ms (>1: the artifact is faster).

Nothing is hard-coded: every figure is measured in the run that prints it.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_TARGETS = ("onnx", "openvino", "pt2")
DEFAULT_REPEAT = 100
STAGES = ("load", "capture", "reference", "passes")


# --------------------------------------------------------------------------------------- child process


def _status_kib(field: str) -> int | None:
    """A `VmXXX:  1234 kB` field of /proc/self/status, in KiB (None off Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torch", "onnxscript", "onnx_ir", "openvino", "nncf"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _runner_with_threads(loaded: Any, threads: int) -> tuple[Any, str]:
    """The loaded export's runner, rebuilt so that its runtime uses `threads` threads."""
    target = loaded.manifest.target
    if target == "onnx":
        from targets.onnxrt import MODEL_FILE, OnnxRuntimeRunner

        runner = OnnxRuntimeRunner(loaded.directory / MODEL_FILE, loaded.manifest, threads=threads)
        return runner, "intra_op_num_threads"
    if target == "openvino":
        from dataclasses import replace

        from targets.openvino_ir import OpenVinoRunner

        manifest = replace(
            loaded.manifest, runtime_config={**loaded.manifest.runtime_config, "INFERENCE_NUM_THREADS": threads}
        )
        return OpenVinoRunner(loaded.directory, manifest), "INFERENCE_NUM_THREADS"
    if target == "pt2":
        return loaded.runner, "torch.set_num_threads"
    return loaded.runner, "runtime default (no thread setting known for this target)"


def _time_ms(fn: Any, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - started) / 1e6)
    return times


def _timed_block(fn: Any, runs: int, warmup: int) -> list[float]:
    """`runs` timed calls of `fn` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return _time_ms(fn, runs)


def _time_artifact(
    directory: Path,
    threads: int,
    example_inputs: tuple[Any, ...],
    expected: list[Any],
    repeat: int,
    warmup: int,
    row: dict[str, Any],
) -> list[float]:
    """Load the export, check it against eager's `expected` outputs, and time it; its runtime is gone on return."""
    import numpy as np

    from compiler.runner import load

    loaded = load(directory)
    loaded.runner, row["thread_setting"] = _runner_with_threads(loaded, threads)
    row["runtime"] = loaded.runner.runtime_info()
    if len(example_inputs) != len(loaded.inputs):
        raise RuntimeError(f"{len(example_inputs)} example inputs but the export takes {len(loaded.inputs)}")
    feeds = {
        spec.name: np.ascontiguousarray(t.detach().cpu().numpy()) for spec, t in zip(loaded.inputs, example_inputs)
    }
    # The artifact must compute what eager computes on these feeds, or the timings compare nothing.
    actual = loaded.run(feeds)
    row["max_abs_diff_vs_eager"] = max(
        (float(np.max(np.abs(actual[s.name].astype(np.float64) - e.astype(np.float64)))) if e.size else 0.0)
        for s, e in zip(loaded.outputs, expected)
    )
    return _timed_block(lambda: loaded.run(feeds), repeat, warmup)


def measure(model: str, target: str, precision: str, threads: int, repeat: int, warmup: int) -> dict[str, Any]:
    """Export one zoo model to one target in this (fresh) process and measure everything."""
    import torch

    from compiler.pipeline import ExportOptions, export_targets
    from compiler.progress import Progress
    from compiler.sources import state_hash
    from compiler.zoo import ZOO

    _quiet_libraries()
    torch.set_num_threads(threads)
    row: dict[str, Any] = {
        "model": model,
        "target": target,
        "precision": precision,
        "threads": threads,
        "rss_after_imports_mib": round((_status_kib("VmRSS") or 0) / 1024, 1),
    }
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        progress = Progress(quiet=True)
        started = time.perf_counter()
        options = ExportOptions(precision=precision, force=True)
        (result,) = export_targets(f"zoo:{model}", target, Path(tmp) / "out", options, progress=progress)
        row["export_s"] = time.perf_counter() - started
        row["peak_rss_mib"] = round(_peak_rss_mib(), 1)
        row["stages_s"] = dict(progress.timings)
        row["published"] = result.published
        row["parity"] = result.parity.summary() if result.parity else None
        manifest = result.manifest
        row["size_kib"] = sum(f.size for f in manifest.files if not f.path.startswith("parity/")) / 1024
        row["files"] = [f.path for f in manifest.files if not f.path.startswith("parity/")]

        gc.collect()  # drop the export's own validation runner (and its thread pool) before timing

        module, example_inputs = ZOO[model]()
        module.eval()
        row["same_weights_as_export"] = state_hash(module.state_dict()) == manifest.source.get("state_hash")

        def eager() -> Any:
            with torch.no_grad():
                return module(*example_inputs)

        expected = [leaf.detach().numpy() for leaf in torch.utils._pytree.tree_leaves(eager())]
        # Eager is timed in two halves, before the artifact's runtime exists and after it is gone: runtimes'
        # thread pools (ONNX Runtime spins its workers) slow each other down when alive in one process,
        # and the two halves average out drift over the artifact's timing.
        eager_ms = _timed_block(eager, repeat // 2, warmup)

        artifact_ms = _time_artifact(result.directory, threads, example_inputs, expected, repeat, warmup, row)
        gc.collect()
        eager_ms += _timed_block(eager, repeat - repeat // 2, warmup)
    row["artifact_ms"] = statistics.median(artifact_ms)
    row["eager_ms"] = statistics.median(eager_ms)
    row["artifact_ms_min"] = min(artifact_ms)
    row["eager_ms_min"] = min(eager_ms)
    row["speedup"] = row["eager_ms"] / row["artifact_ms"]
    row["runs"] = len(artifact_ms)
    return row


def _child(results: Any, *args: Any) -> None:
    try:
        results.put({"ok": True, "row": measure(*args)})
    except BaseException as exc:  # report anything, then let the process end
        results.put({"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})


# -------------------------------------------------------------------------------------- parent process


def run_one(
    model: str, target: str, precision: str, threads: int, repeat: int, warmup: int, timeout: float
) -> dict[str, Any]:
    """`measure` in a fresh spawned process; a row with `error` set when it fails."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_child, args=(results, model, target, precision, threads, repeat, warmup))
    process.start()
    deadline = time.monotonic() + timeout
    reply = None
    while reply is None:
        try:
            reply = results.get(timeout=1.0)
        except queue.Empty:
            if not process.is_alive():
                reply = {"ok": False, "error": f"worker died with exit code {process.exitcode}"}
            elif time.monotonic() > deadline:
                process.kill()
                reply = {"ok": False, "error": f"timed out after {timeout:.0f}s"}
    process.join(timeout=30)
    if reply["ok"]:
        return reply["row"]
    return {
        "model": model,
        "target": target,
        "precision": precision,
        "error": reply["error"],
        "traceback": reply.get("traceback"),
    }


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table; failures and rejections are footnoted below it."""
    head = [
        "model",
        "target",
        "precision",
        "export s",
        "capture s",
        "build s",
        "validate s",
        "peak RSS MiB",
        "size KiB",
        "eager ms",
        "artifact ms",
        "speed-up",
    ]
    align = ["---", "---", "---"] + ["---:"] * (len(head) - 3)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    notes = []
    for row in rows:
        target = row["target"]
        if "error" in row:
            notes.append(f"* {row['model']} / {target}: FAILED: {row['error']}")
            lines.append(f"| {row['model']} | {target} (failed) | {row['precision']} |" + " - |" * (len(head) - 3))
            continue
        if not row["published"]:
            target += " (rejected)"
            notes.append(
                f"* {row['model']} / {row['target']}: parity failed, artifact rejected; "
                f"{row['parity'].splitlines()[0] if row['parity'] else ''}"
            )
        if not row["same_weights_as_export"]:
            notes.append(f"* {row['model']}: the eager module has different weights from the exported one")
        stages = row["stages_s"]
        cells = [
            row["model"],
            target,
            row["precision"],
            _fmt(row["export_s"], 2),
            _fmt(stages.get("capture"), 2),
            _fmt(stages.get(f"build {row['target']}"), 2),
            _fmt(stages.get(f"validate {row['target']}"), 2),
            _fmt(row["peak_rss_mib"], 0),
            _fmt(row["size_kib"], 1),
            _fmt(row["eager_ms"], 3),
            _fmt(row["artifact_ms"], 3),
            _fmt(row["speedup"], 2) + "x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + (["", *notes] if notes else []))


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma list of zoo models (default: all)")
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help="comma list of targets (default: %(default)s; unavailable ones are skipped)",
    )
    parser.add_argument("--precision", default="fp32", help="export precision (default: %(default)s)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=DEFAULT_REPEAT,
        help="timed runs of the artifact and of eager each (default: %(default)s)",
    )
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first (default: %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=2, help="threads for torch, ONNX Runtime and OpenVINO (default: %(default)s)"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per model and target")
    parser.add_argument("--json", metavar="FILE", help="also write every measurement as JSON to FILE")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.threads < 1 or args.warmup < 0:
        parser.error("--repeat and --threads must be >= 1, --warmup >= 0")

    # Inherited by every worker before it imports torch (OpenMP reads it once, at load time).
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    from compiler.errors import KilnError
    from compiler.host import host_info, versions
    from compiler.zoo import ZOO
    from targets import get_target

    models = _split(args.models) if args.models else list(ZOO)
    unknown = [m for m in models if m not in ZOO]
    if unknown:
        parser.error(f"unknown zoo model(s) {', '.join(unknown)}; choose from {', '.join(ZOO)}")
    chosen, skipped = [], []
    for name in _split(args.targets):
        try:
            target = get_target(name)
        except KilnError as exc:
            parser.error(str(exc))
        reason = target.unavailable_reason()
        if reason:
            skipped.append(f"{target.name}: {reason}")
        elif args.precision not in target.precisions:
            skipped.append(f"{target.name}: no {args.precision} (has {', '.join(target.precisions)})")
        elif target.name not in chosen:
            chosen.append(target.name)
    if not chosen:
        parser.error("no target left to benchmark: " + "; ".join(skipped))

    rows = []
    load_before = _load_average()
    started = time.perf_counter()
    for model in models:
        for target in chosen:
            print(f"[bench] {model} -> {target} ...", file=sys.stderr, flush=True)
            row = run_one(model, target, args.precision, args.threads, args.repeat, args.warmup, args.timeout)
            if "error" in row:
                print(f"[bench]   failed: {row['error']}", file=sys.stderr, flush=True)
            rows.append(row)
    elapsed = time.perf_counter() - started
    load_after = _load_average()

    host = host_info()
    found = versions("onnxruntime", "openvino")
    print(f"CPU: {host['cpu']} ({host['cores']} logical cores; {', '.join(host['cpu_flags']) or 'no notable flags'})")
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    print(
        f"Settings: {args.threads} threads (torch, ONNX Runtime, OpenVINO), median of {args.repeat} runs "
        f"after {args.warmup} warm-up, precision {args.precision}; each export in a fresh process; "
        f"benchmark took {elapsed:.0f}s"
    )
    print(
        f"Load average (1 min) before/after: {load_before} / {load_after}: other processes on the machine "
        "skew latencies"
    )
    if skipped:
        print("Skipped targets: " + "; ".join(skipped))
    print()
    print(markdown_table(rows))
    print()
    print(
        "export s: wall time of the whole export_targets call; capture/build/validate s: its stages. "
        "peak RSS: VmHWM of the exporting process (Python + torch imports included). size: artifact files "
        "without parity samples. speed-up: eager ms / artifact ms on the example inputs (>1: artifact faster)."
    )
    if args.json:
        report = {
            "host": host,
            "versions": found,
            "elapsed_s": elapsed,
            "settings": {
                "threads": args.threads,
                "repeat": args.repeat,
                "warmup": args.warmup,
                "precision": args.precision,
                "skipped_targets": skipped,
                "load_average_before": load_before,
                "load_average_after": load_after,
            },
            "results": rows,
        }
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
