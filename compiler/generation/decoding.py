"""The decoding loop of a text-generation export (see compiler/generation/export.py): a step function over named feeds
with the KV cache kept between calls, greedy decoding, and what a decoder's manifest says of it (`DecoderSpec`).
Numpy only: it runs on any runtime's step function (the gate, `kiln run --generate`, benchmarks/bench_generate.py)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from kiln.compiler.errors import UsageError
from kiln.compiler.types import Feeds

if TYPE_CHECKING:
    from kiln.compiler.types import TensorSpec

TEXT_GENERATION = "text-generation"  # --task: a causal LM exported with its KV cache, decoded by this loop
FORWARD = "forward"  # --task: the same model, one full-sequence forward
TASKS = (TEXT_GENERATION, FORWARD)
MAX_NEW_TOKENS = 4096  # `kiln run --generate --max-new-tokens`: at most this many (and within the model's positions)


@dataclass(frozen=True)
class DecoderSpec:
    """What a text-generation export must know of its causal LM beyond the graph: the vocabulary, the positions
    the model has, and each layer's attention (`kiln.compiler.generation.attention_masks`). Recorded in the manifest's
    `source["decoder"]` and read back, checked, by `kiln run --generate` and `kiln verify`."""

    vocab_size: int
    max_positions: int
    layer_types: tuple[str, ...]
    window: int | None = None
    # A static-cache export's chunked prefill: the tokens its `prefill` signature takes at once (None: no such
    # signature; growing-cache exports take any number of tokens per step).
    prefill_chunk: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "vocab_size": self.vocab_size,
            "max_positions": self.max_positions,
            "layer_types": list(self.layer_types),
            "sliding_window": self.window,
            "prefill_chunk": self.prefill_chunk,
        }

    def of_model(self) -> DecoderSpec:
        """What the causal LM itself declares, without the export's own choices (its prefill chunk)."""
        return replace(self, prefill_chunk=None)

    @classmethod
    def from_dict(cls, data: Any) -> DecoderSpec:
        """The spec a manifest recorded; a UsageError when it is missing or malformed (a hand-edited manifest)."""
        try:
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            vocab, positions, window = data["vocab_size"], data["max_positions"], data["sliding_window"]
            types, chunk = data["layer_types"], data.get("prefill_chunk")
            for value in (vocab, positions, window, chunk):
                if value is not None and (type(value) is not int or not 1 <= value <= 2**31 - 1):
                    raise ValueError(f"{value!r} is not a count")
            if vocab is None or positions is None:
                raise ValueError("vocab_size and max_positions are required")
            if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
                raise ValueError("layer_types is not a list of names")
            return cls(vocab, positions, tuple(types), window, chunk)
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(
                f"the export's manifest has no valid decoder record (source.decoder: {exc})",
                "re-export the model with this version of Kiln",
            ) from None


def input_names(layers: int) -> list[str]:
    """The generation graph's input names, in order."""
    cache = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *cache]


@dataclass(frozen=True)
class CacheLayout:
    """What a step needs to know of the cache: layers, kv heads, head dim and dtype."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str = "float32"

    @classmethod
    def from_specs(cls, inputs: Sequence[TensorSpec]) -> CacheLayout:
        """The layout read from a generation graph's input specs; a UsageError when it has no cache inputs."""
        keys = [s for s in inputs if re.fullmatch(r"past_key_values\.\d+\.key", s.name)]
        if not keys or not isinstance(keys[0].shape[1], int) or not isinstance(keys[0].shape[3], int):
            raise UsageError(
                "this export has no past_key_values inputs: it was not exported for text generation",
                "export the causal LM with --task text-generation",
            )
        return cls(len(keys), keys[0].shape[1], keys[0].shape[3], keys[0].dtype)

    def decoder(self, run: Callable[[Feeds], Feeds]) -> CachedDecoder:
        """A fresh decoding state over `run`."""
        return CachedDecoder(run, self)


class StepRunner(Protocol):
    """What decoding needs of an artifact's runner (`kiln.targets.base.Runner` is one): its step function, and
    whether its runtime keeps the KV cache itself, with a fresh decoding state in that runtime's loop."""

    keeps_cache: bool

    def run(self, feeds: Feeds) -> Feeds: ...

    def decoder(self) -> Callable[[Sequence[int]], np.ndarray]: ...


class RuntimeLoop:
    """The decoding of an artifact whose runtime keeps the KV cache itself (`Runner.keeps_cache`: an OpenVINO
    stateful model, an onnxruntime-genai folder): each decoder is the runner's own (`Runner.decoder`)."""

    def __init__(self, runner: StepRunner):
        self.runner = runner

    def decoder(self, run: Callable[[Feeds], Feeds] | None = None) -> Callable[[Sequence[int]], np.ndarray]:
        """A fresh decoding state in the runtime's loop (`run`, the runner's step function, is not used: the
        runtime feeds its own cache)."""
        return self.runner.decoder()


