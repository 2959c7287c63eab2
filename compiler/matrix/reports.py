"""The reports of a matrix run: report.json (everything), report.md, junit.xml and a self-contained report.html.

report.json is built first and the other three are rendered from it, so they always agree. The schema is
documented in docs/matrix.md.
"""

from __future__ import annotations

import html
import json
import math
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from compiler.errors import UsageError
from compiler.matrix.config import matches
from compiler.matrix.results import FAILED_STATUSES, PASSED, STATUS_LABELS, UNAVAILABLE, CellResult

if TYPE_CHECKING:
    from compiler.matrix.runner import Plan, RunSettings

REPORT_SCHEMA = "kiln.matrix.report"
REPORT_SCHEMA_VERSION = 1
ICONS = {
    "passed": "✅",
    "parity_failed": "⚠️",
    "conversion_failed": "❌",
    "unavailable": "⛔",
    "not_run": "⏸",
}
BASELINE_HINT = "pass the report.json of an earlier run"
ERROR_FLOOR_OF_ATOL = 0.01  # parity errors below 1% of atol are noise: growth below that is no regression


def write_reports(plans: list[Plan], results: list[CellResult], out: Path, settings: RunSettings) -> dict[str, Any]:
    """Build report.json from the results and write it with report.md, junit.xml and report.html into `out`."""
    report = build_report(plans, results, settings)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    (out / "junit.xml").write_bytes(junit(report))
    (out / "report.html").write_text(html_page(report))
    return report


def build_report(plans: list[Plan], results: list[CellResult], settings: RunSettings) -> dict[str, Any]:
    """The whole result as JSON-ready data: summary, columns, rows, cells and regressions."""
    import compiler

    expect_fail = {c.cell_id for plan in plans for c in plan.cells if c.options.expect == "fail"}
    cells = []
    for result in results:
        cell = result.to_dict()
        cell["allowed_to_fail"] = result.cell_id in expect_fail or matches(result.cell_id, settings.allow_fail)
        cells.append(cell)
    regressions = compare_with_baseline(cells, settings) if settings.baseline else []
    counted = [r for r in regressions if not r["allowed_to_fail"]]
    unexpected = [c["cell_id"] for c in cells if c["status"] in FAILED_STATUSES and not c["allowed_to_fail"]]
    counts = {status: sum(c["status"] == status for c in cells) for status in STATUS_LABELS}
    hosts = list({json.dumps(p.host, sort_keys=True): p.host for p in plans}.values())
    return {
        "schema": REPORT_SCHEMA,
        "schema_version": REPORT_SCHEMA_VERSION,
        "generated_at": _now(),
        "kiln_version": compiler.__version__,
        "hosts": hosts,
        "settings": plans[0].settings if plans else {},
        "shards": sorted({str(p.shard) for p in plans}),
        "baseline": str(settings.baseline) if settings.baseline else None,
        "summary": {
            "cells": len(cells),
            **counts,
            "unexpected_failures": len(unexpected),
            "unexpected_failure_ids": unexpected,
            "allowed_failures": sum(c["status"] in FAILED_STATUSES and c["allowed_to_fail"] for c in cells),
            "regressions": len(counted),
            "ok": not unexpected and not counted,
        },
        "models": list(dict.fromkeys(c["model"] for c in cells)),
        "columns": _columns(cells),
        "cells": cells,
        "regressions": regressions,
    }


def _now() -> str:
    from compiler.matrix.runner import now

    return now()


def _columns(cells: list[dict[str, Any]]) -> list[str]:
    """`target/precision` columns in registry order of targets and each target's order of precisions."""
    from targets import TARGETS

    order = {t.name: (i, list(t.precisions)) for i, t in enumerate(TARGETS)}

    def rank(column: str) -> tuple[int, int, str]:
        target, _, precision = column.partition("/")
        index, precisions = order.get(target, (len(order), []))
        return index, precisions.index(precision) if precision in precisions else len(precisions), column

    return sorted({f"{c['target']}/{c['precision']}" for c in cells}, key=rank)


