"""The look of Kiln's HTML pages, in one place: the matrix's report.html, `kiln tune`'s leaderboard.html and the
error profile divergence.html share this stylesheet, this page shell, these tables and these chart frames.

A page is self-contained (no external asset; report.html inlines plotly, the others draw inline SVG and run no
script), fits the width of the window (tables wrap their cells, a table wider than the window scrolls in its own
box, charts scale down), and uses one colour code: red is a failure, blue a measured point, orange a Pareto front.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
.wide { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.35em 0.6em; font-size: 0.9em; vertical-align: top;
         overflow-wrap: break-word; text-align: left; }
th { background: #f3f3f3; }
th.num, td.num { text-align: right; font-variant-numeric: tabular-nums; } td.num { white-space: nowrap; }
td.text { white-space: pre-wrap; }
tr.winner td { background: #e6f6e6; font-weight: bold; }
tr.fail td { background: #fde2e2; } tr.first td { font-weight: bold; }
td.passed { background: #e6f6e6; } td.parity_failed { background: #fff3d6; }
td.conversion_failed, td.not_run { background: #fde2e2; } td.unavailable { background: #eee; color: #666; }
td .figures { color: #555; font-size: 0.85em; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
.verdict { font-size: 1.05em; }
.legend { color: #555; font-size: 0.85em; max-width: 70em; }
svg.chart { display: block; max-width: 100%; height: auto; margin: 0.5em 0; }
svg.chart text { font-size: 12px; fill: #444; }
svg.chart text.title { font-size: 13px; fill: #222; }
svg.chart .grid { stroke: #e4e4e4; } svg.chart .frame { fill: none; stroke: #bbb; }
svg.chart .band { fill: #eef5ee; }
"""
FAILED, POINT, FRONT, LINE = "#c00", "#36c", "#d95f02", "#888"  # the colour code of every chart


def esc(value: object) -> str:
    return html.escape(str(value))


