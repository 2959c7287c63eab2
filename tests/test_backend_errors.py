"""Backend messages as Kiln errors: the operation they name, and no terminal colour codes."""

from __future__ import annotations

import pytest
from kiln.compiler.backend_errors import backend_failures, operation_named_in
from kiln.compiler.errors import UnsupportedOpError, UsageError, as_kiln_error, error_text, plain_text

# (message as a backend wrote it, the operation Kiln should name or None)
MESSAGES = [
    ("Incompatible shapes for operation between tensors of shape [1, 3] and [1, 4]", None),
    ("The operation between these operands is not defined", None),
    ("Some operators are not supported by the converter", None),
    ("Cannot create node: operation FancyOp is not supported", "FancyOp"),
    ("Node number 3 (CONV_2D) failed to prepare.", "CONV_2D"),
    ("failed to legalize operation 'tfl.pow' that was explicitly marked illegal", "tfl.pow"),
    ("op STABLEHLO_SCATTER is not supported on the Edge TPU", "STABLEHLO_SCATTER"),
    ("Unsupported operator: aten::searchsorted.Tensor", "aten::searchsorted.Tensor"),
    (
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running FusedConv node. Name:'conv' "
        "Status Message: Input channels C is not equal to kernel channels * group.",
        "FusedConv",
    ),
    (
        "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for Add(1) node with name 'add'",
        "Add",
    ),
    (
        "[ONNXRuntimeError] : 1 : FAIL : Load model from m.onnx failed:Node (conv) Op (Conv) [ShapeInferenceError] "
        "Input tensor must have at least 3 dimensions",
        "Conv",
    ),
    (
        "[ShapeInferenceError] Inference error(s): (op_type:MatMul, node name: matmul): Incompatible dimensions",
        "MatMul",
    ),
    ("Type Error: Type parameter (T) of Optype (MatMul) bound to different types", "MatMul"),
    ("the node: has no name.", None),
]


@pytest.mark.parametrize(("message", "operation"), MESSAGES)
def test_operation_named_in_real_messages(message, operation):
    assert operation_named_in(message) == operation


SWIN = (
    "\x1b[96mThis is step 2/3\x1b[0m of exporting the model to ONNX: \x1b[1mfailed\x1b[0m on \x1b[31maten::roll\x1b[0m"
)


def test_colour_codes_are_stripped_from_one_line_errors():
    error = UsageError(SWIN, "see \x1b[4mthe docs\x1b[0m")
    assert error.one_line() == (
        "This is step 2/3 of exporting the model to ONNX: failed on aten::roll (hint: see the docs)"
    )
    assert plain_text("a\x1b[0m\n  b\x1b(B") == "a b"


def test_colour_codes_are_stripped_from_backend_failures():
    with pytest.raises(UnsupportedOpError) as raised, backend_failures("onnx", "convert"):
        raise RuntimeError(SWIN + ": operation \x1b[1mRoll\x1b[0m")
    assert "\x1b" not in raised.value.message
    assert "(operation Roll)" in raised.value.message and "This is step 2/3 of exporting" in raised.value.message


def test_error_text_names_any_exception_on_one_line():
    assert error_text(RuntimeError(SWIN + "\n\nTraceback:\n  more")) == (
        "RuntimeError: This is step 2/3 of exporting the model to ONNX: failed on aten::roll Traceback: more"
    )
    assert error_text(ValueError("x" * 500), limit=10) == "ValueError: " + "x" * 10
    assert error_text(AssertionError()) == "AssertionError"  # an empty message: the type alone
    assert error_text(KeyError("a\nb"), text="picked\n part") == "KeyError: picked part"
    assert as_kiln_error(AssertionError()).message == "internal error: AssertionError"
