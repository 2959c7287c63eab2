"""Timing artifacts: `bench(artifact, feeds, settings)`, used by the conversion matrix and the benchmarks, and the
inputs an export is timed on (`bench_feeds`, for `kiln bench` and `kiln tune`).

A latency is the median of timed runs after untimed warm-up runs. Where other processes compete for the
cores, runs stall (torch's OpenMP pool most of all, by tens of milliseconds): a batch whose median is over
NOISY times its fastest run is re-run, up to BATCHES batches, and the least disturbed one kept.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import UsageError

if TYPE_CHECKING:
    import numpy as np
    from kiln.compiler.export.artifacts import Artifact
    from kiln.compiler.types import Manifest

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


@dataclass(frozen=True)
class BenchSettings:
    """How to time an artifact: the runtime's threads (None: its default), timed runs per batch, warm-up runs."""

    threads: int | None = None
    runs: int = 20
    warmup: int = 3


@dataclass(frozen=True)
class Timing:
    """What timing one artifact found: its latency, how its threads were set, and how long loading took."""

    latency: Latency
    threads: int | None
    thread_control: str
    load_s: float


def bench(artifact: Artifact, feeds: dict[str, np.ndarray], settings: BenchSettings | None = None) -> Timing:
    """Load `artifact` with its target's runtime and time it on `feeds` (named inputs in the reference's layout,
    as stored in parity/inputs.npz; channels-last inputs are transposed once, before timing)."""
    from kiln.compiler.export.artifacts import load_runner
    from kiln.compiler.image_layout import nhwc_array, nhwc_names

    settings = settings or BenchSettings()
    started = time.perf_counter()
    runner = load_runner(artifact, settings.threads)
    load_s = time.perf_counter() - started
    nhwc = set(nhwc_names(artifact.manifest.inputs))
    own = {name: nhwc_array(value) if name in nhwc else value for name, value in feeds.items()}
    latency = least_disturbed(lambda: runner.run(own), settings.runs, settings.warmup)
    return Timing(latency, settings.threads, runner.thread_control, round(load_s, 3))


def runner_with_threads(loaded: Any, threads: int) -> tuple[Any, str]:
    """The loaded export's runner, reloaded so that its runtime uses `threads` threads, and how the thread count
    was set (torch's own count must be set by the caller for the reference)."""
    from kiln.compiler.export.artifacts import Artifact, load_runner

    runner = load_runner(Artifact(loaded.directory, loaded.manifest), threads)
    return runner, runner.thread_control


def bench_feeds(directory: Path, manifest: Manifest, batch: int | None, artifact_layout: bool) -> dict[str, np.ndarray]:
    """The inputs to time on: the export's first stored parity input set (the model's example), its rows repeated
    to `batch` rows when given, and channels-last where the artifact takes NHWC (`artifact_layout`)."""
    import numpy as np
    from kiln.compiler.image_layout import nhwc_array, nhwc_names
    from kiln.compiler.parity.gate import ParitySamples

    samples = ParitySamples.load(directory, [])
    if samples is None or not samples.inputs:
        raise UsageError(f"{directory} stored no parity inputs to time it on", "re-export the model to store them")
    feeds = samples.inputs[0]
    if batch is not None:
        feeds = {k: np.take(v, np.arange(batch) % v.shape[0], axis=0) for k, v in feeds.items()}
    nhwc = set(nhwc_names(manifest.inputs)) if artifact_layout else set()
    return {k: nhwc_array(v) if k in nhwc else np.ascontiguousarray(v) for k, v in feeds.items()}
