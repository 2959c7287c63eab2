"""`kiln tune`'s ranking, its tie rule, publishing the winner, and the leaderboards (md, json, self-contained html).

Tie rule: candidates are timed in the same interleaved rounds, so the best one and another are compared round by
round; the other is tied with the best unless it was slower in every round and its median per-round ratio is
over NOISE_FLOOR (see `_tied`). Among the tied, the simplest wins (fp32 before fp16/bf16 before int8; the fewest
non-default runtime settings and NHWC I/O, which changes what the caller must feed), then the most accurate
(highest worst-case cosine), then the fastest.

Every candidate is timed at one batch (`kiln tune --batch`, default the example's), which the leaderboard says;
each row says its I/O layout and whether its batch is static or a dynamic range.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.compiler.perf.tune_candidates import Entry

ACCURACY_DIGITS = 6  # cosines equal to this many digits are equally accurate for the tie rule
NOISE_FLOOR = 1.03  # two candidates within 3% are never told apart on these machines
SIMPLICITY = {"fp32": 0, "fp16": 1, "bf16": 1, "int8-dynamic": 2, "int8": 3}
SCHEMA = "kiln.tune/1"
UNTIMED = "built, not timed"


def _row(entry: Entry) -> dict[str, Any]:
    timing, build = entry.timing, entry.build
    latency = timing.get("latency_ms", {})
    return {
        "name": entry.name,
        "target": entry.target,
        "precision": entry.precision,
        "opt_level": 0 if entry.plain else "default",
        "io_layout": entry.variant.layout,  # "nchw" (as captured), "nhwc", None: no image inputs
        "batch_range": entry.variant.batch_range or "static",
        "batch": timing.get("batch", entry.batch),  # the rows it was timed on
        "runtime_settings": entry.settings.to_dict(),
        "threads": entry.threads,
        "p50_ms": latency.get("p50"),
        "p90_ms": latency.get("p90"),
        "spread": timing.get("spread"),
        "round_medians_ms": timing.get("round_medians_ms"),
        "timed_runs": timing.get("timed_runs"),
        "spread_too_wide": timing.get("spread_too_wide", False),
        "throughput_items_per_s": timing.get("throughput_items_per_s"),
        "artifact_bytes": build.artifact_bytes,
        "min_cosine": entry.min_cosine if entry.min_cosine is not None else build.min_cosine,
        "max_abs_error": entry.max_abs_error if entry.max_abs_error is not None else build.max_abs_error,
        "directory": str(entry.directory) if entry.directory else None,
        "rejected": entry.rejected,
    }


def _measure(row: dict[str, Any], objective: str) -> float:
    """Smaller is better."""
    if objective == "size":
        return float(row["artifact_bytes"] or 0)
    if objective == "throughput":
        return -float(row["throughput_items_per_s"] or 0)
    return float(row["p50_ms"])


def _tied(best: dict[str, Any], other: dict[str, Any], objective: str) -> bool:
    """Whether `other` is within the noise of `best`. Timed in the same interleaved rounds, so compared round by
    round: a tie unless `other` was worse in every round and by more than NOISE_FLOOR at the median of the
    per-round ratios (a candidate with a wide spread of its own is not "tied" with a faster, steadier one just
    because it is noisy). Sizes: within 1%."""
    if objective == "size":
        return abs(_measure(other, objective)) <= abs(_measure(best, objective)) * 1.01
    pairs = list(
        zip(best.get("round_medians_ms") or [best["p50_ms"]], other.get("round_medians_ms") or [other["p50_ms"]])
    )
    ratios = sorted(b / a for a, b in pairs if a > 0)
    if not ratios:
        return True
    return ratios[0] <= 1.0 or ratios[len(ratios) // 2] <= NOISE_FLOOR


def _simpler(row: dict[str, Any]) -> tuple[float, ...]:
    """Simplicity, then accuracy to ACCURACY_DIGITS of the worst cosine (fp32 artifacts differ from each other in
    the 7th digit by rounding alone: that is no reason to prefer the slower one)."""
    return (
        SIMPLICITY.get(row["precision"], 4),
        len(row["runtime_settings"]) + (row["threads"] is not None) + (row.get("io_layout") == "nhwc"),
        -round(row["min_cosine"] if row["min_cosine"] is not None else -1.0, ACCURACY_DIGITS),
    )


def rank(entries: list[Entry], objective: str, batch: int | None = None, timed: bool = True) -> dict[str, Any]:
    """The leaderboard: survivors ranked by `objective` (accuracy breaks exact ties), the winner and why, the
    Pareto front (latency vs accuracy) and the rejected with their reasons; `batch`: what they were timed at. Not
    `timed` (`--build-only`): the survivors are listed as built, not timed, without ranks or a winner."""
    rows = [_row(e) for e in entries]
    alive = [r for r in rows if r["rejected"] is None]
    if not timed:
        for row in alive:
            row["status"] = UNTIMED
        why = (f"{len(alive)} candidates built and verified, none timed (--build-only): time them where they will run, "
               "with `kiln tune --time-only --out DIR`")  # fmt: skip
        return {"schema": SCHEMA, "objective": objective, "batch": batch, "timed": False, "candidates": alive,
                "pareto": [], "rejected": [r for r in rows if r["rejected"] is not None], "winner": None,
                "why": why}  # fmt: skip
    alive.sort(key=lambda r: (_measure(r, objective), -(r["min_cosine"] or -1.0)))
    for place, row in enumerate(alive, 1):
        row["rank"] = place
    board: dict[str, Any] = {"schema": SCHEMA, "objective": objective, "batch": batch, "timed": True,
                             "candidates": alive}  # fmt: skip
    board["rejected"] = [r for r in rows if r["rejected"] is not None]
    board["pareto"] = pareto(alive)
    board["winner"], board["why"] = None, "no candidate passed the parity gate and could be timed"
    if alive:
        winner, tied = choose(alive, objective)
        winner["winner"] = True
        board["winner"] = winner
        board["why"] = _why(winner, alive, tied, objective, batch)
    return board


def choose(alive: list[dict[str, Any]], objective: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The winner among ranked leaderboard rows (best first) by the tie rule, and the rows tied with the best;
    also what `benchmarks/bench_tune.py` uses to pick the best of one precision from a leaderboard."""
    tied = [r for r in alive if _tied(alive[0], r, objective)]
    return min(tied, key=lambda r: (*_simpler(r), _measure(r, objective))), tied


