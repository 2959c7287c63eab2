"""A causal LM as the runtimes' own LLM formats describe it beyond its graph (`LanguageModel`): the `transformers`
config and generation config they read (`config.json`, `generation_config.json`), the cache's shape, the special
tokens, and the tokenizer when the model comes with one. The text-generation routes of the `openvino` and `onnx`
targets (`kiln.targets.openvino_genai`, `kiln.targets.onnxrt_genai`) write their folders from it; it is read from
the model by `kiln.compiler.generation.llm_format.language_model_of`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass(frozen=True)
class LanguageModel:
    """A causal LM as the runtimes' LLM formats describe it."""

    model_type: str  # the transformers `model_type` (e.g. "llama"); onnxruntime-genai's `model.type`
    config: dict[str, Any]  # config.to_dict(), written as config.json
    generation_config: dict[str, Any]  # written as generation_config.json
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    context: int  # the positions the model has
    bos: int | None
    eos: list[int]
    pad: int | None
    windows: tuple[int | None, ...] = ()  # each layer's sliding window (None: it sees every earlier position)
    tokenizer: Any = field(default=None, compare=False, repr=False)  # a transformers fast tokenizer, or None
    tokenizer_origin: str = ""  # where it came from, or why there is none

    def write_config_files(self, directory: Path) -> list[str]:
        """config.json, generation_config.json and, when there is a tokenizer, its files (`tokenizer.json`,
        `tokenizer_config.json`, ...) into `directory`; the names written."""
        import json

        written = [CONFIG_FILE, GENERATION_CONFIG_FILE]
        (directory / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, sort_keys=True, default=str) + "\n")
        generation = self.generation_config or {"bos_token_id": self.bos, "eos_token_id": self.eos}
        text = json.dumps(generation, indent=2, sort_keys=True, default=str)
        (directory / GENERATION_CONFIG_FILE).write_text(text + "\n")
        if self.tokenizer is not None:
            before = {p.name for p in directory.iterdir()}
            self.tokenizer.save_pretrained(str(directory), legacy_format=False)
            written += sorted({p.name for p in directory.iterdir()} - before)
        return written

    def tokenizer_record(self, converted: list[str] | None = None) -> dict[str, Any]:
        """What the manifest says of the tokenizer: where it came from (or why there is none) and the files made."""
        return {"found": self.tokenizer is not None, "origin": self.tokenizer_origin, "files": converted or []}
