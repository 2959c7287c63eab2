"""Hugging Face `transformers` architectures from small configs (random weights, nothing downloaded), as
`file.py:factory` sources: each returns `(module.eval(), example_inputs)` with one plain tensor output."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class FirstOutput(nn.Module):
    """A transformers model with its output object reduced to one tensor (e.g. `last_hidden_state`)."""

    def __init__(self, model: nn.Module, field: str = "last_hidden_state", **options: Any):
        super().__init__()
        self.model = model
        self.field = field
        self.options = options  # fixed keyword arguments, e.g. use_cache=False

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(*args, **self.options), self.field)


def _ready(model: nn.Module, field: str = "last_hidden_state", **options: Any) -> nn.Module:
    return FirstOutput(model, field, **options).eval()


def _settle_batchnorm(model: nn.Module, inputs: tuple[torch.Tensor, ...], batches: int = 4) -> None:
    """Set BatchNorm statistics from a few random batches in train mode (after PyTorch's own BatchNorm init): with
    the unit statistics of a fresh model, deep convolutional stacks can shrink their outputs to ~1e-43, where no
    parity figure means anything."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_parameters()  # scale 1, shift 0 (transformers 5 draws the scale from N(0, 0.02))
            module.momentum = None  # a plain average of the batches seen, not a slow move away from 0 and 1
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(*(torch.randn(4, *t.shape[1:]) for t in inputs))
    model.eval()


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


def convnext() -> tuple[nn.Module, tuple[Any, ...]]:
    """ConvNeXt (depthwise 7x7 convolutions, channels-last LayerNorm, layer scale)."""
    from transformers import ConvNextConfig, ConvNextModel

    torch.manual_seed(0)
    config = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32)
    return _ready(ConvNextModel(config)), (torch.randn(1, 3, 32, 32),)


def whisper_encoder() -> tuple[nn.Module, tuple[Any, ...]]:
    """The Whisper encoder (two 1-D convolutions over log-mel frames, then attention)."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    config = WhisperConfig(
        d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
        decoder_attention_heads=2, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16, vocab_size=100,
    )  # fmt: skip
    return _ready(WhisperEncoder(config)), (torch.randn(1, 16, 32),)


def llama() -> tuple[nn.Module, tuple[Any, ...]]:
    """A Llama decoder (rotary embeddings, grouped-query attention, RMS norm) as one full-sequence forward."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=100, max_position_embeddings=64,
    )  # fmt: skip
    return _ready(LlamaModel(config), use_cache=False), (torch.randint(0, 100, (1, 12)),)


def llama_causal_lm() -> tuple[nn.Module, tuple[Any, ...]]:
    """A Llama causal LM itself (not wrapped): Kiln exports it for text generation, with its KV cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=128,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval(), (torch.randint(0, 128, (1, 8)),)


def mobilevit() -> tuple[nn.Module, tuple[Any, ...]]:
    """MobileViT classifier (inverted residuals, unfold-to-patches attention, fold back), BN statistics set."""
    from transformers import MobileViTConfig, MobileViTForImageClassification

    torch.manual_seed(0)
    config = MobileViTConfig(
        image_size=64, patch_size=2, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 48],
        num_attention_heads=2, num_labels=10,
    )  # fmt: skip
    model = _ready(MobileViTForImageClassification(config), "logits")
    inputs = (torch.randn(1, 3, 64, 64),)
    _settle_batchnorm(model, inputs)
    return model, inputs


def distilbert() -> tuple[nn.Module, tuple[Any, ...]]:
    """DistilBERT with token ids and an attention mask."""
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=64)
    ids = torch.randint(0, 100, (1, 12))
    return _ready(DistilBertModel(config)), (ids, torch.ones_like(ids))


def detr() -> tuple[nn.Module, tuple[Any, ...]]:
    """DETR (ResNet backbone from transformers, not timm; encoder-decoder with object queries): class logits."""
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    torch.manual_seed(0)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], out_features=["stage2"])
    config = DetrConfig(
        use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=32,
        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, num_labels=5,
    )  # fmt: skip
    model = _ready(DetrForObjectDetection(config), "logits")
    inputs = (torch.randn(1, 3, 64, 64),)
    _settle_batchnorm(model, inputs)
    return model, inputs


def cdist_head() -> tuple[nn.Module, tuple[Any, ...]]:
    """A prototype classifier (distances to learned prototypes with `torch.cdist`): the dynamo exporter cannot
    lower `cdist`, the TorchScript-based exporter can."""
    torch.manual_seed(0)
    return PrototypeHead().eval(), (torch.randn(2, 5, 8),)


class PrototypeHead(nn.Module):
    """Embeds points and scores them by their negative distance to 4 prototypes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 6)
        self.prototypes = nn.Parameter(torch.randn(1, 4, 6))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(self.embed(points), self.prototypes.expand(points.shape[0], -1, -1))


class _Encoder(nn.Module):
    """A transformers encoder called with named token ids and attention mask (the names a --dynamic spec uses)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def tiny_bert() -> tuple[nn.Module, tuple[Any, ...]]:
    """A one-layer BERT (vocabulary 100, width 32, up to 64 positions) taking `input_ids` and `attention_mask`
    of 16 tokens, the last 3 of the second row padding: for sequence-length-dynamic exports."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    ids = torch.randint(1, 100, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return _Encoder(BertModel(config)).eval(), (ids, mask)
