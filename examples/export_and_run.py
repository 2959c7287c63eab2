#!/usr/bin/env python3
"""Library use of Kiln: export a PyTorch model to OpenVINO IR, then load the artifact and run it.

    python examples/export_and_run.py [OUT_DIR]

Without OUT_DIR the export goes to a temporary directory that is removed at the end.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from kiln import export, load
from torch import nn


class Classifier(nn.Module):
    """A small MLP over 20 features with 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 3))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.body(features)


def main(out: Path) -> int:
    logging.getLogger("torch").setLevel(logging.ERROR)  # torch.onnx warns about things Kiln does not use
    torch.manual_seed(0)
    model = Classifier().eval()
    example = torch.randn(4, 20)

    # Capture, build OpenVINO IR and check it against PyTorch on several input sets (raises ParityError if
    # the artifact does not match). force=True replaces an earlier export in the same directory.
    result = export(model, (example,), target="openvino", out=out, force=True)
    print(f"exported to {result.directory}: {', '.join(f.path for f in result.manifest.files)}")
    assert result.parity is not None
    print(result.parity.summary())

    # Load the artifact and run it on a new input (numpy arrays or torch tensors, by position or by name).
    runner = load(result.directory)
    print("inputs:", ", ".join(spec.describe() for spec in runner.inputs))
    x = torch.randn(4, 20)
    outputs = runner(x)  # name -> numpy array
    (name,) = outputs
    with torch.no_grad():
        expected = model(x).numpy()
    error = float(np.max(np.abs(outputs[name] - expected)))
    print(f"OpenVINO output '{name}' {outputs[name].shape}, max |openvino - torch| = {error:.2e}")
    return 0 if error < 1e-4 else 1


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(main(Path(sys.argv[1])))
    with tempfile.TemporaryDirectory(prefix="kiln-example-") as tmp:
        sys.exit(main(Path(tmp) / "classifier"))