def compare_with_baseline(cells: list[dict[str, Any]], settings: RunSettings) -> list[dict[str, Any]]:
    """Regressions against an earlier report.json: a cell that passed and now fails, a parity error grown past
    `error_factor`, a latency worse than `latency_factor` times the old one."""
    assert settings.baseline is not None
    try:
        old_report = json.loads(Path(settings.baseline).read_text())
        old = {c["cell_id"]: c for c in old_report["cells"]}
    except FileNotFoundError:
        raise UsageError(f"baseline {settings.baseline} does not exist", BASELINE_HINT) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot read baseline {settings.baseline}: {exc}", BASELINE_HINT) from None
    found = []
    for cell in cells:
        before = old.get(cell["cell_id"])
        if before is None:
            continue
        kinds = []
        if before["status"] == PASSED and cell["status"] in FAILED_STATUSES:
            kinds.append(("now_fails", f"passed before, now {STATUS_LABELS[cell['status']]}: {cell['reason'][:200]}"))
        new_error, old_error = cell.get("max_abs_error"), before.get("max_abs_error")
        if _number(new_error) and _number(old_error):
            atol = (cell.get("tolerance") or {}).get("atol") or 1e-4
            if new_error > settings.error_factor * max(old_error, ERROR_FLOOR_OF_ATOL * atol):
                kinds.append(("error_grew", f"max abs error {old_error:.3g} -> {new_error:.3g} "
                                            f"(over {settings.error_factor:g}x)"))  # fmt: skip
        new_ms, old_ms = cell.get("latency_ms"), before.get("latency_ms")
        if _number(new_ms) and _number(old_ms) and old_ms > 0 and new_ms > settings.latency_factor * old_ms:
            kinds.append(("slower", f"latency {old_ms:.3g} -> {new_ms:.3g} ms (+{100 * (new_ms / old_ms - 1):.0f}%)"))
        for kind, detail in kinds:
            found.append(
                {"cell_id": cell["cell_id"], "kind": kind, "detail": detail, "allowed_to_fail": cell["allowed_to_fail"]}
            )
    return found


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------------ text forms


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
    if _number(cell.get("max_abs_error")):
        error = cell["max_abs_error"]
        figures.append(f"err {error:.1e}" if error else "err 0")
    if cell.get("artifact_bytes") is not None:
        figures.append(_size(cell["artifact_bytes"]))
    if _number(cell.get("latency_ms")):
        figures.append(f"{cell['latency_ms']:.3g} ms" + (" ⏱" if cell.get("latency_noisy") else ""))
    if _number(cell.get("speedup")):
        figures.append(f"{cell['speedup']:.2f}x")
    return figures


def _grid(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["model"], f"{c['target']}/{c['precision']}"): c for c in report["cells"]}


def _rows(report: dict[str, Any]) -> list[tuple[str, list[dict[str, Any] | None]]]:
    """The table: per model, its cell in each column (None where the target has no such precision)."""
    grid = _grid(report)
    return [(model, [grid.get((model, column)) for column in report["columns"]]) for model in report["models"]]


def _allowed(cell: dict[str, Any]) -> str:
    """ " (allowed)" for a failure that leaves the run green."""
    return " (allowed)" if cell["allowed_to_fail"] and cell["status"] in FAILED_STATUSES else ""


def _headline(report: dict[str, Any]) -> str:
    summary = report["summary"]
    parts = [f"{summary[s]} {STATUS_LABELS[s]}" for s in STATUS_LABELS if summary.get(s)]
    verdict = (
        "all cells expected to pass passed"
        if summary["ok"]
        else f"{summary['unexpected_failures']} unexpected failure(s), {summary['regressions']} regression(s)"
    )
    return f"{summary['cells']} cells: {', '.join(parts)}. {verdict}."


def _settings_line(report: dict[str, Any]) -> str:
    settings = report["settings"]
    hosts = "; ".join(f"{h.get('cpu', '?')} ({h.get('cores', '?')} cores)" for h in report["hosts"]) or "unknown"
    loads = [c["load_average"] for c in report["cells"] if _number(c.get("load_average"))]
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


