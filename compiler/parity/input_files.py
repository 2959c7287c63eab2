"""Files a user names on the command line, checked before any work: the `--inputs` and `--calib` files (read as
`kiln.compiler.capture.inputs` reads them), and the files Kiln writes where a flag says (`kiln run --output`,
`kiln debug --html`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from kiln.compiler.capture.inputs import read_npz
from kiln.compiler.errors import UsageError

if TYPE_CHECKING:
    from kiln.compiler.export.options import ExportOptions
    from kiln.targets.base import Target


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
