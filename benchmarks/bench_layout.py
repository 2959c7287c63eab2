#!/usr/bin/env python3
"""What `--io nhwc` costs on the CPU runtimes: NCHW vs NHWC I/O, latency and the transposes/reorders left.

Run by hand::

    .venv/bin/python benchmarks/bench_layout.py                 # zoo cnn and a 224x224 ResNet-18-like net
    .venv/bin/python benchmarks/bench_layout.py --repeat 50 --json layout.json

For each model the ONNX graph is captured once (as an export does), then these variants are built and timed
on the same input (`--threads` threads, median of `--repeat` runs after warm-up, the least disturbed of up to
3 batches, see compiler/perf/timing.py):

* `ort nchw`: ONNX Runtime on the captured graph; `ort nhwc`: on Kiln's NHWC graph
(`kiln.passes.channels_last.to_nhwc`);
* `ov nchw`: OpenVINO IR of the captured graph; `ov nhwc ppp`: the same IR with OpenVINO's PrePostProcessor
  (tensor layout NHWC, model layout NCHW), what the `openvino` target builds; `ov nhwc onnx`: the IR
  converted from Kiln's NHWC ONNX graph.

Columns: Transpose ops in the graph (ONNX or IR), Transpose and Reorder nodes of the OpenVINO CPU plugin's
runtime graph (what it executes, after its own layout choices; "fake" reorders only relabel a buffer already
in the layout wanted: the plugin's convolutions run channels-last inside, so an NHWC input needs no real
reorder while an NCHW one does), and the latency ratio to the NCHW variant of
the same runtime (>1: NHWC is slower). Every figure comes from the run that prints it; the machine is shared,
so small differences (a few percent) are noise.
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

from kiln.compiler.perf.timing import least_disturbed  # noqa: E402


def resnet_like() -> tuple[Any, tuple[Any, ...]]:
    """A ResNet-18-shaped classifier (random weights) on one 224x224 image."""
    import torch
    from torch import nn

    def block(cin: int, cout: int, stride: int) -> nn.Module:
        class Basic(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.body = nn.Sequential(
                    nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(),
                    nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                    nn.BatchNorm2d(cout),
                )
                self.skip = (
                    nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                    if stride != 1 or cin != cout
                    else nn.Identity()
                )

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return torch.relu(self.body(x) + self.skip(x))

        return Basic()

    stem = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    layers: list[nn.Module] = stem
    channels = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [block(channels, width, stride), block(width, width, 1)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)]
    torch.manual_seed(0)
    return nn.Sequential(*layers).eval(), (torch.randn(1, 3, 224, 224),)


def capture_onnx(name: str, work: Path) -> Path:
    """The model's ONNX graph as an export captures it."""
    from kiln.compiler.capture.program import capture
    from kiln.compiler.capture.sources import from_module, load_source

    source = from_module(*resnet_like()) if name == "resnet18-like" else load_source(f"zoo:{name}")
    directory = work / name
    directory.mkdir()
    path = capture(source, None, directory).onnx_path
    assert path is not None
    return path


def ov_counts(model: Any, compiled: Any) -> dict[str, int]:
    """Transpose ops of the IR, and the Transpose and Reorder nodes the CPU plugin executes ("fake" reorders,
    which only relabel a buffer that is already in the wanted layout, apart)."""
    executed = [
        (op.get_friendly_name(), op.get_rt_info()["layerType"].astype(str))
        for op in compiled.get_runtime_model().get_ordered_ops()
    ]
    reorders = [name for name, kind in executed if kind == "Reorder"]
    fake = sum(name.endswith("_fake") for name in reorders)
    return {
        "graph_transposes": sum(op.get_type_name() == "Transpose" for op in model.get_ordered_ops()),
        "runtime_transposes": sum(kind == "Transpose" for _, kind in executed),
        "runtime_reorders": len(reorders) - fake,
        "fake_reorders": fake,
    }


def measure(name: str, work: Path, threads: int, repeat: int) -> list[dict[str, Any]]:
    """Every variant of one model: counts and latency."""
    import numpy as np
    import onnx_ir
    import openvino as ov
    from kiln.compiler.image_layout import NCHW_TO_NHWC
    from kiln.compiler.large_graphs import save_onnx
    from kiln.compiler.ort_session import ort_session
    from kiln.passes.channels_last import count_ops, image_values, to_nhwc
    from kiln.targets.openvino_ir import nhwc_io

    nchw_path = capture_onnx(name, work)
    graph = onnx_ir.load(str(nchw_path))
    inputs, outputs = image_values(graph)
    to_nhwc(graph)
    nhwc_path = save_onnx(graph, work / f"{name}-nhwc.onnx")
    session = ort_session(nchw_path)
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in session.get_inputs()}
    nhwc_feeds = {k: np.ascontiguousarray(v.transpose(NCHW_TO_NHWC)) if k in inputs else v for k, v in feeds.items()}

    rows: list[dict[str, Any]] = []
    for variant, path, data in (("ort nchw", nchw_path, feeds), ("ort nhwc", nhwc_path, nhwc_feeds)):
        timed = ort_session(path, threads)  # sequential execution: no inter-op threads
        latency = least_disturbed(lambda s=timed, d=data: s.run(None, d), repeat, 10)
        transposes = count_ops(onnx_ir.load(str(path)), {"Transpose"})
        rows.append({"model": name, "variant": variant, "graph_transposes": transposes, "ms": latency.median_ms})

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"}
    ppp = nhwc_io(core.read_model(str(nchw_path)), inputs, outputs)
    variants = (
        ("ov nchw", core.read_model(str(nchw_path)), feeds),
        ("ov nhwc ppp", ppp, nhwc_feeds),
        ("ov nhwc onnx", core.read_model(str(nhwc_path)), nhwc_feeds),
    )
    for variant, model, data in variants:
        compiled = core.compile_model(model, "CPU", config)
        request = compiled.create_infer_request()
        latency = least_disturbed(lambda r=request, d=data: r.infer(d), repeat, 10)
        rows.append({"model": name, "variant": variant, **ov_counts(model, compiled), "ms": latency.median_ms})
    for row in rows:
        runtime = row["variant"].split()[0]
        base = next(r for r in rows if r["variant"] == f"{runtime} nchw")
        row["vs_nchw"] = round(row["ms"] / base["ms"], 3)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="cnn,resnet18-like", help="zoo names and/or resnet18-like")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    from kiln.compiler.progress import quiet_libraries

    quiet_libraries()
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-layout-") as work:
        for name in args.models.split(","):
            rows += measure(name.strip(), Path(work), args.threads, args.repeat)
    columns = ("graph T", 7), ("run T", 5), ("reorders", 8), ("fake", 4), ("ms", 8), ("vs nchw", 7)
    print(f"{'model':<14} {'variant':<13} " + " ".join(f"{title:>{width}}" for title, width in columns))
    for r in rows:
        print(
            f"{r['model']:<14} {r['variant']:<13} {r['graph_transposes']:>7} {r.get('runtime_transposes', '-'):>5} "
            f"{r.get('runtime_reorders', '-'):>8} {r.get('fake_reorders', '-'):>4} {r['ms']:>8.3f} {r['vs_nchw']:>7.3f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
