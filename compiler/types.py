"""Small named types: tensor specs, tolerances, parity metrics, artifacts and the manifest."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeGuard

from kiln.compiler.errors import error_text

if TYPE_CHECKING:
    import numpy as np

Feeds: TypeAlias = "dict[str, np.ndarray]"  # arrays by tensor name: a model's inputs or outputs

MANIFEST_NAME = "manifest.json"
# Written by `kiln bench` beside the manifest after the export; the one unlisted file `kiln verify` accepts.
BENCH_FILE = "bench.json"
SCHEMA_VERSION = 1
# Passing outputs named alike but for one number (a decoder's present.0.key ... present.29.key) are summarised in
# one line, by the worst of them, from this many on.
GROUPED_OUTPUTS = 3


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a flat dataclass from a dict, ignoring keys it does not know (newer schemas)."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, shape (str = named dynamic dim), dtype and layout."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    layout: str | None = None

    @property
    def dynamic_dims(self) -> dict[int, str]:
        """Axis -> name of each dynamic dimension."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def describe(self) -> str:
        """Short human-readable form, e.g. `image: float32[batch,3,32,32]`."""
        return f"{self.name}: {self.dtype}[{','.join(str(d) for d in self.shape)}]"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        """Inverse of `dataclasses.asdict`."""
        return cls(data["name"], tuple(data["shape"]), data["dtype"], data.get("layout"))


@dataclass(frozen=True)
class Tolerance:
    """What counts as parity for one artifact.

    Float outputs pass when at most `max_mismatch` of their elements fall outside
    `|actual - expected| <= atol + rtol * |expected|`, their cosine similarity to the
    reference is at least `min_cosine`, their signal-to-noise ratio at least `min_snr_db`
    (when set) and, for classifier-shaped outputs ([batch, classes]), the argmax agrees with
    the reference's on at least `min_top1` of the rows. Each channel is judged too (along axis 1 and the last axis,
    kiln.compiler.metrics.ChannelSums): the worst one's cosine and SNR about its own mean must reach
    `min_channel_cosine` and `min_channel_snr_db`; a channel whose spread is within `rtol` of its RMS is flat at
    this precision and is measured against its values. Integer and boolean outputs pass when at least
    `min_agreement` of their elements are equal.
    """

    atol: float
    rtol: float
    max_mismatch: float = 0.0
    min_cosine: float = 0.9999
    min_agreement: float = 1.0
    min_snr_db: float | None = None
    min_top1: float = 0.0
    min_channel_cosine: float | None = None
    min_channel_snr_db: float | None = None

    def __post_init__(self) -> None:
        check_thresholds(**asdict(self))  # every field is a threshold, checked in field order

    @classmethod
    def for_precision(cls, precision: str) -> Tolerance:
        """The default tolerance for an artifact of this precision."""
        return DEFAULT_TOLERANCES[precision]

    def with_overrides(self, **overrides: float | None) -> Tolerance:
        """This tolerance with the user's overrides (e.g. atol, min_cosine) applied where not None."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


THRESHOLD_FLAGS = {"atol": "--atol", "rtol": "--rtol", "min_cosine": "--min-cosine", "min_snr_db": "--min-snr"}
THRESHOLD_FLAGS |= {"min_top1": "--min-top1", "max_drop": "--max-drop", "min_channel_snr_db": "--min-channel-snr"}
THRESHOLD_FLAGS |= {"min_channel_cosine": "--min-channel-cosine"}
FRACTIONS = ("max_mismatch", "min_cosine", "min_agreement", "min_top1", "min_channel_cosine")  # within [0, 1]


def is_finite_number(value: Any) -> TypeGuard[float]:
    """A real number (an int or a float, not a bool), neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_thresholds(**values: float | None) -> None:
    """The one check of every parity and accuracy threshold, for the CLI, the library, matrix cells and stored
    manifests alike: a number, finite and non-negative; cosine, top-1 and the other fractions at most 1. A NaN
    would switch a comparison off (every `x < nan` is false), so it is refused, not ignored."""
    from kiln.compiler.errors import UsageError

    for name, value in values.items():
        if value is None:
            continue
        flag = THRESHOLD_FLAGS.get(name, name)
        ok = is_finite_number(value) and value >= 0
        if not ok:
            raise UsageError(f"{flag} {value}: a threshold must be a finite number >= 0", f"e.g. {flag} 0.01")
        if name in FRACTIONS and value > 1:
            raise UsageError(f"{flag} {value}: must be between 0 and 1", f"e.g. {flag} 0.99")


