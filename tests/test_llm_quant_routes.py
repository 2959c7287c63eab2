"""Each weight-only route of a text-generation export, run as a user runs it: the artifact Kiln published loaded
with the runtime's own plain API (onnxruntime.InferenceSession, openvino.Core, the LiteRT interpreter's signature
runners), decoded by a loop written here (not Kiln's decoder), teacher-forced on the streams the gate stored, and
compared with the user's fp32 transformers model run here. The figures must meet the precision's thresholds and
be the ones the gate recorded. Then a planted converter bug (asymmetric MatMulNBits with its zero points dropped)
that the gate must reject. The families: Mistral (a 16-token sliding window on every layer) at int4 on onnx,
Gemma 2 (sliding and full layers, soft-capping) at int8 on openvino, Qwen2 at int8 on tflite (static cache, its
chunked prefill signature)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers", reason="these tests build models with transformers")

from kiln.compiler.generation.stream_gate import STREAM_TOLERANCES
from kiln.compiler.metrics import MIN_DECIDED_ROWS, top1_rows

from tests.conftest import ROOT, run_cli
from tests.models import decoders
from tests.models.coarse_weights import dropped_zero_points

MODELS = ROOT / "tests" / "models" / "decoders.py"
Feeds = dict[str, np.ndarray]
CHUNK = 16  # the static-cache export's prefill signature takes this many tokens


def _export(family: str, target: str, out: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> int:
    code, _, err = run_cli("export", f"{MODELS}:{family}", "-t", target, "-o", out, *flags, capsys=capsys)
    assert code in (0, 1), err
    return code


def _streams(manifest: dict) -> list[tuple[list[int], int]]:
    """The gate's streams as stored: (prompt + stream tokens, prompt length)."""
    return [(r["prompt"] + r["stream"], len(r["prompt"])) for r in manifest["parity"]["generation"]["prompts"]]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _growing_loop(run: Callable[[Feeds], Feeds], past_shape: dict[str, tuple[int, int]]) -> Callable:
    """A teacher-forced loop over a growing-cache graph: the prompt with an empty past, then each next token with the
    cache the graph returned; the logits predicting each token after the prompt."""

    def logits(tokens: list[int], prompt: int) -> np.ndarray:
        past = {name: np.zeros((1, heads, 0, dim), np.float32) for name, (heads, dim) in past_shape.items()}
        rows, seen = [], 0
        for chunk in [tokens[:prompt], *[[t] for t in tokens[prompt:-1]]]:
            n = len(chunk)
            feeds = {
                "input_ids": np.asarray([chunk], np.int64),
                "attention_mask": np.ones((1, seen + n), np.int64),
                "position_ids": np.arange(seen, seen + n, dtype=np.int64)[None],
                **past,
            }
            out = run(feeds)
            rows.append(np.asarray(out["logits"])[0, -1])
            past = {name: np.asarray(out[name.replace("past_key_values", "present")]) for name in past}
            seen += n
        return np.stack(rows)

    return logits


def _onnxruntime_loop(model: Path) -> Callable:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    past = {i.name: (i.shape[1], i.shape[3]) for i in session.get_inputs() if i.name.startswith("past_key_values")}
    return _growing_loop(lambda feeds: dict(zip(names, session.run(None, feeds))), past)


