"""The `openvino.convert_model(ExportedProgram)` route of the openvino target: OpenVINO's PyTorch frontend on
the `torch.export` program, with the captured model's input and output names and static dimensions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import UnsupportedOpError

if TYPE_CHECKING:
    from kiln.compiler.capture.program import CapturedModel
    from kiln.targets.base import BuildRequest


def convert_direct(model: CapturedModel, request: BuildRequest, route: str) -> Any:
    """The exported program as an `openvino.Model`, its I/O named and shaped as the capture says. `--max-drop`
    and `--io nhwc` need the ONNX graph (their trial runner and layout counts read it): refused here."""
    import openvino as ov

    needs_onnx = "--max-drop" if request.accuracy is not None else "--io nhwc" if request.io_layout else ""
    if needs_onnx:
        raise UnsupportedOpError(f"the {route} route does not take {needs_onnx}", f"drop {needs_onnx}")
    if model.exported is None:
        raise UnsupportedOpError(f"the {route} route needs a PyTorch model", "export from the PyTorch model")
    ov_model = ov.convert_model(model.exported)
    if len(ov_model.inputs) != len(model.inputs) or len(ov_model.outputs) != len(model.outputs):
        raise UnsupportedOpError(
            f"{route} made {len(ov_model.inputs)} inputs and {len(ov_model.outputs)} outputs, "
            f"the model has {len(model.inputs)} and {len(model.outputs)}",
            "use an ONNX route",
        )
    shapes = {}
    for port, spec in zip(ov_model.inputs, model.inputs):
        port.get_tensor().set_names({spec.name})
        shapes[port] = ov.PartialShape([d if isinstance(d, int) else -1 for d in spec.shape])
    for port, spec in zip(ov_model.outputs, model.outputs):
        port.get_tensor().set_names({spec.name})
    ov_model.reshape(shapes)
    return ov_model
