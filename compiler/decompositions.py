"""Decompositions Kiln applies on the FX graph for ops a converter lacks, and where an op came from.

Each converter gets the table it needs (`STABLEHLO`, `TFLITE`); the names of the ops replaced
go into the report, so a user can see what was rewritten.
"""

from __future__ import annotations

import re
from collections.abc import Callable
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
