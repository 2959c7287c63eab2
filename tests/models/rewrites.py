"""Small models that need each of Kiln's graph rewrites before a converter (compiler/capture/decompositions.py): a float
power, a spatial mean and a global average pool (TFLite decompositions). The rewrites' other users come from
tests/models (EmbeddingBag, grouped-query attention, T5's attention) and the zoo (NHWC I/O)."""

from __future__ import annotations

import torch
from torch import nn


class Power(nn.Module):
    """A float power of a positive tensor (TFLite's POW fails to legalize: Kiln decomposes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(x)) ** 2.5


class SpatialMean(nn.Module):
    """A convolution, then the mean over H and W (Kiln writes it as an average pool)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean((2, 3))


class GlobalPool(nn.Module):
    """A convolution, then a global adaptive average pool (Kiln writes it as an average pool)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x)).flatten(1)


def power() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return Power().eval(), (torch.randn(2, 8),)


def spatial_mean() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return SpatialMean().eval(), (torch.randn(1, 3, 8, 8),)


def global_pool() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return GlobalPool().eval(), (torch.randn(1, 3, 8, 8),)
