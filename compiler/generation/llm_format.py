"""What the runtimes' own LLM formats read of a causal LM beyond its graph (`language_model_of`, a
`kiln.compiler.capture.language_model.LanguageModel`), and `--llm-format`'s values.

The tokenizer is found, in this order, as a `tokenizer` attribute the factory set on the model (a `transformers`
tokenizer or a `tokenizers.Tokenizer`), or in the folder the model was loaded from (`from_pretrained(folder)`:
its `name_or_path`, read with `local_files_only`, no remote code). None found: the artifact takes token ids, and
the manifest says why no tokenizer came with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.capture.language_model import LanguageModel
from kiln.compiler.errors import error_text
from kiln.compiler.generation.attention_masks import SLIDING
from kiln.compiler.generation.causal_lm import cache_shape

if TYPE_CHECKING:
    from kiln.compiler.generation.decoding import DecoderSpec

# `--llm-format`: the runtime's own LLM format (the default where the target has one) or Kiln's stateless step graph.
GENAI, STATELESS = "genai", "stateless"
LLM_FORMATS = (GENAI, STATELESS)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what makes a folder hold a tokenizer


def language_model_of(model: Any, spec: DecoderSpec) -> LanguageModel:
    """The description of a transformers causal LM (its attention layers from `spec`)."""
    config = model.config
    layers, kv_heads, head_dim = cache_shape(config)
    generation = getattr(model, "generation_config", None)
    generation_dict = generation.to_dict() if generation is not None else {}
    eos = _token_ids(generation_dict.get("eos_token_id", getattr(config, "eos_token_id", None)))
    tokenizer, origin = find_tokenizer(model)
    return LanguageModel(
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
        return None, f"the tokenizer in {folder} did not load: {error_text(exc)}"
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
