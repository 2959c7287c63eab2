"""A second look at the fastest candidates, in fresh processes: `kiln tune`'s confirmation phase
(`kiln.compiler.perf.tune_confirm`), and how `benchmarks/bench_tune.py` re-times Kiln's picks against the peers.

The contenders are timed in **blocks**. Each block starts a fresh process for every contender (one after the
other, each stopped once loaded), times them by the timing method of `kiln.compiler.perf.rounds` (alone, warmed
up, `rounds` alternating rounds: A B, B A, ...), and ends them. A process is a sample of its own: the same
artifact loaded twice can run at different speeds (where its memory landed, which cores its threads got), and a
user's process is a fresh one. So the unit of evidence is the block: a block's ratio of two contenders is the
median of its rounds' ratios.

**Deciding.** The probability that A is faster than B in a fresh process is a sign test over the blocks read as
a probability: with a uniform prior on the chance p that a block finds A faster, and A faster in k of n blocks,
P(p > 1/2) = P(Binomial(n + 1, 1/2) <= k) (`confidence`). A *beats* B when the same probability, counting only
the blocks in which B was slower by more than the margin, is at least CONFIDENCE: B is then slower by more than
the margin at the median block, with that confidence. At 0.95 that takes at least 4 blocks, all won (7 of 8, 9
of 12). Counting plain wins instead would call identical candidates different about one time in seven when the
blocks scatter by 10% and blocks are added until decided; counting wins by the margin, with the margin at the
blocks' scatter, about one time in a hundred. The margin is the caller's: `kiln tune` takes the larger of 3% and
the machine's noise (`kiln.compiler.perf.noise`), so a difference the machine cannot show is never called a win.

**Widening.** Blocks are added until the fastest contender beats every other one, or every block of every pair
lies within the margin (after DECIDING_BLOCKS: no more blocks would decide it), or the next block would overrun
the time budget (one block is always run), or MAX_BLOCKS were run. The fastest is the one with the smallest
geometric mean of its block medians.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kiln.compiler.perf.bench_worker import LOAD_TIMEOUT_S, ROUND_TIMEOUT_S

if TYPE_CHECKING:
    from kiln.compiler.perf.bench_worker import Worker
    from kiln.compiler.progress import Progress

CONFIRM_BUDGET_S = 90.0  # the default of `kiln tune --confirm-budget`: seconds the confirmation may take
CONFIDENCE = 0.95  # the probability that the winner is faster in a fresh process, that a decided pick needs
DECIDING_BLOCKS = 4  # the fewest blocks that can reach CONFIDENCE (all won: P = 1 - 1/32)
MAX_BLOCKS = 12
ROUNDS_PER_BLOCK = 4  # alternating rounds per block (A B, B A, A B, B A)
WORKER_MODULE = "kiln.compiler.perf.bench_worker"


@dataclass(frozen=True)
class Contender:
    """One thing to re-time: its label and its worker's job (the module that serves it)."""

    label: str
    job: dict[str, Any]
    module: str = WORKER_MODULE


@dataclass(frozen=True)
class ConfirmSettings:
    """How long and how: the time budget (s), the margin a win needs (a fraction: 0.03 is 3%), rounds per block,
    timed runs per turn (at least `min_round_ms` of them), warm-up runs of a fresh process, and the timeouts."""

    budget_s: float
    margin: float = 0.03
    rounds: int = ROUNDS_PER_BLOCK
    runs: int = 10
    warmup: int = 3
    min_round_ms: float = 50.0
    round_timeout_s: float = ROUND_TIMEOUT_S
    max_blocks: int = MAX_BLOCKS


@dataclass
class Blocks:
    """What the blocks measured: medians[contender][block][round] (ms), the contenders whose process failed
    (index -> why; left out from then on), the seconds spent and why it stopped."""

    labels: list[str]
    medians: list[list[list[float]]]
    failed: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    stopped: str = ""

    @property
    def count(self) -> int:
        """Blocks run."""
        return max((len(m) for m in self.medians), default=0)

    def ratios(self, fast: int, slow: int) -> list[float]:
        """Per block both ran: the median over its rounds of slow's round median / fast's."""
        found = []
        for a, b in zip(self.medians[fast], self.medians[slow]):
            pairs = [y / x for x, y in zip(a, b) if x > 0]
            if pairs:
                found.append(statistics.median(pairs))
        return found


def confidence(wins: int, blocks: int) -> float:
    """P(p > 1/2) for the chance p that a block finds the faster one faster, given `wins` of `blocks` and a
    uniform prior: P(Binomial(blocks + 1, 1/2) <= wins)."""
    n = blocks + 1
    return sum(math.comb(n, i) for i in range(wins + 1)) / 2**n


