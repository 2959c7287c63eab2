#!/usr/bin/env python3
"""Export time and peak memory at real decoder sizes: `kiln export DIR --target onnx,openvino` (gate included)
against onnxruntime-genai's model builder (`python -m onnxruntime_genai.models.builder -i DIR -o OUT -p fp32 -e
cpu`, no gate), on checkpoint folders with the shapes of SmolLM-135M, TinyLlama-1.1B and Qwen2.5-3B
(`benchmarks/scale_models.py`, random weights, written once into --models-dir).

    .venv/bin/python benchmarks/bench_scale.py --sizes 135m,1.1b,3b --json scale.json
    .venv/bin/python benchmarks/bench_scale.py --sizes 3b --targets onnx --precision int4   # both at int4

`--precision int4|int8` exports Kiln's weight-only precision (its quantized gate included) and runs the builder
with `-p int4|int8`.

Each command runs under `/usr/bin/time -v` (its "Maximum resident set size" is the peak RSS reported); a watchdog
polls the command's process every 0.2 s for its anonymous memory (RssAnon: what the kernel cannot drop, unlike
the clean pages of mapped weight files) and stops it when the machine's MemAvailable falls under --spare-gb, so
that a run that would not fit is reported as such instead of starving other processes. Before a run the script
waits until MemAvailable leaves room for it (its expected peak plus --spare-gb). Kiln's per-step times are the
manifest's `timings` (the export of `onnx` alone is the shared steps plus onnx's own, read from the same run).
Every figure is measured in the run that prints it; the machine's load is printed with it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED_STEPS = ("load", "generation", "capture", "reference")
TARGET_STEPS = ("passes", "build", "validate", "generate")
GIB = 2**30


def mem_available() -> int:
    """MemAvailable of /proc/meminfo, in bytes."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def wait_for_memory(needed: int, spare: int, patience_s: float) -> None:
    """Wait until MemAvailable >= needed + spare (checking every 30 s, for at most `patience_s`)."""
    deadline = time.monotonic() + patience_s
    while mem_available() < needed + spare:
        if time.monotonic() > deadline:
            raise SystemExit(
                f"MemAvailable {mem_available() / GIB:.1f} GiB < {(needed + spare) / GIB:.1f} GiB: gave up"
            )
        print(f"  waiting for memory: {mem_available() / GIB:.1f} GiB available, need {(needed + spare) / GIB:.1f}")
        time.sleep(30)


def _status(pid: int) -> dict[str, int]:
    """RssAnon / VmRSS of a process in bytes ({} once it is gone)."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key = line.split(":", 1)[0]
                if key in ("RssAnon", "VmRSS"):
                    found[key] = int(line.split()[1]) * 1024
    except OSError:
        return {}
    return found


def _descendants(pid: int) -> list[int]:
    """The process ids under `pid` (children first), from /proc/PID/task/*/children."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    for child in children.read().split():
                        found.append(int(child))
                        pending.append(int(child))
        except OSError:
            continue
    return found


def timed_run(command: list[str], spare: int, log: Path) -> dict[str, Any]:
    """Run `command` under /usr/bin/time -v: wall seconds, peak RSS (time's), peak RssAnon (sampled), exit code,
    whether the watchdog stopped it, and its stdout."""
    started = time.monotonic()
    with open(log, "w") as errors:
        child = subprocess.Popen(["/usr/bin/time", "-v", *command], stdout=subprocess.PIPE, stderr=errors, text=True)
        peak_anon, stopped = 0, False
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.append(child.stdout.read() if child.stdout else ""))
        reader.start()
        while child.poll() is None:
            anon = sum(_status(p).get("RssAnon", 0) for p in _descendants(child.pid))
            peak_anon = max(peak_anon, anon)
            if mem_available() < spare and not stopped:
                stopped = True
                for pid in _descendants(child.pid):
                    try:
                        os.kill(pid, 9)
                    except OSError:
                        pass
            time.sleep(0.2)
        reader.join()
    text = log.read_text()
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {
        "seconds": round(time.monotonic() - started, 1),
        "peak_rss": int(peak[1]) * 1024 if peak else None,
        "peak_anon": peak_anon,
        "exit_code": child.returncode,
        "stopped_for_memory": stopped,
        "stdout": output[0] if output else "",
    }


def weight_bytes(folder: Path) -> int:
    """The bytes of a checkpoint folder's safetensors files (header included: a few KB)."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def kiln_steps(report: dict[str, Any]) -> dict[str, float]:
    """Seconds of each step of a `kiln export --json` report: the shared ones, then each target's own."""
    steps: dict[str, float] = {}
    for result in report.get("results", []):
        for name, seconds in result.get("timings", {}).items():
            steps[name] = seconds
    return steps


def onnx_only_seconds(steps: dict[str, float], overhead: float) -> float:
    """What exporting `onnx` alone took in the same run: the shared steps, onnx's own, and the process's start."""
    own = [f"{step} onnx" for step in TARGET_STEPS]
    return round(overhead + sum(steps.get(s, 0.0) for s in (*SHARED_STEPS, *own)), 1)


def run_size(size: str, args: argparse.Namespace) -> dict[str, Any]:
    """Both exports of one decoder size; the figures as a dict."""
    from benchmarks.scale_models import write_decoder_folder

    folder = args.models_dir / size
    if not (folder / "config.json").is_file():
        print(f"[{size}] writing the checkpoint folder {folder}")
        write_decoder_folder(size, folder)
    weights = weight_bytes(folder)
    spare = int(args.spare_gb * GIB)
    out = Path(tempfile.mkdtemp(prefix=f"kiln-scale-{size}-", dir=args.work_dir))
    record: dict[str, Any] = {
        "size": size,
        "precision": args.precision,
        "weights": weights,
        "load_average": os.getloadavg(),
    }
    wait_for_memory(int(1.3 * weights + 1.5 * GIB), spare, args.patience)
    print(f"[{size}] kiln export ({weights / GIB:.2f} GiB of weights)")
    kiln = timed_run(
        [sys.executable, str(ROOT / "cli.py"), "export", str(folder), "-t", args.targets, "--out", str(out / "kiln"),
         "--precision", args.precision, "--json"],
        spare,
        out / "kiln.log",
    )  # fmt: skip
    report = json.loads(kiln.pop("stdout") or "{}") if kiln["exit_code"] == 0 else {}
    steps = kiln_steps(report)
    overhead = max(0.0, kiln["seconds"] - sum(steps.values()))
    kiln |= {"steps": steps, "onnx_only_seconds": onnx_only_seconds(steps, overhead), "ok": report.get("ok")}
    kiln["peak_rss_by_stage"] = _stage_peaks(out / "kiln")
    record["kiln"] = kiln
    if not args.skip_builder:
        wait_for_memory(int(1.3 * weights + 1.5 * GIB), spare, args.patience)  # 1.28x at 1.1B
        print(f"[{size}] onnxruntime-genai builder")
        builder = timed_run(
            [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out / "genai"),
             "-p", args.precision, "-e", "cpu", "-c", str(out / "genai-cache")],
            spare,
            out / "genai.log",
        )  # fmt: skip
        builder.pop("stdout")
        record["builder"] = builder
    if not args.keep:
        subprocess.run(["rm", "-rf", str(out)], check=False)
    else:
        record["directory"] = str(out)
    return record


def _stage_peaks(export: Path) -> dict[str, int]:
    """The peak RSS when each stage ended, from the manifests (`host.peak_rss_by_stage`)."""
    peaks: dict[str, int] = {}
    for manifest in sorted(export.glob("*/manifest.json")) + sorted(export.glob("manifest.json")):
        peaks |= json.loads(manifest.read_text()).get("host", {}).get("peak_rss_by_stage", {})
    return peaks


