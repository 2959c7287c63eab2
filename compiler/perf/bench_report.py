"""What `kiln bench` reports: per-candidate statistics, the spread flag, the terminal table and bench.json (the
report itself is assembled by `kiln.compiler.perf.benchmark.report`).

The spread of a candidate is the ratio of its slowest to its fastest round median. Candidates run in the same
interleaved rounds, so a drift of the machine shows up as a spread in every one of them; a spread over
SPREAD_LIMIT means the machine changed speed by more than the differences one usually decides on (choosing
between runtimes or precisions turns on 10-25%), so the figures of that run are flagged as not to be trusted.
On this project's 2-core machines the same model drifted 1.65 -> 2.66 ms within a minute (a spread of 1.6).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from kiln.compiler.safe_fs import write_file
from kiln.compiler.types import BENCH_FILE

SPREAD_LIMIT = 1.25
SCHEMA = 1
TIMED_FAILURE = "failed while timed"  # how a candidate's record starts when its worker failed in the rounds


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, linearly interpolated (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread(round_medians: list[float]) -> float | None:
    """Slowest over fastest round median (None with fewer than two rounds: nothing to compare)."""
    if len(round_medians) < 2 or min(round_medians) <= 0:
        return None
    return max(round_medians) / min(round_medians)


def too_wide(value: float | None) -> bool:
    """Whether a spread is too wide to trust the candidate's figures (see SPREAD_LIMIT)."""
    return value is not None and value > SPREAD_LIMIT


def latency_stats(rounds: list[list[float]]) -> dict[str, Any]:
    """p50/p90/p99/mean/min over every timed run (ms), the round medians, their spread and whether it is flagged."""
    pooled = [t for times in rounds for t in times]
    medians = [statistics.median(times) for times in rounds if times]
    wide = spread(medians)
    return {
        "latency_ms": {
            "p50": percentile(pooled, 50),
            "p90": percentile(pooled, 90),
            "p99": percentile(pooled, 99),
            "mean": statistics.fmean(pooled),
            "min": min(pooled),
        },
        "timed_runs": len(pooled),
        "round_medians_ms": medians,
        "spread": wide,
        "spread_too_wide": too_wide(wide),
    }


def speedup(eager_medians: list[float], medians: list[float]) -> float | None:
    """Eager over candidate, the median of the per-round ratios (both timed in the same rounds)."""
    ratios = [e / m for e, m in zip(eager_medians, medians) if m > 0]
    return statistics.median(ratios) if ratios else None


def timing_failures(result: dict[str, Any]) -> list[str]:
    """One line per candidate that loaded but failed while warmed up or timed (its worker died or hung): the
    run is then incomplete and `kiln bench` must not exit 0. Candidates left out before timing (torch.compile
    too slow to compile) are recorded, not failures."""
    return [
        f"{record['name']}: {record['failure']}"
        for record in result["candidates"]
        if str(record.get("failure") or "").startswith(TIMED_FAILURE)
    ]


def write_bench_files(result: dict[str, Any]) -> list[str]:
    """Write bench.json beside each timed export's manifest (atomically, a link there replaced: `write_file`);
    the lines to warn about, for directories it could not be written to."""
    notes = []
    for record in result["candidates"]:
        if record["kind"] != "artifact" or record.get("failure"):
            continue
        directory = Path(record["directory"])
        text = json.dumps({**result, "candidate": record["name"]}, indent=2, default=str) + "\n"
        try:
            write_file(directory / BENCH_FILE, text)
        except OSError as error:
            notes.append(f"{directory / BENCH_FILE} not written: {error.strerror or error}")
    return notes


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def table(result: dict[str, Any]) -> str:
    """The report as a terminal table, with each candidate's threads and runtime below it."""
    settings, host = result["settings"], result["timed_on"]
    built = result.get("built_on") or {}
    threads = settings["threads"] or "runtime default"
    lines = [
        f"kiln bench on {host.get('cpu')} ({host.get('cores')} cores; exported on {built.get('cpu', 'unknown')}), "
        f"threads: {threads}, {settings['rounds']} interleaved rounds x {settings['runs']} runs after "
        f"{settings['warmup']} warm-up runs",
        f"{'candidate':<16}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'spread':>8}{'batch':>6}"
        f"{'items/s':>10}{'vs eager':>9}{'load s':>8}{'1st ms':>9}{'peak MiB':>9}{'size KiB':>9}",
    ]
    details, flagged = [], False
    for r in result["candidates"]:
        if r.get("failure"):
            lines.append(f"{r['name']:<16}left out: {r['failure']}")
            continue
        lat = r["latency_ms"]
        wide = "n/a" if r["spread"] is None else f"{r['spread']:.2f}" + ("!" if r["spread_too_wide"] else "")
        flagged = flagged or r["spread_too_wide"]
        ratio = r.get("speedup_vs_eager")
        size = "" if r["artifact_bytes"] is None else f"{r['artifact_bytes'] / 1024:.0f}"
        lines.append(
            f"{r['name']:<16}{_ms(lat['p50']):>9}{_ms(lat['p90']):>9}{_ms(lat['p99']):>9}{_ms(lat['mean']):>9}"
            f"{wide:>8}{r['batch'] or '':>6}{r['throughput_items_per_s']:>10.0f}"
            f"{'' if ratio is None else f'{ratio:.2f}x':>9}{r['load_s']:>8.2f}{r['first_inference_ms']:>9.1f}"
            f"{r['peak_rss_mib'] or 0:>9.0f}{size:>9}"
        )
        info = ", ".join(f"{k} {v}" for k, v in r["runtime_info"].items())
        details.append(f"  {r['name']}: threads {r['threads_asked'] or 'default'} via {r['thread_control']}; {info}")
    lines += details
    if flagged:
        lines.append(
            f"! spread (slowest / fastest round median) over {result['spread_limit']}: the rounds of that candidate "
            "disagree by more than the differences that usually decide between candidates (the machine, or the "
            "candidate, changed speed during the run); do not trust its figures: rerun with more --rounds on a "
            "quieter machine"
        )
    return "\n".join(lines)
