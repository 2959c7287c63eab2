"""`tpu` (alias `xla`): StableHLO for Cloud TPU, wrapped in a TF SavedModel that runs it through XLA.

Route: the `torch.export` program -> decompositions Kiln adds for ops the lowering lacks ->
`litert_torch.backend.export.exported_program_to_mlir` (StableHLO, weights inlined as
constants) -> a portable, versioned StableHLO artifact, and a `tf.function(jit_compile=True)`
calling it through `XlaCallModule` for platforms TPU and CPU, saved as a SavedModel. The
SavedModel is what TF Serving on TPU or Vertex AI loads; parity runs it under XLA on this CPU.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kiln.compiler.errors import error_text
from kiln.targets.base import BuildOutput, BuildRequest, Runner, Target
from kiln.targets.buckets import bucket_for, bucket_note, bucket_subset, bucket_variants

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up chatter

if TYPE_CHECKING:
    import numpy as np
    import torch
    from kiln.compiler.capture.program import CapturedModel
    from kiln.compiler.types import Manifest

BYTECODE_FILE = "model.stablehlo.mlirbc"
HLO_FILE = "model.hlo.txt"
SAVED_MODEL_DIR = "saved_model"
TEXT_LIMIT = 8 * 2**20  # write the readable .mlir only below this size
PLATFORMS = ["TPU", "CPU"]
MXU_LANES, MXU_SUBLANES = 128, 8


def _to_bfloat16(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Re-export with bf16 compute: float32 weights cast to bf16 inside the graph, float32 I/O kept.

    The casts are graph ops on float32 constants (which XLA folds), because the StableHLO
    lowering cannot inline bf16 constants.
    """
    import torch

    inner = program.module()

    class BFloat16Compute(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: torch.Tensor) -> Any:
            state = {**dict(self.inner.named_parameters()), **dict(self.inner.named_buffers())}
            cast_state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
            cast_args = tuple(a.to(torch.bfloat16) if a.is_floating_point() else a for a in args)
            outputs = torch.func.functional_call(self.inner, cast_state, cast_args)
            return torch.utils._pytree.tree_map(
                lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, outputs
            )

    args, _ = program.example_inputs
    return torch.export.export(BFloat16Compute(), tuple(args), strict=False)


def _stablehlo_text(lowered: Any) -> str:
    """Canonicalized module text that XlaCallModule and the portable serializer accept."""
    from litert_converter.mlir import passmanager

    with lowered.ctx:
        passmanager.PassManager.parse("builtin.module(inline, cse, canonicalize, cse)").run(lowered.module.operation)
    # XlaCallModule does not register the arith dialect.
    return lowered.module.operation.get_asm().replace("arith.constant", "stablehlo.constant")


def _with_platform_index(text: str) -> str:
    """Add the platform-index argument XlaCallModule passes to a module built for several platforms."""
    marker = "func.func public @main("
    if marker not in text:
        raise RuntimeError("lowered StableHLO has no public @main function")
    return text.replace(marker, marker + '%_platform_index: tensor<i32> {jax.global_constant = "_platform_index"}, ', 1)


def _xla_function(module_text: str, model: CapturedModel, input_dtypes: list[Any], output_dtypes: list[Any]) -> Any:
    """A jit-compiled tf.function that runs the StableHLO module through XlaCallModule."""
    import tensorflow as tf
    from tensorflow.compiler.tf2xla.python import xla as tfxla

    version = tfxla.call_module_maximum_supported_version()
    signature = [tf.TensorSpec(list(s.shape), dtype, name=s.name) for s, dtype in zip(model.inputs, input_dtypes)]
    output_shapes = [list(s.shape) for s in model.outputs]
    names = [s.name for s in model.outputs]

    def serve(*args: Any) -> dict[str, Any]:
        results = tfxla.call_module(
            list(args),
            version=version,
            Tout=output_dtypes,
            Sout=output_shapes,
            function_list=[],
            module=module_text,
            has_token_input_output=False,
            platforms=PLATFORMS,
        )
        return dict(zip(names, results))

    return tf.function(serve, jit_compile=True, input_signature=signature)


