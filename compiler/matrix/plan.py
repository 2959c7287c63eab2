"""What a matrix run will do: its settings, its shard, every cell with its key (plan.json), and where each
cell's files go."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.compiler.errors import UsageError, error_text
from kiln.compiler.matrix.config import CellSpec, MatrixConfig, cell_key, kiln_code_hash
from kiln.compiler.safe_fs import read_text

PLAN_FILE = "plan.json"
CELLS_DIR = "cells"


@dataclass(frozen=True)
class Shard:
    """Shard I of N (1-based): every N-th cell of the sorted cell list, starting at the I-th."""

    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        """Parse `I/N`."""
        index, _, count = text.partition("/")
        try:
            shard = cls(int(index), int(count))
        except ValueError:
            raise UsageError(f"--shard '{text}' is not I/N", "write for example --shard 2/4") from None
        if not 1 <= shard.index <= shard.count:
            raise UsageError(f"--shard {text}: need 1 <= I <= N", "shards are numbered from 1")
        return shard

    def select(self, cells: list[CellSpec]) -> list[CellSpec]:
        """This shard's cells of the (sorted) cell list."""
        return [c for i, c in enumerate(cells) if i % self.count == self.index - 1]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass
class RunSettings:
    """How to run a matrix (not what is in it)."""

    out: Path
    shard: Shard = field(default_factory=Shard)
    rerun: bool = False
    cache_dir: Path | None = None  # None: no cache
    keep_artifacts: bool = False
    executor: str = "local"  # "local" or "ray"
    address: str | None = None  # Ray cluster address (None: RAY_ADDRESS, or a new local instance)
    baseline: Path | None = None
    allow_fail: list[str] = field(default_factory=list)
    error_factor: float = 10.0
    latency_factor: float = 1.10


@dataclass
class Plan:
    """Every cell of the matrix with its key, and which of them this shard runs."""

    cells: list[CellSpec]
    keys: dict[str, str]  # cell id -> key
    shard: Shard
    settings: dict[str, Any]
    host: dict[str, Any]

    def mine(self) -> list[CellSpec]:
        """The cells of this shard."""
        return self.shard.select(self.cells)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (written as plan.json beside the results)."""
        return {
            "schema_version": 1,
            "shard": str(self.shard),
            "settings": self.settings,
            "host": self.host,
            "cells": [
                {"cell": c.to_dict(), "key": self.keys[c.cell_id], "shard": self._shard_of(i)}
                for i, c in enumerate(self.cells)
            ],
        }

    def _shard_of(self, index: int) -> str:
        return f"{index % self.shard.count + 1}/{self.shard.count}"

    @classmethod
    def read(cls, directory: Path) -> Plan:
        """The plan.json of a matrix output directory."""
        path = directory / PLAN_FILE
        try:
            data = json.loads(read_text(path))
        except FileNotFoundError:
            raise UsageError(f"{directory} holds no {PLAN_FILE}", "pass directories written by `kiln matrix`") from None
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            raise UsageError(f"cannot read {path}: {str(exc)[:200]}", "re-run that shard") from None
        try:
            cells = [CellSpec.from_dict(c["cell"]) for c in data["cells"]]
            keys = {c["cell"]["name"] + "/" + c["cell"]["target"] + "/" + c["cell"]["precision"]: c["key"]
                    for c in data["cells"]}  # fmt: skip
            return cls(cells, keys, Shard.parse(data["shard"]), data.get("settings", {}), data.get("host", {}))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise UsageError(
                f"{path} is not a plan of `kiln matrix` ({error_text(exc)})", "re-run that shard"
            ) from None


def plan_matrix(config: MatrixConfig, shard: Shard, executor: str) -> Plan:
    """The cells of the matrix and their keys."""
    from kiln.compiler.host import host_info

    cells = config.cells()
    host = host_info()
    code = kiln_code_hash()
    run = {"threads": config.threads, "repeat": config.repeat, "warmup": config.warmup}
    keys = {c.cell_id: cell_key(c, run, code, host) for c in cells}
    return Plan(cells, keys, shard, run | {"executor": executor}, host)


def safe_name(cell_id: str) -> str:
    """A directory name for a cell id."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in cell_id.replace("/", "__"))
