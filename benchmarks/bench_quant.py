#!/usr/bin/env python3
"""int8 on the CPU: Kiln's ONNX Runtime and OpenVINO int8 against PyTorch eager fp32, and against the
runtimes' own quantizers called with their defaults on the same calibration data.

Run by hand::

    .venv/bin/python benchmarks/bench_quant.py
    .venv/bin/python benchmarks/bench_quant.py --models resnet18,digits --repeat 50 --json quant.json

For each model, in one process with `--threads` threads for every runtime:

* `eager fp32`: the PyTorch module (torch.no_grad);
* `kiln onnx int8`, `kiln openvino int8`: `kiln.export(..., precision="int8", calib=FILE.npz)`, i.e. the
  whole pipeline (passes, calibration spec defaults, parity gate);
* `ort quantize_static defaults`: `onnxruntime.quantization.quantize_static(fp32.onnx, out, reader)` with
  nothing else set, on Kiln's fp32 ONNX export and the same calibration rows;
* `nncf defaults`: `nncf.quantize(core.read_model(fp32.onnx), nncf.Dataset(rows))`, same rows;
* `kiln onnx fp32`, `kiln openvino fp32` for reference.

Figures: median latency (ms) of `--repeat` runs after warm-up; speed-up = eager ms / variant ms; top-1
agreement with eager fp32 on `--agreement` random inputs (normal, like the example input); for `digits`
(a small CNN trained on scikit-learn's digits, calibrated on its training images) the held-out accuracy and
its drop from fp32 in points. OpenVINO variants run with INFERENCE_PRECISION_HINT f32 (the int8 parts run
in int8 either way; the hint keeps the float parts in f32 on CPUs that have bf16), so every CPU compares the
same thing. Nothing is hard-coded: every figure comes from the run that prints it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kiln.compiler.perf.timing import least_disturbed  # noqa: E402

Feeds = dict[str, np.ndarray]
Predict = Callable[[Feeds], np.ndarray]  # feeds -> the first output


@dataclass
class Row:
    """One variant of one model."""

    model: str
    variant: str
    ms: float | None = None
    speedup: float | None = None
    top1_agreement: float | None = None
    accuracy: float | None = None
    accuracy_drop_points: float | None = None
    noisy: bool = False
    error: str | None = None


def model_and_data(name: str, calib_count: int, agreement: int) -> tuple[Any, np.ndarray, np.ndarray, Any]:
    """The module, its calibration rows, its agreement inputs, and (digits only) held-out images and labels."""
    rng = np.random.default_rng(0)
    if name == "digits":
        from tests.models.digits import trained_digits_cnn

        module, train_x, _, test_x, test_y = trained_digits_cnn()
        return module, train_x[:calib_count], test_x[:agreement], (test_x, test_y)
    if name in ("resnet18", "bert4"):
        from benchmarks.models import MODELS

        module, (example,) = MODELS[name]()
    else:
        from kiln.compiler.capture import zoo

        module, (example,) = getattr(zoo, name)()
    example = example.numpy()
    shape = (calib_count, *example.shape[1:])
    if example.dtype.kind in "iu":
        high = int(example.max()) + 1
        calib = rng.integers(0, high, shape).astype(example.dtype)
        probe = rng.integers(0, high, (agreement, *example.shape[1:])).astype(example.dtype)
    else:
        calib = rng.standard_normal(shape).astype(np.float32)
        probe = rng.standard_normal((agreement, *example.shape[1:])).astype(np.float32)
    return module, calib, probe, None


def eager_predict(module: Any) -> Predict:
    import torch

    def predict(feeds: Feeds) -> np.ndarray:
        with torch.no_grad():
            return module(*[torch.from_numpy(v) for v in feeds.values()]).numpy()

    return predict


def kiln_predict(directory: Path, threads: int) -> Predict:
    from kiln import load
    from kiln.compiler.perf.timing import runner_with_threads

    loaded = load(directory)
    runner, _ = runner_with_threads(loaded, threads)
    first = loaded.manifest.outputs[0].name
    return lambda feeds: runner.run(feeds)[first]


def ort_predict(path: Path, threads: int) -> Predict:
    from kiln.targets.onnxrt import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(path, threads=threads)
    return lambda feeds: next(iter(runner.run(feeds).values()))


def openvino_predict(model: Any, threads: int) -> Predict:
    import openvino as ov

    compiled = ov.Core().compile_model(
        model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    )
    request = compiled.create_infer_request()
    return lambda feeds: request.infer(list(feeds.values()))[compiled.outputs[0]].copy()


def ort_defaults(fp32: Path, destination: Path, name: str, rows: np.ndarray) -> Path:
    """`quantize_static` with its defaults on the same calibration rows."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(rows)

        def get_next(self) -> dict[str, np.ndarray] | None:
            row = next(self.rows, None)
            return None if row is None else {name: row[None]}

    quantize_static(str(fp32), str(destination), Reader())
    return destination


