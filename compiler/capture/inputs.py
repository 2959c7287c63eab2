"""A model's input arrays: a user's `.npz` files (`--inputs`, `--calib`, an .onnx source's example) read without
unpickling and checked against the model's input specs (shape, dtype, the cast rule), and random arrays like an
example (the parity gate's extra input sets, calibration rows when none are given)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from kiln.compiler.errors import UsageError
from kiln.compiler.types import Feeds, TensorSpec


def read_npz(path: Path, flag: str = "--inputs") -> Feeds:
    """Every array of a user's `.npz`, read without unpickling (object arrays are refused), or a UsageError."""
    what = "inputs" if flag == "--inputs" else "calibration"
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise UsageError(f"{what} file {path} does not exist", f"check the path given to {flag}") from None
    except Exception as exc:
        raise UsageError(
            f"cannot read {what} file {path} as .npz: {exc}",
            f"save {what} with numpy.savez(path, input_name=array, ...)",
        ) from None


def read_inputs_file(path: Path, specs: list[TensorSpec], notes: list[str] | None = None) -> Feeds:
    """Read a user's `.npz` of inputs (keys = input names, or arg0, arg1...) and check it against the specs.

    `notes` receives check_feed's lines (casts done, NaN/Inf values).
    """
    arrays = read_npz(path)
    named = arrays_by_input(arrays, specs, path)
    return {spec.name: check_feed(spec, named[spec.name], str(path), notes) for spec in specs}


def arrays_by_input(arrays: dict[str, np.ndarray], specs: list[TensorSpec], path: Path) -> Feeds:
    """The arrays of a user's file keyed by input name (stored under that name, or as arg0, arg1...)."""
    feeds: Feeds = {}
    for position, spec in enumerate(specs):
        array = arrays.get(spec.name, arrays.get(f"arg{position}"))
        if array is None:
            raise UsageError(
                f"{path} has no array for input '{spec.name}' (keys: {', '.join(arrays) or 'none'})",
                f"name the arrays {', '.join(s.name for s in specs)}",
            )
        feeds[spec.name] = array
    return feeds


def check_feed(spec: TensorSpec, array: Any, where: str, notes: list[str] | None = None) -> np.ndarray:
    """The array in the spec's dtype, or a clear error if its shape or type cannot fit.

    The cast rule: a cast within a kind (float64 -> float32; int64 -> int32 or int -> bool when every value
    fits) or without loss (uint8 -> int64, bool -> float32) is done and noted; any other cast between kinds
    (float -> int, int64 -> float32) is refused. `notes` receives one line per cast, and one per float input
    holding NaN or Inf values (their outputs will likely be NaN).
    """
    array = np.asarray(array)
    expected = np.dtype(spec.dtype)
    if array.ndim != len(spec.shape) or any(isinstance(d, int) and d != n for d, n in zip(spec.shape, array.shape)):
        raise UsageError(
            f"{where}: input '{spec.name}' has shape {list(array.shape)}, expected {list(spec.shape)}",
            "match the shape the model was exported with",
        )
    if array.dtype != expected:
        array = _cast(spec, array, expected, where, notes)
    if notes is not None and array.dtype.kind in "fc" and array.size:
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            notes.append(f"{where}: input '{spec.name}' has {bad} NaN/Inf value(s): its outputs will likely be NaN")
    return array


def _cast(spec: TensorSpec, array: np.ndarray, expected: np.dtype, where: str, notes: list[str] | None) -> np.ndarray:
    """`array` cast to `expected` under check_feed's rule."""
    integral = "iub"
    same_kind = array.dtype.kind == expected.kind or (array.dtype.kind in integral and expected.kind in integral)
    if not same_kind and not np.can_cast(array.dtype, expected, "safe"):
        raise UsageError(
            f"{where}: input '{spec.name}' is {array.dtype}, expected {expected}",
            f"save it as {expected} (Kiln casts only within a kind, e.g. float64 to float32, or without loss)",
        )
    if expected.kind in integral and array.size and not _fits(array, expected):
        raise UsageError(
            f"{where}: input '{spec.name}' ({array.dtype}) has values that {expected} cannot hold",
            f"save it as {expected} with values in its range",
        )
    if notes is not None:
        notes.append(f"{where}: input '{spec.name}' cast from {array.dtype} to {expected}, the model's input type")
    return array.astype(expected)


def _fits(array: np.ndarray, expected: np.dtype) -> bool:
    """Every value of an integer or bool array is representable in the integer or bool dtype `expected`."""
    if expected.kind == "b":
        return bool(np.isin(array, (0, 1)).all())
    info = np.iinfo(expected)
    return bool(int(array.min()) >= info.min and int(array.max()) <= info.max)


def random_like(example: np.ndarray, batch: int | None, rng: np.random.Generator) -> np.ndarray:
    """A random array like `example` whose values stay valid and alike: its mean and spread, within its range.

    Floats follow the example's mean and standard deviation (clipped to its range), so that
    quantized artifacts are judged on inputs like the data they were calibrated for.
    """
    shape = example.shape if batch is None else (batch, *example.shape[1:])
    if example.ndim == 0 or example.size == 0:
        return example.copy()
    if example.dtype == np.bool_ or len(np.unique(example)) <= 2:
        # Masks and flags: reuse whole rows of the example so every row stays realistic.
        return example[rng.integers(0, example.shape[0], shape[0])]
    low, high = example.min(), example.max()
    if example.dtype.kind in "iu":
        return rng.integers(low, high, size=shape, endpoint=True).astype(example.dtype)
    values = rng.normal(float(example.mean()), float(example.std()), size=shape)
    return np.clip(values, float(low), float(high)).astype(example.dtype)
