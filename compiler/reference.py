"""The reference a parity gate compares against: PyTorch eager (or the program of a `.pt2`, or ONNX Runtime on an
`.onnx` source), and the parity input sets with the reference's outputs on each."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from compiler.errors import UsageError
from compiler.parity import Feeds, ParitySamples, make_inputs, read_inputs_file

if TYPE_CHECKING:
    from compiler.capture import CapturedModel
    from compiler.options import ExportOptions
    from compiler.sources import ModelSource
    from compiler.types import TensorSpec


def reference_runner(
    source: ModelSource, inputs: list[TensorSpec], outputs: list[TensorSpec], threads: int | None = None
) -> Callable[[Feeds], Feeds]:
    """A function from named numpy inputs to the reference model's named numpy outputs, for a model with this
    input and output signature (`threads`: ONNX Runtime's thread count for an ONNX source; torch's is the
    caller's)."""
    if source.kind == "onnx":
        from targets import onnx_reference_runner

        assert source.onnx_path is not None
        return onnx_reference_runner(source.onnx_path, threads)
    module = source.module
    assert module is not None
    names = [s.name for s in outputs]

    def run(feeds: Feeds) -> Feeds:
        with torch.no_grad():
            result = module(*[torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in inputs])
        leaves = torch.utils._pytree.tree_leaves(result)
        return {name: leaf.detach().cpu().numpy() for name, leaf in zip(names, leaves)}

    return run


def shape_points(
    model: CapturedModel, examples: list[np.ndarray], buckets: dict[str, tuple[int, ...]]
) -> tuple[list[int], list[tuple[str, list[np.ndarray]]]]:
    """The shapes parity checks besides the example's: for `--dynamic-batch`, batches at a random size, MIN and
    MAX (the example's batch is the OPT); for `--dynamic`, every symbol at MIN, OPT, MAX and a random size
    (seeded), then at each `--buckets` size. Returned as batch sizes (for the batch shorthand) and templates
    (origin, the examples resized to the point's shape)."""
    dynamic = model.dynamic
    if dynamic is None:
        return [], []
    names = [s.name for s in model.inputs]
    points = dynamic.points(dict(zip(names, [a.shape for a in examples])))
    batch = dynamic.batch
    if batch is not None and not buckets:
        by_label = dict(points)
        return [by_label["random"][batch.symbol], batch.minimum, batch.maximum], []
    chosen = [(f"dynamic {label}: ", sizes) for label, sizes in points]
    for symbol, values in buckets.items():
        rest = {d.symbol: d.opt or d.minimum for d in dynamic.dims}
        chosen += [("bucket ", {**rest, symbol: value}) for value in values]
    shaped = []
    for prefix, sizes in chosen:
        label = prefix + ", ".join(f"{symbol}={size}" for symbol, size in sizes.items())
        shaped.append((label, dynamic.resized(names, examples, sizes)))
    return [], shaped


def reference_samples(source: ModelSource, model: CapturedModel, options: ExportOptions) -> ParitySamples:
    """Parity input sets and the reference model's outputs on each."""
    if options.samples < 1:
        raise UsageError(f"--samples {options.samples}: need at least 1", "use the default of 4")
    examples = [t.detach().cpu().numpy() for t in source.example_inputs]
    if len(examples) != len(model.inputs):
        raise UsageError(
            f"the ONNX graph has {len(model.inputs)} inputs but the model takes {len(examples)}",
            "remove unused inputs from forward()",
        )
    user_sets = [(f"user:{Path(p).name}", read_inputs_file(Path(p), model.inputs)) for p in options.inputs_files]
    batches, shaped = shape_points(model, examples, options.buckets)
    inputs, origins = make_inputs(examples, model.inputs, options.samples, batches, user_sets, shaped=shaped)
    reference = reference_runner(source, model.inputs, model.outputs)
    return ParitySamples(inputs, origins, [reference(feeds) for feeds in inputs])
