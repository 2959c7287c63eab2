"""The gate of a weight-quantized text-generation export (`--precision int8|int4`), against the user's fp32 model.

Quantized weights move every logit a little, so the fp32 rule (the artifact's greedy tokens are the model's, every
step within a tight tolerance) cannot hold: one flipped near-tie sends the two decodings apart for good. The gate
judges the artifact instead on the same token streams as the user's model, teacher-forced:

- **Streams** (`reference_streams`): STREAM_PROMPTS seeded random prompts of different lengths, each continued by
  the user's model's own greedy tokens (transformers with its own cache; alone up to the longest prompt's length,
  then all streams together) to STREAM_TOKENS tokens (fewer when the export's positions or static cache hold
  fewer): several hundred predicted positions in all, crossing a model's sliding window several times, and
  prompts longer than a static cache's prefill chunk.
- **The artifact on them** (`stream_parity`): it prefills each prompt with its own cache (`layout.decoder`: a
  static cache's chunked prefill too), then is fed the stream's next token at every step (teacher forcing),
  its logits kept at every step. The user's model, run once over the stream, gives its logits at the same
  positions.
- **Judged** per precision (`STREAM_TOLERANCES`, recorded in the manifest with the figures): the fraction of
  decided positions whose next-token argmax is the model's (`top1`), the mean cosine of a step's logits with the
  model's (`mean_logit_cosine`), and the ratio of the artifact's perplexity on the streams to the model's
  (`ppl_ratio`: exp of the mean next-token negative log-likelihood of the stream's own tokens). The cosines of
  every step are recorded, their mean judged (one step's cosine swings where the model's logits are flat).
- **Decided positions** follow the classifier gate's rule (`kiln.compiler.metrics.top1_rows`): the model's
  top-1/top-2 margin exceeds NEAR_TIE_FACTOR times the step's RMS logit error, so the quantization error alone
  cannot explain a flip. Near-ties and their flips are recorded (`top1_all` counts every position), not counted:
  4-bit rounding flips the near-ties of a model with flat logits (a 20M Llama at transformers' 0.02 init agreed
  on 26% of all positions at int4 with a perplexity ratio of 1.09). With fewer than MIN_DECIDED_ROWS decided
  positions top-1 is not decidable, and the cosine and perplexity decide alone.

`kiln verify` without the model (`replay_streams`) feeds the stored streams again and recomputes the top-1 agreement
with the stored reference argmaxes on the positions decided at export, and the perplexity ratio with the stored
reference likelihood (the cosine needs the model's logits: `kiln verify --model` recomputes everything).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from kiln.compiler.errors import UsageError
from kiln.compiler.metrics import MIN_DECIDED_ROWS, cosine, next_token_nll, top1_rows

if TYPE_CHECKING:
    from kiln.compiler.generation.decoding import CacheLayout, DecoderSpec, RuntimeLoop, StaticCacheLayout
    from kiln.compiler.generation.reference import CausalLMReference
    from kiln.compiler.types import Feeds

STREAM_PROMPTS = (4, 6, 8, 12, 16, 24)  # the prompt lengths of the streams (16 and 24: a 16-token prefill chunk)
STREAM_TOKENS = 64  # each stream's length, prompt included (at most the export's capacity + 1)
SEED = 7


@dataclass(frozen=True)
class StreamTolerance:
    """What a weight-quantized export must keep of the user's model on the gate's streams: the teacher-forced
    next-token top-1 agreement, the worst step's logit cosine and the perplexity ratio (artifact / model)."""

    min_top1: float
    min_mean_cosine: float
    max_ppl_ratio: float

    def check(self) -> StreamTolerance:
        """Itself, when every threshold is a finite number in range (a stored record may be forged)."""
        fractions = (self.min_top1, self.min_mean_cosine)
        ok = all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in asdict(self).values()
        )
        if not ok or not all(0 <= v <= 1 for v in fractions) or self.max_ppl_ratio < 1:
            raise ValueError(f"thresholds {asdict(self)} are not numbers in range")
        return self


# Per precision, from the figures of benchmarks/bench_llm_quant.py (the held-out decoder families of
# tests/models/decoders.py on onnx, openvino and tflite, and the planted too-coarse quantizations it rejects).
STREAM_TOLERANCES = {
    "int8": StreamTolerance(min_top1=0.85, min_mean_cosine=0.99, max_ppl_ratio=1.05),
    "int4": StreamTolerance(min_top1=0.40, min_mean_cosine=0.80, max_ppl_ratio=2.0),
}