# Positional: atol, rtol, max_mismatch, min_cosine, min_agreement, min_snr_db, min_top1. The worst channel's thresholds
# come from the figures of benchmarks/bench_channels.py (the zoo's good artifacts, the planted scale cases).
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(1e-4, 1e-3, 0.0, 0.9999, 1.0, min_channel_cosine=0.999, min_channel_snr_db=30.0),
    "fp16": Tolerance(1e-2, 1e-2, 0.01, 0.999, 0.99, min_channel_cosine=0.99, min_channel_snr_db=15.0),
    "bf16": Tolerance(5e-2, 5e-2, 0.02, 0.995, 0.98, min_channel_cosine=0.8, min_channel_snr_db=3.0),
    # Quantized artifacts are judged by agreement, not elementwise closeness.
    "int8-dynamic": Tolerance(1e-1, 1e-1, 1.0, 0.995, 0.95, 20.0, 0.9, min_channel_cosine=0.5, min_channel_snr_db=1.0),
    "int8": Tolerance(1e-1, 1e-1, 1.0, 0.99, 0.95, 15.0, 0.9, min_channel_cosine=0.5, min_channel_snr_db=1.0),
    # int4 weights (a text-generation export's decoding states; its tokens: kiln.compiler.generation.stream_gate).
    # No worst-channel criterion: a channel of the logits is one vocabulary entry over a few decoding states, nearly
    # constant on a model at transformers' init, and int4's noise swamps its spread (a 20M Llama's int4 onnx export:
    # whole logits cosine 0.966, 13 dB; worst vocabulary column -4.4 dB). The streams judge the tokens instead.
    "int4": Tolerance(1e-1, 1e-1, 1.0, 0.85, 0.9, 6.0, 0.8),
}


