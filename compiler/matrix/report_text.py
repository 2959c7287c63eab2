"""What the text forms of the matrix report share (report.md, junit.xml, report.html): icons, the legend, the
figures of a cell, the table's rows, the headline and the settings line."""

from __future__ import annotations

from typing import Any

from kiln.compiler.matrix.results import FAILED_STATUSES, STATUS_LABELS
from kiln.compiler.types import is_finite_number

ICONS = {
    "passed": "✅",
    "parity_failed": "⚠️",
    "conversion_failed": "❌",
    "unavailable": "⛔",
    "not_run": "⏸",
}


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return "-"


def cell_figures(cell: dict[str, Any]) -> list[str]:
    """The figures shown in a table cell: max error, artifact size, latency, speed-up."""
    figures = []
    if is_finite_number(cell.get("max_abs_error")):
        error = cell["max_abs_error"]
        figures.append(f"err {error:.1e}" if error else "err 0")
    if cell.get("artifact_bytes") is not None:
        figures.append(_size(cell["artifact_bytes"]))
    if is_finite_number(cell.get("latency_ms")):
        figures.append(f"{cell['latency_ms']:.3g} ms" + (" ⏱" if cell.get("latency_noisy") else ""))
    if is_finite_number(cell.get("speedup")):
        figures.append(f"{cell['speedup']:.2f}x")
    return figures


def cell_grid(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Each cell of the report by (model, `target/precision` column)."""
    return {(c["model"], f"{c['target']}/{c['precision']}"): c for c in report["cells"]}


def table_rows(report: dict[str, Any]) -> list[tuple[str, list[dict[str, Any] | None]]]:
    """The table: per model, its cell in each column (None where the target has no such precision)."""
    grid = cell_grid(report)
    return [(model, [grid.get((model, column)) for column in report["columns"]]) for model in report["models"]]


def allowed_mark(cell: dict[str, Any]) -> str:
    """ " (allowed)" for a failure that leaves the run green."""
    return " (allowed)" if cell["allowed_to_fail"] and cell["status"] in FAILED_STATUSES else ""


def headline(report: dict[str, Any]) -> str:
    """One sentence: how many cells ended in each status, and whether the run is green."""
    summary = report["summary"]
    parts = [f"{summary[s]} {STATUS_LABELS[s]}" for s in STATUS_LABELS if summary.get(s)]
    verdict = (
        "all cells expected to pass passed"
        if summary["ok"]
        else f"{summary['unexpected_failures']} unexpected failure(s), {summary['regressions']} regression(s)"
    )
    return f"{summary['cells']} cells: {', '.join(parts)}. {verdict}."


def settings_line(report: dict[str, Any]) -> str:
    """The hosts, the timing settings, the executor and shards, and when and by which Kiln it was made."""
    settings = report["settings"]
    hosts = "; ".join(f"{h.get('cpu', '?')} ({h.get('cores', '?')} cores)" for h in report["hosts"]) or "unknown"
    loads = [c["load_average"] for c in report["cells"] if is_finite_number(c.get("load_average"))]
    load = f" Load average while timing: {min(loads):.1f} to {max(loads):.1f}." if loads else ""
    return (
        f"Host: {hosts}. {settings.get('threads', '?')} threads per cell; latency = median of "
        f"{settings.get('repeat', '?')} runs after {settings.get('warmup', '?')} warm-up, on the example inputs. "
        f"Executor: {settings.get('executor', '?')}; shards: {', '.join(report['shards'])}.{load} "
        f"Generated {report['generated_at']} by Kiln {report['kiln_version']}."
    )


LEGEND = (
    "✅ passed · ⚠️ converted, parity failed · ❌ conversion failed · ⛔ unavailable here · ⏸ not run · "
    "(blank: the target has no such precision). Figures: max abs error vs the reference over the parity input "
    "sets · artifact size · median latency of the artifact · speed-up vs the reference (PyTorch eager; ONNX "
    "Runtime for an .onnx source), above 1x the artifact is faster. ⏱: latency disturbed by other processes. "
    '(allowed): a failure allowed by --allow-fail or expect = "fail".'
)


def reason_text(text: str) -> str:
    """A reason on one line, safe in a Markdown table cell."""
    return " ".join((text or "no reason recorded").split()).replace("|", "\\|")
