"""Models at real sizes, random weights, nothing downloaded: BERT-base as a factory, and decoders with the configs
of SmolLM-135M, TinyLlama-1.1B and Qwen2.5-3B written as Hugging Face checkpoint folders (`config.json` +
`*.safetensors`, as `save_pretrained` leaves them), the source `kiln export DIR` reads.

    kiln export benchmarks/scale_models.py:bert_base --target tpu
    python benchmarks/scale_models.py 1.1b /tmp/tinyllama      # write the folder, then: kiln export /tmp/tinyllama

A decoder folder is written shard by shard from a model built on the meta device, so writing a 3B model takes
one shard's memory (about 2 GB), not the model's: the weights follow transformers' own initialization (normal
with the config's `initializer_range`, norms at one, biases at zero), seeded by name.
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARD_BYTES = 2 * 2**30

# Shapes of public checkpoints (their config.json values), in the architectures transformers knows.
DECODERS: dict[str, dict[str, Any]] = {
    "135m": {  # HuggingFaceTB/SmolLM-135M
        "architecture": "LlamaForCausalLM",
        "config": dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            max_position_embeddings=2048,
            rope_theta=10000.0,
            tie_word_embeddings=True,
        ),
    },
    "1.1b": {  # TinyLlama/TinyLlama-1.1B-Chat-v1.0
        "architecture": "LlamaForCausalLM",
        "config": dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
            max_position_embeddings=2048,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        ),
    },
    "3b": {  # Qwen/Qwen2.5-3B
        "architecture": "Qwen2ForCausalLM",
        "config": dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            vocab_size=151936,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
        ),
    },
}


def bert_base() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """BertForSequenceClassification with the default config (110M parameters, 0.44 GB fp32), random weights, on
    one sequence of 128 tokens."""
    import transformers

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig()).eval()
    input_ids = torch.randint(0, 30522, (1, 128), generator=torch.Generator().manual_seed(1))
    return model, (input_ids, torch.ones(1, 128, dtype=torch.int64))


def decoder_config(size: str) -> Any:
    """The transformers config of a decoder of DECODERS."""
    import transformers

    entry = DECODERS[size]
    config_class = getattr(transformers, entry["architecture"].replace("ForCausalLM", "Config"))
    return config_class(**entry["config"], architectures=[entry["architecture"]], torch_dtype="float32")


def _initial_value(name: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
    """transformers' initialization of one weight (seeded by its name, so a folder is the same every time)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator) * std


def write_decoder_folder(size: str, directory: Path) -> Path:
    """Write the decoder `size` of DECODERS as a checkpoint folder: config.json, generation_config.json and
    model-0000i-of-0000n.safetensors shards with model.safetensors.index.json (one model.safetensors when it
    fits one shard), and a tokenizer. Returns `directory`."""
    import transformers
    from kiln.compiler.safetensors_file import write_safetensors

    config = decoder_config(size)
    with torch.device("meta"):
        model = getattr(transformers, DECODERS[size]["architecture"])(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        size_bytes = 4 * int(torch.Size(shape).numel())
        if shards[-1] and used + size_bytes > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size_bytes
    directory.mkdir(parents=True, exist_ok=True)
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for file, names in zip(files, shards):
        tensors = [(n, _initial_value(n, shapes[n], config.initializer_range)) for n in names]
        write_safetensors(directory / file, tensors, {"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
        del tensors
    if len(files) > 1:
        total = sum(4 * int(torch.Size(s).numel()) for s in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(directory)
    transformers.GenerationConfig(do_sample=False).save_pretrained(directory)
    save_tokenizer(directory, config.vocab_size)
    return directory


def save_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer with `vocab_size` entries (`<unk>`, `<s>`, `</s>`, then `w3`, `w4`...), saved as
    transformers saves one: onnxruntime-genai's builder needs a tokenizer, and `kiln run --prompt` uses it."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab_size)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description="write a decoder of DECODERS as a checkpoint folder")
    parser.add_argument("size", choices=sorted(DECODERS))
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    print(write_decoder_folder(args.size, args.directory))


if __name__ == "__main__":
    main()