def markdown(report: dict[str, Any]) -> str:
    """report.md: a table with one row per model and one column per target/precision, a legend, the failures."""
    columns = report["columns"]
    lines = ["# Kiln conversion matrix", "", f"**{_headline(report)}**", "", _settings_line(report), ""]
    lines.append("| model | " + " | ".join(c.replace("/", " ") for c in columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    for model, cells in _rows(report):
        row = [" · ".join([ICONS[c["status"]] + _allowed(c), *cell_figures(c)]) if c else "" for c in cells]
        lines.append(f"| {model} | " + " | ".join(row) + " |")
    lines += ["", f"Legend: {LEGEND}", ""]
    if report["regressions"]:
        lines += [f"## Regressions against {report['baseline']}", ""]
        lines += [
            f"- **{r['cell_id']}** ({r['kind']}{', allowed' if r['allowed_to_fail'] else ''}): {r['detail']}"
            for r in report["regressions"]
        ]
        lines.append("")
    failed = [c for c in report["cells"] if c["status"] in FAILED_STATUSES]
    if failed:
        lines += ["## Failures", ""]
        for cell in failed:
            kind = STATUS_LABELS[cell["status"]] + (f", {cell['failure']}" if cell.get("failure") else "")
            allowed = ", allowed" if cell["allowed_to_fail"] else ""
            lines.append(f"- **{cell['cell_id']}** ({kind}{allowed}): {_one_line(cell['reason'])}")
        lines.append("")
    unavailable = [c for c in report["cells"] if c["status"] == UNAVAILABLE]
    if unavailable:
        lines += ["## Unavailable here", ""]
        lines += [f"- {c['cell_id']}: {_one_line(c['reason'])}" for c in unavailable]
        lines.append("")
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return " ".join((text or "no reason recorded").split()).replace("|", "\\|")


def junit(report: dict[str, Any]) -> bytes:
    """junit.xml: one test case per cell (failures fail, unavailable and allowed failures are skipped)."""
    regressions: dict[str, list[dict[str, Any]]] = {}
    for regression in report["regressions"]:
        regressions.setdefault(regression["cell_id"], []).append(regression)
    suite = ET.Element("testsuite", name="kiln-matrix", timestamp=report["generated_at"])
    properties = ET.SubElement(suite, "properties")
    for name, value in [("kiln_version", report["kiln_version"]), *report["settings"].items()]:
        ET.SubElement(properties, "property", name=str(name), value=str(value))
    failures = skipped = 0
    total_time = 0.0
    for cell in report["cells"]:
        seconds = cell.get("duration_s") or 0.0
        total_time += seconds
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"kiln.matrix.{cell['model']}",
            name=f"{cell['target']}/{cell['precision']}",
            time=f"{seconds:.3f}",
        )
        label = STATUS_LABELS[cell["status"]]
        counted = [r for r in regressions.get(cell["cell_id"], []) if not r["allowed_to_fail"]]
        if cell["status"] in FAILED_STATUSES and not cell["allowed_to_fail"]:
            failures += 1
            failure = ET.SubElement(case, "failure", message=f"{label}: {_one_line(cell['reason'])}"[:1000],
                                    type=cell["status"])  # fmt: skip
            failure.text = cell.get("stderr_tail") or cell["reason"]
        elif counted:
            failures += 1
            failure = ET.SubElement(case, "failure", message="; ".join(r["detail"] for r in counted), type="regression")
            failure.text = "\n".join(f"{r['kind']}: {r['detail']}" for r in counted)
        elif cell["status"] in FAILED_STATUSES or cell["status"] == UNAVAILABLE:
            skipped += 1
            prefix = "allowed to fail: " if cell["status"] in FAILED_STATUSES else f"{label}: "
            ET.SubElement(case, "skipped", message=prefix + _one_line(cell["reason"])[:1000])
        out = ET.SubElement(case, "system-out")
        out.text = f"status: {label}; " + "; ".join(cell_figures(cell))
    suite.set("tests", str(len(report["cells"])))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    suite.set("skipped", str(skipped))
    suite.set("time", f"{total_time:.3f}")
    suites = ET.Element("testsuites", name="kiln-matrix", tests=suite.get("tests", "0"), failures=str(failures))
    suites.append(suite)
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"


# ------------------------------------------------------------------------------------------ HTML

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.35em 0.6em; font-size: 0.9em; vertical-align: top; }
th { background: #f3f3f3; }
td.passed { background: #e6f6e6; } td.parity_failed { background: #fff3d6; }
td.conversion_failed, td.not_run { background: #fde2e2; } td.unavailable { background: #eee; color: #666; }
td .figures { color: #555; font-size: 0.85em; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
.legend { color: #555; font-size: 0.85em; max-width: 70em; }
"""


def html_page(report: dict[str, Any]) -> str:
    """report.html: the table, a latency bar chart and an error heat map (plotly, inlined: works offline)."""
    esc = html.escape
    head = "".join(f"<th>{esc(c.replace('/', ' '))}</th>" for c in report["columns"])
    rows = []
    for model, cells in _rows(report):
        tds = []
        for cell in cells:
            if cell is None:
                tds.append("<td></td>")
                continue
            label = STATUS_LABELS[cell["status"]] + _allowed(cell)
            title = esc(_one_line(cell["reason"])) if cell["status"] != PASSED else ""
            figures = "<br>".join(esc(f) for f in cell_figures(cell))
            tds.append(
                f'<td class="{cell["status"]}" title="{title}">{ICONS[cell["status"]]} {esc(label)}'
                f'<div class="figures">{figures}</div></td>'
            )
        rows.append(f"<tr><th>{esc(model)}</th>{''.join(tds)}</tr>")
    failures = []
    for cell in report["cells"]:
        if cell["status"] in FAILED_STATUSES:
            tail = cell.get("stderr_tail") or ""
            tail = f"<details><summary>output tail</summary><pre>{esc(tail)}</pre></details>" if tail else ""
            failures.append(f"<li><b>{esc(cell['cell_id'])}</b> ({esc(STATUS_LABELS[cell['status']])}): "
                            f"{esc(_one_line(cell['reason']))}{tail}</li>")  # fmt: skip
    regressions = "".join(
        f"<li><b>{esc(r['cell_id'])}</b> ({esc(r['kind'])}): {esc(r['detail'])}</li>" for r in report["regressions"]
    )
    charts = _charts(report)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Kiln conversion matrix</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>Kiln conversion matrix</h1>",
        f"<p><b>{esc(_headline(report))}</b></p><p>{esc(_settings_line(report))}</p>",
        f'<table id="matrix-table"><thead><tr><th>model</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>',
        f'<p class="legend">{esc(LEGEND)}</p>',
        f"<h2>Regressions against {esc(str(report['baseline']))}</h2><ul>{regressions}</ul>" if regressions else "",
        f"<h2>Failures</h2><ul>{''.join(failures)}</ul>" if failures else "",
        charts,
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def _charts(report: dict[str, Any]) -> str:
    """The latency bar chart and the error heat map as HTML (plotly's JavaScript inlined once)."""
    try:
        import plotly.graph_objects as go
        import plotly.io as pio
    except ImportError:
        return "<p><i>Charts need plotly: pip install 'kiln[matrix]'.</i></p>"
    columns, grid, models = report["columns"], _grid(report), report["models"]
    latency = go.Figure()
    reference = [
        statistics.median(times) if (times := [c["reference_ms"] for c in report["cells"]
                                               if c["model"] == m and _number(c.get("reference_ms"))]) else None
        for m in models
    ]  # fmt: skip
    latency.add_trace(go.Bar(name="reference (PyTorch eager / ONNX Runtime)", x=models, y=reference))
    for column in columns:
        values = [grid.get((m, column), {}).get("latency_ms") for m in models]
        if any(_number(v) for v in values):
            latency.add_trace(go.Bar(name=column, x=models, y=values))
    latency.update_layout(
        title="Median latency per model (ms, log scale; lower is faster)",
        barmode="group",
        yaxis={"type": "log", "title": "ms"},
        height=460,
    )
    z: list[list[float | None]] = []
    text: list[list[str]] = []
    for model in models:
        z_row: list[float | None] = []
        text_row: list[str] = []
        for column in columns:
            error = grid.get((model, column), {}).get("max_abs_error")
            if _number(error):
                z_row.append(math.log10(max(error, 1e-12)))
                text_row.append(f"{error:.1e}")
            else:
                z_row.append(None)
                text_row.append("")
        z.append(z_row)
        text.append(text_row)
    heat = go.Figure(
        go.Heatmap(
            z=z,
            x=columns,
            y=models,
            text=text,
            texttemplate="%{text}",
            colorscale="YlOrRd",
            colorbar={"title": "log10 max abs error"},
            hovertemplate="%{y} on %{x}: max abs error %{text}<extra></extra>",
        )
    )
    heat.update_layout(
        title="Max abs error vs the reference (blank: no artifact)",
        height=160 + 40 * len(models),
        yaxis={"autorange": "reversed"},
    )
    first = pio.to_html(latency, include_plotlyjs=True, full_html=False, div_id="latency-chart")
    second = pio.to_html(heat, include_plotlyjs=False, full_html=False, div_id="error-heatmap")
    return f"<h2>Latency</h2>{first}<h2>Parity error</h2>{second}"
