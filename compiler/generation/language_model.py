"""What the runtimes' own LLM formats need to know of a causal LM beyond its graph: the `transformers` config and
generation config they read (`config.json`, `generation_config.json`), the cache's shape, the special tokens, and
the tokenizer when the model comes with one. The text-generation routes of the `openvino` and `onnx` targets
(`kiln.targets.openvino_genai`, `kiln.targets.onnxrt_genai`) write their folders from it.

The tokenizer is found, in this order, as a `tokenizer` attribute the factory set on the model (a `transformers`
tokenizer or a `tokenizers.Tokenizer`), or in the folder the model was loaded from (`from_pretrained(folder)`:
its `name_or_path`, read with `local_files_only`, no remote code). None found: the artifact takes token ids, and
the manifest says why no tokenizer came with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.compiler.generation.decoding import DecoderSpec

TEXT_GENERATION = "text-generation"  # `--task`: the decoder with its KV cache
FORWARD = "forward"  # `--task`: one full-sequence forward
TASKS = (TEXT_GENERATION, FORWARD)
# `--llm-format`: the runtime's own LLM format (the default where the target has one) or Kiln's stateless step graph.
GENAI, STATELESS = "genai", "stateless"
LLM_FORMATS = (GENAI, STATELESS)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what makes a folder hold a tokenizer
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

    @classmethod
    def of(cls, model: Any, spec: DecoderSpec) -> LanguageModel:
        """The description of a transformers causal LM (its attention layers from `spec`)."""
        from kiln.compiler.generation.attention_masks import SLIDING
        from kiln.compiler.generation.export import cache_shape

        config = model.config
        layers, kv_heads, head_dim = cache_shape(config)
        generation = getattr(model, "generation_config", None)
        generation_dict = generation.to_dict() if generation is not None else {}
        eos = _token_ids(generation_dict.get("eos_token_id", getattr(config, "eos_token_id", None)))
        tokenizer, origin = find_tokenizer(model)
        return cls(
            model_type=str(getattr(config, "model_type", "") or type(model).__name__.lower()),
            config=config.to_dict(),
            generation_config=generation_dict,
            layers=layers,
            heads=int(config.num_attention_heads),
            kv_heads=kv_heads,
            head_dim=head_dim,
            hidden=int(config.hidden_size),
            vocab=int(config.vocab_size),
            context=spec.max_positions,
            bos=_first(generation_dict.get("bos_token_id", getattr(config, "bos_token_id", None))),
            eos=eos,
            pad=_first(generation_dict.get("pad_token_id", getattr(config, "pad_token_id", None))),
            windows=tuple(spec.window if kind == SLIDING else None for kind in spec.layer_types),
            tokenizer=tokenizer,
            tokenizer_origin=origin,
        )

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


def find_tokenizer(model: Any) -> tuple[Any, str]:
    """The model's tokenizer as a transformers fast tokenizer, and where it came from; (None, why) when it has
    none Kiln can use."""
    attached = getattr(model, "tokenizer", None)
    if attached is not None:
        fast = _as_fast(attached)
        if fast is None:
            return None, f"the model's `tokenizer` attribute is a {type(attached).__name__}, not a fast tokenizer"
        return fast, "the model's `tokenizer` attribute"
    folder = str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "")
    path = Path(folder) if folder else None
    if path is None or not path.is_dir() or not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None, "none: the model has no `tokenizer` attribute and was not loaded from a folder holding one"
    try:
        from transformers import AutoTokenizer

        loaded = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # a folder's tokenizer files are the user's: a broken one is said, not fatal
        return None, f"the tokenizer in {folder} did not load: {type(exc).__name__}: {str(exc).strip()[:200]}"
    fast = _as_fast(loaded)
    if fast is None:
        return None, f"the tokenizer in {folder} is a {type(loaded).__name__}, not a fast tokenizer"
    return fast, f"the model's folder {folder}"


def _as_fast(tokenizer: Any) -> Any:
    """A transformers fast tokenizer for `tokenizer` (a `tokenizers.Tokenizer` is wrapped), or None."""
    from transformers import PreTrainedTokenizerFast

    if isinstance(tokenizer, PreTrainedTokenizerFast):
        return tokenizer
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    if isinstance(tokenizer, Tokenizer):
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    return None


def _token_ids(value: Any) -> list[int]:
    """A token id or a list of them as a list of ints (None: empty)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _first(value: Any) -> int | None:
    ids = _token_ids(value)
    return ids[0] if ids else None
