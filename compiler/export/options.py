"""What an export is asked to do, built in one place from the CLI's flags, the library's keyword arguments and a
matrix cell's options: `export_options(...)` is the only constructor those three call."""

from __future__ import annotations

import difflib
import inspect
from dataclasses import InitVar, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.capture.dynamic import DynamicShapes
from kiln.compiler.capture.hf_folder import FolderRequest, parse_shapes
from kiln.compiler.errors import UsageError
from kiln.compiler.parity.gate import DEFAULT_SAMPLES
from kiln.compiler.quantization.calibration import (
    DEFAULT_CALIBRATION_SAMPLES,
    AccuracyBudget,
    CalibrationData,
    CalibrationSpec,
)
from kiln.compiler.types import Tolerance, check_thresholds
from kiln.passes import PassAdjustments
from kiln.passes.base import DEFAULT_LEVEL, Pass

if TYPE_CHECKING:
    from kiln.targets.base import BuildRequest, Target

IO_OPTIONS = ("nhwc",)  # int8 I/O is not an option: every int8 TFLite/Edge TPU artifact takes int8 I/O
# ExportOptions fields that export_options() makes from a differently named plain value
PARSED_FIELDS = {"inputs_files", "calibration", "accuracy", "pass_adjustments", "dynamic", "buckets", "shapes"}


@dataclass
class ExportOptions:
    """Everything about an export except the model, the targets and where it goes."""

    precision: str | None = None  # None: each target's default (fp32, int8 for the Edge TPU)
    device: str | None = None  # --device for targets that compile for one (aoti); None: the target's default
    dynamic: DynamicShapes | None = None  # --dynamic / --dynamic-batch (resolved against the model at capture)
    inputs_files: list[Path] = field(default_factory=list)
    atol: float | None = None
    rtol: float | None = None
    samples: int = DEFAULT_SAMPLES
    parity_gate: bool = True
    force: bool = False
    wait: bool = False  # --wait: queue behind another export to the same --out instead of failing
    opt_level: int = DEFAULT_LEVEL  # -O0 .. -O3
    pass_adjustments: PassAdjustments = field(default_factory=PassAdjustments)  # --passes +name,-name
    passes: list[Pass] | None = None  # an explicit pipeline (library use), replacing the level's
    dump_passes: Path | None = None  # --dump-passes DIR: the graph after each pass, per target
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    accuracy: AccuracyBudget | None = None  # --max-drop: revert the most sensitive layers to float until within it
    io: tuple[str, ...] = ()  # --io: nhwc (image I/O channels-last), int8
    min_cosine: float | None = None
    min_snr_db: float | None = None
    min_top1: float | None = None
    min_channel_cosine: float | None = None  # the worst channel's thresholds (kiln.compiler.metrics.ChannelSums)
    min_channel_snr_db: float | None = None
    trust_pickle: bool = False  # --trust-pickle: a .pt2 source may run the pickles it carries
    localize: bool | None = None  # where parity diverges: None on failure, True always, False never
    all_or_nothing: bool = False  # with several targets, one that fails to build stops the export, nothing published
    buckets: dict[str, tuple[int, ...]] = field(default_factory=dict)  # --buckets seq=32,64: static-shape targets
    task: str | None = None  # --task: text-generation, forward, or a checkpoint folder's task (hf_folder.TASKS)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # --shape NAME=DIMS: a checkpoint folder's inputs
    trust_remote_code: bool = False  # --trust-remote-code: a checkpoint folder may run its own Python code
    cache_size: int | None = None  # --cache-size: a static KV cache's length (tflite, tpu text generation)
    dynamic_batch: InitVar[DynamicShapes | None] = None  # the older name of `dynamic` (DynamicBatch(1, 8))

    def __post_init__(self, dynamic_batch: DynamicShapes | None) -> None:
        """Refuse bad thresholds before any work (the tolerance of any precision applies the same overrides)."""
        if dynamic_batch is not None:
            self.dynamic = dynamic_batch
        self.tolerance("fp32")
        if self.accuracy is not None:
            check_thresholds(max_drop=self.accuracy.max_drop)

    def folder_request(self) -> FolderRequest:
        """What these options ask of a checkpoint folder source."""
        return FolderRequest(self.task, self.shapes, self.trust_remote_code, self.trust_pickle)

    def precision_for(self, target: Target) -> str:
        """The precision asked of `target`: the user's, or the target's default."""
        return self.precision or target.default_precision

    def build_request(self, target: Target, calibration: CalibrationData | None) -> BuildRequest:
        """What the target's build is asked for."""
        from kiln.targets.base import BuildRequest

        return BuildRequest(
            precision=self.precision_for(target),
            io_layout="nhwc" if "nhwc" in self.io else None,
            calibration=calibration,
            accuracy=self.accuracy,
            device=self.device,
            buckets=self.buckets if target.buckets else {},
        )

    def tolerance(self, precision: str) -> Tolerance:
        """The parity tolerance: the precision's default with the user's overrides."""
        return Tolerance.for_precision(precision).with_overrides(
            atol=self.atol,
            rtol=self.rtol,
            min_cosine=self.min_cosine,
            min_snr_db=self.min_snr_db,
            min_top1=self.min_top1,
            min_channel_cosine=self.min_channel_cosine,
            min_channel_snr_db=self.min_channel_snr_db,
        )


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


