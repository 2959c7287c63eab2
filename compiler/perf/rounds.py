"""How Kiln times candidates: one method for `kiln bench`, `kiln tune` (its ranking, its noise probe and its
confirmation) and `benchmarks/bench_tune.py` (Kiln's picks against the peers' defaults).

* **Its own process.** Each candidate runs in a worker process of its own (`kiln.compiler.perf.bench_worker`),
  loaded once, as a deployment runs one model in one service: several runtimes' thread pools in one process
  disturb each other.
* **Alone.** Only the worker being timed runs: every other one is stopped (SIGSTOP, `Worker.pause`) from the end
  of its turn to the start of its next, so no other runtime's threads spin beside it. ONNX Runtime's, OpenMP's and
  XNNPACK's pools spin for a while after each call by default; on a 2-core machine a neighbour that spins in
  its idle time slowed OpenVINO from 3.0 to 6-9.6 ms (issue 30).
* **Warm.** Each turn starts with untimed runs lasting at least TURN_WARM_MS (at least one), as a service that has
  been serving: its threads awake and its weights in cache, not cold from the other candidates' turns.
* **Interleaved.** Rounds in a rotating order (round 1: a b c, round 2: b c a, ...), so that a drift of the
  machine hits every candidate alike; each turn's timed runs last at least `min_round_ms` (`runs_per_round`): ten
  runs of a 0.1 ms model fit in one scheduler tick.

`METHOD` says this in one line, for the reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

from kiln.compiler.perf.bench_worker import WorkerFailed

TURN_WARM_MS = 20.0  # untimed runs at the start of each turn last at least this long
MAX_RUNS = 5000  # the most runs per round a minimum round time asks for
PROBE_RUNS = 3  # timed runs after the first warm-up, to size each candidate's turns
METHOD = (
    "each candidate in its own process, loaded once; only the one being timed runs (the others are stopped "
    "between their turns, so no other runtime's threads spin beside it); each turn warmed up "
    f"(untimed runs, at least {TURN_WARM_MS:g} ms) before its timed runs; interleaved rounds in a rotating order"
)


class Timed(Protocol):
    """What the scheduler needs of a worker (`kiln.compiler.perf.bench_worker.Worker`)."""

    def time(self, runs: int, warmup: int = 0) -> list[float]:
        """Milliseconds of `runs` timed runs after `warmup` untimed ones."""
        ...

    def pause(self) -> None:
        """Stop it until it is next spoken to."""
        ...


def rotation(count: int, round_index: int) -> list[int]:
    """The order candidates run in, in round `round_index`: each starts a round in turn."""
    return [(round_index + i) % count for i in range(count)]


def runs_per_round(latency_ms: float, runs: int, min_round_ms: float) -> int:
    """`runs`, or more where that many runs of `latency_ms` would last under `min_round_ms` (0: exactly `runs`)."""
    if min_round_ms <= 0 or not (math.isfinite(latency_ms) and latency_ms > 0):
        return runs
    return max(runs, min(MAX_RUNS, math.ceil(min_round_ms / latency_ms)))


def turn_warmup(latency_ms: float) -> int:
    """Untimed runs at the start of a turn: at least one, and as many as last TURN_WARM_MS."""
    if not (math.isfinite(latency_ms) and latency_ms > 0):
        return 1
    return max(1, min(MAX_RUNS, math.ceil(TURN_WARM_MS / latency_ms)))


def sized_turns(
    workers: Sequence[Timed], runs: int, min_round_ms: float, warmup: int, failed: dict[int, str]
) -> tuple[list[int], list[int]]:
    """Warm each worker up (`warmup` untimed runs, alone) and time PROBE_RUNS runs of it: its timed runs per turn
    and its untimed runs at the start of each turn. A worker that fails is added to `failed` (index -> why); those
    already there are skipped."""
    import statistics

    counts, warms = [], []
    for index, worker in enumerate(workers):
        latency = 0.0
        if index in failed:
            counts.append(runs)
            warms.append(1)
            continue
        try:
            latency = statistics.median(worker.time(PROBE_RUNS, warmup))
        except WorkerFailed as error:
            failed[index] = str(error)
        finally:
            worker.pause()
        counts.append(runs_per_round(latency, runs, min_round_ms))
        warms.append(turn_warmup(latency))
    return counts, warms


def interleave(
    workers: Sequence[Timed],
    rounds: int,
    runs: int | Sequence[int],
    on_round: Callable[[int], None] | None = None,
    failed: dict[int, str] | None = None,
    warm: int | Sequence[int] = 0,
) -> tuple[list[list[list[float]]], dict[int, str]]:
    """Run `rounds` rounds; in each, every worker in the order `rotation` gives takes its turn alone: `warm` (or
    its own count, `warm[index]`) untimed runs, then `runs` (or `runs[index]`) timed runs, then it is paused.
    Returns times[worker][round] and the workers that failed (index -> why; skipped from then on, as are those
    already in `failed`)."""
    times: list[list[list[float]]] = [[] for _ in workers]
    failed = dict(failed or {})
    for round_index in range(rounds):
        if on_round is not None:
            on_round(round_index)
        for index in rotation(len(workers), round_index):
            if index in failed:
                continue
            worker = workers[index]
            try:
                count = runs if isinstance(runs, int) else runs[index]
                times[index].append(worker.time(count, warm if isinstance(warm, int) else warm[index]))
            except WorkerFailed as error:
                failed[index] = str(error)
            finally:
                worker.pause()
    return times, failed
