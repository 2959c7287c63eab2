"""Text-generation export of a causal LM (compiler/generation/export.py): the decoder with its KV cache to ONNX Runtime
and
OpenVINO, gated against the user's own model (compiler/generation/gate.py); `kiln run --generate` and its limits;
a broken cache fails the gate."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("transformers", reason="these tests build models with transformers")

from kiln.compiler.capture.sources import from_module
from kiln.compiler.errors import UsageError
from kiln.compiler.export.pipeline import export_targets
from kiln.compiler.generation.causal_lm import decoder_spec, is_causal_lm
from kiln.compiler.generation.decoding import (
    CacheLayout,
    DecoderSpec,
    RecomputingDecoder,
    greedy,
    input_names,
    parse_prompt,
)
from kiln.compiler.generation.export import check_generation_request, skip_localization, with_generation
from kiln.compiler.generation.gate import (
    PARITY_PROMPT,
    CausalLMReference,
    capacity_of,
    gate_prompts,
    generation_parity,
)
from kiln.compiler.progress import Progress
from kiln.compiler.types import MANIFEST_NAME, Manifest, Tolerance

from tests.conftest import ROOT, run_cli
from tests.models.hf_models import llama_causal_lm

FACTORY = f"{ROOT / 'tests' / 'models' / 'hf_models.py'}:llama_causal_lm"
TARGETS = ("onnx", "openvino")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny Llama exported to both targets with no --task (detected), and what the export said."""
    out = tmp_path_factory.mktemp("generation") / "out"
    said = io.StringIO()
    results = export_targets(FACTORY, ",".join(TARGETS), out, progress=Progress(stream=said))
    return {r.target: r for r in results}, said.getvalue()


@pytest.fixture(scope="module")
def hf_tokens():
    """The tokens transformers' own `generate` gives greedily after the parity prompt (its cache, not Kiln's)."""
    import torch

    model, _ = llama_causal_lm()
    model.generation_config.eos_token_id = None  # plain greedy: never stops, never forbids a token
    with torch.no_grad():
        out = model.generate(torch.tensor([PARITY_PROMPT]), max_new_tokens=32, do_sample=False)
    return out[0, len(PARITY_PROMPT) :].tolist()


@pytest.mark.parametrize("target", TARGETS)
def test_generation_export_matches_pytorch_token_for_token(exported, hf_tokens, target):
    results, said = exported
    result = results[target]
    assert result.failure is None and result.published
    assert "LlamaForCausalLM is a causal LM: exported for text generation" in said
    generation = result.manifest.parity.generation
    assert generation["identical"] and generation["passed"] and len(generation["prompts"]) == 2
    first = generation["prompts"][0]
    assert first["prompt"] == list(PARITY_PROMPT) and first["tokens"] == 32
    assert first["generated"] == first["reference"] == hf_tokens
    assert generation["max_abs_logit_err"] < 1e-4
    assert generation["against"].startswith("transformers LlamaForCausalLM (the user's model")
    assert result.manifest.source["decoder"] == decoder_spec(llama_causal_lm()[0]).to_dict()
    assert all(o.startswith("decoding state") for o in result.manifest.parity.sample_origins)
    names = [s.name for s in result.manifest.inputs]
    assert names == input_names(2)
    assert result.manifest.inputs[3].shape == ("batch", 2, "past", 16)
    assert [s.name for s in result.manifest.outputs][:3] == ["logits", "present.0.key", "present.0.value"]
    assert Manifest.read(result.directory).parity.generation == generation  # written and read back


@pytest.mark.parametrize("target", TARGETS)
def test_kiln_run_generate_prints_the_same_tokens(exported, hf_tokens, target, capsys):
    directory = exported[0][target].directory
    code, out, _ = run_cli("run", directory, "--generate", ",".join(map(str, PARITY_PROMPT)), capsys=capsys)
    assert code == 0 and out.strip() == ",".join(map(str, hf_tokens))
    code, out, _ = run_cli("run", directory, "--generate", "1 5 9 3", "--max-new-tokens", "4", "--json", capsys=capsys)
    assert code == 0 and '"generated": ' + str(hf_tokens[:4]) in out


def _planted(directory, tmp_path):
    """A copy of the ONNX export whose cache outputs of layers 0 and 1 are swapped (a miswired cache)."""
    import onnx

    proto = onnx.load(str(directory / "model.onnx"))
    for kind in ("key", "value"):
        names = {f"present.{i}.{kind}": f"inner.{i}.{kind}" for i in (0, 1)}
        for node in proto.graph.node:
            node.input[:] = [names.get(n, n) for n in node.input]
            node.output[:] = [names.get(n, n) for n in node.output]
        for i in (0, 1):
            proto.graph.node.append(
                onnx.helper.make_node("Identity", [f"inner.{1 - i}.{kind}"], [f"present.{i}.{kind}"])
            )
    path = tmp_path / "model.onnx"
    onnx.save(proto, str(path))
    return path


