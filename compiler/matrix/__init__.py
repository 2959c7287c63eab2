"""The CI conversion matrix: many models x many targets in isolated processes, with resumable results and reports.

`kiln matrix` (cli_matrix.py) is the front end; `run_matrix` and `merge_matrix` in `kiln.compiler.matrix.run` do
the work. Modules: `config` (matrix.toml, cells, keys), `plan` (the run's settings, shard and cells: plan.json),
`run` (resume, the run, the merge), `process` (one cell's process and its limits), `executors` (local and Ray),
`cell_cache` (the cell cache), `results` (`CellResult`, results.jsonl), `cell` (what runs in a cell's process),
`reports` with `report_text` and `report_html` (the four reports).
"""
