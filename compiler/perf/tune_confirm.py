"""`kiln tune`'s confirmation phase: the pick must hold up when timed again in fresh processes, as a user will run
it (issue 30).

After the ranking, the best candidate and its runners-up (`contenders`: the next one, and those within twice the
margin of the best that the tie rule prefers; at most MAX_CONTENDERS) are timed again in blocks of fresh processes,
each with its own runtime settings and threads (`kiln.compiler.perf.confirm`). Only a contender that beats every
other one there (P(slower by more than the margin in a fresh process) >= 0.95 for each) is a decided winner.
Otherwise the leaderboard says "no decided winner: A and B are within X%" and the pick is made among the
contenders not beaten by the tie rule (`kiln.compiler.perf.tune_report.tie_key`: the simplest, then the most
accurate, then the smallest artifact, then by name: never by a measured speed, which is what could not be told
apart). Either way the leaderboard and best/'s manifest record whether it was decided and the probability that
the pick is faster than each other contender.

The margin is the larger of 3% (NOISE_FLOOR) and the machine's noise measured before the ranking
(`kiln.compiler.perf.noise`); when that noise is larger than the gap the ranking found between the best two, the
leaderboard says so and each block runs twice the rounds. The blocks stop when decided, when every block of every
pair is within the margin, or when `--confirm-budget` seconds are spent (0: no confirmation).
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from kiln.compiler.export.artifacts import Artifact
from kiln.compiler.perf.benchmark import ARTIFACT, BenchOptions, Candidate
from kiln.compiler.perf.confirm import Blocks, Comparison, ConfirmSettings, Contender, time_blocks, verdict
from kiln.compiler.perf.tune_report import NOISE_FLOOR, measured, pareto, round_ratio, tie_key, tied

if TYPE_CHECKING:
    from kiln.compiler.perf.noise import Noise
    from kiln.compiler.perf.tune_candidates import Entry
    from kiln.compiler.progress import Progress

MAX_CONTENDERS = 3
BLOCKS_METHOD = (
    "blocks of fresh processes: in each, every contender loaded anew with its own runtime settings, then timed "
    "alone and warm in alternating rounds (A B, B A, ...), then ended"
)


def margin(noise: Noise | None) -> float:
    """The difference a decided win needs: 3% (NOISE_FLOOR), or the machine's noise when larger."""
    measured = noise.percent if noise is not None else None
    return max(NOISE_FLOOR - 1, (measured or 0.0) / 100)


def contenders(rows: list[dict[str, Any]], objective: str, within: float) -> list[dict[str, Any]]:
    """The ranked rows (best first) to time again: the best, the next one always, and of the others tied with it in
    the ranking or within `within` of it (per-round ratio), those the tie rule prefers, MAX_CONTENDERS in all.
    Taking the close ones in the tie rule's order, not the ranking's, keeps the tie rule's favourite among the
    contenders whatever order the noise put the close ones in: two tunes that decide nothing then pick the same
    one. The next one is always there because a ranking's best can be ahead by its noise alone: a BERT-mini's
    OpenVINO build ranked 16% ahead of the next and was "confirmed" against a far one that one noisy round had
    tied with it, while the next, never timed again, had matched it in two other tunes."""
    best = rows[0]
    close = [r for r in rows[2:] if tied(best, r, objective) or round_ratio(best, r) <= 1 + within]
    return [best, *rows[1:2], *sorted(close, key=tie_key)][:MAX_CONTENDERS]


def skipped(board: dict[str, Any], budget_s: float) -> str | None:
    """Why there is nothing to confirm (`budget_s`: the seconds it may take), or None."""
    if budget_s == 0:
        return "not confirmed: --confirm-budget 0"
    if board["objective"] == "size":
        return "nothing to re-time: artifact sizes are exact"
    if len(board["candidates"]) < 2:
        return "nothing to re-time: the only verified candidate"
    return None


def confirm(board: dict[str, Any], entries: list[Entry], asked: ConfirmSettings, noise: Noise | None,
            progress: Progress) -> None:  # fmt: skip
    """Time the ranking's best and its runners-up again (see the module's docstring) and set the board's winner,
    why, `decided`, `confidence` and `confirmation` (the ranking's winner stands, undecided, where there is nothing
    to confirm). `asked`: the budget, runs, warm-up and timeouts; its margin and rounds are set here, from the
    noise."""
    board["noise"] = noise.to_dict() if noise is not None else None
    why_not = skipped(board, asked.budget_s)
    if why_not is not None:
        board |= {"decided": board["objective"] == "size" or len(board["candidates"]) == 1, "confidence": None,
                  "confirmation": {"skipped": why_not}}  # fmt: skip
        return
    needed = margin(noise)
    rows = board["candidates"]
    chosen = contenders(rows, board["objective"], 2 * needed)  # the ranking's few rounds: twice the margin
    gap = round_ratio(rows[0], rows[1]) - 1
    widened = noise is not None and noise.percent is not None and noise.percent / 100 > gap
    if widened:
        progress.say(
            f"the machine's noise ({noise.percent if noise else 0:g}%) is larger than the {100 * gap:.1f}% between "
            f"the best two: the confirmation runs twice the rounds per block, for up to {asked.budget_s:g} s"
        )
    settings = replace(asked, margin=needed, rounds=asked.rounds * (2 if widened else 1))
    by_name = {e.name: e for e in entries}
    progress.say(f"confirming {', '.join(r['name'] for r in chosen)} in fresh processes ...")
    blocks = time_blocks([Contender(r["name"], _job(by_name[r["name"]])) for r in chosen], settings, progress)
    _reject_failed(board, entries, chosen, blocks)
    _decide(board, [r for i, r in enumerate(chosen) if i not in blocks.failed], blocks, needed)
    board["confirmation"] |= {"method": BLOCKS_METHOD, "contenders": [r["name"] for r in chosen],
                              "rounds_per_block": settings.rounds, "blocks": blocks.count, "seconds": blocks.seconds,
                              "budget_s": settings.budget_s, "stopped": blocks.stopped,
                              "margin_pct": round(100 * needed, 2), "ranking_gap_pct": round(100 * gap, 2),
                              "widened": widened, "failed": {blocks.labels[i]: why for i, why in blocks.failed.items()},
                              "block_medians_ms": {blocks.labels[i]: [round(statistics.median(b), 4) for b in m]
                                                   for i, m in enumerate(blocks.medians)}}  # fmt: skip


