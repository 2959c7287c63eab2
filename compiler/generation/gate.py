"""The parity gate of a text-generation export. Its reference is the user's own causal LM run by transformers,
never Kiln's cache wrapper: compared with the wrapper, a bug in the wrapper (a mask that loses a sliding window, a
key written at the wrong slot) would be compared with itself and pass.

Two checks, both against `CausalLMReference` (the user's model, unmodified, a full-sequence forward):

- **Decoding states** (`decoding_samples`): the step graph's parity input sets are states a real decode reaches,
  made by the user's model: token ids, the model's own KV cache of the ids before them
  (`model(ids, use_cache=True)`), and noise in every cache slot the step must not see (slots past the position,
  positions that left a sliding window). The expected outputs are the model's logits at the new positions and the
  cache with the model's own keys and values at them. A mask one slot too wide sees the noise; a key written at
  the wrong slot differs from the model's.
- **Greedy decoding** (`generation_parity`): the artifact decodes each gate prompt with its own cache fed back
  (`kiln.compiler.generation.decoding.greedy`); the user's model, run once over the prompt and the artifact's tokens,
  gives the
  next-token logits at every step (teacher forcing on the artifact's stream). The tokens must be the model's
  greedy ones and every step's logits within tolerance. The prompts (`gate_prompts`): a short fixed one, and one
  longer than the model's sliding window whose decoding crosses the window twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from kiln.compiler.errors import UnsupportedOpError, UsageError
from kiln.compiler.generation.decoding import (
    MAX_NEW_TOKENS,
    POSITION_INPUT,
    CacheLayout,
    DecoderSpec,
    RuntimeLoop,
    StaticCacheLayout,
    decoding_of,
    greedy,
    input_names,
    static_input_names,
    static_output_names,
)
from kiln.compiler.generation.reference import CausalLMReference
from kiln.compiler.metrics import cosine
from kiln.compiler.parity.gate import ParitySamples
from kiln.compiler.types import Feeds

if TYPE_CHECKING:
    from kiln.compiler.export.artifacts import Artifact
    from kiln.compiler.generation.stream_gate import TokenStream
    from kiln.compiler.types import ParityReport, Tolerance

PARITY_PROMPT = (1, 5, 9, 3)
PARITY_TOKENS = 32
LONG_TOKENS = 16  # the second prompt's new tokens, at least (its length is the window's and 3)
UNWINDOWED_PROMPT = 12  # the second prompt's length when no window binds
SEED = 0
DECODING_STATES = 4  # the decoding states the step is judged on, at least (`--samples` asks for more)


@dataclass(frozen=True)
class GatePrompt:
    """A prompt the gate decodes and how many greedy tokens it asks for."""

    tokens: tuple[int, ...]
    new_tokens: int

    @property
    def positions(self) -> int:
        """The cache positions its decoding fills (the last token is chosen, never fed back)."""
        return len(self.tokens) + self.new_tokens - 1


@dataclass(frozen=True)
class GatePlan:
    """The gate's prompts for one export, and what they cross."""

    prompts: tuple[GatePrompt, ...]
    crossing: str  # e.g. "crosses the 16-token sliding window twice"

    @property
    def positions(self) -> int:
        """The most positions one prompt's decoding fills: what the cache must hold."""
        return max(p.positions for p in self.prompts)


def capacity_of(spec: DecoderSpec, layout: CacheLayout | StaticCacheLayout | RuntimeLoop) -> int:
    """The positions an export can decode: a static cache's length, else the model's positions."""
    return min(layout.size, spec.max_positions) if isinstance(layout, StaticCacheLayout) else spec.max_positions


