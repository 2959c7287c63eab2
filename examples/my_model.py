"""A model factory for the Kiln command line: a tiny CNN with a classifier head and an embedding head.

Export it from the repository root with::

    python cli.py export examples/my_model.py:build --target onnx --out exports/my_model

or to several targets at once (`--target onnx,openvino,pt2`, or `--target all`). Kiln imports this file,
calls `build()`, which returns `(module, example_inputs)`, captures the module on those inputs and checks
every artifact against it. The two outputs of the dict `forward` returns become the artifact's outputs
`logits` and `embedding`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    """Two conv blocks, global average pooling, then a classifier and a normalized embedding."""

    def __init__(self, num_classes: int = 5, embedding: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(16, num_classes)
        self.project = nn.Linear(16, embedding)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.features(image).mean(dim=(2, 3))
        return {"logits": self.classifier(pooled), "embedding": F.normalize(self.project(pooled), dim=-1)}


def build() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model in eval mode and one example input batch (1 RGB image, 32x32)."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    return model, (torch.randn(1, 3, 32, 32),)
