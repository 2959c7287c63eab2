"""Layout constants and helpers, in one place: the NCHW <-> NHWC permutations and which tensors are images.

With `--io nhwc` an artifact takes and returns its 4-d float tensors channels-last. The ONNX layout pass,
the OpenVINO pre/post-processing, the LiteRT wrapper, the calibration rows and the parity gate all use
these, so that "image" and "channels-last" mean one thing everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from kiln.compiler.types import TensorSpec

NHWC = "NHWC"
NCHW_TO_NHWC = (0, 2, 3, 1)
NHWC_TO_NCHW = (0, 3, 1, 2)


def is_image(spec: TensorSpec) -> bool:
    """A 4-d float tensor: what `--io nhwc` makes channels-last."""
    return len(spec.shape) == 4 and spec.dtype.startswith(("float", "bfloat"))


def channels_last(specs: list[TensorSpec]) -> list[TensorSpec]:
    """The specs with every image tensor in NHWC (the artifact's view with `--io nhwc`)."""
    from kiln.compiler.types import TensorSpec

    return [
        TensorSpec(s.name, tuple(s.shape[i] for i in NCHW_TO_NHWC), s.dtype, NHWC) if is_image(s) else s for s in specs
    ]


def nhwc_names(specs: list[TensorSpec]) -> list[str]:
    """Names of the specs that are channels-last."""
    return [s.name for s in specs if s.layout == NHWC]


def nhwc_array(array: np.ndarray) -> np.ndarray:
    """An NCHW array as a contiguous NHWC one."""
    import numpy as np

    return np.ascontiguousarray(np.transpose(array, NCHW_TO_NHWC))


def nchw_array(array: np.ndarray) -> np.ndarray:
    """An NHWC array as NCHW."""
    import numpy as np

    return np.transpose(array, NHWC_TO_NCHW)
