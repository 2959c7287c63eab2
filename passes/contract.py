"""Checking what a pass promises (`Pass.preserves`) and that it left a valid graph.

- `check_graph`: whether a graph is still usable: an ONNX model passes `onnx.checker` (full check,
  subgraphs included) and, when small, ONNX Runtime builds a session for it; an FX program runs on its
  example inputs. `run_pipeline` rolls back a pass after which a check fails that passed before it.
- `check_preserves`: what a pass declared it keeps, checked on a graph before and after it: outputs
  (on `feeds`), the I/O signature (names, dtypes, shapes), the PyTorch module names of the nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import error_text
from kiln.compiler.onnx_metadata import NAME_SCOPES, name_scopes
from kiln.compiler.ort_session import ort_session
from kiln.passes.base import MODULE_NAMES, OUTPUTS, SIGNATURE

if TYPE_CHECKING:
    import numpy as np
    from kiln.passes.base import Pass

ORT_CHECK_BYTES = 256 * 2**20  # ONNX Runtime builds a session for models with up to this many bytes of constants
RTOL = 1e-4  # outputs kept "to fp32 round-off": |after - before| <= RTOL * max(1, max |before|) + ATOL
ATOL = 1e-5
UNSCOPED_OPS = frozenset({"Constant", "Identity"})  # ops a pass may add without a module name


def is_fx(graph: Any) -> bool:
    """Whether `graph` is a torch.export program (else an onnx_ir model)."""
    return hasattr(graph, "graph_module")


def example_feeds(graph: Any) -> Any:
    """The inputs a graph is checked on: an FX program's own example inputs (None for an ONNX model)."""
    return getattr(graph, "example_inputs", None) if is_fx(graph) else None


def check_graph(graph: Any, reference: Sequence[np.ndarray] | None = None) -> dict[str, str | None]:
    """Each validity check of `graph`: its name -> None when it passes, else the problem in one line.

    For an FX program with `reference` outputs, "runs" also requires the outputs to match them.
    """
    if is_fx(graph):
        problem: str | None = None
        try:
            outputs = run(graph, example_feeds(graph))
            if reference is not None:
                problem = _compare(reference, outputs)
        except Exception as error:  # any failure to run is the finding
            problem = error_text(error)
        return {"runs": problem}
    return _check_onnx(graph)


def _check_onnx(model: Any) -> dict[str, str | None]:
    """serializes, onnx.checker (full), onnxruntime (a session, for small models): None or the problem."""
    import onnx
    import onnx_ir as ir

    try:
        proto = ir.to_proto(model)
    except Exception as error:
        return {"serializes": error_text(error)}
    found: dict[str, str | None] = {"serializes": None, "onnx.checker": None}
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as error:
        found["onnx.checker"] = error_text(error)
    if proto.ByteSize() <= ORT_CHECK_BYTES:
        try:
            ort_session(proto.SerializeToString(), optimization="disable")
            found["onnxruntime"] = None
        except Exception as error:
            found["onnxruntime"] = error_text(error)
    return found


def run(graph: Any, feeds: Any) -> list[np.ndarray]:
    """The graph's outputs on `feeds` (ONNX: a name -> array mapping; FX: (args, kwargs)), as arrays."""
    import numpy as np

    if is_fx(graph):
        import torch

        args, kwargs = feeds
        with torch.no_grad():
            result = graph.module()(*args, **kwargs)
        leaves = torch.utils._pytree.tree_leaves(result)
        return [np.asarray(t.detach().cpu().numpy()) for t in leaves if isinstance(t, torch.Tensor)]
    import onnx_ir as ir

    session = ort_session(ir.to_proto(graph).SerializeToString())
    return [np.asarray(o) for o in session.run(None, dict(feeds))]