def nncf_defaults(fp32: Path, name: str, rows: np.ndarray) -> Any:
    """`nncf.quantize` with its defaults on the same calibration rows."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32))
    return nncf.quantize(model, nncf.Dataset([{name: row[None]} for row in rows]), subset_size=len(rows))


def measure(model: str, variant: str, predict: Predict, args: argparse.Namespace, context: dict[str, Any]) -> Row:
    """Latency, agreement with eager fp32 and (digits) accuracy of one variant."""
    name, probe = context["input"], context["probe"]
    example = {name: probe[:1]}
    latency = least_disturbed(lambda: predict(example), args.repeat, args.warmup)
    labels = np.array([int(np.argmax(predict({name: row[None]}))) for row in probe])
    row = Row(model, variant, round(latency.median_ms, 3), noisy=latency.noisy)
    if "eager_labels" not in context:
        context["eager_labels"], context["eager_ms"] = labels, latency.median_ms
    row.speedup = round(context["eager_ms"] / latency.median_ms, 2)
    row.top1_agreement = round(float(np.mean(labels == context["eager_labels"])), 4)
    if context["held_out"] is not None:
        images, truth = context["held_out"]
        correct = np.mean([int(np.argmax(predict({name: x[None]}))) == y for x, y in zip(images, truth)])
        row.accuracy = round(float(correct), 4)
        context.setdefault("eager_accuracy", row.accuracy)
        row.accuracy_drop_points = round(100 * (context["eager_accuracy"] - row.accuracy), 2)
    return row


def bench_model(model: str, args: argparse.Namespace, work: Path) -> list[Row]:
    """Every variant of one model."""
    import torch
    from kiln import export

    module, calib, probe, held_out = model_and_data(model, args.calib_samples, args.agreement)
    name = "arg0"
    calib_file = work / f"{model}-calib.npz"
    np.savez(calib_file, **{name: calib})
    example = (torch.from_numpy(probe[:1]),)
    context: dict[str, Any] = {"probe": probe, "held_out": held_out}
    rows = []

    def attempt(variant: str, make: Callable[[], Predict]) -> None:
        started = time.perf_counter()
        try:
            predict = make()
            rows.append(measure(model, variant, predict, args, context))
        except Exception as exc:
            rows.append(Row(model, variant, error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"))
        print(f"  {model:<10} {variant:<30} {time.perf_counter() - started:6.1f}s", file=sys.stderr)

    def kiln(target: str, precision: str) -> Predict:
        out = work / f"{model}-{target}-{precision}"
        calib_args = {"calib": calib_file, "calib_samples": len(calib)} if precision == "int8" else {}
        export(module, example, target=target, out=out, precision=precision, force=True, **calib_args)
        return kiln_predict(out, args.threads)

    context["input"] = next(iter(inspect.signature(module.forward).parameters))  # Kiln names inputs so
    attempt("eager fp32", lambda: eager_predict(module))
    for target in ("onnx", "openvino"):
        attempt(f"kiln {target} fp32", lambda t=target: kiln(t, "fp32"))
        attempt(f"kiln {target} int8", lambda t=target: kiln(t, "int8"))
    fp32 = work / f"{model}-onnx-fp32" / "model.onnx"
    input_name = context["input"]
    attempt(
        "ort quantize_static defaults",
        lambda: ort_predict(ort_defaults(fp32, work / f"{model}-ort-defaults.onnx", input_name, calib), args.threads),
    )
    attempt("nncf defaults", lambda: openvino_predict(nncf_defaults(fp32, input_name, calib), args.threads))
    return rows


def markdown(rows: list[Row]) -> str:
    """The results as a markdown table."""
    lines = [
        "| model | variant | ms | speed-up vs eager | top-1 agreement | accuracy | drop (points) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.error:
            lines.append(f"| {row.model} | {row.variant} | failed: {row.error} | | | | |")
            continue
        noisy = " *" if row.noisy else ""
        lines.append(
            f"| {row.model} | {row.variant} | {row.ms:.2f}{noisy} | {row.speedup:.2f}x | "
            f"{100 * (row.top1_agreement or 0):.1f}% | "
            f"{'' if row.accuracy is None else f'{100 * row.accuracy:.2f}%'} | "
            f"{'' if row.accuracy_drop_points is None else f'{row.accuracy_drop_points:+.2f}'} |"
        )
    if any(r.noisy for r in rows):
        lines.append("\n\\* disturbed by other processes (median over 1.5x the fastest run)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,cnn,mobilenet,digits", help="comma list (zoo names too)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--calib-samples", type=int, default=100)
    parser.add_argument("--agreement", type=int, default=200, help="random inputs for top-1 agreement")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()

    import torch
    from kiln.compiler.progress import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(args.threads)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-quant-") as work:
        for model in args.models.split(","):
            rows += bench_model(model.strip(), args, Path(work))
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
