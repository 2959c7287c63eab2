"""Weight-only quantization of a text-generation export: `--precision int8|int4`, `--group-size G`,
`--weights sym|asym`. What LLM runtimes do on CPUs: the weights of the linear layers are stored in 8 or 4 bits
with a scale (and a zero point when asymmetric) per output channel or per group of G input channels; activations
and the KV cache stay float. Each toolchain quantizes its own format (`quantize_onnx_weights` in
`quantization.matmul_nbits`, `compress_openvino_weights` in `quantization.openvino`, `quantize_tflite_weights` in
`quantization.litert`); this module holds what they share: the spec and its checks.

- `int8`: every linear layer in 8 bits. NNCF and ai-edge-quantizer store one scale per output channel; ONNX
  Runtime's MatMulNBits has no per-channel mode in the operator format, so it takes blocks of G along the input.
- `int4`: the decoder layers' linear layers in 4 bits, in groups of G input channels (default 128, the default of
  NNCF and of ONNX Runtime's quantizer); the LM head in 8 bits per channel, and on OpenVINO the embeddings too
  (NNCF's own default for 4-bit modes: the first and last layers are the most sensitive, and a 4-bit head moves
  every logit). ONNX Runtime's quantizer quantizes an embedding Gather only to 4 bits, so on `onnx` the
  embeddings stay float (a Gather reads one row per token: no decode time, file size only).
- `--weights sym` (default): signed values around 0, one scale per group; `asym`: unsigned values with a zero
  point per group (fits skewed rows better, a subtraction more per weight).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln.compiler.errors import UsageError

BITS = {"int8": 8, "int4": 4}  # the weight-only precisions of a text-generation export
DEFAULT_GROUP_SIZE = 128
# MatMulNBits takes power-of-two blocks from 16; ONNX Runtime's CPU kernels are built for these.
GROUP_SIZES = (16, 32, 64, 128, 256)
WEIGHT_SCHEMES = ("sym", "asym")
HEAD_BITS = 8  # the LM head's bits on an int4 export


@dataclass(frozen=True)
class WeightOnlySpec:
    """How the weights of a text-generation export are quantized: `bits` (8 or 4; the planted-bug tests of the
    gate ask for 2), the group of input channels sharing a scale (4-bit groups everywhere, 8-bit blocks on ONNX
    Runtime), symmetric or with zero points."""

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE
    symmetric: bool = True

    @classmethod
    def for_precision(cls, precision: str, group_size: int | None = None, weights: str | None = None) -> WeightOnlySpec:
        """The spec of `--precision int8|int4 [--group-size G] [--weights sym|asym]`; a UsageError for a value
        the toolchains do not take."""
        if precision not in BITS:
            raise UsageError(f"weight-only quantization has no precision {precision}", f"use one of {', '.join(BITS)}")
        check_weight_flags(group_size, weights)
        return cls(BITS[precision], group_size or DEFAULT_GROUP_SIZE, (weights or "sym") == "sym")

    @property
    def precision(self) -> str:
        """int8, int4 (or intN for another bit width)."""
        return f"int{self.bits}"

    @property
    def head_bits(self) -> int:
        """The LM head's bits: 8 on a 4-bit export, else the spec's own."""
        return HEAD_BITS if self.bits < HEAD_BITS else self.bits

    def describe(self) -> str:
        """E.g. `int4 sym, groups of 128, LM head int8`."""
        scheme = "sym" if self.symmetric else "asym"
        if self.bits >= HEAD_BITS:
            return f"{self.precision} {scheme} weights"
        return f"{self.precision} {scheme} weights, groups of {self.group_size}, LM head int{self.head_bits}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the manifest."""
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "head_bits": self.head_bits,
        }


def check_weight_flags(group_size: int | None, weights: str | None) -> None:
    """Refuse a `--group-size` or `--weights` value no toolchain takes (one line, exit 2)."""
    if group_size is not None and group_size not in GROUP_SIZES:
        raise UsageError(
            f"--group-size {group_size}: not a group size the runtimes' 4-bit kernels take",
            f"use one of {', '.join(map(str, GROUP_SIZES))} (default {DEFAULT_GROUP_SIZE})",
        )
    if weights is not None and weights not in WEIGHT_SCHEMES:
        raise UsageError(f"--weights {weights}: unknown scheme", "use sym (the default) or asym")


def weight_flags_refusal(precision: str, group_size: int | None, weights: str | None, generation: bool) -> str | None:
    """Why `--group-size`/`--weights` do not apply to this export (None when they do or were not given):
    they set the weight-only quantization of a text-generation export at int8 or int4."""
    given = [flag for flag, value in (("--group-size", group_size), ("--weights", weights)) if value is not None]
    if not given:
        return None
    if not generation:
        return f"{' and '.join(given)} apply to the weight-only int8/int4 of a text-generation export only"
    if precision not in BITS:
        return f"{' and '.join(given)} apply to --precision int8 or int4, not {precision}"
    return None