def _why(
    winner: dict[str, Any], alive: list[dict[str, Any]], tied: list[dict[str, Any]], objective: str, batch: int | None
) -> str:
    what = {"latency": "p50 latency", "throughput": "throughput", "size": "artifact size"}[objective]
    what += f" at batch {batch}" if batch is not None and objective != "size" else ""
    if len(tied) == 1:
        runner_up = f"; next: {alive[1]['name']}" if len(alive) > 1 else ""
        return f"best {what} of {len(alive)} verified candidates, outside the noise of the others{runner_up}"
    others = ", ".join(r["name"] for r in tied if r is not winner)
    fastest = "" if winner is alive[0] else f" ({alive[0]['name']} measured best, within the noise)"
    return (
        f"tie: {len(tied)} candidates within the noise of the best {what} ({others}){fastest}; "
        "chose the simplest (fp32 over quantized, fewest runtime settings, NCHW over NHWC), then the most accurate"
    )


def pareto(rows: list[dict[str, Any]]) -> list[str]:
    """Names of the candidates no other beats on both latency and accuracy (worst-case cosine)."""
    front = []
    for row in rows:
        cosine = row["min_cosine"] if row["min_cosine"] is not None else -1.0
        beaten = any(
            o["p50_ms"] <= row["p50_ms"]
            and (o["min_cosine"] if o["min_cosine"] is not None else -1.0) >= cosine
            and (o["p50_ms"] < row["p50_ms"] or (o["min_cosine"] or -1.0) > cosine)
            for o in rows
        )
        if not beaten:
            front.append(row["name"])
    return front


