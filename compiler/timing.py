"""Latency measurement shared by the benchmark script and the conversion matrix.

A latency is the median of timed runs after untimed warm-up runs. Where other processes compete for the
cores, runs stall (torch's OpenMP pool most of all, by tens of milliseconds): a batch whose median is over
NOISY times its fastest run is re-run, up to BATCHES batches, and the least disturbed one kept.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NOISY = 1.5  # a median this many times the fastest run means the runs were disturbed
BATCHES = 3  # timed batches at most per measurement, while they are disturbed


@dataclass(frozen=True)
class Latency:
    """The timed runs of one measurement, in milliseconds."""

    times_ms: list[float]
    batches: int

    @property
    def median_ms(self) -> float:
        """The median run."""
        return statistics.median(self.times_ms)

    @property
    def fastest_ms(self) -> float:
        """The fastest run."""
        return min(self.times_ms)

    @property
    def noisy(self) -> bool:
        """Whether the kept batch was still disturbed by other processes."""
        return self.median_ms > NOISY * self.fastest_ms


def time_ms(fn: Callable[[], Any], runs: int, warmup: int) -> list[float]:
    """Milliseconds of each of `runs` calls of `fn`, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - started) / 1e6)
    return times


def least_disturbed(fn: Callable[[], Any], runs: int, warmup: int) -> Latency:
    """Timed runs of `fn`: a batch of `runs`, repeated (up to BATCHES times) while its median is far above its
    fastest run, i.e. while other processes stall it; the batch with the lowest median, and how many were run."""
    batches: list[list[float]] = []
    while len(batches) < BATCHES:
        times = time_ms(fn, runs, warmup if not batches else 0)
        batches.append(times)
        if statistics.median(times) <= NOISY * min(times):
            break
        time.sleep(1.0)  # let whatever stalled it pass
    return Latency(min(batches, key=statistics.median), len(batches))


def runner_with_threads(loaded: Any, threads: int) -> tuple[Any, str]:
    """The loaded export's runner, reloaded so that its runtime uses `threads` threads, and how the thread count
    was set (torch's own count must be set by the caller for the reference)."""
    from targets import get_target

    runner = get_target(loaded.manifest.target).load(loaded.directory, loaded.manifest, threads=threads)
    return runner, runner.thread_control
