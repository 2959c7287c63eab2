"""report.html: the matrix table, the failures, a latency bar chart and an error heat map, self-contained
(plotly's JavaScript inlined: it works offline)."""

from __future__ import annotations

import html
import math
import statistics
from typing import Any

from kiln.compiler.matrix.report_text import (
    ICONS,
    LEGEND,
    allowed_mark,
    cell_figures,
    cell_grid,
    headline,
    reason_text,
    settings_line,
    table_rows,
)
from kiln.compiler.matrix.results import FAILED_STATUSES, PASSED, STATUS_LABELS
from kiln.compiler.pages import page
from kiln.compiler.types import is_finite_number


def _divergence_links(cell: dict[str, Any], summary: bool = False) -> str:
    """Links to a failed cell's divergence record (divergence.json) and its error profile (divergence.html)."""
    record = cell.get("divergence")
    if not record:
        return ""
    page = record.removesuffix(".json") + ".html"
    line = html.escape(reason_text(cell.get("divergence_summary", ""))) + ": " if summary else ""
    return (
        f'<div class="figures">{line}<a href="{html.escape(page)}">divergence</a> '
        f'(<a href="{html.escape(record)}">json</a>)</div>'
    )


def html_page(report: dict[str, Any]) -> str:
    """report.html: the table, a latency bar chart and an error heat map (plotly, inlined: works offline)."""
    esc = html.escape
    head = "".join(f"<th>{esc(c.replace('/', ' '))}</th>" for c in report["columns"])
    rows = []
    for model, cells in table_rows(report):
        tds = []
        for cell in cells:
            if cell is None:
                tds.append("<td></td>")
                continue
            label = STATUS_LABELS[cell["status"]] + allowed_mark(cell)
            title = esc(reason_text(cell["reason"])) if cell["status"] != PASSED else ""
            figures = "<br>".join(esc(f) for f in cell_figures(cell))
            tds.append(
                f'<td class="{cell["status"]}" title="{title}">{ICONS[cell["status"]]} {esc(label)}'
                f'<div class="figures">{figures}</div>{_divergence_links(cell)}</td>'
            )
        rows.append(f"<tr><th>{esc(model)}</th>{''.join(tds)}</tr>")
    failures = []
    for cell in report["cells"]:
        if cell["status"] in FAILED_STATUSES:
            tail = cell.get("stderr_tail") or ""
            tail = f"<details><summary>output tail</summary><pre>{esc(tail)}</pre></details>" if tail else ""
            reason = esc(reason_text(cell["reason"]))
            failures.append(f"<li><b>{esc(cell['cell_id'])}</b> ({esc(STATUS_LABELS[cell['status']])}): "
                            f"{reason}{_divergence_links(cell, True)}{tail}</li>")  # fmt: skip
    regressions = "".join(
        f"<li><b>{esc(r['cell_id'])}</b> ({esc(r['kind'])}): {esc(r['detail'])}</li>" for r in report["regressions"]
    )
    charts = _charts(report)
    return page("Kiln conversion matrix", [
        f'<p class="verdict"><b>{esc(headline(report))}</b></p><p>{esc(settings_line(report))}</p>',
        f'<div class="wide"><table id="matrix-table"><thead><tr><th>model</th>{head}</tr></thead>'
        f'<tbody>{"".join(rows)}</tbody></table></div>',
        f'<p class="legend">{esc(LEGEND)}</p>',
        f"<h2>Regressions against {esc(str(report['baseline']))}</h2><ul>{regressions}</ul>" if regressions else "",
        f"<h2>Failures</h2><ul>{''.join(failures)}</ul>" if failures else "",
        charts,
    ])  # fmt: skip


def _charts(report: dict[str, Any]) -> str:
    """The latency bar chart and the error heat map as HTML (plotly's JavaScript inlined once)."""
    try:
        import plotly.io as pio
    except ImportError:
        return "<p><i>Charts need plotly: pip install 'kiln[matrix]'.</i></p>"
    first = pio.to_html(_latency_chart(report), include_plotlyjs=True, full_html=False, div_id="latency-chart")
    second = pio.to_html(_error_heatmap(report), include_plotlyjs=False, full_html=False, div_id="error-heatmap")
    return f"<h2>Latency</h2>{first}<h2>Parity error</h2>{second}"


def _latency_chart(report: dict[str, Any]) -> Any:
    """Bars per model: the reference's median latency, and each column's."""
    import plotly.graph_objects as go

    columns, grid, models = report["columns"], cell_grid(report), report["models"]
    latency = go.Figure()
    finite = [c for c in report["cells"] if is_finite_number(c.get("reference_ms"))]
    reference = [
        statistics.median(times) if (times := [c["reference_ms"] for c in finite if c["model"] == m]) else None
        for m in models
    ]
    latency.add_trace(go.Bar(name="reference (PyTorch eager / ONNX Runtime)", x=models, y=reference))
    for column in columns:
        values = [grid.get((m, column), {}).get("latency_ms") for m in models]
        if any(is_finite_number(v) for v in values):
            latency.add_trace(go.Bar(name=column, x=models, y=values))
    latency.update_layout(
        title="Median latency per model (ms, log scale; lower is faster)",
        barmode="group",
        yaxis={"type": "log", "title": "ms"},
        height=460,
    )
    return latency


def _error_heatmap(report: dict[str, Any]) -> Any:
    """log10 of each cell's max abs error, model by column (blank: no artifact)."""
    import plotly.graph_objects as go

    columns, grid, models = report["columns"], cell_grid(report), report["models"]
    z: list[list[float | None]] = []
    text: list[list[str]] = []
    for model in models:
        z_row: list[float | None] = []
        text_row: list[str] = []
        for column in columns:
            error = grid.get((model, column), {}).get("max_abs_error")
            if is_finite_number(error):
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
    return heat
