"""Graphs of large models, saved and copied without a second copy of their weights: `save_onnx` writes external
data one tensor at a time and links the data files of unchanged weights; `snapshot` copies a program or model
sharing its constant tensors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

EXTERNAL_DATA_BYTES = 64 * 2**20  # weights beyond this go to `model.onnx.data`, written tensor by tensor
REUSED_FRACTION = 0.9  # a source data file is linked, not rewritten, when the model still reads this much of it


def save_onnx(model: Any, destination: Path) -> Path:
    """Save an onnx_ir model as one self-contained file, or, with more than EXTERNAL_DATA_BYTES of weights, with
    external data beside it: written one tensor at a time, so that saving never holds the model's weights twice (a
    self-contained file is one protobuf, built whole in memory and then serialized). Weights the model still reads
    unchanged from another model's data file stay in that file, linked (or copied) beside the new one
    (`NAME.data`), and only the others are written (`NAME.extra.data`): the passes rewrite a few weights of a
    decoder, not its gigabytes."""
    import onnx_ir as ir

    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if weights <= EXTERNAL_DATA_BYTES:
        # Pull weights that lived in the source's external files into the new self-contained file.
        ir.save(ir.external_data.load_to_model(model), str(destination))
        return destination
    values = [v for g in model.graphs() for v in g.initializers.values() if v.const_value is not None]
    kept = {id(v): v.const_value for v in values}
    try:
        reused = _reuse_data_files(values, destination)
        _write_external(values, destination.parent, destination.name + (".extra.data" if reused else ".data"))
        ir.save(model, str(destination))
    finally:
        for value in values:
            value.const_value = kept[id(value)]
    return destination


def _reuse_data_files(values: list[Any], destination: Path) -> bool:
    """Point the weights read unchanged from one external data file at a link (or copy) of it beside
    `destination` (`NAME.data`), when the model still reads REUSED_FRACTION of that file; whether it did."""
    import onnx_ir as ir

    by_file: dict[Path, list[Any]] = {}
    for value in values:
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.length is not None:
            by_file.setdefault(Path(tensor.path).resolve(), []).append(value)
    if not by_file:
        return False
    source, readers = max(by_file.items(), key=lambda item: sum(v.const_value.length for v in item[1]))
    if sum(v.const_value.length for v in readers) < REUSED_FRACTION * source.stat().st_size:
        return False
    name = destination.name + ".data"
    link_or_copy(source, destination.parent / name)
    for value in readers:
        tensor = value.const_value
        value.const_value = ir.ExternalTensor(
            name,
            tensor.offset,
            tensor.length,
            tensor.dtype,
            shape=tensor.shape,
            name=value.name,
            base_dir=destination.parent,
        )
    return True


def _write_external(values: list[Any], directory: Path, name: str) -> None:
    """Write the weights that are not external data yet into `directory/name`, one at a time (64-byte aligned),
    each replaced by a reference to where it went."""
    import onnx_ir as ir

    pending = [v for v in values if not isinstance(v.const_value, ir.ExternalTensor) and v.const_value.nbytes > 1024]
    if not pending:
        return
    with open(directory / name, "wb") as file:
        for value in pending:
            tensor = value.const_value
            file.write(b"\0" * (-file.tell() % 64))
            offset = file.tell()
            file.write(tensor.tobytes())
            value.const_value = ir.ExternalTensor(
                name,
                offset,
                file.tell() - offset,
                tensor.dtype,
                shape=tensor.shape,
                name=value.name,
                base_dir=directory,
            )


def link_or_copy(source: Path, destination: Path) -> None:
    """`destination` as a hard link to `source` (same file system: no bytes copied), else a copy. For data files
    that are never written in place once made, and never read through onnx or onnx_ir while linked: both refuse
    an external data file with several links as a possible hard-link attack (`unshare_data_files`)."""
    import os
    import shutil

    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


def unshare_data_files(model_path: Path) -> None:
    """Give every external data file of the ONNX file at `model_path` a single link, so that onnx and onnx_ir read
    it: both refuse a data file with several hard links (a possible hard-link attack), and `save_onnx` links the
    unchanged data files between Kiln's own builds. A linked file is copied beside itself and renamed over its
    name (the other links keep the same bytes); a symbolic link or a location outside the directory is left for
    the reader to refuse."""
    import os
    import shutil

    for location in sorted(data_locations(model_path)):
        path = model_path.parent / location
        if path.parent != model_path.parent or path.is_symlink() or not path.is_file() or path.stat().st_nlink < 2:
            continue
        single = path.with_name(f".{path.name}.unshared")
        shutil.copyfile(path, single)
        os.replace(single, path)


def data_locations(model_path: Path) -> set[str]:
    """The external data locations the ONNX file at `model_path` names (relative to its directory)."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    return {
        entry.value
        for tensor in onnx.external_data_helper._get_all_tensors(proto)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


def load_ir(model_path: Path) -> Any:
    """`onnx_ir.load` of an ONNX file Kiln wrote, its data files unshared first (`unshare_data_files`)."""
    import onnx_ir

    unshare_data_files(model_path)
    return onnx_ir.load(str(model_path))


def read_onnx(model_path: Path) -> Any:
    """`onnx.load` (external data included) of an ONNX file Kiln wrote, its data files unshared first."""
    import onnx

    unshare_data_files(model_path)
    return onnx.load(str(model_path))


def snapshot(graph: Any) -> Any:
    """A copy of the graph that a pass changing `graph` in place leaves alone (constant tensors shared)."""
    if not hasattr(graph, "graph_module"):  # an onnx_ir model
        return graph.clone()
    tensors = [*graph.state_dict.values(), *graph.constants.values()]
    return copy.deepcopy(graph, memo={id(t): t for t in tensors})