def page(title: str, body: Iterable[str]) -> str:
    """A whole page: the shell, the stylesheet, `title` as its title and first heading, then `body` (HTML)."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>\n<h1>{esc(title)}</h1>\n"
        + "\n".join(part for part in body if part)
        + "\n</body></html>\n"
    )


@dataclass(frozen=True)
class Cell:
    """A table cell: its HTML and its class ("num": a right-aligned figure, "text": a message kept as written)."""

    content: str
    kind: str = ""


def table(head: Sequence[str | Cell], rows: Iterable[tuple[str, Sequence[str | Cell]]], table_id: str = "") -> str:
    """A table in its scrolling box; `rows` are (the row's class, its cells). A plain string is text (escaped);
    a Cell is HTML, the caller's to escape."""

    def cell(tag: str, value: str | Cell) -> str:
        if isinstance(value, Cell):
            kind = f' class="{value.kind}"' if value.kind else ""
            return f"<{tag}{kind}>{value.content}</{tag}>"
        return f"<{tag}>{esc(value)}</{tag}>"

    def row(kind: str, cells: Sequence[str | Cell]) -> str:
        return f"<tr{f' class={kind!r}' if kind else ''}>{''.join(cell('td', c) for c in cells)}</tr>"

    ident = f' id="{esc(table_id)}"' if table_id else ""
    body = "".join(row(kind, cells) for kind, cells in rows)
    return (
        f'<div class="wide"><table{ident}><thead><tr>{"".join(cell("th", h) for h in head)}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def number(value: float | None, spec: str) -> str:
    """`value` formatted by `spec`, or "n/a" when it is missing or not a finite number."""
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


@dataclass(frozen=True)
class Axis:
    """One axis of a chart: its title, its range (in the chart's coordinates: a log axis is given log10 values)
    and its labelled ticks (position, label)."""

    title: str
    low: float
    high: float
    ticks: tuple[tuple[float, str], ...]


def linear_axis(title: str, low: float, high: float, count: int = 6) -> Axis:
    """An axis over [low, high] widened to round numbers, with about `count` ticks at 1, 2, 2.5 or 5 x 10^k."""
    if not (math.isfinite(low) and math.isfinite(high)):
        low, high = 0.0, 1.0
    if high - low < 1e-12 * max(1.0, abs(low), abs(high)):
        low, high = low - max(abs(low) * 0.01, 0.5), high + max(abs(high) * 0.01, 0.5)
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) + (1 if round(step / magnitude, 3) == 2.5 else 0)
    ticks = tuple((i * step, _tick(i * step, decimals)) for i in range(first, last + 1))
    return Axis(title, first * step, last * step, ticks)


def decade_axis(title: str, low: float, high: float) -> Axis:
    """A log axis given log10 values: whole decades from below `low` to above `high`, labelled 1e-6, 1e-5, ..."""
    if not (math.isfinite(low) and math.isfinite(high)):
        low, high = 0.0, 1.0
    first, last = math.floor(low), max(math.ceil(high), math.floor(low) + 1)
    return Axis(title, first, last, tuple((k, f"1e{k}") for k in range(first, last + 1)))


def _tick(value: float, decimals: int) -> str:
    if abs(value) >= 1e6 or decimals > 9:
        return f"{value:.3g}"
    return f"{value:.{decimals}f}"


@dataclass(frozen=True)
class Frame:
    """The drawing area of one chart: two axes, the size in pixels and the margins that hold the ticks' labels
    and the axes' titles. `x` and `y` map a value to its pixel (values outside the axis sit on its edge)."""

    x_axis: Axis
    y_axis: Axis
    width: int = 760
    height: int = 380
    left: int = 90
    right: int = 20
    top: int = 20
    bottom: int = 50

    def x(self, value: float) -> float:
        return self.left + (self.width - self.left - self.right) * _fraction(value, self.x_axis)

    def y(self, value: float) -> float:
        return self.top + (self.height - self.top - self.bottom) * (1 - _fraction(value, self.y_axis))

    def draw(self, body: Iterable[str], label: str, title: str = "") -> str:
        """The chart: the frame, the grid, both axes with their labelled ticks and titles, then `body` (SVG)."""
        right, bottom = self.width - self.right, self.height - self.bottom
        parts = [f'<text class="title" x="{self.left}" y="{self.top - 12}">{esc(title)}</text>' if title else ""]
        for value, text in self.x_axis.ticks:
            px = self.x(value)
            parts.append(f'<line class="grid" x1="{px:.1f}" x2="{px:.1f}" y1="{self.top}" y2="{bottom}"/>'
                         f'<text class="tick x" x="{px:.1f}" y="{bottom + 16}" text-anchor="middle">'
                         f"{esc(text)}</text>")  # fmt: skip
        for value, text in self.y_axis.ticks:
            py = self.y(value)
            parts.append(f'<line class="grid" x1="{self.left}" x2="{right}" y1="{py:.1f}" y2="{py:.1f}"/>'
                         f'<text class="tick y" x="{self.left - 6}" y="{py + 4:.1f}" text-anchor="end">'
                         f"{esc(text)}</text>")  # fmt: skip
        parts.append(f'<rect class="frame" x="{self.left}" y="{self.top}" width="{right - self.left}" '
                     f'height="{bottom - self.top}"/>')  # fmt: skip
        middle = (self.top + bottom) / 2
        parts.append(f'<text class="axis x" x="{(self.left + right) / 2:.1f}" y="{self.height - 8}" '
                     f'text-anchor="middle">{esc(self.x_axis.title)}</text>'
                     f'<text class="axis y" x="14" y="{middle:.1f}" text-anchor="middle" '
                     f'transform="rotate(-90 14 {middle:.1f})">{esc(self.y_axis.title)}</text>')  # fmt: skip
        parts.extend(body)
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" aria-label="{esc(label)}" '
            f'width="{self.width}" height="{self.height}" viewBox="0 0 {self.width} {self.height}">'
            f"{''.join(parts)}</svg>"
        )


def _fraction(value: float, axis: Axis) -> float:
    if math.isnan(value):
        return 0.0
    return min(max((value - axis.low) / (axis.high - axis.low), 0.0), 1.0)
