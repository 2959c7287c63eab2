"""Every popular decoder family (tests/models/decoders.py: Llama, Mistral, Gemma 2 and 3, Qwen2/Qwen3 with and
without sliding windows, Phi-3, OLMo 2, GPT-2, GPT-NeoX, OPT), exported for text generation to one growing-cache
target (onnx or openvino: their runtimes' own LLM formats, the default) and one static-cache target (tflite or
tpu), then driven by a plain greedy loop written here on the runtime's own API (onnxruntime-genai's `Generator`,
OpenVINO GenAI's `LLMPipeline`, the LiteRT interpreter's signature runner, the SavedModel's signature), never Kiln's
decoder, on prompts the gate never used: one of two tokens and one longer than the model's sliding window whose
decoding crosses the window several times. The tokens must be transformers' own `generate`. Kiln's stateless step
graph (`--llm-format stateless`) is driven the same way with ONNX Runtime's `InferenceSession` and OpenVINO's
`compile_model`, the cache fed back by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers", reason="these tests build models with transformers")

from kiln.compiler.export.pipeline import export_targets
from kiln.compiler.ort_session import ort_session

from tests.conftest import ROOT
from tests.models import decoders

MODELS = ROOT / "tests" / "models" / "decoders.py"
NEW_TOKENS = 40
GROWING = ("onnx", "openvino")
STATIC = ("tflite", "tpu")
# The sliding-window and hybrid families (the ones Kiln once published wrong) and Llama run in `make test`; the
# others are marked `long` (`make test-long`), to keep CI's suite on two cores within its time.
EVERY_RUN = ("llama", "mistral", "gemma2", "gemma3", "qwen2_sliding")
CASES = [
    pytest.param(family, GROWING[i % 2], STATIC[(i // 2) % 2], marks=() if family in EVERY_RUN else pytest.mark.long)
    for i, family in enumerate(decoders.FAMILIES)
]  # every target serves several families, every family two targets


def _prompts(window: int | None) -> list[list[int]]:
    """Prompts the gate does not use (its are seeded with 0 and start 1, 5, 9, 3): two tokens, and one longer than
    the window (or 13 tokens)."""
    rng = np.random.default_rng(1234)
    return [[7, 42], rng.integers(0, decoders.VOCAB, (window or 8) + 5).tolist()]


def _hf_tokens(model, prompt: list[int]) -> list[int]:
    """transformers' own greedy tokens (its own cache and masks), never stopping at an end-of-sequence token
    (`min_new_tokens` would instead forbid it, which plain greedy decoding does not)."""
    import torch

    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out.shape[1] == len(prompt) + NEW_TOKENS
    return out[0, len(prompt) :].tolist()


def _genai_tokens(target: str, directory: Path, runtime_config: dict, prompt: list[int]) -> list[int]:
    """Greedy tokens from the runtime's own LLM loader: onnxruntime-genai's Generator (the logits of each appended
    token, its argmax appended next: the model's end-of-sequence token does not stop it), or OpenVINO GenAI's
    LLMPipeline (greedy, `ignore_eos`) with the export's runtime settings."""
    if target == "onnx":
        import onnxruntime_genai as og

        model = og.Model(str(directory))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + NEW_TOKENS)
        generator = og.Generator(model, params)
        tokens, ids = [], list(prompt)
        for _ in range(NEW_TOKENS):
            generator.append_tokens(ids)
            ids = [int(np.argmax(generator.get_logits()[0, -1]))]
            tokens.append(ids[0])
        return tokens
    import openvino as ov
    import openvino_genai as ovg

    pipe = ovg.LLMPipeline(str(directory), "CPU", **runtime_config)
    config = ovg.GenerationConfig()
    config.max_new_tokens, config.ignore_eos, config.do_sample = NEW_TOKENS, True, False
    ids = ov.Tensor(np.asarray([prompt], np.int64))
    result = pipe.generate(ovg.TokenizedInputs(ids, ov.Tensor(np.ones((1, len(prompt)), np.int64))), config)
    return [int(t) for t in result.tokens[0]]


