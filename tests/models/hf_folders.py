"""Hugging Face checkpoint folders written by `save_pretrained` from small configs (random weights, nothing
downloaded), one per task `kiln export DIR` infers, plus folders it must refuse."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = ["[UNK]", "<s>", "</s>", "the", "cat", "sat", "on", "mat", "a", "dog"] + [f"w{i}" for i in range(86)]


def save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over VOCAB (96 words), saved as transformers saves one (tokenizer.json and its
    config)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(folder)


def _bert_config() -> object:
    import transformers

    return transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )


def causal_lm(folder: Path) -> Path:
    """A 2-layer Llama with a tokenizer."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def sequence_classifier(folder: Path) -> Path:
    """BertForSequenceClassification, 3 labels, with a tokenizer."""
    import transformers

    torch.manual_seed(0)
    transformers.BertForSequenceClassification(_bert_config()).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def token_classifier(folder: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    transformers.BertForTokenClassification(_bert_config()).save_pretrained(folder)
    return folder


def encoder(folder: Path) -> Path:
    """A bare BertModel: feature extraction."""
    import transformers

    torch.manual_seed(0)
    transformers.BertModel(_bert_config()).save_pretrained(folder)
    return folder


def image_classifier(folder: Path) -> Path:
    """ViTForImageClassification on 32x32 images."""
    import transformers

    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    return folder


def seq2seq(folder: Path) -> Path:
    """T5ForConditionalGeneration: its encoder is exported."""
    import transformers

    config = transformers.T5Config(
        vocab_size=len(VOCAB),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


def pickled_only(folder: Path) -> Path:
    """BertForSequenceClassification with its weights in pytorch_model.bin (a pickle, as older checkpoints hold
    them), no safetensors."""
    import transformers

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(_bert_config())
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def remote_code(folder: Path, marker: Path) -> Path:
    """A sequence classifier whose config asks for the folder's own code (`auto_map`); that code, if it ever ran,
    would write `marker`."""
    import json

    sequence_classifier(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_custom.CustomClassifier"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import BertForSequenceClassification as CustomClassifier\n"
    )
    return folder


FOLDERS = {
    "text-generation": causal_lm,
    "text-classification": sequence_classifier,
    "token-classification": token_classifier,
    "feature-extraction": encoder,
    "image-classification": image_classifier,
    "encoder": seq2seq,
}
