"""Reduced-precision versions of a captured program: fp16 or bf16 compute, float32 inputs and outputs kept."""

from __future__ import annotations

import copy
import inspect
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kiln.compiler.capture.dynamic import DynamicShapes

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def reduced_precision_program(
    program: torch.export.ExportedProgram,
    precision: str,
    input_names: list[str],
    dynamic: DynamicShapes | None,
) -> torch.export.ExportedProgram:
    """The program re-exported to compute in `precision` (fp16/bf16): float weights, buffers and the float32
    dtypes baked into the graph (casts, tensor factories) become that dtype; float inputs are cast on entry and
    float outputs back to float32, so the signature (names, dtypes, dynamic dims) is the captured one.

    The captured program and its weights are left untouched (the module is deep-copied first).
    """
    dtype = TORCH_DTYPES[precision]
    inner = copy.deepcopy(program.module()).to(dtype)

    def swap(value: Any) -> Any:
        return dtype if value is torch.float32 else value

    for node in inner.graph.nodes:
        if node.op == "call_function":
            node.args = torch.utils._pytree.tree_map(swap, node.args)
            node.kwargs = torch.utils._pytree.tree_map(swap, node.kwargs)
    inner.recompile()

    class ReducedPrecision(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: torch.Tensor) -> Any:
            cast = [a.to(dtype) if a.is_floating_point() else a for a in args]
            return torch.utils._pytree.tree_map(
                lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, self.inner(*cast)
            )

    # torch.export names the program's inputs after forward's parameters: keep the captured names.
    parameters = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ["self", *input_names]]
    ReducedPrecision.forward.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    args, _ = program.example_inputs
    dynamic_shapes = dynamic.torch_shapes(input_names) if dynamic is not None else None
    return torch.export.export(ReducedPrecision(), tuple(args), dynamic_shapes=dynamic_shapes, strict=False)