def export_options(
    *,
    calib: str | Path | None = None,
    calib_samples: int = DEFAULT_CALIBRATION_SAMPLES,
    calib_method: str = "minmax",
    per_channel: bool = True,
    symmetric_activations: bool | None = None,
    max_drop: float | None = None,
    metric: str | None = None,
    dynamic_batch: str | None = None,
    dynamic: list[str] | tuple[str, ...] | str | None = None,
    buckets: str | None = None,
    inputs: list[str | Path] | tuple[str | Path, ...] | None = None,
    io: str | None = None,
    adjust_passes: str | None = None,
    dump_passes: str | Path | None = None,
    shape: list[str] | tuple[str, ...] | None = None,
    **plain: Any,
) -> ExportOptions:
    """ExportOptions from plain values, as the CLI, the library and a matrix cell hold them: strings for
    `dynamic_batch` ("MIN:MAX"), `dynamic` (["input_ids:1=8:128:64", ...]), `buckets` ("seq=32,64,128"),
    `io` ("nhwc"), `adjust_passes` ("+name,-name"), `shape` (["input_ids=1x64", ...]); the calibration and accuracy
    settings as separate values. `plain` holds the fields of ExportOptions that need no parsing (precision,
    atol, samples, opt_level, ...); an unknown name is a UsageError."""
    known = {f.name for f in fields(ExportOptions)} - PARSED_FIELDS
    unknown = sorted(set(plain) - known)
    if unknown:
        names = sorted(known | set(inspect.signature(export_options).parameters) - {"plain"})
        close = difflib.get_close_matches(unknown[0], names, n=1)
        raise UsageError(
            f"unknown export option '{unknown[0]}'", f"did you mean {close[0]}?" if close else f"use {', '.join(names)}"
        )
    if buckets and not dynamic and not dynamic_batch:
        raise UsageError(f"--buckets {buckets} needs a dynamic dim to bucket", "add --dynamic SYM=NAME:AXIS=MIN:MAX")
    return ExportOptions(
        dynamic=DynamicShapes.parse(dynamic, dynamic_batch),
        buckets=parse_buckets(buckets),
        inputs_files=[Path(p) for p in inputs or []],
        calibration=CalibrationSpec(
            str(calib) if calib is not None else None, calib_samples, calib_method, per_channel, symmetric_activations
        ),
        accuracy=AccuracyBudget(max_drop, metric) if max_drop is not None else None,
        io=parse_io(io),
        pass_adjustments=PassAdjustments.parse(adjust_passes),
        dump_passes=Path(dump_passes) if dump_passes else None,
        shapes=parse_shapes(shape),
        **plain,
    )
