"""Models for the timing tests of `kiln tune` (tests/test_tune_confirm.py): one where int8 is clearly faster
than fp32 (wide 3x3 convolutions, where int8 kernels do several times the work per instruction), and one whose two
candidates are equally fast (the same graph under two equivalent runtime settings)."""

from __future__ import annotations

import torch
from torch import nn


def wide_cnn() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Three 64-channel 3x3 convolutions on a 1x3x48x48 image (about 0.25 GMAC), pooled to 10 classes."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, padding=1), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    return model.eval(), (torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(1)),)


def mlp() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Two 512-wide linear layers on a 16x512 batch: nothing for ONNX Runtime's extended graph optimizations to
    change, so its `basic` and default (`all`) levels run the same graph, equally fast."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
    return model.eval(), (torch.randn(16, 512, generator=torch.Generator().manual_seed(1)),)