def table(records: list[dict[str, Any]]) -> str:
    """The markdown tables: memory and time per size, then Kiln's steps."""
    lines = [
        "| model | weights | Kiln export (gate) | peak RSS | x weights | peak anon | Kiln onnx only "
        "| genai builder | builder peak RSS | Kiln onnx / builder |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        k, b = r["kiln"], r.get("builder")
        state = "" if k["exit_code"] == 0 else (" (stopped: memory)" if k["stopped_for_memory"] else " (failed)")
        builder = f"{b['seconds']:.0f} s" if b and b["exit_code"] == 0 else ("-" if not b else "failed")
        ratio = f"{k['onnx_only_seconds'] / b['seconds']:.1f}x" if b and b["exit_code"] == 0 else "-"
        lines.append(_row(r, state, builder, ratio))
    steps = sorted({s for r in records for s in r["kiln"]["steps"]}, key=_step_order)
    lines += ["", "| step | " + " | ".join(r["size"] for r in records) + " |", "|---|" + "---|" * len(records)]
    for step in steps:
        cells = [f"{r['kiln']['steps'][step]:.1f} s" if step in r["kiln"]["steps"] else "-" for r in records]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _row(r: dict[str, Any], state: str, builder: str, ratio: str) -> str:
    k, b, w = r["kiln"], r.get("builder"), r["weights"]
    builder_peak = f"{b['peak_rss'] / GIB:.2f} GiB" if b and b.get("peak_rss") else "-"
    return (
        f"| {r['size']} {r.get('precision', 'fp32')} | {w / GIB:.2f} GiB | {k['seconds']:.0f} s{state} | "
        f"{k['peak_rss'] / GIB:.2f} GiB | "
        f"{k['peak_rss'] / w:.2f} | {k['peak_anon'] / GIB:.2f} GiB | {k['onnx_only_seconds']:.0f} s | {builder} | "
        f"{builder_peak} | {ratio} |"
    )


def _step_order(step: str) -> tuple[int, str]:
    head = step.split(" ")[0]
    order = [*SHARED_STEPS, *TARGET_STEPS]
    return (order.index(head) if head in order else len(order), step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="135m,1.1b,3b")
    parser.add_argument("--targets", default="onnx,openvino")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "int8", "int4"))
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "kiln-scale-models")
    parser.add_argument("--work-dir", type=Path, default=None, help="where exports are written (default: $TMPDIR)")
    parser.add_argument("--spare-gb", type=float, default=4.0, help="memory to leave to other processes (GiB)")
    parser.add_argument("--patience", type=float, default=3600, help="seconds to wait for memory before a run")
    parser.add_argument("--skip-builder", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the exports")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    records = []
    for size in args.sizes.split(","):
        records.append(run_size(size.strip(), args))
        print(table(records))
        if args.json:
            args.json.write_text(json.dumps(records, indent=2))
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
