"""A backend's own exceptions as Kiln errors: one line naming the target, the action and the operation."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from kiln.compiler.errors import KilnError, UnsupportedOpError, error_text, plain_text


@contextmanager
def backend_failures(target: str, action: str) -> Iterator[None]:
    """Turn a backend's own exception into an UnsupportedOpError naming the target (`target`: its name) and the op
    if it says."""
    try:
        yield
    except (KilnError, OSError, KeyboardInterrupt):
        raise
    except Exception as exc:
        text = plain_text(str(exc))
        what = f" (operation {op})" if (op := operation_named_in(text)) else ""
        raise UnsupportedOpError(
            f"{target} could not {action} the model{what}: {error_text(exc)}",
            "try another target, or replace that operation in the model",
        ) from None


# Messages that name the operation in a fixed place, by backend
_NAMED_AT = (
    r"Node number \d+ \((\w+)\) failed",  # TFLite interpreter
    r"while running (\w+) node",  # ONNX Runtime, at run time
    r"implementation for (\w+)\(\d+\) node",  # ONNX Runtime: no kernel for that op and opset
    r"\(op_type:(\w+)",  # ONNX shape inference
    r"\bOp(?:type)? \((\w+)\)",  # ONNX Runtime graph and type errors
)
_KEYWORD = r"(?i:operations?|operators?|op|node)"


def operation_named_in(text: str) -> str | None:
    """The operation a backend's error message names, if it names one (e.g. `Conv`, `STABLEHLO_SCATTER`)."""
    text = plain_text(text)
    for pattern in _NAMED_AT:
        if found := re.search(pattern, text):
            return found[1]
    # "operation X": an op name has a capital, an underscore, a dot or a colon, unlike an English word
    # ("operation between", "operators are"); only the keyword ignores case
    for found in re.finditer(rf"\b{_KEYWORD}[\s:'\"]+(?!{_KEYWORD}\b)([A-Za-z_][\w.:]*)", text):
        name = found[1].rstrip(".:")
        if re.search(r"[A-Z_.:]", name):
            return name
    return None
