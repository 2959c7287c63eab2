"""Accuracy-aware quantization (`--max-drop X [--metric file.py:fn]`).

The quantized model is scored on the calibration samples against the fp32 model. While it loses more
than the budget, the layers that quantization hurts most (ranked by the per-layer report's local error,
see compiler/quant_report.py) are kept in float and the model is quantized again: one layer, one more,
then twice as many each round, a bounded number of rounds; when a round of several layers meets the
budget, the smallest prefix of that round that still meets it is found by bisection.

The default metric is agreement with fp32, averaged over the outputs: top-1 agreement for classifier
outputs ([batch, classes] floats), equality for integer outputs, and the mean per-sample cosine
similarity for other float outputs. fp32 scores 1.0, so the drop is 1 - agreement (0.01 = one point).
A user metric `file.py:fn` is called as `fn(outputs, inputs) -> float` (higher is better) with every
calibration sample stacked on the batch axis, for the fp32 and for the quantized model; the drop is
the difference.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compiler.calibration import AccuracyBudget, CalibrationData
from compiler.errors import ParityError, UsageError

if TYPE_CHECKING:
    from compiler.quant_report import QuantReport
    from compiler.quantize import QuantizeSummary
    from targets.base import Runner

Feeds = dict[str, np.ndarray]
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

    runner: Runner
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


def reverted_note(modules: Sequence[str]) -> str:
    """The manifest note naming the layers --max-drop kept in float."""
    return f"--max-drop: {len(modules)} layer(s) kept in float: {', '.join(modules) or 'none needed'}"


def accuracy_aware(
    quantize: Callable[[Sequence[str]], Runner],
    fp32_runner: Runner,
    calibration: CalibrationData,
    budget: AccuracyBudget,
    candidates: Sequence[str] | Callable[[], Sequence[str]],
    labels: dict[str, str] | None = None,
    max_rounds: int = MAX_ROUNDS,
) -> AccuracyResult:
    """Quantize, and keep the most sensitive layers in float until the metric drops at most `budget.max_drop`.

    `quantize(exclude)` builds the quantized model with the ONNX nodes `exclude` in float and returns its
    runner (the last call is the model kept). `candidates` are node names worst first, or a function
    computing them (called only when the first quantization misses the budget). `labels` maps node
    names to PyTorch module labels for the result. Raises ParityError when even every candidate in float
    misses the budget.
    """
    if budget.max_drop < 0:
        raise UsageError(f"--max-drop {budget.max_drop}: must be >= 0", "e.g. --max-drop 0.01 for one point")
    feeds = calibration.batches(fp32_runner.inputs)
    inputs = _stacked(feeds)
    reference = _outputs(fp32_runner, feeds)
    metric_name, score = scorer(budget.metric, inputs, reference)
    score_fp32 = score(reference)
    history: list[AccuracyRound] = []
    ranked: list[str] = []

    def attempt(count: int) -> tuple[Runner, float]:
        started = time.perf_counter()
        runner = quantize(ranked[:count])
        value = score(_outputs(runner, feeds))
        history.append(AccuracyRound(count, score_fp32 - value, value, time.perf_counter() - started))
        return runner, score_fp32 - value

    runner, drop = attempt(0)
    drop_before, kept, last = drop, 0, 0
    if drop > budget.max_drop:
        ranked = list(candidates() if callable(candidates) else candidates)
        step, rounds = 1, 0
        while drop > budget.max_drop and kept < len(ranked):
            rounds += 1
            previous, kept = kept, len(ranked) if rounds >= max_rounds else min(len(ranked), kept + step)
            runner, drop = attempt(kept)
            last = kept
            step *= 2 if rounds > 1 else 1
        if drop > budget.max_drop:
            raise ParityError(
                f"--max-drop {budget.max_drop:g} cannot be met: with all {len(ranked)} quantized layers kept in "
                f"float the {metric_name} still drops {drop:.4g} (quantized as asked: {drop_before:.4g})",
                "raise --max-drop, or export at fp16/fp32",
            )
        best = (runner, drop)
        low = previous  # fails the budget; `kept` meets it: find the fewest layers between them that do
        while kept - low > 1 and len(history) <= 2 * max_rounds:
            middle = (low + kept) // 2
            trial, trial_drop = attempt(middle)
            last = middle
            if trial_drop <= budget.max_drop:
                kept, best = middle, (trial, trial_drop)
            else:
                low = middle
        runner, drop = best
        if last != kept:  # the file on disk is the last quantization tried: make it the one kept
            runner = quantize(ranked[:kept])
    reverted = ranked[:kept]
    return AccuracyResult(
        runner=runner,
        reverted=reverted,
        drop=drop,
        drop_before=drop_before,
        budget=budget.max_drop,
        metric=metric_name,
        score_fp32=score_fp32,
        history=history,
        reverted_modules=[(labels or {}).get(name, name) for name in reverted],
    )


def scorer(metric: str | None, inputs: Feeds, reference: Feeds) -> tuple[str, Callable[[Feeds], float]]:
    """The metric's name and a function scoring stacked outputs (higher is better): the user's `file.py:fn`
    called with the stacked calibration inputs, or agreement with the fp32 `reference` (None)."""
    if metric is None:
        return DEFAULT_METRIC, lambda outputs: agreement(outputs, reference)
    path, _, name = metric.rpartition(":") if ".py:" in metric else (metric, "", "")
    from compiler.sources import python_function

    fn = python_function(Path(path), name, metric, "a float (higher is better) from (outputs, inputs)")

    def score(outputs: Feeds) -> float:
        try:
            value = fn(outputs, inputs)
            return float(value)
        except Exception as exc:
            raise UsageError(
                f"metric {metric} failed: {type(exc).__name__}: {exc}",
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
        elif want.ndim == 2 and want.shape[1] >= 2:
            scores.append(float(np.mean(np.argmax(got, axis=1) == np.argmax(want, axis=1))))
        else:
            scores.append(_mean_cosine(got, want))
    return float(np.mean(scores)) if scores else 1.0


def _mean_cosine(got: np.ndarray, want: np.ndarray) -> float:
    g = np.asarray(got, np.float64).reshape(len(got), -1) if got.ndim else got.reshape(1, 1).astype(np.float64)
    w = np.asarray(want, np.float64).reshape(len(want), -1) if want.ndim else want.reshape(1, 1).astype(np.float64)
    norms = np.linalg.norm(g, axis=1) * np.linalg.norm(w, axis=1)
    dots = np.sum(g * w, axis=1)
    exact = np.all(g == w, axis=1)
    cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(exact, 1.0, 0.0))
    return float(np.mean(np.clip(cosine, 0.0, 1.0)))


def _outputs(runner: Runner, feeds: list[Feeds]) -> Feeds:
    """The runner's outputs on every batch, stacked along the batch axis."""
    return _stacked([runner.run(feed) for feed in feeds])


