"""Calibration data for int8 quantization: one spec and one loader for every target.

Sources (`--calib`):
- `FILE.npz`: one array per input (named like the input, or `arg0`, `arg1`...), samples stacked
  along the batch axis: an input of shape [1, 3, 32, 32] takes an array of [N, 3, 32, 32].
- `DIR`: `.npy` files (single-input models: one array per file, with or without the batch axis)
  or `.npz` files (one file per sample or batch, arrays named as above), read in sorted order.
- `path.py:loader`: a function yielding input tuples (tensors or arrays, batch axis first).
Without a source, random inputs in the example inputs' range are used, and the export says so.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from kiln.compiler.errors import UsageError, error_text
from kiln.compiler.image_layout import NHWC, nhwc_array
from kiln.compiler.types import Feeds, TensorSpec

NOT_REPRESENTATIVE = (
    "int8 calibrated on RANDOM inputs: the quantization ranges are not representative of real data; "
    "pass --calib FILE.npz|DIR|file.py:loader"
)

NO_HELD_BACK = (
    "the calibration source has no rows beyond --calib-samples, so the parity gate's extra int8 input sets are "
    "random (it never judges on rows calibrated on): give more rows than --calib-samples to judge on real data"
)

DEFAULT_CALIBRATION_SAMPLES = 100
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


@dataclass(frozen=True)
class CalibrationSpec:
    """How int8 is calibrated, the same for every target: where samples come from, how many, how ranges
    are chosen from them (`method`), per-channel weights, and symmetric or asymmetric activations
    (None: each runtime's fast default)."""

    source: str | None = None
    samples: int = DEFAULT_CALIBRATION_SAMPLES
    method: str = "minmax"
    per_channel: bool = True
    symmetric_activations: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise UsageError(
                f"--calib-method {self.method}: unknown method", f"use one of {', '.join(CALIBRATION_METHODS)}"
            )

    def describe(self) -> str:
        """Short text for reports, e.g. `digits.npz (100 samples, minmax)`."""
        return f"{self.source or 'random inputs'} ({self.samples} samples, {self.method})"


@dataclass(frozen=True)
class AccuracyBudget:
    """`--max-drop X [--metric path.py:fn]`: how much a quantized model may lose, and how that is measured
    (None: agreement of the outputs with fp32 on the calibration samples)."""

    max_drop: float
    metric: str | None = None


@dataclass
class CalibrationData:
    """Calibration samples: per input, rows stacked along the batch axis."""

    rows: Feeds
    origin: str
    representative: bool  # False: random inputs, so int8 ranges are guesses
    spec: CalibrationSpec = CalibrationSpec()
    # Rows the source had beyond `spec.samples`: never calibrated on, so the parity gate judges on them.
    held_back: Feeds | None = None

    @property
    def count(self) -> int:
        """Number of sample rows."""
        return len(next(iter(self.rows.values())))

    def batches(self, specs: list[TensorSpec]) -> list[Feeds]:
        """The rows regrouped into feeds of each input's static batch size."""
        batch = _batch_size(specs)
        return [{name: rows[i : i + batch] for name, rows in self.rows.items()} for i in range(0, self.count, batch)]

    def held_back_sets(self, specs: list[TensorSpec], limit: int) -> list[Feeds]:
        """At most `limit` parity input sets of whole static batches from the held-back rows (none without)."""
        sizes = {s.shape[0] for s in specs if s.shape}
        if not self.held_back or len(sizes) != 1 or not isinstance(next(iter(sizes)), int):
            return []  # no rows held back, or no single static batch to group them in
        held = CalibrationData(self.held_back, self.origin, self.representative, self.spec)
        batch = int(next(iter(sizes)))
        return [feeds for feeds in held.batches(specs) if len(next(iter(feeds.values()))) == batch][:limit]

    def in_layout(self, specs: list[TensorSpec]) -> CalibrationData:
        """The same samples for an artifact whose inputs are `specs`: channels-last where a spec says NHWC."""
        rows = {s.name: nhwc_array(self.rows[s.name]) if s.layout == NHWC else self.rows[s.name] for s in specs}
        return replace(self, rows=rows)

    def summary(self) -> dict[str, Any]:
        """What the manifest records about the calibration."""
        return {
            "source": self.origin,
            "samples": self.count,
            "representative": self.representative,
            "method": self.spec.method,
            "per_channel": self.spec.per_channel,
            "symmetric_activations": self.spec.symmetric_activations,
            "held_back_rows": len(next(iter(self.held_back.values()))) if self.held_back else 0,
        }


def _batch_size(specs: list[TensorSpec]) -> int:
    sizes = {s.shape[0] for s in specs if s.shape}
    if len(sizes) != 1 or not isinstance(next(iter(sizes)), int):
        raise UsageError(
            "calibration needs every input to have the same static batch size",
            "export without --dynamic-batch/--dynamic, with example inputs of one batch size",
        )
    return int(next(iter(sizes)))


def load_calibration(
    spec: CalibrationSpec, inputs: list[TensorSpec], examples: list[np.ndarray], hold_back: int = 0
) -> CalibrationData:
    """The calibration rows for these inputs from the spec's source, checked, at most `spec.samples` of them;
    up to `hold_back` further rows of the source are kept apart (`held_back`) for the parity gate."""
    if spec.samples < 1:
        raise UsageError(f"--calib-samples {spec.samples}: need at least 1", "use the default of 100")
    if spec.source is None:
        return CalibrationData(_random_rows(inputs, examples, spec.samples), "random inputs", False, spec)
    wanted = spec.samples + max(hold_back, 0)
    chunks = itertools.islice(_read_source(spec.source, inputs), wanted)
    rows: dict[str, list[np.ndarray]] = {s.name: [] for s in inputs}
    count = 0
    for feeds in chunks:
        for input_spec in inputs:
            rows[input_spec.name].append(_check_rows(input_spec, feeds[input_spec.name], spec.source))
        count += len(next(iter(feeds.values())))
        if count >= wanted:
            break
    if count == 0:
        raise UsageError(f"calibration source {spec.source} yielded no samples", "give it at least one sample")
    stacked = {name: np.concatenate(parts)[:wanted] for name, parts in rows.items()}
    calibrate = {name: rows[: spec.samples] for name, rows in stacked.items()}
    held = {name: rows[spec.samples :] for name, rows in stacked.items()}
    kept = len(next(iter(stacked.values())))
    return CalibrationData(calibrate, spec.source, True, spec, held if kept > spec.samples else None)


def _random_rows(inputs: list[TensorSpec], examples: list[np.ndarray], count: int) -> Feeds:
    from kiln.compiler.capture.inputs import random_like

    rng = np.random.default_rng(1)
    return {s.name: random_like(example, count, rng) for s, example in zip(inputs, examples)}


def _read_source(source: str, inputs: list[TensorSpec]) -> Iterator[Feeds]:
    """Feeds (arrays with a leading batch axis) from a file, a directory or a Python loader."""
    path_text, _, function = source.rpartition(":") if ".py:" in source else (source, "", "")
    path = Path(path_text)
    if function or path.suffix == ".py":
        yield from _from_loader(path, function, source, inputs)
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz"))
        if not files:
            raise UsageError(f"calibration directory {path} has no .npy or .npz files", "save samples with numpy.save")
        for file in files:
            yield _from_file(file, inputs)
    elif path.is_file():
        yield _from_file(path, inputs)
    else:
        raise UsageError(
            f"calibration source {source} does not exist", "pass FILE.npz, a directory of .npy/.npz, or file.py:loader"
        )


def _from_file(path: Path, inputs: list[TensorSpec]) -> Feeds:
    try:
        if path.suffix == ".npy":
            arrays = {inputs[0].name: np.load(path, allow_pickle=False)}
            if len(inputs) > 1:
                raise UsageError(
                    f"{path}: a .npy holds one array but the model has {len(inputs)} inputs",
                    f"save .npz files with arrays named {', '.join(s.name for s in inputs)}",
                )
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        else:
            raise UsageError(f"calibration file {path} is not .npz or .npy", "save samples with numpy.savez")
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"cannot read calibration file {path}: {exc}", "save samples with numpy.savez") from None
    from kiln.compiler.capture.inputs import arrays_by_input

    return arrays_by_input(arrays, inputs, path)


