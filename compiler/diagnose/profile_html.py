"""divergence.html: each module's error along the network, in execution order, as one self-contained page
(inline SVG, no script, no external asset), the tolerance drawn as a line and the first divergence marked.

Three charts share the x axis (the module boundaries in execution order): cosine to PyTorch, SNR in dB and the
largest absolute error (log scale). A point is a boundary that was measured (built, or read from the runtime);
a red point failed the tolerance; the dashed line is the tolerance (min cosine, min SNR when the precision has
one); the red vertical line is the first diverging module. A table under the charts lists every point.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln.compiler.diagnose.divergence_record import Divergence, ModuleError

HTML_FILE = "divergence.html"
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 900, 170, 70, 20, 20, 30
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; font-size: 0.85em; }
th { background: #f3f3f3; } tr.fail td { background: #fde2e2; } tr.first td { font-weight: bold; }
.legend { color: #555; font-size: 0.85em; max-width: 70em; }
svg text { font-size: 11px; fill: #444; }
"""
LEGEND = (
    "x: module boundaries in execution order. Each point is one module's output against PyTorch's on the parity "
    "inputs (grey: within tolerance, red: out of it). Dashed: the tolerance. Red vertical line: the first "
    "diverging module; the error of the points left of it shows its inputs still matched, the points right of it "
    "show whether the error grows or jumps."
)


def write_profile(found: list[Divergence], path: Path) -> Path:
    """Write the page for one or more localizations (one section each) to `path` (`--html`)."""
    from kiln.compiler.parity.input_files import check_output_file

    check_output_file(path, "--html", HTML_FILE).write_text(profile_page(found))
    return path


def profile_page(found: list[Divergence]) -> str:
    """The whole page."""
    sections = "".join(_section(d) for d in found)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Kiln error profile</title>'
        f"<style>{STYLE}</style></head><body><h1>Kiln error profile</h1>"
        f'<p class="legend">{html.escape(LEGEND)}</p>{sections}</body></html>\n'
    )


def _section(divergence: Divergence) -> str:
    esc = html.escape
    points = divergence.measured
    first = divergence.first.index if divergence.first else None
    tolerance = divergence.tolerance
    charts = [
        _chart("cosine", [(p.index, p.cosine) for p in points], points, divergence, tolerance.get("min_cosine")),
        _chart("SNR (dB)", [(p.index, p.snr_db) for p in points], points, divergence, tolerance.get("min_snr_db")),
        _chart("max abs error (log10)", [(p.index, _log(p.max_abs)) for p in points], points, divergence, None),
    ]
    rows = []
    for p in points:
        kind = "first" if p.index == first else ("fail" if not p.passed else "")
        rows.append(
            f'<tr class="{kind}"><td>{p.index + 1}</td><td>{esc(p.label())}</td><td>{"ok" if p.passed else "FAIL"}'
            f"</td><td>{p.cosine:.6f}</td><td>{p.snr_db:.1f}</td><td>{p.max_abs:.3g}</td><td>{esc(p.reason)}</td></tr>"
        )
    return (
        f"<h2>{esc(divergence.target)} {esc(divergence.precision)}</h2><p><b>{esc(divergence.summary())}</b></p>"
        f"<p>{len(points)} of {divergence.boundaries} module boundaries measured, {divergence.builds} builds, "
        f"method {esc(divergence.method)}</p>{''.join(charts)}"
        "<table><thead><tr><th>#</th><th>module</th><th>verdict</th><th>cosine</th><th>SNR dB</th>"
        f"<th>max abs</th><th>why</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _log(value: float) -> float:
    return math.log10(value) if value > 0 and math.isfinite(value) else (math.inf if value > 0 else -math.inf)


def _chart(
    title: str,
    values: list[tuple[int, float]],
    points: list[ModuleError],
    divergence: Divergence,
    line: float | None,
) -> str:
    """One SVG chart; non-finite values are drawn at the edge of the axis."""
    finite = [v for _, v in values if math.isfinite(v)] + ([line] if line is not None else [])
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    span, count = high - low, max(divergence.boundaries, 1)

    def x(index: int) -> float:
        return LEFT + (WIDTH - LEFT - RIGHT) * (index + 0.5) / count

    def y(value: float) -> float:
        value = min(max(value, low), high) if not math.isnan(value) else low
        return TOP + (HEIGHT - TOP - BOTTOM) * (1 - (value - low) / span)

    parts = [
        f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" '
        'fill="none" stroke="#ccc"/>',
        f'<text x="{LEFT}" y="12">{html.escape(title)}</text>',
        f'<text x="4" y="{TOP + 10}">{high:.4g}</text><text x="4" y="{HEIGHT - BOTTOM}">{low:.4g}</text>',
    ]
    if line is not None:
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(line):.1f}" y2="{y(line):.1f}" '
                     'stroke="#888" stroke-dasharray="5,4"/>')  # fmt: skip
    if divergence.first is not None:
        fx = x(divergence.first.index)
        parts.append(f'<line x1="{fx:.1f}" x2="{fx:.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}" stroke="#c00"/>'
                     f'<text x="{fx + 3:.1f}" y="{HEIGHT - 8}" fill="#c00">'
                     f"{html.escape(divergence.first.label())}</text>")  # fmt: skip
    path = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in values)
    parts.append(f'<polyline points="{path}" fill="none" stroke="#36c" stroke-width="1"/>')
    for (index, value), point in zip(values, points):
        colour = "#c00" if not point.passed else "#666"
        parts.append(f'<circle cx="{x(index):.1f}" cy="{y(value):.1f}" r="3" fill="{colour}">'
                     f"<title>{html.escape(point.label())}: {value:.6g}</title></circle>")  # fmt: skip
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}">{"".join(parts)}</svg>'
