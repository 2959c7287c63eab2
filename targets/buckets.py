"""`--buckets SYMBOL=SIZE,...` on static-shape targets (`tpu`, `tflite`): one static program per size of a dynamic
dim, the signature an input's shapes pick, and the manifest's note on how a bucketed export is called."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from kiln.compiler.capture.program import CapturedModel
    from kiln.compiler.types import Manifest


def bucket_variants(model: CapturedModel, buckets: dict[str, tuple[int, ...]]) -> list[tuple[str, CapturedModel]]:
    """One static program per bucket size, `(signature, model)`: the captured program re-exported with the
    bucketed symbol at that size (the others at their OPT, or MIN) and no dynamic dims."""
    import torch
    from kiln.compiler.capture.program import CapturedModel, fx_signature

    assert model.exported is not None and model.dynamic is not None
    names = [s.name for s in model.inputs]
    args, _ = model.exported.example_inputs
    variants = []
    for symbol, sizes in buckets.items():
        for size in sizes:
            chosen = {d.symbol: d.opt or d.minimum for d in model.dynamic.dims} | {symbol: size}
            inputs = tuple(model.dynamic.resized(names, list(args), chosen))
            program = torch.export.export(model.exported.module(), inputs, strict=False)
            specs_in, specs_out = fx_signature(program, [s.name for s in model.outputs])
            variants.append((f"serving_{symbol}_{size}", CapturedModel(program, None, specs_in, specs_out, 0, None)))
    return variants


def bucket_of(buckets: dict[str, dict[str, list[int]]], feeds: dict[str, Any]) -> str | None:
    """The signature whose input shapes `feeds` have, or None."""
    for signature, shapes in buckets.items():
        if all(list(feeds[name].shape) == shape for name, shape in shapes.items() if name in feeds):
            return signature
    return None


def bucket_note(model: CapturedModel, buckets: dict[str, tuple[int, ...]]) -> str:
    """The manifest's note on how a bucketed export is called."""
    axes = [f"{n}:{a}" for d in (model.dynamic.dims if model.dynamic else ()) for n, a in d.axes]
    sizes = "; ".join(f"{symbol}={','.join(map(str, values))}" for symbol, values in buckets.items())
    return (
        f"buckets {sizes}: one static signature per size (serving_SYMBOL_SIZE); the caller pads {', '.join(axes)} "
        "up to the next bucket (e.g. attention_mask 0 on padded tokens) and drops the padded positions of the "
        "outputs; parity was checked at each bucket size"
    )


def bucket_subset(inputs: list[dict[str, np.ndarray]], manifest: Manifest) -> list[int] | None:
    """With buckets, the parity input sets whose shapes are a bucket's (one or more per bucket); None without."""
    buckets = manifest.runtime_config.get("buckets")
    if not buckets:
        return None
    return [i for i, feeds in enumerate(inputs) if bucket_of(buckets, feeds) is not None]


def bucket_for(target: str, buckets: dict[str, dict[str, list[int]]], feeds: dict[str, Any]) -> str:
    """The signature of the bucket whose shapes `feeds` have; a UsageError naming the buckets when none has."""
    found = bucket_of(buckets, feeds)
    if found is None:
        from kiln.compiler.errors import UsageError

        shapes = ", ".join(f"{n}{list(v.shape)}" for n, v in feeds.items())
        raise UsageError(
            f"no bucket of this {target} export has the input shapes {shapes}",
            f"pad the inputs up to the next bucket ({', '.join(buckets)})",
        )
    return found