def _from_loader(path: Path, function: str, source: str, inputs: list[TensorSpec]) -> Iterator[Feeds]:
    from kiln.compiler.capture.sources import python_function

    loader = python_function(path, function, source, "an iterable of input tuples")
    try:
        produced = loader()
        for index, item in enumerate(produced):
            values = item if isinstance(item, (tuple, list)) else (item,)
            if len(values) != len(inputs):
                raise UsageError(
                    f"{source} item {index} has {len(values)} inputs, the model takes {len(inputs)}",
                    "yield one tuple of inputs per sample, in forward() order",
                )
            yield {spec.name: _as_array(value) for spec, value in zip(inputs, values)}
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"{source} raised {error_text(exc)}", "fix the loader so that it runs") from exc


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _check_rows(spec: TensorSpec, array: np.ndarray, where: str) -> np.ndarray:
    """The array as rows of this input (batch axis first, dtype cast), or a clear error."""
    array = np.asarray(array)
    expected = np.dtype(spec.dtype)
    item_shape = list(spec.shape[1:])
    if array.ndim == len(item_shape):  # one sample without its batch axis
        array = array[None]
    if array.ndim != len(spec.shape) or any(isinstance(d, int) and d != n for d, n in zip(item_shape, array.shape[1:])):
        raise UsageError(
            f"calibration data {where}: input '{spec.name}' has shape {list(array.shape)}, "
            f"expected [N, {', '.join(str(d) for d in item_shape)}]",
            "stack samples along the first (batch) axis, each shaped like the model's input",
        )
    if array.dtype != expected:
        same_kind = array.dtype.kind == expected.kind or (array.dtype.kind in "iub" and expected.kind in "iub")
        if not same_kind:
            raise UsageError(
                f"calibration data {where}: input '{spec.name}' is {array.dtype}, expected {expected}",
                f"save it as {expected}",
            )
        array = array.astype(expected)
    return array
