"""A small CNN with one layer that int8 ruins: `features.2` has a huge weight on an input channel that is always 0."""

from __future__ import annotations

import torch
from torch import nn

FRAGILE_MODULE = "features.2"


class FragileCNN(nn.Module):
    """Three convolutions and a linear head; the middle convolution cannot be quantized to int8.

    Channel 0 of the first convolution's output is dead (zero weights, negative bias, then ReLU), and the
    second convolution weighs that channel by 200: fp32 is unaffected (200 * 0), but an int8 weight scale
    of 200/127 rounds every other weight of that convolution to zero.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(16 * 8 * 8, 10)
        with torch.no_grad():
            self.features[0].weight[0] = 0.0
            self.features[0].bias[0] = -1.0
            self.features[2].weight[:, 0, 1, 1] = 200.0

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image).flatten(1))


def fragile_cnn(batch: int = 4) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The model (eval mode) and example inputs of [batch, 3, 8, 8]."""
    return FragileCNN().eval(), (torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)
