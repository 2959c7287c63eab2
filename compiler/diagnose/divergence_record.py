"""The record of a localization (`kiln.compiler.diagnose.divergence.localize`): each module boundary's error
(`ModuleError`) and
the answer (`Divergence`), as the manifest (`parity.divergence`) and `divergence.json` hold it."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.compiler.diagnose.cut import Boundary
    from kiln.compiler.types import OutputMetrics

DIVERGENCE_FILE = "divergence.json"


@dataclass
class ModuleError:
    """One module boundary as the target computes it: its output's error against PyTorch (`measured` False: not
    built), whether that is within the tolerance, and why not (or the conversion error)."""

    index: int
    module: str
    kind: str
    source: str = ""
    ops: list[str] = field(default_factory=list)  # the ATen ops since the previous boundary
    measured: bool = False
    passed: bool | None = None  # None: not built
    max_abs: float = 0.0
    cosine: float = 1.0
    snr_db: float = math.inf
    reason: str = ""
    cut_at: int | None = None  # measured as a live value of the prefix cut at that boundary (None: its own)
    # The worst channel (None: no channel axis), as the gate gives it (kiln.compiler.types.OutputMetrics)
    channel_axis: int | None = None
    channel_index: int | None = None
    channel_cosine: float = 1.0
    channel_snr_db: float = math.inf

    @classmethod
    def at(cls, boundary: Boundary) -> ModuleError:
        """The boundary, not measured yet."""
        return cls(boundary.index, boundary.module, boundary.kind, boundary.source, list(boundary.ops))

    def take(self, metrics: OutputMetrics) -> None:
        """Record the gate's verdict and figures for this boundary's tensor."""
        self.measured, self.passed, self.reason = True, metrics.passed, metrics.reason
        self.max_abs, self.cosine, self.snr_db = metrics.max_abs_error, metrics.min_cosine, metrics.snr_db
        self.channel_axis, self.channel_index = metrics.channel_axis, metrics.channel_index
        self.channel_cosine, self.channel_snr_db = metrics.channel_cosine, metrics.channel_snr_db

    def label(self) -> str:
        """`body.2 (Block)`."""
        return f"{self.module} ({self.kind})"

    def figures(self) -> str:
        """`cosine .. snr ..dB max_abs ..`, or `not built`."""
        if not self.measured:
            return "not built"
        figures = f"cosine {self.cosine:.6f} snr {self.snr_db:.1f}dB max_abs {self.max_abs:.3g}"
        if self.channel_axis is None:
            return figures
        return (
            f"{figures}; worst channel [axis {self.channel_axis}, #{self.channel_index}] cosine "
            f"{self.channel_cosine:.4f} snr {self.channel_snr_db:.1f}dB"
        )


@dataclass(kw_only=True)
class Divergence:
    """The answer of `localize`: the first module whose output diverges (None: every boundary built is within
    tolerance), its output's error, its inputs' error (the previous boundary; None: the model's inputs, exact),
    the next modules in order, every boundary measured, and what it cost."""

    target: str
    precision: str
    first: ModuleError | None
    inputs: ModuleError | None
    following: list[ModuleError]
    measured: list[ModuleError]
    boundaries: int
    builds: int
    seconds: float
    conversion_error: str | None = None  # the first diverging prefix did not convert: this is why
    notes: list[str] = field(default_factory=list)
    method: str = "bisection"  # or fast-path, fast-path+bisection, every (see _search)
    tolerance: dict[str, Any] = field(default_factory=dict)  # what each boundary was judged with
    route: str = ""  # the route every prefix was built by (kiln.targets.base.Route.name; "": the default capture)
    reference: str = ""  # what the boundaries were judged against, checked against the model (cut.eager_check)

    def summary(self) -> str:
        """`first divergence: body.2 (Block) cosine 0.41; inputs cosine 1.000000` (one line)."""
        differs = [self.reference] if "DIFFERS" in self.reference else []
        if self.first is None:
            found = f"no divergence found at {len(self.measured)} of {self.boundaries} module boundaries"
            return "; ".join([found, *self.notes, *differs])
        if self.conversion_error:
            ops = ", ".join(self.first.ops)
            return f"first divergence: {self.first.label()} (ops {ops}) does not convert: {self.conversion_error}"
        inputs = self.inputs.figures() if self.inputs is not None else "the model's inputs (exact)"
        first = self.first
        return "; ".join(
            [f"first divergence: {first.label()} {first.figures()} ({first.reason})",
             f"inputs {inputs} ({self.builds} builds, {self.seconds:.1f}s)", *differs]
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The record written to the manifest (`parity.divergence`) and to `divergence.json`."""
        from kiln.compiler.types import json_safe

        return dict(json_safe({"summary": self.summary(), **asdict(self)}))

    def write(self, directory: Path) -> Path:
        """Write `divergence.json` into `directory` (its page is `kiln.compiler.diagnose.profile_html`'s)."""
        path = directory / DIVERGENCE_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path
