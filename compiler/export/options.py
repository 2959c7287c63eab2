"""What an export is asked to do, as small option groups, one per concern: `Shapes` (dynamic dims, buckets),
`PassOptions` (-O, --passes, --dump-passes), `Calibration` (int8 calibration, --max-drop), `Thresholds` (the
gate's overrides), `ParityOptions` (parity input sets, the gate, localization), `OutputOptions` (--force, --wait,
--all-or-nothing), `SourceOptions` (--trust-pickle, --task, --cache-size, --llm-format) and `WeightOnly`
(--group-size, --weights); `ExportOptions` holds them with the precision, device and I/O options.

The CLI's flags, the library's keyword arguments (`kiln.export(**options)`) and a matrix cell's options are one
flat vocabulary, `KEYWORDS`: `export_options(**keywords)` maps it onto the groups, in this one place."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.capture.dynamic import DynamicShapes
from kiln.compiler.capture.hf_folder import FolderRequest, parse_shapes
from kiln.compiler.errors import UsageError
from kiln.compiler.generation.llm_format import LLM_FORMATS
from kiln.compiler.parity.gate import DEFAULT_SAMPLES
from kiln.compiler.quantization.calibration import (
    DEFAULT_CALIBRATION_SAMPLES,
    AccuracyBudget,
    CalibrationData,
    CalibrationSpec,
)
from kiln.compiler.quantization.weight_only import BITS, WeightOnlySpec, check_weight_flags
from kiln.compiler.types import Tolerance, check_thresholds
from kiln.passes import PassAdjustments
from kiln.passes.base import DEFAULT_LEVEL, Pass

if TYPE_CHECKING:
    from kiln.targets.base import BuildRequest, Target

IO_OPTIONS = ("nhwc",)  # int8 I/O is not an option: every int8 TFLite/Edge TPU artifact takes int8 I/O


@dataclass(frozen=True)
class Thresholds:
    """The parity gate's thresholds over each precision's defaults (None: the default), refused when not a finite
    number >= 0 (fractions at most 1) before any work."""

    atol: float | None = None
    rtol: float | None = None
    min_cosine: float | None = None
    min_snr_db: float | None = None
    min_top1: float | None = None
    min_channel_cosine: float | None = None  # the worst channel's (kiln.compiler.metrics.ChannelSums)
    min_channel_snr_db: float | None = None

    def __post_init__(self) -> None:
        self.tolerance("fp32")  # the tolerance of any precision applies the same overrides

    def tolerance(self, precision: str) -> Tolerance:
        """The parity tolerance: the precision's default with these overrides."""
        return Tolerance.for_precision(precision).with_overrides(**self.__dict__)


@dataclass(frozen=True)
class Shapes:
    """The dynamic dims (`--dynamic`, `--dynamic-batch`; resolved against the model at capture) and the sizes
    static-shape targets build them at (`--buckets seq=32,64`)."""

    dynamic: DynamicShapes | None = None
    buckets: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def parse(
        cls,
        dynamic: list[str] | tuple[str, ...] | str | None = None,
        dynamic_batch: str | None = None,
        buckets: str | None = None,
    ) -> Shapes:
        """From the flags' text: `dynamic` (["input_ids:1=8:128:64", ...]), `dynamic_batch` ("MIN:MAX"),
        `buckets` ("seq=32,64,128")."""
        if buckets and not dynamic and not dynamic_batch:
            raise UsageError(
                f"--buckets {buckets} needs a dynamic dim to bucket", "add --dynamic SYM=NAME:AXIS=MIN:MAX"
            )
        return cls(DynamicShapes.parse(dynamic, dynamic_batch), parse_buckets(buckets))


@dataclass(frozen=True)
class PassOptions:
    """The graph passes: the level (-O0 none .. -O3 target-specific), the user's adjustments (`--passes
    +name,-name`), an explicit pipeline replacing the level's (library use), and `--dump-passes DIR`."""

    level: int = DEFAULT_LEVEL
    adjustments: PassAdjustments = field(default_factory=PassAdjustments)
    pipeline: tuple[Pass, ...] | None = None
    dump: Path | None = None  # the graph after each pass, per target

    @classmethod
    def parse(
        cls,
        opt_level: int = DEFAULT_LEVEL,
        adjust_passes: str | None = None,
        passes: list[Pass] | tuple[Pass, ...] | None = None,
        dump_passes: str | Path | None = None,
    ) -> PassOptions:
        """From the keywords `opt_level`, `adjust_passes` ("+name,-name"), `passes` and `dump_passes`."""
        pipeline = tuple(passes) if passes is not None else None
        dump = Path(dump_passes) if dump_passes else None
        return cls(opt_level, PassAdjustments.parse(adjust_passes), pipeline, dump)


