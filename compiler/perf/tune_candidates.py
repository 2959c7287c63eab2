"""The kinds of build `kiln tune` plans besides targets x precisions: image I/O channels-last (NHWC), a dynamic
batch, and the plain -O0 export.

Each kind is a `Variant`: one model entry of the builds' matrix (the model's name + `Variant.suffix`) with the
export options that make it, the precisions it is built at, and the targets that can take it (the others are
listed as not built, with why). The tune's leaderboard rows carry the variant's layout and batch range.

Cost is kept bounded: for a model with image inputs (4-d float) NHWC is built at fp32 only, unless `--io` names
the layouts (then at every precision). With `--batch N` different from the example's batch every build has a
dynamic batch 1:N (a static build runs only at its example's batch; those are listed as not built); at the
example's batch, dynamic-batch builds are added at fp32 only with `--objective throughput`, so the default
latency tune builds what it did before plus the NHWC fp32 build per target.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import UsageError

if TYPE_CHECKING:
    from kiln.compiler.matrix.config import MatrixConfig
    from kiln.compiler.matrix.results import CellResult
    from kiln.targets.base import RuntimeSettings, Target

LAYOUTS = ("nchw", "nhwc")
MAX_BATCH = 1024  # --batch above this is refused: the timed inputs alone would be too large to be meant
PLAIN = "-O0"  # the model-name suffix of the plain (unoptimized) export in the builds
NHWC_SUFFIX = "-nhwc"
DYNAMIC_SUFFIX = "-dynbatch"


def parse_io(text: str | None) -> tuple[str, ...] | None:
    """`--io nchw|nhwc|nchw,nhwc` (None: the default, NHWC at fp32 only for a model with image inputs)."""
    if text is None:
        return None
    layouts = tuple(dict.fromkeys(t.strip().lower() for t in text.split(",") if t.strip()))
    check_io(layouts, text)
    return layouts


def check_io(layouts: tuple[str, ...], text: str | None = None) -> None:
    """A one-line UsageError for a layout list that names nothing or something unknown."""
    unknown = [layout for layout in layouts if layout not in LAYOUTS]
    if unknown or not layouts:
        shown = text if text is not None else ",".join(layouts)
        raise UsageError(f"--io {shown!r}: not a layout list", "use nchw, nhwc or nchw,nhwc")


def check_batch(batch: int | None) -> None:
    """A one-line UsageError for a batch below 1 or above MAX_BATCH."""
    if batch is not None and not 1 <= batch <= MAX_BATCH:
        raise UsageError(f"--batch {batch}: must be from 1 to {MAX_BATCH}", "e.g. --batch 8")


@dataclass(frozen=True)
class ModelShape:
    """What tune needs to know of the model's example inputs to plan layouts and batches."""

    batch: int | None  # dim 0 of the first input that has a dimension; None: no input has one
    images: bool  # some input is an image (a 4-d float tensor, what NHWC I/O makes channels-last)


def probe(source: str) -> ModelShape:
    """The example inputs' batch and whether any is an image, from loading the model here once (a model that
    does not load is the same UsageError `kiln export` gives)."""
    import torch
    from kiln.compiler.capture.sources import load_source
    from kiln.compiler.image_layout import is_image
    from kiln.compiler.types import TensorSpec

    tensors = [t for t in load_source(source).example_inputs if isinstance(t, torch.Tensor)]
    specs = [TensorSpec(str(i), tuple(t.shape), str(t.dtype).removeprefix("torch.")) for i, t in enumerate(tensors)]
    batch = next((int(t.shape[0]) for t in tensors if t.dim()), None)
    return ModelShape(batch, any(is_image(s) for s in specs))


@dataclass(frozen=True)
class Variant:
    """One kind of build: its I/O layout, its batch (static or a dynamic range), whether it is the plain -O0
    export, and the precisions it is built at (None: every precision asked)."""

    layout: str | None = None  # "nchw" (as captured), "nhwc" (image I/O channels-last); None: no image inputs
    batch_range: str | None = None  # "MIN:MAX": a dynamic batch; None: the example's static batch
    plain: bool = False
    precisions: tuple[str, ...] | None = None

    @property
    def suffix(self) -> str:
        """Its model name's suffix in the builds ("" for the usual build; the plain one keeps "-O0")."""
        nhwc = NHWC_SUFFIX if self.layout == "nhwc" else ""
        return nhwc + (DYNAMIC_SUFFIX if self.batch_range else "") + (PLAIN if self.plain else "")

    @property
    def label(self) -> str:
        """What a candidate's name says of it after `target precision` ("" for the usual build)."""
        parts = ["NHWC"] if self.layout == "nhwc" else []
        parts += [f"batch={self.batch_range}"] if self.batch_range else []
        return " ".join(parts + ([PLAIN] if self.plain else []))

    def export_options(self) -> dict[str, Any]:
        """The matrix cell options (`kiln.compiler.matrix.config.CellOptions`) that make it."""
        options: dict[str, Any] = {"opt_level": 0} if self.plain else {}
        options |= {"io": "nhwc"} if self.layout == "nhwc" else {}
        return options | ({"dynamic_batch": self.batch_range} if self.batch_range else {})

    def refusal(self, target: Target, batch: int | None) -> str | None:
        """Why `target` cannot build this variant to be timed at `batch`, or None."""
        if self.layout == "nhwc" and "nhwc" not in target.io_options:
            return f"{target.name} takes no NHWC I/O (--io nhwc)"
        if self.batch_range and target.static_shapes:
            why = f" ({target.static_reason.rstrip('.')})" if target.static_reason else ""
            return f"{target.name} needs static shapes{why}: it cannot take a dynamic batch {self.batch_range}"
        if not self.batch_range and target.fixed_batch not in (None, batch):
            return f"{target.name} builds only at batch {target.fixed_batch}: it cannot be timed at batch {batch}"
        return None


