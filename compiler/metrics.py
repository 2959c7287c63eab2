"""Every error measure Kiln reports, in one place: cosine similarity, signal-to-noise ratio, top-1 agreement,
absolute and relative error.

The parity gate (compiler/parity/gate.py), the accuracy-aware quantization search and the per-layer quantization
report all judge "how far is this tensor from the reference" with these functions, so that a cosine or an
SNR means the same thing in every report. Pure numpy; imports nothing else of Kiln.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def cosine(got: np.ndarray, want: np.ndarray) -> float:
    """Cosine similarity of two arrays taken as flat vectors (1.0 when both are all zeros, 0.0 when one is)."""
    a = np.asarray(got, np.float64).ravel()
    b = np.asarray(want, np.float64).ravel()
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norm == 0.0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(np.dot(a, b) / norm)


def next_token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The negative log-likelihood of each target token under the logits that predict it ([positions, vocab] and
    [positions]), in nats: log-sum-exp of the row minus the target's logit, in float64 (inf for a non-finite row).
    Their mean's exponential is the perplexity of the stream."""
    rows = np.asarray(logits, np.float64)
    top = np.max(rows, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        total = np.log(np.sum(np.exp(rows - top), axis=-1)) + top[:, 0]
        nll = total - rows[np.arange(len(rows)), np.asarray(targets, np.int64)]
    return np.where(np.isfinite(nll), nll, np.inf)


def snr_db(signal: float, noise: float) -> float:
    """Signal-to-noise ratio in dB from the reference's power and the error's power (inf when exact,
    -inf when the reference is all zeros but the error is not, or the error is not finite)."""
    if noise == 0.0:
        return math.inf
    if signal == 0.0 or not math.isfinite(noise):
        return -math.inf
    return 10 * math.log10(signal / noise)


def is_classifier(output: np.ndarray) -> bool:
    """Logits or probabilities: a float [batch, classes] array with at least two classes."""
    return output.ndim == 2 and output.shape[1] >= 2 and output.dtype.kind == "f"


def top1_matches(got: np.ndarray, want: np.ndarray) -> int:
    """How many rows of a [batch, classes] output have the reference's argmax."""
    return int(np.count_nonzero(np.argmax(got, axis=1) == np.argmax(want, axis=1)))


# A row is a near-tie when the reference's top-1/top-2 margin is at most this many times the artifact's RMS error
# on that row's scores. (Not max|error|: a margin above 2 * max|error| makes a flip impossible by construction.)
NEAR_TIE_FACTOR = 2.0
# Fewer decided rows than this and a top-1 agreement is not decidable: the other measures decide alone.
MIN_DECIDED_ROWS = 10


def top1_rows(got: np.ndarray, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a [batch, classes] output: (agrees, decided). `agrees`: the artifact has the reference's argmax.
    `decided`: the reference's top-1/top-2 margin exceeds NEAR_TIE_FACTOR times the row's RMS error, so that the
    artifact's error cannot by itself explain a flip; the other rows are near-ties. A row whose error or margin is
    not finite counts as decided (a NaN output's flips are counted, never excused)."""
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    agrees = np.argmax(g, axis=1) == np.argmax(w, axis=1)
    top2 = np.partition(w, w.shape[1] - 2, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    with np.errstate(invalid="ignore", over="ignore"):
        error = np.sqrt(np.mean((g - w) ** 2, axis=1))
        decided = ~(margin <= NEAR_TIE_FACTOR * error)
    return agrees, decided


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a proportion `successes / trials`; (0, 1) with no trials."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    low = 0.0 if successes <= 0 else max(0.0, centre - half)
    return low, 1.0 if successes >= trials else min(1.0, centre + half)


def mean_row_cosine(got: np.ndarray, want: np.ndarray) -> float:
    """The mean over the batch axis of each row's cosine similarity, clipped to [0, 1] (1.0 = identical)."""
    g = np.asarray(got, np.float64)
    w = np.asarray(want, np.float64)
    g = g.reshape(len(g), -1) if g.ndim else g.reshape(1, 1)
    w = w.reshape(len(w), -1) if w.ndim else w.reshape(1, 1)
    norms = np.linalg.norm(g, axis=1) * np.linalg.norm(w, axis=1)
    dots = np.sum(g * w, axis=1)
    exact = np.all(g == w, axis=1)
    values = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(exact, 1.0, 0.0))
    return float(np.mean(np.clip(values, 0.0, 1.0)))


class ErrorSums:
    """Running sums of one tensor's error against its reference over several samples: cosine, SNR and the
    largest absolute error of all the samples together. A sample whose shape differs counts as all lost."""

    def __init__(self) -> None:
        self.dot = self.reference_power = self.got_power = self.noise = 0.0
        self.max_abs = 0.0

    def add(self, got: np.ndarray, want: np.ndarray) -> None:
        """Add one sample."""
        g, w = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
        if g.shape != w.shape:
            g = np.zeros_like(w)
        diff = g - w
        self.dot += float(g @ w)
        self.reference_power += float(w @ w)
        self.got_power += float(g @ g)
        self.noise += float(diff @ diff)
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))

    @property
    def cosine(self) -> float:
        """Cosine similarity of all samples taken together."""
        norm = math.sqrt(self.reference_power * self.got_power)
        if not norm:
            return 1.0 if self.reference_power == self.got_power == 0.0 else 0.0
        return self.dot / norm

    @property
    def snr_db(self) -> float:
        """Signal-to-noise ratio of all samples taken together, in dB."""
        return snr_db(self.reference_power, self.noise)


def channel_axes(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The axes along which an output of this shape is judged channel by channel (axis 0 is the batch): axis 1,
    the channel or feature axis of [N, C, ...] and [N, F], and the last axis, the features of [B, S, H] and the
    channels of a channels-last image or a [N, anchors, 4 + classes] detection head. None for a scalar or a
    vector: the whole tensor is its one channel."""
    return tuple(sorted({1, len(shape) - 1})) if len(shape) >= 2 else ()


@dataclass(frozen=True)
class Channel:
    """One channel of an output (index `index` along `axis`) and its error against the reference's values of that
    channel alone: cosine and SNR measured about the channel's own reference mean (see ChannelSums)."""

    axis: int
    index: int
    cosine: float
    snr_db: float


class ChannelSums:
    """Running per-channel sums of one output's error over several samples, along each of its `channel_axes`.

    Each channel is measured against its own spread: its signal is its reference values minus the channel's
    reference mean (over every sample and every other axis), and its cosine is that of the artifact's values and
    the reference's, both minus that mean. A channel lost to a range set by a 1000x bigger one (quantized to one
    value) scores a cosine near 0 and an SNR near 0 dB there, while the whole tensor's are those of the big channel.
    Degenerate channels: a channel whose reference spread is at most `flat` times its RMS (constant, or nearly so:
    a spread the precision cannot be asked to keep) is measured against its values themselves (about 0, not its
    mean); a channel that is zero in the reference has no scale of its own and is left to the whole-tensor
    measures; a channel where the artifact gives a non-finite value the reference does not (or the reverse) scores
    cosine 0 and SNR -inf. An axis whose size differs between samples (a dynamic dimension) is not a channel axis.
    `channels()` gives every judged channel's figures; the gate (kiln.compiler.parity.gate) names the worst."""

    FIELDS = ("n", "sx", "sy", "sxx", "syy", "sxy", "noise")

    def __init__(self, flat: float) -> None:
        self.flat = flat
        self.sums: dict[int, dict[str, np.ndarray]] | None = None

    def add(self, got: np.ndarray, want: np.ndarray) -> None:
        """Add one sample (`got` of `want`'s shape)."""
        if self.sums is None:
            self.sums = {axis: {} for axis in channel_axes(want.shape)}
        for axis in list(self.sums):
            sums = self.sums[axis]
            if want.ndim <= axis or (sums and len(sums["n"]) != want.shape[axis]):
                del self.sums[axis]
                continue
            self._add_axis(sums, _by_channel(got, axis), _by_channel(want, axis))

    @staticmethod
    def _add_axis(sums: dict[str, np.ndarray], g: np.ndarray, w: np.ndarray) -> None:
        """Add one sample's [before, channels, after] views to one axis' sums."""
        finite = bool(np.isfinite(g).all() and np.isfinite(w).all())
        mask = None if finite else np.isfinite(g) & np.isfinite(w)
        if not sums:
            sums.update({k: np.zeros(w.shape[1]) for k in ChannelSums.FIELDS}, bad=np.zeros(w.shape[1], bool))
            known = w if mask is None else np.where(mask, w, 0.0)
            sums["shift"] = known.mean(axis=(0, 2))  # near each channel's mean: the sums below stay exact
        shift = sums["shift"][None, :, None]
        x, y = w - shift, g - shift
        if mask is None:
            sums["n"] += w.shape[0] * w.shape[2]
        else:  # a non-finite value the other side does not share spoils its channel; shared ones are left out
            same = (g == w) | (np.isnan(g) & np.isnan(w))
            sums["bad"] |= np.any(~mask & ~same, axis=(0, 2))
            x, y = np.where(mask, x, 0.0), np.where(mask, y, 0.0)
            sums["n"] += np.count_nonzero(mask, axis=(0, 2))
        sums["sx"] += x.sum(axis=(0, 2))
        sums["sy"] += y.sum(axis=(0, 2))
        for name, a, b in (("sxx", x, x), ("syy", y, y), ("sxy", x, y)):
            sums[name] += np.einsum("icj,icj->c", a, b)
        error = x - y
        sums["noise"] += np.einsum("icj,icj->c", error, error)

    def channels(self) -> list[Channel]:
        """Every judged channel (not zero in the reference) of every channel axis."""
        found = []
        for axis, sums in (self.sums or {}).items():
            if sums:
                found += [Channel(axis, int(i), c, s) for i, (c, s) in _channel_figures(sums, self.flat).items()]
        return found


def _by_channel(array: np.ndarray, axis: int) -> np.ndarray:
    """`array` as a float64 view [the axes before `axis`, the channels along it, the axes after it] (no copy)."""
    a = np.asarray(array, np.float64)
    return a.reshape(math.prod(a.shape[:axis]), a.shape[axis], math.prod(a.shape[axis + 1 :]))


def _channel_figures(sums: dict[str, np.ndarray], flat: float) -> dict[int, tuple[float, float]]:
    """Channel index -> (cosine, SNR dB) from one axis' sums, each about its centre: the reference mean, or 0 for a
    flat channel; channels zero in the reference are left out."""
    n, sx, sy, shift = sums["n"], sums["sx"], sums["sy"], sums["shift"]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mean = np.where(n > 0, sx / np.maximum(n, 1), 0.0)  # the reference mean, less the shift
        spread = np.maximum(sums["sxx"] - n * mean * mean, 0.0)
        raw = sums["sxx"] + 2 * shift * sx + n * shift * shift  # the sum of the reference's squares
        offset = np.where(spread <= flat * flat * raw, shift, -mean)  # shift minus the centre
        power = np.maximum(sums["sxx"] + 2 * offset * sx + n * offset * offset, 0.0)
        got = np.maximum(sums["syy"] + 2 * offset * sy + n * offset * offset, 0.0)
        dot = sums["sxy"] + offset * (sx + sy) + n * offset * offset
    figures = {}
    for i in np.flatnonzero(raw > 0):
        if sums["bad"][i]:
            figures[int(i)] = (0.0, -math.inf)
            continue
        norm = math.sqrt(float(power[i]) * float(got[i]))
        both_zero = power[i] == got[i] == 0.0
        value = float(np.clip(dot[i] / norm, -1.0, 1.0)) if norm else (1.0 if both_zero else 0.0)
        figures[int(i)] = (value, snr_db(float(power[i]), float(sums["noise"][i])))
    return figures
