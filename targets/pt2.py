"""`pt2`: the `torch.export` program itself, saved with `torch.export.save`.

The portable PyTorch artifact: loadable with `torch.export.load` on any machine with the
same torch, and the input of AOTInductor and ExecuTorch. Validated by running the
reloaded program, read back with `kiln.compiler.capture.pt2_archive.load_program` (no pickled code runs
unless trusted).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kiln.targets.base import BuildOutput, BuildRequest, Runner, Target

if TYPE_CHECKING:
    import numpy as np
    import torch
    from kiln.compiler.capture.program import CapturedModel
    from kiln.compiler.types import Manifest, TensorSpec

MODEL_FILE = "model.pt2"


class ExportedProgramRunner(Runner):
    """Runs a reloaded `torch.export` program."""

    thread_control = "torch.set_num_threads"

    def __init__(self, directory: Path, manifest: Manifest, trust_pickle: bool | None = None):
        """`trust_pickle`: run the archive's pickles (None: as the enclosing `trusting_pickles` block says)."""
        from kiln.compiler.capture.pt2_archive import load_program

        self.module = load_program(directory / MODEL_FILE, trust_pickle).module()
        self.inputs, self.outputs = manifest.inputs, manifest.outputs

    @classmethod
    def in_memory(
        cls, program: torch.export.ExportedProgram, inputs: list[TensorSpec], outputs: list[TensorSpec]
    ) -> ExportedProgramRunner:
        """A runner on a program not saved (e.g. the fp32 reference of another target's --max-drop search)."""
        runner = cls.__new__(cls)
        runner.module, runner.inputs, runner.outputs = program.module(), inputs, outputs
        return runner

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name."""
        import numpy as np
        import torch

        with torch.no_grad():
            result = self.module(*[torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in self.inputs])
        leaves = torch.utils._pytree.tree_leaves(result)
        return {spec.name: leaf.detach().numpy() for spec, leaf in zip(self.outputs, leaves)}

    def runtime_info(self) -> dict[str, Any]:
        """The torch version and its thread count."""
        import torch

        return {
            "runtime": f"torch {torch.__version__}",
            "threads": torch.get_num_threads(),
            "inference_precision": "fp32",
        }


class ExportedProgramTarget(Target):
    """The captured FX program as a `.pt2` file."""

    name = "pt2"
    aliases = ("torch-export", "exported-program")
    description = "torch.export program (.pt2), validated by reloading it with torch.export.load"
    requires: ClassVar[dict[str, str]] = {"torch": "torch"}
    precisions = ("fp32",)
    consumes = "torch"

    def build(self, model: CapturedModel, directory: Path, request: BuildRequest) -> BuildOutput:
        """Save the exported program."""
        import torch

        assert model.exported is not None, "a torch target needs the FX program"
        torch.export.save(model.exported, str(directory / MODEL_FILE))
        return BuildOutput()

    def load(self, directory: Path, manifest: Manifest, threads: int | None = None) -> Runner:
        """The reloaded program (`threads` sets torch's process-wide thread count)."""
        if threads:
            import torch

            torch.set_num_threads(threads)
        return ExportedProgramRunner(directory, manifest)