def gate_prompts(spec: DecoderSpec, capacity: int, strict: bool = False) -> GatePlan:
    """The gate's prompts within `capacity` positions: PARITY_PROMPT with PARITY_TOKENS new tokens, and a seeded
    random prompt longer than the sliding window (when the model has one that binds within `capacity`) whose
    decoding crosses the window twice, and longer than a static cache's prefill chunk (so that it takes the chunk).
    When `capacity` cannot hold that: a UsageError if `strict` (a cache size
    the user chose), else the second prompt decodes as far as the capacity goes (the model's own positions)."""
    window = spec.window if spec.window is not None and spec.window < capacity else None
    length = window + 3 if window is not None else UNWINDOWED_PROMPT
    length = max(length, (spec.prefill_chunk or 0) + 3)  # a static cache's prefill chunk, then decode steps
    new = max(LONG_TOKENS, window or 0)
    tokens = tuple(int(t) for t in np.random.default_rng(SEED).integers(0, spec.vocab_size, length))
    short = GatePrompt(PARITY_PROMPT, PARITY_TOKENS)
    wanted = (short, GatePrompt(tokens, new))
    need = max(p.positions for p in wanted)
    if need <= capacity:
        crossing = f"crosses the {window}-token sliding window twice" if window else _unwindowed(spec, capacity)
        return GatePlan(wanted, crossing)
    if strict:
        what = f", and a {length}-token prompt that crosses the {window}-token sliding window twice" if window else ""
        raise UsageError(
            f"--cache-size {capacity}: the gate decodes {need} positions (a {len(PARITY_PROMPT)}-token prompt and "
            f"{PARITY_TOKENS} tokens{what})",
            f"use --cache-size {need} or more (the model has {spec.max_positions} positions)"
            + (f", or at most {window} (the window never binds then)" if window else ""),
        )
    fitted = tuple(
        GatePrompt(p.tokens[:capacity], max(1, min(p.new_tokens, capacity + 1 - len(p.tokens[:capacity]))))
        for p in wanted
    )
    crossing = f"crosses the {window}-token sliding window once ({capacity} positions hold no more)" if window else ""
    return GatePlan(fitted, crossing or _unwindowed(spec, capacity))


def _unwindowed(spec: DecoderSpec, capacity: int) -> str:
    if spec.window is None:
        return "full attention on every layer"
    return f"the {spec.window}-token sliding window never binds within {capacity} positions"


def judge_generation(
    run: Callable[[Feeds], Feeds],
    layout: CacheLayout | StaticCacheLayout | RuntimeLoop,
    reference: CausalLMReference,
    spec: DecoderSpec,
    precision: str,
    tolerance: Tolerance,
    streams: list[TokenStream] | None = None,
) -> dict[str, Any]:
    """The generation check of an export of `precision` against the user's model: greedy decoding of the gate's
    prompts (fp32, `generation_parity`), or the teacher-forced streams of a weight-quantized export
    (kiln.compiler.generation.stream_gate; `streams` when they were made already)."""
    from kiln.compiler.generation.stream_gate import STREAM_TOLERANCES, reference_streams, stream_parity

    capacity = capacity_of(spec, layout)
    if precision in STREAM_TOLERANCES:
        streams = streams if streams is not None else reference_streams(reference, spec, capacity)
        return stream_parity(run, layout, reference, streams, STREAM_TOLERANCES[precision])
    return generation_parity(run, layout, reference, gate_prompts(spec, capacity), tolerance)


def generation_parity(
    run: Callable[[Feeds], Feeds],
    layout: CacheLayout | StaticCacheLayout | RuntimeLoop,
    reference: CausalLMReference,
    plan: GatePlan,
    tolerance: Tolerance,
) -> dict[str, Any]:
    """Greedy decoding of each prompt of `plan` by the artifact (`run`, its cache fed back; or, for a `RuntimeLoop`,
    the runtime's own loop keeping its cache), judged against the user's model on the same token stream: passed
    when every token is the model's greedy choice and every step's logits are within `tolerance` (elements within
    atol + rtol * |ref| but for `max_mismatch` of them, cosine)."""
    return judge_decoding(decode_prompts(run, layout, plan), reference, plan, tolerance)


Stream = tuple[list[int], list[np.ndarray]]  # an artifact's greedy tokens for one prompt, and its logits at each step


def decode_prompts(
    run: Callable[[Feeds], Feeds], layout: CacheLayout | StaticCacheLayout | RuntimeLoop, plan: GatePlan
) -> list[Stream]:
    """The artifact's greedy decoding of each prompt of `plan` (`run`, its cache fed back): the first half of
    `generation_parity`, apart so that the artifact's runtime can be let go before the user's model runs."""
    return [greedy(layout.decoder(run), prompt.tokens, prompt.new_tokens) for prompt in plan.prompts]


