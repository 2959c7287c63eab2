"""Every error measure Kiln reports, in one place: cosine similarity, signal-to-noise ratio, top-1 agreement,
absolute and relative error.

The parity gate (compiler/parity/gate.py), the accuracy-aware quantization search and the per-layer quantization
report all judge "how far is this tensor from the reference" with these functions, so that a cosine or an
SNR means the same thing in every report. Pure numpy; imports nothing else of Kiln.
"""

from __future__ import annotations

import math

import numpy as np


def cosine(got: np.ndarray, want: np.ndarray) -> float:
    """Cosine similarity of two arrays taken as flat vectors (1.0 when both are all zeros, 0.0 when one is)."""
    a = np.asarray(got, np.float64).ravel()
    b = np.asarray(want, np.float64).ravel()
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norm == 0.0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(np.dot(a, b) / norm)


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
