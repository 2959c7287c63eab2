"""Localization judges each prefix against the captured program's value at the boundary; `eager_check` checks
those values against the user's own modules (forward hooks on one eager run), so that the reference of a
localization is the user's model too, and says where torch.export's capture differs from it."""

from __future__ import annotations

import torch
from kiln.compiler.capture.program import EagerModel
from kiln.compiler.diagnose.cut import eager_check, module_boundaries
from torch import nn


class ExportOnly(nn.Module):
    """Computes something else while torch.export traces it (as model code that branches on
    `torch.compiler.is_exporting()` may): the captured program is not the model there."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if torch.compiler.is_exporting() else x


class Net(nn.Module):
    def __init__(self, diverging: bool) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = ExportOnly() if diverging else nn.Linear(4, 4)
        self.third = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.third(torch.relu(self.second(torch.relu(self.first(x)))))


def _check(diverging: bool) -> str:
    torch.manual_seed(0)
    model = Net(diverging).eval()
    x = torch.randn(3, 4)
    program = torch.export.export(model, (x,), strict=False)
    bounds = module_boundaries(program)
    return eager_check(EagerModel(model, (x,), ["x"]), program, bounds, {"x": x.numpy()})


def test_boundaries_equal_to_the_models_own_module_outputs():
    text = _check(diverging=False)
    assert "3 of 3 equal to the model's own module outputs" in text and "DIFFERS" not in text


def test_a_capture_that_differs_from_the_model_is_named():
    text = _check(diverging=True)
    assert "the captured program DIFFERS from the model at second (ExportOnly)" in text
