"""The decoding loop of a text-generation export (see compiler/generation.py): a step function over named feeds
with the KV cache kept between calls, greedy decoding, and the generation parity check. Numpy only: it runs on any
runtime's step function (the gate, `kiln run --generate`, benchmarks/bench_generate.py)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from compiler.errors import UsageError

if TYPE_CHECKING:
    from compiler.artifacts import Artifact
    from compiler.types import ParityReport, TensorSpec, Tolerance

Feeds = dict[str, np.ndarray]
PARITY_TOKENS = 32
PARITY_PROMPT = (1, 5, 9, 3)


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


def layout_of(inputs: Sequence[TensorSpec]) -> CacheLayout | StaticCacheLayout:
    """The cache layout of a generation graph from its input specs: static (an `input_pos` input; tflite, tpu) or
    growing (onnx, openvino)."""
    if any(s.name == POSITION_INPUT for s in inputs):
        return StaticCacheLayout.from_specs(inputs)
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


def generation_parity(
    run: Callable[[Feeds], Feeds],
    reference: Callable[[Feeds], Feeds],
    layout: CacheLayout | StaticCacheLayout,
    tolerance: Tolerance,
    prompt: Sequence[int] = PARITY_PROMPT,
    n: int = PARITY_TOKENS,
) -> dict[str, Any]:
    """Greedy decoding of `n` tokens by the artifact and by the reference on the same prompt: passed when the tokens
    are identical and every step's logits are within `tolerance` (atol + rtol * |ref|, cosine)."""
    from compiler.metrics import cosine

    got, got_logits = greedy(layout.decoder(run), prompt, n)
    want, want_logits = greedy(layout.decoder(reference), prompt, n)
    same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), n)  # steps with the same prefix
    pairs = list(zip(got_logits[: same + 1], want_logits[: same + 1]))[:n]
    errors = [float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in pairs]
    outside = [float(np.mean(np.abs(a - b) > tolerance.atol + tolerance.rtol * np.abs(b))) for a, b in pairs]
    cosines = [cosine(a, b) for a, b in pairs]
    within = max(outside) <= tolerance.max_mismatch and min(cosines) >= tolerance.min_cosine
    return {
        "passed": same == n and within,
        "prompt": [int(t) for t in prompt],
        "tokens": n,
        "identical": same == n,
        "first_mismatch": None if same == n else same,
        "max_abs_logit_err": max(errors),
        "min_logit_cosine": min(cosines),
        "logits_within_tolerance": within,
        "generated": got,
        "reference": want,
    }


POSITION_INPUT = "input_pos"


def static_input_names(layers: int) -> list[str]:
    """The static-cache decode graph's input names, in order (compiler/static_cache.py): underscores, not dots, as
    the TFLite and SavedModel signatures take Python identifiers."""
    cache = [f"past_key_values_{i}_{kind}" for i in range(layers) for kind in ("key", "value")]
    return ["input_ids", POSITION_INPUT, *cache]


def static_output_names(layers: int) -> list[str]:
    """The static-cache decode graph's output names, in order."""
    return ["logits", *[f"present_{i}_{kind}" for i in range(layers) for kind in ("key", "value")]]


@dataclass(frozen=True)
class StaticCacheLayout:
    """The cache of a static-cache decode graph: layers, kv heads, its fixed length, head dim and dtype."""

    layers: int
    kv_heads: int
    size: int
    head_dim: int
    dtype: str = "float32"

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
    """One sequence's decoding state over a static-cache step function: each call runs its token ids one at a
    time at the next positions (the prompt too: the graph takes one token), keeps the returned cache and returns
    the last position's logits; a UsageError when the sequence would outgrow the cache."""

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
        logits = np.zeros(0)
        for token in ids:
            feeds = {"input_ids": np.asarray([[token]], np.int32), POSITION_INPUT: np.asarray([self.length], np.int32)}
            outputs = self.run(feeds | dict(zip(names[2:], self.cache)))
            self.cache = [np.asarray(outputs[n]) for n in outputs_named[1:]]
            self.length += 1
            logits = np.asarray(outputs["logits"][0, -1])
        return logits


def parse_prompt(text: str) -> list[int]:
    """`--generate "1,5,9,3"` as token ids."""
    try:
        ids = [int(t) for t in text.replace(" ", ",").split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--generate {text!r}: not a comma list of token ids", 'e.g. --generate "1,5,9,3"') from None
    if not ids or min(ids) < 0:
        raise UsageError(f"--generate {text!r}: need at least one non-negative token id", 'e.g. --generate "1,5,9,3"')
    return ids


def generate_with_export(
    run: Callable[[Feeds], Feeds], inputs: Sequence[TensorSpec], prompt: Sequence[int], n: int
) -> list[int]:
    """`kiln run --generate`: `n` greedy tokens after `prompt` from an export's step function."""
    if n < 1:
        raise UsageError(f"--max-new-tokens {n}: need at least 1", "use the default of 32")
    layout = layout_of(inputs)
    if isinstance(layout, StaticCacheLayout) and len(prompt) + n - 1 > layout.size:
        raise UsageError(
            f"a {len(prompt)}-token prompt and {n} new tokens need {len(prompt) + n - 1} positions, more than the "
            f"export's static KV cache of {layout.size}",
            f"use --max-new-tokens {max(1, layout.size + 1 - len(prompt))} or less, or a larger --cache-size",
        )
    tokens, _ = greedy(layout.decoder(run), prompt, n)
    return tokens


def replay_generation(report: ParityReport, artifact: Artifact, stored: dict[str, Any]) -> ParityReport:
    """`kiln verify` of a text-generation export: the artifact decodes the stored prompt again and must give the
    reference tokens recorded at export (PyTorch's); the report with that record as `generation`."""
    from dataclasses import replace

    from compiler.artifacts import load_runner

    runner = load_runner(artifact)
    tokens = generate_with_export(runner.run, artifact.manifest.inputs, stored["prompt"], int(stored["tokens"]))
    want = [int(t) for t in stored["reference"]]
    same = next((i for i, (a, b) in enumerate(zip(tokens, want)) if a != b), len(want))
    record = {
        "passed": tokens == want,
        "prompt": stored["prompt"],
        "tokens": len(tokens),
        "identical": tokens == want,
        "first_mismatch": None if tokens == want else same,
        "against": "reference tokens stored at export",
        "logits_within_tolerance": stored.get("logits_within_tolerance"),
        "max_abs_logit_err": stored.get("max_abs_logit_err"),
        "generated": tokens,
        "reference": want,
    }
    return replace(report, passed=report.passed and record["passed"], generation=record)
