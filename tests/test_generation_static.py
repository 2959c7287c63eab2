"""Text-generation export with a static KV cache (compiler/generation/static_kv_cache.py) to `tflite` and `tpu`: the
one-token
decode graph, gated on 32 greedy tokens identical to PyTorch; `kiln run --generate` and `kiln verify` on it; the
cache's capacity and the requests it refuses."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("transformers", reason="these tests build models with transformers")
pytest.importorskip("litert_torch", reason="the tflite target needs litert-torch")

from kiln.compiler.errors import UsageError
from kiln.compiler.export.pipeline import export_targets
from kiln.compiler.generation.decoding import (
    DecoderSpec,
    StaticCachedDecoder,
    StaticCacheLayout,
    greedy,
    layout_of,
    static_output_names,
)
from kiln.compiler.generation.gate import (
    PARITY_PROMPT,
    CausalLMReference,
    capacity_of,
    gate_prompts,
    generation_parity,
)
from kiln.compiler.generation.static_kv_cache import check_cache_size
from kiln.compiler.progress import Progress
from kiln.compiler.types import Tolerance

from tests.conftest import ROOT, run_cli
from tests.models.hf_models import llama_causal_lm

FACTORY = f"{ROOT / 'tests' / 'models' / 'hf_models.py'}:llama_causal_lm"
CACHE = 40


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny Llama exported to tflite and tpu with a static cache of CACHE (one capture for both)."""
    from kiln.compiler.export.options import ExportOptions, SourceOptions

    out = tmp_path_factory.mktemp("static") / "out"
    said = io.StringIO()
    options = ExportOptions(source=SourceOptions(cache_size=CACHE))
    results = export_targets(FACTORY, "tflite,tpu", out, options, progress=Progress(stream=said))
    return {r.target: r for r in results}, said.getvalue()


@pytest.fixture(scope="module")
def hf_tokens():
    """The tokens transformers' own `generate` gives greedily after the parity prompt (its own cache)."""
    import torch

    model, _ = llama_causal_lm()
    model.generation_config.eos_token_id = None  # plain greedy: never stops, never forbids a token
    with torch.no_grad():
        out = model.generate(torch.tensor([PARITY_PROMPT]), max_new_tokens=32, do_sample=False)
    return out[0, len(PARITY_PROMPT) :].tolist()


def test_tflite_and_tpu_pass_the_generation_gate(exported, hf_tokens):
    results, said = exported
    assert "static KV-cache decode step" in said
    for target in ("tflite", "tpu"):
        result = results[target]
        assert result.failure is None and result.parity.passed, target
        generation = result.parity.generation
        assert generation["identical"] and generation["logits_within_tolerance"], target
        first = generation["prompts"][0]
        assert first["generated"] == first["reference"] == hf_tokens, target
        assert "decoding state: position 39" in result.parity.sample_origins  # the cache's last slot
        shapes = {s.name: s.shape for s in result.manifest.inputs}
        assert shapes["input_ids"] == (1, 1) and shapes["input_pos"] == (1,)
        assert shapes["past_key_values_1_value"] == (1, 2, CACHE, 16)  # [batch, kv heads, cache, head dim]


def test_run_generate_and_verify_on_the_static_exports(exported, hf_tokens, tmp_path, capsys):
    results, _ = exported
    code, out, _ = run_cli(
        "run", results["tflite"].directory, "--generate", "1,5,9,3", "--max-new-tokens", "8", capsys=capsys
    )
    assert code == 0 and out.strip() == ",".join(map(str, hf_tokens[:8]))
    code, _, err = run_cli(
        "run", results["tflite"].directory, "--generate", "1,5,9,3", "--max-new-tokens", "38", capsys=capsys
    )
    assert code == 2 and "need 41 positions, more than the export's static KV cache of 40" in err
    assert "--max-new-tokens 37 or less" in err
    directory = tmp_path / "tpu"
    shutil.copytree(results["tpu"].directory, directory)
    code, out, _ = run_cli("verify", directory, "--model", FACTORY, "--json", capsys=capsys)
    parity = json.loads(out)[0]["parity"]
    assert code == 0 and parity["passed"] and parity["generation"]["prompts"][0]["generated"] == hf_tokens
    assert parity["generation"]["against"].startswith("transformers LlamaForCausalLM")  # the model run again
    code, out, _ = run_cli("verify", directory, capsys=capsys)
    assert code == 0 and "identical" in out  # the stored prompts replayed


