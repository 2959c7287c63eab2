"""The runtimes' own LLM formats as routes of `onnx` and `openvino` (`--llm-format genai`, the default of a
text-generation export): an onnxruntime-genai folder and OpenVINO GenAI's stateful model, each with the model's
tokenizer converted, loaded by those tools themselves (`onnxruntime_genai.Model`, `openvino_genai.LLMPipeline`) and
giving transformers' own greedy tokens on a text the gate never used; Kiln's runner, `kiln run --generate` and
`kiln verify` on them; the fused attention of the onnxruntime-genai graph against the step graph across a sliding
window; and what `--llm-format` refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai (pip install -e .[genai])")
pytest.importorskip("openvino_genai", reason="needs openvino-genai (pip install -e .[genai])")

from kiln.compiler.errors import UsageError
from kiln.compiler.export.options import export_options
from kiln.compiler.export.pipeline import export_targets
from kiln.compiler.generation.llm_format import find_tokenizer

from tests.conftest import ROOT, run_cli
from tests.models import decoders, genai_models

GENAI = ROOT / "tests" / "models" / "genai_models.py"
TEXT = "the lazy fox exports the quick models"  # not a gate prompt: those are token ids, seeded
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The folder-loaded Llama exported to onnx and openvino by their LLM-format routes (the default)."""
    out = tmp_path_factory.mktemp("genai")
    results = {r.target: r for r in export_targets(f"{GENAI}:llama_from_folder", "onnx,openvino", out)}
    assert all(r.published for r in results.values()), [r.manifest.parity.summary() for r in results.values()]
    return results


def _transformers_tokens(prompt: list[int]) -> list[int]:
    """transformers' own greedy tokens for `prompt` from the same weights (the end-of-sequence token does not stop)."""
    import torch

    model, _ = genai_models.llama_from_folder()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.mark.slow
