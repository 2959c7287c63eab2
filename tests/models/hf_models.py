"""Hugging Face `transformers` architectures from small configs (random weights, nothing downloaded), as
`file.py:factory` sources: each returns `(module.eval(), example_inputs)` with one plain tensor output."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class FirstOutput(nn.Module):
    """A transformers model with its output object reduced to one tensor (e.g. `last_hidden_state`)."""

    def __init__(self, model: nn.Module, field: str = "last_hidden_state"):
        super().__init__()
        self.model = model
        self.field = field

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(*args), self.field)


def _ready(model: nn.Module, field: str = "last_hidden_state") -> nn.Module:
    return FirstOutput(model, field).eval()


def swin() -> tuple[nn.Module, tuple[Any, ...]]:
    """Swin with two stages of shifted-window attention (the patch merging between them)."""
    from transformers import SwinConfig, SwinModel

    torch.manual_seed(0)
    config = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)
    return _ready(SwinModel(config)), (torch.randn(1, 3, 32, 32),)


def t5_encoder() -> tuple[nn.Module, tuple[Any, ...]]:
    """The T5 encoder (relative position buckets, RMS norm)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=100, d_kv=16)
    return _ready(T5EncoderModel(config)), (torch.randint(0, 100, (1, 12)),)
