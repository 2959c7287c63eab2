"""`tflite` (aliases `litert`, `mobile`): a LiteRT model for phones, float or quantized."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kiln.compiler.errors import error_text, plain_text
from kiln.compiler.image_layout import channels_last
from kiln.compiler.quantization.litert import SIGNATURE, quantize_tflite
from kiln.targets.base import BuildOutput, BuildRequest, Runner, Target
from kiln.targets.buckets import bucket_note, bucket_subset, bucket_variants
from kiln.targets.litert import MODEL_FILE, LiteRtRunner, op_counts, read_ops, to_tflite_signatures

if TYPE_CHECKING:
    import numpy as np
    from kiln.compiler.capture.program import CapturedModel
    from kiln.compiler.types import Manifest


def convert(
    model: CapturedModel,
    directory: Path,
    request: BuildRequest,
    precision: str,
    variants: list[tuple[str, CapturedModel]] | None = None,
) -> dict[str, Any]:
    """Write `model.tflite` in `directory` at `precision` (with `variants`, `--buckets`' static programs: one
    signature each); what was decomposed and how it was calibrated."""
    from kiln.compiler.capture.decompositions import module_path_of
    from kiln.compiler.errors import UnsupportedOpError
    from kiln.targets.litert import converter_error_op

    assert model.exported is not None, "a LiteRT target needs the FX program"
    nhwc = request.io_layout == "nhwc"
    with tempfile.TemporaryDirectory(prefix="kiln-tflite-") as scratch:
        float_model = Path(scratch) / "float.tflite"
        signatures = variants or [(SIGNATURE, model)]
        programs = [(name, v.exported, v.inputs, v.outputs) for name, v in signatures if v.exported is not None]
        try:
            decomposed = to_tflite_signatures(programs, nhwc, float_model)
        except Exception as exc:
            text = str(exc).split("While executing")[0]  # the FX node's stack trace follows
            op = converter_error_op(plain_text(text))
            where = f" in {module_path_of(model.exported, op)}" if op else ""
            raise UnsupportedOpError(
                f"LiteRT conversion failed{' on ' + op if op else ''}{where}: {error_text(exc, 200, text)}",
                "replace that operation in the model, or try another target",
            ) from None
        info: dict[str, Any] = {"decompositions_applied": decomposed}
        if precision == "fp32":
            shutil.copy(float_model, directory / MODEL_FILE)
            return info
        calibration = None
        if precision == "int8":
            calibration = request.calibration
            assert calibration is not None, "int8 needs calibration data (the pipeline provides it)"
            info["calibration"] = calibration.summary()
        specs = channels_last(model.inputs) if nhwc else model.inputs
        summary = quantize_tflite(float_model, directory / MODEL_FILE, precision, calibration, specs)
        if summary.settings:
            info["calibration"]["used"] = summary.settings
        info["float_model_bytes"] = float_model.stat().st_size
    return info


def calibration_notes(info: dict[str, Any]) -> list[str]:
    """A note when the calibration method asked for is not the one ai-edge-quantizer could use."""
    used = info.get("calibration", {}).get("used", {})
    if used and used["method"] != used["method_asked"]:
        return [
            f"calibrated with {used['method']}, not {used['method_asked']}: ai-edge-quantizer has only min/max "
            "activation ranges"
        ]
    return []


def describe_graph(directory: Path, info: dict[str, Any], nhwc: bool) -> dict[str, Any]:
    """Op counts, transposes left inside and size of the built `.tflite`."""
    ops = read_ops(directory / MODEL_FILE)
    counts = op_counts(ops)
    described = {
        **info,
        "ops": counts,
        "transposes_inside": counts.get("TRANSPOSE", 0),
        "io_layout": "NHWC" if nhwc else "as captured (NCHW for images)",
        "model_bytes": (directory / MODEL_FILE).stat().st_size,
    }
    if "float_model_bytes" in info:
        described["size_ratio_vs_fp32"] = round(info["float_model_bytes"] / described["model_bytes"], 2)
    return described


def add_nhwc_layout(model: CapturedModel, directory: Path, built: BuildOutput) -> None:
    """For an NHWC `.tflite`: channels-last I/O specs, `info["layout"]` (see kiln.passes.channels_last.LayoutCounts)
    and the
    layout step's pass record, into `built`.

    The converter does the layout work inside its own conversion: the record's `nodes_before` is the op count
    of the naive per-op conversion (the artifact's ops plus the transposes it avoided), its time is not apart.
    """
    from kiln.compiler.types import PassRecord
    from kiln.passes.channels_last import NHWC_STEP, TFLITE_CHANNELS_LAST_OPS, LayoutCounts

    assert model.exported is not None
    ops = read_ops(directory / MODEL_FILE)
    built.inputs, built.outputs = channels_last(model.inputs), channels_last(model.outputs)
    permutes = {"aten.permute.default", "aten.transpose.int", "aten.t.default", "aten.permute_copy.default"}
    counts = LayoutCounts(
        boundary=sum(s.layout == "NHWC" for s in [*built.inputs, *built.outputs]),
        fixed_layout_ops=sum(op.name in TFLITE_CHANNELS_LAST_OPS for op in ops),
        model_transposes=sum(str(n.target) in permutes for n in model.exported.graph.nodes if n.op == "call_function"),
        transposes_after=sum(op.name == "TRANSPOSE" for op in ops),
    )
    built.info["layout"] = counts.to_info()
    avoided = counts.transposes_before - counts.transposes_after
    built.passes.append(PassRecord(NHWC_STEP, True, len(ops) + avoided, len(ops), 0.0, "tflite"))


class TfliteTarget(Target):
    """A `.tflite` flatbuffer validated in the LiteRT interpreter (XNNPACK)."""

    name = "tflite"
    tuned_by_default = True  # kiln tune without --targets
    kv_cache = "static"
    aliases = ("litert", "mobile")
    description = "LiteRT/TFLite flatbuffer for Android/iOS, validated in the LiteRT interpreter (XNNPACK)"
    requires: ClassVar[dict[str, str]] = {
        "litert_torch": "litert-torch",
        "ai_edge_litert": "ai-edge-litert",
        "ai_edge_quantizer": "ai-edge-quantizer",
    }
    precisions = ("fp32", "fp16", "int8-dynamic", "int8")
    consumes = "torch"
    static_shapes = True
    buckets = True  # --buckets: one static signature per size in the one .tflite (fp32)
    # litert-torch 0.10 with convert(..., dynamic_shapes=...) (v1 and use_v2 converters alike): the first failure
    # on a sequence-dynamic BERT is its int64->int32 rewrite of aten.arange (backend/export.py
    # _convert_i64_to_i32 compares the symbolic end with ints), but past that every op lowered through its JAX
    # bridge gets the dynamic dim as -2**63 (export_utils.IR_DYNAMIC): aten.slice with a symbolic end fails
    # (TracerBoolConversionError), and so does a plain Linear on [2, s, 8] ("reshape new_sizes must all be
    # positive"). Nothing Kiln rewrites in the FX graph avoids it: most ops go through that bridge.
    # tests/test_dynamic_dims.py: test_litert_torch_still_cannot_lower_a_dynamic_dim checks this stays true.
    static_reason = (
        "litert-torch 0.10 lowers most ops through its JAX bridge, which rejects a dynamic dimension "
        "(even a Linear on [2, s, 8] fails)"
    )
    io_options = ("nhwc",)

    def build(self, model: CapturedModel, directory: Path, request: BuildRequest) -> BuildOutput:
        """Convert, quantize as the precision asks, and describe the graph."""
        nhwc = request.io_layout == "nhwc"
        variants = bucket_variants(model, request.buckets) if request.buckets else None
        info = describe_graph(directory, convert(model, directory, request, request.precision, variants), nhwc)
        notes = []
        if info["decompositions_applied"]:
            notes.append(f"decomposed for the TFLite converter: {', '.join(info['decompositions_applied'])}")
        if any(s.dtype in ("int64", "float64") for s in [*model.inputs, *model.outputs]):
            notes.append("64-bit inputs/outputs run as 32-bit in TFLite (the runner casts them)")
        notes += calibration_notes(info)
        if nhwc and info["transposes_inside"]:
            notes.append(f"{info['transposes_inside']} TRANSPOSE ops remain inside the graph with --io nhwc")
        config: dict[str, Any] = {"signature": SIGNATURE, "threads": 2}
        if variants:
            config["signature"] = variants[0][0]
            config["buckets"] = {name: {s.name: list(s.shape) for s in v.inputs} for name, v in variants}
            notes.append(bucket_note(model, request.buckets))
        built = BuildOutput(runtime_config=config, info=info, notes=notes)
        if nhwc:
            add_nhwc_layout(model, directory, built)
        return built

    def check_request(self, request: BuildRequest) -> None:
        """`--buckets` builds fp32 only: the quantizers calibrate and rewrite the one `serving_default`."""
        super().check_request(request)
        if request.buckets and request.precision != "fp32":
            from kiln.compiler.errors import UsageError

            raise UsageError(
                f"target tflite builds --buckets at fp32 only, not {request.precision}",
                "drop --precision for the bucketed tflite export, or export one shape without --dynamic",
            )

    def parity_subset(self, inputs: list[dict[str, np.ndarray]], manifest: Manifest) -> list[int] | None:
        """With buckets, parity runs on the input sets whose shapes are a bucket's (one or more per bucket)."""
        return bucket_subset(inputs, manifest)

    def load(self, directory: Path, manifest: Manifest, threads: int | None = None) -> Runner:
        """A LiteRT interpreter on `model.tflite`."""
        return LiteRtRunner(directory / MODEL_FILE, manifest, threads=threads)
