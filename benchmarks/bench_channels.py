#!/usr/bin/env python3
"""The per-channel parity figures (issue 23, point 6): for each model, precision and target, the whole output's
cosine and SNR, the worst channel's (kiln.compiler.metrics.ChannelSums: axis, index, cosine and SNR about the channel's
own mean), the gate's verdict and, for detectors, how often the artifact's argmax class agrees with PyTorch's.

Run by hand (tens of minutes for everything on two cores; each export runs in this process)::

    .venv/bin/python benchmarks/bench_channels.py
    .venv/bin/python benchmarks/bench_channels.py --models scaled:yolo_head,zoo:detector --precisions int8
    .venv/bin/python benchmarks/bench_channels.py --json channels.json

The figures set the worst channel's thresholds in compiler/types.py (DEFAULT_TOLERANCES): good artifacts of every
zoo model must clear them at every precision, the planted scale cases (tests/models/scaled.py) must not. Nothing
is hard-coded: every figure is measured in the run that prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SCALED = ROOT / "tests" / "models" / "scaled.py"
MODELS = [f"zoo:{name}" for name in ("cnn", "mobilenet", "transformer", "lstm", "decoder", "unet", "detector")]
MODELS += ["zoo:multimodal", "scaled:outlier_logits", "scaled:outlier_output", "scaled:yolo_head", "scaled:mid_outlier"]
TARGETS = {  # the targets that build each precision here
    "fp32": "onnx,openvino,tflite,tpu",
    "fp16": "onnx,openvino,tflite",
    "bf16": "openvino,tpu",
    "int8": "onnx,openvino,tflite,edgetpu",
    "int8-dynamic": "onnx,openvino,tflite",
}


def _yolo_classes(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """[anchors] argmax class of a [1, 4 + classes, anchors] YOLO-style output."""
    (output,) = outputs.values()
    return np.argmax(output[:, 4:, :], axis=1).ravel()


def _detector_classes(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """[anchors] argmax class of zoo:detector's scores, [1, anchors, classes] (its second output)."""
    return np.argmax(list(outputs.values())[1], axis=-1).ravel()


CLASSES: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]] = {
    "scaled:yolo_head": _yolo_classes,
    "zoo:detector": _detector_classes,
}


@dataclass
class Row:
    """One output of one artifact."""

    model: str
    precision: str
    target: str
    output: str
    passed: bool
    cosine: float
    snr_db: float
    channel: str  # "axis A #I", or "" (no channel axis)
    channel_cosine: float
    channel_snr_db: float
    class_agreement: float | None = None
    reason: str = ""


def source(model: str) -> str:
    return f"{SCALED}:{model.split(':', 1)[1]}" if model.startswith("scaled:") else model


def class_agreement(directory: Path, classes: Callable[[dict[str, np.ndarray]], np.ndarray]) -> float | None:
    """The fraction of anchors whose argmax class the artifact shares with PyTorch, on the stored parity sets."""
    from kiln.compiler.export.artifacts import Artifact, load_runner
    from kiln.compiler.parity.gate import ParitySamples, in_reference_layout

    artifact = Artifact.read(directory)
    samples = ParitySamples.load(directory, [])
    if samples is None:
        return None
    runner = load_runner(artifact)
    run = in_reference_layout(runner.run, artifact.manifest.inputs, artifact.manifest.outputs)
    agree = total = 0
    for feeds, reference in zip(samples.inputs, samples.reference):
        got, want = classes(run(feeds)), classes(reference)
        agree, total = agree + int(np.count_nonzero(got == want)), total + want.size
    return agree / total if total else None


def measure(model: str, precision: str, targets: str, work: Path) -> list[Row]:
    from kiln.compiler.export.options import export_options
    from kiln.compiler.export.pipeline import export_targets
    from kiln.compiler.progress import Progress

    options = export_options(precision=precision, localize=False, force=True)
    out = work / f"{model.replace(':', '-')}-{precision}"
    with contextlib.redirect_stderr(io.StringIO()):
        results = export_targets(source(model), targets, out, options, progress=Progress(quiet=True))
    rows = []
    for result in results:
        if result.parity is None:
            failure = result.failure.message if result.failure else "no parity report"
            rows.append(Row(model, precision, result.target, "-", False, math.nan, math.nan, "", math.nan, math.nan))
            rows[-1].reason = failure[:160]
            continue
        agreement = class_agreement(result.directory, CLASSES[model]) if model in CLASSES else None
        for o in result.parity.outputs:
            if o.kind != "float":
                continue
            channel = f"axis {o.channel_axis} #{o.channel_index}" if o.channel_axis is not None else ""
            figures = (o.min_cosine, o.snr_db, channel, o.channel_cosine, o.channel_snr_db, agreement, o.reason)
            rows.append(Row(model, precision, result.target, o.name, o.passed, *figures))
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| model | precision | target | output | gate | cosine | SNR dB | worst channel | ch. cosine | ch. SNR dB | "
        "class argmax | why it fails |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        agreement = f"{r.class_agreement:.1%}" if r.class_agreement is not None else ""
        lines.append(
            f"| {r.model} | {r.precision} | {r.target} | {r.output} | {'pass' if r.passed else 'FAIL'} | "
            f"{r.cosine:.6f} | {r.snr_db:.1f} | {r.channel} | {r.channel_cosine:.4f} | {r.channel_snr_db:.1f} | "
            f"{agreement} | {r.reason[:90]} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--precisions", default=",".join(TARGETS))
    parser.add_argument("--targets", default=None, help="only these targets (default: every one that builds it)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for precision in args.precisions.split(","):
                wanted = [t for t in TARGETS[precision].split(",") if not args.targets or t in args.targets.split(",")]
                if wanted:
                    measured = measure(model, precision, ",".join(wanted), Path(tmp))
                    print("\n".join(table(measured).splitlines()[2:]), flush=True)
                    rows += measured
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
