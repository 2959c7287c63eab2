"""`kiln tune`'s leaderboards, rendered from the board that `kiln.compiler.perf.tune_report.rank` made:
leaderboard.json (the board itself), leaderboard.md and leaderboard.html (the shared look of
`kiln.compiler.pages`: a table, the latency-against-accuracy chart, the winner and the rejected with their reasons).

The chart: x is the p50 latency (ms, from 0); y is the worst cosine to the reference on a log scale of
1 - cosine, labelled in cosines (0.99, 0.999, ...), lower is more accurate. A cosine equal to 1 to
ACCURACY_DIGITS digits (what the tie rule calls equally accurate, and what every fp32 build reaches) has no
place on a log scale: it sits on the "exact" band at the bottom. The Pareto front is joined in orange, the
winner ringed, each point labelled with its rank in the table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kiln.compiler.pages import FRONT, POINT, Axis, Cell, Frame, esc, linear_axis, number, page, table
from kiln.compiler.perf.tune_report import ACCURACY_DIGITS, cpu_notes

EXACT = -ACCURACY_DIGITS - 1.0  # where the "exact" band is drawn, a decade below the last digit the tie rule reads
CHART_LEGEND = (
    "x: median (p50) latency in ms. y: the worst cosine to the reference over the parity inputs, on a log scale of "
    f"1 − cosine (lower is more accurate); a cosine of 1 to {ACCURACY_DIGITS} digits (every fp32 build, as a rule) "
    'sits on the "exact" band at the bottom: what the tie rule counts as equally accurate. Each point is labelled '
    "with its rank in the table. Orange: the Pareto front (no candidate is both faster and more accurate); ringed: "
    "the winner."
)
TABLE_LEGEND = (
    'spread: the slowest over the fastest round\'s median ("!": too wide to trust); max abs error: against the '
    "reference; Pareto: on the front of the chart."
)


def write_leaderboards(out: Path, board: dict[str, Any]) -> None:
    """leaderboard.md, leaderboard.json and leaderboard.html in `out`."""
    from kiln.compiler.host import host_info
    from kiln.compiler.perf.tune_files import LEADERBOARDS
    from kiln.compiler.safe_fs import write_file

    board["cpu_notes"] = cpu_notes(board)
    board["host"] = host_info()
    pages = (markdown(board), json.dumps(board, indent=2, default=str) + "\n", html_page(board))
    for name, text in zip(LEADERBOARDS, pages):  # written anew, never through a link planted there
        write_file(out / name, text)


def markdown(board: dict[str, Any]) -> str:
    """leaderboard.md: the ranked candidates, the winner and why, the rejected, the CPU notes."""
    lines = [f"# kiln tune: {board['model']} ({_heading(board)})", ""]
    winner = board["winner"]
    lines += [f"**Winner: {winner['name']}** -> `best/`. {board['why']}." if winner else f"No winner: {board['why']}."]
    lines += ["", *where_lines(board)]
    if not board.get("timed", True):
        lines += ["", "| candidate | size KiB | min cosine | status |", "|---|---:|---:|---|"]
        lines += [f"| {r['name']} | {(r['artifact_bytes'] or 0) / 1024:.0f} | {_cos(r['min_cosine'])} | {r['status']} |"
                  for r in board["candidates"]]  # fmt: skip
    else:
        lines += _ranked_table(board)
    return "\n".join(lines + _lists(board)) + "\n"


def _heading(board: dict[str, Any]) -> str:
    batch = board.get("batch")
    return f"objective: {board['objective']}" + (f", timed at batch {batch}" if batch is not None else "")


def where_lines(board: dict[str, Any]) -> list[str]:
    """Where the candidates were timed and built (host, CPU, flags, threads): a leaderboard moved between machines,
    or timed on another machine than the one that built, says so."""

    def name(m: dict[str, Any]) -> str:
        flags = " ".join(m.get("cpu_flags") or []) or "none of note"
        return f"{m.get('host')} ({m.get('cpu')}; CPU flags: {flags}; {m.get('cores')} cores)"

    timed, built = board.get("timed_on"), board.get("built_on") or []
    lines = [f"Timed on {name(timed)}, threads: {timed.get('threads')}." if timed else "Not timed (--build-only)."]
    if built and board.get("built_elsewhere"):
        lines.append(f"Built elsewhere, on {', '.join(name(m) for m in built)}: the timings are the timing machine's.")
    elif built:
        lines.append("Built on the same machine." if timed else f"Built on {', '.join(name(m) for m in built)}.")
    return lines


def _ranked_table(board: dict[str, Any]) -> list[str]:
    lines = ["", "| rank | candidate | I/O | batch | p50 ms | p90 ms | spread | items/s | size KiB | min cosine "
             "| Pareto |", "|---:|---|---|---|---:|---:|---:|---:|---:|---:|:-:|"]  # fmt: skip
    for r in board["candidates"]:
        lines.append(
            f"| {r['rank']} | {r['name']}{' **(winner)**' if r.get('winner') else ''} | "
            f"{(r.get('io_layout') or 'n/a').upper()} | {r.get('batch_range', 'static')} | {r['p50_ms']:.3f} | "
            f"{r['p90_ms']:.3f} | {_spread(r)} | {r['throughput_items_per_s']:.0f} | "
            f"{(r['artifact_bytes'] or 0) / 1024:.0f} | {_cos(r['min_cosine'])} | "
            f"{'yes' if r['name'] in board['pareto'] else ''} |"
        )
    return lines


def _spread(row: dict[str, Any]) -> str:
    return number(row["spread"], ".2f") + ("!" if row["spread_too_wide"] else "")


def _lists(board: dict[str, Any]) -> list[str]:
    """The rejected, the not built and the CPU notes."""
    lines: list[str] = []
    if board["rejected"]:
        lines += ["", "## Rejected", ""] + [f"- {r['name']}: {r['rejected']}" for r in board["rejected"]]
    if board["skipped"]:
        lines += ["", "## Not built", ""]
        lines += [f"- {_skipped_name(s)}: {s['reason']}" for s in board["skipped"]]
    if board["cpu_notes"]:
        lines += ["", "## Precisions without a speed-up on this CPU", ""] + [f"- {n}" for n in board["cpu_notes"]]
    return lines


def _skipped_name(skipped: dict[str, str]) -> str:
    """`target precision (variant)` of a build left out; "*": every one."""
    variant = f" ({skipped['variant']})" if skipped.get("variant") else ""
    return f"{skipped['target']} {skipped['precision']}{variant}"


def _cos(value: float | None) -> str:
    return number(value, f".{ACCURACY_DIGITS}f")


def html_page(board: dict[str, Any]) -> str:
    """leaderboard.html: the winner and why, where it was timed, the chart, the table, the rejected with their
    reasons, the precisions not built and the CPU notes. Self-contained: inline SVG, no script."""
    winner, timed = board["winner"], board.get("timed", True)
    verdict = (f"Winner: <b>{esc(winner['name'])}</b> → <code>best/</code>. {esc(board['why'])}." if winner
               else f"No winner: {esc(board['why'])}.")  # fmt: skip
    body = [f"<p>{esc(_heading(board))}</p>", f'<p class="verdict">{verdict}</p>',
            f'<p class="legend">{esc(" ".join(where_lines(board)))}</p>']  # fmt: skip
    if timed and board["candidates"]:
        body += ["<h2>Latency against accuracy</h2>", chart(board), f'<p class="legend">{esc(CHART_LEGEND)}</p>']
    elif not timed:
        body.append('<p class="legend">Not timed: no latency chart. Time the builds where they will run with '
                    "<code>kiln tune --time-only --out DIR</code>.</p>")  # fmt: skip
    body += ["<h2>Candidates</h2>", _ranked_html(board) if timed else _built_html(board)]
    if timed:
        body.append(f'<p class="legend">{esc(TABLE_LEGEND)}</p>')
    if board["rejected"]:
        rows = [("fail", [r["name"], Cell(esc(r["rejected"]), "text")]) for r in board["rejected"]]
        body += ["<h2>Rejected</h2>", table(["candidate", "why"], rows, "rejected")]
    if board.get("skipped"):
        items = "".join(f"<li>{esc(_skipped_name(s))}: {esc(s['reason'])}</li>" for s in board["skipped"])
        body += ["<h2>Not built</h2>", f"<ul>{items}</ul>"]
    if board.get("cpu_notes"):
        items = "".join(f"<li>{esc(note)}</li>" for note in board["cpu_notes"])
        body += ["<h2>Precisions without a speed-up on this CPU</h2>", f"<ul>{items}</ul>"]
    return page(f"kiln tune: {board['model']}", body)


def _ranked_html(board: dict[str, Any]) -> str:
    labels = ("p50 ms", "p90 ms", "spread", "items/s", "size KiB", "min cosine", "max abs error")
    head: list[str | Cell] = [Cell("rank", "num"), "candidate", "I/O", "batch", *(Cell(h, "num") for h in labels),
                              "Pareto"]  # fmt: skip
    rows = []
    for r in board["candidates"]:
        name = esc(r["name"]) + (" (winner)" if r.get("winner") else "")
        figures = [number(r["p50_ms"], ".3f"), number(r["p90_ms"], ".3f"), _spread(r),
                   number(r["throughput_items_per_s"], ".0f"), _kib(r), _cos(r["min_cosine"]),
                   number(r["max_abs_error"], ".2e")]  # fmt: skip
        cells = [Cell(str(r["rank"]), "num"), Cell(name), *_layout_cells(r), *(Cell(f, "num") for f in figures),
                 "yes" if r["name"] in board["pareto"] else ""]  # fmt: skip
        rows.append(("winner" if r.get("winner") else "", cells))
    return table(head, rows, "leaderboard")


def _built_html(board: dict[str, Any]) -> str:
    head: list[str | Cell] = ["candidate", "I/O", "batch", Cell("size KiB", "num"), Cell("min cosine", "num"),
            Cell("max abs error", "num"), "status"]  # fmt: skip
    rows = []
    for r in board["candidates"]:
        figures = (_kib(r), _cos(r["min_cosine"]), number(r["max_abs_error"], ".2e"))
        rows.append(("", [r["name"], *_layout_cells(r), *(Cell(f, "num") for f in figures), r["status"]]))
    return table(head, rows, "leaderboard")


def _layout_cells(row: dict[str, Any]) -> list[str]:
    return [(row.get("io_layout") or "n/a").upper(), str(row.get("batch_range", "static"))]


def _kib(row: dict[str, Any]) -> str:
    return number((row["artifact_bytes"] or 0) / 1024, ".0f")


def accuracy_position(cosine: float | None) -> float | None:
    """Where a worst cosine sits on the chart's y axis: log10(1 - cosine), EXACT for a cosine of 1 to
    ACCURACY_DIGITS digits, None when there is no finite cosine to draw."""
    if not isinstance(cosine, (int, float)) or not math.isfinite(cosine):
        return None
    if round(cosine, ACCURACY_DIGITS) >= 1.0:
        return EXACT
    return max(math.log10(1.0 - cosine), EXACT + 0.5)


def accuracy_axis(positions: list[float]) -> Axis:
    """The y axis: decades of 1 - cosine labelled as cosines, from the "exact" band up to the worst (at least
    two decades, at most cosine 0)."""
    top = min(max([math.ceil(p) for p in positions if p != EXACT] + [EXACT + 3]), 0)
    ticks = [(EXACT, "exact")] + [(float(k), _cosine_label(k)) for k in range(int(EXACT) + 1, int(top) + 1)]
    return Axis("worst cosine (log scale of 1 − cosine)", EXACT - 0.5, top + 0.25,
                tuple(ticks))  # fmt: skip


def _cosine_label(exponent: int) -> str:
    return "0" if exponent >= 0 else f"{1 - 10.0**exponent:.{-exponent}f}"


def chart(board: dict[str, Any]) -> str:
    """The latency-against-accuracy chart of the timed candidates (inline SVG)."""
    points = []
    for row in board["candidates"]:
        y = accuracy_position(row["min_cosine"])
        latency = row["p50_ms"]
        if y is not None and isinstance(latency, (int, float)) and math.isfinite(latency):
            points.append((row, float(latency), y))
    batch = f" at batch {board['batch']}" if board.get("batch") is not None else ""
    x_axis = linear_axis(f"p50 latency (ms){batch}; lower is faster", 0.0, max([p[1] for p in points] or [1.0]))
    frame = Frame(x_axis, accuracy_axis([p[2] for p in points]))
    band_top, band_bottom = frame.y(EXACT + 0.5), frame.y(EXACT - 0.5)
    parts = [f'<rect class="band" x="{frame.left}" y="{band_top:.1f}" width="{frame.width - frame.left - frame.right}"'
             f' height="{band_bottom - band_top:.1f}"/>']  # fmt: skip
    front = sorted((p for p in points if p[0]["name"] in board["pareto"]), key=lambda p: p[1])
    if len(front) > 1:
        line = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for _, x, y in front)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{FRONT}" stroke-dasharray="5,4"/>')
    labels: list[tuple[float, float]] = []
    for row, x, y in points:
        cx, cy = frame.x(x), frame.y(y)
        colour = FRONT if row["name"] in board["pareto"] else POINT
        title = f"{row['rank']}. {row['name']}: {x:.3f} ms, worst cosine {_cos(row['min_cosine'])}"
        ring = f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="9" fill="none" stroke="#222" stroke-width="2"/>'
        parts.append((ring if row.get("winner") else "") + f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" '
                     f'fill="{colour}"><title>{esc(title)}</title></circle>')  # fmt: skip
        lx, ly = _free_spot(cx + 8, cy - 8, labels)
        parts.append(f'<text class="point" x="{lx:.1f}" y="{ly:.1f}">{row["rank"]}</text>')
    return frame.draw(parts, "p50 latency against worst cosine, one point per candidate")


def _free_spot(x: float, y: float, taken: list[tuple[float, float]]) -> tuple[float, float]:
    """A place near (x, y) for a point's label that no earlier label holds (alternately above and below)."""
    for shift in (0, -13, 13, -26, 26, -39, 39):
        if all(abs(x - tx) > 18 or abs(y + shift - ty) > 12 for tx, ty in taken):
            taken.append((x, y + shift))
            return x, y + shift
    taken.append((x, y))
    return x, y
