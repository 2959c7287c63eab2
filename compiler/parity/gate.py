"""The parity gate: reference outputs on several input sets, and per-output comparison metrics."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from kiln.compiler.capture.inputs import random_like
from kiln.compiler.errors import UsageError, error_text
from kiln.compiler.image_layout import nchw_array, nhwc_array, nhwc_names
from kiln.compiler.metrics import (
    MIN_DECIDED_ROWS,
    Channel,
    ChannelSums,
    cosine,
    is_classifier,
    snr_db,
    top1_rows,
    wilson_interval,
)
from kiln.compiler.types import Feeds, OutputMetrics, ParityReport, TensorSpec, Tolerance

DEFAULT_SAMPLES = 4
# Quantized precisions are judged on at least this many input sets: on 4, one flipped near-tie is 25 points of
# top-1. Held-back calibration rows (never those calibrated on) fill them first, random inputs the rest.
QUANTIZED_SAMPLES = 32
QUANTIZED_PRECISIONS = ("int8", "int8-dynamic")
SAVED_SAMPLES_LIMIT = 64 * 2**20
INPUTS_FILE = "parity/inputs.npz"
REFERENCE_FILE = "parity/reference.npz"


if TYPE_CHECKING:
    from kiln.compiler.export.artifacts import Artifact


@dataclass
class ParitySamples:
    """Input sets, where each came from, and the reference outputs on each."""

    inputs: list[Feeds]
    origins: list[str]
    reference: list[Feeds]
    # How many leading sets unquantized precisions are judged on (None: all); the rest are QUANTIZED_SAMPLES'.
    base: int | None = None

    def for_precision(self, precision: str) -> ParitySamples:
        """The sets an artifact of `precision` is judged on: all of them when quantized, else the leading `base`."""
        if precision in QUANTIZED_PRECISIONS or self.base is None:
            return self
        return ParitySamples(self.inputs[: self.base], self.origins[: self.base], self.reference[: self.base])

    def save(self, directory: Path) -> bool:
        """Store inputs and reference outputs in `directory/parity/`; False when too large to keep."""
        size = sum(a.nbytes for group in (self.inputs, self.reference) for feeds in group for a in feeds.values())
        if size > SAVED_SAMPLES_LIMIT:
            return False
        (directory / "parity").mkdir(exist_ok=True)
        np.savez_compressed(directory / INPUTS_FILE, **_pack(self.inputs))  # type: ignore[arg-type]
        np.savez_compressed(directory / REFERENCE_FILE, **_pack(self.reference))  # type: ignore[arg-type]
        return True

    def subset(self, indices: list[int]) -> ParitySamples:
        """Only the input sets at `indices` (a target that runs some shapes only)."""
        return ParitySamples(
            [self.inputs[i] for i in indices], [self.origins[i] for i in indices], [self.reference[i] for i in indices]
        )

    @classmethod
    def load(cls, directory: Path, origins: list[str]) -> ParitySamples | None:
        """The samples an export stored, or None when it stored none; a UsageError when they are unreadable."""
        if not (directory / INPUTS_FILE).is_file():
            return None
        return cls(_unpack(directory / INPUTS_FILE), origins, _unpack(directory / REFERENCE_FILE))


def _pack(sets: list[Feeds]) -> dict[str, np.ndarray]:
    return {f"{i}/{name}": array for i, feeds in enumerate(sets) for name, array in feeds.items()}


def _unpack(path: Path) -> list[Feeds]:
    sets: dict[int, Feeds] = {}
    try:
        with np.load(path, allow_pickle=False) as data:
            for key in data.files:
                index, name = key.split("/", 1)
                sets.setdefault(int(index), {})[name] = data[key]
    except Exception as exc:
        raise UsageError(
            f"stored parity file {path} is unreadable ({error_text(exc, 160)})",
            "re-export the model, or pass --model SOURCE to recompute the reference",
        ) from None
    return [sets[i] for i in sorted(sets)]


def make_inputs(
    examples: list[np.ndarray],
    specs: list[TensorSpec],
    count: int,
    batches: list[int],
    user_sets: list[tuple[str, Feeds]],
    seed: int = 0,
    shaped: list[tuple[str, list[np.ndarray]]] | None = None,
    extra: int = 0,
) -> tuple[list[Feeds], list[str]]:
    """Parity input sets: the example, random sets within its value range, one per extra batch size, one per
    `shaped` template (origin, arrays of the shape wanted: values drawn like them), the user's, then `extra`
    more random sets (quantized precisions' additional ones)."""
    rng = np.random.default_rng(seed)
    names = [s.name for s in specs]
    sets = [dict(zip(names, examples))]
    origins = ["example"]
    for i in range(1, count):
        sets.append({n: random_like(e, None, rng) for n, e in zip(names, examples)})
        origins.append(f"random#{i}")
    for batch in batches:
        sets.append({n: random_like(e, batch, rng) for n, e in zip(names, examples)})
        origins.append(f"random batch={batch}")
    for origin, templates in shaped or []:
        sets.append({n: random_like(t, None, rng) for n, t in zip(names, templates)})
        origins.append(origin)
    for origin, feeds in user_sets:
        sets.append(feeds)
        origins.append(origin)
    for i in range(count, count + extra):
        sets.append({n: random_like(e, None, rng) for n, e in zip(names, examples)})
        origins.append(f"random#{i}")
    return sets, origins


def compare(actual: list[Feeds], expected: list[Feeds], tolerance: Tolerance) -> list[OutputMetrics]:
    """Per-output metrics of `actual` against `expected` over all samples."""
    return [
        _compare_output(name, [a.get(name) for a in actual], [e[name] for e in expected], tolerance)
        for name in expected[0]
    ]


def _compare_output(
    name: str, actual: list[np.ndarray | None], expected: list[np.ndarray], tolerance: Tolerance
) -> OutputMetrics:
    kind = "exact" if expected[0].dtype.kind in "biu" else "float"
    for index, (got, want) in enumerate(zip(actual, expected)):
        if got is None:
            return OutputMetrics(name, False, kind, reason=f"output missing from the artifact (sample {index})")
        if np.shape(got) != want.shape:
            return OutputMetrics(
                name,
                False,
                kind,
                worst_sample=index,
                reason=f"shape {list(np.shape(got))} != reference {list(want.shape)} (sample {index})",
            )
    pairs = [(np.asarray(got), want) for got, want in zip(actual, expected)]
    metrics = _judge_exact(name, pairs, tolerance) if kind == "exact" else _judge_float(name, pairs, tolerance)
    metrics.shape = list(pairs[0][0].shape)
    if not any(want.size for _, want in pairs):
        metrics.passed = False
        metrics.reason = (
            f"the output has no elements (shape {list(pairs[0][1].shape)}) on every input set: "
            "an empty comparison proves nothing"
        )
    return metrics


def _judge_exact(name: str, pairs: list[tuple[np.ndarray, np.ndarray]], tolerance: Tolerance) -> OutputMetrics:
    """Integer and boolean outputs: the fraction of equal elements."""
    total = sum(want.size for _, want in pairs)
    agree = sum(int(np.count_nonzero(got.astype(want.dtype) == want)) for got, want in pairs)
    metrics = OutputMetrics(name, True, "exact", agreement=agree / total if total else 1.0)
    metrics.passed = metrics.agreement >= tolerance.min_agreement
    if not metrics.passed:
        metrics.reason = f"agreement {metrics.agreement:.4f} < {tolerance.min_agreement}"
    return metrics


def _judge_float(name: str, pairs: list[tuple[np.ndarray, np.ndarray]], tolerance: Tolerance) -> OutputMetrics:
    """Float outputs: elementwise closeness, cosine, SNR, the worst channel's cosine and SNR about its own mean, and
    (classifier outputs) top-1 agreement."""
    metrics = OutputMetrics(name, True, "float")
    mismatched = total = 0
    signal = noise = 0.0
    top1: list[tuple[np.ndarray, np.ndarray]] = []
    channels = ChannelSums(tolerance.rtol)
    for index, (got, want) in enumerate(pairs):
        total += want.size
        g, w = got.astype(np.float64), want.astype(np.float64)
        channels.add(g, w)
        diff = np.where(np.isnan(g) & np.isnan(w), 0.0, np.abs(g - w))
        diff = np.where(np.isnan(diff), np.inf, diff)
        mismatched += int(np.count_nonzero(diff > tolerance.atol + tolerance.rtol * np.abs(np.nan_to_num(w))))
        if diff.size:
            if float(diff.max()) > metrics.max_abs_error:
                metrics.worst_sample, metrics.max_abs_error = index, float(diff.max())
            rel = diff / np.maximum(np.abs(np.nan_to_num(w)), max(tolerance.atol, 1e-12))
            metrics.max_rel_error = max(metrics.max_rel_error, float(rel.max()))
        metrics.min_cosine = min(metrics.min_cosine, cosine(np.nan_to_num(g), np.nan_to_num(w)))
        signal += float(np.sum(np.nan_to_num(w) ** 2))
        noise += float(np.sum(np.nan_to_num(g - w, nan=np.inf) ** 2))
        if is_classifier(want):
            top1.append(top1_rows(g, w))
    metrics.mismatch_fraction = mismatched / total if total else 0.0
    metrics.snr_db = snr_db(signal, noise)
    worst = _worst_channel(channels.channels(), tolerance)
    if worst is not None:
        metrics.channel_axis, metrics.channel_index = worst.axis, worst.index
        metrics.channel_cosine, metrics.channel_snr_db = worst.cosine, worst.snr_db
    if top1:
        _top1_figures(metrics, np.concatenate([a for a, _ in top1]), np.concatenate([d for _, d in top1]))
        metrics.top1_gated = tolerance.min_top1 > 0
    metrics.reason = "; ".join(_float_failures(metrics, tolerance))
    metrics.passed = not metrics.reason
    return metrics


def _worst_channel(channels: list[Channel], tolerance: Tolerance) -> Channel | None:
    """The channel the report names: the one with the lowest SNR (then cosine) among those that fail a channel
    threshold, else among all."""
    snr = tolerance.min_channel_snr_db if tolerance.min_channel_snr_db is not None else -math.inf
    cos = tolerance.min_channel_cosine if tolerance.min_channel_cosine is not None else -math.inf
    failing = [c for c in channels if c.cosine < cos or c.snr_db < snr]
    return min(failing or channels, key=lambda c: (c.snr_db, c.cosine), default=None)


def _top1_figures(metrics: OutputMetrics, agrees: np.ndarray, decided: np.ndarray) -> None:
    """Top-1 agreement counted on the decided rows only (metrics.top1_rows), with its Wilson 95% interval; the
    near-ties and their flips are recorded, not counted."""
    metrics.top1_decided = int(np.count_nonzero(decided))
    metrics.top1_agreed = int(np.count_nonzero(agrees & decided))
    metrics.top1_near_ties = int(decided.size - metrics.top1_decided)
    metrics.top1_near_tie_flips = int(np.count_nonzero(~agrees & ~decided))
    metrics.top1_decidable = metrics.top1_decided >= MIN_DECIDED_ROWS
    if metrics.top1_decided:
        metrics.top1_agreement = metrics.top1_agreed / metrics.top1_decided
        metrics.top1_ci = [round(x, 4) for x in wilson_interval(metrics.top1_agreed, metrics.top1_decided)]


def _float_failures(metrics: OutputMetrics, tolerance: Tolerance) -> list[str]:
    """Why a float output fails the tolerance (empty: it passes)."""
    reasons = []
    if metrics.mismatch_fraction > tolerance.max_mismatch:
        reasons.append(
            f"{metrics.mismatch_fraction:.2%} of elements outside atol={tolerance.atol:g} "
            f"rtol={tolerance.rtol:g} (allowed {tolerance.max_mismatch:.2%})"
        )
    if metrics.min_cosine < tolerance.min_cosine:
        reasons.append(f"cosine {metrics.min_cosine:.6f} < {tolerance.min_cosine}")
    if tolerance.min_snr_db is not None and metrics.snr_db < tolerance.min_snr_db:
        reasons.append(f"SNR {metrics.snr_db:.1f} dB < {tolerance.min_snr_db} dB")
    if metrics.channel_axis is not None:
        where = f"worst channel [axis {metrics.channel_axis}, #{metrics.channel_index}]"
        if tolerance.min_channel_cosine is not None and metrics.channel_cosine < tolerance.min_channel_cosine:
            reasons.append(f"{where} cosine {metrics.channel_cosine:.4f} < {tolerance.min_channel_cosine}")
        if tolerance.min_channel_snr_db is not None and metrics.channel_snr_db < tolerance.min_channel_snr_db:
            reasons.append(f"{where} SNR {metrics.channel_snr_db:.1f} dB < {tolerance.min_channel_snr_db} dB")
    top1 = metrics.top1_agreement
    if top1 is not None and metrics.top1_decidable and top1 < tolerance.min_top1:
        reasons.append(
            f"top-1 agreement {top1:.2%} < {tolerance.min_top1:.0%} on {metrics.top1_decided} decided rows "
            f"(95% CI [{(metrics.top1_ci or [0, 1])[0]:.2f}, {(metrics.top1_ci or [0, 1])[1]:.2f}])"
        )
    return reasons


def in_reference_layout(
    run: Callable[[Feeds], Feeds], inputs: list[TensorSpec], outputs: list[TensorSpec]
) -> Callable[[Feeds], Feeds]:
    """`run` taking and returning the reference's NCHW arrays, for an artifact whose image I/O is NHWC."""
    nhwc_in, nhwc_out = set(nhwc_names(inputs)), set(nhwc_names(outputs))
    if not nhwc_in and not nhwc_out:
        return run

    def adapted(feeds: Feeds) -> Feeds:
        results = run({k: nhwc_array(v) if k in nhwc_in else v for k, v in feeds.items()})
        return {k: nchw_array(v) if k in nhwc_out else v for k, v in results.items()}

    return adapted


def judge(
    run: Callable[[Feeds], Feeds], samples: ParitySamples, tolerance: Tolerance, reference: str, runtime: dict[str, Any]
) -> ParityReport:
    """Run `run` (named inputs -> named outputs, in the reference's layout) on every sample and judge it against
    the reference outputs."""
    actual = [run(feeds) for feeds in samples.inputs]
    outputs = compare(actual, samples.reference, tolerance)
    return ParityReport(
        passed=all(o.passed for o in outputs),
        reference=reference,
        tolerance=tolerance,
        samples=len(samples.inputs),
        sample_origins=samples.origins,
        outputs=outputs,
        runtime=runtime,
    )


def validate(
    artifact: Artifact, samples: ParitySamples, tolerance: Tolerance, reference: str = "reference"
) -> ParityReport:
    """The parity gate for one artifact: load it with its target, run it on every sample (converting NHWC I/O
    to the reference's layout) and judge every output against the reference outputs within `tolerance`."""
    from kiln.compiler.backend_errors import backend_failures
    from kiln.compiler.export.artifacts import load_runner
    from kiln.targets import get_target

    runner = load_runner(artifact)
    run = in_reference_layout(runner.run, artifact.manifest.inputs, artifact.manifest.outputs)
    target = get_target(artifact.target)
    subset = target.parity_subset(samples.inputs, artifact.manifest)
    if subset is not None:
        samples = samples.subset(subset)
    with backend_failures(target.name, "run"):
        return judge(run, samples, tolerance, reference, runner.runtime_info())
