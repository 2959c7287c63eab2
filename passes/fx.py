"""Passes over the `torch.export` program, for the targets that consume it (pt2, tflite, edgetpu, tpu, aoti).

A pass returns a new `ExportedProgram` whose graph, graph signature and state dict agree: a lifted
parameter, buffer or constant that no node reads any more is removed from all three.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

from kiln.passes.base import CLEANUP, FUSION, FX, OUTPUTS, SIGNATURE, Pass, PassResult

if TYPE_CHECKING:
    import torch
    from torch.export import ExportedProgram

# batch_norm.default(input, weight, bias, mean, var, training, momentum, eps, cudnn_enabled);
# _native_batch_norm_legit_no_training(input, weight, bias, mean, var, momentum, eps) -> (out, ...)
_BATCH_NORM_EPS_ARG = {"batch_norm.default": 7, "_native_batch_norm_legit_no_training.default": 6}
# conv1d/2d/3d(input, weight, bias, ...); convolution(input, weight, bias, stride, pad, dilation, transposed, ...)
_CONVOLUTIONS = ("conv1d.default", "conv2d.default", "conv3d.default", "convolution.default")


def _lifted_tensors(program: ExportedProgram) -> dict[str, tuple[str, dict[str, Any]]]:
    """Placeholder name -> (state-dict or constants key, the dict holding it), for lifted tensors."""
    from torch.export.graph_signature import InputKind, TensorArgument

    found = {}
    for spec in program.graph_signature.input_specs:
        if not isinstance(spec.arg, TensorArgument) or spec.target is None:
            continue
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target in program.state_dict:
            found[spec.arg.name] = (spec.target, program.state_dict)
        elif spec.kind == InputKind.CONSTANT_TENSOR and spec.target in program.constants:
            found[spec.arg.name] = (spec.target, program.constants)
    return found


def without_unused_inputs(program: ExportedProgram) -> tuple[ExportedProgram, bool]:
    """The program without the lifted parameters, buffers and constants that no node reads."""
    from torch.export import ExportedProgram
    from torch.export.graph_signature import ExportGraphSignature, InputKind, TensorArgument

    lifted = {InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR}
    unused = {n.name for n in program.graph.nodes if n.op == "placeholder" and not n.users}
    written = {spec.target for spec in program.graph_signature.output_specs if spec.target is not None}
    dropped = [
        spec
        for spec in program.graph_signature.input_specs
        if spec.kind in lifted
        and isinstance(spec.arg, TensorArgument)
        and spec.arg.name in unused
        and spec.target not in written
    ]
    if not dropped:
        return program, False
    names = {spec.arg.name for spec in dropped}
    state_dict = dict(program.state_dict)
    constants = dict(program.constants)
    for spec in dropped:
        assert spec.target is not None
        still_used = any(s.target == spec.target for s in program.graph_signature.input_specs if s not in dropped)
        if not still_used:
            state_dict.pop(spec.target, None)
            constants.pop(spec.target, None)
    graph_module = program.graph_module
    for node in [n for n in graph_module.graph.nodes if n.op == "placeholder" and n.name in names]:
        graph_module.graph.erase_node(node)
    graph_module.recompile()
    signature = ExportGraphSignature(
        input_specs=[s for s in program.graph_signature.input_specs if s not in dropped],
        output_specs=list(program.graph_signature.output_specs),
    )
    rebuilt = ExportedProgram(
        root=graph_module,
        graph=graph_module.graph,
        graph_signature=signature,
        state_dict=state_dict,
        range_constraints=program.range_constraints,
        module_call_graph=program.module_call_graph,
        example_inputs=program.example_inputs,
        constants=constants,
        verifiers=program.verifiers,
    )
    return rebuilt, True


def _dead_code_elimination(program: ExportedProgram) -> PassResult:
    """Remove nodes whose results nothing uses (side effects kept), then the inputs only they read."""
    changed = program.graph_module.graph.eliminate_dead_code()
    if changed:
        program.graph_module.recompile()
    program, dropped = without_unused_inputs(program)
    return PassResult(program, changed or dropped)


def _op_name(node: Any) -> str:
    """`conv2d.default` for a call of torch.ops.aten.conv2d.default; '' for anything else."""
    target = node.target
    if node.op != "call_function" or getattr(target, "namespace", None) != "aten":
        return ""
    return f"{target._opname}.{target._overloadname}"


def _batch_norm_output(node: Any) -> Any:
    """The node carrying a batch norm's normalized output (a getitem for the tuple-returning form)."""
    if _op_name(node) == "batch_norm.default":
        return node if not node.args[5] else None  # training-mode batch norm is not folded
    users = list(node.users)
    if len(users) == 1 and users[0].target is operator.getitem and users[0].args[1] == 0:
        return users[0]
    return None