@dataclass
class OutputMetrics:
    """How one output of the artifact compares with the reference, over all samples."""

    name: str
    passed: bool
    kind: str  # "float" or "exact"
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    min_cosine: float = 1.0
    mismatch_fraction: float = 0.0
    agreement: float = 1.0
    snr_db: float = float("inf")
    top1_agreement: float | None = None  # classifier-shaped outputs only: agreement on the decided rows
    # Top-1 counts on classifier outputs (None otherwise): decided rows, agreeing ones, near-ties and their flips,
    # the Wilson 95% interval, whether top-1 applied (kiln.compiler.metrics.top1_rows).
    top1_decided: int | None = None
    top1_agreed: int | None = None
    top1_near_ties: int | None = None
    top1_near_tie_flips: int | None = None
    top1_ci: list[float] | None = None
    top1_decidable: bool | None = None
    # Whether the gate judges top-1 (min_top1 > 0: quantized precisions' default, or --min-top1); the summary gives
    # the decided rows and the CI only then. None: a manifest written before it existed (summarised as judged).
    top1_gated: bool | None = None
    # The worst channel (kiln.compiler.metrics.ChannelSums.worst): its axis and index, cosine and SNR about its mean.
    channel_axis: int | None = None
    channel_index: int | None = None
    channel_cosine: float = 1.0
    channel_snr_db: float = float("inf")
    worst_sample: int = 0
    reason: str = ""
    shape: list[int] | None = None  # the shape the artifact produced on the first input set

    def summary(self) -> str:
        """One line: name, verdict and the figures that matter."""
        verdict = "ok  " if self.passed else "FAIL"
        if self.kind == "exact":
            figures = f"agreement={self.agreement:.4f}"
        else:
            figures = (
                f"max_abs={self.max_abs_error:.3g} max_rel={self.max_rel_error:.3g} "
                f"cosine={self.min_cosine:.6f} snr={self.snr_db:.1f}dB out_of_tol={self.mismatch_fraction:.2%}"
            )
            if self.channel_axis is not None:
                figures += f" worst channel [axis {self.channel_axis}, #{self.channel_index}]: "
                figures += f"cosine={self.channel_cosine:.4f} snr={self.channel_snr_db:.1f}dB"
            figures += self._top1_figure()
        reason = f"  <- {self.reason}" if self.reason else ""
        return f"{verdict} {self.name}: {figures}{reason}"

    def _top1_figure(self) -> str:
        """E.g. ` top-1 31/32 decided (1 near-tie), 95% CI [0.84, 0.99]` where the gate judges top-1; ` top-1 4/4`
        (rows whose argmax agrees, near-ties included) where it does not: the element-wise tolerance decides
        there, and the decided rows and the interval would be noise. Empty for a non-classifier output."""
        if self.top1_decided is None or self.top1_agreed is None:  # a manifest written before the counts existed
            return f" top1={self.top1_agreement:.2%}" if self.top1_agreement is not None else ""
        ties = self.top1_near_ties or 0
        if self.top1_gated is False:
            agreed = self.top1_agreed + ties - (self.top1_near_tie_flips or 0)
            return f" top-1 {agreed}/{self.top1_decided + ties}"
        text = f" top-1 {self.top1_agreed}/{self.top1_decided} decided ({ties} near-tie{'s' * (ties != 1)})"
        if self.top1_ci is not None:
            text += f", 95% CI [{self.top1_ci[0]:.2f}, {self.top1_ci[1]:.2f}]"
        return text + ("" if self.top1_decidable else ", not decidable")


def _output_lines(outputs: list[OutputMetrics]) -> list[str]:
    """A summary line per output, but one per group of GROUPED_OUTPUTS or more passing outputs whose names differ
    only in one number: the worst one's figures (lowest cosine, or agreement), e.g. `ok   present.N.key (30
    outputs, N = 0..29; the worst, N = 28): ...`. A failing output always has its own line."""
    groups: dict[str, list[OutputMetrics]] = {}
    for output in outputs:
        pattern = re.sub(r"\d+", "N", output.name, count=1) if output.passed else output.name
        groups.setdefault(pattern if pattern != output.name else f"\0{output.name}", []).append(output)
    lines = []
    for pattern, members in groups.items():
        if len(members) < GROUPED_OUTPUTS:
            lines += [output.summary() for output in members]
            continue
        worst = min(members, key=lambda o: o.agreement if o.kind == "exact" else o.min_cosine)
        numbers = {o.name: int(re.findall(r"\d+", o.name)[0]) for o in members}
        low, high = min(numbers.values()), max(numbers.values())
        label = f"{pattern} ({len(members)} outputs, N = {low}..{high}; the worst, N = {numbers[worst.name]})"
        lines.append(worst.summary().replace(f" {worst.name}: ", f" {label}: ", 1))
    return lines


