"""Module boundaries of a captured FX program, and the program cut at one of them.

`module_boundaries(program)` lists, in execution order, the tensor each PyTorch module call ends with (the last
FX node of the call, from the nodes' `nn_module_stack`). `prefix_program(program, boundary, ...)` is a new
`ExportedProgram` that computes the model up to that boundary and returns its tensor: the unlifted program is
run node by node up to the boundary under `torch.export` again, so parameters, buffers and constants are lifted
by `torch.export` itself, under the names they have in the model. `intermediates(program, boundaries, feeds)`
is PyTorch's value of every boundary on one input set, from one run of the captured program.
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from kiln.compiler.capture.program import CapturedModel, EagerModel, fx_signature
from kiln.compiler.errors import UnsupportedOpError, error_text

if TYPE_CHECKING:
    from kiln.compiler.types import Feeds

# Ops that only move or relabel data: a module made of these alone is not worth a build of its own.
TRIVIAL_OPS = {
    "view", "reshape", "flatten", "permute", "transpose", "contiguous", "clone", "dropout", "alias", "expand",
    "unsqueeze", "squeeze", "t", "_assert_tensor_metadata", "detach", "identity", "getitem",
}  # fmt: skip


@dataclass(frozen=True)
class Boundary:
    """Where one module call ends: the FX node holding its output, the innermost module ending there (qualified
    name and class), the source line that called it, and the enclosing modules that end at the same node."""

    index: int
    node: str
    module: str
    kind: str
    source: str
    enclosing: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()  # the ATen ops computed since the previous boundary, in order, once each

    def label(self) -> str:
        """`body.2 (Block)`."""
        return f"{self.module} ({self.kind})"


def module_boundaries(program: torch.export.ExportedProgram) -> list[Boundary]:
    """The module boundaries of `program` in execution order: for each module call (nested ones included, the
    root and data-movement-only modules left out), the last node of the call, when it is one float tensor.
    Modules that end at the same node share one boundary, named after the innermost."""
    last: dict[str, tuple[int, str, str]] = {}  # module call key -> (node position, path, class)
    ops: dict[str, set[str]] = {}
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    for position, node in enumerate(nodes):
        for key, (path, kind) in (node.meta.get("nn_module_stack") or {}).items():
            if not path:
                continue
            last[key] = (position, path, str(kind).rsplit(".", 1)[-1])
            ops.setdefault(key, set()).add(_op_name(node))
    by_node: dict[int, list[tuple[str, str]]] = {}
    for key, (position, path, kind) in last.items():
        if ops[key] <= TRIVIAL_OPS or not _float_tensor(nodes[position]):
            continue
        by_node.setdefault(position, []).append((path, kind))
    boundaries: list[Boundary] = []
    previous = -1
    for position in sorted(by_node):
        modules = sorted(by_node[position], key=lambda m: -m[0].count("."))  # innermost first
        path, kind = modules[0]
        node = nodes[position]
        enclosing = tuple(p for p, _ in modules[1:])
        added = [_op_name(n) for n in nodes[previous + 1 : position + 1]]
        computed = tuple(dict.fromkeys(op for op in added if not op.startswith(("_assert", "sym_"))))
        boundaries.append(Boundary(len(boundaries), node.name, path, kind, source_line(node), enclosing, computed))
        previous = position
    return boundaries


def live_at(program: torch.export.ExportedProgram, bounds: list[Boundary], cut: Boundary) -> list[Boundary]:
    """The frontier of a cut at `cut`: the earlier boundaries whose values are still live there (read by a node
    after `cut`'s, the program's output included), in order. A prefix judged on its last value alone would miss a
    branch computed before the cut and consumed after it (DistilBERT's word embeddings, added to the position
    embeddings that end the prefix)."""
    position = {node.name: i for i, node in enumerate(program.graph.nodes)}
    nodes = {node.name: node for node in program.graph.nodes}
    end = position[cut.node]
    return [b for b in bounds[: cut.index] if any(position[user.name] > end for user in nodes[b.node].users)]


def _op_name(node: torch.fx.Node) -> str:
    name = getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0].rstrip("_")


def _float_tensor(node: torch.fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dtype.is_floating_point


def source_line(node: torch.fx.Node) -> str:
    """`file:line (code)` of the innermost frame of the node's stack trace outside torch (the model's own code
    that called the module), or '' when the node has no trace."""
    trace = node.meta.get("stack_trace") or ""
    torch_root = str(Path(torch.__file__).parent)
    frames = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.*)', trace)
    own = [f for f in frames if not f[0].startswith(torch_root)] or frames
    if not own:
        return ""
    file, line, code = own[-1]
    return f"{file}:{line} ({code.strip()[:120]})"


class _Prefix(torch.nn.Module):
    """The unlifted program, run node by node until the boundary node, whose value it returns. It holds the
    parameters, buffers and constants that those nodes read, under their own names, so a re-export lifts them
    as the model's (`body.1.conv.weight`) and passes that find a layer by name find it in the prefix too; the
    weights of later layers are left out."""

    def __init__(self, unlifted: torch.fx.GraphModule, stop: str, names: list[str], live: tuple[str, ...] = ()):
        super().__init__()
        for path in _attributes_used(unlifted, stop):
            value = functools.reduce(getattr, path.split("."), unlifted)
            owner: torch.nn.Module = self
            *parents, last = path.split(".")
            for part in parents:
                if part not in owner._modules:
                    owner.add_module(part, torch.nn.Module())
                owner = owner._modules[part]  # type: ignore[assignment]
            if isinstance(value, torch.nn.Parameter):
                owner.register_parameter(last, value)
            elif isinstance(value, torch.Tensor):
                owner.register_buffer(last, value)
        self.__dict__["_unlifted"] = unlifted  # not a child: its tensors are this module's already
        self._stop, self._live = stop, live
        if all(name.isidentifier() for name in names):  # the prefix's inputs are named like the model's
            run = self.forward
            parameter = inspect.Parameter.POSITIONAL_OR_KEYWORD
            named = functools.wraps(run)(lambda *args: run(*args))
            named.__signature__ = inspect.Signature([inspect.Parameter(n, parameter) for n in names])  # type: ignore[attr-defined]
            self.__dict__["forward"] = named

    def forward(self, *args: Any) -> Any:
        unlifted: torch.fx.GraphModule = self.__dict__["_unlifted"]
        interpreter = _OwnAttributes(unlifted, self)
        interpreter.args_iter = iter(args)
        interpreter.env = {}
        for node in unlifted.graph.nodes:
            if node.op == "output":
                break
            interpreter.env[node] = interpreter.run_node(node)
            if node.name == self._stop:
                if not self._live:
                    return interpreter.env[node]
                by_name = {n.name: value for n, value in interpreter.env.items()}
                return (interpreter.env[node], *(by_name[name] for name in self._live))
        raise RuntimeError(f"node {self._stop} not found in the program")


class _OwnAttributes(torch.fx.Interpreter):
    """Runs the unlifted program reading its parameters and buffers from `owner` (where `torch.export` swaps in
    its own tensors while tracing; read from the program, they would be baked in as constants)."""

    def __init__(self, unlifted: torch.fx.GraphModule, owner: torch.nn.Module):
        super().__init__(unlifted)
        self.owner = owner

    def fetch_attr(self, target: str) -> Any:
        try:
            return functools.reduce(getattr, target.split("."), self.owner)
        except AttributeError:  # not read before the boundary: not held by the owner
            return super().fetch_attr(target)


def _attributes_used(unlifted: torch.fx.GraphModule, stop: str) -> list[str]:
    """The parameters, buffers and constants (`get_attr` targets) that the nodes up to `stop` read."""
    order: list[torch.fx.Node] = []
    for node in unlifted.graph.nodes:
        order.append(node)
        if node.name == stop:
            break
    before = set(order)
    return [str(n.target) for n in order if n.op == "get_attr" and any(u in before for u in n.users)]


def prefix_program(
    captured: CapturedModel,
    boundary: Boundary,
    example: list[np.ndarray],
    output_name: str,
    live: list[Boundary] | None = None,
) -> CapturedModel:
    """The captured model cut at `boundary`: a program (and its specs) whose first output, `output_name`, is the
    boundary's tensor, followed by the tensors of the `live` boundaries (`live_name(output_name, b)`); with the
    capture's dynamic dims, if it has some."""
    assert captured.exported is not None
    inputs = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in example)
    dynamic_shapes = None
    dynamic = captured.dynamic
    if dynamic is not None:
        names = [s.name for s in captured.inputs]
        sizes = dynamic.capture_sizes(names, [tuple(t.shape) for t in inputs])
        inputs = tuple(dynamic.resized(names, list(inputs), sizes))
        dynamic_shapes = dynamic.torch_shapes(names)
    live = live or []
    names = [s.name for s in captured.inputs]
    module = _Prefix(captured.exported.module(), boundary.node, names, tuple(b.node for b in live))
    try:
        program = torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        raise UnsupportedOpError(
            f"cannot cut the program at {boundary.label()}: {error_text(exc, 200)}",
            "localize on a model without data-dependent control flow",
        ) from None
    specs_in, specs_out = fx_signature(program, [output_name, *(live_name(output_name, b) for b in live)], dynamic)
    eager = EagerModel(module, inputs, names)  # the TorchScript route traces the prefix's own ops
    return CapturedModel(program, None, specs_in, specs_out, 0, dynamic, eager=eager)


