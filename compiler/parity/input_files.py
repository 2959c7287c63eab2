"""Files a user names on the command line: the `--inputs` and `--calib` `.npz` files, read without unpickling and
checked against the model's input specs (shape, dtype, the cast rule; re-exported by `kiln.compiler.parity.gate`), and
the
files Kiln writes where a flag says (`kiln run --output`, `kiln debug --html`), checked before any work."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from kiln.compiler.errors import UsageError
from kiln.compiler.types import TensorSpec

if TYPE_CHECKING:
    from kiln.compiler.export.options import ExportOptions
    from kiln.targets.base import Target

Feeds = dict[str, np.ndarray]


def check_output_file(path: Path, flag: str, example: str) -> Path:
    """Refuse (UsageError) a path `flag` names that a file cannot be written to, before any work: its directory
    missing, or a directory (or anything but a regular file) at the path itself."""
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {path}: directory {path.parent} does not exist", "create it or pass another path")
    if path.exists() and not path.is_file():
        what = "a directory" if path.is_dir() else "not a regular file"
        raise UsageError(f"{flag} {path} is {what}", f"pass the path of the file to write, e.g. {example}")
    return path


def outputs_file(text: str) -> Path:
    """Where `kiln run --output TEXT` saves the outputs: TEXT, with `.npz` added unless it ends so (as `np.savez`
    adds it), checked by `check_output_file`."""
    return check_output_file(Path(text if text.endswith(".npz") else f"{text}.npz"), "--output", "outputs.npz")


def save_npz(path: Path, arrays: dict[str, Any], flag: str = "--output") -> Path:
    """Write `arrays` to the `.npz` file `path` (from `outputs_file`); an OS error is a UsageError naming it."""
    try:
        np.savez(path, **arrays)
    except OSError as exc:
        raise UsageError(f"cannot write {flag} {path}: {exc.strerror or exc}", "choose a writable path") from None
    return path


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


def check_input_files(options: ExportOptions, targets: list[Target] | None = None) -> None:
    """Refuse unreadable `--inputs` and `--calib` array files before anything is captured.

    `--calib` files are checked when calibration can be used: a target (of `targets`, when given) is
    exported at int8, or the precision is int8 or each target's default. A `file.py:loader` is not run here.
    """
    for path in options.parity.inputs_files:
        read_npz(path, "--inputs")
    source = options.calibration.spec.source
    if targets is not None:
        calibrated = any(options.precision_for(t) == "int8" for t in targets)
    else:
        calibrated = options.precision in (None, "int8")
    if source is None or not calibrated or ".py:" in source or source.endswith(".py"):
        return
    path = Path(source)
    if not path.exists():
        raise UsageError(
            f"calibration source {source} does not exist", "pass FILE.npz, a directory of .npy/.npz, or file.py:loader"
        )
    files = sorted(p for p in path.iterdir() if p.suffix in (".npy", ".npz")) if path.is_dir() else [path]
    for file in files:
        if file.suffix == ".npy":
            try:
                np.load(file, allow_pickle=False)
            except Exception as exc:
                raise UsageError(
                    f"cannot read calibration file {file}: {exc}", "save samples with numpy.save"
                ) from None
        elif file.is_file():
            read_npz(file, "--calib")


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
