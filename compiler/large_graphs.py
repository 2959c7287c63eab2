"""Graphs of large models, saved and copied without a second copy of their weights: `save_onnx` writes external
data one tensor at a time and links the data files of unchanged weights; `read_initializer` and
`ExternalDataWriter` read and write an ONNX file's initializers one at a time (a rewrite of a model's weights that
holds one layer's weights in memory, not the model's); `snapshot` copies a program or model sharing its constant
tensors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

EXTERNAL_DATA_BYTES = 64 * 2**20  # weights beyond this go to `model.onnx.data`, written tensor by tensor
REUSED_FRACTION = 0.9  # a source data file is linked, not rewritten, when the model still reads this much of it
INLINE_TENSOR_BYTES = 1024  # a smaller tensor stays in the protobuf, as onnx.save's external data leaves it
DATA_ALIGNMENT = 64  # bytes: each external tensor starts at a multiple of this
COPY_CHUNK_BYTES = 64 * 2**20  # an external tensor copied unchanged is copied in chunks of this size


def save_onnx(model: Any, destination: Path) -> Path:
    """Save an onnx_ir model as one self-contained file, or, with more than EXTERNAL_DATA_BYTES of weights, with
    external data beside it: written one tensor at a time, so that saving never holds the model's weights twice (a
    self-contained file is one protobuf, built whole in memory and then serialized). Weights the model still reads
    unchanged from another model's data file stay in that file, linked (or copied) beside the new one
    (`NAME.data`), and only the others are written (`NAME.extra.data`), those read from other data files
    included (a file per tensor, as the TorchScript exporter writes them): the passes rewrite a few weights of a
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
        rest = [value for value in values if id(value) not in reused]
        _write_external(rest, destination.parent, destination.name + (".extra.data" if reused else ".data"))
        ir.save(model, str(destination))
    finally:
        for value in values:
            value.const_value = kept[id(value)]
    return destination


def _reuse_data_files(values: list[Any], destination: Path) -> set[int]:
    """Point the weights read unchanged from one external data file at a link (or copy) of it beside
    `destination` (`NAME.data`), when the model still reads REUSED_FRACTION of that file; the ids of the values
    so pointed (none when it did not)."""
    import onnx_ir as ir

    by_file: dict[Path, list[Any]] = {}
    for value in values:
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.length is not None:
            by_file.setdefault(Path(tensor.path).resolve(), []).append(value)
    if not by_file:
        return set()
    source, readers = max(by_file.items(), key=lambda item: sum(v.const_value.length for v in item[1]))
    if sum(v.const_value.length for v in readers) < REUSED_FRACTION * source.stat().st_size:
        return set()
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
    return {id(value) for value in readers}


def _write_external(values: list[Any], directory: Path, name: str) -> None:
    """Write the weights `values` into `directory/name`, one at a time (DATA_ALIGNMENT-aligned), each replaced by a
    reference to where it went; those read from another data file too (their location would not resolve beside
    the new file), the small ones of those into the protobuf."""
    import onnx_ir as ir

    for value in values:
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.nbytes <= INLINE_TENSOR_BYTES:
            value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=value.name)
    pending = [v for v in values if v.const_value.nbytes > INLINE_TENSOR_BYTES]
    if not pending:
        return
    partial = directory / f".{name}.partial"  # renamed into place: a tensor may still be read from the old file
    with open(partial, "wb") as file:
        for value in pending:
            tensor = value.const_value
            file.write(b"\0" * (-file.tell() % DATA_ALIGNMENT))
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
    partial.replace(directory / name)


def read_initializer(tensor: Any, directory: Path) -> Any:
    """The array of one initializer (an onnx.TensorProto) of an ONNX file in `directory`: its own bytes, read from
    its external data file when it has one, and nothing else of that file."""
    import onnx
    from onnx import numpy_helper

    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    path, offset, length = _external_span(tensor, directory)
    with open(path, "rb") as file:
        file.seek(offset)
        data = file.read(length) if length is not None else file.read()
    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)
    inline.ClearField("external_data")
    inline.data_location = onnx.TensorProto.DEFAULT
    inline.raw_data = data
    return numpy_helper.to_array(inline)


