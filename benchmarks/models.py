"""Benchmark-sized models defined here (random weights, nothing downloaded): a ResNet-18 and a small
BERT-like encoder, larger than the zoo's so that kernels, not per-call overhead, dominate the timings."""

from __future__ import annotations

import torch
from torch import nn

from compiler.zoo import randomize_batchnorm


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


class BertLike(nn.Module):
    """A 4-layer, 256-wide transformer encoder over token ids (sequence 128), with a pooled classifier."""

    def __init__(self, vocab: int = 8000, width: int = 256, layers: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(1, 128, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(tokens) + self.position[:, : tokens.shape[1]])
        return self.head(hidden[:, 0])


def bert_like() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The BERT-like encoder with random weights and a 1x128 token-id input."""
    torch.manual_seed(0)
    return BertLike().eval(), (torch.randint(0, 8000, (1, 128)),)


MODELS = {"resnet18": resnet18, "bert": bert_like}
