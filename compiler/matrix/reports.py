"""The reports of a matrix run: report.json (everything), report.md, junit.xml and a self-contained report.html.

report.json is built first and the other three are rendered from it, so they always agree. The schema is
documented in docs/matrix.md.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import UsageError
from kiln.compiler.matrix.config import matches
from kiln.compiler.matrix.process import now
from kiln.compiler.matrix.report_html import html_page
from kiln.compiler.matrix.report_text import (
    ICONS,
    LEGEND,
    allowed_mark,
    cell_figures,
    headline,
    reason_text,
    settings_line,
    table_rows,
)
from kiln.compiler.matrix.results import FAILED_STATUSES, PASSED, STATUS_LABELS, UNAVAILABLE, CellResult
from kiln.compiler.safe_fs import write_file
from kiln.compiler.types import is_finite_number

if TYPE_CHECKING:
    from kiln.compiler.matrix.plan import Plan, RunSettings

REPORT_SCHEMA = "kiln.matrix.report"
REPORT_SCHEMA_VERSION = 1
BASELINE_HINT = "pass the report.json of an earlier run"
REPORT_FILES = ("report.json", "report.md", "junit.xml", "report.html")  # what `write_reports` writes into OUT
ERROR_FLOOR_OF_ATOL = 0.01  # parity errors below 1% of atol are noise: growth below that is no regression


def write_reports(plans: list[Plan], results: list[CellResult], out: Path, settings: RunSettings) -> dict[str, Any]:
    """Build report.json from the results and write it with report.md, junit.xml and report.html into `out`."""
    report = build_report(plans, results, settings)
    json_file, markdown_file, junit_file, html_file = REPORT_FILES
    write_file(out / json_file, json.dumps(report, indent=1) + "\n")
    write_file(out / markdown_file, markdown(report))
    write_file(out / junit_file, junit(report))
    write_file(out / html_file, html_page(report))
    return report


def build_report(plans: list[Plan], results: list[CellResult], settings: RunSettings) -> dict[str, Any]:
    """The whole result as JSON-ready data: summary, columns, rows, cells and regressions."""
    import kiln

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
        "generated_at": now(),
        "kiln_version": kiln.__version__,
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


def _columns(cells: list[dict[str, Any]]) -> list[str]:
    """`target/precision` columns in registry order of targets and each target's order of precisions."""
    from kiln.targets import TARGETS

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
        if is_finite_number(new_error) and is_finite_number(old_error):
            atol = (cell.get("tolerance") or {}).get("atol") or 1e-4
            if new_error > settings.error_factor * max(old_error, ERROR_FLOOR_OF_ATOL * atol):
                kinds.append(("error_grew", f"max abs error {old_error:.3g} -> {new_error:.3g} "
                                            f"(over {settings.error_factor:g}x)"))  # fmt: skip
        new_ms, old_ms = cell.get("latency_ms"), before.get("latency_ms")
        if (
            is_finite_number(new_ms)
            and is_finite_number(old_ms)
            and old_ms > 0
            and new_ms > settings.latency_factor * old_ms
        ):
            kinds.append(("slower", f"latency {old_ms:.3g} -> {new_ms:.3g} ms (+{100 * (new_ms / old_ms - 1):.0f}%)"))
        for kind, detail in kinds:
            found.append(
                {"cell_id": cell["cell_id"], "kind": kind, "detail": detail, "allowed_to_fail": cell["allowed_to_fail"]}
            )
    return found


# ------------------------------------------------------------------------------------------ text forms


def markdown(report: dict[str, Any]) -> str:
    """report.md: a table with one row per model and one column per target/precision, a legend, the failures."""
    columns = report["columns"]
    lines = ["# Kiln conversion matrix", "", f"**{headline(report)}**", "", settings_line(report), ""]
    lines.append("| model | " + " | ".join(c.replace("/", " ") for c in columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    for model, cells in table_rows(report):
        row = [" · ".join([ICONS[c["status"]] + allowed_mark(c), *cell_figures(c)]) if c else "" for c in cells]
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
            lines.append(f"- **{cell['cell_id']}** ({kind}{allowed}): {reason_text(cell['reason'])}")
            if cell.get("divergence"):
                record, page = cell["divergence"], str(Path(cell["divergence"]).with_suffix(".html"))
                lines.append(f"  - {reason_text(cell['divergence_summary'])}: [{record}]({record}), [profile]({page})")
        lines.append("")
    unavailable = [c for c in report["cells"] if c["status"] == UNAVAILABLE]
    if unavailable:
        lines += ["## Unavailable here", ""]
        lines += [f"- {c['cell_id']}: {reason_text(c['reason'])}" for c in unavailable]
        lines.append("")
    return "\n".join(lines)


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
            failure = ET.SubElement(case, "failure", message=f"{label}: {reason_text(cell['reason'])}"[:1000],
                                    type=cell["status"])  # fmt: skip
            failure.text = cell.get("stderr_tail") or cell["reason"]
        elif counted:
            failures += 1
            failure = ET.SubElement(case, "failure", message="; ".join(r["detail"] for r in counted), type="regression")
            failure.text = "\n".join(f"{r['kind']}: {r['detail']}" for r in counted)
        elif cell["status"] in FAILED_STATUSES or cell["status"] == UNAVAILABLE:
            skipped += 1
            prefix = "allowed to fail: " if cell["status"] in FAILED_STATUSES else f"{label}: "
            ET.SubElement(case, "skipped", message=prefix + reason_text(cell["reason"])[:1000])
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