def live_name(output_name: str, boundary: Boundary) -> str:
    """The output name of a live boundary's tensor in a prefix program (`divergence_probe_3`)."""
    return f"{output_name}_{boundary.index}"


def reference_module(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The program as a module to run in PyTorch (a copy for a stateful model: its buffers stay as they are)."""
    unlifted = program.module()
    if program.graph_signature.buffers_to_mutate:
        unlifted = copy.deepcopy(unlifted)
    return unlifted  # type: ignore[return-value]


def eager_check(eager: EagerModel, program: torch.export.ExportedProgram, bounds: list[Boundary], feeds: Feeds) -> str:
    """The localization's reference is the captured program run in PyTorch (its values at every boundary); this
    checks them against the user's own model: one eager run of `eager` with a forward hook on each boundary's
    module, whose output (a module called once, returning one tensor of the boundary's shape) must equal the
    captured program's value there. A note for the record: how many boundaries were checked, and which differ."""
    paths = {b.module: b for b in bounds}
    calls: dict[str, list[Any]] = {}
    handles = []
    for path in paths:
        try:
            module = eager.module.get_submodule(path)
        except AttributeError:
            continue
        handles.append(
            module.register_forward_hook(lambda _m, _a, out, path=path: calls.setdefault(path, []).append(out))
        )
    try:
        with torch.no_grad():
            eager.module(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in eager.input_names])
    finally:
        for handle in handles:
            handle.remove()
    own = {p: out[0] for p, out in calls.items() if len(out) == 1 and isinstance(out[0], torch.Tensor)}
    captured = intermediates(program, [paths[p].node for p in own], feeds)
    differ = []
    for path, value in own.items():
        want, got = value.detach().float().numpy(), captured[paths[path].node]
        scale = float(np.max(np.abs(want), initial=0.0))
        if want.shape == got.shape and not np.allclose(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1.0)):
            differ.append(paths[path].label())
    checked = sum(1 for p, v in own.items() if tuple(v.shape) == captured[paths[p].node].shape)
    text = f"boundary values from the captured program, {checked - len(differ)} of {len(bounds)} equal to the " \
        "model's own module outputs (the rest: modules called more than once or not returning one tensor)"  # fmt: skip
    if differ:
        text += f"; the captured program DIFFERS from the model at {', '.join(differ[:3])} (torch.export)"
    return text


def intermediates(
    program: torch.export.ExportedProgram,
    nodes: list[str],
    feeds: Feeds,
    unlifted: torch.fx.GraphModule | None = None,
) -> dict[str, np.ndarray]:
    """PyTorch's value of each named node of `program` on one input set (a dict keyed by node name); `unlifted`:
    the program's `reference_module`, when the caller keeps one."""
    unlifted = unlifted if unlifted is not None else reference_module(program)
    wanted = set(nodes)
    values: dict[str, np.ndarray] = {}
    interpreter = torch.fx.Interpreter(unlifted)
    names = [s.name for s in fx_signature(program, [])[0]]
    args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names]
    interpreter.args_iter = iter(args)
    interpreter.env = {}
    with torch.no_grad():
        for node in unlifted.graph.nodes:
            if node.op == "output" or len(values) == len(wanted):
                break
            interpreter.env[node] = interpreter.run_node(node)
            if node.name in wanted:
                values[node.name] = interpreter.env[node].detach().cpu().numpy()
    return values