def audit(model: CapturedModel, text: str, decomposed: list[str], precision: str) -> dict[str, Any]:
    """TPU readiness: dynamic dims, 64-bit types, ops XLA may not compile, MXU padding waste (estimated)."""
    dynamic = {s.name: s.dynamic_dims for s in [*model.inputs, *model.outputs] if s.dynamic_dims}
    wide_io = [f"{s.name}: {s.dtype}" for s in [*model.inputs, *model.outputs] if s.dtype in ("int64", "float64")]
    wide_internal = len(re.findall(r"tensor<[0-9x?]*(?:i64|f64)>", text))
    custom_calls = sorted(set(re.findall(r"stablehlo\.custom_call\s*@([\w.]+)", text)))
    matmuls = []
    for op, shape in re.findall(r"stablehlo\.(dot_general|convolution)\b.*->\s*tensor<([0-9x]+)x[a-z]+\d*>", text):
        dims = [int(d) for d in shape.split("x")]
        rows, cols = math.prod(dims[:-1]), dims[-1]
        actual = rows * cols
        padded = math.ceil(rows / MXU_SUBLANES) * MXU_SUBLANES * math.ceil(cols / MXU_LANES) * MXU_LANES
        matmuls.append((op, shape, actual, padded))
    actual_total = sum(m[2] for m in matmuls)
    padded_total = sum(m[3] for m in matmuls)
    return {
        "static_shapes": not dynamic,
        "dynamic_dims": dynamic,
        "int64_or_float64_io": wide_io,
        "int64_or_float64_tensors_inside": wide_internal,
        "narrowed": "int64 iota/arange constants narrowed to int32 by the lowering; I/O dtypes kept as in PyTorch",
        "custom_calls": custom_calls,
        "decompositions_applied": decomposed,
        "matmul_and_conv_ops": len(matmuls),
        "mxu_padding_waste_estimate": round(1 - actual_total / padded_total, 4) if padded_total else 0.0,
        "worst_padded_ops": [
            f"{op} -> {shape}: {1 - a / p:.0%} padding"
            for op, shape, a, p in sorted(matmuls, key=lambda m: m[2] / m[3])[:3]
        ],
        "compute_precision": "bf16" if precision == "bf16" else "fp32",
    }


