"""Built-in small models: the embedded default for `make demo`, tests and benchmarks.

Each entry is a factory returning ``(module, example_inputs)``. The models are tiny
but architecturally real: they exercise BatchNorm, residuals, depthwise convolution,
squeeze-excite, attention with a padding mask, integer token inputs and recurrence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNBlock(nn.Module):
    """Conv -> BatchNorm -> ReLU, with an optional residual connection."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 1, residual: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels_out)
        self.residual = residual and channels_in == channels_out and stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.residual:
            y = y + x
        return F.relu(y)


class SmallCNN(nn.Module):
    """A ResNet-flavoured image classifier: Conv+BN+ReLU stages with residuals."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = ConvBNBlock(3, width, stride=2)
        self.stage1 = ConvBNBlock(width, width, residual=True)
        self.down = ConvBNBlock(width, 2 * width, stride=2)
        self.stage2 = ConvBNBlock(2 * width, 2 * width, residual=True)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(image))))
        return self.head(x.mean(dim=(2, 3)))


class SqueezeExcite(nn.Module):
    """Channel attention: global pool -> bottleneck -> sigmoid gate."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels // reduction, 1)
        self.expand = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.adaptive_avg_pool2d(x, 1)
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(gate))))
        return x * gate


class InvertedResidual(nn.Module):
    """MobileNetV3-style block: expand 1x1, depthwise 3x3, squeeze-excite, project 1x1."""

    def __init__(self, channels: int, expansion: int = 4):
        super().__init__()
        hidden = channels * expansion
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish()
        )
        self.se = SqueezeExcite(hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.depthwise(self.expand(x))))


class MobileNetSE(nn.Module):
    """A tiny MobileNetV3-like classifier with depthwise convolutions and SE gates."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.Hardswish()
        )
        self.blocks = nn.Sequential(InvertedResidual(width), InvertedResidual(width))
        self.head = nn.Linear(width, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(image))
        return self.head(x.mean(dim=(2, 3)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer with multi-head attention and a padding mask."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(batch, seq, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, seq, dim))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """A BERT-like encoder classifier taking token ids and an attention mask (1 = keep)."""

    def __init__(
        self, vocab: int = 100, dim: int = 32, heads: int = 4, layers: int = 2, max_len: int = 64, num_classes: int = 4
    ):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tokens(input_ids) + self.positions(positions)[None]
        keep = attention_mask.bool()
        for layer in self.layers:
            x = layer(x, keep)
        x = self.norm(x)
        weights = attention_mask.to(x.dtype)[..., None]
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.classifier(pooled)


class LSTMTagger(nn.Module):
    """A 2-layer LSTM over feature frames, returning per-step tags and the final hidden state."""

    def __init__(self, features: int = 8, hidden: int = 16, num_tags: int = 5):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.tagger = nn.Linear(hidden, num_tags)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sequence, (hidden, _) = self.lstm(frames)
        return self.tagger(sequence), hidden[-1]


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomize_batchnorm(module: nn.Module, seed: int) -> None:
    """Give BatchNorm layers non-trivial statistics so that folding them is actually tested."""
    generator = _seeded(seed)
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            n = layer.num_features
            layer.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            layer.running_var.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
            layer.weight.data.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
            layer.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


def cnn() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Small residual CNN with BatchNorm, 1x3x32x32 images."""
    torch.manual_seed(0)
    model = SmallCNN()
    _randomize_batchnorm(model, 1)
    return model.eval(), (torch.randn(1, 3, 32, 32, generator=_seeded(2)),)


def mobilenet() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """MobileNetV3-style depthwise + squeeze-excite CNN, 1x3x32x32 images."""
    torch.manual_seed(0)
    model = MobileNetSE()
    _randomize_batchnorm(model, 1)
    return model.eval(), (torch.randn(1, 3, 32, 32, generator=_seeded(2)),)


def transformer() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """2-layer transformer encoder with token ids and a padding attention mask, sequence 16."""
    torch.manual_seed(0)
    model = TinyTransformer()
    input_ids = torch.randint(0, 100, (2, 16), generator=_seeded(2))
    attention_mask = torch.ones(2, 16, dtype=torch.int64)
    attention_mask[1, 11:] = 0
    return model.eval(), (input_ids, attention_mask)


def lstm() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """2-layer LSTM tagger over 1x12x8 feature frames, two outputs."""
    torch.manual_seed(0)
    return LSTMTagger().eval(), (torch.randn(1, 12, 8, generator=_seeded(2)),)


ZOO: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "cnn": cnn,
    "mobilenet": mobilenet,
    "transformer": transformer,
    "lstm": lstm,
}
