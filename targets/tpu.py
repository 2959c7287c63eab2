"""`tpu` (alias `xla`): StableHLO for Cloud TPU, wrapped in a TF SavedModel that runs it through XLA.

Route: the `torch.export` program -> decompositions Kiln adds for ops the lowering lacks ->
`litert_torch.backend.export.exported_program_to_mlir` (StableHLO) -> a portable, versioned StableHLO artifact,
and a `tf.function(jit_compile=True)` calling it through `XlaCallModule` for platforms TPU and CPU, saved as a
SavedModel. The SavedModel is what TF Serving on TPU or Vertex AI loads; parity runs it under XLA on this CPU.

The weights stay out of the program text, as JAX's and torch_xla's StableHLO exports keep them: they are
arguments of `@main` (before the model's inputs), SavedModel variables that the serving function passes in, and
`model.weights.safetensors` beside the `.mlirbc` (the order of `@main`'s arguments is in the manifest's
`runtime_config.stablehlo_arguments`). Inlined as constants, a BERT-base's 0.44 GB of weights were copied several
times over, partly as decimal text, and the build was killed for memory at 24 GB.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
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
WEIGHTS_FILE = "model.weights.safetensors"
SAVED_MODEL_DIR = "saved_model"
TEXT_LIMIT = 8 * 2**20  # write the readable .mlir and the HLO text only below this size
PLATFORMS = ["TPU", "CPU"]
RELEASE_EVERY = 256 * 2**20  # bytes of mapped weights read into variables between two hand-backs of their pages
MXU_LANES, MXU_SUBLANES = 128, 8


def _to_bfloat16(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """Re-export with bf16 compute: float32 weights cast to bf16 inside the graph, float32 I/O kept.

    The weights stay float32 arguments, cast by graph ops (XLA fuses the casts into their consumers).
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


@dataclass
class Lowered:
    """One static program lowered to StableHLO: the module text (no weights in it), its StableHLO version, the
    order of `@main`'s arguments (`("weight", name)` or `("input", index)`), the weights by name, the TF dtypes of
    the model's inputs and outputs, and the ops Kiln decomposed first."""

    text: str
    version: str
    arguments: list[tuple[str, Any]]
    weights: dict[str, torch.Tensor]
    input_dtypes: list[Any]
    output_dtypes: list[Any]
    decomposed: list[str]

    def argument_names(self, model: CapturedModel) -> list[str]:
        """`@main`'s arguments as the manifest lists them: `weight:NAME` or `input:NAME`."""
        return [
            f"weight:{ref}" if kind == "weight" else f"input:{model.inputs[ref].name}" for kind, ref in self.arguments
        ]


def _variable(name: str, tensor: torch.Tensor) -> Any:
    """A non-trainable tf.Variable holding `tensor` (named after it, as TensorFlow allows)."""
    import tensorflow as tf
    import torch

    value = tensor.detach().cpu()
    if value.dtype == torch.bfloat16:
        import ml_dtypes

        array = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
        array = value.numpy()
    return tf.Variable(array, trainable=False, name=re.sub(r"[^A-Za-z0-9_.\-/]", "_", name).lstrip("._-/") or "w")