def _gate(manifest):
    """The gate's reference (the user's tiny Llama itself), the export's layout and the gate's prompts."""
    spec, layout = DecoderSpec.from_dict(manifest.source["decoder"]), layout_of(manifest.inputs)
    return layout, CausalLMReference(llama_causal_lm()[0]), gate_prompts(spec, capacity_of(spec, layout))


def test_a_cache_that_is_not_written_fails_the_gate(exported):
    """A step whose returned cache is the one it was given (the new key/value never written) decodes other tokens."""
    from kiln.targets.litert import LiteRtRunner

    manifest = exported[0]["tflite"].manifest
    runner = LiteRtRunner(exported[0]["tflite"].directory / "model.tflite", manifest)
    layout = layout_of(manifest.inputs)
    assert layout == StaticCacheLayout(2, 2, CACHE, 16)

    def forgetful(feeds):
        outputs = runner.run(feeds)
        names = static_output_names(layout.layers)[1:]
        return outputs | {n: feeds[n.replace("present", "past_key_values")] for n in names}

    tolerance = Tolerance(1e-4, 1e-4)
    assert generation_parity(runner.run, *_gate(manifest), tolerance)["passed"]
    record = generation_parity(forgetful, *_gate(manifest), tolerance)
    assert not record["passed"] and not record["logits_within_tolerance"]


def test_the_decoder_refuses_more_tokens_than_the_cache_holds():
    layout = StaticCacheLayout(1, 1, 4, 2)
    calls = []

    def step(feeds):
        calls.append(int(feeds["input_pos"][0]))
        cache = np.zeros((1, 1, 4, 2), np.float32)
        return {"logits": np.zeros((1, 1, 3), np.float32), "present_0_key": cache, "present_0_value": cache}

    decoder = StaticCachedDecoder(step, layout)
    greedy(decoder, [1, 2], 3)  # positions 0, 1 (prompt), then 2, 3
    assert calls == [0, 1, 2, 3]
    with pytest.raises(UsageError, match="5 tokens do not fit the export's static KV cache of 4"):
        decoder([7])


def test_static_generation_refuses_bad_requests(tmp_path, capsys):
    code, _, err = run_cli("export", FACTORY, "-t", "tflite,onnx", "-o", tmp_path / "a", capsys=capsys)
    assert code == 2 and "tflite takes a static KV cache and onnx a growing one" in err
    code, _, err = run_cli("export", FACTORY, "-t", "onnx", "--cache-size", "64", "-o", tmp_path / "b", capsys=capsys)
    assert code == 2 and "--cache-size applies to a static KV cache (tflite, tpu) only" in err
    full = DecoderSpec(128, 128, ("full_attention",) * 2)
    with pytest.raises(UsageError, match="--cache-size 20: the gate decodes 35 positions"):
        check_cache_size(20, full)
    with pytest.raises(UsageError, match="at most the model's 128 positions"):
        check_cache_size(256, full)
    assert check_cache_size(None, full) == 64
    assert check_cache_size(None, DecoderSpec(128, 48, ("full_attention",))) == 48
    sliding = DecoderSpec(128, 256, ("sliding_attention",), 48)  # crossing 48 twice: a 51-token prompt, 48 tokens
    assert check_cache_size(None, sliding) == 98
    from kiln.targets import TARGETS

    with pytest.raises(UsageError, match=r"\(a static one\), not .*edgetpu"):
        from kiln.compiler.generation.export import check_generation_request

        check_generation_request(list(TARGETS), False, lambda t: "fp32", None)


def test_cache_size_on_an_export_that_is_not_text_generation_is_refused(tmp_path, capsys):
    """`--cache-size` was silently ignored on a model that is not exported for generation."""
    code, _, err = run_cli("export", "zoo:cnn", "-t", "onnx", "--cache-size", "64", "-o", tmp_path / "o", capsys=capsys)
    assert code == 2 and "--cache-size applies to a text-generation export only" in err
    assert not (tmp_path / "o").exists()
