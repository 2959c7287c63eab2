"""Accuracy-aware quantization (`--max-drop X [--metric file.py:fn]`).

The quantized model is scored on the calibration samples against the fp32 model. While it loses more
than the budget, the layers that quantization hurts most (ranked by the per-layer report's local error,
see compiler/quantization/report.py) are kept in float and the model is quantized again: one layer, one more,
then twice as many each round, a bounded number of rounds; when a round of several layers meets the
budget, the smallest prefix of that round that still meets it is found by bisection.

The default metric is agreement with fp32, averaged over the outputs: top-1 agreement for classifier
outputs ([batch, classes] floats), equality for integer outputs, and the mean per-sample cosine
similarity for other float outputs. fp32 scores 1.0, so the drop is 1 - agreement (0.01 = one point).
A user metric `file.py:fn` is called as `fn(outputs, inputs) -> float` (higher is better) with every
calibration sample stacked on the batch axis, for the fp32 and for the quantized model; the drop is
the difference.

The search imports no target: the target passes in how to run a model (`open_runner`, `fp32_runner`), and
`accuracy_aware` itself takes any `quantize(exclude) -> ModelRunner` (a target's `Runner` is one).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from kiln.compiler.errors import ParityError, UsageError, error_text
from kiln.compiler.metrics import is_classifier, mean_row_cosine, top1_matches
from kiln.compiler.quantization.calibration import AccuracyBudget, CalibrationData
from kiln.compiler.types import Feeds, TensorSpec

if TYPE_CHECKING:
    from kiln.compiler.quantization.report import QuantReport
    from kiln.compiler.quantization.summary import QuantizeSummary


class ModelRunner(Protocol):
    """What the search needs of a model it scores: its input specs, and outputs by name for inputs by name."""

    inputs: list[TensorSpec]

    def run(self, feeds: Feeds) -> Feeds:
        """Outputs by name for inputs by name."""
        ...


class GraphRunner(ModelRunner, Protocol):
    """A ModelRunner that also gives its output specs (the weight-only search reads the logits' vocabulary)."""

    outputs: list[TensorSpec]


MAX_ROUNDS = 12  # quantizations after the first; enough to reach 2**10 reverted layers by doubling
DEFAULT_METRIC = "agreement with fp32 (top-1 for classifier outputs, else cosine; equality for integers)"


@dataclass(frozen=True)
class AccuracyRound:
    """One quantization tried: how many of the ranked layers were kept in float, and the drop it gave."""

    reverted: int
    drop: float
    score: float
    seconds: float


@dataclass
class AccuracyResult:
    """What the accuracy-aware loop settled on: the runner of the kept model, the layers kept in float
    (ONNX node names, and their PyTorch modules), the drop before and after, and every round tried."""

    runner: ModelRunner
    reverted: list[str]
    drop: float
    drop_before: float
    budget: float
    metric: str
    score_fp32: float
    history: list[AccuracyRound] = field(default_factory=list)
    reverted_modules: list[str] = field(default_factory=list)

    def note(self) -> str:
        """The manifest note naming the layers kept in float."""
        return reverted_note(self.reverted_modules)

    def summary(self) -> dict[str, Any]:
        """What the manifest records (target_info["accuracy_aware"])."""
        return {
            "metric": self.metric,
            "max_drop": self.budget,
            "score_fp32": self.score_fp32,
            "drop_before": self.drop_before,
            "drop": self.drop,
            "reverted": self.reverted,
            "reverted_modules": self.reverted_modules,
            "rounds": [
                {"reverted": r.reverted, "drop": r.drop, "score": r.score, "seconds": round(r.seconds, 3)}
                for r in self.history
            ],
        }


@dataclass
class QuantizedModel:
    """What a quantization kept: the model (an OpenVINO model, or the path of a Q/DQ ONNX file), its quantization
    summary, the accuracy-aware search's result (None: quantized as asked, without `--max-drop`) and the per-layer
    report of the model kept (where the quantizer makes one)."""

    model: Any
    summary: QuantizeSummary
    accuracy: AccuracyResult | None = None
    report: QuantReport | None = None


def reverted_note(modules: Sequence[str]) -> str:
    """The manifest note naming the layers --max-drop kept in float."""
    return f"--max-drop: {len(modules)} layer(s) kept in float: {', '.join(modules) or 'none needed'}"


def accuracy_aware(
    quantize: Callable[[Sequence[str]], ModelRunner],
    fp32_runner: ModelRunner,
    feeds: list[Feeds],
    budget: AccuracyBudget,
    candidates: Sequence[str] | Callable[[], Sequence[str]],
    labels: dict[str, str] | None = None,
    max_rounds: int = MAX_ROUNDS,
) -> AccuracyResult:
    """Quantize, and keep the most sensitive layers in float until the metric drops at most `budget.max_drop` on
    `feeds` (the calibration batches).

    `quantize(exclude)` builds the quantized model with the ONNX nodes `exclude` in float and returns its
    runner (the last call is the model kept). `candidates` are node names worst first, or a function
    computing them (called only when the first quantization misses the budget). `labels` maps node
    names to PyTorch module labels for the result. Raises ParityError when even every candidate in float
    misses the budget.
    """
    if budget.max_drop < 0:
        raise UsageError(f"--max-drop {budget.max_drop}: must be >= 0", "e.g. --max-drop 0.01 for one point")
    reference = _outputs(fp32_runner, feeds)
    metric_name, score = scorer(budget.metric, _stacked(feeds), reference)
    search = _Search(quantize, feeds, score, score(reference))
    runner, drop = search.attempt(0)
    drop_before, kept = drop, 0
    if drop > budget.max_drop:
        search.ranked = list(candidates() if callable(candidates) else candidates)
        failed, kept, runner, drop = search.grow(runner, drop, budget.max_drop, max_rounds)
        if drop > budget.max_drop:
            raise ParityError(
                f"--max-drop {budget.max_drop:g} cannot be met: with all {len(search.ranked)} quantized layers kept "
                f"in float the {metric_name} still drops {drop:.4g} (quantized as asked: {drop_before:.4g})",
                "raise --max-drop, or export at fp16/fp32",
            )
        kept, runner, drop = search.bisect(failed, kept, (runner, drop), budget.max_drop, 2 * max_rounds)
    reverted = search.ranked[:kept]
    return AccuracyResult(
        runner=runner,
        reverted=reverted,
        drop=drop,
        drop_before=drop_before,
        budget=budget.max_drop,
        metric=metric_name,
        score_fp32=search.score_fp32,
        history=search.history,
        reverted_modules=[(labels or {}).get(name, name) for name in reverted],
    )


class _Search:
    """The quantizations one accuracy-aware search tries: each keeps a prefix of the ranked layers in float."""

    def __init__(
        self,
        quantize: Callable[[Sequence[str]], ModelRunner],
        feeds: list[Feeds],
        score: Callable[[Feeds], float],
        score_fp32: float,
    ) -> None:
        self.quantize, self.feeds, self.score, self.score_fp32 = quantize, feeds, score, score_fp32
        self.ranked: list[str] = []  # candidate layers, worst first
        self.history: list[AccuracyRound] = []
        self.last = 0  # how many ranked layers the last quantization kept in float (the model on disk)

    def attempt(self, count: int) -> tuple[ModelRunner, float]:
        """Quantize with the first `count` ranked layers in float; its runner and drop."""
        started = time.perf_counter()
        runner = self.quantize(self.ranked[:count])
        value = self.score(_outputs(runner, self.feeds))
        self.history.append(AccuracyRound(count, self.score_fp32 - value, value, time.perf_counter() - started))
        self.last = count
        return runner, self.score_fp32 - value

    def grow(
        self, runner: ModelRunner, drop: float, max_drop: float, max_rounds: int
    ) -> tuple[int, int, ModelRunner, float]:
        """Keep one ranked layer in float, one more, then twice as many each round (all of them at round
        `max_rounds`) until the drop is within `max_drop` or every layer is in float: the count of the round
        before (which missed the budget), the last count tried, its runner and drop."""
        kept, previous, step, rounds = 0, 0, 1, 0
        while drop > max_drop and kept < len(self.ranked):
            rounds += 1
            previous, kept = kept, len(self.ranked) if rounds >= max_rounds else min(len(self.ranked), kept + step)
            runner, drop = self.attempt(kept)
            step *= 2 if rounds > 1 else 1
        return previous, kept, runner, drop

    def bisect(
        self, low: int, kept: int, best: tuple[ModelRunner, float], max_drop: float, max_attempts: int
    ) -> tuple[int, ModelRunner, float]:
        """The fewest ranked layers in float between `low` (misses the budget) and `kept` (meets it, with
        runner and drop `best`) that still meet it, by bisection within `max_attempts` quantizations in all;
        the count, its runner and drop. The model left on disk is that one."""
        while kept - low > 1 and len(self.history) <= max_attempts:
            middle = (low + kept) // 2
            trial, trial_drop = self.attempt(middle)
            if trial_drop <= max_drop:
                kept, best = middle, (trial, trial_drop)
            else:
                low = middle
        runner, drop = best
        if self.last != kept:  # the file on disk is the last quantization tried: make it the one kept
            runner = self.quantize(self.ranked[:kept])
        return kept, runner, drop


def scorer(metric: str | None, inputs: Feeds, reference: Feeds) -> tuple[str, Callable[[Feeds], float]]:
    """The metric's name and a function scoring stacked outputs (higher is better): the user's `file.py:fn`
    called with the stacked calibration inputs, or agreement with the fp32 `reference` (None)."""
    if metric is None:
        return DEFAULT_METRIC, lambda outputs: agreement(outputs, reference)
    path, _, name = metric.rpartition(":") if ".py:" in metric else (metric, "", "")
    from kiln.compiler.capture.sources import python_function

    fn = python_function(Path(path), name, metric, "a float (higher is better) from (outputs, inputs)")

    def score(outputs: Feeds) -> float:
        try:
            value = fn(outputs, inputs)
            return float(value)
        except Exception as exc:
            raise UsageError(
                f"metric {metric} failed: {error_text(exc)}",
                "fn(outputs, inputs) takes dicts of arrays by name (calibration samples stacked) and returns a float",
            ) from exc

    return metric, score


def agreement(outputs: Feeds, reference: Feeds) -> float:
    """Mean over outputs of the agreement with `reference`: top-1 for [batch, classes] floats, equality for
    integers, mean per-sample cosine similarity for other floats (1.0 = identical)."""
    scores = []
    for name, want in reference.items():
        got = np.asarray(outputs[name])
        if got.shape != want.shape:
            scores.append(0.0)
        elif want.dtype.kind in "biu":
            scores.append(float(np.mean(got == want)) if want.size else 1.0)
        elif is_classifier(want):
            scores.append(top1_matches(got, want) / len(want) if len(want) else 1.0)
        else:
            scores.append(mean_row_cosine(got, want))
    return float(np.mean(scores)) if scores else 1.0


def _outputs(runner: ModelRunner, feeds: list[Feeds]) -> Feeds:
    """The runner's outputs on every batch, stacked along the batch axis."""
    return _stacked([runner.run(feed) for feed in feeds])


def _stacked(batches: list[Feeds]) -> Feeds:
    return {
        name: np.concatenate([np.atleast_1d(b[name]) for b in batches])
        if batches[0][name].ndim
        else np.stack([b[name] for b in batches])
        for name in batches[0]
    }


# --- the drivers for ONNX Runtime (Q/DQ) and OpenVINO (NNCF) ------------------------------------------------------


def sensitivity_ranking(
    fp32_onnx: Path,
    quantized_onnx: Path,
    feeds: list[Feeds],
    labels: dict[str, str] | None = None,
    module_classes: dict[str, str] | None = None,
) -> list[str]:
    """Names of the quantized layers of a Q/DQ graph, most sensitive (lowest local SNR) first; fills `labels`
    (node name -> PyTorch module label). Also the ranking for targets with their own quantizer (OpenVINO/NNCF):
    the ONNX nodes and OpenVINO ops share names."""
    from kiln.compiler.quantization.report import DEFAULT_REPORT_SAMPLES, quant_report

    report = quant_report(fp32_onnx, quantized_onnx, feeds[:DEFAULT_REPORT_SAMPLES], module_classes)
    if labels is not None:
        labels.update({layer.name: layer.label for layer in report.layers})
    return [layer.name for layer in report.layers if layer.quantized]


def accuracy_aware_qdq(
    fp32_onnx: Path,
    destination: Path,
    calibration: CalibrationData,
    budget: AccuracyBudget,
    open_runner: Callable[[Path], ModelRunner],
    module_classes: dict[str, str] | None = None,
) -> QuantizedModel:
    """`--max-drop` for an ONNX Q/DQ artifact: quantize `fp32_onnx` to int8 into `destination`, reverting the
    most sensitive layers until within budget; the model kept (`destination`) with its summary, the result and
    its per-layer report. `open_runner(path)` runs an ONNX file (the fp32 one and each candidate)."""
    from kiln.compiler.quantization.onnxrt import quantize_onnx
    from kiln.compiler.quantization.report import DEFAULT_REPORT_SAMPLES, quant_report

    fp32_runner = open_runner(fp32_onnx)
    feeds = calibration.batches(fp32_runner.inputs)
    labels: dict[str, str] = {}
    kept: list[QuantizeSummary] = []

    def build(exclude: Sequence[str]) -> ModelRunner:
        kept[:] = [quantize_onnx(fp32_onnx, destination, "int8", calibration, exclude)]
        return open_runner(destination)

    def ranking() -> list[str]:
        return sensitivity_ranking(fp32_onnx, destination, feeds, labels, module_classes)

    result = accuracy_aware(build, fp32_runner, feeds, budget, ranking, labels)
    report = quant_report(fp32_onnx, destination, feeds[:DEFAULT_REPORT_SAMPLES], module_classes)
    report.summary.reverted = list(result.reverted_modules)
    return QuantizedModel(destination, kept[0], result, report)


def accuracy_aware_nncf(
    ov_model: Any,
    fp32_onnx: Path,
    calibration: CalibrationData,
    budget: AccuracyBudget,
    fp32_runner: ModelRunner,
    open_runner: Callable[[Any], ModelRunner],
    module_classes: dict[str, str] | None = None,
) -> QuantizedModel:
    """`--max-drop` for OpenVINO: quantize `ov_model` to int8 with NNCF, keeping the most sensitive layers in
    float until within budget; the model kept, with its summary and the result. `fp32_runner` runs the reference
    (`fp32_onnx`), `open_runner(model)` a quantized OpenVINO model.

    Layers are ranked on an ONNX Runtime Q/DQ copy quantized from the same calibration data (OpenVINO ops keep
    the ONNX node names, so the ranking's names are NNCF's ignored scope); layers that OpenVINO merged away
    are left out of the candidates.
    """
    import tempfile

    from kiln.compiler.quantization.onnxrt import quantize_onnx
    from kiln.compiler.quantization.openvino import ops_for_onnx_nodes, quantize_openvino

    feeds = calibration.batches(fp32_runner.inputs)
    labels: dict[str, str] = {}
    kept: list[tuple[Any, QuantizeSummary]] = []

    def build(exclude: Sequence[str]) -> ModelRunner:
        kept[:] = [quantize_openvino(ov_model, "int8", calibration, exclude)]
        return open_runner(kept[0][0])

    def mapped(name: str) -> bool:
        try:
            return bool(ops_for_onnx_nodes(ov_model, [name]))
        except UsageError:
            return False

    def ranking() -> list[str]:
        with tempfile.TemporaryDirectory(prefix="kiln-rank-") as scratch:
            proxy = Path(scratch) / "int8.onnx"
            quantize_onnx(fp32_onnx, proxy, "int8", calibration)
            ranked = sensitivity_ranking(fp32_onnx, proxy, feeds, labels, module_classes)
        return [name for name in ranked if mapped(name)]

    result = accuracy_aware(build, fp32_runner, feeds, budget, ranking, labels)
    return QuantizedModel(kept[0][0], kept[0][1], result)


# --- the driver for the weight-only int8/int4 of text generation --------------------------------------------------

SEARCH_SEQUENCES, SEARCH_TOKENS, SEARCH_SEED = 8, 32, 11


def kept_apart_note(modules: Sequence[str], bits: int) -> str:
    """The manifest note naming the linear layers --max-drop kept apart on a weight-only export."""
    where = "in int8" if bits < 8 else "in float"
    return f"--max-drop: {len(modules)} linear layer(s) kept {where}: {', '.join(modules) or 'none needed'}"


def weight_candidates(source: Path, spec: Any) -> list[str]:
    """The linear layers --max-drop may keep apart on a weight-only export of the ONNX file `source`, most
    sensitive first: every MatMul with constant weights but, on a 4-bit export, the LM head (8 bits already)."""
    import onnx
    from kiln.compiler.quantization.matmul_nbits import constant_matmuls, lm_head, rank_by_weight_error

    proto = onnx.load(str(source), load_external_data=False)
    weighted = constant_matmuls(proto)
    head = lm_head(proto, weighted) if spec.bits < spec.head_bits else None
    return rank_by_weight_error(source, spec, [name for name in weighted if name != head])


def accuracy_aware_weights(
    quantize: Callable[[Sequence[str]], GraphRunner],
    fp32_runner: GraphRunner,
    budget: AccuracyBudget,
    ranked: Sequence[str],
) -> AccuracyResult:
    """`--max-drop` for the weight-only int8/int4 of a text-generation export: `quantize(apart)` builds it with
    the linear layers `apart` kept apart (in 8 bits on an int4 export, in float on an int8 one) and returns its
    runner; `ranked` are the candidates, most sensitive first (matmul_nbits.rank_by_weight_error). Scored on
    SEARCH_SEQUENCES seeded random sequences of SEARCH_TOKENS tokens, each run whole with an empty cache (teacher
    forcing: the logits at every position), against `fp32_runner` (the fp32 graph): by default the top-1
    agreement of the next-token logits, or the user's metric, `fn(outputs, inputs)` with `outputs["logits"]`
    [positions, vocab] and the stacked inputs."""
    vocab = int(fp32_runner.outputs[0].shape[-1]) if fp32_runner.outputs else 0
    names = [s.name for s in fp32_runner.inputs]
    if "logits" not in {s.name for s in fp32_runner.outputs} or not isinstance(vocab, int) or vocab < 2:
        raise UsageError("--max-drop on this text-generation graph: it has no logits[..., vocab] output")
    rng = np.random.default_rng(SEARCH_SEED)
    length = SEARCH_TOKENS
    feeds = []
    for _ in range(SEARCH_SEQUENCES):
        feed: Feeds = {
            "input_ids": rng.integers(0, vocab, (1, length)),
            "attention_mask": np.ones((1, length), np.int64),
            "position_ids": np.arange(length, dtype=np.int64)[None],
        }
        for spec in fp32_runner.inputs[3:]:  # past_key_values.{i}.key|value [batch, heads, past, dim]: empty
            feed[spec.name] = np.zeros((1, int(spec.shape[1]), 0, int(spec.shape[3])), np.float32)
        feeds.append({name: feed[name] for name in names})

    def build(apart: Sequence[str]) -> ModelRunner:
        return NextTokenLogits(quantize(apart))

    return accuracy_aware(build, NextTokenLogits(fp32_runner), feeds, budget, ranked)


class NextTokenLogits:
    """A text-generation graph's runner giving only its logits, as [positions, vocab] (rows of a classifier:
    the default metric is then their top-1 agreement)."""

    def __init__(self, runner: GraphRunner):
        self.runner, self.inputs = runner, runner.inputs
        self.outputs = [s for s in runner.outputs if s.name == "logits"]

    def run(self, feeds: Feeds) -> Feeds:
        """{"logits": [positions, vocab]}."""
        logits = np.asarray(self.runner.run(feeds)["logits"])
        return {"logits": logits.reshape(-1, logits.shape[-1])}