def _external_span(tensor: Any, directory: Path) -> tuple[Path, int, int | None]:
    """Where an external tensor's bytes are: a file directly in `directory` (no link, no other folder), the offset
    and the length (None: to the end of the file)."""
    from onnx.external_data_helper import ExternalDataInfo

    info = ExternalDataInfo(tensor)
    path = directory / info.location
    if Path(info.location).name != info.location or path.is_symlink() or not path.is_file():
        raise ValueError(f"initializer {tensor.name}: external data {info.location!r} is not a file in {directory}")
    return path, int(info.offset or 0), int(info.length) if info.length else None


class ExternalDataWriter:
    """The initializers of a new ONNX file written one at a time into its external data file `directory/name`
    (each DATA_ALIGNMENT-aligned; a tensor of up to INLINE_TENSOR_BYTES stays in the protobuf), each proto
    pointing at where its bytes went. The file is written under a temporary name and renamed into place by
    `close`, so that a process still mapping the file it replaces reads on; `discard` removes it."""

    def __init__(self, directory: Path, name: str):
        self.directory, self.name = directory, name
        self.partial = directory / f".{name}.partial"
        self.file = open(self.partial, "wb")  # noqa: SIM115 (closed by close or discard)
        self.written = 0

    def add(self, name: str, array: Any) -> Any:
        """The initializer `name` holding `array`: its bytes written to the data file (a large one) or into the
        protobuf. (The protobuf gets no bytes it would then give up: a cleared field's bytes stay in the message's
        memory arena as long as the message lives.)"""
        import numpy as np
        import onnx
        from onnx import numpy_helper

        array = np.ascontiguousarray(array)
        if array.nbytes <= INLINE_TENSOR_BYTES:
            return numpy_helper.from_array(array, name)
        dtype = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor = onnx.TensorProto(name=name, dims=array.shape, data_type=dtype)
        offset = self._start()
        self.file.write(memoryview(array).cast("B"))
        self._point(tensor, offset, array.nbytes)
        return tensor

    def copy(self, tensor: Any, directory: Path) -> Any:
        """`tensor`, an initializer of an ONNX file in `directory`, with its external bytes (if any) copied to the
        data file in chunks; the tensor, pointed at its copy."""
        import onnx

        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            if len(tensor.raw_data) > INLINE_TENSOR_BYTES:
                offset = self._start()
                self.file.write(tensor.raw_data)
                self._point(tensor, offset, len(tensor.raw_data))
            return tensor
        path, offset, length = _external_span(tensor, directory)
        start = self._start()
        with open(path, "rb") as source:
            source.seek(offset)
            left = length if length is not None else path.stat().st_size - offset
            while left > 0:
                chunk = source.read(min(left, COPY_CHUNK_BYTES))
                if not chunk:
                    raise ValueError(f"initializer {tensor.name}: {path.name} ends before its data does")
                self.file.write(chunk)
                left -= len(chunk)
        self._point(tensor, start, self.file.tell() - start)
        return tensor

    def close(self) -> int:
        """Finish the data file and rename it into place (removed when nothing was written); the bytes written."""
        self.file.close()
        target = self.directory / self.name
        if self.written:
            self.partial.replace(target)
        else:
            self.partial.unlink()
            target.unlink(missing_ok=True)
        return self.written

    def discard(self) -> None:
        """Drop the partial data file (after a failure)."""
        self.file.close()
        self.partial.unlink(missing_ok=True)

    def _start(self) -> int:
        self.file.write(b"\0" * (-self.file.tell() % DATA_ALIGNMENT))
        return self.file.tell()

    def _point(self, tensor: Any, offset: int, length: int) -> None:
        import onnx

        tensor.ClearField("raw_data")
        tensor.ClearField("external_data")
        for key, value in (("location", self.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = onnx.TensorProto.EXTERNAL
        self.written += length


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