def _job(entry: Entry) -> dict[str, Any]:
    """The worker job of a candidate, as the ranking timed it."""
    assert entry.directory is not None
    manifest = Artifact.read(entry.directory).manifest
    candidate = Candidate(entry.name, ARTIFACT, entry.directory, manifest, threads=entry.threads,
                          settings=entry.settings.to_dict(), batch=entry.batch)  # fmt: skip
    return candidate.job(BenchOptions())


def _reject_failed(board: dict[str, Any], entries: list[Entry], chosen: list[dict[str, Any]], blocks: Blocks) -> None:
    """A contender whose fresh process failed is rejected, with why, as one that failed in the ranking."""
    for index, why in blocks.failed.items():
        row = chosen[index]
        reason = f"could not be timed again in a fresh process: {why}"[:500]
        row["rejected"] = reason
        for entry in entries:
            if entry.name == row["name"]:
                entry.rejected = reason
        board["candidates"].remove(row)
        board["rejected"].append(row)
    if blocks.failed:
        board["pareto"] = pareto(board["candidates"])


def _decide(board: dict[str, Any], alive: list[dict[str, Any]], blocks: Blocks, needed: float) -> None:
    """The board's winner from the blocks: the decided one, or the tie rule's pick among those not beaten."""
    for row in board["candidates"]:
        row.pop("winner", None)
    found = verdict(blocks, needed)
    if found is None or not alive:
        board |= {"winner": None, "decided": False, "confidence": None, "confirmation": {},
                  "why": "no contender could be timed again in a fresh process"}  # fmt: skip
        return
    by_label = {row["name"]: row for row in alive}
    labels = blocks.labels
    tied = [by_label[labels[i]] for i in found.tied]
    pick = min(tied, key=tie_key) if not found.decided else by_label[labels[found.fastest]]
    index = labels.index(pick["name"])
    against = [Comparison(pick["name"], labels[i], blocks.ratios(index, i)) for i in range(len(labels))
               if i != index and i not in blocks.failed]  # fmt: skip
    for row in alive:
        medians = [statistics.median(b) for b in blocks.medians[labels.index(row["name"])]]
        row["confirmed_p50_ms"] = statistics.median(medians) if medians else None
    pick["winner"] = True
    board |= {"winner": pick, "decided": found.decided, "tied": [r["name"] for r in tied],
              "confidence": round(min(c.confidence for c in against), 4) if against else None,
              "why": _why(pick, found.decided, tied, against, blocks, measured(board["objective"], board["batch"])),
              "confirmation": {"comparisons": [c.to_dict(needed) for c in against]}}  # fmt: skip


def _why(pick: dict[str, Any], decided: bool, tied: list[dict[str, Any]], against: list[Comparison], blocks: Blocks,
         what: str) -> str:  # fmt: skip
    """The leaderboard's one-line reason (`what`: the objective in words)."""
    each = "; ".join(f"{c.slower} {c.median_ratio:.2f}x its time, slower in {c.wins} of {len(c.block_ratios)} "
                     f"blocks, P({pick['name']} faster) {c.confidence:.2f}" for c in against)  # fmt: skip
    if not against:
        return f"the only contender whose fresh processes ran in {blocks.count} blocks; the others failed there"
    if decided:
        return (f"confirmed in {blocks.count} blocks of fresh processes: the best {what}, faster than every other "
                f"contender ({each})")  # fmt: skip
    names = [r["name"] for r in tied]
    listed = ", ".join(names[:-1]) + f" and {names[-1]}"
    spread = max((abs(c.median_ratio - 1) for c in against if c.slower in names), default=0.0)
    return (
        f"no decided winner: {listed} are within {100 * spread:.1f}% ({what}) in {blocks.count} blocks of fresh "
        "processes "
        f"({each}; stopped: {blocks.stopped}); chose {pick['name']} by the tie rule (the simplest: fp32 before "
        "fp16/bf16 before int8, the fewest runtime settings, NCHW before NHWC; then the most accurate; then the "
        "smallest artifact; then by name)"
    )
