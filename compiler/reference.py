"""The reference a parity gate compares against: PyTorch eager (or the program of a `.pt2`, or ONNX Runtime on an
`.onnx` source), and the parity input sets with the reference's outputs on each."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from compiler.errors import UsageError
from compiler.parity import QUANTIZED_SAMPLES, Feeds, ParitySamples, make_inputs, read_inputs_file

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


def reference_samples(
    source: ModelSource,
    model: CapturedModel,
    options: ExportOptions,
    quantized: bool = False,
    held_back: list[Feeds] | None = None,
) -> ParitySamples:
    """Parity input sets and the reference model's outputs on each.

    `quantized`: add sets up to QUANTIZED_SAMPLES (besides batch-range and user ones) after the others, for the
    quantized precisions only (ParitySamples.for_precision): first `held_back` (calibration rows never calibrated
    on), then random ones.
    """
    if options.samples < 1:
        raise UsageError(f"--samples {options.samples}: need at least 1", "use the default of 4")
    examples = [t.detach().cpu().numpy() for t in source.example_inputs]
    if len(examples) != len(model.inputs):
        raise UsageError(
            f"the ONNX graph has {len(model.inputs)} inputs but the model takes {len(examples)}",
            "remove unused inputs from forward()",
        )
    batch = model.dynamic_batch
    user_sets = [(f"user:{Path(p).name}", read_inputs_file(Path(p), model.inputs)) for p in options.inputs_files]
    missing = max(QUANTIZED_SAMPLES - options.samples, 0) if quantized else 0
    held = (held_back or [])[:missing]
    inputs, origins = make_inputs(
        examples,
        model.inputs,
        options.samples,
        [batch.minimum, batch.maximum] if batch else [],
        user_sets,
        extra=missing - len(held),
    )
    base = len(inputs) - (missing - len(held))
    inputs += held
    origins += [f"calib held-back#{i}" for i in range(len(held))]
    reference = reference_runner(source, model.inputs, model.outputs)
    return ParitySamples(inputs, origins, [reference(feeds) for feeds in inputs], base if missing else None)
