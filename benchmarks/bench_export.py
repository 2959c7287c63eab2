#!/usr/bin/env python3
"""Benchmark Kiln exports: stage times, peak memory, artifact size and artifact latency vs PyTorch eager.

Run by hand (or `make bench`)::

    .venv/bin/python benchmarks/bench_export.py
    .venv/bin/python benchmarks/bench_export.py --models cnn,lstm --targets onnx,openvino --repeat 50 --json bench.json

Every measurement runs in a fresh process (multiprocessing "spawn"), so that nothing one step leaves behind
(memory, the thread pools of torch, ONNX Runtime or OpenVINO) affects the next. For each zoo model:

* eager: the PyTorch module on its example inputs (torch.no_grad, `--threads` threads), `--repeat` timed
  runs, once before the model's exports and once after them, pooled (drift over the run hits both sides);
* for each target, an export process runs `export_targets("zoo:NAME", target, tmp, export_options(force=True))`
  and records the wall time of each stage (`Progress.timings`) and of the whole call, then its own peak RSS
  (`VmHWM`: the export's peak, Python and library imports included);
* then a latency process loads the artifact with `kiln.compiler.export.loading.load`, gives its runtime `--threads`
  threads, checks that it computes what eager computes on the example inputs (fed by input name) and times
  `--repeat` runs.

Speed-up = eager ms / artifact ms (>1: the artifact is faster). Nothing is hard-coded: every figure is
measured in the run that prints it. Where other processes compete for the cores, runs stall (torch's OpenMP
pool most of all, by tens of milliseconds): a timed batch whose median is over NOISY times its fastest run
is re-run, up to BATCHES batches, and the least disturbed one kept; rows still disturbed are footnoted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kiln.compiler.memory import current_rss, peak_rss  # noqa: E402
from kiln.compiler.perf.timing import BATCHES, NOISY, least_disturbed, runner_with_threads  # noqa: E402

DEFAULT_TARGETS = ("onnx", "openvino", "pt2")
DEFAULT_REPEAT = 100


# ------------------------------------------------------------------------------------ in child processes


def _setup(threads: int) -> None:
    """Quiet converter chatter and give torch `threads` threads (OMP_NUM_THREADS is inherited)."""

    import torch
    from kiln.compiler.progress import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(threads)


def _eager(model: str) -> tuple[Any, tuple[Any, ...], Callable[[], Any]]:
    """The zoo module, its example inputs, and a function running it on them without autograd."""
    import torch
    from kiln.compiler.capture.zoo import ZOO

    module, example_inputs = ZOO[model]()
    module.eval()

    def run() -> Any:
        with torch.no_grad():
            return module(*example_inputs)

    return module, example_inputs, run


def measure_eager(model: str, threads: int, repeat: int, warmup: int) -> dict[str, Any]:
    """Latencies (ms) of the PyTorch eager module on its example inputs."""
    _setup(threads)
    _, _, run = _eager(model)
    latency = least_disturbed(run, repeat, warmup)
    return {"eager_times_ms": latency.times_ms, "eager_batches": latency.batches}


def measure_export(model: str, target: str, precision: str, threads: int, out: str) -> dict[str, Any]:
    """Export `zoo:model` to `target` in `out`: stage times, wall time, peak RSS, artifact size."""
    _setup(threads)
    from kiln.compiler.export.options import export_options
    from kiln.compiler.export.pipeline import export_targets
    from kiln.compiler.progress import Progress

    row: dict[str, Any] = {"rss_after_imports_mib": round((current_rss() or 0) / 2**20, 1)}
    progress = Progress(quiet=True)
    started = time.perf_counter()
    (result,) = export_targets(
        f"zoo:{model}", target, Path(out), export_options(precision=precision, force=True), progress=progress
    )
    row["export_s"] = time.perf_counter() - started
    row["peak_rss_mib"] = round(peak_rss() / 2**20, 1)
    row["stages_s"] = dict(progress.timings)
    row["published"] = result.published
    row["parity"] = result.parity.summary() if result.parity else None
    row["directory"] = str(result.directory)
    row["state_hash"] = result.manifest.source.get("state_hash")
    artifact = [f for f in result.manifest.files if not f.path.startswith("parity/")]
    row["size_kib"] = sum(f.size for f in artifact) / 1024
    row["files"] = [f.path for f in artifact]
    return row


def measure_artifact(model: str, directory: str, threads: int, repeat: int, warmup: int) -> dict[str, Any]:
    """Load the export in `directory`, check it against eager on the example inputs, and time it."""
    _setup(threads)
    import numpy as np
    import torch
    from kiln.compiler.capture.sources import state_hash
    from kiln.compiler.export.loading import load

    module, example_inputs, eager = _eager(model)
    expected = [leaf.detach().numpy() for leaf in torch.utils._pytree.tree_leaves(eager())]
    loaded = load(directory)
    row: dict[str, Any] = {"eager_state_hash": state_hash(module.state_dict())}
    del module, eager
    loaded.runner, row["thread_setting"] = runner_with_threads(loaded, threads)
    row["runtime"] = loaded.runner.runtime_info()
    if len(example_inputs) != len(loaded.inputs):
        raise RuntimeError(f"{len(example_inputs)} example inputs but the export takes {len(loaded.inputs)}")
    feeds = {
        spec.name: np.ascontiguousarray(t.detach().cpu().numpy()) for spec, t in zip(loaded.inputs, example_inputs)
    }
    # The artifact must compute what eager computes on these feeds, or the timings compare nothing.
    actual = loaded.run(feeds)
    row["max_abs_diff_vs_eager"] = max(
        float(np.max(np.abs(actual[spec.name].astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
        for spec, want in zip(loaded.outputs, expected)
    )
    latency = least_disturbed(lambda: loaded.run(feeds), repeat, warmup)
    row["artifact_times_ms"], row["artifact_batches"] = latency.times_ms, latency.batches
    return row


def _child(results: Any, function: Callable[..., dict[str, Any]], args: tuple[Any, ...]) -> None:
    try:
        results.put({"ok": True, "value": function(*args)})
    except BaseException as exc:  # report anything, then let the process end
        results.put({"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})


# -------------------------------------------------------------------------------------- parent process


class StepFailed(Exception):
    """A measurement process raised, died or timed out."""


def in_fresh_process(function: Callable[..., dict[str, Any]], *args: Any, timeout: float) -> dict[str, Any]:
    """`function(*args)` in a new spawned process; raises StepFailed if it fails there."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_child, args=(results, function, args))
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
    if not reply["ok"]:
        raise StepFailed(reply["error"] + (f"\n{reply['traceback']}" if reply.get("traceback") else ""))
    return reply["value"]


