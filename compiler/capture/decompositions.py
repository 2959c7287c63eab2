"""Decompositions Kiln applies on the FX graph for ops a converter lacks, and where an op came from.

Each converter gets the table it needs (`stablehlo_table`, `tflite_table`); the names of the ops replaced
go into the report, so a user can see what was rewritten. Legalizations (`onnx_legalizations`) rewrite single
nodes where a converter would misread the captured graph; they are named in the same report.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Decomposition = Callable[..., Any]


def embedding_bag(
    weight: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    scale_grad_by_freq: bool = False,
    mode: int = 0,
    sparse: bool = False,
    per_sample_weights: torch.Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`aten._embedding_bag` as gather + segment sum, with static output shapes (sum, mean, max)."""
    num_bags = offsets.shape[0] - (1 if include_last_offset else 0)
    positions = torch.arange(indices.shape[0], device=indices.device)
    # bag of each index = number of bag starts at or before it, minus one (no searchsorted lowering)
    bag_of = (positions[:, None] >= offsets[None, :num_bags]).sum(dim=1) - 1
    rows = weight[indices]
    if per_sample_weights is not None:
        rows = rows * per_sample_weights[:, None]
    keep = torch.ones_like(indices, dtype=torch.bool)
    if padding_idx is not None and padding_idx >= 0:
        keep = indices != padding_idx
    # membership[b, i]: index i belongs to bag b (a matmul, not a scatter: TFLite has no general scatter)
    membership = (bag_of[None, :] == torch.arange(num_bags, device=indices.device)[:, None]) & keep[None, :]
    if mode == 2:
        masked = torch.where(membership[:, :, None], rows[None, :, :], torch.full_like(rows[None, :, :], -torch.inf))
        output = masked.amax(dim=1)
        output = torch.where(torch.isinf(output), torch.zeros_like(output), output)
    else:
        weights = membership.to(weight.dtype)
        output = weights @ rows
        if mode == 1:
            output = output / weights.sum(dim=1).clamp(min=1)[:, None]
    empty = torch.zeros(0, dtype=indices.dtype)
    return output, empty, empty, empty


def float_power(base: torch.Tensor, exponent: float) -> torch.Tensor:
    """`x ** p` for a scalar `p` as multiplies (small integral p) or exp(p * log x), for TFLite."""
    if float(exponent).is_integer() and abs(exponent) <= 8:
        if exponent == 0:
            return torch.ones_like(base)
        result = base
        for _ in range(int(abs(exponent)) - 1):
            result = result * base
        return result if exponent > 0 else 1.0 / result
    if exponent == 0.5:
        return torch.sqrt(base)
    # The TFLite legalizer rejects POW with a float exponent; exp/log keep x > 0 exact enough.
    return torch.exp(torch.log(base) * exponent)


def _aten() -> Any:
    return torch.ops.aten


def _embedding_bag_ops() -> dict[Any, Decomposition]:
    aten = _aten()
    ops = (
        aten.embedding_bag.default,
        aten.embedding_bag.padding_idx,
        aten._embedding_bag.default,
        aten._embedding_bag_forward_only.default,
    )
    return dict.fromkeys(ops, embedding_bag)


def stablehlo_table() -> dict[Any, Decomposition]:
    """Ops the StableHLO lowering of litert-torch lacks."""
    return _embedding_bag_ops()


def spatial_mean(x: torch.Tensor, dims: Any, keepdim: bool = False, dtype: Any = None) -> torch.Tensor:
    """A mean over H and W of an NCHW tensor as `avg_pool2d`, which TFLite keeps in NHWC with no transposes."""
    if not _is_spatial_mean(x.dim(), dims) or dtype is not None:
        return torch.ops.aten.mean.dim(x, dims, keepdim, dtype=dtype)
    pooled = torch.nn.functional.avg_pool2d(x, kernel_size=(x.shape[2], x.shape[3]))
    return pooled if keepdim else pooled.flatten(2).squeeze(2)


def global_average_pool(x: torch.Tensor, output_size: Any) -> torch.Tensor:
    """`adaptive_avg_pool2d(x, 1)` as `avg_pool2d` over the whole image (TFLite AVERAGE_POOL_2D, no transposes)."""
    if list(output_size) != [1, 1]:
        return torch.ops.aten._adaptive_avg_pool2d.default(x, output_size)
    return torch.nn.functional.avg_pool2d(x, kernel_size=(x.shape[-2], x.shape[-1]))


def _is_spatial_mean(rank: int, dims: Any) -> bool:
    return rank == 4 and dims is not None and sorted(d % 4 for d in dims) == [2, 3]