def cpu_notes(board: dict[str, Any]) -> list[str]:
    """Which precisions gave no speed-up here, and why (the CPU's flags, from kiln.compiler.host)."""
    from kiln.compiler.host import host_info

    flags = set(host_info()["cpu_flags"])
    notes: list[str] = []
    if not board.get("timed", True):
        return notes
    fp32 = {r["target"]: r["p50_ms"] for r in reversed(board["candidates"]) if r["precision"] == "fp32"}
    best: dict[tuple[str, str], float] = {}
    for row in board["candidates"]:
        key = (row["target"], row["precision"])
        best[key] = min(best.get(key, row["p50_ms"]), row["p50_ms"])
    reasons = {
        "bf16": "no bf16 instructions (avx512_bf16/amx_bf16)" if not flags & {"avx512_bf16", "amx_bf16"} else "",
        "fp16": "no fp16 arithmetic on x86 CPUs: fp16 weights are computed in f32",
        "int8": "no VNNI (avx512_vnni/avx_vnni/amx_int8): int8 dot products take the slower AVX2 path"
        if not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}
        else "",
    }
    for (target, precision), p50 in sorted(best.items()):
        base = fp32.get(target)
        if precision == "fp32" or base is None or p50 < base / NOISE_FLOOR:
            continue
        why = reasons.get(precision.split("-")[0]) or "the runtime's kernels are no faster at this precision here"
        notes.append(f"{target} {precision} gave no speed-up over {target} fp32 ({p50:.3g} vs {base:.3g} ms): {why}")
    return notes


def publish(winner: Entry, best: Path, board: dict[str, Any]) -> None:
    """Copy the winner's export to `best` (replacing what was there), its runtime settings written into its
    manifest's runtime_config and the choice recorded in target_info["tune"]. The copy is made in a staging
    directory beside `best` from a build holding no link (`kiln.compiler.safe_fs.copy_tree`;
    `kiln.compiler.perf.tune_files.
    check_build` refused any before), checked again against its manifest, and moved into place in one step
    (`kiln.compiler.perf.tune_files.install_best`)."""
    from dataclasses import replace

    from kiln.compiler.errors import UsageError
    from kiln.compiler.export.loading import check_files
    from kiln.compiler.export.staging import staging_area
    from kiln.compiler.perf.tune_files import install_best
    from kiln.compiler.safe_fs import copy_tree
    from kiln.compiler.types import BENCH_FILE, Manifest
    from kiln.targets import get_target

    assert winner.directory is not None
    with staging_area(best) as root:
        tree = root / best.name
        try:  # what was checked before the timing is still what is published
            copy_tree(winner.directory, tree, ignore=shutil.ignore_patterns(BENCH_FILE))
            check_files(tree, Manifest.read(tree))
        except (ValueError, UsageError) as exc:
            raise UsageError(
                f"{winner.name} changed while it was timed ({getattr(exc, 'message', exc)}): nothing published",
                "run kiln tune again",
            ) from None
        manifest = get_target(winner.target).with_runtime_settings(Manifest.read(tree), winner.settings)
        manifest = replace(manifest, target_info={**manifest.target_info, "tune": _choice(winner, board)})
        manifest.write(tree)
        install_best(tree, best)


def _choice(winner: Entry, board: dict[str, Any]) -> dict[str, Any]:
    """What `best/`'s manifest records of how tune chose it (target_info["tune"])."""
    return {
        "chosen_by": "kiln tune",
        "objective": board["objective"],
        "from_candidates": len(board["candidates"]) + len(board["rejected"]),
        "verified_and_timed": len(board["candidates"]),
        "why": board["why"],
        "candidate": winner.name,
        "runtime_settings": winner.settings.to_dict(),
        "timed_threads": winner.threads,
        "io_layout": winner.variant.layout,
        "batch_range": winner.variant.batch_range or "static",
        "timed_batch": winner.timing.get("batch", winner.batch),
        "p50_ms": (winner.timing.get("latency_ms") or {}).get("p50"),
        "throughput_items_per_s": winner.timing.get("throughput_items_per_s"),
    }


