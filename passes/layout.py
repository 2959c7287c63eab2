"""(filled in by the layout work)"""

from __future__ import annotations

from passes.base import Pass

PASSES: list[Pass] = []