def tflite_table() -> dict[Any, Decomposition]:
    """Ops the TFLite converter lacks, fails to legalize, or lays out with transposes."""
    aten = _aten()
    return {
        **_embedding_bag_ops(),
        aten.pow.Tensor_Scalar: _scalar_power,
        aten.mean.dim: spatial_mean,
        aten.adaptive_avg_pool2d.default: global_average_pool,
    }


def _needs(node: torch.fx.Node, table: dict[Any, Decomposition]) -> bool:
    """Whether this call is one the table must rewrite (only float powers, only spatial means)."""
    if node.op != "call_function" or node.target not in table:
        return False
    if node.target is _aten().pow.Tensor_Scalar:
        return isinstance(node.args[1], (int, float))
    if node.target is _aten().mean.dim:
        value = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
        return value is not None and _is_spatial_mean(value.dim(), node.args[1])
    if node.target is _aten().adaptive_avg_pool2d.default:
        size = node.args[1]
        return isinstance(size, (list, tuple)) and list(size) == [1, 1]
    return True


def apply_decompositions(
    program: torch.export.ExportedProgram, table: dict[Any, Decomposition]
) -> tuple[torch.export.ExportedProgram, list[str]]:
    """The program with the table's decompositions applied where needed, and the names of the ops replaced."""
    present = sorted({str(n.target) for n in program.graph.nodes if _needs(n, table)})
    if not present:
        return program, []
    needed = {op: fn for op, fn in table.items() if str(op) in present}
    return program.run_decompositions(needed), present


def _scalar_power(base: torch.Tensor, exponent: Any) -> torch.Tensor:
    """`x ** p` for a Python scalar `p`, without TFLite's POW (which fails to legalize for many shapes)."""
    if isinstance(exponent, (int, float)) and base.is_floating_point():
        return float_power(base, float(exponent))
    return torch.ops.aten.pow.Tensor_Scalar(base, exponent)


def module_path_of(program: torch.export.ExportedProgram, op_name: str) -> str:
    """The PyTorch module (e.g. `encoder.layers.0.attn (Attention)`) where `op_name` first appears."""
    wanted = re.sub(r"^(?:aten|tfl|stablehlo|chlo)[.:]+", "", op_name).lstrip("_").split(".")[0]
    for node in program.graph.nodes:
        if node.op == "call_function" and wanted and wanted in str(node.target):
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path, cls = list(stack.values())[-1]
                class_name = getattr(cls, "__name__", str(cls)).rsplit(".", 1)[-1]
                return f"{path or '<root>'} ({class_name})"
    return "unknown module"


@dataclass(frozen=True)
class Legalization:
    """A rewrite of single FX nodes (not a decomposition: the op stays) that a converter needs to read the graph
    as PyTorch computes it. `needed(node)` says where; `rewrite(graph, node)` changes the graph in place."""

    what: str  # recorded after the op's name in `decompositions_applied`
    needed: Callable[[torch.fx.Node], bool]
    rewrite: Callable[[torch.fx.Graph, torch.fx.Node], None]


def _dense_but_permuted(value: Any) -> bool:
    """Whether a tensor is dense and non-overlapping in memory, yet not contiguous (a transposed view of a
    contiguous tensor); True when a size or stride is symbolic (a dynamic dimension). Nothing symbolic is
    compared or converted: that would add a guard fixing the dynamic dimension to the example's size."""
    sizes, strides = list(value.shape), list(value.stride())
    if any(isinstance(v, torch.SymInt) for v in [*sizes, *strides]):
        return True
    dims = [(int(n), int(s)) for n, s in zip(sizes, strides) if int(n) != 1]
    expected = 1
    for size, stride in reversed(dims):  # contiguous: each stride is the product of the sizes after it
        if stride != expected:
            break
        expected *= size
    else:
        return False
    expected = 1
    for stride, size in sorted((s, n) for n, s in dims):
        if stride != expected:
            return False
        expected *= size
    return True


def _attention_layout_can_differ(node: torch.fx.Node) -> bool:
    """SDPA allocates its output like its query (`empty_like`) when it traces the graph, but its math kernel,
    which runs it, returns a contiguous tensor. The two differ when the query is a dense transposed view (the
    usual `view(B, L, H, D).transpose(1, 2)` of a projection): then a `.contiguous()` or `.reshape()` after
    the heads' transpose back can be traced as a no-op or a `view`, which fails when the exporter runs the
    graph with the kernel's layout (T5's and Swin's attention: "Cannot view a tensor ... as a tensor ...")."""
    query = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    return query is not None and _dense_but_permuted(query)