def _stacked(batches: list[Feeds]) -> Feeds:
    return {
        name: np.concatenate([np.atleast_1d(b[name]) for b in batches])
        if batches[0][name].ndim
        else np.stack([b[name] for b in batches])
        for name in batches[0]
    }


# --- ONNX: the quantizer of the `onnx` target and the report --------------------------------------------------


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
    from compiler.quant_report import DEFAULT_REPORT_SAMPLES, quant_report

    report = quant_report(fp32_onnx, quantized_onnx, feeds[:DEFAULT_REPORT_SAMPLES], module_classes)
    if labels is not None:
        labels.update({layer.name: layer.label for layer in report.layers})
    return [layer.name for layer in report.layers if layer.quantized]


def accuracy_aware_onnx(
    fp32_onnx: Path,
    destination: Path,
    calibration: CalibrationData,
    budget: AccuracyBudget,
    module_classes: dict[str, str] | None = None,
) -> tuple[AccuracyResult, QuantReport, QuantizeSummary]:
    """`--max-drop` for an ONNX Q/DQ artifact: quantize `fp32_onnx` to int8 into `destination`, reverting the
    most sensitive layers until within budget; the result, the per-layer report and the quantization summary
    of the model kept."""
    from compiler.quant_report import DEFAULT_REPORT_SAMPLES, quant_report
    from compiler.quantize import quantize_onnx
    from targets.onnxrt import OnnxRuntimeRunner

    fp32_runner = OnnxRuntimeRunner(fp32_onnx)
    feeds = calibration.batches(fp32_runner.inputs)
    labels: dict[str, str] = {}
    kept: list[QuantizeSummary] = []

    def build(exclude: Sequence[str]) -> Runner:
        kept[:] = [quantize_onnx(fp32_onnx, destination, "int8", calibration, exclude)]
        return OnnxRuntimeRunner(destination)

    def ranking() -> list[str]:
        return sensitivity_ranking(fp32_onnx, destination, feeds, labels, module_classes)

    result = accuracy_aware(build, fp32_runner, calibration, budget, ranking, labels)
    report = quant_report(fp32_onnx, destination, feeds[:DEFAULT_REPORT_SAMPLES], module_classes)
    report.summary.reverted = list(result.reverted_modules)
    return result, report, kept[0]