def _fold_one(program: ExportedProgram, lifted: dict[str, tuple[str, dict[str, Any]]], bn: Any) -> bool:
    """Fold batch norm `bn` into the convolution feeding it, if the pattern is exact; whether it did."""
    import torch

    conv, weight, bias, mean, var = bn.args[:5]
    eps = float(bn.args[_BATCH_NORM_EPS_ARG[_op_name(bn)]])
    output = _batch_norm_output(bn)
    if output is None or not hasattr(conv, "users") or _op_name(conv) not in _CONVOLUTIONS or len(conv.users) != 1:
        return False
    if _op_name(conv) == "convolution.default" and conv.args[6]:  # transposed: weights laid out [in, out, ...]
        return False
    conv_weight = conv.args[1]
    conv_bias = conv.args[2] if len(conv.args) > 2 else None
    # The conv's weight and bias get new values, so they must be lifted tensors read by this conv only;
    # without a conv bias, the batch norm's own bias tensor becomes it.
    new_bias_node = conv_bias if conv_bias is not None else bias
    params = [conv_weight, new_bias_node, mean, var] + ([weight] if weight is not None else [])
    if bias is None or any(getattr(p, "name", None) not in lifted for p in params):
        return False
    if len(conv_weight.users) != 1 or len(new_bias_node.users) != 1:
        return False

    def value(node: Any) -> torch.Tensor:
        key, store = lifted[node.name]
        return store[key].detach().to(torch.float64)

    w = value(conv_weight)
    scale = (value(weight) if weight is not None else 1.0) / torch.sqrt(value(var) + eps)
    b0 = value(conv_bias) if conv_bias is not None else torch.zeros_like(value(mean))
    fused_bias = (b0 - value(mean)) * scale + value(bias)
    fused_weight = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    for node, tensor in ((conv_weight, fused_weight), (new_bias_node, fused_bias)):
        key, store = lifted[node.name]
        old = store[key]
        new = tensor.to(old.dtype).contiguous()
        keep_parameter = isinstance(old, torch.nn.Parameter)
        store[key] = torch.nn.Parameter(new, requires_grad=old.requires_grad) if keep_parameter else new
    if conv_bias is None:
        args = list(conv.args) + [None] * (3 - len(conv.args))
        args[2] = bias
        conv.args = tuple(args)
    output.replace_all_uses_with(conv)
    graph = program.graph_module.graph
    for node in (output, bn) if output is not bn else (bn,):
        graph.erase_node(node)
    return True


def _conv_batchnorm_folding(program: ExportedProgram) -> PassResult:
    """Fold inference-mode BatchNorm into the weights and bias of the convolution before it."""
    lifted = _lifted_tensors(program)
    batch_norms = [n for n in program.graph.nodes if _op_name(n) in _BATCH_NORM_EPS_ARG]
    folded = sum(_fold_one(program, lifted, bn) for bn in batch_norms)
    if not folded:
        return PassResult(program, False)
    program.graph_module.recompile()
    program, _ = without_unused_inputs(program)
    return PassResult(program, True)


PASSES = [
    Pass(
        "fx-dead-code-elimination",
        "remove FX nodes nothing uses, and lifted parameters, buffers and constants nothing reads",
        FX,
        CLEANUP,
        _dead_code_elimination,
    ),
    Pass(
        "fx-conv-batchnorm-folding",
        "fold inference BatchNorm into the preceding convolution's weights and bias (state dict updated)",
        FX,
        FUSION,
        _conv_batchnorm_folding,
        # the folded convolution keeps the conv's module path; the batch norm's disappears
        preserves=(OUTPUTS, SIGNATURE),
    ),
]