def decoding_of(
    runner: StepRunner, inputs: Sequence[TensorSpec], spec: DecoderSpec | None = None
) -> CacheLayout | StaticCacheLayout | RuntimeLoop:
    """How an artifact decodes: in its runtime's own loop when the runtime keeps the cache, else by Kiln's
    decoders over its step graph, the cache layout read from its inputs (`layout_of`)."""
    return RuntimeLoop(runner) if runner.keeps_cache else layout_of(inputs, spec)


def layout_of(inputs: Sequence[TensorSpec], spec: DecoderSpec | None = None) -> CacheLayout | StaticCacheLayout:
    """The cache layout of a generation graph from its input specs: static (an `input_pos` input; tflite, tpu) or
    growing (onnx, openvino); a static one with the prefill chunk `spec` records."""
    if any(s.name == POSITION_INPUT for s in inputs):
        chunk = spec.prefill_chunk if spec is not None else None
        return replace(StaticCacheLayout.from_specs(inputs), chunk=chunk or 1)
    return CacheLayout.from_specs(inputs)


class CachedDecoder:
    """One sequence's decoding state over a step function (named feeds -> named outputs): called with the new
    token ids, it runs them with the cache so far, keeps the present cache and returns the last position's logits."""

    def __init__(self, run: Callable[[Feeds], Feeds], layout: CacheLayout):
        self.run, self.layout = run, layout
        shape = (1, layout.kv_heads, 0, layout.head_dim)
        self.cache = [np.zeros(shape, layout.dtype) for _ in range(2 * layout.layers)]
        self.length = 0

    def __call__(self, ids: Sequence[int]) -> np.ndarray:
        seq = len(ids)
        feeds = {
            "input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.ones((1, self.length + seq), np.int64),
            "position_ids": np.arange(self.length, self.length + seq, dtype=np.int64)[None],
        }
        names = input_names(self.layout.layers)
        feeds |= dict(zip(names[3:], self.cache))
        outputs = self.run(feeds)
        self.cache = [outputs[n.replace("past_key_values", "present")] for n in names[3:]]
        self.length += seq
        return np.asarray(outputs["logits"][0, -1])


class RecomputingDecoder(CachedDecoder):
    """The same step without the cache: every call runs the whole sequence so far with an empty past (what a
    full-sequence export must do per token; the benchmark's baseline)."""

    def __call__(self, ids: Sequence[int]) -> np.ndarray:
        self.ids = [*getattr(self, "ids", []), *ids]
        self.length = 0
        self.cache = [np.zeros_like(c[:, :, :0]) for c in self.cache]
        return super().__call__(self.ids)


def greedy(
    step: Callable[[Sequence[int]], np.ndarray], prompt: Sequence[int], n: int
) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding of `n` tokens: `step(prompt)` (prefill), then `step([token])` per new token; the new token ids
    and each step's logits (the logits that chose each token)."""
    if not prompt:
        raise UsageError("the prompt is empty", "give at least one token id")
    tokens: list[int] = []
    logits: list[np.ndarray] = []
    scores = step(list(prompt))
    for i in range(n):
        logits.append(scores)
        tokens.append(int(np.argmax(scores)))
        if i + 1 < n:
            scores = step([tokens[-1]])
    return tokens, logits


POSITION_INPUT = "input_pos"


def static_input_names(layers: int) -> list[str]:
    """The static-cache decode graph's input names, in order (compiler/generation/static_kv_cache.py): underscores, not
    dots, as
    the TFLite and SavedModel signatures take Python identifiers."""
    cache = [f"past_key_values_{i}_{kind}" for i in range(layers) for kind in ("key", "value")]
    return ["input_ids", POSITION_INPUT, *cache]


def static_output_names(layers: int) -> list[str]:
    """The static-cache decode graph's output names, in order."""
    return ["logits", *[f"present_{i}_{kind}" for i in range(layers) for kind in ("key", "value")]]


@dataclass(frozen=True)
class StaticCacheLayout:
    """The cache of a static-cache decode graph: layers, kv heads, its fixed length, head dim and dtype, and the
    tokens its prefill signature takes at once (`chunk`; 1: none, every token is one decode step)."""

    layers: int
    kv_heads: int
    size: int
    head_dim: int
    dtype: str = "float32"
    chunk: int = 1

    @classmethod
    def from_specs(cls, inputs: Sequence[TensorSpec]) -> StaticCacheLayout:
        """The layout read from a static-cache graph's input specs (`past_key_values_{i}_key[1, heads, C, dim]`)."""
        keys = [s for s in inputs if re.fullmatch(r"past_key_values_\d+_key", s.name)]
        shape = keys[0].shape if keys else ()
        if len(shape) != 4 or not all(isinstance(d, int) for d in shape):
            raise UsageError(
                "this export has no static past_key_values inputs: it was not exported for text generation",
                "export the causal LM with --task text-generation",
            )
        return cls(len(keys), int(shape[1]), int(shape[2]), int(shape[3]), keys[0].dtype)

    def decoder(self, run: Callable[[Feeds], Feeds]) -> StaticCachedDecoder:
        """A fresh decoding state over `run`."""
        return StaticCachedDecoder(run, self)


