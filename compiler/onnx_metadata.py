"""What the dynamo ONNX exporter writes on each node it makes, read one way: `pkg.torch.onnx.name_scopes` (the
PyTorch module path of the node, e.g. `['', 'features', 'features.1', 'conv2d']`, the node's own FX name last) and
`pkg.torch.onnx.class_hierarchy` (the modules' classes, in the same order).

Both are Python list literals. Absent, unreadable (not a literal) or not a list or tuple: no scopes ([]), whoever
reads them (localization's boundary mapping, a pass's module-name contract, the quantization report)."""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
CLASS_HIERARCHY = "pkg.torch.onnx.class_hierarchy"


def scope_list(text: str | None) -> list[str]:
    """The list literal `text` as strings; [] when it is absent, unreadable or not a list or tuple."""
    if not text:
        return []
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def name_scopes(node: Any) -> list[str]:
    """The `name_scopes` of an ONNX node (an `onnx.NodeProto` or an `onnx_ir.Node`), [] when it has none."""
    return scope_list(_metadata(node).get(NAME_SCOPES))


def class_hierarchy(node: Any) -> list[str]:
    """The `class_hierarchy` of an ONNX node (an `onnx.NodeProto` or an `onnx_ir.Node`), [] when it has none."""
    return scope_list(_metadata(node).get(CLASS_HIERARCHY))


def _metadata(node: Any) -> dict[str, str]:
    props = node.metadata_props
    if isinstance(props, Mapping):  # onnx_ir
        return dict(props)
    return {p.key: p.value for p in props}  # onnx: repeated StringStringEntryProto
