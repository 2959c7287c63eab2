"""What Kiln reads of a `transformers` causal LM: whether a module is one (`is_causal_lm`), what its export records
of its decoder (`decoder_spec`) and the shape of its KV cache (`cache_shape`); and the tasks of an export."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import UnsupportedOpError, error_text
from kiln.compiler.generation.attention_masks import AttentionPattern
from kiln.compiler.generation.decoding import TEXT_GENERATION, DecoderSpec

if TYPE_CHECKING:
    from kiln.compiler.capture.sources import ModelSource
    from torch import nn


def is_causal_lm(module: Any) -> bool:
    """True for a `transformers` decoder-only model that generates (e.g. LlamaForCausalLM, GPT2LMHeadModel)."""
    if not type(module).__module__.startswith("transformers."):
        return False
    from transformers import GenerationMixin

    config = getattr(module, "config", None)
    return (
        isinstance(module, GenerationMixin)
        and bool(getattr(module, "can_generate", lambda: False)())
        and config is not None
        and not getattr(config, "is_encoder_decoder", False)
        and hasattr(config, "num_hidden_layers")
        and hasattr(config, "vocab_size")
    )


def decoder_spec(model: nn.Module) -> DecoderSpec:
    """What a text-generation export records of a causal LM (vocabulary, positions, attention layers); an
    UnsupportedOpError for attention Kiln does not build (`AttentionPattern.of`)."""
    config: Any = model.config
    pattern = AttentionPattern.of(config)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 4096
    return DecoderSpec(int(config.vocab_size), int(positions), pattern.layer_types, pattern.window)


def cache_shape(config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a transformers decoder config."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(config.num_hidden_layers), kv_heads, head_dim


def decoder_program(wrapper: nn.Module, examples: tuple[Any, ...], what: str, dynamic_shapes: Any = None) -> Any:
    """`torch.export` of `wrapper` (a causal LM with its KV cache as flat tensors) on `examples`; an
    UnsupportedOpError naming `what` when it fails."""
    import torch
    from kiln.compiler.progress import converter_output_captured

    try:
        with converter_output_captured():
            return torch.export.export(wrapper, examples, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        raise UnsupportedOpError(
            f"torch.export of {what} failed: {error_text(exc)}",
            "export it with --task forward (one full-sequence forward, no cache)",
        ) from None


def decoder_source(
    source: ModelSource,
    wrapper: nn.Module,
    examples: tuple[Any, ...],
    cache: str,
    dynamic_shapes: Any = None,
    spec: DecoderSpec | None = None,
) -> ModelSource:
    """`source` (a causal LM) as its cached decoder: `wrapper` (the LM with its KV cache as flat tensors; `cache`
    names which) `torch.export`ed on `examples` (`capture` takes a source's program as it is), the user's own model
    kept as the reference of every parity check; `spec` what the export records of the decoder (by default
    `decoder_spec` of the model)."""
    assert source.module is not None
    program = decoder_program(wrapper, examples, f"{source.description} with a {cache}", dynamic_shapes)
    return replace(
        source,
        description=f"{source.description} (text-generation, {cache})",
        example_inputs=examples,
        module=wrapper,
        exported=program,
        task=TEXT_GENERATION,
        reference_model=source.module,
        decoder=spec or decoder_spec(source.module),
    )
