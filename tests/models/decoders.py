"""`transformers` causal LMs of the popular decoder families from small configs (random weights, nothing
downloaded), as `file.py:factory` sources returning the *ForCausalLM itself: Kiln exports each for text generation.

The sliding-window ones have windows of 8-16 tokens, so that a gate's prompt and tokens cross them: Mistral and
Phi-3 (every layer sliding), Gemma 2 (sliding and full layers alternating, attention and final-logit soft-capping),
Gemma 3 text (five sliding layers to one full, its own local rotary base), Qwen2 and Qwen3 with
`use_sliding_window` (the layers from `max_window_layers` on slide)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

VOCAB = 128
POSITIONS = 128
# Wider than the 0.02 of real checkpoints: with it, a random model's tokens depend on the context (at 0.02 most
# repeat one token, so a wrong mask could hide behind an unchanged argmax).
INIT = 0.2
_SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": VOCAB}


# Gemma scales its embeddings by sqrt(hidden): tied to the head, a random model then repeats its last token
# whatever the context. Untied, its tokens follow the context.
_GEMMA = {"tie_word_embeddings": False}
# Gemma 2's own caps (50 on attention scores, 30 on logits) never bind on a random model, whose scores and logits
# stay near 1: a model that lost them would compute the same. These bind (a dropped cap moves logits by ~0.1).
_BINDING_CAPS = {"attn_logit_softcapping": 0.5, "final_logit_softcapping": 2.0, "query_pre_attn_scalar": 16}


def _lm(config_class: str, model_class: str, **config: Any) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config)).eval()
    return model, (torch.randint(0, VOCAB, (1, 8)),)


def _llama_like(**extra: Any) -> dict[str, Any]:
    return {
        **_SMALL,
        "initializer_range": INIT,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": POSITIONS,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    } | extra


def llama() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Llama: rotary embeddings, grouped-query attention (2 KV heads of 4), RMS norm."""
    return _lm("LlamaConfig", "LlamaForCausalLM", **_llama_like())


def mistral() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Mistral with a 16-token sliding window on every layer."""
    return _lm("MistralConfig", "MistralForCausalLM", **_llama_like(sliding_window=16))


def gemma2() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Gemma 2: an 8-token sliding window on alternate layers, attention and final logits soft-capped (caps that
    bind on a random model's small logits), eager attention (SDPA cannot soft-cap)."""
    config = _llama_like(
        sliding_window=8, head_dim=16, num_hidden_layers=4, **_GEMMA, initializer_range=0.05, **_BINDING_CAPS
    )
    return _lm("Gemma2Config", "Gemma2ForCausalLM", **config)


def gemma3() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Gemma 3 text: five sliding layers (window 8, rotary base 10k) to one full layer (base 1M), QK norm."""
    config = _llama_like(sliding_window=8, head_dim=16, num_hidden_layers=6, **_GEMMA, initializer_range=0.1)
    return _lm("Gemma3TextConfig", "Gemma3ForCausalLM", **config)


def qwen2() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Qwen2 (biased QKV projections), full attention."""
    return _lm("Qwen2Config", "Qwen2ForCausalLM", **_llama_like())


def qwen2_sliding() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Qwen2 with `use_sliding_window`: layers 2 and 3 of 4 slide over 8 tokens (`max_window_layers=2`)."""
    config = _llama_like(num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    return _lm("Qwen2Config", "Qwen2ForCausalLM", **config)


def qwen3_sliding() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Qwen3 (QK norm) with `use_sliding_window`: layers 2 and 3 of 4 slide over 8 tokens."""
    config = _llama_like(
        num_hidden_layers=4, head_dim=16, use_sliding_window=True, sliding_window=8, max_window_layers=2
    )
    return _lm("Qwen3Config", "Qwen3ForCausalLM", **config)


def phi3() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Phi-3 (fused QKV and gate-up projections), full attention."""
    return _lm("Phi3Config", "Phi3ForCausalLM", **_llama_like())


def phi3_sliding() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Phi-3 with a 12-token sliding window on every layer."""
    return _lm("Phi3Config", "Phi3ForCausalLM", **_llama_like(sliding_window=12))


def olmo2() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """OLMo 2 (norms after attention and MLP, QK norm)."""
    return _lm("Olmo2Config", "Olmo2ForCausalLM", **_llama_like(initializer_range=0.1))


def gpt2() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """GPT-2: learned positions, LayerNorm, fused QKV (Conv1D)."""
    config = {
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": POSITIONS,
        "vocab_size": VOCAB,
        "initializer_range": INIT,
    }
    return _lm("GPT2Config", "GPT2LMHeadModel", **config, bos_token_id=1, eos_token_id=2)


def gpt_neox() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """GPT-NeoX: partial rotary (25% of each head), parallel attention and MLP."""
    config = _llama_like()
    del config["num_key_value_heads"]
    return _lm("GPTNeoXConfig", "GPTNeoXForCausalLM", **config, rotary_pct=0.25)


def opt() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """OPT: learned positions offset by 2, ReLU MLP."""
    config = {
        "hidden_size": 64,
        "ffn_dim": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": VOCAB,
        "max_position_embeddings": POSITIONS,
        "word_embed_proj_dim": 64,
        "init_std": INIT,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    return _lm("OPTConfig", "OPTForCausalLM", **config)


FAMILIES = {
    "llama": llama,
    "mistral": mistral,
    "gemma2": gemma2,
    "gemma3": gemma3,
    "qwen2": qwen2,
    "qwen2_sliding": qwen2_sliding,
    "qwen3_sliding": qwen3_sliding,
    "phi3": phi3,
    "phi3_sliding": phi3_sliding,
    "olmo2": olmo2,
    "gpt2": gpt2,
    "gpt_neox": gpt_neox,
    "opt": opt,
}
SLIDING = ("mistral", "gemma2", "gemma3", "qwen2_sliding", "qwen3_sliding", "phi3_sliding")
