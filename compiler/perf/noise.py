"""The machine's timing noise, measured before candidates are compared (`kiln tune`, `kiln bench`).

One fixed workload (WORKLOAD: a float32 matrix product in torch, at the candidates' thread count; the worker's
`kiln.compiler.perf.bench_worker.noise_workload`) runs in two worker processes, timed by the timing method
(`kiln.compiler.perf.rounds`) in alternating rounds as two candidates would be: an A/A test. On a quiet machine each
round's ratio of the two medians is 1; how far it strays is how far two equal candidates can look apart in one
round. `Noise.percent` is the median of |ratio - 1|, in percent: in half the rounds the two differed by more. A
difference between candidates smaller than that cannot be told by a few rounds: `kiln tune` says so, widens its
confirmation (`kiln.compiler.perf.tune_confirm`), and decides no winner by less than it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import KilnError
from kiln.compiler.perf.bench_worker import LOAD_TIMEOUT_S, NOISE_SIZE, Worker, WorkerFailed
from kiln.compiler.perf.rounds import interleave, sized_turns

if TYPE_CHECKING:
    from kiln.compiler.progress import Progress

WORKLOAD = f"a {NOISE_SIZE}x{NOISE_SIZE} float32 matrix product (torch) in two worker processes, alternating rounds"
ROUNDS = 10
ROUND_MS = 50.0  # timed runs per turn last at least this long (as tune's candidates': its MIN_ROUND_MS)


@dataclass(frozen=True)
class Noise:
    """The A/A rounds' ratios (second worker's round median / first's), or why there are none."""

    ratios: list[float]
    failure: str | None = None

    @property
    def percent(self) -> float | None:
        """The median of |ratio - 1|, in percent (None: not measured)."""
        deviations = [abs(r - 1) for r in self.ratios if math.isfinite(r)]
        return round(100 * statistics.median(deviations), 2) if deviations else None

    def to_dict(self) -> dict[str, Any]:
        """What the reports record."""
        return {"workload": WORKLOAD, "rounds": len(self.ratios), "percent": self.percent,
                "ratios": [round(r, 4) for r in self.ratios], "failure": self.failure,
                "note": self.describe()}  # fmt: skip

    def describe(self) -> str:
        """One line for the reports."""
        if self.percent is None:
            return f"machine noise not measured: {self.failure or 'no rounds'}"
        return (f"machine noise {self.percent:.1f}%: two runs of one fixed workload differed by more than that in half "
                f"of {len(self.ratios)} rounds ({WORKLOAD})")  # fmt: skip


def measure(progress: Progress, threads: int | None = None, rounds: int = ROUNDS) -> Noise:
    """Time the fixed workload at `threads` threads in two workers, in `rounds` alternating rounds, as candidates
    are timed."""
    progress.say("measuring the machine's noise ...")
    workers: list[Worker] = []
    try:
        for _ in range(2):
            workers.append(Worker({"kind": "noise", "directory": "", "threads": threads, "trust_pickle": False}))
            workers[-1].start(LOAD_TIMEOUT_S)
            workers[-1].pause()
        failed: dict[int, str] = {}
        counts, warms = sized_turns(workers, 1, ROUND_MS, 3, failed)
        times, failed = interleave(workers, rounds, counts, failed=failed, warm=warms)
    except (KilnError, WorkerFailed) as error:
        return Noise([], str(error))
    finally:
        for worker in workers:
            worker.close()
    if failed:
        return Noise([], "; ".join(failed.values()))
    return Noise([statistics.median(b) / statistics.median(a) for a, b in zip(*times)])
