"""(filled in by the fx work)"""

from __future__ import annotations

from passes.base import Pass

PASSES: list[Pass] = []
