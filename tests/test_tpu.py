"""`--target tpu`: StableHLO + SavedModel, validated under XLA on this CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("tensorflow", reason="the tpu target needs tensorflow-cpu (pip install .[tpu])")
pytest.importorskip("litert_torch", reason="the tpu target needs litert-torch (pip install .[tpu])")

from kiln.compiler.capture.zoo import ZOO
from kiln.compiler.export.options import ExportOptions
from kiln.compiler.export.pipeline import export_targets

from tests.conftest import USER_MODELS, ZOO_MODELS, run_cli


@pytest.fixture(scope="session")
def tpu_exports(tmp_path_factory):
    """Every zoo model exported to tpu in fp32, and cnn/transformer in bf16: (model, precision) -> result."""
    root = tmp_path_factory.mktemp("tpu")
    exports = {}
    for name in ZOO_MODELS:
        (exports[name, "fp32"],) = export_targets(f"zoo:{name}", "tpu", root / name, ExportOptions())
    for name in ("cnn", "transformer"):
        (exports[name, "bf16"],) = export_targets(
            f"zoo:{name}", "tpu", root / f"{name}-bf16", ExportOptions(precision="bf16")
        )
    return exports


@pytest.mark.parametrize("model", ZOO_MODELS)
def test_tpu_fp32_parity_and_files(tpu_exports, model):
    result = tpu_exports[model, "fp32"]
    assert result.published and result.parity.passed, result.parity.summary()
    assert max(o.max_abs_error for o in result.parity.outputs) < 1e-5
    files = {f.path.split("/")[0] for f in result.manifest.files}
    assert {"model.stablehlo.mlirbc", "model.stablehlo.mlir", "model.hlo.txt", "saved_model"} <= files
    assert "model.weights.safetensors" in files
    assert (result.directory / "model.hlo.txt").read_text().startswith("HloModule")
    assert "stablehlo." in (result.directory / "model.stablehlo.mlir").read_text()
    assert result.manifest.runtime_config["platforms"] == ["TPU", "CPU"]
    assert result.manifest.parity.runtime["runtime"].startswith("tensorflow")


@pytest.mark.parametrize("model", ["cnn", "transformer"])
def test_tpu_bf16_computes_in_bf16_within_bf16_tolerance(tpu_exports, model):
    bf16, fp32 = tpu_exports[model, "bf16"], tpu_exports[model, "fp32"]
    assert bf16.published and bf16.parity.passed, bf16.parity.summary()
    assert bf16.parity.tolerance.atol == 5e-2
    assert bf16.manifest.target_info["tpu_audit"]["compute_precision"] == "bf16"
    # bf16 rounding is visible: orders of magnitude above the fp32 artifact's error
    assert bf16.parity.outputs[0].max_abs_error > 100 * fp32.parity.outputs[0].max_abs_error
    assert bf16.manifest.inputs[0].dtype == fp32.manifest.inputs[0].dtype  # float I/O kept


def test_saved_model_signature_names_match_pytorch(tpu_exports):
    import tensorflow as tf

    result = tpu_exports["transformer", "fp32"]
    loaded = tf.saved_model.load(str(result.directory / "saved_model"))
    serve = loaded.signatures["serving_default"]
    inputs = serve.structured_input_signature[1]
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert inputs["input_ids"].dtype == tf.int64 and list(inputs["input_ids"].shape) == [2, 16]
    assert set(serve.structured_outputs) == {"output"}
    module, (ids, mask) = ZOO["transformer"]()
    with torch.no_grad():
        expected = module(ids, mask).numpy()
    got = serve(input_ids=tf.constant(ids.numpy()), attention_mask=tf.constant(mask.numpy()))["output"].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_portable_stablehlo_reloads_and_runs_on_its_own(tpu_exports):
    """The .mlirbc read back, with the weights it takes as arguments from model.weights.safetensors, computes the
    model (the weights are not in the module's text)."""
    import tensorflow as tf
    from kiln.targets.tpu import Lowered, _with_platform_index, _xla_function, read_portable_artifact
    from safetensors.numpy import load_file

    result = tpu_exports["lstm", "fp32"]
    text = read_portable_artifact(result.directory / "model.stablehlo.mlirbc")
    order = result.manifest.runtime_config["stablehlo_arguments"]["model.stablehlo.mlirbc"]
    assert order[-1] == "input:frames" and all(a.startswith("weight:") for a in order[:-1])
    weights = load_file(str(result.directory / "model.weights.safetensors"))
    assert len(weights) == len(order) - 1 and 'dense<"0x' not in text  # no weights in the module
    variables = {name: tf.constant(value) for name, value in weights.items()}
    arguments = [("weight", a.split(":", 1)[1]) if a.startswith("weight:") else ("input", 0) for a in order]
    lowered = Lowered(text, "", arguments, {}, [tf.float32], [tf.float32, tf.float32], [])
    model = type("Signature", (), {"inputs": result.manifest.inputs, "outputs": result.manifest.outputs})
    run = _xla_function(_with_platform_index(text), model, lowered, variables)
    module, (frames,) = ZOO["lstm"]()
    outputs = run(tf.constant(frames.numpy()))
    with torch.no_grad():
        tags, hidden = module(frames)
    np.testing.assert_allclose(outputs["output_0"].numpy(), tags.numpy(), atol=1e-5)
    np.testing.assert_allclose(outputs["output_1"].numpy(), hidden.numpy(), atol=1e-5)


def test_tpu_audit(tpu_exports):
    transformer = tpu_exports["transformer", "fp32"].manifest
    audit = transformer.target_info["tpu_audit"]
    assert audit["static_shapes"] and audit["dynamic_dims"] == {}
    assert audit["int64_or_float64_io"] == ["input_ids: int64", "attention_mask: int64"]
    assert audit["matmul_and_conv_ops"] > 0 and 0 < audit["mxu_padding_waste_estimate"] < 1
    assert any("64-bit I/O" in note for note in transformer.notes)
    cnn = tpu_exports["cnn", "fp32"].manifest.target_info["tpu_audit"]
    assert cnn["int64_or_float64_io"] == [] and cnn["custom_calls"] == []


def test_dynamic_batch_is_refused_with_a_way_forward(tmp_path, capsys):
    code, _, err = run_cli(
        "export", "zoo:cnn", "-t", "tpu", "--dynamic-batch", "1:8", "--out", tmp_path / "o", capsys=capsys
    )
    assert code == 2 and "needs static shapes" in err and "once per batch size" in err
    assert not (tmp_path / "o").exists()


def test_embedding_bag_is_decomposed_and_reported(tmp_path, capsys):
    code, _, err = run_cli(
        "export", f"{USER_MODELS}:bag_of_words", "-t", "tpu", "--out", tmp_path / "o", "-q", capsys=capsys
    )
    assert code == 0, err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["target_info"]["tpu_audit"]["decompositions_applied"] == ["aten.embedding_bag.padding_idx"]
    assert manifest["parity"]["passed"]


def test_unsupported_op_names_the_op_and_the_module(tmp_path, capsys):
    code, _, err = run_cli("export", f"{USER_MODELS}:bucketize", "-t", "tpu", "--out", tmp_path / "o", capsys=capsys)
    assert code == 2
    assert "StableHLO lowering failed on aten.searchsorted.Tensor in <root> (Bucketize)" in err
    assert not (tmp_path / "o").exists()


def test_stablehlo_runs_under_jax_pjrt_without_tensorflow(tpu_exports):
    from examples.stablehlo_jax import run

    module, (image,) = ZOO["mobilenet"]()
    (logits,) = run(tpu_exports["mobilenet", "fp32"].directory, [image.numpy()])
    with torch.no_grad():
        np.testing.assert_allclose(logits, module(image).numpy(), atol=1e-5)
