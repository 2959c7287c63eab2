"""What every target is: a name, what it needs installed, its precisions, `build` and `load`."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import numpy as np
    from kiln.compiler.capture.program import CapturedModel
    from kiln.compiler.quantization.calibration import AccuracyBudget, CalibrationData
    from kiln.compiler.types import Feeds, Manifest, PassRecord, TensorSpec


@dataclass(frozen=True)
class BuildRequest:
    """What the user asked of one build, beyond the model: precision and target-specific settings."""

    precision: str = "fp32"
    device: str | None = None  # targets that compile for a device (None: the target's default)
    io_layout: str | None = None  # e.g. "nhwc" for image I/O in channels-last (None: as captured)
    calibration: CalibrationData | None = None  # calibrated int8's samples
    accuracy: AccuracyBudget | None = None  # --max-drop, for quantized precisions
    route: str = ""  # the name of the Route being built (empty: the target's first)
    buckets: dict[str, tuple[int, ...]] = field(default_factory=dict)  # --buckets: symbol -> sizes to build at


@dataclass(frozen=True)
class Route:
    """One way from the captured model to a target's artifact. The pipeline tries a target's routes in order
    and publishes the first that builds and passes parity (`target_info.route`, `target_info.routes_tried`)."""

    name: str  # as the manifest records it, e.g. "onnx(dynamo)"
    consumes: str  # the graph the route hands to `Target.build`: "onnx" or "torch" (the FX program)
    exporter: str = (
        ""  # for an ONNX route from a PyTorch model: the ONNX exporter (kiln.compiler.capture.program.EXPORTERS)
    )
    # True: tried only when no earlier route converted (a fallback for conversion failures, not a second
    # opinion on an artifact that converted and failed parity).
    fallback: bool = False


# The ONNX routes of a PyTorch model, in the order they are tried; an .onnx source has the one ONNX_FILE route.
ONNX_ROUTES = (Route("onnx(dynamo)", "onnx", "dynamo"), Route("onnx(torchscript)", "onnx", "torchscript"))
ONNX_FILE = Route("onnx(source file)", "onnx")
FX_ROUTE = Route("torch.export", "torch")


@dataclass(frozen=True)
class RuntimeSettings:
    """How to load an artifact, beyond its files: runtime options that change speed without a rebuild. None: the
    runtime's default. A target turns them into its manifest's `runtime_config` (`Target.with_runtime_settings`),
    so that an export published with them (`kiln tune`'s winner) loads with them everywhere, `kiln verify` too."""

    graph_optimization: str | None = None  # ONNX Runtime: "disable", "basic", "extended" or "all" (its default)
    performance_hint: str | None = None  # OpenVINO: "LATENCY" or "THROUGHPUT"
    inference_precision: str | None = None  # OpenVINO: "default" (the CPU's own: bf16 where it has it) or "f32"

    def label(self) -> str:
        """A short name for tables: the settings that are not the default, or "default"."""
        parts = [f"{k.replace('_', '-')}={v}" for k, v in asdict(self).items() if v is not None]
        return ",".join(parts) or "default"

    def to_dict(self) -> dict[str, str]:
        """The settings that are set, JSON-ready."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RuntimeSettings:
        """Inverse of `to_dict` (None or {}: the defaults)."""
        return cls(**{k: str(v) for k, v in (data or {}).items()})

    @property
    def is_default(self) -> bool:
        """Whether nothing is set."""
        return not self.to_dict()


@dataclass
class BuildOutput:
    """What a target's build produced, beyond the files it wrote."""

    runtime_config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    inputs: list[TensorSpec] | None = None  # the artifact's own I/O when it differs from the model's (layout)
    outputs: list[TensorSpec] | None = None
    passes: list[PassRecord] = field(default_factory=list)  # graph changes made while building (quantization...)


class Runner:
    """Executes one built artifact on named numpy inputs."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # How a thread count given to Target.load reaches the runtime (for timing reports).
    thread_control: str = "runtime default (no thread setting known for this target)"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for inputs by name."""
        raise NotImplementedError

    def runtime_info(self) -> dict[str, Any]:
        """What the runtime actually used (precision, threads...), for the parity report."""
        return {}


class Target:
    """Base class of a backend. Subclasses import their heavy libraries inside build() and load()."""

    name: str = ""
    aliases: tuple[str, ...] = ()
    description: str = ""
    requires: ClassVar[dict[str, str]] = {}  # importable module -> pip requirement
    precisions: tuple[str, ...] = ("fp32",)
    consumes: str = "onnx"  # "onnx" (the lowered graph) or "torch" (the FX program)
    static_shapes: bool = False  # True: refuses --dynamic / --dynamic-batch (unless it takes --buckets)
    buckets: bool = False  # True (with static_shapes): builds one program per --buckets size of a dynamic dim
    static_reason: str = ""  # why it needs static shapes, when that is worth saying in the refusal
    needs_gpu: bool = False  # True: builds or runs only with a GPU (the matrix's Ray executor asks for one)
    fixed_batch: int | None = None  # the batch size the artifact must have (the model is captured at it)
    io_options: tuple[str, ...] = ()  # what `--io` may ask of this target (nhwc)
    devices: tuple[str, ...] = ()  # devices it compiles for (--device); empty: it takes no --device
    accuracy_aware: bool = False  # True: its int8 build takes --max-drop (reverts sensitive layers to float)
    # The KV cache a text-generation export to this target takes (kiln.compiler.generation.export): "growing" (one
    # graph, the
    # past length dynamic), "static" (a fixed-length cache, all shapes static), or None: no text generation.
    kv_cache: str | None = None
    # True: `tapped_runs` runs a built artifact with intermediate tensors as extra outputs, so that localization
    # reads every module boundary from one build (kiln.compiler.diagnose.fast_path) instead of bisecting.
    tappable: bool = False
    # True: `kiln tune` builds and times it when no --targets is given (a runtime whose artifacts run on the machine
    # that tunes, worth timing against the others).
    tuned_by_default: bool = False
    # Files this target's own tools add to a published export (e.g. an engine built later on the GPU machine):
    # `kiln verify` accepts them although the manifest does not list them.
    later_files: tuple[str, ...] = ()

    def routes(self) -> tuple[Route, ...]:
        """The ways to build this target, in the order they are tried (the pipeline leaves out those the
        source cannot take, e.g. the ONNX exporters for an .onnx file)."""
        return ONNX_ROUTES if self.consumes == "onnx" else (FX_ROUTE,)

    @property
    def default_precision(self) -> str:
        """The precision used when none is asked for."""
        return self.precisions[0]

    def unavailable_reason(self) -> str | None:
        """None when this target can run here, else what is missing and how to get it."""
        missing = [pip for module, pip in self.requires.items() if importlib.util.find_spec(module) is None]
        if missing:
            return f"needs {', '.join(missing)} (pip install {' '.join(missing)})"
        return None

    def limitation(self) -> str | None:
        """None when everything this target makes is built and validated here, else what it cannot do here and
        why (it still builds the rest). `--target all` leaves such targets out."""
        return None

    def check_request(self, request: BuildRequest) -> None:
        """Raise a one-line error, before any capture work, when this target cannot build `request` here."""
        from kiln.compiler.errors import UsageError

        if request.device is not None and self.devices and request.device not in self.devices:
            raise UsageError(
                f"target {self.name} does not compile for --device {request.device}",
                f"use one of: {', '.join(self.devices)}",
            )

    def parity_subset(self, inputs: list[dict[str, np.ndarray]], manifest: Manifest) -> list[int] | None:
        """The indices of the parity input sets this artifact can run (None: all of them), e.g. only those whose
        shapes are one of its buckets."""
        return None

    def stage_detail(self, model: CapturedModel, request: BuildRequest) -> str:
        """What the build stage line says after the target's name (e.g. the precision)."""
        return request.precision

    def build(self, model: CapturedModel, directory: Path, request: BuildRequest) -> BuildOutput:
        """Write the artifact for `model` into `directory`."""
        raise NotImplementedError

    def runtime_variants(self, precision: str) -> tuple[RuntimeSettings, ...]:
        """The runtime settings worth timing for an artifact of `precision` (`kiln tune`); the default first."""
        return (RuntimeSettings(),)

    def with_runtime_settings(self, manifest: Manifest, settings: RuntimeSettings) -> Manifest:
        """`manifest` with `settings` written into its runtime_config, as `load` reads them (the default: no
        settings to apply; a target with runtime settings overrides this)."""
        from kiln.compiler.errors import UsageError

        if not settings.is_default:
            raise UsageError(f"target {self.name} takes no runtime settings ({settings.label()})", "drop them")
        return replace(manifest)

    def load(self, directory: Path, manifest: Manifest, threads: int | None = None) -> Runner:
        """A runner for the artifact in `directory`, configured as the manifest says; `threads` sets the runtime's
        thread count where it has one (None: the runtime's default; `Runner.thread_control` says how)."""
        raise NotImplementedError

    def tapped_runs(
        self, directory: Path, manifest: Manifest, names: dict[int, str], inputs: list[Feeds]
    ) -> list[dict[int, np.ndarray]]:
        """A `tappable` target's artifact in `directory` run on each input set with the tensors `names` (index ->
        value name in the ONNX graph it was built from) as extra outputs: per input set, index -> the runtime's
        value (as the next layer reads it back in a quantized graph); a name the runtime cannot expose is left
        out. A target that cannot be tapped raises NotImplementedError."""
        raise NotImplementedError(f"target {self.name} cannot be tapped for intermediate tensors")
