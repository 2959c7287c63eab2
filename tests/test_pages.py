"""The HTML pages a person reads, in their one shared look (`kiln.compiler.pages`): `kiln tune`'s leaderboard.html
built from a small leaderboard (ranked by `rank`, no tune run) and divergence.html from a small localization
record, laid out in a real headless browser: the table's cells, the chart's labelled axes, nothing wider than
the window. (report.html is checked the same way in tests/test_matrix.py, on a real matrix run.)"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
from kiln.compiler.diagnose.divergence_record import Divergence, ModuleError
from kiln.compiler.diagnose.profile_html import profile_page
from kiln.compiler.matrix.results import PASSED, CellResult
from kiln.compiler.pages import STYLE, linear_axis
from kiln.compiler.perf.leaderboard import EXACT, accuracy_position, html_page, markdown
from kiln.compiler.perf.tune_candidates import Entry, Variant
from kiln.compiler.perf.tune_report import rank
from kiln.targets.base import RuntimeSettings

from tests.browser import fits_the_window, render

LONG = "onnx fp32 NHWC batch=1:64 -O0 [graph-optimization=basic] x16 threads"  # wraps in its cell


def _entry(name: str, precision: str, p50: float, cosine: float, max_abs: float, **more: Any) -> Entry:
    build = CellResult(f"m/onnx/{precision}", "m", "zoo:cnn", "onnx", precision, PASSED, min_cosine=cosine,
                       max_abs_error=max_abs, artifact_bytes=480_000 if precision == "fp32" else 130_000)  # fmt: skip
    rounds = [p50 * 1.01, p50, p50 * 0.99]
    timing = {"latency_ms": {"p50": p50, "p90": p50 * 1.1}, "round_medians_ms": rounds, "spread": 1.02,
              "throughput_items_per_s": 1000 / p50, "batch": 1, "timed_runs": 30}  # fmt: skip
    return Entry(name, "onnx", precision, False, more.pop("settings", RuntimeSettings()), None, build, Path("."),
                 timing=timing, **more)  # fmt: skip


def _board(entries: list[Entry], timed: bool = True) -> dict[str, Any]:
    board = rank(entries, "latency", 1, timed=timed)
    host = {"host": "here", "cpu": "a test CPU", "cpu_flags": ["avx2"], "cores": 2, "threads": 2}
    skipped = [{"target": "onnx", "precision": "bf16", "reason": "ONNX Runtime has no bf16 here"}]
    return board | {"model": "zoo:cnn", "builds": len(entries), "timed_on": host if timed else None,
                    "built_on": [host], "built_elsewhere": False, "cpu_notes": ["onnx int8 gave no speed-up"],
                    "skipped": skipped}  # fmt: skip


def _exact_board() -> dict[str, Any]:
    """Every survivor an fp32 build at cosine 1.000000 (what made the old chart a flat row of dots); one int8
    candidate rejected by the gate."""
    fp32 = [_entry("onnx fp32", "fp32", 0.161, 0.99999999, 8.9e-8),
            _entry("onnx fp32 [graph-optimization=basic]", "fp32", 0.190, 1.0, 8.9e-8,
                   settings=RuntimeSettings(graph_optimization="basic")),
            _entry("onnx fp32 NHWC", "fp32", 0.165, 0.99999998, 9.5e-8, variant=Variant(layout="nhwc")),
            _entry("onnx fp32 -O0", "fp32", 0.317, 1.0, 8.9e-8),
            _entry(LONG, "fp32", 0.42, 1.0, 1e-7)]  # fmt: skip
    reason = "parity failed: output 0: cosine 0.9412 < 0.99 (min_cosine); " + "very long reason " * 30
    return _board([*fp32, _entry("onnx int8", "int8", 0.142, 0.9412, 0.31, rejected=reason)])


def _mixed_board() -> dict[str, Any]:
    """fp32 and int8 candidates: a real trade-off of latency against accuracy."""
    return _board([_entry("onnx fp32", "fp32", 0.161, 1.0, 8.9e-8), _entry("onnx int8", "int8", 0.09, 0.99962, 4.4e-3),
                   _entry("onnx int8 [graph-optimization=basic]", "int8", 0.12, 0.9951, 2.1e-2,
                          settings=RuntimeSettings(graph_optimization="basic"))])  # fmt: skip


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_an_all_exact_leaderboard_is_a_table_and_a_chart_with_labelled_axes(tmp_path):
    """The page the issue showed: every candidate fp32 at cosine 1.000000. A real table (no Markdown text), the
    chart's axes labelled with values, the exact ones on the labelled "exact" band, the winner and the rejected
    with its reason; nothing wider than the window."""
    board = _exact_board()
    page = _write(tmp_path, "leaderboard.html", html_page(board))
    dom, measured = render(page, tmp_path)
    fits_the_window(measured)
    assert "| rank |" not in dom and "<pre" not in dom.replace('<pre id="kiln-measure">', "")  # no Markdown page
    table = re.search(r'<table id="leaderboard">.*?</table>', dom, re.DOTALL)
    assert table is not None
    cells = re.findall(r"<td[^>]*>(.*?)</td>", table[0], re.DOTALL)
    for row in board["candidates"]:
        assert row["name"] in cells or f"{row['name']} (winner)" in cells, row["name"]
        assert f"{row['p50_ms']:.3f}" in cells
    assert "0.161" in cells and "1.000000" in cells and "8.90e-08" in cells
    (chart,) = measured["charts"]
    assert chart["points"] >= len(board["candidates"])
    assert chart["y_ticks"][0] == "exact" and "0.999999" in chart["y_ticks"] and "0.9999" in chart["y_ticks"]
    assert len(chart["x_ticks"]) >= 3 and all(re.fullmatch(r"\d+(\.\d+)?", t) for t in chart["x_ticks"])
    assert float(chart["x_ticks"][0]) == 0 and float(chart["x_ticks"][-1]) >= 0.42  # from 0 past the slowest
    assert any("p50 latency (ms)" in a for a in chart["axes"]) and any("worst cosine" in a for a in chart["axes"])
    assert 'class="band"' in dom and "exact" in dom  # the choice is drawn and said on the page
    assert f"Winner: <b>{board['winner']['name']}</b>" in dom and board["why"] in dom
    rejected = re.search(r'<table id="rejected">.*?</table>', dom, re.DOTALL)
    assert rejected is not None and "onnx int8" in rejected[0] and "cosine 0.9412 &lt; 0.99" in rejected[0]
    assert "ONNX Runtime has no bf16 here" in dom and "onnx int8 gave no speed-up" in dom
    assert STYLE in page.read_text() and "<script" not in page.read_text()


def test_a_leaderboard_with_a_trade_off_places_each_candidate_by_latency_and_cosine(tmp_path):
    """fp32 on the exact band, int8 at 1 - cosine = 3.8e-4 and 4.9e-3: the y axis runs from the band up past
    cosine 0.99, each point is where its figures say, the Pareto front is joined."""
    board = _mixed_board()
    page = _write(tmp_path, "leaderboard.html", html_page(board))
    dom, measured = render(page, tmp_path)
    fits_the_window(measured)
    (chart,) = measured["charts"]
    assert chart["y_ticks"] == ["exact", "0.999999", "0.99999", "0.9999", "0.999", "0.99"]
    assert "<polyline" in dom  # the front: int8 (fastest) and fp32 (exact)
    assert board["pareto"] == ["onnx int8", "onnx fp32"]
    circles = dict(re.findall(r'<circle cx="[\d.]+" cy="([\d.]+)" r="5"[^>]*><title>\d+\. ([^:]+):', dom))
    heights = {name: float(y) for y, name in circles.items()}
    assert heights["onnx fp32"] > heights["onnx int8"] > heights["onnx int8 [graph-optimization=basic]"]


def test_a_build_only_leaderboard_has_its_table_and_says_why_there_is_no_chart(tmp_path):
    board = _board([_entry("onnx fp32", "fp32", 0.161, 1.0, 8.9e-8)], timed=False)
    page = _write(tmp_path, "leaderboard.html", html_page(board))
    dom, measured = render(page, tmp_path)
    fits_the_window(measured)
    assert not measured["charts"] and "no latency chart" in dom and "built, not timed" in dom
    assert "kiln tune --time-only" in dom and "No winner" in dom


def _divergence(first: int, module: str = "body") -> Divergence:
    """40 boundaries measured, the error growing steadily, the first failing one at `first`."""
    points = []
    for index in range(40):
        point = ModuleError(index, f"{module}.{index}", "Conv2d", measured=True, passed=index < first,
                            max_abs=0.0 if index == 0 else 10 ** (-7 + index / 8), cosine=1 - index * 1e-4,
                            snr_db=math.inf if index == 0 else 90 - index)  # fmt: skip
        points.append(point)
    return Divergence(target="onnx", precision="fp16", first=points[first], inputs=points[first - 1],
                      following=points[first + 1 :], measured=points, boundaries=40, builds=7, seconds=3.0,
                      tolerance={"min_cosine": 0.998, "min_snr_db": 60.0})  # fmt: skip


def test_the_error_profile_has_labelled_axes_and_fits_the_window(tmp_path):
    """divergence.html in the same look: three charts per localization whose y axes carry values, the x axis the
    boundaries; the first divergence's name stays inside its chart when it is near the end."""
    late = "decoder.layers.final_projection_with_a_long_name"
    page = _write(tmp_path, "divergence.html", profile_page([_divergence(25), _divergence(38, late)]))
    dom, measured = render(page, tmp_path)
    fits_the_window(measured)
    assert len(measured["charts"]) == 6
    for chart in measured["charts"]:
        assert len(chart["y_ticks"]) >= 3 and chart["points"] == 40
        assert chart["x_ticks"][0] in ("1", "5") and "40" in chart["x_ticks"]
    assert measured["charts"][0]["y_ticks"][-1] == "1.000" and measured["charts"][1]["y_ticks"][-1] == "90"
    assert "1e-7" in measured["charts"][2]["y_ticks"] and "body.25 (Conv2d)" in dom and f"{late}.38 (Conv2d)" in dom
    assert STYLE in page.read_text()