def _compare(expected: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> str | None:
    """None when `got` matches `expected` (see RTOL, ATOL), else how it differs."""
    import numpy as np

    if len(expected) != len(got):
        return f"{len(got)} outputs instead of {len(expected)}"
    for index, (a, b) in enumerate(zip(expected, got)):
        if a.shape != b.shape:
            return f"output {index} has shape {b.shape} instead of {a.shape}"
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        limit = RTOL * max(1.0, float(np.max(np.abs(a64), initial=0.0))) + ATOL
        error = float(np.max(np.abs(a64 - b64), initial=0.0))
        if not error <= limit:  # NaN fails too
            return f"output {index} differs by {error:.3g} (allowed {limit:.3g})"
    return None


def signature(graph: Any) -> list[tuple[str, str, str]]:
    """Each graph input, then output: (name, dtype, shape)."""
    if is_fx(graph):
        from torch.export.graph_signature import InputKind

        user = {s.arg.name for s in graph.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}
        nodes = [n for n in graph.graph.nodes if n.op == "placeholder" and n.name in user]
        output = next(n for n in graph.graph.nodes if n.op == "output")
        nodes += [a for a in output.args[0] if hasattr(a, "meta")]
        return [(n.name, str(getattr(n.meta.get("val"), "dtype", "")), str(getattr(n.meta.get("val"), "shape", "")))
                for n in nodes]  # fmt: skip
    values = [*graph.graph.inputs, *graph.graph.outputs]
    return [(str(v.name), str(v.dtype), str(v.shape)) for v in values]


def module_paths(graph: Any) -> dict[str, tuple[str, ...] | None]:
    """Node name -> the PyTorch module path it computes for (None where it has none), for named nodes."""
    if is_fx(graph):
        return {
            n.name: tuple(path for path, _ in n.meta["nn_module_stack"].values())
            if n.meta.get("nn_module_stack") else None
            for n in graph.graph.nodes if n.op == "call_function"
        }  # fmt: skip
    from kiln.passes.subgraphs import all_graphs

    found: dict[str, tuple[str, ...] | None] = {}
    for subgraph in all_graphs(graph):
        for node in subgraph:
            scopes = name_scopes(node)
            if node.name:
                found[node.name] = tuple(scopes[:-1]) if node.metadata_props.get(NAME_SCOPES) else None
    return found


def _module_name_violations(before: Any, after: Any) -> list[str]:
    old, new = module_paths(before), module_paths(after)
    known = {path for path in old.values() if path is not None}
    violations = []
    for name, path in new.items():
        if name in old and old[name] != path:
            violations.append(f"module-names: node {name} moved from {old[name]} to {path}")
        elif name not in old and known and path is None and not _unscoped_allowed(after, name):
            violations.append(f"module-names: new node {name} has no module name")
        elif path is not None and path not in known:
            violations.append(f"module-names: node {name} has module path {path}, which the graph did not have")
    return violations


def _unscoped_allowed(graph: Any, name: str) -> bool:
    """Whether the new node `name` is one a pass may add without a module name (a constant, a pin)."""
    if is_fx(graph):
        return False
    from kiln.passes.subgraphs import all_graphs

    return any(n.name == name and n.op_type in UNSCOPED_OPS for g in all_graphs(graph) for n in g)


def check_preserves(graph_pass: Pass, before: Any, after: Any, feeds: Any = None) -> list[str]:
    """What `graph_pass` promised to keep but did not, from the graph `before` and `after` it (one line each).

    `feeds` (ONNX: name -> array; FX: (args, kwargs), default the program's example inputs) are needed to
    check outputs; without them outputs are not checked.
    """
    violations = []
    if SIGNATURE in graph_pass.preserves and signature(before) != signature(after):
        changed = [f"{a} -> {b}" for a, b in zip(signature(before), signature(after)) if a != b]
        violations.append(f"signature: {'; '.join(changed) or 'inputs or outputs added or removed'}")
    if MODULE_NAMES in graph_pass.preserves:
        violations += _module_name_violations(before, after)
    feeds = feeds if feeds is not None else example_feeds(before)
    if OUTPUTS in graph_pass.preserves and feeds is not None:
        problem = _compare(run(before, feeds), run(after, feeds))
        if problem:
            violations.append(f"outputs: {problem}")
    return violations


__all__ = ["check_graph", "check_preserves", "module_paths", "run", "signature"]
