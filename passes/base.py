"""What a pass is: a small named unit over one IR that returns the new graph and whether it changed.

Two IRs are optimized:
- `onnx`: an `onnx_ir.Model` (the lowered graph that ONNX Runtime, OpenVINO and TensorRT consume);
- `fx`: a `torch.export.ExportedProgram` (what pt2, tpu, tflite, edgetpu and aoti consume).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ONNX = "onnx"
FX = "fx"

# Optimization levels: the lowest `-O` level at which a pass runs.
CLEANUP = 1  # -O1: remove what computes nothing (identities, dead nodes, duplicates)
FUSION = 2  # -O2: fuse patterns into fewer, larger ops the backends have kernels for
TARGET_SPECIFIC = 3  # -O3: rewrites that pay off on some targets only
DEFAULT_LEVEL = FUSION
LEVELS = {0: "none", CLEANUP: "cleanup", FUSION: "fusion", TARGET_SPECIFIC: "target-specific"}

# What a pass may promise to keep (its `preserves`):
OUTPUTS = "outputs"  # every output equal to fp32 round-off
SIGNATURE = "signature"  # input and output names, shapes, dtypes and layout
MODULE_NAMES = "module-names"  # each node's PyTorch module path (ONNX metadata / FX nn_module_stack)


@dataclass(frozen=True)
class PassResult:
    """A pass's output: the graph (maybe the same object, changed in place) and whether it changed."""

    graph: Any
    changed: bool


@dataclass(frozen=True)
class Pass:
    """A named graph transformation over one IR.

    `run` takes the graph (an `onnx_ir.Model` or an `ExportedProgram`) and returns a PassResult.
    `needs` names passes that must run before this one; `targets` limits a pass to some targets
    (empty: every target of its IR).
    """

    name: str
    description: str
    ir: str
    level: int
    run: Callable[[Any], PassResult]
    needs: tuple[str, ...] = ()
    preserves: tuple[str, ...] = (OUTPUTS, SIGNATURE, MODULE_NAMES)
    targets: tuple[str, ...] = ()

    def __call__(self, graph: Any) -> tuple[Any, bool]:
        """Run the pass: the new graph and whether it changed."""
        result = self.run(graph)
        return result.graph, bool(result.changed)

    def applies_to(self, target: str) -> bool:
        """Whether this pass is meant for `target` (an IR-wide pass is meant for all)."""
        return not self.targets or target in self.targets


def onnx_ir_pass(factory: Callable[[], Callable[[Any], Any]]) -> Callable[[Any], PassResult]:
    """Adapt an `onnx_ir.passes` pass (made by `factory`, imported lazily) to `Pass.run`."""

    def run(model: Any) -> PassResult:
        result = factory()(model)
        return PassResult(result.model, bool(result.modified))

    return run
