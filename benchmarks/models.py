"""Benchmark-sized models (random weights, nothing downloaded), larger than the zoo's so that kernels, not per-call
overhead, dominate the timings: a ResNet-18 and a 4-layer BERT-like encoder (Kiln's own code), the zoo's MobileNet
and UNet on larger images, and for `benchmarks/tune_repeat.py` a MobileNetV2 (torchvision's layout) and a
BERT-mini and a ViT-tiny from `transformers` configs."""

from __future__ import annotations

from typing import Any

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


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 project (linear), residual when the shape allows."""

    def __init__(self, channels_in: int, channels_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = channels_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(channels_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        depthwise = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        project = nn.Conv2d(hidden, channels_out, 1, bias=False)
        layers += [depthwise, nn.BatchNorm2d(hidden), nn.ReLU6(), project, nn.BatchNorm2d(channels_out)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and channels_in == channels_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (torchvision's layout: t, c, n, s per stage), width 1.0, 1000 classes."""

    STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1))  # fmt: skip

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
        channels = 32
        for expand, width, repeats, stride in self.STAGES:
            for index in range(repeats):
                layers.append(InvertedResidual(channels, width, stride if index == 0 else 1, expand))
                channels = width
        layers += [nn.Conv2d(channels, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def mobilenet_v2() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """MobileNetV2 with random weights and a 1x3x224x224 input (0.3 GMAC)."""
    torch.manual_seed(0)
    model = MobileNetV2()
    randomize_batchnorm(model, 0)
    return model.eval(), (torch.randn(1, 3, 224, 224),)


class LastHidden(nn.Module):
    """A `transformers` model with its output object reduced to its last hidden state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> torch.Tensor:
        return self.model(*args).last_hidden_state


def bert_mini() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """BERT-mini from a `transformers` config (4 layers, hidden 256, 4 heads), random weights, on 1x128 tokens with
    an attention mask (the last 28 padding)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    input_ids = torch.randint(0, config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones(1, 128, dtype=torch.int64)
    attention_mask[0, 100:] = 0
    return LastHidden(BertModel(config)).eval(), (input_ids, attention_mask)


def vit_tiny() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """ViT-tiny from a `transformers` config (12 layers, hidden 192, 3 heads, 16x16 patches), random weights, on a
    1x3x224x224 image."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768)
    return LastHidden(ViTModel(config, add_pooling_layer=False)).eval(), (torch.randn(1, 3, 224, 224),)


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


MODELS = {"resnet18": resnet18, "bert4": bert4, "mobilenet224": mobilenet224, "unet128": unet128,
          "mobilenet_v2": mobilenet_v2, "bert_mini": bert_mini, "vit_tiny": vit_tiny}  # fmt: skip
