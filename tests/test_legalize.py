"""FX legalizations before the ONNX and LiteRT lowerings (compiler/capture/decompositions.py: `onnx_legalizations`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kiln.compiler.capture.decompositions import apply_legalizations, onnx_legalizations, tflite_legalizations
from kiln.compiler.capture.program import lower_to_onnx
from kiln.compiler.ort_session import ort_session
from torch import nn

SDPA = "aten.scaled_dot_product_attention.default (contiguous output)"
REPEAT = "aten.expand.default (repeat as concatenation)"


class HeadsAttention(nn.Module):
    """Attention written like transformers' T5 and Swin: heads split with `view(...).transpose(1, 2)`, merged with
    `transpose(1, 2).contiguous().reshape(...)` (`merge="reshape"`: without the `.contiguous()`)."""

    def __init__(self, dim: int = 16, heads: int = 2, merge: str = "contiguous"):
        super().__init__()
        self.heads, self.merge = heads, merge
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        merged = attended.transpose(1, 2)
        merged = merged.contiguous() if self.merge == "contiguous" else merged
        return self.out(merged.reshape(batch, length, -1))


class SlicedAttention(nn.Module):
    """Attention with q, k, v sliced from one projection (zoo:transformer): SDPA traces a contiguous output."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, dim))


def _program(module: nn.Module) -> tuple[torch.export.ExportedProgram, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    return torch.export.export(module.eval(), (x,), strict=False), x


@pytest.mark.parametrize("merge", ["contiguous", "reshape"])
def test_the_legalized_program_computes_what_the_original_computes(merge):
    torch.manual_seed(0)
    program, _ = _program(HeadsAttention(merge=merge))
    legalized, applied = apply_legalizations(program, onnx_legalizations())
    assert applied == [SDPA]
    clones = [n for n in legalized.graph.nodes if n.target is torch.ops.aten.clone.default]
    assert len(clones) == 1 and clones[0].args[0].target is torch.ops.aten.scaled_dot_product_attention.default
    assert not any(n.target is torch.ops.aten.clone.default for n in program.graph.nodes)  # the original is kept
    for seed in range(3):
        torch.manual_seed(seed)
        sample = torch.randn(2, 6, 16)
        torch.testing.assert_close(legalized.module()(sample), program.module()(sample), rtol=0, atol=0)


def test_the_dynamo_exporter_fails_without_the_legalization_and_converts_with_it(tmp_path):
    pytest.importorskip("transformers")
    from tests.models.hf_models import t5_encoder

    module, inputs = t5_encoder()
    program = torch.export.export(module, inputs, strict=False)
    with pytest.raises(Exception, match="Failed to decompose"):
        torch.onnx.export(program, (), dynamo=True, verbose=False)
    record = lower_to_onnx(program, tmp_path / "model.onnx", ["output"], None)
    assert record == {"decompositions_applied": [SDPA], "onnx_route": {"route": "dynamo", "failed": {}}}
    session = ort_session(tmp_path / "model.onnx")
    (got,) = session.run(None, {session.get_inputs()[0].name: inputs[0].numpy()})
    torch.testing.assert_close(torch.from_numpy(got), module(*inputs), rtol=1e-4, atol=1e-5)


def test_attention_whose_traced_layout_is_already_contiguous_is_left_alone():
    program, _ = _program(SlicedAttention())
    legalized, applied = apply_legalizations(program, onnx_legalizations())
    assert applied == [] and legalized is program


class GroupedQueryScores(nn.Module):
    """Attention scores with one key head shared by two query heads, repeated like transformers' `repeat_kv`."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(32, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        k = self.k(x).view(batch, length, 1, 16).transpose(1, 2)
        k = k[:, :, None].expand(batch, 1, 2, length, 16).reshape(batch, 2, length, 16)
        return self.q(x).view(batch, length, 2, 16).transpose(1, 2) @ k.transpose(2, 3)


def test_a_repeat_is_materialized_for_litert_with_the_same_values():
    torch.manual_seed(0)
    program = torch.export.export(GroupedQueryScores().eval(), (torch.randn(1, 12, 32),), strict=False)
    legalized, applied = apply_legalizations(program, tflite_legalizations())
    assert applied == [REPEAT]
    assert not any(n.target is torch.ops.aten.expand.default for n in legalized.graph.nodes)
    assert apply_legalizations(program, onnx_legalizations())[1] == []  # the ONNX exporters get it right
    sample = torch.randn(1, 12, 32)
    torch.testing.assert_close(legalized.module()(sample), program.module()(sample), rtol=0, atol=0)


def test_a_repeat_over_a_dynamic_length_leaves_the_length_dynamic():
    """The rewrite never compares a symbolic size: int() on one would add a guard fixing it to the example's
    (the shape env then reads the length as 12 only, and any later rewrite bounds it by 12)."""
    torch.manual_seed(0)
    length = torch.export.Dim("length", min=8, max=64)
    module = GroupedQueryScores().eval()
    program = torch.export.export(module, (torch.randn(1, 12, 32),), dynamic_shapes=({1: length},), strict=False)
    legalized, applied = apply_legalizations(program, tflite_legalizations())
    assert applied == [REPEAT]
    (x,) = [n for n in legalized.graph.nodes if n.op == "placeholder" and n.name == "x"]
    symbol = x.meta["val"].shape[1].node
    bounds = symbol.shape_env.bound_sympy(symbol.expr)
    assert (int(bounds.lower), int(bounds.upper)) == (8, 64)
    sample = torch.randn(1, 40, 32)
    torch.testing.assert_close(legalized.module()(sample), module(sample), rtol=0, atol=0)


@pytest.mark.slow
def test_grouped_query_scores_pass_parity_on_tflite(tmp_path):
    pytest.importorskip("litert_torch", reason="the tflite target needs litert-torch")
    from kiln.compiler.export.pipeline import export_targets

    torch.manual_seed(0)
    (result,) = export_targets(
        GroupedQueryScores().eval(), "tflite", tmp_path / "o", example_inputs=(torch.randn(1, 12, 32),)
    )
    assert result.published, result.manifest.parity.summary()  # without the rewrite: cosine -0.12
    assert result.manifest.target_info["decompositions_applied"] == [REPEAT]


def test_when_every_onnx_route_fails_the_error_names_each_reason(tmp_path):
    from kiln.compiler.capture.program import EagerModel
    from kiln.compiler.errors import UnsupportedOpError

    from tests.models.user_models import bucketize

    module, inputs = bucketize()
    program = torch.export.export(module, inputs, strict=False)
    eager = EagerModel(module, inputs, ["x"])
    with pytest.raises(UnsupportedOpError) as failed:
        lower_to_onnx(program, tmp_path / "model.onnx", ["output"], None, eager=eager)
    message = failed.value.one_line()
    assert "lowering to ONNX failed (operator aten.searchsorted): dynamo: " in message
    assert "; torchscript: " in message and "\n" not in message