def accuracy_aware_openvino(
    ov_model: Any,
    fp32_onnx: Path,
    calibration: CalibrationData,
    budget: AccuracyBudget,
    module_classes: dict[str, str] | None = None,
) -> tuple[Any, QuantizeSummary, AccuracyResult]:
    """`--max-drop` for OpenVINO: quantize `ov_model` to int8 with NNCF, keeping the most sensitive layers in
    float until within budget; the model kept, its summary and the result.

    Layers are ranked on an ONNX Runtime Q/DQ copy quantized from the same calibration data (OpenVINO ops keep
    the ONNX node names, so the ranking's names are NNCF's ignored scope); layers that OpenVINO merged away
    are left out of the candidates.
    """
    import tempfile

    from compiler.quantize import quantize_onnx
    from compiler.quantize_openvino import ops_for_onnx_nodes, quantize_openvino
    from targets.onnxrt import OnnxRuntimeRunner
    from targets.openvino_ir import INFERENCE_PRECISION, OpenVinoRunner

    fp32_runner = OnnxRuntimeRunner(fp32_onnx)
    feeds = calibration.batches(fp32_runner.inputs)
    config = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION["int8"]}
    labels: dict[str, str] = {}
    kept: list[tuple[Any, QuantizeSummary]] = []

    def build(exclude: Sequence[str]) -> Runner:
        kept[:] = [quantize_openvino(ov_model, "int8", calibration, exclude)]
        return OpenVinoRunner.in_memory(kept[0][0], config, fp32_runner.inputs, fp32_runner.outputs)

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

    result = accuracy_aware(build, fp32_runner, calibration, budget, ranking, labels)
    return kept[0][0], kept[0][1], result


def quantize_onnx_artifact(
    fp32_onnx: Path,
    destination: Path,
    calibration: CalibrationData,
    budget: AccuracyBudget | None = None,
    module_classes: dict[str, str] | None = None,
) -> tuple[QuantizeSummary, dict[str, Any]]:
    """Quantize `fp32_onnx` to calibrated int8 into `destination` (accuracy-aware when `budget` is given) and
    write the per-layer report next to it; the quantization summary and what the target records in
    `BuildOutput.info` (report summary, --max-drop result)."""
    from dataclasses import asdict

    from compiler.quant_report import write_quant_report
    from compiler.quantize import quantize_onnx

    info: dict[str, Any] = {}
    if budget is not None:
        result, report, summary = accuracy_aware_onnx(fp32_onnx, destination, calibration, budget, module_classes)
        report.write(destination.parent)
        info["accuracy_aware"] = result.summary()
    else:
        from compiler.capture import onnx_signature

        summary = quantize_onnx(fp32_onnx, destination, "int8", calibration)
        feeds = calibration.batches(onnx_signature(fp32_onnx, torch_layout=False)[0])
        report = write_quant_report(destination.parent, fp32_onnx, destination, feeds, module_classes)
    info["quant_report"] = asdict(report.summary)
    return summary, info