@dataclass(frozen=True)
class Comparison:
    """One contender against the fastest: the per-block ratios (slower / faster)."""

    faster: str
    slower: str
    block_ratios: list[float]

    @property
    def wins(self) -> int:
        """Blocks in which the faster one was faster."""
        return sum(r > 1 for r in self.block_ratios)

    def wins_by(self, margin: float) -> int:
        """Blocks in which the slower one was slower by more than `margin`."""
        return sum(r > 1 + margin for r in self.block_ratios)

    @property
    def median_ratio(self) -> float:
        """The median block's ratio (1.0 with no block)."""
        return statistics.median(self.block_ratios) if self.block_ratios else 1.0

    @property
    def confidence(self) -> float:
        """The probability that `faster` is faster in a fresh process (`confidence`)."""
        return confidence(self.wins, len(self.block_ratios))

    def decided(self, margin: float) -> bool:
        """Whether `faster` beats `slower`: P(slower by more than `margin` in a fresh process) >= CONFIDENCE."""
        return confidence(self.wins_by(margin), len(self.block_ratios)) >= CONFIDENCE

    def within(self, margin: float) -> bool:
        """Whether every block put them within `margin` of each other."""
        return all(1 / (1 + margin) <= r <= 1 + margin for r in self.block_ratios)

    def to_dict(self, margin: float) -> dict[str, Any]:
        """What the reports record."""
        n = len(self.block_ratios)
        return {"faster": self.faster, "slower": self.slower, "blocks": n, "wins": self.wins,
                "median_ratio": round(self.median_ratio, 4), "confidence": round(self.confidence, 4),
                "wins_by_margin": self.wins_by(margin),
                "confidence_by_margin": round(confidence(self.wins_by(margin), n), 4),
                "block_ratios": [round(r, 4) for r in self.block_ratios],
                "decided": self.decided(margin)}  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    """The fastest contender, its comparison with each other one, and the contenders it did not beat (itself
    first): one means a decided winner."""

    fastest: int
    comparisons: list[Comparison]
    tied: list[int]

    @property
    def decided(self) -> bool:
        """Whether the fastest beat every other contender."""
        return len(self.tied) == 1


def verdict(blocks: Blocks, margin: float) -> Verdict | None:
    """The verdict of the blocks so far (None: no contender was timed in any block)."""
    alive = [i for i in range(len(blocks.labels)) if i not in blocks.failed and blocks.medians[i]]
    if not alive:
        return None

    def mean_log(index: int) -> float:
        medians = [statistics.median(r) for r in blocks.medians[index] if r]
        return statistics.fmean(math.log(m) for m in medians if m > 0) if medians else math.inf

    fastest = min(alive, key=mean_log)
    comparisons, tied = [], [fastest]
    for other in alive:
        if other != fastest:
            found = Comparison(blocks.labels[fastest], blocks.labels[other], blocks.ratios(fastest, other))
            comparisons.append(found)
            if not found.decided(margin):
                tied.append(other)
    return Verdict(fastest, comparisons, tied)


def settled(blocks: Blocks, margin: float) -> str | None:
    """Why no more blocks are needed, or None: the fastest beat every other one, or every block of every pair
    was within the margin (after DECIDING_BLOCKS)."""
    found = verdict(blocks, margin)
    if found is None or len(found.tied) + len(found.comparisons) < 2:
        return "fewer than two contenders left"
    if found.decided:
        return "decided"
    if blocks.count >= DECIDING_BLOCKS and all(c.within(margin) for c in found.comparisons):
        return f"every block within the margin ({100 * margin:.1f}%)"
    return None


def time_blocks(contenders: Sequence[Contender], settings: ConfirmSettings, progress: Progress) -> Blocks:
    """Blocks of fresh processes until `settled`, the budget or MAX_BLOCKS (see the module's docstring)."""
    blocks = Blocks([c.label for c in contenders], [[] for _ in contenders])
    started = time.monotonic()
    while True:
        block_started = time.monotonic()
        _block(contenders, settings, blocks, progress)
        now = time.monotonic()
        blocks.seconds = round(now - started, 1)
        blocks.stopped = settled(blocks, settings.margin) or ""
        if not blocks.stopped and blocks.count >= settings.max_blocks:
            blocks.stopped = f"the most blocks ({settings.max_blocks})"
        if not blocks.stopped and now - started + (now - block_started) > settings.budget_s:
            blocks.stopped = f"time budget ({settings.budget_s:g} s) spent"
        if blocks.stopped:
            return blocks


def _block(contenders: Sequence[Contender], settings: ConfirmSettings, blocks: Blocks, progress: Progress) -> None:
    """One block: a fresh process per contender still in, loaded one after the other, timed alone and
    alternating, ended; the round medians appended to `blocks` (a failure recorded in `blocks.failed`)."""
    from kiln.compiler.errors import KilnError
    from kiln.compiler.perf.bench_worker import Worker, WorkerFailed
    from kiln.compiler.perf.rounds import interleave, sized_turns

    live: list[tuple[int, Worker]] = []
    try:
        for index, contender in enumerate(contenders):
            if index in blocks.failed:
                continue
            worker = Worker(contender.job, contender.module, settings.round_timeout_s)
            try:
                worker.start(LOAD_TIMEOUT_S)
            except BaseException as error:
                worker.close(force=True)
                if not isinstance(error, (KilnError, WorkerFailed)):  # Ctrl-C while it loads
                    raise
                blocks.failed[index] = f"its fresh process failed to load: {error}"
                continue
            worker.pause()
            live.append((index, worker))
        workers = [w for _, w in live]
        failed: dict[int, str] = {}
        counts, warms = sized_turns(workers, settings.runs, settings.min_round_ms, settings.warmup, failed)
        times, failed = interleave(workers, settings.rounds, counts, failed=failed, warm=warms)
    except BaseException:
        for _, worker in live:
            worker.close(force=True)
        raise
    for _, worker in live:
        worker.close()
    for position, (index, _) in enumerate(live):
        if position in failed:
            blocks.failed[index] = f"failed while re-timed: {failed[position]}"
        else:
            blocks.medians[index].append([statistics.median(t) for t in times[position]])
    shown = ", ".join(f"{blocks.labels[i]} {statistics.median(blocks.medians[i][-1]):.3g} ms"
                      for i, _ in live if i not in blocks.failed)  # fmt: skip
    progress.say(f"confirmation block {blocks.count}: {shown}")
