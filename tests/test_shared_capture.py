"""The model is captured once for every target: a target's converter must not change what the next one gets.

litert-torch's StableHLO lowering (the `tpu` target) decomposes the program it is given in place; on a
Hugging Face DistilBERT the `pt2` target built after it then saved a program with a Python lambda as an
operator, which torch.export refuses. Each build now gets its own copy of the FX program.
"""

from __future__ import annotations

import pytest
import torch
from kiln.compiler.export.pipeline import export_targets


class _LastHiddenState(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.slow
def test_a_converter_that_changes_its_program_leaves_the_capture_intact(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(
        vocab_size=200, dim=64, n_layers=1, n_heads=2, hidden_dim=128, max_position_embeddings=64
    )
    module = _LastHiddenState(transformers.DistilBertModel(config).eval()).eval()
    inputs = (torch.randint(0, 200, (2, 16)), torch.ones(2, 16, dtype=torch.long))
    results = export_targets(module, "tpu,pt2", tmp_path / "o", example_inputs=inputs)
    assert [(r.target, r.failure) for r in results] == [("tpu", None), ("pt2", None)]
    assert all(r.published for r in results)
