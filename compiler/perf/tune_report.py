"""`kiln tune`'s ranking, its tie rule and publishing the winner; the leaderboards are rendered from the ranking by
`kiln.compiler.perf.leaderboard`.

Tie rule: candidates are timed in the same interleaved rounds, so the best one and another are compared round by
round; the other is tied with the best unless it was slower in every round and its median per-round ratio is
over NOISE_FLOOR (see `_tied`). Among the tied, the simplest wins (fp32 before fp16/bf16 before int8; the fewest
non-default runtime settings and NHWC I/O, which changes what the caller must feed), then the most accurate
(highest worst-case cosine), then the fastest.

Every candidate is timed at one batch (`kiln tune --batch`, default the example's), which the leaderboard says;
each row says its I/O layout and whether its batch is static or a dynamic range.
"""

from __future__ import annotations

import math
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
    """Names of the candidates no other beats on both latency and accuracy: the worst-case cosine to
    ACCURACY_DIGITS, as the tie rule reads it (two fp32 builds that differ in the 7th digit are equally accurate,
    and only the faster is on the front)."""

    def accuracy(row: dict[str, Any]) -> float:
        cosine = row["min_cosine"]
        return round(cosine, ACCURACY_DIGITS) if cosine is not None and math.isfinite(cosine) else -math.inf

    front = []
    for row in rows:
        beaten = any(
            o["p50_ms"] <= row["p50_ms"]
            and accuracy(o) >= accuracy(row)
            and (o["p50_ms"] < row["p50_ms"] or accuracy(o) > accuracy(row))
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
