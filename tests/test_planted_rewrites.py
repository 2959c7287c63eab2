"""Every graph rewrite Kiln makes before a converter, broken on purpose (its output scaled by 1.05), with the real
converters, runtimes and gate: each export is rejected (exit 1), since the gate's reference is the user's own model
run by PyTorch, never the rewritten program. The rewrites: the FX legalizations (SDPA's contiguous output for ONNX
and TFLite, a grouped-query repeat as a concatenation for TFLite), the TFLite decompositions (float power, spatial
mean, global average pool, EmbeddingBag) and the NHWC I/O rewrite of the ONNX graph. The text-generation wrappers
have their own planted tests (tests/test_generation_gate.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
import torch

pytest.importorskip("litert_torch", reason="the tflite rewrites need litert-torch")

from kiln.compiler.capture import decompositions

from tests.conftest import ROOT, run_cli

MODELS = ROOT / "tests" / "models"
SCALE = 1.05


def _scaled(result: Any) -> Any:
    """The rewrite's result, off by 5% (the first output of a tuple)."""
    if isinstance(result, tuple):
        return (result[0] * SCALE, *result[1:])
    return result * SCALE


def _planted_table(table_name: str, op_text: str):
    """`table_name` (a decompositions table function) with the decomposition of the op named `op_text` off by 5%."""
    original = getattr(decompositions, table_name)

    def table() -> dict[Any, Any]:
        entries = original()
        for op, fn in list(entries.items()):
            if op_text in str(op):
                entries[op] = lambda *args, fn=fn, **kwargs: _scaled(fn(*args, **kwargs))
        return entries

    return table


def _planted_legalizations(table_name: str, what: str):
    """`table_name` (a legalizations table function) whose rule `what` also scales the rewritten value by 5%."""
    original = getattr(decompositions, table_name)

    def rewrite_then_scale(rule):
        def rewrite(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
            users = list(node.users)
            rule.rewrite(graph, node)
            # the value its old users now read (the new node, or the node itself when it was kept)
            target = users[0].args[0] if users and isinstance(users[0].args[0], torch.fx.Node) else node
            with graph.inserting_after(target):
                scaled = graph.call_function(torch.ops.aten.mul.Tensor, (target, SCALE))
            target.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
            scaled.meta = dict(target.meta)

        return rewrite

    def table() -> dict[Any, Any]:
        return {
            op: replace(rule, rewrite=rewrite_then_scale(rule)) if rule.what == what else rule
            for op, rule in original().items()
        }

    return table


CASES = {
    "float power (tflite)": ("rewrites.py:power", "tflite", "tflite_table", "pow.Tensor_Scalar", ()),
    "spatial mean (tflite)": ("rewrites.py:spatial_mean", "tflite", "tflite_table", "mean.dim", ()),
    "global average pool (tflite)": ("rewrites.py:global_pool", "tflite", "tflite_table", "adaptive_avg_pool2d", ()),
    "EmbeddingBag (tflite)": ("user_models.py:bag_of_words", "tflite", "tflite_table", "embedding_bag", ()),
    "repeat as concatenation (tflite)": ("hf_models.py:llama", "tflite", "tflite_legalizations",
                                         "repeat as concatenation", ()),
    "SDPA contiguous output (onnx)": ("hf_models.py:t5_encoder", "onnx", "onnx_legalizations", "contiguous output", ()),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_rewrite_is_rejected_by_the_gate(case, monkeypatch, tmp_path, capsys):
    model, target, table, what, extra = CASES[case]
    planted = _planted_legalizations(table, what) if "legalizations" in table else _planted_table(table, what)
    monkeypatch.setattr(decompositions, table, planted)
    code, out, err = run_cli(
        "export", MODELS / model, "-t", target, "-o", tmp_path / "out", "--json", "--no-localize", *extra,
        capsys=capsys,
    )  # fmt: skip
    (result,) = json.loads(out)["results"]
    if target == "onnx":  # the rewrite is the dynamo route's; the TorchScript route, which has none, may publish
        info = json.loads((tmp_path / "out" / "manifest.json").read_text())["target_info"]
        assert code == 0 and info["route"] == "onnx(torchscript)", info
        (tried,) = info["routes_tried"]
        assert tried["route"] == "onnx(dynamo)" and tried["step"] == "validate", tried  # rejected by the gate
        return
    assert code == 1, f"{case}: exit {code}: {err[-400:]}"
    assert not result["published"]
    applied = json.loads((tmp_path / "out" / ".rejected" / target / "manifest.json").read_text())["target_info"]
    assert any(what in name for name in applied.get("decompositions_applied", [])), applied  # the rewrite ran


@pytest.mark.slow
def test_a_broken_nhwc_rewrite_is_rejected_by_the_gate(monkeypatch, tmp_path, capsys):
    """The NHWC input transpose with H and W swapped: on a square image the graph runs, on the wrong pixels."""
    from kiln.passes import channels_last

    monkeypatch.setattr(channels_last, "NHWC_TO_NCHW", (0, 3, 2, 1))
    code, out, err = run_cli(
        "export", "zoo:cnn", "-t", "onnx", "--io", "nhwc", "-o", tmp_path / "out", "--json", "--no-localize",
        capsys=capsys,
    )  # fmt: skip
    assert code == 1, f"exit {code}: {err[-400:]}"
    assert not json.loads(out)["results"][0]["published"]
