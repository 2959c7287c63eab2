"""A backend's own exceptions as Kiln errors: one line naming the target, the action and the operation."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from compiler.errors import KilnError, UnsupportedOpError

if TYPE_CHECKING:
    from targets.base import Target


@contextmanager
def backend_failures(target: Target, action: str) -> Iterator[None]:
    """Turn a backend's own exception into an UnsupportedOpError naming the target and the op if it says."""
    try:
        yield
    except (KilnError, OSError, KeyboardInterrupt):
        raise
    except Exception as exc:
        text = " ".join(str(exc).split())
        what = f" (operation {op})" if (op := operation_named_in(text)) else ""
        raise UnsupportedOpError(
            f"{target.name} could not {action} the model{what}: {type(exc).__name__}: {text[:300]}",
            "try another target, or replace that operation in the model",
        ) from None


def operation_named_in(text: str) -> str | None:
    """The operation a backend's error message names, if it names one (e.g. `Conv`, `STABLEHLO_SCATTER`)."""
    tflite = re.search(r"Node number \d+ \((\w+)\) failed", text)
    if tflite:
        return tflite[1]
    keyword = r"(?:operations?|operators?|op|node)"
    # an op name has a capital, an underscore, a dot or a colon: not an English word like "are"
    op = re.search(rf"\b{keyword}[\s:'\"]+(?!{keyword}\b)(?=[\w.:]*[A-Z_.:])([A-Za-z_][\w.:]*)", text, re.IGNORECASE)
    return op[1] if op else None
