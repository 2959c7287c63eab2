"""Capture: `torch.export` (non-strict) to an FX graph, then the dynamo exporter to ONNX."""

from __future__ import annotations

import inspect
import re
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from kiln.compiler.capture.dynamic import BATCH_DIM, DynamicShapes, name_dynamic_dims, shaped_like_forward
from kiln.compiler.capture.onnx_files import copy_onnx, onnx_signature
from kiln.compiler.capture.sources import ModelSource
from kiln.compiler.errors import UnsupportedOpError, UsageError, error_text
from kiln.compiler.progress import converter_output_captured
from kiln.compiler.types import TensorSpec

MIN_OPSET = 18
EXPORTERS = ("dynamo", "torchscript")  # the ONNX exporters, in the order `lower_to_onnx` tries them


@dataclass
class CapturedModel:
    """A model captured once and shared by every target: the FX program and its ONNX lowering."""

    exported: torch.export.ExportedProgram | None
    onnx_path: Path | None  # None when no target consumes ONNX
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    dynamic: DynamicShapes | None  # resolved against the inputs
    lowering: dict[str, Any] = field(default_factory=dict)  # how the ONNX graph was made, for the manifest
    eager: EagerModel | None = field(default=None, repr=False, compare=False)  # for the TorchScript route
    # More static programs of the same model, each one more signature of the artifact on the targets that take the
    # FX program (a static-cache decoder's chunked prefill, kiln.compiler.generation.static_kv_cache): (name, model).
    signatures: tuple[tuple[str, CapturedModel], ...] = ()


@dataclass(frozen=True)
class EagerModel:
    """The eager module with its example inputs and input names: what the TorchScript-based ONNX route needs."""

    module: torch.nn.Module
    inputs: tuple[Any, ...]
    input_names: list[str]


def capture(
    source: ModelSource,
    dynamic: DynamicShapes | None,
    workdir: Path,
    to_onnx: bool = True,
    optimize: bool = True,
) -> CapturedModel:
    """Capture the source with `torch.export`; lower it to ONNX in `workdir` when an ONNX target needs it
    (with the exporter's own optimizer unless `optimize` is False: -O0 keeps its raw graph)."""
    onnx_path = workdir / "captured" / "model.onnx"
    onnx_path.parent.mkdir(parents=True)
    if source.kind == "onnx":
        assert source.onnx_path is not None
        if dynamic is not None:
            raise UsageError(
                "--dynamic and --dynamic-batch do not apply to an .onnx source",
                "its dynamic dims are already set in the file",
            )
        copy_onnx(source.onnx_path, onnx_path)
        inputs, outputs, opset = onnx_signature(onnx_path, torch_layout=False)
        return CapturedModel(None, onnx_path, inputs, outputs, opset, None)
    output_names = flat_output_names(run_eager(source, source.example_inputs))
    if dynamic is not None:
        dynamic = dynamic.resolve(input_names(source), [tuple(t.shape) for t in source.example_inputs])
    exported = export_program(source, dynamic)
    inputs, outputs = fx_signature(exported, output_names, dynamic)
    eager = None
    if source.module is not None:
        eager = EagerModel(source.module, tuple(source.example_inputs), [s.name for s in inputs])
    captured = CapturedModel(exported, None, inputs, outputs, 0, dynamic, eager=eager)
    return lower(captured, workdir, optimize) if to_onnx else captured


def lower(
    captured: CapturedModel, workdir: Path, optimize: bool = True, exporters: tuple[str, ...] = EXPORTERS
) -> CapturedModel:
    """The captured program with its ONNX lowering (`workdir/captured/model.onnx`) by the first of `exporters`
    that converts; see `lower_to_onnx`."""
    assert captured.exported is not None
    onnx_path = workdir / "captured" / "model.onnx"
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in captured.outputs]
    record = lower_to_onnx(captured.exported, onnx_path, names, captured.dynamic, optimize, captured.eager, exporters)
    return replace(captured, onnx_path=onnx_path, opset=onnx_signature(onnx_path, True)[2], lowering=record)