def judge_decoding(
    streams: list[Stream], reference: CausalLMReference, plan: GatePlan, tolerance: Tolerance
) -> dict[str, Any]:
    """The generation record of `decode_prompts`' streams, judged against the user's model (teacher forcing on
    each stream): the second half of `generation_parity`."""
    records = [_judge_one(stream, reference, prompt, tolerance) for stream, prompt in zip(streams, plan.prompts)]
    failing = next((i for i, r in enumerate(records) if not r["identical"]), None)
    return {
        "passed": all(r["identical"] and r["logits_within_tolerance"] for r in records),
        "against": reference.name,
        "crossing": plan.crossing,
        "tokens": sum(r["tokens"] for r in records),
        "identical": failing is None,
        "first_mismatch": None if failing is None else {"prompt": failing, "step": records[failing]["first_mismatch"]},
        "max_abs_logit_err": max(r["max_abs_logit_err"] for r in records),
        "min_logit_cosine": min(r["min_logit_cosine"] for r in records),
        "logits_within_tolerance": all(r["logits_within_tolerance"] for r in records),
        "prompts": records,
    }


def _judge_one(
    stream: Stream, reference: CausalLMReference, prompt: GatePrompt, tolerance: Tolerance
) -> dict[str, Any]:
    """One prompt's greedy decoding by the artifact, judged step by step against the user's model."""
    got, got_logits = stream
    want_logits = reference.next_logits([*prompt.tokens, *got[:-1]])[len(prompt.tokens) - 1 :]
    want = [int(np.argmax(row)) for row in want_logits]
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64)) for a, b in zip(got_logits, want_logits)]
    errors = [float(np.max(np.abs(a - b))) for a, b in pairs]
    outside = [float(np.mean(~(np.abs(a - b) <= tolerance.atol + tolerance.rtol * np.abs(b)))) for a, b in pairs]
    cosines = [cosine(a, b) for a, b in pairs]
    return {
        "prompt": list(prompt.tokens),
        "tokens": prompt.new_tokens,
        "identical": first is None,
        "first_mismatch": first,
        "max_abs_logit_err": max(errors),
        "min_logit_cosine": min(cosines),
        "logits_within_tolerance": max(outside) <= tolerance.max_mismatch and min(cosines) >= tolerance.min_cosine,
        "generated": got,
        "reference": want,
    }


def decoding_samples(
    reference: CausalLMReference,
    layout: CacheLayout | StaticCacheLayout,
    spec: DecoderSpec,
    count: int = DECODING_STATES,
) -> ParitySamples:
    """The step graph's parity sets: `count` (at least DECODING_STATES) decoding states made by the user's model,
    with the outputs it expects (see the module docstring)."""
    capacity = capacity_of(spec, layout)
    rng = np.random.default_rng(SEED + 1)
    sets = _states(layout, spec, capacity, max(count, DECODING_STATES), rng)
    inputs, origins, expected = [], [], []
    for past, new, rows in sets:
        ids = rng.integers(0, spec.vocab_size, (rows, past + new))
        logits, cache = reference.run(ids)
        before = reference.run(ids[:, :past])[1] if past else [(None, None)] * len(cache)
        _check_cache(reference, cache, layout)
        if isinstance(layout, StaticCacheLayout):
            feeds, want = _static_state(ids, past, before, _fresh(reference, ids, past, cache), layout, rng)
            origins.append(f"decoding state: position {past}" if new == 1 else _prefill_origin(past, new))
        else:
            feeds, want = _growing_state(ids, past, before, cache, layout, rng)
            origins.append(f"decoding state: past {past}, {new} new token(s), batch {rows}")
        inputs.append(feeds)
        expected.append({"logits": logits[:, past:]} | want)
    return ParitySamples(inputs, origins, expected)


def _states(
    layout: CacheLayout | StaticCacheLayout, spec: DecoderSpec, capacity: int, count: int, rng: np.random.Generator
) -> list[tuple[int, int, int]]:
    """(past, new tokens, rows) of each decoding state: an empty cache, a short past, and pasts beyond the window
    (at the capacity's last position for a static cache); then random ones."""
    far = max(1, min(capacity - 3, (spec.window or 8) + 4))
    if isinstance(layout, StaticCacheLayout):
        pasts = [0, min(3, capacity - 1), far, capacity - 1]
        pasts += [int(rng.integers(0, capacity)) for _ in range(count - len(pasts))]
        chunk = layout.chunk if 1 < layout.chunk <= capacity else 0  # the prefill signature's states: from the
        prefills = [(0, chunk, 1), (max(0, min(far, capacity - chunk)), chunk, 1), (capacity - chunk, chunk, 1)]
        return [(p, 1, 1) for p in pasts] + (prefills if chunk else [])  # start, past the window, to the last slot
    most = max(1, min(3, (spec.window or 4) - 1, capacity - 1))  # new tokens a sliding cache layer still holds
    states = [(0, min(6, capacity), 2), (min(5, capacity - 1), 1, 2), (max(0, far - most), most, 1), (far, 1, 2)]
    states += [(int(rng.integers(1, capacity)), 1, 1) for _ in range(count - len(states))]
    return states