def stream_gated(precision: str) -> bool:
    """Whether a text-generation export of `precision` is judged on the streams (weight-quantized) rather than on
    identical greedy tokens (fp32)."""
    return precision in STREAM_TOLERANCES


@dataclass(frozen=True)
class TokenStream:
    """A prompt and the stream it starts: the prompt, then the user's model's greedy tokens."""

    prompt_length: int
    tokens: tuple[int, ...]

    @property
    def scored(self) -> int:
        """The positions judged: from the prompt's last token, each predicting the next token of the stream."""
        return len(self.tokens) - self.prompt_length


def reference_streams(reference: CausalLMReference, spec: DecoderSpec, capacity: int) -> list[TokenStream]:
    """The gate's streams within `capacity` positions (see the module docstring)."""
    length = min(STREAM_TOKENS, capacity + 1, spec.max_positions)
    rng = np.random.default_rng(SEED)
    prompts = [[int(t) for t in rng.integers(0, spec.vocab_size, min(size, length - 1))] for size in STREAM_PROMPTS]
    return [
        TokenStream(len(prompt), tuple(tokens)) for prompt, tokens in zip(prompts, reference.continued(prompts, length))
    ]


def teacher_forced(
    run: Callable[[Feeds], Feeds], layout: CacheLayout | StaticCacheLayout | RuntimeLoop, stream: TokenStream
) -> np.ndarray:
    """The artifact's logits [scored, vocab] on `stream`: the prompt prefilled, then each next token of the stream
    fed with the cache the artifact returned; row i predicts token prompt_length + i."""
    decoder = layout.decoder(run)
    rows = [decoder(list(stream.tokens[: stream.prompt_length]))]
    rows += [decoder([token]) for token in stream.tokens[stream.prompt_length : -1]]
    return np.stack(rows)


def stream_parity(
    run: Callable[[Feeds], Feeds],
    layout: CacheLayout | StaticCacheLayout | RuntimeLoop,
    reference: CausalLMReference,
    streams: Sequence[TokenStream],
    tolerance: StreamTolerance,
) -> dict[str, Any]:
    """The artifact judged on `streams` against the user's model (see the module docstring): the record the
    manifest keeps (`parity.generation`), passed or not."""
    records = []
    for stream in streams:
        got = teacher_forced(run, layout, stream)
        want = reference.next_logits(stream.tokens)[stream.prompt_length - 1 : -1]
        targets = np.asarray(stream.tokens[stream.prompt_length :])
        agrees, decided = top1_rows(got, want)
        records.append(
            {
                "prompt": list(stream.tokens[: stream.prompt_length]),
                "stream": list(stream.tokens[stream.prompt_length :]),
                "reference_top1": [int(t) for t in np.argmax(want, axis=-1)],
                "decided": [bool(d) for d in decided],
                **_agreement(agrees, decided),
                "logit_cosines": [round(cosine(a, b), 6) for a, b in zip(got, want)],
                "nll": float(np.sum(next_token_nll(got, targets))),
                "reference_nll": float(np.sum(next_token_nll(want, targets))),
            }
        )
    return _judged(records, tolerance, reference.name)


def _agreement(agrees: np.ndarray, decided: np.ndarray) -> dict[str, int]:
    """A stream's top-1 counts: agreeing positions among all and among the decided ones, and the decided count."""
    return {
        "top1_agreed_all": int(np.count_nonzero(agrees)),
        "top1_agreed": int(np.count_nonzero(agrees & decided)),
        "top1_decided": int(np.count_nonzero(decided)),
    }