@dataclass(frozen=True)
class Asked:
    """What the tune was asked that decides the variants."""

    precisions: tuple[str, ...]
    io: tuple[str, ...] | None  # None: the default
    batch: int | None  # None: the example's
    objective: str
    plain: bool


def variants(asked: Asked, shape: ModelShape) -> tuple[list[Variant], list[dict[str, str]]]:
    """The kinds of build to make, and the ones left out with why (as `Plan.skipped` rows, target "*")."""
    skipped: list[dict[str, str]] = []
    fp32 = "fp32" in asked.precisions
    layouts = _layouts(asked, shape, skipped)
    if asked.batch is not None and shape.batch is None:
        raise UsageError(f"--batch {asked.batch}: the model's inputs have no batch dimension", "drop --batch")
    timed = asked.batch if asked.batch is not None else shape.batch
    dynamic = f"1:{max(timed, 2)}" if timed is not None else None  # a range needs MIN < MAX
    if asked.batch is not None and asked.batch != shape.batch:
        static_is_out = (
            f"a static build runs only at the example's batch {shape.batch}, not at --batch {asked.batch}: "
            f"built with a dynamic batch {dynamic} instead"
        )
        skipped.append(_skip("*", ",".join(asked.precisions), f"static batch {shape.batch}", static_is_out))
        builds = [Variant(layout, dynamic, False, precisions) for layout, precisions in layouts]
    else:
        builds = [Variant(layout, None, False, precisions) for layout, precisions in layouts]
        if asked.objective == "throughput" and fp32 and dynamic is not None:
            builds += [Variant(layout, dynamic, False, ("fp32",)) for layout, _ in layouts]
    if asked.plain and fp32:
        builds.append(Variant(layouts[0][0], builds[0].batch_range, True, ("fp32",)))
    return builds, skipped


def _layouts(
    asked: Asked, shape: ModelShape, skipped: list[dict[str, str]]
) -> list[tuple[str | None, tuple[str, ...] | None]]:
    """(layout, precisions) pairs: NCHW at every precision, NHWC at fp32 by default; every precision of each
    layout `--io` names."""
    if not shape.images:
        if asked.io is not None and "nhwc" in asked.io:
            if asked.io == ("nhwc",):
                raise UsageError(
                    "--io nhwc: the model has no image input (a 4-d float tensor) to make channels-last",
                    "drop --io, or pass --io nchw",
                )
            skipped.append(_skip("*", "*", "NHWC", "the model has no image input (a 4-d float tensor)"))
        return [(None, None)]
    if asked.io is not None:
        return [(layout, None) for layout in asked.io]
    if "fp32" not in asked.precisions:
        why = "by default built at fp32 only, which --precisions leaves out: pass --io nchw,nhwc for every precision"
        skipped.append(_skip("*", "*", "NHWC", why))
        return [("nchw", None)]
    return [("nchw", None), ("nhwc", ("fp32",))]


def _skip(target: str, precision: str, variant: str, reason: str) -> dict[str, str]:
    return {"target": target, "precision": precision, "variant": variant, "reason": reason}


def for_targets(
    builds: list[Variant],
    targets: list[Target],
    precisions: tuple[str, ...],
    batch: int | None,
    skipped: list[dict[str, str]],
) -> list[tuple[Variant, tuple[str, ...]]]:
    """Each variant with the names of the targets that can build it to be timed at `batch` (those that cannot
    are added to `skipped`); variants no target can build are left out. A UsageError when none is left."""
    planned, refusals = [], []
    for variant in builds:
        able = []
        for target in targets:
            why = variant.refusal(target, batch)
            if why is None:
                able.append(target.name)
            else:
                shown = ",".join(variant.precisions or precisions)
                skipped.append(_skip(target.name, shown, variant.label or "as captured", why))
                refusals.append(why)
        if able:
            planned.append((variant, tuple(able)))
    if not any(not v.plain for v, _ in planned):
        reasons = "; ".join(dict.fromkeys(refusals))
        raise UsageError(f"no candidates: {reasons}", "choose other --targets, or drop --batch / --io")
    return planned


@dataclass
class Plan:
    """The builds: the matrix of candidates, the (target, precision) pairs and variants left out with why, what
    each model entry of the matrix is (by its name), and the batch every candidate is timed at."""

    config: MatrixConfig | None  # None: read back from DIR/builds (`kiln tune --time-only`), nothing to build
    skipped: list[dict[str, str]] = field(default_factory=list)
    variants: dict[str, Variant] = field(default_factory=dict)
    batch: int | None = None  # None: the model has no batch dimension (timed on its example inputs)


@dataclass
class Entry:
    """One timed candidate: a build with runtime settings and a thread count, or a rejected build or setting."""

    name: str
    target: str
    precision: str
    plain: bool
    settings: RuntimeSettings
    threads: int | None
    build: CellResult
    directory: Path | None = None
    rejected: str | None = None  # why it is not a candidate (parity, accuracy budget, load failure)
    timing: dict[str, Any] = field(default_factory=dict)
    # Accuracy measured again with these runtime settings (`_parity_with_settings`); None: the build's own figures.
    min_cosine: float | None = None
    max_abs_error: float | None = None
    variant: Variant = field(default_factory=Variant)  # its layout and batch range (`plain` above is its own)
    batch: int | None = None  # the batch it is timed at (None: its example's)

    @property
    def build_name(self) -> str:
        """target precision (NHWC) (batch=MIN:MAX) (-O0)."""
        label = replace(self.variant, plain=self.plain).label
        return f"{self.target} {self.precision}{' ' + label if label else ''}"
