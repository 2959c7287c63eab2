"""Text-generation export with a **static** KV cache, for the targets whose shapes are fixed (`tflite`, `tpu`).

One decode graph of fixed shapes: one token at a time (batch 1), the cache a fixed length C (`--cache-size`,
default `DEFAULT_CACHE_SIZE`) given in and returned whole; the prompt is prefilled token by token through the same
graph (no separate prefill signature: one graph, one copy of the weights; slower prefill, documented). The new key
and value are written into the cache with a one-hot `where` on `input_pos` (no scatter, no index_copy: TFLite and
XLA convert it to SELECT), and attention sees the cache slots at positions <= input_pos (an additive mask built in
the graph from `input_pos`). No mutable buffers: converters take plain I/O best (litert-torch's generative API and
transformers' executorch StaticCache keep the cache in buffers instead).

I/O (ids and position int32): `input_ids[1, 1]`, `input_pos[1]`,
`past_key_values_{i}_key|value[1, kv_heads, C, head_dim]` -> `logits[1, 1, vocab]`,
`present_{i}_key|value[1, kv_heads, C, head_dim]` (underscores, not the onnx export's dots: the TFLite and
SavedModel signatures take Python identifiers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compiler.decoding import static_output_names

if TYPE_CHECKING:
    from compiler.capture import CapturedModel
    from compiler.sources import ModelSource

STATIC_TARGETS = ("tflite", "tpu", "executorch")  # executorch: until targets declare `kv_cache`
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

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor, *past: torch.Tensor) -> dict[str, torch.Tensor]:
        from transformers.cache_utils import Cache

        slots = torch.arange(self.cache_size, dtype=input_pos.dtype)
        slot = (slots == input_pos).view(1, 1, self.cache_size, 1)
        dtype = past[0].dtype
        visible = (slots <= input_pos).view(1, 1, 1, self.cache_size)
        mask = torch.where(visible, torch.zeros((), dtype=dtype), torch.full((), torch.finfo(dtype).min, dtype=dtype))
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
    from compiler.generation import cache_shape

    layers, kv_heads, head_dim = cache_shape(config)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(config.vocab_size), (1, 1), generator=generator, dtype=torch.int32)
    cache = [torch.randn(1, kv_heads, cache_size, head_dim, generator=generator).to(dtype) for _ in range(2 * layers)]
    return (ids, torch.tensor([3], dtype=torch.int32), *cache)


def check_cache_size(size: int | None, max_positions: int) -> int:
    """The cache length of a static-cache export (`--cache-size`, default DEFAULT_CACHE_SIZE within the model's
    positions); a UsageError when the gate's prompt and tokens do not fit it or the model has fewer positions."""
    from compiler.decoding import PARITY_PROMPT, PARITY_TOKENS
    from compiler.errors import UsageError

    need = len(PARITY_PROMPT) + PARITY_TOKENS
    if size is None:
        size = max(need, min(DEFAULT_CACHE_SIZE, max_positions))
    if not need <= size <= max_positions:
        raise UsageError(
            f"--cache-size {size}: the static KV cache must hold the gate's {need} tokens and at most the model's "
            f"{max_positions} positions",
            f"use a size from {need} to {max_positions}",
        )
    return size


def static_generation_source(source: ModelSource, cache_size: int | None) -> ModelSource:
    """`source` (a causal LM) as its static-cache decode step: the wrapper, its example inputs and its program
    (all shapes static; `capture` takes a source's program as it is)."""
    from dataclasses import replace

    from compiler.capture import converter_output_captured
    from compiler.errors import UnsupportedOpError
    from compiler.generation import TEXT_GENERATION

    assert source.module is not None
    config: Any = source.module.config
    size = check_cache_size(cache_size, int(getattr(config, "max_position_embeddings", 4096)))
    wrapper = CausalLMWithStaticCache(source.module, size).eval()
    examples = static_examples(config, size, next(source.module.parameters()).dtype)
    try:
        with converter_output_captured():
            program = torch.export.export(wrapper, examples, strict=False)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise UnsupportedOpError(
            f"torch.export of {source.description} with a static KV cache failed: {type(exc).__name__}: {text}",
            "export it with --task forward (one full-sequence forward, no cache)",
        ) from None
    return replace(
        source,
        description=f"{source.description} (text-generation, static KV cache of {size})",
        example_inputs=examples,
        module=wrapper,
        exported=program,
        task=TEXT_GENERATION,
    )


def name_static_io(captured: CapturedModel) -> CapturedModel:
    """The captured static-cache model with its input specs named as the decoder feeds them (`input_pos`,
    `past_key_values_{i}_key`), not the program's `past_0`; the outputs are named by the wrapper already."""
    from dataclasses import replace

    from compiler.decoding import static_input_names

    names = static_input_names((len(captured.inputs) - 2) // 2)
    return replace(captured, inputs=[replace(s, name=n) for s, n in zip(captured.inputs, names)])
