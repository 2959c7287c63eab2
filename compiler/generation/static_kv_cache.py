"""Text-generation export with a **static** KV cache, for the targets whose shapes are fixed (`tflite`, `tpu`).

One decode graph of fixed shapes: one token at a time (batch 1), the cache a fixed length C (`--cache-size`,
default `DEFAULT_CACHE_SIZE`) given in and returned whole; the prompt is prefilled token by token through the same
graph (no separate prefill signature: one graph, one copy of the weights; slower prefill, documented). The new key
and value are written into the cache with a one-hot `where` on `input_pos` (no scatter, no index_copy: TFLite and
XLA convert it to SELECT); slot j holds position j, and each layer's additive mask, built in the graph from
`input_pos`, lets it see the slots its attention sees (`kiln.compiler.generation.attention_masks`: positions <=
input_pos, and only
the last `sliding_window` of them on a sliding layer). No ring buffer: a sliding layer's cache is as long as the
others (simpler, and the same tokens; a ring would save memory on models with long caches and short windows). No
mutable buffers: converters take plain I/O best (litert-torch's generative API and transformers' executorch
StaticCache keep the cache in buffers instead).

I/O (ids and position int32): `input_ids[1, 1]`, `input_pos[1]`,
`past_key_values_{i}_key|value[1, kv_heads, C, head_dim]` -> `logits[1, 1, vocab]`,
`present_{i}_key|value[1, kv_heads, C, head_dim]` (underscores, not the onnx export's dots: the TFLite and
SavedModel signatures take Python identifiers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from kiln.compiler.generation.attention_masks import AttentionPattern
from kiln.compiler.generation.causal_lm import cache_shape, decoder_source, decoder_spec
from kiln.compiler.generation.decoding import DecoderSpec, static_output_names
from torch import nn

if TYPE_CHECKING:
    from kiln.compiler.capture.program import CapturedModel
    from kiln.compiler.capture.sources import ModelSource

DEFAULT_CACHE_SIZE = 64


def _static_layer_class() -> type:
    """A transformers cache layer over given key/value tensors of fixed length, written functionally (a one-hot
    `where` at the step's position) rather than in place; built lazily (transformers is imported on use)."""
    from transformers.cache_utils import StaticLayer

    class FunctionalStaticLayer(StaticLayer):  # type: ignore[misc]
        def __init__(self, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor):
            super().__init__(max_cache_len=int(keys.shape[2]))
            self.keys, self.values, self.slot, self.is_initialized = keys, values, slot, True
            self.dtype, self.device = keys.dtype, keys.device

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            assert self.keys is not None and self.values is not None  # set at construction
            self.keys = torch.where(self.slot, key_states, self.keys)
            self.values = torch.where(self.slot, value_states, self.values)
            return self.keys, self.values

    return FunctionalStaticLayer


class CausalLMWithStaticCache(nn.Module):
    """A causal LM's decode step over a static cache taking flat tensors (see the module docstring)."""

    def __init__(self, model: nn.Module, cache_size: int):
        super().__init__()
        self.model = model
        config: Any = model.config
        self.layers = int(config.num_hidden_layers)
        self.cache_size = cache_size
        self.layer_class = _static_layer_class()
        self.pattern = AttentionPattern.of(config)

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor, *past: torch.Tensor) -> dict[str, torch.Tensor]:
        from transformers.cache_utils import Cache

        slots = torch.arange(self.cache_size, dtype=input_pos.dtype)
        slot = (slots == input_pos).view(1, 1, self.cache_size, 1)
        mask = self.pattern.masks(input_pos, slots, None, past[0].dtype)
        layers = [self.layer_class(past[2 * i], past[2 * i + 1], slot) for i in range(self.layers)]
        cache = Cache(layers=layers)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=input_pos.view(1, 1),
            past_key_values=cache,
            use_cache=True,
        )
        tensors = [out.logits, *[t for layer in layers for t in (layer.keys, layer.values)]]
        return dict(zip(static_output_names(self.layers), tensors))


def static_examples(config: Any, cache_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Example inputs of the decode graph: a token at position 3 over a random cache; int32 ids and position
    (TFLite runs 64-bit I/O as 32-bit, and 32-bit is what TPUs take)."""
    layers, kv_heads, head_dim = cache_shape(config)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(config.vocab_size), (1, 1), generator=generator, dtype=torch.int32)
    cache = [torch.randn(1, kv_heads, cache_size, head_dim, generator=generator).to(dtype) for _ in range(2 * layers)]
    return (ids, torch.tensor([3], dtype=torch.int32), *cache)


def check_cache_size(size: int | None, spec: DecoderSpec) -> int:
    """The cache length of a static-cache export: `--cache-size`, or by default DEFAULT_CACHE_SIZE or what the
    gate's prompts need to cross the model's sliding window twice, within the model's positions; a UsageError when
    the size asked for cannot hold the gate's prompts or exceeds the model's positions."""
    from kiln.compiler.errors import UsageError
    from kiln.compiler.generation.gate import gate_prompts

    if size is None:
        need = gate_prompts(spec, spec.max_positions).positions
        return min(max(DEFAULT_CACHE_SIZE, need), spec.max_positions)
    if not 1 <= size <= spec.max_positions:
        raise UsageError(
            f"--cache-size {size}: the static KV cache must hold at least one token and at most the model's "
            f"{spec.max_positions} positions",
            f"use a size from {gate_prompts(spec, spec.max_positions).positions} to {spec.max_positions}",
        )
    gate_prompts(spec, size, strict=True)
    return size


def static_generation_source(source: ModelSource, cache_size: int | None) -> ModelSource:
    """`source` (a causal LM) as its static-cache decode step: the wrapper, its example inputs and its program
    (all shapes static; `capture` takes a source's program as it is)."""
    assert source.module is not None
    config: Any = source.module.config
    spec = decoder_spec(source.module)
    size = check_cache_size(cache_size, spec)
    wrapper = CausalLMWithStaticCache(source.module, size).eval()
    examples = static_examples(config, size, next(source.module.parameters()).dtype)
    return decoder_source(source, wrapper, examples, f"static KV cache of {size}")


def name_static_io(captured: CapturedModel) -> CapturedModel:
    """The captured static-cache model with its input specs named as the decoder feeds them (`input_pos`,
    `past_key_values_{i}_key`), not the program's `past_0`; the outputs are named by the wrapper already."""
    from dataclasses import replace

    from kiln.compiler.generation.decoding import static_input_names

    names = static_input_names((len(captured.inputs) - 2) // 2)
    return replace(captured, inputs=[replace(s, name=n) for s, n in zip(captured.inputs, names)])
