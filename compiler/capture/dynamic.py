"""Dynamic dimensions: `--dynamic NAME:AXIS=MIN:MAX[:OPT]` (any axis of any input) and its shorthand
`--dynamic-batch MIN:MAX` (dim 0 of every input, symbol `batch`).

One `DynamicDim` is one symbol (a `torch.export.Dim`): a range and the (input, axis) pairs that share it. Axes
share a symbol when the user names it (`--dynamic seq=input_ids:1,attention_mask:1=8:128:64`), or when they are
given separately with the same range and the example inputs have the same size there (the usual case of
`input_ids` and `attention_mask`, whose lengths the model requires equal).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from kiln.compiler.errors import UsageError

BATCH_DIM = "batch"
EVERY_INPUT = "*"  # the input name of `--dynamic-batch`'s axis: dim 0 of every input
HINT = "write for example --dynamic input_ids:1=8:128:64, or seq=input_ids:1,attention_mask:1=8:128:64"
_AXIS = r"[A-Za-z_][A-Za-z0-9_.]*:-?\d+"
_SPEC = re.compile(rf"\s*(?:([A-Za-z_][A-Za-z0-9_]*)=)?({_AXIS}(?:\s*,\s*{_AXIS})*)\s*=\s*(\d+):(\d+)(?::(\d+))?\s*")


@dataclass(frozen=True)
class DynamicDim:
    """One dynamic symbol: its range (`opt`: the size to optimize for, None: the example's) and its axes."""

    symbol: str
    minimum: int
    maximum: int
    opt: int | None
    axes: tuple[tuple[str, int], ...]
    named: bool = True  # False: the symbol was made up from the first axis (it may merge with equal ones)

    def __str__(self) -> str:
        axes = ",".join(f"{name}:{axis}" for name, axis in self.axes)
        size = f"{self.minimum}:{self.maximum}" + (f":{self.opt}" if self.opt is not None else "")
        return f"{self.symbol}={axes}={size}" if self.named else f"{axes}={size}"

    def record(self) -> dict[str, Any]:
        """What the manifest says of this range."""
        axes = [[name, axis] for name, axis in self.axes]
        return {"symbol": self.symbol, "min": self.minimum, "opt": self.opt, "max": self.maximum, "axes": axes}


def DynamicBatch(minimum: int, maximum: int) -> DynamicShapes:
    """`--dynamic-batch MIN:MAX`: dim 0 of every input dynamic within this range, as one symbol `batch`."""
    return DynamicShapes((DynamicDim(BATCH_DIM, minimum, maximum, None, ((EVERY_INPUT, 0),)),))


@dataclass(frozen=True)
class DynamicShapes:
    """Every dynamic dimension of an export (resolved: axes name real inputs, non-negative, checked)."""

    dims: tuple[DynamicDim, ...]

    @classmethod
    def parse(cls, specs: list[str] | tuple[str, ...] | str | None, batch: str | None = None) -> DynamicShapes | None:
        """`--dynamic` specs and the `--dynamic-batch` shorthand, checked for form and range (not yet against
        the model: see `resolve`); None when neither is given."""
        texts = [specs] if isinstance(specs, str) else list(specs or [])
        dims = [parse_batch(batch)] if batch else []
        dims += [parse_dim(text) for text in texts]
        symbols = [d.symbol for d in dims if d.named]
        duplicate = next((s for s in symbols if symbols.count(s) > 1), None)
        if duplicate:
            raise UsageError(f"--dynamic: symbol '{duplicate}' is given twice", "list all its axes in one --dynamic")
        return cls(tuple(dims)) if dims else None

    @property
    def batch(self) -> DynamicDim | None:
        """The `--dynamic-batch` symbol, if that is all there is."""
        if len(self.dims) == 1 and self.dims[0].symbol == BATCH_DIM and {a for _, a in self.dims[0].axes} == {0}:
            return self.dims[0]
        return None

    def __str__(self) -> str:
        batch = self.batch
        if batch is not None:
            return f"{batch.minimum}:{batch.maximum}"
        return " ".join(str(d) for d in self.dims)

    def records(self) -> list[dict[str, Any]]:
        """The manifest's `dynamic` list: symbol, min, opt, max, axes of each."""
        return [d.record() for d in self.dims]

    def resolve(self, names: list[str], shapes: list[tuple[int, ...]]) -> DynamicShapes:
        """Checked against the model's inputs (`names`, example `shapes`): `*` expanded to every input, negative
        axes counted from the end, an unknown input, axis out of range, an axis given twice, an example size out
        of range (explicit `--dynamic` only) refused; unnamed dims of equal range and example size merged."""
        resolved = [_resolve_dim(dim, names, shapes) for dim in self.dims]
        seen: dict[tuple[str, int], str] = {}
        for dim in resolved:
            for axis in dim.axes:
                if axis in seen:
                    raise UsageError(f"--dynamic: {axis[0]}:{axis[1]} is in both {seen[axis]} and {dim.symbol}", HINT)
                seen[axis] = dim.symbol
        return DynamicShapes(tuple(_merge(resolved, dict(zip(names, shapes)))))

    def symbol_of(self, name: str, axis: int) -> DynamicDim | None:
        """The dim that makes `name`'s `axis` dynamic, or None."""
        return next((d for d in self.dims if (name, axis) in d.axes), None)

    def torch_shapes(self, names: list[str]) -> tuple[dict[int, Any], ...]:
        """`dynamic_shapes` for `torch.export.export`, one dict per input (one `Dim` per symbol, shared)."""
        import torch

        made = {d.symbol: torch.export.Dim(d.symbol, min=d.minimum, max=d.maximum) for d in self.dims}
        return tuple({a: made[d.symbol] for d in self.dims for n, a in d.axes if n == name} for name in names)

    def capture_sizes(self, names: list[str], shapes: list[tuple[int, ...]]) -> dict[str, int]:
        """The size of each symbol to capture at: the example's, within the range and at least 2 (torch.export
        specializes a size of 1)."""
        by_name = dict(zip(names, shapes))
        sizes = {}
        for d in self.dims:
            name, axis = d.axes[0]
            sizes[d.symbol] = min(max(by_name[name][axis], 2, d.minimum), d.maximum)
        return sizes

    def resized(self, names: list[str], arrays: list[Any], sizes: dict[str, int]) -> list[Any]:
        """The arrays (numpy or torch) with every dynamic axis resized to its symbol's size (by cycling)."""
        out = []
        for name, array in zip(names, arrays):
            for d in self.dims:
                for n, axis in d.axes:
                    if n == name and array.shape[axis] != sizes[d.symbol]:
                        array = resize_axis(array, axis, sizes[d.symbol])
            out.append(array)
        return out

    def points(self, examples: dict[str, tuple[int, ...]], seed: int = 0) -> list[tuple[str, dict[str, int]]]:
        """The shapes parity checks: every symbol at its MIN, at its OPT (the example's size when none), at its
        MAX and at a random size inside (seeded): `[(label, {symbol: size})]`."""
        rng = np.random.default_rng(seed)
        opt = {d.symbol: d.opt if d.opt is not None else _example_size(d, examples) for d in self.dims}
        chosen = {
            "min": {d.symbol: d.minimum for d in self.dims},
            "opt": opt,
            "max": {d.symbol: d.maximum for d in self.dims},
            "random": {d.symbol: int(rng.integers(d.minimum, d.maximum, endpoint=True)) for d in self.dims},
        }
        return list(chosen.items())


def resize_axis(array: Any, axis: int, size: int) -> Any:
    """`array` (numpy or torch) resized along `axis` to `size` by cycling its entries."""
    index = np.arange(size) % array.shape[axis]
    if isinstance(array, np.ndarray):
        return np.take(array, index, axis=axis)
    import torch

    return torch.index_select(array, axis, torch.from_numpy(index))


def parse_batch(text: str) -> DynamicDim:
    """`--dynamic-batch MIN:MAX`."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not match:
        raise UsageError(f"--dynamic-batch '{text}' is not MIN:MAX", "write for example --dynamic-batch 1:32")
    low, high = int(match[1]), int(match[2])
    if not 1 <= low < high:
        raise UsageError(f"--dynamic-batch {text}: need 1 <= MIN < MAX", "write for example --dynamic-batch 1:32")
    return DynamicBatch(low, high).dims[0]


def parse_dim(text: str) -> DynamicDim:
    """One `--dynamic [SYMBOL=]NAME:AXIS[,NAME:AXIS...]=MIN:MAX[:OPT]`."""
    match = _SPEC.fullmatch(text)
    if not match:
        raise UsageError(f"--dynamic '{text}' is not [SYMBOL=]NAME:AXIS[,NAME:AXIS]=MIN:MAX[:OPT]", HINT)
    low, high = int(match[3]), int(match[4])
    opt = int(match[5]) if match[5] is not None else None
    if not 1 <= low < high:
        raise UsageError(f"--dynamic {text}: need 1 <= MIN < MAX (got {low}:{high})", HINT)
    if opt is not None and not low <= opt <= high:
        raise UsageError(f"--dynamic {text}: OPT {opt} is outside {low}:{high}", "pick OPT from MIN to MAX")
    axes = tuple((part.rsplit(":", 1)[0].strip(), int(part.rsplit(":", 1)[1])) for part in match[2].split(","))
    symbol = match[1] or re.sub(r"[^A-Za-z0-9_]", "_", f"{axes[0][0]}_{axes[0][1]}")
    return DynamicDim(symbol, low, high, opt, axes, named=match[1] is not None)


def _resolve_dim(dim: DynamicDim, names: list[str], shapes: list[tuple[int, ...]]) -> DynamicDim:
    """`dim` with its axes checked against the inputs (see DynamicShapes.resolve)."""
    if dim.axes == ((EVERY_INPUT, 0),):
        if any(len(s) == 0 for s in shapes):
            raise UsageError(
                "--dynamic-batch needs every input to have a batch dimension, but one is a scalar",
                "drop --dynamic-batch or give the scalar input a leading dim",
            )
        return replace(dim, axes=tuple((n, 0) for n in names))
    axes = []
    for name, axis in dim.axes:
        if name not in names:
            raise UsageError(f"--dynamic {dim}: the model has no input '{name}'", f"inputs: {', '.join(names)}")
        shape = shapes[names.index(name)]
        if not -len(shape) <= axis < len(shape):
            raise UsageError(
                f"--dynamic {dim}: input '{name}' has {len(shape)} dims {list(shape)}, no axis {axis}",
                f"pick an axis from 0 to {len(shape) - 1}",
            )
        axis %= len(shape)
        if not dim.minimum <= shape[axis] <= dim.maximum:
            raise UsageError(
                f"--dynamic {dim}: the example input '{name}' has size {shape[axis]} on axis {axis}, "
                f"outside {dim.minimum}:{dim.maximum}",
                "widen the range, or give example inputs of a size inside it",
            )
        axes.append((name, axis))
    return replace(dim, axes=tuple(axes))


def _merge(dims: list[DynamicDim], shapes: dict[str, tuple[int, ...]]) -> list[DynamicDim]:
    """Unnamed dims with the same range and the same example size become one symbol (the first one's)."""
    merged: list[DynamicDim] = []
    for dim in dims:
        key = (dim.minimum, dim.maximum, dim.opt, _example_size(dim, shapes))
        into = next(
            (
                i
                for i, m in enumerate(merged)
                if not m.named and not dim.named and (m.minimum, m.maximum, m.opt, _example_size(m, shapes)) == key
            ),
            None,
        )
        if into is None:
            merged.append(dim)
        else:
            merged[into] = replace(merged[into], axes=merged[into].axes + dim.axes)
    return merged


def _example_size(dim: DynamicDim, shapes: dict[str, tuple[int, ...]]) -> int:
    """The example input's size on the dim's first axis, clamped into the range."""
    name, axis = dim.axes[0]
    return min(max(shapes[name][axis], dim.minimum), dim.maximum)


def name_dynamic_dims(proto: Any, dynamic: DynamicShapes) -> None:
    """Rename the exporter's symbols of the dynamic input dims (e.g. `s43`) to Kiln's (`batch`, `seq`)
    everywhere in the graph; an output dim that is an expression of them (`2*s43`) is rewritten the same way."""
    names: dict[str, str] = {}
    for value in proto.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            found = dynamic.symbol_of(value.name, axis)
            if found is not None and dim.dim_param:
                names[dim.dim_param] = found.symbol
    if not names:
        return
    pattern = re.compile("|".join(rf"\b{re.escape(k)}\b" for k in sorted(names, key=len, reverse=True)))
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: names[m[0]], dim.dim_param).replace(" ", "")


def shaped_like_forward(module: Any, specs: tuple[dict[int, Any], ...]) -> tuple[Any, ...]:
    """`dynamic_shapes` in the structure of `module.forward`'s parameters, which torch.export matches them against:
    the inputs a `*args` parameter takes are one tuple there (a transformers wrapper's `forward(self, *args)`
    was refused: "inputs[0] is a tuple, but dynamic_shapes[0] is a dict")."""
    import inspect

    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return specs
    if not any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return specs
    named = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters)
    return (*specs[:named], tuple(specs[named:])) if len(specs) > named else specs