def _gate(manifest):
    """The gate's reference (the user's tiny Llama itself), the export's cache layout and the gate's prompts."""
    model, _ = llama_causal_lm()
    spec, layout = DecoderSpec.from_dict(manifest.source["decoder"]), CacheLayout.from_specs(manifest.inputs)
    return layout, CausalLMReference(model), gate_prompts(spec, capacity_of(spec, layout))


def test_a_miswired_cache_fails_the_generation_gate(exported, tmp_path):
    from kiln.targets.onnxrt import OnnxRuntimeRunner

    manifest = exported[0]["onnx"].manifest
    layout, reference, plan = _gate(manifest)
    tolerance = Tolerance(1e-4, 1e-4)
    good = generation_parity(
        OnnxRuntimeRunner(exported[0]["onnx"].directory / "model.onnx").run, layout, reference, plan, tolerance
    )
    assert good["passed"] and good["identical"]
    planted = OnnxRuntimeRunner(_planted(exported[0]["onnx"].directory, tmp_path))
    record = generation_parity(planted.run, layout, reference, plan, tolerance)
    assert not record["passed"] and not record["logits_within_tolerance"]
    assert record["max_abs_logit_err"] > 1e-3


def test_the_pipeline_gate_rejects_a_planted_cache(exported, tmp_path):
    """`with_generation`, the pipeline's step after `validate`, turns a passed report into a failed one."""
    from dataclasses import replace

    import torch
    from kiln.compiler.export.artifacts import Artifact

    result = exported[0]["onnx"]
    directory = tmp_path / "planted"
    shutil.copytree(result.directory, directory)
    shutil.move(_planted(result.directory, tmp_path), directory / "model.onnx")
    model, _ = llama_causal_lm()
    source = from_module(model, (torch.zeros(1, 1, dtype=torch.long),))
    source = replace(source, reference_model=model, decoder=decoder_spec(model))
    report = with_generation(result.manifest.parity, Artifact.read(directory), source)
    assert result.manifest.parity.passed and not report.passed
    assert not report.generation["logits_within_tolerance"]
    assert "step logits OUTSIDE tolerance" in report.summary()


def test_a_tolerance_no_runtime_meets_fails_the_gate(exported):
    from kiln.targets.onnxrt import OnnxRuntimeRunner

    manifest = exported[0]["onnx"].manifest
    runner = OnnxRuntimeRunner(exported[0]["onnx"].directory / "model.onnx")
    exact = Tolerance(atol=0.0, rtol=0.0)
    record = generation_parity(runner.run, *_gate(manifest), exact)
    assert record["identical"] and not record["logits_within_tolerance"] and not record["passed"]


def test_generation_refuses_other_targets_and_non_causal_models(tmp_path, capsys):
    code, _, err = run_cli("export", FACTORY, "-t", "pt2", "-o", tmp_path / "a", capsys=capsys)
    assert code == 2 and "supports onnx, openvino (a growing KV cache) and tflite, tpu (a static one), not pt2" in err
    assert len(err.strip().splitlines()) <= 2
    llama_model = f"{ROOT / 'tests' / 'models' / 'hf_models.py'}:llama"
    code, _, err = run_cli(
        "export", llama_model, "-t", "onnx", "--task", "text-generation", "-o", tmp_path / "b", capsys=capsys
    )
    assert code == 2 and "needs a transformers causal LM" in err
    code, _, err = run_cli(
        "export", FACTORY, "-t", "onnx", "--dynamic-batch", "1:4", "-o", tmp_path / "c", capsys=capsys
    )
    assert code == 2 and "--dynamic/--dynamic-batch do not apply to a text-generation export" in err
    code, _, err = run_cli("export", FACTORY, "-t", "onnx", "--precision", "int8", "-o", tmp_path / "d", capsys=capsys)
    assert code == 2 and "validated at fp32 only" in err
    from kiln.targets import TARGETS

    everything = list(TARGETS)
    kept = check_generation_request(everything, True, lambda t: t.default_precision, None)
    assert sorted(t.name for t in kept) == ["onnx", "openvino"]  # --target all: the targets that build one
    with pytest.raises(UsageError, match=r"\(a static one\), not .*edgetpu"):
        check_generation_request(everything, False, lambda t: "fp32", None)
    np.savez(tmp_path / "x.npz", input_ids=np.zeros((1, 1), np.int64))
    code, _, err = run_cli(
        "export", FACTORY, "-t", "onnx", "--inputs", tmp_path / "x.npz", "-o", tmp_path / "e", capsys=capsys
    )
    assert code == 2 and "--inputs does not apply to a text-generation export" in err
    with pytest.raises(UsageError, match="not a comma list"):
        parse_prompt("1,x")