def _judged(records: list[dict[str, Any]], tolerance: StreamTolerance, against: str) -> dict[str, Any]:
    """The generation record of stream records: totals, the figures and the verdict."""
    positions = sum(len(r["stream"]) for r in records)
    decided = sum(r["top1_decided"] for r in records)
    top1 = sum(r["top1_agreed"] for r in records) / decided if decided >= MIN_DECIDED_ROWS else None
    cosines = [c for r in records for c in r.get("logit_cosines") or []]
    excess = (sum(r["nll"] for r in records) - sum(r["reference_nll"] for r in records)) / positions
    ppl_ratio = math.exp(min(excess, 700.0)) if math.isfinite(excess) else math.inf
    mean_cosine = float(np.mean(cosines)) if cosines else None
    checks = {
        "top1": top1 is None or top1 >= tolerance.min_top1,
        "mean_cosine": mean_cosine is None or mean_cosine >= tolerance.min_mean_cosine,
        "ppl_ratio": ppl_ratio <= tolerance.max_ppl_ratio,
    }
    return {
        "passed": all(checks.values()),
        "kind": "teacher-forced streams",
        "against": against,
        "tokens": positions,
        "streams": len(records),
        "top1": top1,
        "top1_decided": decided,
        "top1_all": sum(r["top1_agreed_all"] for r in records) / positions,
        "mean_logit_cosine": mean_cosine,
        "min_logit_cosine": min(cosines) if cosines else None,
        "ppl_ratio": ppl_ratio,
        "ppl": math.exp(sum(r["nll"] for r in records) / positions),
        "reference_ppl": math.exp(sum(r["reference_nll"] for r in records) / positions),
        "thresholds": asdict(tolerance),
        "failed": [name for name, ok in checks.items() if not ok],
        "prompts": records,
    }


def replay_streams(
    run: Callable[[Feeds], Feeds],
    layout: CacheLayout | StaticCacheLayout | RuntimeLoop,
    record: Any,
    spec: DecoderSpec,
    capacity: int,
) -> dict[str, Any]:
    """`kiln verify` without the model: the stored streams fed to the artifact again, judged on the top-1 agreement
    with the stored reference argmaxes on the positions decided at export and the perplexity ratio to the stored
    reference likelihood, at the stored thresholds; a UsageError for a malformed or forged record."""
    streams, tolerance = check_stream_record(record, spec, capacity)
    records = []
    for stream, stored in streams:
        got = teacher_forced(run, layout, stream)
        targets = np.asarray(stream.tokens[stream.prompt_length :])
        agrees = np.argmax(got, axis=-1) == np.asarray(stored["reference_top1"])
        records.append(
            {
                **stored,
                **_agreement(agrees, np.asarray(stored["decided"], bool)),
                "logit_cosines": None,  # needs the model's logits: kiln verify --model
                "nll": float(np.sum(next_token_nll(got, targets))),
            }
        )
    return _judged(records, tolerance, "reference argmaxes and likelihood stored at export")


def check_stream_record(
    record: Any, spec: DecoderSpec, capacity: int
) -> tuple[list[tuple[TokenStream, dict[str, Any]]], StreamTolerance]:
    """The streams and thresholds of a stored `parity.generation` record of a quantized export, checked (ids within
    the vocabulary, streams within the capacity, finite likelihoods, thresholds in range); a UsageError for a
    malformed or forged one."""
    try:
        tolerance = StreamTolerance(**record["thresholds"]).check()
        entries = record["prompts"]
        if not isinstance(entries, list) or not 1 <= len(entries) <= 2 * len(STREAM_PROMPTS):
            raise ValueError("prompts is not a list of stream records")
        checked = []
        for entry in entries:
            prompt, stream, top1 = entry["prompt"], entry["stream"], entry["reference_top1"]
            for ids in (prompt, stream, top1):
                if (
                    not isinstance(ids, list)
                    or not ids
                    or not all(type(t) is int and 0 <= t < spec.vocab_size for t in ids)
                ):
                    raise ValueError("a token list is empty, not a list, or has an id outside the vocabulary")
            if len(top1) != len(stream) or len(prompt) + len(stream) - 1 > capacity:
                raise ValueError(f"a stream of {len(prompt) + len(stream)} tokens does not fit {capacity} positions")
            decided = entry.get("decided", [True] * len(stream))  # records from before the decided rule: all
            if (
                not isinstance(decided, list)
                or len(decided) != len(stream)
                or not all(type(d) is bool for d in decided)
            ):
                raise ValueError("decided is not a list of booleans, one per stream position")
            nll = entry["reference_nll"]
            if not isinstance(nll, int | float) or isinstance(nll, bool) or not math.isfinite(nll) or nll < 0:
                raise ValueError(f"reference_nll {nll!r} is not a finite likelihood")
            kept = {
                "prompt": prompt,
                "stream": stream,
                "reference_top1": top1,
                "decided": decided,
                "reference_nll": float(nll),
            }
            checked.append((TokenStream(len(prompt), (*prompt, *stream)), kept))
        return checked, tolerance
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(
            f"the manifest's parity.generation record is malformed ({exc})", "re-export the model"
        ) from None
