"""Benchmark-sized models (random weights, nothing downloaded): a ResNet-18, a 4-layer BERT-like encoder, and the
zoo's MobileNet and UNet on larger images, so that kernels, not per-call overhead, dominate the timings."""

from __future__ import annotations

import torch
from kiln.compiler.capture.zoo import randomize_batchnorm
from torch import nn


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with a residual connection."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (torchvision's layout: 1.8 GFLOP multiply-adds at 224x224), 1000 classes."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        widths, layers, channels = (64, 128, 256, 512), [], 64
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            layers += [BasicBlock(channels, width, stride), BasicBlock(width, width, 1)]
            channels = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def resnet18() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """ResNet-18 with random weights and a 1x3x224x224 input."""
    torch.manual_seed(0)
    model = ResNet18()
    randomize_batchnorm(model, 0)
    return model.eval(), (torch.randn(1, 3, 224, 224),)


def bert4() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A 4-layer BERT-like encoder (dim 256, 4 heads) on 2x128 tokens with padding, random weights."""
    from kiln.compiler.capture.zoo import TinyTransformer

    torch.manual_seed(0)
    model = TinyTransformer(vocab=1000, dim=256, heads=4, layers=4, max_len=128)
    input_ids = torch.randint(0, 1000, (2, 128), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones(2, 128, dtype=torch.int64)
    attention_mask[1, 100:] = 0
    return model.eval(), (input_ids, attention_mask)


def mobilenet224() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The zoo's MobileNetV3-style classifier (depthwise + squeeze-excite) on a 1x3x224x224 image."""
    from kiln.compiler.capture.zoo import ZOO

    model, _ = ZOO["mobilenet"]()
    return model, (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3)),)


def unet128() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The zoo's 2-level UNet (transposed conv, bilinear upsampling, skip concats) on a 1x3x128x128 image."""
    from kiln.compiler.capture.zoo import ZOO

    model, _ = ZOO["unet"]()
    return model, (torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(4)),)


MODELS = {"resnet18": resnet18, "bert4": bert4, "mobilenet224": mobilenet224, "unet128": unet128}