def test_run_generate_refuses_bad_requests(exported, capsys):
    """Ids outside the vocabulary (128) or past int64, more positions than the model has (128), loose prompt
    syntax and absurd token counts: exit 2 with the reason, before the runtime sees them (they exited 4 from
    inside it, or decoded past the model's positions)."""
    directory = exported[0]["onnx"].directory
    refusals = {
        ("1,2", "0"): "--max-new-tokens 0: need 1 to 4096",
        ("1,2", "100000"): "--max-new-tokens 100000: need 1 to 4096",
        ("128", "4"): "token id 128 is outside the model's vocabulary of 128",
        ("1,2,99999999999999999999", "4"): "token id 99999999999999999999 is outside",
        ("1,2", "128"): "need 129 positions, more than the model's 128 positions",
        ("1_0", "4"): "not a comma list of token ids",
        ("１,2", "4"): "not a comma list of token ids",
        ("1,,2", "4"): "not a comma list of token ids",
    }
    for (prompt, count), message in refusals.items():
        code, _, err = run_cli("run", directory, "--generate", prompt, "--max-new-tokens", count, capsys=capsys)
        assert code == 2 and message in err, (prompt, count, err)
        assert len(err.strip().splitlines()) <= 2
    code, out, _ = run_cli("run", directory, "--generate", "1,2", "--max-new-tokens", "127", capsys=capsys)
    assert code == 0 and len(out.strip().split(",")) == 127  # exactly the model's last position
    with pytest.raises(UsageError, match="not exported for text generation"):
        CacheLayout.from_specs(exported[0]["onnx"].manifest.outputs)  # no past_key_values there


def test_verify_replays_the_stored_tokens_and_fails_when_they_differ(exported, hf_tokens, tmp_path, capsys):
    directory = tmp_path / "copy"
    shutil.copytree(exported[0]["openvino"].directory, directory)
    code, out, _ = run_cli("verify", directory, capsys=capsys)
    assert code == 0 and "greedy tokens over 2 prompts identical" in out
    code, out, _ = run_cli("verify", directory, "--model", FACTORY, "--json", capsys=capsys)
    generation = json.loads(out)[0]["parity"]["generation"]
    assert code == 0 and generation["prompts"][0]["generated"] == hf_tokens
    assert generation["against"].startswith("transformers LlamaForCausalLM")  # the model itself, run again
    decoders = ROOT / "tests" / "models" / "decoders.py"
    code, _, err = run_cli("verify", directory, "--model", f"{decoders}:mistral", capsys=capsys)
    assert code == 2 and "is not the decoder exported" in err  # a sliding window the export does not have
    code, out, _ = run_cli("verify", directory, "--model", f"{decoders}:llama", capsys=capsys)
    assert code == 1 and "different weights" in out  # the same shapes, other weights: judged, and failed
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["parity"]["generation"]["prompts"][0]["reference"][5] += 1  # as if the model had given other tokens
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    code, out, _ = run_cli("verify", directory, capsys=capsys)
    assert code == 1 and "DIFFER (prompt 1, from step 5)" in out
    manifest["parity"]["generation"]["prompts"][0]["tokens"] = 10**9  # forged: would decode for ever
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    code, _, err = run_cli("verify", directory, capsys=capsys)
    assert code == 2 and "parity.generation record is malformed" in err


def test_localization_is_skipped_and_said_for_generation_exports(exported):
    from kiln.compiler.export.options import ExportOptions, ParityOptions

    report = exported[0]["onnx"].manifest.parity
    said = io.StringIO()
    kept = skip_localization(ExportOptions(), report, Progress(stream=said))
    assert kept.parity.localize is None  # passed: nothing to do
    always = ExportOptions(parity=ParityOptions(localize=True))
    assert skip_localization(always, report, Progress(stream=said)).parity.localize is False
    assert "localization does not support text-generation exports yet" in said.getvalue()


def test_which_models_are_causal_lms():
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    from tests.models.hf_models import llama

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16))
    t5 = T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=32, d_kv=8))
    wrapped, _ = llama()
    assert is_causal_lm(llama_causal_lm()[0]) and is_causal_lm(gpt2)
    assert not is_causal_lm(t5)  # encoder-decoder
    assert not is_causal_lm(wrapped.model)  # LlamaModel: no LM head
    assert not is_causal_lm(wrapped)  # a user's module around it: exported as its own forward


def test_recomputing_without_the_cache_gives_the_same_tokens(exported, hf_tokens):
    from kiln.targets.onnxrt import OnnxRuntimeRunner

    result = exported[0]["onnx"]
    run, layout = OnnxRuntimeRunner(result.directory / "model.onnx").run, CacheLayout.from_specs(result.manifest.inputs)
    tokens, _ = greedy(RecomputingDecoder(run, layout), PARITY_PROMPT, 8)
    assert tokens == hf_tokens[:8]