def _growing_step(target: str, directory: Path):
    """The runtime's own session on the growing-cache export: named numpy feeds in, outputs by name out."""
    if target == "onnx":
        session = ort_session(directory / "model.onnx")
        names = [o.name for o in session.get_outputs()]
        return lambda feeds: dict(zip(names, session.run(None, feeds)))
    import openvino as ov

    compiled = ov.Core().compile_model(str(directory / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()

    def run(feeds):
        results = request.infer(feeds)
        return {port.get_any_name(): value for port, value in results.items()}

    return run


def _greedy_growing(run, layers: int, kv_heads: int, head_dim: int, prompt: list[int]) -> list[int]:
    """Prefill the prompt in one call, then one token per call feeding `present` back as the past."""
    past = {
        f"past_key_values.{i}.{kind}": np.zeros((1, kv_heads, 0, head_dim), np.float32)
        for i in range(layers)
        for kind in ("key", "value")
    }
    ids, tokens, length = list(prompt), [], 0
    for _ in range(NEW_TOKENS):
        feeds = {
            "input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.ones((1, length + len(ids)), np.int64),
            "position_ids": np.arange(length, length + len(ids), dtype=np.int64)[None],
        } | past
        out = run(feeds)
        past = {name: out[name.replace("past_key_values", "present")] for name in past}
        length += len(ids)
        ids = [int(np.argmax(out["logits"][0, -1]))]
        tokens.append(ids[0])
    return tokens


def _static_step(target: str, directory: Path):
    """The runtime's own decode signature on the static-cache export (`serving_default`; `prefill` takes 16 tokens)."""
    if target == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        runner = Interpreter(model_path=str(directory / "model.tflite")).get_signature_runner("serving_default")
        return lambda feeds: runner(**feeds)
    import tensorflow as tf

    signature = tf.saved_model.load(str(directory / "saved_model")).signatures["serving_default"]
    return lambda feeds: {k: v.numpy() for k, v in signature(**{k: tf.constant(v) for k, v in feeds.items()}).items()}


def _greedy_static(run, layers: int, kv_heads: int, size: int, head_dim: int, prompt: list[int]) -> list[int]:
    """One token per call at its position, the whole cache in and out."""
    cache = {
        f"past_key_values_{i}_{kind}": np.zeros((1, kv_heads, size, head_dim), np.float32)
        for i in range(layers)
        for kind in ("key", "value")
    }
    fed, tokens = list(prompt), []
    position = 0
    while len(tokens) < NEW_TOKENS:
        token = fed.pop(0) if fed else tokens[-1]
        out = run({"input_ids": np.asarray([[token]], np.int32), "input_pos": np.asarray([position], np.int32)} | cache)
        cache = {name: out[name.replace("past_key_values", "present")] for name in cache}
        position += 1
        if not fed:
            tokens.append(int(np.argmax(out["logits"][0, -1])))
    return tokens


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.mark.slow
@pytest.mark.parametrize("family,growing,static", CASES)
def test_each_family_decodes_like_transformers_on_prompts_the_gate_never_used(exports, family, growing, static):
    model, _ = decoders.FAMILIES[family]()
    window = getattr(model.config, "sliding_window", None)
    prompts = _prompts(window)
    want = [_hf_tokens(model, p) for p in prompts]
    for target in (growing, static):
        (result,) = export_targets(f"{MODELS}:{family}", target, exports / f"{family}-{target}")
        assert result.published, result.manifest.parity.summary()
        generation = result.manifest.parity.generation
        if window is not None:
            assert "crosses" in generation["crossing"] and max(len(p["prompt"]) for p in generation["prompts"]) > window
        shapes = {s.name: s.shape for s in result.manifest.inputs}
        layers = sum(1 for name in shapes if name.endswith("key"))
        if target in GROWING:
            assert result.manifest.target_info["llm_format"] in ("onnxruntime-genai", "openvino-genai")
            config = result.manifest.runtime_config
            got = [_genai_tokens(target, result.directory, config, p) for p in prompts]
        else:
            _, kv_heads, size, head_dim = shapes["past_key_values_0_key"]
            assert size >= len(prompts[1]) + NEW_TOKENS - 1
            run = _static_step(target, result.directory)
            got = [_greedy_static(run, layers, kv_heads, size, head_dim, p) for p in prompts]
        assert got == want, f"{family} on {target}"


@pytest.mark.slow
@pytest.mark.parametrize("target", GROWING)
def test_the_stateless_step_graph_decodes_like_transformers_with_the_cache_fed_by_hand(tmp_path, target):
    """`--llm-format stateless`: Kiln's step graph, the cache as inputs and outputs, on a sliding-window model."""
    from kiln.compiler.export.options import export_options

    model, _ = decoders.mistral()
    prompts = _prompts(model.config.sliding_window)
    want = [_hf_tokens(model, p) for p in prompts]
    (result,) = export_targets(f"{MODELS}:mistral", target, tmp_path, export_options(llm_format="stateless"))
    assert result.published and result.manifest.target_info["route"] == "onnx(dynamo)"
    assert "llm_format" not in result.manifest.target_info
    shapes = {s.name: s.shape for s in result.manifest.inputs}
    _, kv_heads, _, head_dim = shapes["past_key_values.0.key"]
    layers = sum(1 for name in shapes if name.endswith("key"))
    run = _growing_step(target, result.directory)
    assert [_greedy_growing(run, layers, kv_heads, head_dim, p) for p in prompts] == want