class StaticCachedDecoder:
    """One sequence's decoding state over a static-cache step function: each call runs its token ids at the next
    positions, `layout.chunk` at a time through the prefill signature while a whole chunk is left (and fits the
    cache), the rest one at a time through the decode signature (`run` picks the signature by the shapes of its
    feeds); it keeps the returned cache and returns the last position's logits; a UsageError when the sequence
    would outgrow the cache."""

    def __init__(self, run: Callable[[Feeds], Feeds], layout: StaticCacheLayout):
        self.run, self.layout = run, layout
        shape = (1, layout.kv_heads, layout.size, layout.head_dim)
        self.cache = [np.zeros(shape, layout.dtype) for _ in range(2 * layout.layers)]
        self.length = 0

    def __call__(self, ids: Sequence[int]) -> np.ndarray:
        if self.length + len(ids) > self.layout.size:
            raise UsageError(
                f"{self.length + len(ids)} tokens do not fit the export's static KV cache of {self.layout.size}",
                "ask for fewer tokens (--max-new-tokens), or export again with a larger --cache-size",
            )
        names, outputs_named = static_input_names(self.layout.layers), static_output_names(self.layout.layers)
        logits, done, chunk = np.zeros(0), 0, self.layout.chunk
        while done < len(ids):
            take = chunk if chunk > 1 and len(ids) - done >= chunk else 1
            feeds = {
                "input_ids": np.asarray([ids[done : done + take]], np.int32),
                POSITION_INPUT: np.asarray([self.length], np.int32),
            }
            outputs = self.run(feeds | dict(zip(names[2:], self.cache)))
            self.cache = [np.asarray(outputs[n]) for n in outputs_named[1:]]
            self.length, done = self.length + take, done + take
            logits = np.asarray(outputs["logits"][0, -1])
        return logits


SEPARATOR = r"[ \t]*,[ \t]*|[ \t]+"
PROMPT_SYNTAX = re.compile(rf"[0-9]{{1,64}}(?:(?:{SEPARATOR})[0-9]{{1,64}})*")


def parse_prompt(text: str) -> list[int]:
    """`--generate "1,5,9,3"` (or "1 5 9 3", "1, 5") as token ids: ASCII digits separated by one comma or by
    spaces, nothing else (no `1_0`, no full-width digits, no empty items, no sign)."""
    if not PROMPT_SYNTAX.fullmatch(text.strip(" \t")):
        raise UsageError(
            f"--generate {text[:80]!r}: not a comma list of token ids (ASCII digits, one comma between ids)",
            'e.g. --generate "1,5,9,3"',
        )
    return [int(t) for t in re.split(SEPARATOR, text.strip(" \t"))]


def generate_with_export(
    runner: StepRunner, inputs: Sequence[TensorSpec], spec: DecoderSpec, prompt: Sequence[int], n: int
) -> list[int]:
    """`kiln run --generate`: `n` greedy tokens after `prompt` from an export's runner; a UsageError, before any
    step, for an id outside the vocabulary or more positions than the model (or a static cache) has."""
    if not 1 <= n <= MAX_NEW_TOKENS:
        raise UsageError(f"--max-new-tokens {n}: need 1 to {MAX_NEW_TOKENS}", "use the default of 32")
    bad = next((t for t in prompt if not 0 <= t < spec.vocab_size), None)
    if bad is not None:
        raise UsageError(
            f"token id {bad} is outside the model's vocabulary of {spec.vocab_size}",
            f"give ids from 0 to {spec.vocab_size - 1}",
        )
    layout = decoding_of(runner, inputs, spec)
    capacity, what = spec.max_positions, f"the model's {spec.max_positions} positions"
    if isinstance(layout, StaticCacheLayout) and layout.size < capacity:
        capacity, what = layout.size, f"the export's static KV cache of {layout.size}"
    need = len(prompt) + n - 1  # the last token is chosen, never fed back
    if need > capacity:
        raise UsageError(
            f"a {len(prompt)}-token prompt and {n} new tokens need {need} positions, more than {what}",
            f"use --max-new-tokens {max(1, capacity + 1 - len(prompt))} or less"
            + (", or a larger --cache-size" if isinstance(layout, StaticCacheLayout) else ", or a shorter prompt"),
        )
    tokens, _ = greedy(layout.decoder(runner.run), prompt, n)
    return tokens
