"""The reference a parity gate compares against: PyTorch eager (or the program of a `.pt2`, or ONNX Runtime on an
`.onnx` source), and the parity input sets with the reference's outputs on each."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from kiln.compiler.capture.inputs import read_inputs_file
from kiln.compiler.errors import UsageError
from kiln.compiler.parity.gate import QUANTIZED_SAMPLES, ParitySamples, make_inputs
from kiln.compiler.types import Feeds

if TYPE_CHECKING:
    from kiln.compiler.capture.program import CapturedModel
    from kiln.compiler.capture.sources import ModelSource
    from kiln.compiler.export.options import ExportOptions
    from kiln.compiler.types import TensorSpec


def reference_runner(
    source: ModelSource, inputs: list[TensorSpec], outputs: list[TensorSpec], threads: int | None = None
) -> Callable[[Feeds], Feeds]:
    """A function from named numpy inputs to the reference model's named numpy outputs, for a model with this
    input and output signature (`threads`: ONNX Runtime's thread count for an ONNX source; torch's is the
    caller's)."""
    if source.reference_model is not None:  # a wrapper of the user's model is never the reference
        raise UsageError(
            f"{source.description} is Kiln's wrapper of the user's model, not a reference",
            "run the user's model itself (kiln.compiler.generation.gate for text generation)",
        )
    if source.kind == "onnx":
        from kiln.targets import onnx_reference_runner

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


def check_model_inputs(model: str, given: list[TensorSpec], export: list[TensorSpec], by_name: bool = False) -> None:
    """Refuse a model whose inputs cannot be the export's: another number of inputs, another rank or kind of
    dtype (float, integer, bool) or, `by_name`, another name. One line naming the first difference."""

    def kind(dtype: str) -> str:
        return "float" if "float" in dtype else "bool" if dtype == "bool" else "integer"

    detail = f"it takes {len(given)} inputs, the export {len(export)}" if len(given) != len(export) else ""
    for position, (mine, theirs) in enumerate(zip(given, export), 1):
        if detail:
            break
        if by_name and mine.name != theirs.name:
            detail = f"its input {position} is '{mine.name}', the export's is '{theirs.name}'"
        elif len(mine.shape) != len(theirs.shape) or kind(mine.dtype) != kind(theirs.dtype):
            detail = (
                f"its input {position} is {mine.dtype} of rank {len(mine.shape)}, the export's ('{theirs.name}') "
                f"is {theirs.dtype} of rank {len(theirs.shape)}"
            )
    if detail:
        raise UsageError(
            f"{model} does not take the inputs of this export: {detail}",
            f"pass the model the export was made from (inputs: {'; '.join(s.describe() for s in export)})",
        )


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
    if options.parity.samples < 1:
        raise UsageError(f"--samples {options.parity.samples}: need at least 1", "use the default of 4")
    examples = [t.detach().cpu().numpy() for t in source.example_inputs]
    if len(examples) != len(model.inputs):
        raise UsageError(
            f"the ONNX graph has {len(model.inputs)} inputs but the model takes {len(examples)}",
            "remove unused inputs from forward()",
        )
    user_sets = [(f"user:{Path(p).name}", read_inputs_file(Path(p), model.inputs)) for p in options.parity.inputs_files]
    batches, shaped = shape_points(model, examples, options.shapes.buckets)
    missing = max(QUANTIZED_SAMPLES - options.parity.samples, 0) if quantized else 0
    held = (held_back or [])[:missing]
    inputs, origins = make_inputs(
        examples, model.inputs, options.parity.samples, batches, user_sets, shaped=shaped, extra=missing - len(held)
    )
    base = len(inputs) - (missing - len(held))
    inputs += held
    origins += [f"calib held-back#{i}" for i in range(len(held))]
    reference = reference_runner(source, model.inputs, model.outputs)
    outputs = [reference(feeds) for feeds in inputs[:base]] + batched_reference(reference, inputs[base:])
    return ParitySamples(inputs, origins, outputs, base if missing else None)


BATCHED_SETS = 8  # the quantized gate's extra sets go through the reference this many at a time


def batched_reference(reference: Callable[[Feeds], Feeds], sets: list[Feeds]) -> list[Feeds]:
    """The reference's outputs on `sets` (alike in shape), computed BATCHED_SETS sets per call, concatenated on
    the batch axis; set by set when the batched call fails, splits unevenly, or its first set's outputs differ
    from a run of that set alone (a model that mixes the rows of its batch, or whose batch is fixed)."""
    if len(sets) < 2:
        return [reference(feeds) for feeds in sets]
    alone = reference(sets[0])
    results: list[Feeds] = []
    for start in range(0, len(sets), BATCHED_SETS):
        chunk = sets[start : start + BATCHED_SETS]
        split = _split(reference, chunk)
        if split is None or (start == 0 and not _same(split[0], alone)):
            return [alone] + [reference(feeds) for feeds in sets[1:]]
        results += split
    return results


def _split(reference: Callable[[Feeds], Feeds], chunk: list[Feeds]) -> list[Feeds] | None:
    """The outputs of one batched call, cut back into one per set; None when that is not possible."""
    rows = [len(next(iter(feeds.values()))) if feeds and next(iter(feeds.values())).ndim else 0 for feeds in chunk]
    if not rows[0] or any(r != rows[0] for r in rows):
        return None
    try:
        joined = reference({name: np.concatenate([feeds[name] for feeds in chunk]) for name in chunk[0]})
    except Exception:  # a model that cannot take another batch: run the sets one by one
        return None
    if any(np.ndim(v) == 0 or len(v) != rows[0] * len(chunk) for v in joined.values()):
        return None
    return [{k: v[i * rows[0] : (i + 1) * rows[0]] for k, v in joined.items()} for i in range(len(chunk))]


def _same(batched: Feeds, alone: Feeds) -> bool:
    """Outputs of one set computed in a batch and alone agree (up to float reordering)."""
    return batched.keys() == alone.keys() and all(
        batched[k].shape == alone[k].shape
        and (
            alone[k].dtype.kind not in "fc"
            or np.allclose(batched[k], alone[k], rtol=1e-4, atol=1e-5 * (1 + float(np.abs(alone[k]).max(initial=0))))
        )
        and (alone[k].dtype.kind in "fc" or np.array_equal(batched[k], alone[k]))
        for k in alone
    )
