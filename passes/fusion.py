"""(filled in by the fusion work)"""

from __future__ import annotations

from passes.base import Pass

PASSES: list[Pass] = []