@dataclass
class ParityReport:
    """The verdict of the parity gate for one artifact."""

    passed: bool
    reference: str
    tolerance: Tolerance
    samples: int
    sample_origins: list[str]
    outputs: list[OutputMetrics]
    runtime: dict[str, Any] = field(default_factory=dict)
    divergence: dict[str, Any] | None = None  # where it diverges (kiln.compiler.diagnose.divergence.Divergence.to_dict)
    generation: dict[str, Any] | None = None  # greedy decoding vs the reference (kiln.compiler.generation.export)

    def failures(self) -> list[OutputMetrics]:
        """The outputs that failed."""
        return [o for o in self.outputs if not o.passed]

    def summary(self) -> str:
        """Multi-line human-readable report."""
        head = "PASSED" if self.passed else "FAILED"
        lines = [f"parity {head} against {self.reference} on {self.samples} input sets"]
        lines += ["  " + line for line in _output_lines(self.outputs)]
        if self.divergence is not None:
            lines.append("  " + str(self.divergence.get("summary", "")))
        if self.generation is not None:
            lines.append("  " + generation_summary(self.generation))
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParityReport:
        """Inverse of `dataclasses.asdict`."""
        return cls(
            passed=data["passed"],
            reference=data["reference"],
            tolerance=_from_dict(Tolerance, data["tolerance"]),
            samples=data["samples"],
            sample_origins=list(data.get("sample_origins", [])),
            outputs=[_from_dict(OutputMetrics, non_finite_back(o)) for o in data["outputs"]],
            runtime=dict(data.get("runtime", {})),
            divergence=data.get("divergence"),
            generation=data.get("generation"),
        )


def generation_summary(generation: dict[str, Any]) -> str:
    """One line for a parity report's `generation` record (kiln.compiler.generation.gate, or the teacher-forced
    streams of a quantized export: kiln.compiler.generation.stream_gate), whatever it holds."""
    if generation.get("kind") == "teacher-forced streams":
        return _stream_summary(generation)
    first = generation.get("first_mismatch")
    where = first
    if isinstance(first, dict):
        prompt = first.get("prompt")
        where = f"prompt {prompt + 1 if isinstance(prompt, int) else prompt}, from step {first.get('step')}"
    verdict = "identical" if generation.get("identical") else f"DIFFER ({where})"
    within = "within tolerance" if generation.get("logits_within_tolerance") else "OUTSIDE tolerance"
    err, tokens = generation.get("max_abs_logit_err"), generation.get("tokens")
    prompts = generation.get("prompts")
    count = f" over {len(prompts)} prompts" if isinstance(prompts, list) else ""
    crossing = f" ({generation['crossing']})" if isinstance(generation.get("crossing"), str) else ""
    error = f"{err:.3g}" if isinstance(err, int | float) else "n/a"
    return f"generation: {tokens} greedy tokens{count} {verdict}{crossing}; step logits {within} (max abs err {error})"


def _stream_summary(record: dict[str, Any]) -> str:
    """E.g. `generation: 314 teacher-forced tokens over 6 streams within thresholds: top-1 0.996 (>= 0.85; 239
    decided positions), mean cosine 0.9986 (>= 0.99; worst step 0.979), perplexity ratio 1.007 (<= 1.05)`."""

    def number(value: Any, spec: str) -> str:
        return format(value, spec) if isinstance(value, int | float) and not isinstance(value, bool) else "n/a"

    stored_limits, stored_failed = record.get("thresholds"), record.get("failed")
    limits: dict[str, Any] = stored_limits if isinstance(stored_limits, dict) else {}
    failed: list[Any] = stored_failed if isinstance(stored_failed, list) else []
    verdict = "within thresholds" if record.get("passed") else f"OUTSIDE ({', '.join(map(str, failed))})"
    decided = f"{record.get('top1_decided')} decided positions"
    top1 = record.get("top1")
    figures = [
        f"top-1 {number(top1, '.3f')} (>= {limits.get('min_top1')}; {decided})"
        if top1 is not None
        else f"top-1 not decidable (only {decided})",
        f"mean cosine {number(record.get('mean_logit_cosine'), '.4f')} (>= {limits.get('min_mean_cosine')}; "
        f"worst step {number(record.get('min_logit_cosine'), '.3f')})",
        f"perplexity ratio {number(record.get('ppl_ratio'), '.3f')} (<= {limits.get('max_ppl_ratio')})",
    ]
    count = f"{record.get('tokens')} teacher-forced tokens over {record.get('streams')} streams"
    return f"generation: {count} {verdict}: {', '.join(figures)}"