def contiguous_output(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Follow `node` with `clone(memory_format=contiguous_format)`: the same values, in a layout that no
    longer depends on the kernel (an Identity in ONNX, which the exporter's optimizer removes)."""
    aten = _aten()
    with graph.inserting_after(node):
        pinned = graph.call_function(aten.clone.default, (node,), {"memory_format": torch.contiguous_format})
    node.replace_all_uses_with(pinned, delete_user_cb=lambda user: user is not pinned)
    pinned.meta = {k: v for k, v in node.meta.items() if k != "val"}
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        mode = getattr(value, "fake_mode", None)
        with mode if mode is not None else contextlib.nullcontext():
            pinned.meta["val"] = aten.clone.default(value, memory_format=torch.contiguous_format)


MAX_CONCAT_COPIES = 64


def _materialized_repeat(node: torch.fx.Node) -> bool:
    """An `expand` of size-1 dims to a few copies whose result is reshaped (transformers' `repeat_kv` for
    grouped-query attention: `k[:, :, None].expand(B, KV, R, L, D).reshape(B, KV * R, L, D)`). With one KV head
    the reshape stays a stride-0 view, and the LiteRT converter folds the transpose of `q @ k.T` into it as a
    RESHAPE: the scores come out wrong (cosine -0.12 on a 2-head toy, Llama's output 47.8 dB off)."""
    source = node.args[0]
    value = source.meta.get("val") if isinstance(source, torch.fx.Node) else None
    size = node.args[1]
    if value is None or not isinstance(size, (list, tuple)) or len(size) != value.dim():
        return False
    # a symbolic size is never compared: int() on it would add a guard fixing the dynamic dim to the example's
    copies = [n for have, n in zip(value.shape, size) if type(have) is int and have == 1 and type(n) is int and n > 1]
    reshaped = any(str(user.target) in ("aten.reshape.default", "aten.view.default") for user in node.users)
    return bool(copies) and math.prod(copies) <= MAX_CONCAT_COPIES and reshaped


def expand_as_concat(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Replace `expand` (of size-1 dims) by a `cat` of copies along each expanded dim: the same values,
    materialized."""
    aten = _aten()
    current = node.args[0]
    assert isinstance(current, torch.fx.Node) and isinstance(node.args[1], (list, tuple))
    value = current.meta["val"]
    for dim, want in enumerate(node.args[1]):
        if type(value.shape[dim]) is not int or value.shape[dim] != 1 or type(want) is not int or want <= 1:
            continue
        with graph.inserting_before(node):
            current = graph.call_function(aten.cat.default, ([current] * want, dim))
        current.meta = {k: v for k, v in node.meta.items() if k != "val"}
        mode = getattr(value, "fake_mode", None)
        with mode if mode is not None else contextlib.nullcontext():
            value = aten.cat.default([value] * want, dim)
        current.meta["val"] = value
    node.replace_all_uses_with(current)
    graph.erase_node(node)


def tflite_legalizations() -> dict[Any, Legalization]:
    """Node rewrites before the LiteRT converter: ONNX's, and repeats materialized as concatenations."""
    repeat = Legalization("repeat as concatenation", _materialized_repeat, expand_as_concat)
    return {**onnx_legalizations(), _aten().expand.default: repeat}


def onnx_legalizations() -> dict[Any, Legalization]:
    """Node rewrites before the dynamo ONNX exporter (and the LiteRT converter, which traces the same way)."""
    attention = Legalization("contiguous output", _attention_layout_can_differ, contiguous_output)
    return {_aten().scaled_dot_product_attention.default: attention}


def apply_legalizations(
    program: torch.export.ExportedProgram, table: dict[Any, Legalization]
) -> tuple[torch.export.ExportedProgram, list[str]]:
    """A copy of the program with the table's rewrites applied where needed (the program itself is shared by
    other targets, so it is not changed; the copy shares its weights), and their names (`op (what)`); the program
    itself when none is."""
    from kiln.compiler.large_graphs import snapshot

    needed = [n for n in program.graph.nodes if n.op == "call_function" and n.target in table]
    if not any(table[n.target].needed(n) for n in needed):
        return program, []
    program = snapshot(program)
    graph = program.graph_module.graph
    applied = set()
    for node in list(graph.nodes):
        rule = table.get(node.target) if node.op == "call_function" else None
        if rule is not None and rule.needed(node):
            rule.rewrite(graph, node)
            applied.add(f"{node.target} ({rule.what})")
    graph.lint()
    program.graph_module.recompile()
    return program, sorted(applied)