def test_onnxruntime_genai_loads_the_onnx_export_and_decodes_like_transformers(exported):
    import onnxruntime_genai as og

    result = exported["onnx"]
    info = result.manifest.target_info
    assert info["route"] == info["llm_format"] == "onnxruntime-genai"
    assert info["genai_rewrite"]["fused_attention"] == 2 and info["genai_rewrite"]["fused_rotary"] == 2
    assert info["genai_config"]["past_present_share_buffer"] is True
    assert info["tokenizer"]["found"] and "folder" in info["tokenizer"]["origin"]
    config = json.loads((result.directory / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == 2
    hf_tokenizer = genai_models.tokenizer()
    prompt = hf_tokenizer(TEXT)["input_ids"]
    want = _transformers_tokens(prompt)
    model = og.Model(str(result.directory))
    assert list(og.Tokenizer(model).encode(TEXT)) == prompt  # the tokenizer files it reads are the model's
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    got = [int(t) for t in generator.get_sequence(0)[len(prompt) :]]
    assert got == want[: len(got)] and (len(got) == NEW_TOKENS or got[-1] == 2), (got, want)


@pytest.mark.slow
def test_openvino_genai_loads_the_openvino_export_and_decodes_like_transformers(exported):
    import openvino as ov
    import openvino_genai as ovg

    result = exported["openvino"]
    info = result.manifest.target_info
    assert info["route"] == info["llm_format"] == "openvino-genai"
    assert info["stateful"]["inputs"] == ["input_ids", "attention_mask", "position_ids", "beam_idx"]
    assert info["stateful"]["states"] == 4 and info["stateful"]["fused_attention"] == 2
    assert {"openvino_tokenizer.xml", "openvino_detokenizer.xml"} <= set(info["tokenizer"]["files"])
    hf_tokenizer = genai_models.tokenizer()
    prompt = hf_tokenizer(TEXT)["input_ids"]
    want = _transformers_tokens(prompt)
    pipe = ovg.LLMPipeline(str(result.directory), "CPU", **result.manifest.runtime_config)
    config = ovg.GenerationConfig()
    config.max_new_tokens, config.ignore_eos, config.do_sample = NEW_TOKENS, True, False
    ids = ovg.TokenizedInputs(ov.Tensor(np.asarray([prompt], np.int64)), ov.Tensor(np.ones((1, len(prompt)), np.int64)))
    assert [int(t) for t in pipe.generate(ids, config).tokens[0]] == want
    # Text in, text out: its converted tokenizer and detokenizer are the model's.
    assert pipe.generate(TEXT, config) == hf_tokenizer.decode(want, skip_special_tokens=True)


@pytest.mark.slow
def test_kiln_runs_and_verifies_the_genai_exports(exported, capsys):
    from kiln.compiler.export.artifacts import Artifact, load_runner
    from kiln.compiler.generation.decoding import decoding_of, greedy

    want = _transformers_tokens([1, 5, 9])
    for target, result in exported.items():
        runner = load_runner(Artifact.read(result.directory))
        assert runner.keeps_cache
        decoding = decoding_of(runner, result.manifest.inputs)
        assert greedy(decoding.decoder(runner.run), [1, 5, 9], NEW_TOKENS)[0] == want, target
        code, out, err = run_cli(
            "run", str(result.directory), "--generate", "1,5,9", "--max-new-tokens", "8", capsys=capsys
        )
        assert code == 0 and out.strip() == ",".join(map(str, want[:8])), err
        code, out, err = run_cli("verify", str(result.directory), capsys=capsys)
        assert code == 0 and "identical" in out, out + err


def test_the_tokenizer_is_found_on_the_model_or_said_missing(tmp_path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    model, _ = genai_models.llama_with_tokenizer()
    found, origin = find_tokenizer(model)
    assert isinstance(found, PreTrainedTokenizerFast) and "attribute" in origin
    model.tokenizer = model.tokenizer.backend_tokenizer  # a `tokenizers.Tokenizer` is wrapped
    assert isinstance(model.tokenizer, Tokenizer) and isinstance(find_tokenizer(model)[0], PreTrainedTokenizerFast)
    model.tokenizer = "not a tokenizer"
    assert find_tokenizer(model)[0] is None and "not a fast tokenizer" in find_tokenizer(model)[1]
    del model.tokenizer
    assert find_tokenizer(model) == (None, find_tokenizer(model)[1]) and "none" in find_tokenizer(model)[1]
    (tmp_path / "tokenizer.json").write_text("{ torn")  # a broken tokenizer in the model's folder is said, not fatal
    model.config._name_or_path = str(tmp_path)
    model.name_or_path = str(tmp_path)
    tokenizer, reason = find_tokenizer(model)
    assert tokenizer is None and "did not load" in reason


def test_llm_format_is_refused_where_it_does_not_apply(capsys):
    with pytest.raises(UsageError, match="unknown format"):
        export_options(llm_format="gguf")
    code, _, err = run_cli("export", f"{ROOT / 'tests/models/decoders.py'}:llama", "--target", "tflite",
                           "--llm-format", "genai", "--out", "/nonexistent/never", capsys=capsys)  # fmt: skip
    assert code == 2 and "no runtime LLM format" in err
    code, _, err = run_cli(
        "export", "zoo:cnn", "--target", "onnx", "--llm-format", "stateless", "--out", "/never", capsys=capsys
    )
    assert code == 2 and "applies to a text-generation export only" in err


@pytest.mark.slow
@pytest.mark.parametrize("family,window", [("mistral", 16), ("qwen2", None)])
def test_the_fused_attention_matches_the_step_graph_across_a_sliding_window(tmp_path, family, window):
    """The onnxruntime-genai rewrite (GroupQueryAttention with the model's window, the query, key and value
    projections packed into one MatMul, Qwen2's biases into one Add) against the step graph it replaces, on
    decoding states whose past is longer than Mistral's 16-token window."""
    import onnx_ir as ir
    from kiln.compiler.ort_session import ort_session
    from kiln.passes.genai_attention import Attention, rewrite_for_genai

    (result,) = export_targets(f"{ROOT / 'tests/models/decoders.py'}:{family}", "onnx", tmp_path / "stateless",
                               export_options(llm_format="stateless"))  # fmt: skip
    model = ir.load(str(result.directory / "model.onnx"))
    fusion = rewrite_for_genai(model, Attention(4, 2, 16, (window, window), decoders.POSITIONS))
    assert fusion.fused_attention == 2 and fusion.packed_qkv == 2 and not fusion.skipped
    attention = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert all(n.inputs[1] is None and n.inputs[2] is None for n in attention)  # the packed form
    assert sum(n.op_type == "MatMul" for n in model.graph) == 2 * 5 + 1  # qkv, o, gate, up, down; the head
    ir.save(model, str(tmp_path / "fused.onnx"))
    plain = ort_session(result.directory / "model.onnx")
    fused = ort_session(tmp_path / "fused.onnx")
    assert {i.name for i in fused.get_inputs()} == {i.name for i in plain.get_inputs()}
    rng = np.random.default_rng(7)
    for past, new in ((0, 5), (20, 1), (30, 3)):
        feeds = {
            "input_ids": rng.integers(0, decoders.VOCAB, (1, new)),
            "attention_mask": np.ones((1, past + new), np.int64),
            "position_ids": np.arange(past, past + new)[None],
        } | {i.name: rng.normal(size=(1, 2, past, 16)).astype(np.float32) for i in plain.get_inputs()[3:]}
        want = dict(zip([o.name for o in plain.get_outputs()], plain.run(None, feeds)))
        got = dict(zip([o.name for o in fused.get_outputs()], fused.run(None, feeds)))
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, atol=2e-5, rtol=1e-4, err_msg=f"{name} at past {past}")
