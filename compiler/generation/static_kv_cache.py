"""Text-generation export with a **static** KV cache, for the targets whose shapes are fixed (`tflite`, `tpu`).

Two programs of fixed shapes over one cache of fixed length C (`--cache-size`, default `DEFAULT_CACHE_SIZE`),
given in and returned whole, batch 1: the decode step (one token, signature `serving_default`) and the chunked
prefill (`PREFILL_CHUNK` tokens at once, at most C, signature `prefill`), so that a prompt of n tokens takes
n // K prefill calls and n % K decode steps, not n steps. The new keys and values are written into the cache
without scatter or index_copy: one token's with a one-hot `where` on `input_pos` (TFLite and XLA convert it to
SELECT), a chunk's as a one-hot [K, C] matrix times the new keys (each slot receives one key exactly: one term
of the sum is not zero), then `where`; slot j holds position j, and each layer's additive mask, built in the graph
from the positions, lets each query see the slots its attention sees (`kiln.compiler.generation.attention_masks`:
positions <= its own, and only the last `sliding_window` of them on a sliding layer). No ring buffer: a sliding
layer's cache is as long as the others (simpler, and the same tokens; a ring would save memory on models with long
caches and short windows). No mutable buffers: converters take plain I/O best (litert-torch's generative API and
transformers' executorch StaticCache keep the cache in buffers instead). On `tflite` the two signatures share one
copy of the weights; on `tpu` each StableHLO program inlines its own (the SavedModel holds them twice).

I/O (ids and position int32): `input_ids[1, 1]` (prefill: `[1, K]`), `input_pos[1]` (the first new token's
position), `past_key_values_{i}_key|value[1, kv_heads, C, head_dim]` -> `logits[1, 1, vocab]` (prefill:
`[1, K, vocab]`), `present_{i}_key|value[1, kv_heads, C, head_dim]` (underscores, not the onnx export's dots: the
TFLite and SavedModel signatures take Python identifiers).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from kiln.compiler.generation.attention_masks import AttentionPattern
from kiln.compiler.generation.causal_lm import cache_shape, decoder_program, decoder_source, decoder_spec
from kiln.compiler.generation.decoding import DecoderSpec, static_output_names
from torch import nn

if TYPE_CHECKING:
    from kiln.compiler.capture.program import CapturedModel
    from kiln.compiler.capture.sources import ModelSource

DEFAULT_CACHE_SIZE = 64
PREFILL_CHUNK = 16  # tokens the prefill signature takes at once (at most the cache's length)
PREFILL_SIGNATURE = "prefill"


def _static_layer_class() -> type:
    """A transformers cache layer over given key/value tensors of fixed length, written functionally (a one-hot
    `where` at the step's position) rather than in place; built lazily (transformers is imported on use)."""
    from transformers.cache_utils import StaticLayer

    class FunctionalStaticLayer(StaticLayer):  # type: ignore[misc]
        def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor):
            super().__init__(max_cache_len=int(keys.shape[2]))
            self.keys, self.values, self.slots, self.is_initialized = keys, values, slots, True
            self.dtype, self.device = keys.dtype, keys.device

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            assert self.keys is not None and self.values is not None  # set at construction
            self.keys = _written(self.slots, key_states, self.keys)
            self.values = _written(self.slots, value_states, self.values)
            return self.keys, self.values

    return FunctionalStaticLayer


