"""Models whose output (or an inner tensor) has channels of very different scales, for the per-channel parity gate
(issue 23, point 6; tests/test_channel_gate.py). The whole-tensor cosine and SNR of such a tensor are those of its
big channel: an int8 artifact whose small channels are lost still scores 0.9999 there."""

from __future__ import annotations

import torch
from torch import nn

CLASSES = 12
IMAGE_SIZE = 640.0  # the box coordinates' scale: pixels of a 640x640 image


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """`model` in eval mode with fixed weights (normal, std 0.3; the same every call)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def _image(seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


class Backbone(nn.Module):
    """Two strided convs with SiLU: 3 x S x S to `width` x S/4 x S/4."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.act(self.conv1(x))))


def _outlier(conv: nn.Conv2d, channel: int = 0, factor: float = 1000.0) -> nn.Conv2d:
    """`conv` with output channel `channel`'s weights and bias scaled by `factor`."""
    with torch.no_grad():
        conv.weight[channel] *= factor
        if conv.bias is not None:
            conv.bias[channel] *= factor
    return conv


class OutlierOutput(nn.Module):
    """A conv net whose output's channel 0 is about 1000x its 15 others: [1, 16, 8, 8] (`head` holds it)."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.backbone = Backbone(channels)
        self.head = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class OutlierLogits(nn.Module):
    """A classifier-shaped [4, 16] output whose channel 0 is about 1000x its 15 others (`head` holds it): its argmax is
    always channel 0, so top-1 agrees whatever the others are."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.backbone = Backbone(channels)
        self.head = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).mean((2, 3)))


class YoloHead(nn.Module):
    """A YOLOv8-style head: boxes `sigmoid(...) * 640` (4 channels, pixels) concatenated with CLASSES class scores
    `sigmoid(...)` (in [0, 1]) along axis 1, flattened to [1, 4 + CLASSES, anchors]."""

    def __init__(self, width: int = 16, classes: int = CLASSES):
        super().__init__()
        self.backbone = Backbone(width)
        self.box = nn.Conv2d(width, 4, 1)
        self.cls = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        boxes = torch.sigmoid(self.box(features)) * IMAGE_SIZE
        scores = torch.sigmoid(self.cls(features))
        return torch.cat([boxes, scores], dim=1).flatten(2)


class MidOutlier(nn.Module):
    """The outlier channel inside the network: `mid`'s channel 0 is about 1000x its others, `dec` mixes the
    channels again (two 1x1 convs), `head` classifies. In int8 the first tensor that is wrong is `mid`'s output
    (its 15 small channels lost to a range set by the big one), though its whole-tensor cosine is that of channel
    0; localization must name `mid`, not a module after it."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.backbone = Backbone(channels)
        self.mid = nn.Conv2d(channels, channels, 1)
        self.dec = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 1))
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dec(self.mid(self.backbone(x))).mean((2, 3)))


def outlier_output() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """`kiln export tests/models/scaled.py:outlier_output --precision int8`: one output channel 1000x the others."""
    model = _seeded(OutlierOutput())
    _outlier(model.head)
    return model, (_image(),)


def outlier_logits() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """`kiln export tests/models/scaled.py:outlier_logits --precision int8`: [4, 16] logits, channel 0 1000x."""
    model = _seeded(OutlierLogits())
    with torch.no_grad():
        model.head.weight[0] *= 1000.0
        model.head.bias[0] = 2000.0  # far from 0 on every row: its cosine is 0.9999 per row
    return model, (torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)


def yolo_head() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """`kiln export tests/models/scaled.py:yolo_head --precision int8`: boxes in pixels concatenated with class
    scores, [1, 16, 64]."""
    return _seeded(YoloHead()), (_image(),)


def mid_outlier() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """`kiln export tests/models/scaled.py:mid_outlier --precision int8 --localize`: the outlier channel in `mid`."""
    model = _seeded(MidOutlier())
    _outlier(model.mid)
    return model, (_image(),)
