"""Which targets an export builds: those named (or `all`), checked against the options and the source."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.compiler.errors import KilnError, MissingBackendError, UsageError
from kiln.targets import resolve_targets
from kiln.targets.base import Target

if TYPE_CHECKING:
    from kiln.compiler.capture.sources import ModelSource
    from kiln.compiler.export.options import ExportOptions
    from kiln.compiler.progress import Progress


def select_targets(spec: str | list[str], options: ExportOptions, progress: Progress) -> list[Target]:
    """The targets named by `spec` (a comma list, a list, or `all`) that can do what the options ask; with `all`,
    the others are skipped (saying why), else refused with a one-line error."""
    targets = resolve_targets(spec)
    every = is_every(spec)
    fitting = []
    for target in targets:
        refused = refusal(target, options)
        if refused is None:
            fitting.append(target)
        elif every and isinstance(refused, UsageError) and len(targets) > 1:
            progress.say(f"skipping {target.name}: {refused.message}")
        else:
            raise refused
    if not fitting:
        raise UsageError("no target can export with these options", "run `kiln targets` for what each supports")
    if options.device is not None and not any(t.devices for t in fitting):
        raise UsageError(
            f"--device {options.device} applies to none of the targets {', '.join(t.name for t in fitting)}",
            "--device is for targets that compile for a device, e.g. aoti (name it: `all` leaves out targets "
            "that are limited on this machine)",
        )
    return fitting


def refusal(target: Target, options: ExportOptions) -> KilnError | None:
    """Why `target` cannot export with these options (its precision, I/O options, dynamic dims, availability
    here), or None."""
    precision = options.precision_for(target)
    if target.static_shapes and options.shapes.dynamic is not None:
        refused = (
            _buckets_refusal(target, options)
            if options.shapes.buckets and target.buckets
            else _static_refusal(target, options)
        )
        if refused is not None:  # buckets that fit go on to the checks below (precision, the target's own)
            return refused
    if precision not in target.precisions:
        return UsageError(
            f"target {target.name} does not support precision {precision}",
            f"use one of: {', '.join(target.precisions)}",
        )
    if options.calibration.accuracy is not None and (precision != "int8" or not target.accuracy_aware):
        return UsageError(
            f"--max-drop does not apply to target {target.name} at precision {precision}",
            "it is for --precision int8 on targets that can keep layers in float (kiln targets --json: accuracy_aware)",
        )
    unsupported_io = [o for o in options.io if o not in target.io_options]
    if unsupported_io:
        return UsageError(
            f"target {target.name} does not support --io {','.join(unsupported_io)}",
            f"it supports: {', '.join(target.io_options) or 'no --io options'}",
        )
    reason = target.unavailable_reason()
    if reason:
        return MissingBackendError(
            f"target {target.name} is not available on this machine: {reason}",
            "install what it needs, or choose another target (kiln targets)",
        )
    try:
        target.check_request(options.build_request(target, None))
    except KilnError as refused:
        return refused
    return None


def _static_refusal(target: Target, options: ExportOptions) -> KilnError:
    """A dynamic dim on a static-shape target, without --buckets: why not, and the way forward."""
    assert options.shapes.dynamic is not None
    flag = "--dynamic-batch" if options.shapes.dynamic.batch is not None else "--dynamic"
    bucket_hint = f"pass --buckets SYMBOL=SIZE,SIZE to build one program per size, or export {target.name} "
    why = f": {target.static_reason}" if target.static_reason else ""
    return UsageError(
        f"target {target.name} needs static shapes, but {flag} {options.shapes.dynamic} was given{why}",
        (bucket_hint if target.buckets else f"export {target.name} ")
        + f"without {flag}, once per {'batch size' if flag == '--dynamic-batch' else 'shape'} you serve "
        "(set the shape of the example inputs)",
    )


def _buckets_refusal(target: Target, options: ExportOptions) -> KilnError | None:
    """Why `--buckets` cannot stand for the dynamic dims on `target` (every symbol needs sizes within its range;
    none given for another symbol), or None."""
    assert options.shapes.dynamic is not None
    symbols = {d.symbol: d for d in options.shapes.dynamic.dims}
    for symbol, sizes in options.shapes.buckets.items():
        if symbol not in symbols:
            return UsageError(
                f"--buckets {symbol}=...: no dynamic dim is named {symbol}",
                f"name one of: {', '.join(symbols)} (name a --dynamic dim with SYMBOL=NAME:AXIS=MIN:MAX)",
            )
        dim = symbols[symbol]
        outside = [s for s in sizes if not dim.minimum <= s <= dim.maximum]
        if outside:
            return UsageError(
                f"--buckets {symbol}: {outside[0]} is outside the range {dim.minimum}:{dim.maximum}",
                "pick bucket sizes within the --dynamic range",
            )
    missing = [s for s in symbols if s not in options.shapes.buckets]
    if missing:
        return UsageError(
            f"target {target.name} needs static shapes: --buckets gives no sizes for {', '.join(missing)}",
            f"add them, e.g. --buckets {missing[0]}=SIZE,SIZE",
        )
    if len(options.shapes.buckets) > 1:
        return UsageError(
            f"target {target.name}: --buckets for more than one symbol is not supported",
            "bucket one dynamic dim, and give the others fixed sizes",
        )
    return None


def is_every(spec: str | list[str]) -> bool:
    """Whether the user asked for `all` targets."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    return names == ["all"]


def fit_to_source(
    source: ModelSource, targets: list[Target], spec: str | list[str], progress: Progress
) -> list[Target]:
    """The targets that can take this source; with `all`, skip the rest, else refuse them."""
    every = is_every(spec)
    fitting = [t for t in targets if source.kind == "torch" or t.consumes == "onnx"]
    if every and fitting:
        for skipped in (t for t in targets if t not in fitting):
            progress.say(f"skipping {skipped.name}: it needs a PyTorch model, not ONNX")
        return fitting
    for target in targets:
        if target not in fitting:
            raise UsageError(
                f"target {target.name} needs a PyTorch model, but {source.description} is ONNX",
                "give the model as file.py:factory, .pt2 or zoo:NAME, or pick an ONNX-consuming target",
            )
    return targets


def example_batch(source: ModelSource) -> int | None:
    """The batch of the source's example inputs (dim 0 of the first; None without one)."""
    first = source.example_inputs[0] if source.example_inputs else None
    return first.shape[0] if first is not None and first.dim() else None


def capture_groups(source: ModelSource, targets: list[Target]) -> list[tuple[int | None, list[Target]]]:
    """Targets grouped by the batch they must be captured at (None: the example inputs' own batch)."""
    example = example_batch(source)
    groups: dict[int | None, list[Target]] = {}
    for target in targets:
        batch = target.fixed_batch if target.fixed_batch not in (None, example) else None
        groups.setdefault(batch, []).append(target)
    return sorted(groups.items(), key=lambda item: item[0] or 0)
