"""The CI conversion matrix: many models x many targets in isolated processes, with resumable results and reports.

`kiln matrix` (cli.py) is the front end; `run_matrix` and `merge_matrix` in `kiln.compiler.matrix.run` do the work.
Modules: `config` (matrix.toml, cells, keys), `runner` (plan, resume, the run), `process` (one cell's process and
its limits), `executors` (local and Ray), `cache` (the cell cache), `results` (`CellResult`, results.jsonl),
`cell` (what runs in a cell's process), `reports` with `report_text` and `report_html` (the four reports).
"""

from __future__ import annotations

from kiln.compiler.matrix.config import CellOptions, CellSpec, MatrixConfig, load_config
from kiln.compiler.matrix.results import CellResult
from kiln.compiler.matrix.run import RunSettings, Shard, merge_matrix, run_matrix

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
