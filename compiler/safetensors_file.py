"""safetensors files written tensor by tensor: the whole state is never copied into one buffer (the `safetensors`
package's `save_file` first turns every tensor into bytes). The layout is the format's own: an 8-byte
little-endian header length, a JSON header (dtype, shape, data offsets per tensor), then the raw bytes."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(
    path: Path, tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> int:
    """Write `tensors` (name, tensor; names unique) as a safetensors file at `path`, one tensor at a time; the
    number of bytes of tensor data written."""
    entries = [(name, tensor.detach()) for name, tensor in tensors]
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, tensor in entries:
        if tensor.dtype not in DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} has no safetensors code")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little"))
        file.write(encoded)
        for _, tensor in entries:
            if tensor.numel():
                file.write(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return offset