@dataclass(frozen=True)
class Calibration:
    """How int8 is calibrated (`CalibrationSpec`: --calib, --calib-samples, --calib-method, --per-tensor,
    --activations) and the accuracy budget of accuracy-aware int8 (--max-drop, --metric; None: none)."""

    spec: CalibrationSpec = field(default_factory=CalibrationSpec)
    accuracy: AccuracyBudget | None = None

    def __post_init__(self) -> None:
        if self.accuracy is not None:
            check_thresholds(max_drop=self.accuracy.max_drop)

    @classmethod
    def parse(
        cls,
        calib: str | Path | None = None,
        calib_samples: int = DEFAULT_CALIBRATION_SAMPLES,
        calib_method: str = "minmax",
        per_channel: bool = True,
        symmetric_activations: bool | None = None,
        max_drop: float | None = None,
        metric: str | None = None,
    ) -> Calibration:
        """From the keywords of the calibration flags (`calib`: FILE.npz, a directory or `file.py:loader`)."""
        source = str(calib) if calib is not None else None
        spec = CalibrationSpec(source, calib_samples, calib_method, per_channel, symmetric_activations)
        return cls(spec, AccuracyBudget(max_drop, metric) if max_drop is not None else None)


@dataclass(frozen=True)
class ParityOptions:
    """What the parity gate runs on and what follows its verdict: `--samples` random input sets, the user's
    `--inputs` files, whether a failure keeps the artifact from being published (`--no-parity-gate`: not), and
    localization (None: on a failure, True: always, False: never)."""

    samples: int = DEFAULT_SAMPLES
    inputs_files: tuple[Path, ...] = ()
    gate: bool = True
    localize: bool | None = None

    @classmethod
    def parse(
        cls,
        samples: int = DEFAULT_SAMPLES,
        inputs: list[str | Path] | tuple[str | Path, ...] | None = None,
        parity_gate: bool = True,
        localize: bool | None = None,
    ) -> ParityOptions:
        """From the keywords `samples`, `inputs` (.npz paths), `parity_gate` and `localize`."""
        return cls(samples, tuple(Path(p) for p in inputs or ()), parity_gate, localize)


@dataclass(frozen=True)
class OutputOptions:
    """How an export is published: replace an existing output directory (`--force`), queue behind another export
    to it (`--wait`), and with several targets publish nothing when one fails (`--all-or-nothing`)."""

    force: bool = False
    wait: bool = False
    all_or_nothing: bool = False


@dataclass(frozen=True)
class SourceOptions:
    """How the model is read and what it is exported as: `--trust-pickle` (a .pt2 may run its pickles), `--task`
    (text-generation with its KV cache, or forward; None: text-generation for a causal LM; a checkpoint folder's
    task, `hf_folder.TASKS`), `--cache-size` (a static KV cache's length: a static-cache target's text generation),
    `--llm-format` (onnx, openvino text generation: genai, the runtime's own LLM format, or stateless, Kiln's step
    graph; None: genai where a target has it), and for a checkpoint folder `--shape NAME=DIMS` (its example inputs'
    shapes) and `--trust-remote-code` (it may run its own Python code)."""

    trust_pickle: bool = False
    task: str | None = None
    cache_size: int | None = None
    llm_format: str | None = None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.llm_format is not None and self.llm_format not in LLM_FORMATS:
            raise UsageError(f"--llm-format {self.llm_format}: unknown format", f"use one of: {', '.join(LLM_FORMATS)}")

    @classmethod
    def parse(
        cls,
        trust_pickle: bool = False,
        task: str | None = None,
        cache_size: int | None = None,
        llm_format: str | None = None,
        shape: list[str] | tuple[str, ...] | None = None,
        trust_remote_code: bool = False,
    ) -> SourceOptions:
        """From the keywords; `shape` as the flags' text (["input_ids=1x64", ...])."""
        return cls(trust_pickle, task, cache_size, llm_format, parse_shapes(shape), trust_remote_code)

    def folder_request(self) -> FolderRequest:
        """What these options ask of a checkpoint folder source."""
        return FolderRequest(self.task, self.input_shapes, self.trust_remote_code, self.trust_pickle)


@dataclass(frozen=True)
class WeightOnly:
    """The weight-only int8/int4 of a text-generation export (kiln.compiler.quantization.weight_only): `--group-size`
    (int4's groups, int8's blocks on onnx; None: 128) and `--weights sym|asym` (None: sym), refused before any work
    when no toolchain takes them."""

    group_size: int | None = None
    weights: str | None = None

    def __post_init__(self) -> None:
        check_weight_flags(self.group_size, self.weights)

    def spec(self, precision: str) -> WeightOnlySpec:
        """The spec of `--precision int8|int4` with these flags."""
        return WeightOnlySpec.for_precision(precision, self.group_size, self.weights)


