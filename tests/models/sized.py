"""One architecture at two sizes (random weights, nothing downloaded), for tests of how an export's memory grows
with the weights: the growth between the two sizes, divided by the growth of the weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _bert(hidden: int, layers: int, vocab: int) -> tuple[nn.Module, tuple[Any, ...]]:
    """BertForSequenceClassification of that size on one sequence of 128 tokens."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    input_ids = torch.randint(0, vocab, (1, 128), generator=torch.Generator().manual_seed(1))
    return model, (input_ids, torch.ones(1, 128, dtype=torch.int64))


def bert_small() -> tuple[nn.Module, tuple[Any, ...]]:
    """0.6M parameters (2.4 MB)."""
    return _bert(64, 2, 1000)


def bert_large() -> tuple[nn.Module, tuple[Any, ...]]:
    """BERT-base's width with 4 layers: 52M parameters (0.21 GB)."""
    return _bert(768, 4, 30522)


def weight_bytes(model: nn.Module) -> int:
    """The bytes of a model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