def _check_cache(
    reference: CausalLMReference, cache: list[tuple[np.ndarray, np.ndarray]], layout: CacheLayout | StaticCacheLayout
) -> None:
    """Refuse (UnsupportedOpError) a model that keeps its cache in another layout than the export's inputs."""
    wanted = (layout.layers, layout.kv_heads, layout.head_dim)
    got = (len(cache), cache[0][0].shape[1], cache[0][0].shape[3]) if cache else (0, 0, 0)
    if got != wanted:
        raise UnsupportedOpError(
            f"{type(reference.model).__name__} keeps its KV cache as {got[0]} layers of {got[1]} heads x {got[2]} "
            f"while the export takes {wanted[0]} x {wanted[1]} x {wanted[2]}: the gate cannot compare them",
            "export it with --task forward (one full-sequence forward)",
        )


def _noise_like(keys: np.ndarray | None, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Cache contents a step must not see: random, at the spread of the model's own keys."""
    spread = float(np.std(keys)) if keys is not None and keys.size else 1.0
    return rng.normal(0.0, spread or 1.0, shape).astype(np.float32)


def _kept(tensor: np.ndarray | None, past: int, rng: np.random.Generator, like: np.ndarray) -> np.ndarray:
    """A layer's cache of the first `past` positions: the model's own where it kept them (a sliding layer keeps
    only its window's last positions), noise before that."""
    rows, heads, _, dim = like.shape
    kept = 0 if tensor is None else tensor.shape[2]
    filler = _noise_like(tensor if tensor is not None else like, (rows, heads, past - kept, dim), rng)
    return filler if tensor is None else np.concatenate([filler, tensor], axis=2)


def _growing_state(
    ids: np.ndarray,
    past: int,
    before: list[tuple[Any, Any]],
    after: list[tuple[np.ndarray, np.ndarray]],
    layout: CacheLayout,
    rng: np.random.Generator,
) -> tuple[Feeds, Feeds]:
    """A growing-cache step's feeds and the cache it must return: its past, then the model's new keys/values."""
    rows, total = ids.shape
    new = total - past
    names = input_names(layout.layers)
    feeds: Feeds = {
        "input_ids": ids[:, past:].astype(np.int64),
        "attention_mask": np.ones((rows, total), np.int64),
        "position_ids": np.tile(np.arange(past, total, dtype=np.int64), (rows, 1)),
    }
    want: Feeds = {}
    for i, ((keys, values), (full_keys, full_values)) in enumerate(zip(before, after)):
        for kind, given, full in (("key", keys, full_keys), ("value", values, full_values)):
            feeds[names[3 + 2 * i + (kind == "value")]] = fed = _kept(given, past, rng, full)
            want[f"present.{i}.{kind}"] = np.concatenate([fed, full[:, :, full.shape[2] - new :]], axis=2)
    return feeds, want


def _prefill_origin(past: int, new: int) -> str:
    return f"decoding state: positions {past} to {past + new - 1} (prefill)"


def _fresh(
    reference: CausalLMReference, ids: np.ndarray, past: int, cache: list[tuple[np.ndarray, np.ndarray]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each layer's keys and values of the new positions `past`.. of `ids`, by the user's model: from its cache of
    the whole sequence where it kept them all, else (a sliding layer keeps only its window) from one run per new
    position, whose last key is that position's."""
    new = ids.shape[1] - past
    if all(keys.shape[2] >= new for keys, _ in cache):
        return [(keys[:, :, -new:], values[:, :, -new:]) for keys, values in cache]
    runs = [reference.run(ids[:, : past + i + 1])[1] for i in range(new)]
    return [
        tuple(np.concatenate([run[layer][kind][:, :, -1:] for run in runs], axis=2) for kind in (0, 1))  # type: ignore[misc]
        for layer in range(len(cache))
    ]


def _static_state(
    ids: np.ndarray,
    past: int,
    before: list[tuple[Any, Any]],
    fresh: list[tuple[np.ndarray, np.ndarray]],
    layout: StaticCacheLayout,
    rng: np.random.Generator,
) -> tuple[Feeds, Feeds]:
    """A static-cache step's feeds (the model's cache in slots [0, past), noise after) and the cache it must
    return: the same with the model's new keys and values (`fresh`) in the slots from `past` on."""
    names, outputs = static_input_names(layout.layers), static_output_names(layout.layers)
    feeds: Feeds = {"input_ids": ids[:, past:].astype(np.int32), POSITION_INPUT: np.asarray([past], np.int32)}
    want: Feeds = {}
    for i, ((keys, values), (new_keys, new_values)) in enumerate(zip(before, fresh)):
        for j, (given, new) in enumerate(((keys, new_keys), (values, new_values))):
            rest = _noise_like(new, (1, layout.kv_heads, layout.size - past, layout.head_dim), rng)
            fed = np.concatenate([_kept(given, past, rng, new), rest], axis=2)
            feeds[names[2 + 2 * i + j]] = fed
            written = fed.copy()
            written[:, :, past : past + new.shape[2]] = new
            want[outputs[1 + 2 * i + j]] = written
    return feeds, want


def check_record(record: Any, spec: DecoderSpec, capacity: int) -> list[tuple[GatePrompt, list[int]]]:
    """The prompts and reference tokens of a stored `parity.generation` record, checked as the command line checks
    them (ids within the vocabulary, tokens within the capacity); a UsageError for a malformed or forged one."""
    try:
        prompts = record["prompts"]
        if not isinstance(prompts, list) or not 1 <= len(prompts) <= 8:
            raise ValueError("prompts is not a list of 1 to 8 records")
        checked = []
        for entry in prompts:
            tokens, count, want = entry["prompt"], entry["tokens"], entry["reference"]
            if type(count) is not int or not 1 <= count <= MAX_NEW_TOKENS:
                raise ValueError(f"tokens={count!r} is not a count from 1 to {MAX_NEW_TOKENS}")
            for ids in (tokens, want):
                if not isinstance(ids, list) or not ids or len(ids) > capacity:
                    raise ValueError("a token list is empty, too long or not a list")
                if not all(type(t) is int and 0 <= t < spec.vocab_size for t in ids):
                    raise ValueError(f"a token id is not an integer from 0 to {spec.vocab_size - 1}")
            prompt = GatePrompt(tuple(tokens), count)
            if len(want) != count or prompt.positions > capacity:
                raise ValueError(f"{count} tokens after {len(tokens)} do not fit the export's {capacity} positions")
            checked.append((prompt, want))
        return checked
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(
            f"the manifest's parity.generation record is malformed ({exc})", "re-export the model"
        ) from None


def replay_generation(
    report: ParityReport, artifact: Artifact, spec: DecoderSpec, stored_record: dict[str, Any]
) -> ParityReport:
    """`kiln verify` of a text-generation export without the model: the artifact decodes the stored prompts again
    and must give the reference tokens recorded at export (the user's model's), or, quantized, is judged again on
    the stored streams (`stream_gate.replay_streams`); the report with that record."""
    from kiln.compiler.export.artifacts import load_runner
    from kiln.compiler.generation.stream_gate import replay_streams, stream_gated

    runner = load_runner(artifact)
    layout = decoding_of(runner, artifact.manifest.inputs, spec)
    if stream_gated(artifact.manifest.precision):
        streams = replay_streams(runner.run, layout, stored_record, spec, capacity_of(spec, layout))
        return replace(report, passed=report.passed and streams["passed"], generation=streams)
    stored = check_record(stored_record, spec, capacity_of(spec, layout))
    records: list[dict[str, Any]] = []
    for prompt, want in stored:
        got, _ = greedy(layout.decoder(runner.run), prompt.tokens, prompt.new_tokens)
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        records.append({"prompt": list(prompt.tokens), "tokens": len(got), "identical": first is None,
                        "first_mismatch": first, "generated": got, "reference": want})  # fmt: skip
    failing = next((i for i, r in enumerate(records) if not r["identical"]), None)
    record = {
        "passed": failing is None,
        "against": "reference tokens stored at export",
        "crossing": stored_record.get("crossing"),
        "tokens": sum(r["tokens"] for r in records),
        "identical": failing is None,
        "first_mismatch": None if failing is None else {"prompt": failing, "step": records[failing]["first_mismatch"]},
        "logits_within_tolerance": stored_record.get("logits_within_tolerance"),
        "max_abs_logit_err": stored_record.get("max_abs_logit_err"),
        "prompts": records,
    }
    return replace(report, passed=report.passed and failing is None, generation=record)
