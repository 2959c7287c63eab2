"""divergence.html: each module's error along the network, in execution order, as one self-contained page
(inline SVG, no script, no external asset), the tolerance drawn as a line and the first divergence marked.

Three charts share the x axis (the module boundaries in execution order): cosine to PyTorch, SNR in dB and the
largest absolute error (log scale). A point is a boundary that was measured (built, or read from the runtime);
a red point failed the tolerance; the dashed line is the tolerance (min cosine, min SNR when the precision has
one); the red vertical line is the first diverging module. A table under the charts lists every point.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.compiler.pages import FAILED, LINE, POINT, Axis, Cell, Frame, decade_axis, esc, linear_axis, page, table

if TYPE_CHECKING:
    from kiln.compiler.diagnose.divergence_record import Divergence

HTML_FILE = "divergence.html"
WIDTH, HEIGHT = 900, 200
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
    return page("Kiln error profile", [f'<p class="legend">{esc(LEGEND)}</p>', *(_section(d) for d in found)])


def _section(divergence: Divergence) -> str:
    points = divergence.measured
    first = divergence.first.index if divergence.first else None
    tolerance = divergence.tolerance
    charts = [
        _chart(linear_axis, "cosine", [p.cosine for p in points], divergence, tolerance.get("min_cosine")),
        _chart(linear_axis, "SNR (dB)", [p.snr_db for p in points], divergence, tolerance.get("min_snr_db")),
        _chart(decade_axis, "max abs error", [_log(p.max_abs) for p in points], divergence, None),
    ]
    rows = []
    for p in points:
        kind = "first" if p.index == first else ("fail" if not p.passed else "")
        figures = (f"{p.cosine:.6f}", f"{p.snr_db:.1f}", f"{p.max_abs:.3g}")
        rows.append((kind, [Cell(str(p.index + 1), "num"), p.label(), "ok" if p.passed else "FAIL",
                            *(Cell(f, "num") for f in figures), p.reason]))  # fmt: skip
    labels = ("cosine", "SNR dB", "max abs")
    head: list[str | Cell] = [Cell("#", "num"), "module", "verdict", *(Cell(h, "num") for h in labels), "why"]
    return (
        f'<h2>{esc(divergence.target)} {esc(divergence.precision)}</h2><p class="verdict"><b>'
        f"{esc(divergence.summary())}</b></p><p>{len(points)} of {divergence.boundaries} module boundaries measured, "
        f"{divergence.builds} builds, method {esc(divergence.method)}</p>{''.join(charts)}{table(head, rows)}"
    )


def _log(value: float) -> float:
    return math.log10(value) if value > 0 and math.isfinite(value) else (math.inf if value > 0 else -math.inf)


def _chart(
    make_axis: Callable[[str, float, float], Axis],
    title: str,
    values: list[float],
    divergence: Divergence,
    line: float | None,
) -> str:
    """One chart of the measured boundaries' `values` (a log chart is given log10 values, `make_axis`
    decade_axis); non-finite values are drawn at the edge of the axis."""
    finite = [v for v in values if math.isfinite(v)] + ([line] if line is not None else [])
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    y_axis = make_axis(title, low, high)
    frame = Frame(_boundary_axis(divergence.boundaries), y_axis, WIDTH, HEIGHT, left=80, top=28, bottom=42)

    def y(value: float) -> float:
        return frame.y(value if not math.isinf(value) else (y_axis.high if value > 0 else y_axis.low))

    parts = []
    if line is not None:
        parts.append(f'<line x1="{frame.left}" x2="{WIDTH - frame.right}" y1="{y(line):.1f}" y2="{y(line):.1f}" '
                     f'stroke="{LINE}" stroke-dasharray="5,4"/>')  # fmt: skip
    if divergence.first is not None:
        fx = frame.x(divergence.first.index + 1)
        side = f'x="{fx + 4:.1f}"' if fx < WIDTH / 2 else f'x="{fx - 4:.1f}" text-anchor="end"'  # inside the chart
        parts.append(f'<line x1="{fx:.1f}" x2="{fx:.1f}" y1="{frame.top}" y2="{HEIGHT - frame.bottom}" '
                     f'stroke="{FAILED}"/><text {side} y="{frame.top + 12}" fill="{FAILED}">'
                     f"{esc(divergence.first.label())}</text>")  # fmt: skip
    points = list(zip(divergence.measured, values))
    path = " ".join(f"{frame.x(p.index + 1):.1f},{y(v):.1f}" for p, v in points)
    parts.append(f'<polyline points="{path}" fill="none" stroke="{POINT}" stroke-width="1"/>')
    for point, value in points:
        colour = FAILED if not point.passed else "#666"
        parts.append(f'<circle cx="{frame.x(point.index + 1):.1f}" cy="{y(value):.1f}" r="3" fill="{colour}">'
                     f"<title>{esc(point.label())}: {value:.6g}</title></circle>")  # fmt: skip
    return frame.draw(parts, f"{title} at each module boundary", f"{title} against PyTorch")


def _boundary_axis(count: int) -> Axis:
    """The x axis: the module boundaries 1..count in execution order, whole numbers labelled."""
    ticks = tuple(t for t in linear_axis("", 1, max(count, 2), 10).ticks if t[0] == int(t[0]) and 1 <= t[0] <= count)
    return Axis("module boundary, in execution order (# in the table)", 0.5, max(count, 1) + 0.5, ticks)
