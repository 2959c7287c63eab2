"""Built-in small models: the embedded default for `make demo`, tests and benchmarks.

Each entry is a factory returning ``(module, example_inputs)``. The models are tiny
but architecturally real: they exercise BatchNorm, residuals, depthwise convolution,
squeeze-excite, attention with a padding mask, causal attention, integer token inputs,
LSTM and GRU recurrence, transposed convolution and upsampling, a YOLO-style box decode,
and several inputs and named outputs.
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
    """A small MobileNetV3-like classifier: depthwise blocks with SE gates, and V3-small's wide head."""

    def __init__(self, num_classes: int = 10, width: int = 16, head_channels: int = 576, head_hidden: int = 1024):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.Hardswish()
        )
        self.blocks = nn.Sequential(InvertedResidual(width), InvertedResidual(width))
        self.last = nn.Sequential(nn.Conv2d(width, head_channels, 1), nn.Hardswish())
        self.head = nn.Sequential(
            nn.Linear(head_channels, head_hidden), nn.Hardswish(), nn.Linear(head_hidden, num_classes)
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.last(self.blocks(self.stem(image)))
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


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier positions."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, seq, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(attn.transpose(1, 2).reshape(batch, seq, dim))


class DecoderBlock(nn.Module):
    """GPT-style pre-norm block: causal attention then an MLP, each with a residual."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyDecoderLM(nn.Module):
    """A GPT-like decoder language model: token ids in, next-token logits at every position out."""

    def __init__(self, vocab: int = 96, dim: int = 32, heads: int = 4, layers: int = 2, max_len: int = 64):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(DecoderBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tokens(input_ids) + self.positions(positions)[None]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


class UNetDown(nn.Module):
    """Two Conv+BN+ReLU layers."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(),
            nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TinyUNet(nn.Module):
    """A 2-level UNet for segmentation: max-pool down, transposed-conv and bilinear upsampling, skip concats."""

    def __init__(self, channels: int = 3, classes: int = 4, width: int = 8):
        super().__init__()
        self.enc1 = UNetDown(channels, width)
        self.enc2 = UNetDown(width, 2 * width)
        self.bottleneck = UNetDown(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec2 = UNetDown(4 * width, 2 * width)
        self.reduce1 = nn.Conv2d(2 * width, width, 1)
        self.dec1 = UNetDown(2 * width, width)
        self.classifier = nn.Conv2d(width, classes, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        skip1 = self.enc1(image)
        skip2 = self.enc2(F.max_pool2d(skip1, 2))
        x = self.bottleneck(F.max_pool2d(skip2, 2))
        x = self.dec2(torch.cat([self.up2(x), skip2], dim=1))
        x = F.interpolate(self.reduce1(x), scale_factor=2.0, mode="bilinear", align_corners=False)
        x = self.dec1(torch.cat([x, skip1], dim=1))
        return self.classifier(x)


class TinyDetector(nn.Module):
    """A YOLO-style single-scale detector: a strided CNN, a prediction conv and the box decode in the graph.

    Returns boxes as (cx, cy, w, h) in pixels and per-class scores (objectness x class probability)
    for every anchor of every grid cell.
    """

    def __init__(self, classes: int = 3, width: int = 16, image_size: int = 32):
        super().__init__()
        self.classes = classes
        self.backbone = nn.Sequential(
            ConvBNBlock(3, width, stride=2),
            ConvBNBlock(width, width, residual=True),
            ConvBNBlock(width, width, stride=2),
        )
        anchors = torch.tensor([[4.0, 6.0], [8.0, 8.0], [12.0, 10.0]])
        self.predict = nn.Conv2d(width, len(anchors) * (5 + classes), 1)
        grid = image_size // 4
        self.stride = float(image_size // grid)
        ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        self.register_buffer("grid_xy", torch.stack([xs, ys], dim=-1).float().reshape(1, 1, grid, grid, 2))
        self.register_buffer("anchors", anchors.reshape(1, len(anchors), 1, 1, 2))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.predict(self.backbone(image))
        batch, _, height, width = raw.shape
        grid_xy, anchor_sizes = self.get_buffer("grid_xy"), self.get_buffer("anchors")
        anchors = anchor_sizes.shape[1]
        raw = raw.reshape(batch, anchors, 5 + self.classes, height, width).permute(0, 1, 3, 4, 2)
        t = torch.sigmoid(raw)
        xy = (t[..., 0:2] * 2.0 - 0.5 + grid_xy) * self.stride
        wh = (t[..., 2:4] * 2.0) ** 2.0 * anchor_sizes  # the float-exponent power of YOLOv5's decode
        boxes = torch.cat([xy, wh], dim=-1).reshape(batch, -1, 4)
        scores = (t[..., 4:5] * t[..., 5:]).reshape(batch, -1, self.classes)
        return boxes, scores


class MultiModal(nn.Module):
    """Two inputs (an image and a sequence of sensor frames through a GRU), a dict of three outputs."""

    def __init__(self, features: int = 6, hidden: int = 16, classes: int = 5):
        super().__init__()
        self.vision = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.fuse = nn.Linear(8 + hidden, hidden)
        self.classify = nn.Linear(hidden, classes)
        self.regress = nn.Linear(hidden, 2)

    def forward(self, image: torch.Tensor, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        seen = self.vision(image).flatten(1)
        _, hidden = self.gru(frames)
        embedding = torch.tanh(self.fuse(torch.cat([seen, hidden[-1]], dim=1)))
        logits = self.classify(embedding)
        return {"logits": logits, "position": self.regress(embedding), "embedding": embedding}


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomize_batchnorm(module: nn.Module, seed: int) -> None:
    """Give BatchNorm layers non-trivial statistics so that folding them is actually tested."""
    generator = _seeded(seed)
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            n = layer.num_features
            layer.get_buffer("running_mean").copy_(torch.randn(n, generator=generator) * 0.1)
            layer.get_buffer("running_var").copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
            layer.weight.data.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
            layer.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


def cnn() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Small residual CNN with BatchNorm, 1x3x32x32 images."""
    torch.manual_seed(0)
    model = SmallCNN(width=48)
    randomize_batchnorm(model, 1)
    return model.eval(), (torch.randn(1, 3, 32, 32, generator=_seeded(2)),)


def mobilenet() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """MobileNetV3-style depthwise + squeeze-excite CNN, 1x3x32x32 images."""
    torch.manual_seed(0)
    model = MobileNetSE(width=48)
    randomize_batchnorm(model, 1)
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


def decoder() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """2-layer GPT-style decoder LM with causal attention over 2x16 token ids, logits at every position."""
    torch.manual_seed(0)
    return TinyDecoderLM().eval(), (torch.randint(0, 96, (2, 16), generator=_seeded(2)),)


def unet() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """2-level UNet with BatchNorm, transposed convolution and bilinear upsampling, 1x3x32x32 to 1x4x32x32."""
    torch.manual_seed(0)
    model = TinyUNet()
    randomize_batchnorm(model, 1)
    return model.eval(), (torch.randn(1, 3, 32, 32, generator=_seeded(2)),)


def detector() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """YOLO-style detector with the box decode in the graph, 1x3x32x32 to 192 boxes and class scores."""
    torch.manual_seed(0)
    model = TinyDetector()
    randomize_batchnorm(model, 1)
    return model.eval(), (torch.randn(1, 3, 32, 32, generator=_seeded(2)),)


def multimodal() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Image (2x3x16x16) + GRU over sensor frames (2x10x6) to a dict of logits, position and embedding."""
    torch.manual_seed(0)
    model = MultiModal()
    randomize_batchnorm(model, 1)
    generator = _seeded(2)
    return model.eval(), (torch.randn(2, 3, 16, 16, generator=generator), torch.randn(2, 10, 6, generator=generator))


ZOO: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "cnn": cnn,
    "mobilenet": mobilenet,
    "transformer": transformer,
    "lstm": lstm,
    "decoder": decoder,
    "unet": unet,
    "detector": detector,
    "multimodal": multimodal,
}