class XlaRunner(Runner):
    """Runs the SavedModel's serving_default signature (XLA on this CPU), or with `--buckets` the signature of
    the bucket whose shapes the inputs have."""

    def __init__(self, directory: Path, manifest: Manifest):
        import tensorflow as tf

        self.loaded = tf.saved_model.load(str(directory / SAVED_MODEL_DIR))
        self.buckets: dict[str, dict[str, list[int]]] = manifest.runtime_config.get("buckets", {})
        self.inputs, self.outputs = manifest.inputs, manifest.outputs
        self.precision = manifest.precision

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name."""
        import tensorflow as tf

        serve = self.loaded.signatures[self.signature_for(feeds)]
        results = serve(**{name: tf.constant(value) for name, value in feeds.items()})
        return {spec.name: results[spec.name].numpy() for spec in self.outputs}

    def signature_for(self, feeds: dict[str, np.ndarray]) -> str:
        """The signature to run `feeds` with; a UsageError when no bucket has their shapes."""
        return bucket_for("tpu", self.buckets, feeds) if self.buckets else "serving_default"

    def runtime_info(self) -> dict[str, Any]:
        """TensorFlow/XLA version and the compute precision."""
        import tensorflow as tf

        return {
            "runtime": f"tensorflow {tf.__version__} XlaCallModule (XLA CPU)",
            "inference_precision": "bf16" if self.precision == "bf16" else "f32",
        }


class XlaTarget(Target):
    """StableHLO + a TF SavedModel for Cloud TPU (TF Serving, Vertex AI), validated under XLA."""

    name = "tpu"
    kv_cache = "static"
    aliases = ("xla", "stablehlo")
    description = "StableHLO (portable bytecode) + TF SavedModel via XlaCallModule for Cloud TPU, validated on XLA CPU"
    requires: ClassVar[dict[str, str]] = {"tensorflow": "tensorflow-cpu", "litert_torch": "litert-torch"}
    precisions = ("fp32", "bf16")
    # The StableHLO lowering keeps an int8 constant and its dequantization, but XLA folds the two back into one f32
    # constant at compile time (checked on XLA CPU: an int8 [256, 512] weight times its scales compiled to an
    # f32[512,256] constant): the compiled program would read f32 weights, no memory or bandwidth saved.
    _NO_INT = (
        "its weights are constants of the compiled program, and XLA folds integer weights and their "
        "dequantization back into float32 constants at compile time (nothing saved); use fp32 or bf16"
    )
    precision_notes: ClassVar[dict[str, str]] = {"int8": _NO_INT, "int4": _NO_INT}
    consumes = "torch"
    static_shapes = True
    buckets = True

    def build(self, model: CapturedModel, directory: Path, request: BuildRequest) -> BuildOutput:
        """Lower to StableHLO, serialize it portably, and wrap it in a SavedModel: one signature
        (`serving_default`), or with `--buckets` one per bucket (`serving_seq_32`...), each a static program."""
        import tensorflow as tf

        variants = bucket_variants(model, request.buckets) if request.buckets else [("serving_default", model)]
        variants += list(model.signatures)  # more programs of the model (a static-cache decoder's prefill)
        holder = tf.Module()
        signatures, lowered = {}, []
        for signature, variant in variants:
            stem = "model" if signature == "serving_default" else f"model.{signature.removeprefix('serving_')}"
            lowering = self._lower(variant, directory, request.precision, stem)
            serve = _xla_function(_with_platform_index(lowering[0]), variant, *lowering[2:4])
            setattr(holder, signature, serve)
            signatures[signature] = serve
            lowered.append((variant, lowering, stem))
        tf.saved_model.save(holder, str(directory / SAVED_MODEL_DIR), signatures=signatures)
        deterministic_fingerprint(directory / SAVED_MODEL_DIR)
        first, (text, version, input_dtypes, _, decomposed), _ = lowered[0]
        examples = [tf.zeros(list(s.shape), dtype) for s, dtype in zip(first.inputs, input_dtypes)]
        hlo = signatures[variants[0][0]].experimental_get_compiler_ir(*examples)(stage="hlo")
        (directory / HLO_FILE).write_text(hlo)
        for variant, (_, _, ins, outs, _), stem in lowered:
            check_portable_artifact(directory, variant, ins, outs, f"{stem}.stablehlo.mlirbc")
        report = audit(first, text, decomposed, request.precision)
        notes = [f"decomposed for the StableHLO lowering: {', '.join(decomposed)}"] if decomposed else []
        if report["int64_or_float64_io"]:
            notes.append(f"64-bit I/O on TPU: {', '.join(report['int64_or_float64_io'])} (consider int32 inputs)")
        config: dict[str, Any] = {"platforms": PLATFORMS, "signature": variants[0][0]}
        if len(variants) > 1:  # the runner picks the signature whose input shapes the feeds have
            config["buckets"] = {sig: {s.name: list(s.shape) for s in v.inputs} for sig, v in variants}
        if request.buckets:
            notes.append(bucket_note(model, request.buckets))
        return BuildOutput(
            runtime_config=config,
            info={
                "stablehlo_version": version,
                "weights": "inlined as constants in the StableHLO",
                "fingerprint_uuid": "derived from the SavedModel's own checksums (TensorFlow writes a random one)",
                "tpu_audit": report,
            },
            notes=notes,
        )

    def parity_subset(self, inputs: list[dict[str, np.ndarray]], manifest: Manifest) -> list[int] | None:
        """With buckets, parity runs on the input sets whose shapes are a bucket's (one or more per bucket)."""
        return bucket_subset(inputs, manifest)

    def _lower(
        self, model: CapturedModel, directory: Path, precision: str, stem: str
    ) -> tuple[str, str, list[Any], list[Any], list[str]]:
        """Lower one (static) program to StableHLO and write it (`stem`.stablehlo.mlirbc, and .mlir when small):
        the module text, StableHLO version, input and output TF dtypes, and the ops decomposed first."""
        from kiln.compiler.capture.decompositions import apply_decompositions, module_path_of, stablehlo_table
        from kiln.compiler.errors import UnsupportedOpError
        from litert_converter.mlir.dialects import stablehlo
        from litert_torch.backend.export import exported_program_to_mlir
        from litert_torch.backend.tf_integration import torch_dtype_to_tf

        assert model.exported is not None, "the tpu target needs the FX program"
        program = _to_bfloat16(model.exported) if precision == "bf16" else model.exported
        program, decomposed = apply_decompositions(program, stablehlo_table())
        try:
            lowered = exported_program_to_mlir(program)
        except Exception as exc:
            op = re.search(r"(aten\.[\w.]+|aten::[\w.]+)", str(exc))
            where = f" in {module_path_of(program, op[1])}" if op else ""
            raise UnsupportedOpError(
                f"StableHLO lowering failed{' on ' + op[1] if op else ''}{where}: "
                f"{error_text(exc, 200, str(exc).split(' While executing')[0])}",
                "replace that operation in the model (for example with a decomposition into basic ops)",
            ) from None
        text = _stablehlo_text(lowered)
        version = stablehlo.get_current_version()
        (directory / f"{stem}.stablehlo.mlirbc").write_bytes(stablehlo.serialize_portable_artifact_str(text, version))
        if len(text) < TEXT_LIMIT:
            (directory / f"{stem}.stablehlo.mlir").write_text(text)
        input_dtypes = [torch_dtype_to_tf(s.dtype) for s in lowered.input_signature if s.input_spec.is_user_input]
        output_dtypes = [torch_dtype_to_tf(s.dtype) for s in lowered.output_signature]
        return text, version, input_dtypes, output_dtypes, decomposed

    def load(self, directory: Path, manifest: Manifest, threads: int | None = None) -> Runner:
        """The SavedModel's serving signature."""
        return XlaRunner(directory, manifest)