def _openvino_loop(model: Path) -> Callable:
    import openvino

    compiled = openvino.Core().compile_model(str(model), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    past = {
        i.get_any_name(): (i.get_partial_shape()[1].get_length(), i.get_partial_shape()[3].get_length())
        for i in compiled.inputs
        if i.get_any_name().startswith("past_key_values")
    }

    def run(feeds: Feeds) -> Feeds:
        result = request.infer(feeds)
        return {o.get_any_name(): result[o] for o in compiled.outputs}

    return _growing_loop(run, past)


def _litert_loop(model: Path) -> Callable:
    """A teacher-forced loop over the static-cache signatures: whole 16-token chunks of the prompt through
    `prefill`, the rest of it and each next token through `serving_default`, the fixed-length cache fed back."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(model), num_threads=2)
    prefill, step = interpreter.get_signature_runner("prefill"), interpreter.get_signature_runner("serving_default")
    shapes = {name: d["shape"] for name, d in step.get_input_details().items() if name.startswith("past_key_values")}

    def logits(tokens: list[int], prompt: int) -> np.ndarray:
        cache = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
        rows, position = [], 0
        pieces = [tokens[i : i + CHUNK] for i in range(0, prompt - prompt % CHUNK, CHUNK)]
        pieces += [[t] for t in tokens[prompt - prompt % CHUNK : prompt]] + [[t] for t in tokens[prompt:-1]]
        for piece in pieces:
            runner = prefill if len(piece) == CHUNK else step
            out = runner(input_ids=np.asarray([piece], np.int32), input_pos=np.asarray([position], np.int32), **cache)
            cache = {name: out[name.replace("past_key_values", "present")] for name in cache}
            position += len(piece)
            if position >= prompt:
                rows.append(out["logits"][0, -1])
        return np.stack(rows)

    return logits


LOOPS = {"onnx": ("model.onnx", _onnxruntime_loop), "openvino": ("model.xml", _openvino_loop)}
LOOPS["tflite"] = ("model.tflite", _litert_loop)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "target", "precision", "flags"),
    [
        ("mistral", "onnx", "int4", ("--weights", "asym", "--group-size", "32")),
        ("gemma2", "openvino", "int8", ("--llm-format", "stateless")),  # the step graph (genai: a stateful model)
        ("qwen2", "tflite", "int8", ()),
    ],
)
def test_the_published_artifact_run_by_its_runtime_keeps_the_users_model(
    family: str, target: str, precision: str, flags: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    import torch

    out = tmp_path / "out"
    assert _export(family, target, out, capsys, "--precision", precision, *flags) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    recorded = manifest["parity"]["generation"]
    assert recorded["kind"] == "teacher-forced streams" and manifest["precision"] == precision
    file, loop = LOOPS[target]
    logits_of = loop(out / file)
    model, _ = decoders.FAMILIES[family]()  # the user's model, built again: same seed, same weights
    agreed = positions = agreed_decided = decided = 0
    excess = 0.0
    for tokens, prompt in _streams(manifest):
        got = logits_of(tokens, prompt)
        with torch.no_grad():
            want = model(input_ids=torch.tensor([tokens])).logits[0, prompt - 1 : -1].float().numpy()
        targets = np.asarray(tokens[prompt:])
        assert got.shape == want.shape
        agreed += int(np.sum(np.argmax(got, -1) == np.argmax(want, -1)))
        agrees, row_decided = top1_rows(got, want)  # the near-tie rule: flips where the error explains none count
        agreed_decided += int(np.sum(agrees & row_decided))
        decided += int(np.sum(row_decided))
        positions += len(targets)
        rows = np.arange(len(targets))
        excess += float(np.sum(_log_softmax(want)[rows, targets] - _log_softmax(got)[rows, targets]))
    top1_all, top1, ppl_ratio = agreed / positions, agreed_decided / decided, float(np.exp(excess / positions))
    thresholds = STREAM_TOLERANCES[precision]
    assert positions == recorded["tokens"] >= 300 and decided >= MIN_DECIDED_ROWS  # top-1 judged, not excused
    assert top1 >= thresholds.min_top1 and ppl_ratio <= thresholds.max_ppl_ratio, (top1, ppl_ratio)
    # what the gate recorded is what the runtime does, within a near-tie or two of another session's rounding
    assert abs(top1_all - recorded["top1_all"]) <= 2 / positions, (top1_all, recorded["top1_all"])
    assert abs(decided - recorded["top1_decided"]) <= 2 and abs(top1 - recorded["top1"]) <= 2 / decided
    assert abs(ppl_ratio - recorded["ppl_ratio"]) <= 0.01 * recorded["ppl_ratio"], (ppl_ratio, recorded["ppl_ratio"])


@pytest.mark.slow
def test_asymmetric_int4_with_its_zero_points_dropped_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """The same export as the published Mistral int4 above, with the converter bug planted: every MatMulNBits
    falls back to the default zero point. The graph is valid and runs; only the gate's figures stop it."""
    out = tmp_path / "out"
    with dropped_zero_points():
        code = _export("mistral", "onnx", out, capsys, "--precision", "int4", "--weights", "asym", "--group-size", "32")
    assert code == 1 and not (out / "manifest.json").exists()
    manifest = json.loads((out / ".rejected" / "onnx" / "manifest.json").read_text())
    generation = manifest["parity"]["generation"]
    assert not generation["passed"] and {"mean_cosine", "ppl_ratio"} <= set(generation["failed"])
    assert generation["ppl_ratio"] > STREAM_TOLERANCES["int4"].max_ppl_ratio