def _add_variables(variables: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    """A tf.Variable for each weight `variables` lacks. The model's weights are memory-mapped (a checkpoint
    folder's safetensors): their pages, read to make each variable, are handed back every RELEASE_EVERY bytes, so
    that the weights are not resident twice (`kiln.compiler.memory.release_pages`)."""
    from kiln.compiler.memory import release_pages

    read = 0
    for name, tensor in weights.items():
        if name in variables:
            continue
        variables[name] = _variable(name, tensor)
        read += tensor.numel() * tensor.element_size()
        if read >= RELEASE_EVERY:
            release_pages(addresses=[t.data_ptr() for t in weights.values() if t.numel()])
            read = 0
    release_pages(addresses=[t.data_ptr() for t in weights.values() if t.numel()])


def _xla_function(
    module_text: str,
    model: CapturedModel,
    lowered: Lowered,
    variables: dict[str, Any],
) -> Any:
    """A jit-compiled tf.function that runs the StableHLO module through XlaCallModule, passing the weights (the
    `variables`, by name) and the model's inputs in the order `@main` takes them."""
    import tensorflow as tf
    from tensorflow.compiler.tf2xla.python import xla as tfxla

    version = tfxla.call_module_maximum_supported_version()
    signature = [
        tf.TensorSpec(list(s.shape), dtype, name=s.name) for s, dtype in zip(model.inputs, lowered.input_dtypes)
    ]
    output_shapes = [list(s.shape) for s in model.outputs]
    names = [s.name for s in model.outputs]
    arguments = lowered.arguments

    def serve(*args: Any) -> dict[str, Any]:
        results = tfxla.call_module(
            [variables[ref] if kind == "weight" else args[ref] for kind, ref in arguments],
            version=version,
            Tout=lowered.output_dtypes,
            Sout=output_shapes,
            function_list=[],
            module=module_text,
            has_token_input_output=False,
            platforms=PLATFORMS,
        )
        return dict(zip(names, results))

    return tf.function(serve, jit_compile=True, input_signature=signature)


def hlo_summary(hlo: str) -> dict[str, Any]:
    """What a big HLO module holds, instead of its text: its size and the count of each instruction."""
    opcodes = re.findall(r"=\s*[a-z0-9]+\[[^\]]*\](?:\{[^}]*\})?\s+([a-z][\w-]*)\(", hlo)
    counts: dict[str, int] = {}
    for opcode in opcodes:
        counts[opcode] = counts.get(opcode, 0) + 1
    return {"characters": len(hlo), "instructions": dict(sorted(counts.items(), key=lambda c: -c[1]))}


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
        """Lower to StableHLO, serialize it portably with its weights beside it, and wrap it in a SavedModel whose
        variables hold the weights: one signature (`serving_default`), or with `--buckets` one per bucket
        (`serving_seq_32`...), each a static program, all sharing the variables."""
        import tensorflow as tf
        from kiln.compiler.safetensors_file import write_safetensors

        variants = bucket_variants(model, request.buckets) if request.buckets else [("serving_default", model)]
        variants += list(model.signatures)  # more programs of the model (a static-cache decoder's prefill)
        holder = tf.Module()
        variables: dict[str, Any] = {}
        signatures, lowered = {}, []
        for signature, variant in variants:
            stem = "model" if signature == "serving_default" else f"model.{signature.removeprefix('serving_')}"
            lowering = self._lower(variant, directory, request.precision, stem)
            _add_variables(variables, lowering.weights)
            serve = _xla_function(_with_platform_index(lowering.text), variant, lowering, variables)
            setattr(holder, signature, serve)
            signatures[signature] = serve
            lowered.append((variant, lowering, stem))
        holder.weights = [variables[name] for name in sorted(variables)]
        tf.saved_model.save(holder, str(directory / SAVED_MODEL_DIR), signatures=signatures)
        deterministic_fingerprint(directory / SAVED_MODEL_DIR)
        first, lowering, _ = lowered[0]
        write_safetensors(directory / WEIGHTS_FILE, sorted(lowering.weights.items()))
        examples = [tf.zeros(list(s.shape), dtype) for s, dtype in zip(first.inputs, lowering.input_dtypes)]
        hlo = signatures[variants[0][0]].experimental_get_compiler_ir(*examples)(stage="hlo")
        info: dict[str, Any] = {
            "stablehlo_version": lowering.version,
            "weights": f"arguments of @main ({len(variables)} tensors): SavedModel variables, and {WEIGHTS_FILE} "
            "beside the .mlirbc",
            "fingerprint_uuid": "derived from the SavedModel's own checksums (TensorFlow writes a random one)",
        }
        if len(hlo) < TEXT_LIMIT:
            (directory / HLO_FILE).write_text(hlo)
        else:
            info["hlo_summary"] = hlo_summary(hlo)
        del hlo
        for variant, variant_lowering, stem in lowered:
            check_portable_artifact(directory, variant, variant_lowering, variables, f"{stem}.stablehlo.mlirbc")
        report = audit(first, lowering.text, lowering.decomposed, request.precision)
        notes = (
            [f"decomposed for the StableHLO lowering: {', '.join(lowering.decomposed)}"] if lowering.decomposed else []
        )
        if report["int64_or_float64_io"]:
            notes.append(f"64-bit I/O on TPU: {', '.join(report['int64_or_float64_io'])} (consider int32 inputs)")
        config: dict[str, Any] = {"platforms": PLATFORMS, "signature": variants[0][0]}
        config["stablehlo_arguments"] = {
            f"{stem}.stablehlo.mlirbc": variant_lowering.argument_names(variant)
            for variant, variant_lowering, stem in lowered
        }
        if len(variants) > 1:  # the runner picks the signature whose input shapes the feeds have
            config["buckets"] = {sig: {s.name: list(s.shape) for s in v.inputs} for sig, v in variants}
        if request.buckets:
            notes.append(bucket_note(model, request.buckets))
        return BuildOutput(runtime_config=config, info=info | {"tpu_audit": report}, notes=notes)

    def parity_subset(self, inputs: list[dict[str, np.ndarray]], manifest: Manifest) -> list[int] | None:
        """With buckets, parity runs on the input sets whose shapes are a bucket's (one or more per bucket)."""
        return bucket_subset(inputs, manifest)

    def _lower(self, model: CapturedModel, directory: Path, precision: str, stem: str) -> Lowered:
        """Lower one (static) program to StableHLO with the weights as arguments of `@main`, and write it
        (`stem`.stablehlo.mlirbc, and .mlir when small)."""
        from kiln.compiler.capture.decompositions import apply_decompositions, module_path_of, stablehlo_table
        from kiln.compiler.errors import UnsupportedOpError
        from litert_converter.mlir.dialects import stablehlo
        from litert_torch.backend.export import exported_program_to_mlir
        from litert_torch.backend.tf_integration import torch_dtype_to_tf

        assert model.exported is not None, "the tpu target needs the FX program"
        program = _to_bfloat16(model.exported) if precision == "bf16" else model.exported
        program, decomposed = apply_decompositions(program, stablehlo_table())
        try:
            lowered = exported_program_to_mlir(program, inline_constants=False)
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
        arguments: list[tuple[str, Any]] = [
            ("input", s.input_spec.i) if s.input_spec.is_user_input else ("weight", s.input_spec.name)
            for s in lowered.input_signature
        ]
        return Lowered(
            text=text,
            version=version,
            arguments=arguments,
            weights=dict(lowered.state_dict),
            input_dtypes=[torch_dtype_to_tf(s.dtype) for s in lowered.input_signature if s.input_spec.is_user_input],
            output_dtypes=[torch_dtype_to_tf(s.dtype) for s in lowered.output_signature],
            decomposed=decomposed,
        )

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
    directory: Path, model: CapturedModel, lowered: Lowered, variables: dict[str, Any], file: str = BYTECODE_FILE
) -> None:
    """Deserialize the saved .mlirbc independently and run it once under XLA, to catch a broken serialization."""
    import tensorflow as tf

    run = _xla_function(_with_platform_index(read_portable_artifact(directory / file)), model, lowered, variables)
    run(*[tf.zeros(list(s.shape), dtype) for s, dtype in zip(model.inputs, lowered.input_dtypes)])


def read_portable_artifact(path: Path) -> str:
    """The StableHLO module text of a portable versioned artifact (`.mlirbc`)."""
    from litert_converter.mlir import ir
    from litert_converter.mlir.dialects import stablehlo
    from litert_torch.backend.export_utils import create_ir_context

    bytecode = stablehlo.deserialize_portable_artifact_str(path.read_bytes())
    with create_ir_context():
        return str(ir.Module.parse(bytecode).operation.get_asm())