def deterministic_fingerprint(saved_model: Path) -> None:
    """Replace the random `uuid` TensorFlow writes into `fingerprint.pb` on every save with one derived from the
    fingerprint's own content hashes, so that exporting the same model twice gives byte-identical files."""
    import uuid

    from tensorflow.core.protobuf import fingerprint_pb2

    path = saved_model / "fingerprint.pb"
    if not path.is_file():
        return
    fingerprint = fingerprint_pb2.FingerprintDef.FromString(path.read_bytes())
    fingerprint.uuid = ""
    content = fingerprint.SerializeToString(deterministic=True)
    fingerprint.uuid = str(uuid.uuid5(uuid.NAMESPACE_OID, content.hex()))
    path.write_bytes(fingerprint.SerializeToString(deterministic=True))


def check_portable_artifact(
    directory: Path, model: CapturedModel, input_dtypes: list[Any], output_dtypes: list[Any], file: str = BYTECODE_FILE
) -> None:
    """Deserialize the saved .mlirbc independently and run it once under XLA, to catch a broken serialization."""
    import tensorflow as tf
    from litert_converter.mlir import ir
    from litert_converter.mlir.dialects import stablehlo
    from litert_torch.backend.export_utils import create_ir_context

    bytecode = stablehlo.deserialize_portable_artifact_str((directory / file).read_bytes())
    with create_ir_context():
        text = ir.Module.parse(bytecode).operation.get_asm()
    run = _xla_function(_with_platform_index(text), model, input_dtypes, output_dtypes)
    run(*[tf.zeros(list(s.shape), dtype) for s, dtype in zip(model.inputs, input_dtypes)])