def fx_signature(
    exported: torch.export.ExportedProgram, output_names: list[str], dynamic: DynamicShapes | None = None
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output specs of an exported program; a symbolic dim is named after its `dynamic` symbol (an
    expression of symbols, e.g. `seq*2`, for a derived output dim), `batch` without `dynamic`."""
    placeholders = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    names = {}  # torch's symbol (s0, s17...) -> ours
    for name in exported.graph_signature.user_inputs:
        for axis, d in enumerate(placeholders[name].meta["val"].shape):
            dim = dynamic.symbol_of(name, axis) if dynamic is not None else None
            if not isinstance(d, int) and dim is not None:
                names[str(d)] = dim.symbol

    def symbolic(d: Any) -> str:
        if dynamic is None:
            return BATCH_DIM
        text = str(d)
        return names.get(text) or re.sub(r"\b[su]\d+\b", lambda m: names.get(m[0], m[0]), text).replace(" ", "")

    def spec(name: str, value: Any, is_input: bool) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else symbolic(d) for d in value.shape)
        dtype = str(value.dtype).removeprefix("torch.")
        layout = "NCHW" if is_input and len(shape) == 4 and value.dtype.is_floating_point else None
        return TensorSpec(name, shape, dtype, layout)

    inputs = [spec(name, placeholders[name].meta["val"], True) for name in exported.graph_signature.user_inputs]
    output_node = next(n for n in exported.graph.nodes if n.op == "output")
    values = [node.meta["val"] for node in output_node.args[0]]
    return inputs, [spec(name, value, False) for name, value in zip(output_names, values)]


def run_eager(source: ModelSource, inputs: tuple[Any, ...]) -> Any:
    """Run the reference model once, turning a mismatch with `forward` into a clear error."""
    module = source.module
    assert module is not None
    forward = module.forward
    try:
        inspect.signature(forward).bind(*inputs)
    except TypeError as exc:
        raise UsageError(
            f"example inputs do not match {type(module).__name__}.forward{_signature(forward)}: {exc}",
            "return example inputs in the order forward() takes them",
        ) from None
    try:
        with torch.no_grad():
            return module(*inputs)
    except Exception as exc:
        shapes = ", ".join(f"{tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}" for t in inputs)
        raise UsageError(
            f"running {source.description} on its example inputs ({shapes}) failed: {error_text(exc)}",
            "check the shapes and dtypes of the example inputs",
        ) from None


def _signature(fn: Any) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(...)"


def flat_output_names(outputs: Any) -> list[str]:
    """Stable names for every tensor in a (nested) output: `output`, `output_0`, `logits`, `hidden.1`..."""
    leaves, _ = torch.utils._pytree.tree_flatten_with_path(outputs)
    names = []
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise UsageError(
                f"the model returns a {type(leaf).__name__} at {torch.utils._pytree.keystr(path) or 'top level'}",
                "return only tensors (or tuples/dicts of tensors) from forward()",
            )
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        names.append(re.sub(r"[^A-Za-z0-9_.]", "_", ".".join(parts)))
    if len(names) == 1 and names[0] == "":
        return ["output"]
    return [f"output_{n}" if n and n[0].isdigit() else (n or "output") for n in names]


def input_names(source: ModelSource) -> list[str]:
    """The names torch.export gives the source's inputs: forward's parameter names (`args_0`... for `*args`;
    a .pt2's own names)."""
    if source.exported is not None:
        return list(source.exported.graph_signature.user_inputs)
    assert source.module is not None
    try:
        parameters = list(inspect.signature(source.module.forward).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    named = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    count = len(source.example_inputs)
    rest = next((p.name for p in parameters if p.kind == p.VAR_POSITIONAL), "args")
    return (named + [f"{rest}_{i}" for i in range(count - len(named))])[:count]


def export_program(source: ModelSource, dynamic: DynamicShapes | None) -> torch.export.ExportedProgram:
    """`torch.export` the source, non-strict, with the `dynamic` dims (resolved) dynamic when asked."""
    if dynamic is None and source.exported is not None:
        return source.exported
    inputs = source.example_inputs
    dynamic_shapes = None
    if dynamic is not None:
        names = input_names(source)
        sizes = dynamic.capture_sizes(names, [tuple(t.shape) for t in inputs])
        inputs = tuple(dynamic.resized(names, list(inputs), sizes))
        dynamic_shapes = dynamic.torch_shapes(names)
    module = source.module
    if module is None:
        assert source.exported is not None
        module = source.exported.module()
    elif dynamic_shapes is not None:
        dynamic_shapes = shaped_like_forward(module, dynamic_shapes)
    try:
        with converter_output_captured():
            return torch.export.export(module, tuple(inputs), dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        raise _capture_error(exc, source, dynamic) from None


def _user_frame(exc: BaseException) -> str:
    """`file:line (code)` of the innermost traceback frame outside torch and Kiln."""
    torch_root = str(Path(torch.__file__).parent)
    kiln_root = str(Path(__file__).parent)
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith((torch_root, kiln_root))
        and "site-packages" not in f.filename
        and not f.filename.startswith("<")
    ]
    if not frames:
        match = re.search(r'File "([^"]+)", line (\d+), in \w+\n\s*(.+)', str(exc))
        return f"{match[1]}:{match[2]} ({match[3].strip()})" if match else ""
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"


def _capture_error(exc: Exception, source: ModelSource, dynamic: DynamicShapes | None) -> Exception:
    text = str(exc)
    where = _user_frame(exc)
    at = f" at {where}" if where else ""
    if "data-dependent" in text or "GuardOnDataDependent" in type(exc).__name__:
        return UnsupportedOpError(
            f"torch.export cannot capture {source.description}: control flow depends on tensor values{at}",
            "compute both branches and pick with torch.where(cond, a, b), or use torch.cond",
        )
    if "Constraints violated" in text or "specialized" in text:
        return UsageError(
            f"{source.description} does not support {_dynamic_phrase(dynamic)}{at}: "
            f"{text.splitlines()[1].strip()[:200] if len(text.splitlines()) > 1 else text[:200]}",
            "export with a fixed batch (drop --dynamic-batch) or make the model batch-agnostic"
            if dynamic is None or dynamic.batch is not None
            else "narrow or drop the --dynamic ranges, or give axes the model needs equal one symbol "
            "(SYMBOL=a:1,b:1=MIN:MAX)",
        )
    return UnsupportedOpError(
        f"torch.export failed on {source.description}{at}: {error_text(exc)}",
        "see https://pytorch.org/docs/stable/export.html for what export supports",
    )


def _dynamic_phrase(dynamic: DynamicShapes | None) -> str:
    if dynamic is None or dynamic.batch is not None:
        return f"a dynamic batch {dynamic}" if dynamic is not None else "a dynamic batch"
    return f"the dynamic dims {dynamic}"


def lower_to_onnx(
    exported: torch.export.ExportedProgram,
    path: Path,
    output_names: list[str],
    dynamic: DynamicShapes | None,
    optimize: bool = True,
    eager: EagerModel | None = None,
    exporters: tuple[str, ...] = EXPORTERS,
) -> dict[str, Any]:
    """Lower the FX program to ONNX and check the result; what the manifest records of it (`target_info`):
    the legalizations applied and `onnx_route` (the route that produced the file, and why earlier ones failed).

    Routes, in order: `dynamo` (the dynamo exporter on the program after Kiln's legalizations, opset >= 18; with
    its onnxscript optimizer, which folds constants and BatchNorm and fuses LayerNorm/GELU/Gemm, unless
    `optimize` is False), then `torchscript` (`torch.onnx.export(dynamo=False)` on the eager module, when
    `eager` is given). `exporters` picks and orders them. The parity gate judges whatever the route produced;
    an error raised when none converts has `failed` (exporter -> one-line reason)."""
    import onnx
    from kiln.compiler.capture.decompositions import apply_legalizations, onnx_legalizations

    program, legalized = apply_legalizations(exported, onnx_legalizations())
    failed: dict[str, str] = {}
    errors: list[Exception] = []
    for route in [e for e in exporters if e != "torchscript" or eager is not None]:
        try:
            if route == "dynamo":
                _dynamo_onnx(program, path, output_names, optimize)
            else:
                assert eager is not None
                _torchscript_onnx(eager, path, output_names, dynamic, exported)
            break
        except Exception as exc:
            failed[route] = _exporter_error(exc)
            errors.append(exc)
    else:
        if not errors:
            raise UsageError("no ONNX exporter applies to this model", "the torchscript route needs an nn.Module")
        raise _lowering_error(errors[0], failed) from None
    proto = onnx.load(str(path), load_external_data=False)
    if dynamic is not None:
        name_dynamic_dims(proto, dynamic)
        onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise UnsupportedOpError(
            f"the lowered ONNX graph ({route} route) fails onnx.checker: {error_text(exc)}",
            "report this as a Kiln bug with the model",
        ) from None
    return {"decompositions_applied": legalized, "onnx_route": {"route": route, "failed": failed}}


def _dynamo_onnx(program: torch.export.ExportedProgram, path: Path, output_names: list[str], optimize: bool) -> None:
    """The `dynamo` route: `torch.onnx.export` of the exported program, optimized by the exporter's own optimizer
    unless `optimize` is False. Weights a Transpose reads are transposed as the file is written
    (`defer_weight_transposes`), and a model with large weights is saved with external data (`save_onnx`): the
    weights are never copied whole in memory."""
    from kiln.compiler.large_graphs import save_onnx

    with converter_output_captured():
        onnx_program = torch.onnx.export(
            program,
            (),
            dynamo=True,
            optimize=False,
            verbose=False,
            output_names=output_names,
            opset_version=max(MIN_OPSET, 20),
        )
        assert onnx_program is not None
        if optimize:
            defer_weight_transposes(onnx_program.model)
            onnx_program.optimize()
    save_onnx(onnx_program.model, path)


def defer_weight_transposes(model: Any, min_elements: int = 1 << 16) -> int:
    """Replace each Transpose of a weight it alone reads (the exporter's `MatMul(x, Transpose(W))` for a Linear) by
    a new weight holding W transposed, computed only when the file is written (`onnx_ir.LazyTensor`): the
    exporter's optimizer would fold those Transposes in memory, one transposed copy of every Linear's weight at
    once. Weights under `min_elements` are left to the optimizer. Returns how many were replaced."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    replaced = 0
    for node in list(graph):
        source = node.inputs[0] if node.op_type == "Transpose" and node.domain in ("", "ai.onnx") else None
        if source is None or not source.is_initializer() or source.const_value is None or len(source.uses()) != 1:
            continue
        tensor = source.const_value
        if tensor.size < min_elements or node.outputs[0].is_graph_output():
            continue
        rank = len(tensor.shape)
        perm = list(node.attributes.get_ints("perm", list(reversed(range(rank)))))
        shape = ir.Shape([tensor.shape[i] for i in perm])

        def transposed(tensor: Any = tensor, perm: list[int] = perm) -> Any:
            return ir.Tensor(np.ascontiguousarray(np.transpose(tensor.numpy(), perm)))

        name = f"{source.name}.transposed"
        value = ir.Value(name=name, shape=shape, type=ir.TensorType(tensor.dtype))
        value.const_value = ir.LazyTensor(transposed, dtype=tensor.dtype, shape=shape, name=name)
        graph.register_initializer(value)
        node.outputs[0].replace_all_uses_with(value)
        graph.remove(node, safe=True)
        graph.initializers.pop(source.name)
        replaced += 1
    return replaced


def _torchscript_onnx(
    eager: EagerModel,
    path: Path,
    output_names: list[str],
    dynamic: DynamicShapes | None,
    exported: torch.export.ExportedProgram | None = None,
) -> None:
    """The `torchscript` route: the TorchScript-based `torch.onnx.export(dynamo=False)` on the eager module
    (traced on its example inputs), with the `dynamic` input axes dynamic, and the output axes the captured
    program has symbolic (dim 0 of every output for a dynamic batch when no program is given)."""
    axes = None
    if dynamic is not None:
        axes = {n: {a: d.symbol for d in dynamic.dims for m, a in d.axes if m == n} for n in eager.input_names}
        if exported is not None:
            outputs = fx_signature(exported, output_names, dynamic)[1]
            axes.update({s.name: {a: str(d) for a, d in s.dynamic_dims.items()} for s in outputs})
        elif dynamic.batch is not None:
            axes.update({name: {0: BATCH_DIM} for name in output_names})
    with converter_output_captured(), torch.no_grad():
        torch.onnx.export(
            eager.module,
            eager.inputs,
            str(path),
            dynamo=False,
            input_names=eager.input_names,
            output_names=output_names,
            dynamic_axes=axes,
            opset_version=MIN_OPSET,
        )


def _exporter_error(exc: BaseException) -> str:
    """An ONNX exporter's exception named (`error_text`) by the line that says something: the dynamo exporter's
    first line is a banner, the cause is in its "Exception summary"."""
    summary = re.search(r"## Exception summary\s*\n+(.+)", str(exc).strip())
    return error_text(exc, text=summary[1] if summary else None)


class LoweringError(UnsupportedOpError):
    """No ONNX exporter converted the program; `failed`: each exporter tried and its one-line reason."""

    def __init__(self, message: str, hint: str, failed: dict[str, str]):
        super().__init__(message, hint)
        self.failed = failed


def _lowering_error(first: BaseException, failed: dict[str, str]) -> LoweringError:
    """Why no route produced an ONNX graph, in one line (the operator named where the exporter says it)."""
    reasons = "; ".join(f"{route}: {reason}" for route, reason in failed.items())
    op = re.search(r"(aten(?:::|\.)[A-Za-z_0-9]+)", reasons) or re.search(r"(aten::?\.?[A-Za-z_0-9.]+)", str(first))
    what = f" (operator {op[1]})" if op else ""
    return LoweringError(
        f"lowering to ONNX failed{what}: {reasons if len(failed) > 1 else next(iter(failed.values()))}",
        "use a target that consumes the FX graph, or replace that operation in the model",
        dict(failed),
    )