@dataclass(frozen=True)
class ExportOptions:
    """Everything about an export except the model, the targets and where it goes: the precision (None: each
    target's default), the device (targets that compile for one), the I/O options, and one group per concern."""

    precision: str | None = None
    device: str | None = None
    io: tuple[str, ...] = ()  # --io: nhwc (image I/O channels-last)
    shapes: Shapes = field(default_factory=Shapes)
    passes: PassOptions = field(default_factory=PassOptions)
    calibration: Calibration = field(default_factory=Calibration)
    thresholds: Thresholds = field(default_factory=Thresholds)
    parity: ParityOptions = field(default_factory=ParityOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    source: SourceOptions = field(default_factory=SourceOptions)
    weight_only: WeightOnly = field(default_factory=WeightOnly)

    def precision_for(self, target: Target) -> str:
        """The precision asked of `target`: the user's, or the target's default."""
        return self.precision or target.default_precision

    def build_request(self, target: Target, calibration: CalibrationData | None) -> BuildRequest:
        """What the target's build is asked for."""
        from kiln.compiler.generation.decoding import TEXT_GENERATION
        from kiln.targets.base import BuildRequest

        precision = self.precision_for(target)
        weights = None
        if self.source.task == TEXT_GENERATION and precision in BITS:
            weights = self.weight_only.spec(precision)
        return BuildRequest(
            precision=precision,
            weights=weights,
            io_layout="nhwc" if "nhwc" in self.io else None,
            calibration=calibration,
            accuracy=self.calibration.accuracy,
            device=self.device,
            buckets=self.shapes.buckets if target.buckets else {},
        )


# The flat vocabulary of the CLI, the library and a matrix cell, by the group each keyword sets.
GROUPS: dict[str, tuple[type, tuple[str, ...]]] = {
    "shapes": (Shapes, ("dynamic", "dynamic_batch", "buckets")),
    "passes": (PassOptions, ("opt_level", "adjust_passes", "passes", "dump_passes")),
    "calibration": (
        Calibration,
        ("calib", "calib_samples", "calib_method", "per_channel", "symmetric_activations", "max_drop", "metric"),
    ),
    "thresholds": (Thresholds, tuple(Thresholds.__dataclass_fields__)),
    "parity": (ParityOptions, ("samples", "inputs", "parity_gate", "localize")),
    "output": (OutputOptions, tuple(OutputOptions.__dataclass_fields__)),
    "source": (SourceOptions, ("trust_pickle", "task", "cache_size", "llm_format", "shape", "trust_remote_code")),
    "weight_only": (WeightOnly, tuple(WeightOnly.__dataclass_fields__)),
}
KEYWORDS = ("precision", "device", "io", *(name for _, names in GROUPS.values() for name in names))


def export_options(**keywords: Any) -> ExportOptions:
    """ExportOptions from the flat vocabulary (`KEYWORDS`), as the CLI, the library and a matrix cell hold it:
    strings for `dynamic_batch` ("MIN:MAX"), `dynamic` (["input_ids:1=8:128:64", ...]), `buckets`
    ("seq=32,64,128"), `io` ("nhwc"), `adjust_passes` ("+name,-name"); numbers and flags for the rest. An
    unknown keyword is a UsageError naming the closest known one."""
    unknown = sorted(set(keywords) - set(KEYWORDS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], KEYWORDS, n=1)
        raise UsageError(
            f"unknown export option '{unknown[0]}'",
            f"did you mean {close[0]}?" if close else f"use {', '.join(sorted(KEYWORDS))}",
        )
    groups = {}
    for group, (kind, names) in GROUPS.items():
        given = {name: keywords[name] for name in names if name in keywords}
        parse = getattr(kind, "parse", kind)
        groups[group] = parse(**given)
    io = parse_io(keywords.get("io"))
    return ExportOptions(precision=keywords.get("precision"), device=keywords.get("device"), io=io, **groups)


def parse_io(text: str | None) -> tuple[str, ...]:
    """`--io nhwc,int8` as a tuple of options, checked."""
    options = tuple(o.strip().lower() for o in (text or "").split(",") if o.strip())
    unknown = [o for o in options if o not in IO_OPTIONS]
    if any(o in ("int8", "uint8") for o in unknown):
        raise UsageError(
            f"--io {','.join(unknown)}: integer I/O is not a separate option",
            "--precision int8 on tflite and edgetpu already gives int8 inputs and outputs; --io takes only nhwc",
        )
    if unknown:
        raise UsageError(
            f"--io {','.join(unknown)}: unknown I/O option", f"use a comma list of {', '.join(IO_OPTIONS)}"
        )
    return options


def parse_buckets(text: str | None) -> dict[str, tuple[int, ...]]:
    """`--buckets seq=32,64,128[;batch=1,8]`: the sizes each dynamic symbol is built at on static-shape targets."""
    buckets: dict[str, tuple[int, ...]] = {}
    for part in (text or "").replace(";", " ").split():
        symbol, _, sizes = part.partition("=")
        values = [v.strip() for v in sizes.split(",") if v.strip()]
        if not symbol.strip() or not values or not all(v.isdigit() and int(v) >= 1 for v in values):
            raise UsageError(
                f"--buckets '{part}' is not SYMBOL=SIZE,SIZE,...", "write for example --buckets seq=32,64,128"
            )
        buckets[symbol.strip()] = tuple(sorted({int(v) for v in values}))
    return buckets