@dataclass(frozen=True)
class ArtifactFile:
    """One file of an export, with its size and sha256."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class PassRecord:
    """What one graph pass did during an export."""

    name: str
    changed: bool
    nodes_before: int
    nodes_after: int
    seconds: float
    ir: str = "onnx"  # the graph it ran on: onnx, fx, or the artifact's own (e.g. tflite) for build-time passes
    rolled_back: str | None = None  # why the pass was undone (it broke the graph or raised), None if it was kept


@dataclass
class Manifest:
    """Everything about one export directory; written as `manifest.json`."""

    target: str
    precision: str
    source: dict[str, Any]
    files: list[ArtifactFile]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parity: ParityReport | None
    published: bool
    parity_gate: bool
    runtime_config: dict[str, Any]
    timings: dict[str, float]
    versions: dict[str, str]
    host: dict[str, Any]
    passes: list[PassRecord] = field(default_factory=list)
    target_info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        """The manifest as pretty JSON (non-finite floats written as strings)."""
        return json.dumps(json_safe(asdict(self)), indent=2, sort_keys=False) + "\n"

    def write(self, directory: Path) -> Path:
        """Write `manifest.json` into `directory`."""
        path = directory / MANIFEST_NAME
        path.write_text(self.to_json())
        return path

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """Read `manifest.json` from an export directory."""
        from kiln.compiler.errors import UsageError

        path = Path(directory) / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(
                f"{directory} is not a Kiln export: {MANIFEST_NAME} is missing",
                "pass the directory that `kiln export --out` wrote",
            ) from None
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            raise UsageError(f"cannot read {path}: {str(exc)[:200]}", "re-export the model") from None
        try:
            return cls._from_json(data, path)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UsageError(f"{path} is malformed ({error_text(exc, 120)})", "re-export the model") from None

    @classmethod
    def _from_json(cls, data: Any, path: Path) -> Manifest:
        """The manifest from parsed JSON; a wrong shape raises KeyError, TypeError, ValueError or AttributeError."""
        from kiln.compiler.errors import UsageError

        if not isinstance(data, dict):
            raise TypeError(f"a JSON object was expected, not {type(data).__name__}")
        if not isinstance(data.get("schema_version", 0), int):
            raise TypeError("schema_version is not a whole number")
        if data.get("schema_version", 0) > SCHEMA_VERSION:
            raise UsageError(
                f"{path} has schema version {data['schema_version']}, newer than this Kiln supports", "upgrade Kiln"
            )
        for key, kind in (("target", str), ("precision", str), ("published", bool), ("parity_gate", bool)):
            if not isinstance(data[key], kind):
                raise TypeError(f"{key} is not a {kind.__name__}")
        return cls(
            target=data["target"],
            precision=data["precision"],
            source=data["source"],
            files=[_from_dict(ArtifactFile, f) for f in data["files"]],
            inputs=[TensorSpec.from_dict(s) for s in data["inputs"]],
            outputs=[TensorSpec.from_dict(s) for s in data["outputs"]],
            parity=ParityReport.from_dict(data["parity"]) if data.get("parity") else None,
            published=data["published"],
            parity_gate=data["parity_gate"],
            runtime_config=data.get("runtime_config", {}),
            timings=data.get("timings", {}),
            versions=data.get("versions", {}),
            host=data.get("host", {}),
            passes=[_from_dict(PassRecord, p) for p in data.get("passes", [])],
            target_info=data.get("target_info", {}),
            notes=list(data.get("notes", [])),
            schema_version=data.get("schema_version", SCHEMA_VERSION),
        )


def non_finite_back(data: dict[str, Any]) -> dict[str, Any]:
    """Undo `json_safe` for one flat dict: "inf", "-inf" and "nan" strings become floats again."""
    return {k: float(v) if v in ("inf", "-inf", "nan") else v for k, v in data.items()}


def json_safe(value: Any) -> Any:
    """Replace NaN/inf (invalid JSON) with strings, recursively; tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
