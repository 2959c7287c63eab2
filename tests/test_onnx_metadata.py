"""The exporter's node metadata (`name_scopes`, `class_hierarchy`) has one reader, and every reader of it (a pass's
module-name contract, localization's boundary mapping, the quantization report) gets the same answer from the
same text, hostile text included."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest
from kiln.compiler.onnx_metadata import CLASS_HIERARCHY, NAME_SCOPES, class_hierarchy, name_scopes, scope_list
from kiln.compiler.quantization.qdq_graph import module_of

GOOD = "['', 'features', 'features.1', 'conv2d']"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD, ["", "features", "features.1", "conv2d"]),
        ("('', 'body')", ["", "body"]),  # a tuple reads like a list
        (None, []),
        ("", []),
        ("not python", []),  # unreadable
        ("'features'", []),  # not a list
        ("{'a': 1}", []),
        ("[" * 100_000, []),  # nested past the parser's limit
        ("__import__('os').system('true')", []),  # never evaluated
    ],
)
def test_scope_list(text: str | None, expected: list[str]) -> None:
    assert scope_list(text) == expected


def _proto_node(scopes: str, classes: str) -> onnx.NodeProto:
    node = onnx.helper.make_node("Relu", ["x"], ["y"], name="relu")
    for key, value in ((NAME_SCOPES, scopes), (CLASS_HIERARCHY, classes)):
        entry = node.metadata_props.add()
        entry.key, entry.value = key, value
    return node


def test_both_node_kinds_read_alike() -> None:
    classes = "['M', 'torch.nn.Sequential', 'torch.nn.Conv2d', 'conv2d']"
    proto = _proto_node(GOOD, classes)
    model = ir.Node("", "Relu", [], name="relu")
    model.metadata_props.update({NAME_SCOPES: GOOD, CLASS_HIERARCHY: classes})
    assert name_scopes(proto) == name_scopes(model) == ["", "features", "features.1", "conv2d"]
    assert class_hierarchy(proto) == class_hierarchy(model) == ["M", "torch.nn.Sequential", "torch.nn.Conv2d", "conv2d"]


def test_the_quantization_report_names_no_module_for_unreadable_scopes() -> None:
    assert module_of(_proto_node(GOOD, "['M', 'S', 'torch.nn.Conv2d', 'c']"), set(), {})[:2] == ("features.1", "Conv2d")
    assert module_of(_proto_node("not python", "also not"), set(), {})[0] == "?"
