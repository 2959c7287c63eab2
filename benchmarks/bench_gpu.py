#!/usr/bin/env python3
"""Parity and latency of the GPU targets against PyTorch eager on the GPU. Run it on a machine with a CUDA GPU::

    .venv/bin/python benchmarks/bench_gpu.py                    # every zoo model: cuda, and tensorrt if importable
    .venv/bin/python benchmarks/bench_gpu.py --models cnn,lstm --targets cuda --precision fp16 --json gpu.json

For each zoo model: eager is the module moved to the GPU, run on the example inputs moved to the GPU (no
autograd, fp32 without TF32, the precision the exports are validated at). Each target is exported with
`export_targets` (parity validated on the GPU; the worst max-abs error is taken from its manifest), then
timed on the same GPU-resident inputs: the AOTInductor package called directly, the TensorRT engine run on
buffers bound once. Each timing: `--warmup` untimed calls, then `--repeat` calls each followed by
`torch.cuda.synchronize()`; median and p90 in ms. Speed-up = eager median / artifact median. Nothing is
hard-coded: every figure is measured by the run that prints it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
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


def time_ms(fn: Callable[[], Any], repeat: int, warmup: int) -> list[float]:
    """Milliseconds of each of `repeat` synchronized calls of `fn`, after `warmup` untimed ones."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        started = time.perf_counter_ns()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter_ns() - started) / 1e6)
    return times


def artifact_call(directory: Path, target: str, feeds: dict[str, Any]) -> Callable[[], Any]:
    """A function running the exported artifact once on GPU-resident copies of `feeds`."""
    import torch
    from kiln.compiler.types import Manifest
    from kiln.targets import get_target

    manifest = Manifest.read(directory)
    runner = get_target(target).load(directory, manifest)
    if target == "tensorrt":
        runner.bind(feeds)
        return runner.execute
    args = [torch.from_numpy(feeds[s.name]).cuda() for s in manifest.inputs]
    return lambda: runner.compiled(*args)


def bench_model(model: str, targets: list[str], precision: str, repeat: int, warmup: int, out: Path) -> list[dict]:
    """Rows for one zoo model: eager, then each target (parity and latency)."""
    import torch
    from kiln.compiler.capture.zoo import ZOO
    from kiln.compiler.export.options import ExportOptions
    from kiln.compiler.export.pipeline import export_targets

    module, inputs = ZOO[model]()
    module = module.cuda().eval()
    cuda_inputs = [t.cuda() for t in inputs]
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def eager() -> Any:
        with torch.no_grad():
            return module(*cuda_inputs)

    eager_times = time_ms(eager, repeat, warmup)
    rows = [{"model": model, "target": "eager (cuda)", "median_ms": statistics.median(eager_times)}]
    results = export_targets(f"zoo:{model}", ",".join(targets), out / model, ExportOptions(precision=precision))
    for result in results:
        feeds = {s.name: t.numpy() for s, t in zip(result.manifest.inputs, inputs)}
        times = time_ms(artifact_call(result.directory, result.target, feeds), repeat, warmup)
        parity = result.parity
        rows.append(
            {
                "model": model,
                "target": result.target,
                "precision": precision,
                "published": result.published,
                "parity": "passed" if parity and parity.passed else "FAILED",
                "max_abs_error": max(o.max_abs_error for o in parity.outputs) if parity else None,
                "median_ms": statistics.median(times),
                "p90_ms": statistics.quantiles(times, n=10)[-1],
                "speedup_vs_eager": statistics.median(eager_times) / statistics.median(times),
                "build_s": result.manifest.timings.get(f"build {result.target}"),
            }
        )
    return rows


def main() -> int:
    """Run the benchmark and print a table (and JSON with --json)."""
    import torch
    from kiln.compiler.capture.zoo import ZOO

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ZOO), help="comma list of zoo models (default: all)")
    default_targets = "cuda,tensorrt" if importlib.util.find_spec("tensorrt") else "cuda"
    parser.add_argument("--targets", default=default_targets, help=f"default: {default_targets}")
    parser.add_argument("--precision", default="fp32", help="fp32 (default) or fp16")
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 3
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-gpu-") as out:
        for model in args.models.split(","):
            rows += bench_model(model, args.targets.split(","), args.precision, args.repeat, args.warmup, Path(out))
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.repeat} timed runs each")
    print(f"{'model':<12} {'target':<14} {'parity':<8} {'max_abs':>10} {'median ms':>10} {'p90 ms':>8} {'speed-up':>9}")
    for row in rows:
        error = f"{row['max_abs_error']:.2e}" if row.get("max_abs_error") is not None else "-"
        speedup = f"{row['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in row else "-"
        p90 = f"{row['p90_ms']:.3f}" if "p90_ms" in row else "-"
        print(
            f"{row['model']:<12} {row['target']:<14} {row.get('parity', '-'):<8} {error:>10} "
            f"{row['median_ms']:>10.3f} {p90:>8} {speedup:>9}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
