"""The CI conversion matrix: many models x many targets in isolated processes, with resumable results and reports.

`kiln matrix` (cli.py) is the front end; `run_matrix` and `merge_matrix` in `compiler.matrix.runner` do the work.
"""

from __future__ import annotations

from compiler.matrix.config import CellOptions, CellSpec, MatrixConfig, load_config
from compiler.matrix.results import CellResult
from compiler.matrix.runner import RunSettings, Shard, merge_matrix, run_matrix

__all__ = [
    "CellOptions",
    "CellResult",
    "CellSpec",
    "MatrixConfig",
    "RunSettings",
    "Shard",
    "load_config",
    "merge_matrix",
    "run_matrix",
]
