"""Text-generation export of a causal LM (compiler/generation.py): the decoder with its KV cache to ONNX Runtime and
OpenVINO, gated on 32 greedy tokens identical to PyTorch's; `kiln run --generate`; a broken cache fails the gate."""

from __future__ import annotations

import io
import json
import shutil

import pytest

pytest.importorskip("transformers", reason="these tests build models with transformers")

from compiler.errors import UsageError
from compiler.generation import (
    PARITY_PROMPT,
    CacheLayout,
    CausalLMWithCache,
    RecomputingDecoder,
    check_generation_request,
    generation_parity,
    greedy,
    input_names,
    is_causal_lm,
    parse_prompt,
    skip_localization,
    with_generation,
)
from compiler.pipeline import export_targets
from compiler.progress import Progress
from compiler.reference import reference_runner
from compiler.sources import from_module
from compiler.types import MANIFEST_NAME, Manifest, Tolerance
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
    prompt = torch.tensor([PARITY_PROMPT])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    return out[0, len(PARITY_PROMPT) :].tolist()


@pytest.mark.parametrize("target", TARGETS)
def test_generation_export_matches_pytorch_token_for_token(exported, hf_tokens, target):
    results, said = exported
    result = results[target]
    assert result.failure is None and result.published
    assert "LlamaForCausalLM is a causal LM: exported for text generation" in said
    generation = result.manifest.parity.generation
    assert generation["tokens"] == 32 and generation["identical"] and generation["passed"]
    assert generation["generated"] == generation["reference"] == hf_tokens
    assert generation["max_abs_logit_err"] < 1e-4
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


def _reference(manifest):
    """PyTorch's step function on the export's I/O: the wrapper around the same tiny Llama."""
    import torch

    model, _ = llama_causal_lm()
    source = from_module(CausalLMWithCache(model), (torch.zeros(1, 1, dtype=torch.long),))
    return reference_runner(source, manifest.inputs, manifest.outputs)


def test_a_miswired_cache_fails_the_generation_gate(exported, tmp_path):
    from targets.onnxrt import OnnxRuntimeRunner

    manifest = exported[0]["onnx"].manifest
    reference, layout, tolerance = _reference(manifest), CacheLayout.from_specs(manifest.inputs), Tolerance(1e-4, 1e-4)
    good = generation_parity(
        OnnxRuntimeRunner(exported[0]["onnx"].directory / "model.onnx").run, reference, layout, tolerance
    )
    assert good["passed"] and good["identical"]
    planted = OnnxRuntimeRunner(_planted(exported[0]["onnx"].directory, tmp_path))
    record = generation_parity(planted.run, reference, layout, tolerance)
    assert not record["passed"] and not record["logits_within_tolerance"]
    assert record["max_abs_logit_err"] > 1e-3


def test_the_pipeline_gate_rejects_a_planted_cache(exported, tmp_path):
    """`with_generation`, the pipeline's step after `validate`, turns a passed report into a failed one."""
    import torch

    from compiler.artifacts import Artifact
    from compiler.capture import CapturedModel

    result = exported[0]["onnx"]
    directory = tmp_path / "planted"
    shutil.copytree(result.directory, directory)
    shutil.move(_planted(result.directory, tmp_path), directory / "model.onnx")
    model, _ = llama_causal_lm()
    source = from_module(CausalLMWithCache(model), (torch.zeros(1, 1, dtype=torch.long),))
    captured = CapturedModel(None, None, result.manifest.inputs, result.manifest.outputs, 0, None)
    report = with_generation(result.manifest.parity, Artifact.read(directory), source, captured)
    assert result.manifest.parity.passed and not report.passed
    assert not report.generation["logits_within_tolerance"]
    assert "step logits OUTSIDE tolerance" in report.summary()


def test_a_tolerance_no_runtime_meets_fails_the_gate(exported):
    from targets.onnxrt import OnnxRuntimeRunner

    manifest = exported[0]["onnx"].manifest
    runner = OnnxRuntimeRunner(exported[0]["onnx"].directory / "model.onnx")
    exact = Tolerance(atol=0.0, rtol=0.0)
    record = generation_parity(runner.run, _reference(manifest), CacheLayout.from_specs(manifest.inputs), exact)
    assert record["identical"] and not record["logits_within_tolerance"] and not record["passed"]


def test_generation_refuses_other_targets_and_non_causal_models(tmp_path, capsys):
    code, _, err = run_cli("export", FACTORY, "-t", "pt2", "-o", tmp_path / "a", capsys=capsys)
    assert code == 2 and "text-generation export supports onnx and openvino, not pt2" in err  # tflite/tpu: static
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
    from targets import TARGETS

    everything = list(TARGETS)
    kept = check_generation_request(everything, True, lambda t: t.default_precision, None)
    assert sorted(t.name for t in kept) == ["onnx", "openvino"]  # --target all: the targets that build one
    with pytest.raises(UsageError, match=r"supports onnx and openvino, not .*edgetpu"):
        check_generation_request(everything, False, lambda t: "fp32", None)
    with pytest.raises(UsageError, match="not a comma list"):
        parse_prompt("1,x")


def test_run_generate_refuses_bad_requests(exported, capsys):
    directory = exported[0]["onnx"].directory
    code, _, err = run_cli("run", directory, "--generate", "1,2", "--max-new-tokens", "0", capsys=capsys)
    assert code == 2 and "--max-new-tokens 0" in err
    with pytest.raises(UsageError, match="not exported for text generation"):
        CacheLayout.from_specs(exported[0]["onnx"].manifest.outputs)  # no past_key_values there


def test_verify_replays_the_stored_tokens_and_fails_when_they_differ(exported, hf_tokens, tmp_path, capsys):
    directory = tmp_path / "copy"
    shutil.copytree(exported[0]["openvino"].directory, directory)
    code, out, _ = run_cli("verify", directory, capsys=capsys)
    assert code == 0 and "generation: 32 greedy tokens identical" in out
    code, out, _ = run_cli("verify", directory, "--model", FACTORY, "--json", capsys=capsys)
    generation = json.loads(out)[0]["parity"]["generation"]
    assert code == 0 and generation["generated"] == hf_tokens
    assert generation["against"] == "reference tokens stored at export"
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["parity"]["generation"]["reference"][5] += 1  # the tokens PyTorch gave, as if they had been different
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    code, out, _ = run_cli("verify", directory, capsys=capsys)
    assert code == 1 and "generation: 32 greedy tokens DIFFER from step 5" in out


def test_localization_is_skipped_and_said_for_generation_exports(exported):
    from compiler.options import ExportOptions

    report = exported[0]["onnx"].manifest.parity
    said = io.StringIO()
    assert skip_localization(ExportOptions(), report, Progress(stream=said)).localize is None  # passed: nothing to do
    assert skip_localization(ExportOptions(localize=True), report, Progress(stream=said)).localize is False
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
    from targets.onnxrt import OnnxRuntimeRunner

    result = exported[0]["onnx"]
    run, layout = OnnxRuntimeRunner(result.directory / "model.onnx").run, CacheLayout.from_specs(result.manifest.inputs)
    tokens, _ = greedy(RecomputingDecoder(run, layout), PARITY_PROMPT, 8)
    assert tokens == hf_tokens[:8]