def markdown(board: dict[str, Any]) -> str:
    """leaderboard.md: the ranked candidates, the winner and why, the rejected, the CPU notes."""
    batch = board.get("batch")
    timed = f", timed at batch {batch}" if batch is not None else ""
    lines = [f"# kiln tune: {board['model']} (objective: {board['objective']}{timed})", ""]
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
        spread = "n/a" if r["spread"] is None else f"{r['spread']:.2f}" + ("!" if r["spread_too_wide"] else "")
        lines.append(
            f"| {r['rank']} | {r['name']}{' **(winner)**' if r.get('winner') else ''} | "
            f"{(r.get('io_layout') or 'n/a').upper()} | {r.get('batch_range', 'static')} | {r['p50_ms']:.3f} | "
            f"{r['p90_ms']:.3f} | {spread} | {r['throughput_items_per_s']:.0f} | "
            f"{(r['artifact_bytes'] or 0) / 1024:.0f} | {_cos(r['min_cosine'])} | "
            f"{'yes' if r['name'] in board['pareto'] else ''} |"
        )
    return lines


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
    return "n/a" if value is None else f"{value:.6f}"


def html_page(board: dict[str, Any]) -> str:
    """leaderboard.html: self-contained; latency against accuracy (1 - worst cosine, log scale), Pareto front
    joined and marked, the winner ringed, the table and the rejected below."""
    import math

    rows = board["candidates"] if board.get("timed", True) else []
    width, height, pad = 640, 360, 50
    points = [(r, r["p50_ms"], max(1 - (r["min_cosine"] if r["min_cosine"] is not None else 0.0), 1e-9)) for r in rows]
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">']
    if points:
        xs, ys = [p[1] for p in points], [math.log10(p[2]) for p in points]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)

        def at(x: float, y: float) -> tuple[float, float]:
            fx = (x - x0) / (x1 - x0) if x1 > x0 else 0.5
            fy = (math.log10(y) - y0) / (y1 - y0) if y1 > y0 else 0.5
            return pad + fx * (width - 2 * pad), pad + fy * (height - 2 * pad)

        front = sorted((p for p in points if p[0]["name"] in board["pareto"]), key=lambda p: p[1])
        line = " ".join(f"{at(p[1], p[2])[0]:.1f},{at(p[1], p[2])[1]:.1f}" for p in front)
        svg.append(f'<polyline points="{line}" fill="none" stroke="#c33" stroke-dasharray="4"/>')
        for row, x, y in points:
            cx, cy = at(x, y)
            color = "#c33" if row["name"] in board["pareto"] else "#369"
            title = f"{html.escape(row['name'])}: {x:.3f} ms, cosine {_cos(row['min_cosine'])}"
            radius = 7 if row.get("winner") else 4
            circle = f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{radius}" fill="{color}">'
            svg.append(f"{circle}<title>{title}</title></circle>")
        svg.append(f'<text x="{width / 2}" y="{height - 10}">p50 latency (ms) →</text>')
        svg.append('<text x="5" y="20">1 - worst cosine (log; lower is more accurate) ↓</text>')
    svg.append("</svg>")
    table = markdown(board).split("\n")
    body = "\n".join(html.escape(line) for line in table)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>kiln tune leaderboard</title></head><body>"
        f"<h1>kiln tune: {html.escape(board['model'])}</h1>{''.join(svg)}"
        "<p>red: the Pareto front (no candidate is both faster and more accurate); large dot: the winner</p>"
        f"<pre>{body}</pre></body></html>\n"
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
