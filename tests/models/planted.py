"""Models with a divergence planted at a known module, for the localization tests (tests/test_divergence.py)."""

from __future__ import annotations

import torch
from torch import nn


class Scale(nn.Module):
    """Multiplies its input by a constant factor."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class Block(nn.Module):
    """Conv + ReLU with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x)) + x


class Overflow(nn.Module):
    """fp32-finite, fp16-infinite: `up` scales activations past 65504, `down` scales them back."""

    def __init__(self, depth: int = 6, channels: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(*[Block(channels) for _ in range(depth)])
        self.up = Scale(1e6)
        self.mid = Block(channels)
        self.down = Scale(1e-6)
        self.tail = nn.Sequential(*[Block(channels) for _ in range(2)])
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.mid(self.up(self.body(self.stem(x)))))
        return self.head(self.tail(x).mean((2, 3)))


class Plain(nn.Module):
    """A stack of blocks with nothing wrong in it (no BatchNorm, so every conv keeps its weight's name)."""

    def __init__(self, depth: int = 8, channels: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(*[Block(channels) for _ in range(depth)])
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def build(model: nn.Module) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model in eval mode with fixed weights, and an example input."""
    torch.manual_seed(0)
    for parameter in model.parameters():
        nn.init.normal_(parameter, std=0.2)
    return model.eval(), (torch.randn(2, 3, 16, 16),)


def overflow() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """`kiln export tests/models/planted.py:overflow --precision fp16`: diverges at `up`."""
    return build(Overflow())


def plain() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A model that passes at fp32."""
    return build(Plain())


class Shift(nn.Module):
    """Adds a constant."""

    def __init__(self, offset: float):
        super().__init__()
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset


class Cancellation(nn.Module):
    """bf16-fragile: `up` adds 4096 (bf16 keeps 8 bits of mantissa: steps of 32 there) and `down` subtracts it
    back, so the small values are lost in `down` at bf16 while fp32 keeps them."""

    def __init__(self, depth: int = 4, channels: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(*[Block(channels) for _ in range(depth)])
        self.up = Shift(4096.0)
        self.act = nn.ReLU()
        self.down = Shift(-4096.0)
        self.tail = nn.Sequential(*[Block(channels) for _ in range(2)])
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.act(self.up(self.body(self.stem(x)))))
        return self.head(self.tail(x).mean((2, 3)))


def cancellation() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """`kiln export tests/models/planted.py:cancellation --precision bf16`: diverges at `down`."""
    return build(Cancellation())


class Binning(nn.Module):
    """Bucket indices of its input, as floats: `torch.searchsorted` has no ONNX lowering."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("edges", torch.linspace(-2, 2, 9))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.edges, x.contiguous()).to(x.dtype)


class Unconvertible(nn.Module):
    """Converts up to `stem` and `pre`; `binning` (searchsorted) cannot be lowered to ONNX."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.pre = nn.Linear(8, 8)
        self.binning = Binning()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.binning(self.pre(self.stem(x))))


def unconvertible() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A model whose ONNX build fails at `binning`."""
    model, _ = build(Unconvertible())
    return model, (torch.randn(2, 4),)


class Branching(nn.Module):
    """Two branches from the stem: `early` (computed first, consumed last) scales past fp16's 65504 and `late`
    scales it back where it joins the block stack's output. At fp16 the first divergence is `early`; a prefix
    cut inside the block stack ends with a correct tensor while `early`'s infinite one is still live there."""

    def __init__(self, depth: int = 4, channels: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.early = Scale(1e6)
        self.body = nn.Sequential(*[Block(channels) for _ in range(depth)])
        self.late = Scale(1e-6)
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        side = self.early(x)
        x = self.body(x) + self.late(torch.relu(side))
        return self.head(x.mean((2, 3)))


def branching() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """`kiln export tests/models/planted.py:branching --precision fp16`: diverges at `early`, in a branch."""
    return build(Branching())