def benchmark_model(model: str, targets: list[tuple[str, str]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every row of one model: eager timed before and after its exports, each export and its latency."""
    timeout = args.timeout

    def log(message: str) -> None:
        print(f"[bench] {model}: {message}", file=sys.stderr, flush=True)

    rows = []
    log("eager ...")
    eager_before = in_fresh_process(measure_eager, model, args.threads, args.repeat, args.warmup, timeout=timeout)
    for target, precision in targets:
        row: dict[str, Any] = {"model": model, "target": target, "precision": precision, "threads": args.threads}
        with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
            try:
                log(f"export {target} {precision} ...")
                row |= in_fresh_process(
                    measure_export, model, target, precision, args.threads, str(Path(tmp) / "out"), timeout=timeout
                )
                log(f"{target} latency ...")
                row |= in_fresh_process(
                    measure_artifact, model, row["directory"], args.threads, args.repeat, args.warmup, timeout=timeout
                )
            except StepFailed as exc:
                row["error"], _, row["traceback"] = str(exc).partition("\n")
                log(f"{target} FAILED: {row['error']}")
        rows.append(row)
    log("eager again ...")
    eager_after = in_fresh_process(measure_eager, model, args.threads, args.repeat, args.warmup, timeout=timeout)
    eager = eager_before["eager_times_ms"] + eager_after["eager_times_ms"]
    for row in rows:
        row["eager_ms"] = statistics.median(eager)
        row["eager_ms_min"] = min(eager)
        row["eager_ms_before"] = statistics.median(eager_before["eager_times_ms"])
        row["eager_ms_after"] = statistics.median(eager_after["eager_times_ms"])
        row["eager_batches"] = [eager_before["eager_batches"], eager_after["eager_batches"]]
        if "error" not in row:
            times = row.pop("artifact_times_ms")
            row["artifact_ms"] = statistics.median(times)
            row["artifact_ms_min"] = min(times)
            row["speedup"] = row["eager_ms"] / row["artifact_ms"]
            row["same_weights_as_export"] = row.pop("eager_state_hash") == row.pop("state_hash")
            row.pop("directory")  # a temporary directory, gone now
    return rows


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table; failures, rejections and noisy timings are footnoted below it."""
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
    align = ["---"] * 3 + ["---:"] * (len(head) - 3)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    notes = []
    for row in rows:
        model, target = row["model"], row["target"]
        if "error" in row:
            notes.append(f"* {model} / {target}: FAILED: {row['error']}")
            lines.append(f"| {model} | {target} (failed) | {row['precision']} |" + " - |" * (len(head) - 3))
            continue
        shown = target
        if not row["published"]:
            shown += " (rejected)"
            first = row["parity"].splitlines()[0] if row["parity"] else "no parity report"
            notes.append(f"* {model} / {target}: artifact failed parity and was rejected: {first}")
        if not row["same_weights_as_export"]:
            notes.append(f"* {model} / {target}: the eager module has other weights than the exported one")
        for kind in ("eager", "artifact"):
            median, fastest = row[f"{kind}_ms"], row[f"{kind}_ms_min"]
            if median > NOISY * fastest:
                notes.append(
                    f"* {model} / {target}: {kind} timings noisy (median {median:.3f} ms, "
                    f"fastest {fastest:.3f} ms): were other processes busy?"
                )
        stages = row["stages_s"]
        cells = [
            model,
            shown,
            row["precision"],
            _fmt(row["export_s"], 2),
            _fmt(stages.get("capture"), 2),
            _fmt(stages.get(f"build {target}"), 2),
            _fmt(stages.get(f"validate {target}"), 2),
            _fmt(row["peak_rss_mib"], 0),
            _fmt(row["size_kib"], 1),
            _fmt(row["eager_ms"], 3),
            _fmt(row["artifact_ms"], 3),
            _fmt(row["speedup"], 2) + "x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + (["", *dict.fromkeys(notes)] if notes else []))


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--models", help="comma list of zoo models (default: all)")
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help="comma list of targets (default: %(default)s; unavailable ones are skipped)",
    )
    parser.add_argument(
        "--precision", default="fp32", help="export precision, or a comma list of them (default: %(default)s)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=DEFAULT_REPEAT,
        help="timed runs of each artifact, and of eager before and after (default: %(default)s)",
    )
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs first (default: %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=2, help="threads for torch, ONNX Runtime and OpenVINO (default: %(default)s)"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per step (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write every measurement as JSON to FILE")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.threads < 1 or args.warmup < 0:
        parser.error("--repeat and --threads must be >= 1, --warmup >= 0")

    # Inherited by every worker before it imports torch (OpenMP reads it once, when it loads).
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    from kiln.compiler.capture.zoo import ZOO
    from kiln.compiler.errors import KilnError
    from kiln.compiler.host import host_info, versions
    from kiln.targets import get_target

    models = _split(args.models) if args.models else list(ZOO)
    unknown = [m for m in models if m not in ZOO]
    if unknown:
        parser.error(f"unknown zoo model(s) {', '.join(unknown)}; choose from {', '.join(ZOO)}")
    chosen: list[tuple[str, str]] = []
    skipped: list[str] = []
    for name in _split(args.targets):
        try:
            target = get_target(name)
        except KilnError as exc:
            parser.error(exc.one_line())
        reason = target.unavailable_reason()
        if reason:
            skipped.append(f"{target.name}: {reason}")
            continue
        for precision in _split(args.precision):
            if precision not in target.precisions:
                skipped.append(f"{target.name}: no {precision} (has {', '.join(target.precisions)})")
            elif (target.name, precision) not in chosen:
                chosen.append((target.name, precision))
    if not chosen:
        parser.error("no target left to benchmark: " + "; ".join(skipped))

    rows: list[dict[str, Any]] = []
    load_before = _load_average()
    started = time.perf_counter()
    for model in models:
        try:
            rows += benchmark_model(model, chosen, args)
        except StepFailed as exc:  # eager itself failed: no row of this model can be completed
            error = str(exc).partition("\n")[0]
            print(f"[bench] {model}: eager FAILED: {error}", file=sys.stderr, flush=True)
            rows += [{"model": model, "target": t, "precision": p, "error": f"eager: {error}"} for t, p in chosen]
    elapsed = time.perf_counter() - started
    load_after = _load_average()

    host = host_info()
    found = versions("onnxruntime", "openvino")
    print(f"CPU: {host['cpu']} ({host['cores']} logical cores; {', '.join(host['cpu_flags']) or 'no notable flags'})")
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    print(
        f"Settings: precision {args.precision}; {args.threads} threads for torch, ONNX Runtime, OpenVINO and LiteRT; "
        f"latency = median of {args.repeat} runs after {args.warmup} warm-up (eager: {2 * args.repeat}), "
        f"a batch re-run (up to {BATCHES} times) while disturbed (median > {NOISY}x fastest); "
        f"every step in a fresh process; took {elapsed:.0f}s; load average {load_before} before, {load_after} after"
    )
    if skipped:
        print("Skipped targets: " + "; ".join(skipped))
    print()
    print(markdown_table(rows))
    print()
    print(
        "export s: wall time of the whole export_targets call; capture/build/validate s: its stages. peak RSS: "
        "VmHWM of the exporting process (Python and library imports included). size: artifact files without "
        "parity samples. speed-up: eager ms / artifact ms on the example inputs (>1: the artifact is faster)."
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
