#!/usr/bin/env python3
"""`kiln tune`'s fp32 pick against the peers' defaults, timed together in one process.

Run by hand::

    .venv/bin/python benchmarks/bench_tune.py
    .venv/bin/python benchmarks/bench_tune.py --models resnet18 --threads 2 --rounds 5

For each model (`resnet18`: ResNet-18-like, random weights, 1x3x224x224; `bert4`: a 4-layer BERT-like encoder at
2x128 tokens; or any zoo model), `kiln tune` runs over --targets at fp32 (its builds, parity gate and timing, in
--work/MODEL), then its winner (OUT/best, loaded as its manifest says, runtime settings included) and the peers'
defaults are timed in the same process in interleaved rounds with --threads threads:

* `torch.onnx.export` (its default exporter) + ONNX Runtime (default session options),
* `openvino.convert_model` compiled with the CPU's default inference precision, and with f32 pinned,
* `litert_torch.convert` (its own interpreter and thread default: it exposes no thread setting).

Each row: the median over rounds of the round medians, the worst cosine against PyTorch eager on the example,
and peer / Kiln (>1: Kiln's pick is faster). A peer that fails is printed with its error.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

Run = Callable[[], Any]


def _source(name: str) -> str:
    from benchmarks.models import MODELS

    return f"{ROOT / 'benchmarks' / 'models.py'}:{name}" if name in MODELS else f"zoo:{name}"


def _module(name: str) -> tuple[Any, tuple[Any, ...]]:
    from benchmarks.models import MODELS
    from compiler.zoo import ZOO

    return (MODELS.get(name) or ZOO[name])()


def _cosine(a: Any, b: Any) -> float:
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-30))


def _first(outputs: Any) -> Any:
    if isinstance(outputs, dict):
        return next(iter(outputs.values()))
    if isinstance(outputs, (list, tuple)):
        return outputs[0]
    return outputs


def peers(module: Any, inputs: tuple[Any, ...], threads: int, work: Path) -> dict[str, Run | str]:
    """The peers' defaults as no-argument runs on the example (or the error that stopped one)."""
    import torch

    feeds = [t.numpy() for t in inputs]
    found: dict[str, Run | str] = {}
    try:
        import onnxruntime as ort

        path = work / "peer.onnx"
        torch.onnx.export(module, inputs, str(path))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        found["torch.onnx.export + ORT"] = lambda: session.run(None, dict(zip(names, feeds)))[0]
    except Exception as error:
        found["torch.onnx.export + ORT"] = f"{type(error).__name__}: {str(error)[:150]}"
    try:
        import openvino as ov

        converted = ov.convert_model(module, example_input=inputs)
        for label, config in (("default", {}), ("f32", {"INFERENCE_PRECISION_HINT": "f32"})):
            compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_NUM_THREADS": threads, **config})
            request = compiled.create_infer_request()
            found[f"openvino.convert_model ({label})"] = lambda request=request, compiled=compiled: request.infer(
                feeds
            )[compiled.outputs[0]].copy()
    except Exception as error:
        found["openvino.convert_model"] = f"{type(error).__name__}: {str(error)[:150]}"
    try:
        import litert_torch

        edge = litert_torch.convert(module, inputs)
        found["litert_torch.convert"] = lambda: edge(*inputs)
    except Exception as error:
        found["litert_torch.convert"] = f"{type(error).__name__}: {str(error)[:150]}"
    return found


def kiln_pick(best: Path, threads: int) -> Run:
    """The published winner, loaded as its manifest says (its runtime settings included)."""
    from compiler import load
    from compiler.benchmark import bench_feeds
    from compiler.timing import runner_with_threads

    loaded = load(best)
    runner, _ = runner_with_threads(loaded, threads)
    feeds = bench_feeds(best, loaded.manifest, None, artifact_layout=True)
    return lambda: _first(runner.run(feeds))


def interleaved(runs: dict[str, Run], rounds: int, count: int) -> dict[str, float]:
    """Median over `rounds` of each run's median of `count` runs, the order rotating every round."""
    names = list(runs)
    medians: dict[str, list[float]] = {n: [] for n in names}
    for name in names:
        runs[name]()  # warm-up
    for index in range(rounds):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            times = []
            for _ in range(count):
                started = time.perf_counter()
                runs[name]()
                times.append((time.perf_counter() - started) * 1000)
            medians[name].append(statistics.median(times))
    return {n: statistics.median(m) for n, m in medians.items()}


def bench_model(name: str, args: argparse.Namespace) -> list[str]:
    """Tune `name`, time its pick against the peers; the table's lines."""
    import torch

    from compiler.progress import Progress
    from compiler.tune import TuneOptions, run_tune

    torch.set_num_threads(args.threads)
    out = Path(args.work) / name
    options = TuneOptions(targets=tuple(args.targets.split(",")), precisions=("fp32",), threads=(args.threads,),
                          plain=not args.no_plain, rounds=3, runs=5, warmup=2)  # fmt: skip
    board = run_tune(_source(name), out, options, Progress(quiet=True))
    if board["winner"] is None:
        return [f"{name}: no winner ({board['why']})"]
    module, inputs = _module(name)
    with torch.no_grad():
        reference = _first(module(*inputs)).numpy()
    runs: dict[str, Run] = {f"kiln tune: {board['winner']['name']}": kiln_pick(out / "best", args.threads)}
    failures = []
    for label, run in peers(module, inputs, args.threads, out).items():
        if isinstance(run, str):
            failures.append(f"  {label}: failed: {run}")
        else:
            runs[label] = run
    with torch.no_grad():
        times = interleaved(runs, args.rounds, args.runs)
    kiln_ms = next(iter(times.values()))
    lines = []
    for label, ms in times.items():
        cosine = _cosine(runs[label](), reference)
        lines.append(f"{name:<10}{label:<52}{ms:>9.3f}{cosine:>11.6f}{ms / kiln_ms:>8.2f}x")
    fastest_peer = min((ms for label, ms in times.items() if not label.startswith("kiln")), default=None)
    if fastest_peer is not None:
        lines.append(f"{name:<10}{'fastest peer / kiln pick':<52}{'':>20}{fastest_peer / kiln_ms:>8.2f}x")
    return lines + failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet18,bert4")
    parser.add_argument("--targets", default="onnx,openvino,tflite")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--work", default="/tmp/kiln-bench-tune")
    parser.add_argument("--no-plain", action="store_true", help="leave tune's plain -O0 candidates out (faster)")
    args = parser.parse_args()
    from compiler.progress import quiet_libraries

    quiet_libraries()
    print(f"{'model':<10}{'candidate':<52}{'p50 ms':>9}{'cosine':>11}{'vs kiln':>9}")
    for name in args.models.split(","):
        for line in bench_model(name.strip(), args):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
