"""Causal LMs that come with a tokenizer, as `file.py:factory` sources (random weights, nothing downloaded): the
tokenizer is a byte-level BPE trained here on a few strings. `llama_from_folder` saves the model and its tokenizer
with `save_pretrained` and loads the model back with `from_pretrained(folder)`, as a user's factory would;
`llama_with_tokenizer` sets the tokenizer as the model's `tokenizer` attribute."""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from torch import nn

VOCAB = 320
TEXTS = ["the quick brown fox jumps over the lazy dog", "kiln exports models to the runtimes people use"]


def tokenizer() -> Any:
    """A byte-level BPE tokenizer of VOCAB ids (`<pad>` 0, `<s>` 1, `</s>` 2, `<unk>` 3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model = Tokenizer(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(TEXTS * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def llama_with_tokenizer() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A Llama whose factory sets its tokenizer as the `tokenizer` attribute."""
    model = _llama()
    model.tokenizer = tokenizer()
    return model, (torch.randint(0, VOCAB, (1, 8)),)


def llama_from_folder() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A Llama loaded with `from_pretrained` from a folder that holds its tokenizer too."""
    from transformers import AutoModelForCausalLM

    folder = tempfile.mkdtemp(prefix="kiln-genai-model-")
    _llama().save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), (torch.randint(0, VOCAB, (1, 8)),)