def _written(slots: torch.Tensor, new: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """`cache` [1, heads, C, dim] with the new keys [1, heads, K, dim] in the slots of the one-hot `slots` [K, C]:
    one token by a `where`, a chunk by the one-hot matrix product (exact: one term per slot), then a `where`."""
    if new.shape[2] == 1:
        return torch.where(slots.view(1, 1, -1, 1), new, cache)
    placed = torch.matmul(slots.to(new.dtype).transpose(0, 1), new)
    return torch.where(slots.any(dim=0).view(1, 1, -1, 1), placed, cache)


class CausalLMWithStaticCache(nn.Module):
    """A causal LM's decode step over a static cache taking flat tensors (see the module docstring)."""

    def __init__(self, model: nn.Module, cache_size: int):
        super().__init__()
        self.model = model
        config: Any = model.config
        self.layers = int(config.num_hidden_layers)
        self.cache_size = cache_size
        self.prefill_chunk = min(PREFILL_CHUNK, cache_size)  # 1: no prefill signature
        self.layer_class = _static_layer_class()
        self.pattern = AttentionPattern.of(config)

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor, *past: torch.Tensor) -> dict[str, torch.Tensor]:
        from transformers.cache_utils import Cache

        slots = torch.arange(self.cache_size, dtype=input_pos.dtype)
        positions = input_pos + torch.arange(input_ids.shape[1], dtype=input_pos.dtype)
        written = slots.view(1, -1) == positions.view(-1, 1)  # [K, C]: the slot of each new token
        mask = self.pattern.masks(positions, slots, None, past[0].dtype)
        layers = [self.layer_class(past[2 * i], past[2 * i + 1], written) for i in range(self.layers)]
        cache = Cache(layers=layers)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions.view(1, -1),
            past_key_values=cache,
            use_cache=True,
        )
        tensors = [out.logits, *[t for layer in layers for t in (layer.keys, layer.values)]]
        return dict(zip(static_output_names(self.layers), tensors))


def static_examples(config: Any, cache_size: int, dtype: torch.dtype, tokens: int = 1) -> tuple[torch.Tensor, ...]:
    """Example inputs of the decode graph (`tokens` 1) or the prefill graph: tokens from position 3 over a random
    cache; int32 ids and position (TFLite runs 64-bit I/O as 32-bit, and 32-bit is what TPUs take)."""
    layers, kv_heads, head_dim = cache_shape(config)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(config.vocab_size), (1, tokens), generator=generator, dtype=torch.int32)
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
    size = check_cache_size(cache_size, replace(decoder_spec(source.module), prefill_chunk=PREFILL_CHUNK))
    wrapper = CausalLMWithStaticCache(source.module, size).eval()
    chunk = wrapper.prefill_chunk if wrapper.prefill_chunk > 1 else None
    spec = replace(decoder_spec(source.module), prefill_chunk=chunk)
    examples = static_examples(config, size, next(source.module.parameters()).dtype)
    return decoder_source(source, wrapper, examples, f"static KV cache of {size}", spec=spec)


def name_static_io(captured: CapturedModel) -> CapturedModel:
    """The captured static-cache model with its input specs named as the decoder feeds them (`input_pos`,
    `past_key_values_{i}_key`), not the program's `past_0` (the outputs are named by the wrapper already), and its
    chunked prefill program as a second signature (`PREFILL_SIGNATURE`), exported from the same wrapper."""
    from kiln.compiler.capture.program import CapturedModel, fx_signature
    from kiln.compiler.generation.decoding import static_input_names

    names = static_input_names((len(captured.inputs) - 2) // 2)
    captured = replace(captured, inputs=[replace(s, name=n) for s, n in zip(captured.inputs, names)])
    wrapper = captured.eager.module if captured.eager is not None else None
    if not isinstance(wrapper, CausalLMWithStaticCache) or wrapper.prefill_chunk < 2:
        return captured
    model: Any = wrapper.model
    dtype = next(model.parameters()).dtype
    examples = static_examples(model.config, wrapper.cache_size, dtype, wrapper.prefill_chunk)
    program = decoder_program(wrapper, examples, f"the {wrapper.prefill_chunk}-token prefill with a static KV cache")
    inputs, outputs = fx_signature(program, [s.name for s in captured.outputs])
    prefill = CapturedModel(program, None, [replace(s, name=n) for s, n in zip(inputs, names)], outputs, 0, None)
    return replace(captured, signatures=((PREFILL_SIGNATURE, prefill),))