def test_exact_is_a_cosine_of_one_to_the_tie_rules_digits():
    assert accuracy_position(1.0) == accuracy_position(0.9999996) == EXACT
    assert accuracy_position(0.999) == pytest.approx(-3)
    assert accuracy_position(math.nan) is None and accuracy_position(None) is None
    assert EXACT < accuracy_position(0.9999994) < -6  # just below the band's last digit: above the band


def test_the_pareto_front_reads_the_cosine_as_the_tie_rule_does():
    """Two fp32 builds whose cosines differ only in the 8th digit are equally accurate: the slower is not on the
    front (before, its 1e-8 better cosine put it there)."""
    board = _board([_entry("fast", "fp32", 0.1, 0.99999998, 9e-8), _entry("slow", "fp32", 0.2, 1.0, 8e-8)])
    assert board["pareto"] == ["fast"]


def test_linear_axis_ticks_are_round_numbers_covering_the_range():
    axis = linear_axis("ms", 0.0, 0.42)
    assert [label for _, label in axis.ticks] == ["0.0", "0.1", "0.2", "0.3", "0.4", "0.5"]
    assert axis.low == 0 and axis.high >= 0.42
    assert [label for _, label in linear_axis("", 0.9995, 1.0, 4).ticks][-1] == "1.0000"
    flat = linear_axis("", 3.0, 3.0)  # one value: a range around it, still labelled
    assert flat.low < 3.0 < flat.high and len(flat.ticks) >= 2


def test_the_markdown_leaderboard_is_unchanged_by_the_page():
    text = markdown(_exact_board())
    assert "| rank | candidate |" in text and "## Rejected" in text and "**Winner: onnx fp32**" in text
