"""A crafted `.pt2` must not run code: pickles, shape expressions, guard code and node targets are checked.

Each payload writes a marker file when it runs; the tests check that the marker never appears
when Kiln reads the file, and that it does appear with `--trust-pickle` (or with torch's own
loader), which proves the payload was real.
"""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from kiln.compiler.capture.pt2_archive import load_program
from kiln.compiler.errors import UsageError

from tests.conftest import run_cli
from tests.test_cli_errors import assert_one_line_error


class _Lambda:
    """Pickles as `eval(source)`: the function a payload calls."""

    def __init__(self, source: str):
        self.source = source

    def __call__(self, *args: object) -> None:
        raise AssertionError("never called while pickling")

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, (self.source,))


class _Payload:
    """Pickles as: touch `marker`, then return `value` (so the archive still loads and runs)."""

    def __init__(self, marker: Path, value: object):
        self.marker, self.value = marker, value

    def __reduce__(self) -> tuple[object, tuple[object]]:
        source = f"lambda v: (open({str(self.marker)!r}, 'w').close(), v)[1]"
        return (_Lambda(source), (self.value,))


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).relu()


def _saved(path: Path, dynamic: bool = False) -> Path:
    torch.manual_seed(0)
    shapes = ({0: torch.export.Dim("batch", min=1, max=16)},) if dynamic else None
    program = torch.export.export(_Tiny().eval(), (torch.randn(2, 4),), dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return path


def _rewrite(source: Path, destination: Path, member: str, change) -> Path:
    """A copy of the archive `source` with the member ending in `member` replaced by change(old bytes)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(destination, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = old.read(info.filename)
            new.writestr(info.filename, change(data) if info.filename.endswith(member) else data)
    return destination


def _pickled(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _evil_inputs(tmp_path: Path, marker: Path) -> Path:
    """A valid program whose pickled sample inputs touch `marker` (torch falls back to weights_only=False)."""
    clean = _saved(tmp_path / "clean.pt2")
    inputs = torch.export.load(str(clean)).example_inputs
    return _rewrite(
        clean, tmp_path / "evil.pt2", "data/sample_inputs/model.pt", lambda _: _pickled(_Payload(marker, inputs))
    )


def _edit_json(data: bytes, edit) -> bytes:
    tree = json.loads(data)
    edit(tree)
    return json.dumps(tree).encode()


def test_pickled_sample_inputs_are_refused_and_run_only_when_trusted(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = _evil_inputs(tmp_path, marker)
    code, _, err = run_cli("export", evil, "--target", "pt2", "--out", tmp_path / "out", capsys=capsys)
    assert_one_line_error(code, err, "archive member 'data/sample_inputs/model.pt'")
    assert "--trust-pickle" in err
    assert not marker.exists() and not (tmp_path / "out").exists()

    code, _, err = run_cli(
        "export", evil, "--target", "pt2", "--out", tmp_path / "trusted", "--trust-pickle", "-q", capsys=capsys
    )
    assert code == 0, err
    assert marker.exists(), "the payload is real: torch.export.load ran it once trusted"


def test_library_export_refuses_then_trusts(tmp_path):
    from kiln import export

    marker = tmp_path / "MARKER"
    evil = _evil_inputs(tmp_path, marker)
    with pytest.raises(UsageError, match="sample_inputs"):
        export(str(evil), target="pt2", out=tmp_path / "out")
    assert not marker.exists()
    export(str(evil), target="pt2", out=tmp_path / "trusted", trust_pickle=True)
    assert marker.exists()


def test_pickled_weight_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    clean = _saved(tmp_path / "clean.pt2")
    bias = torch.export.load(str(clean)).state_dict["linear.bias"]

    def use_pickle(data: bytes) -> bytes:
        def edit(tree: dict) -> None:
            tree["config"]["linear.bias"]["use_pickle"] = True
            tree["config"]["linear.bias"]["path_name"] = "weight_evil"

        return _edit_json(data, edit)

    staged = _rewrite(clean, tmp_path / "staged.pt2", "model_weights_config.json", use_pickle)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(staged) as old, zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            new.writestr(info.filename, old.read(info.filename))
        root = old.namelist()[0].split("/")[0]
        new.writestr(f"{root}/data/weights/weight_evil", _pickled(_Payload(marker, bias)))
    with pytest.raises(UsageError, match="data/weights/weight_evil"):
        load_program(evil)
    assert not marker.exists()
    torch.export.load(str(evil))
    assert marker.exists(), "torch's own loader runs the pickled weight"


def test_guard_code_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    clean = _saved(tmp_path / "clean.pt2")
    guard = f"(open({str(marker)!r}, 'w').close() is None) == True"

    def add_guard(data: bytes) -> bytes:
        return _edit_json(data, lambda tree: tree.__setitem__("guards_code", [guard]))

    evil = _rewrite(clean, tmp_path / "evil.pt2", "models/model.json", add_guard)
    with pytest.raises(UsageError, match="guard code"):
        load_program(evil)
    assert not marker.exists()
    torch.export.load(str(evil)).module()(torch.randn(2, 4))
    assert marker.exists(), "torch execs the guard code in the module it builds"


def test_shape_expression_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    clean = _saved(tmp_path / "clean.pt2", dynamic=True)
    assert load_program(clean).module()(torch.ones(5, 4)).shape == (5, 3)
    payload = f"Symbol('s' + str(open({str(marker)!r}, 'w').close() or 77), positive=True, integer=True)"

    def replace_first(tree: dict) -> None:
        stack = [tree]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if isinstance(node.get("expr_str"), str) and node["expr_str"].startswith("Symbol("):
                    node["expr_str"] = payload
                    return
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)

    evil = _rewrite(clean, tmp_path / "evil.pt2", "models/model.json", lambda d: _edit_json(d, replace_first))
    with pytest.raises(UsageError, match="shape expression"):
        load_program(evil)
    assert not marker.exists()
    with contextlib.suppress(Exception):  # the payload runs, then sympy fails on what it returns
        torch.export.load(str(evil))
    assert marker.exists(), "torch sympifies (evals) the shape expression"


def test_node_calling_a_python_function_is_refused(tmp_path):
    """A node may name any callable under `torch.` (even `torch.os.*`): torch's verifier refuses it, Kiln says so."""
    from kiln.compiler.capture.sources import load_source

    clean = _saved(tmp_path / "clean.pt2")

    def retarget(data: bytes) -> bytes:
        text = data.decode()
        assert '"torch.ops.aten.relu.default"' in text
        text = text.replace('"torch.ops.aten.relu.default"', '"torch.os.getcwd"')
        return _edit_json(text.encode(), lambda tree: tree.__setitem__("verifiers", []))

    evil = _rewrite(clean, tmp_path / "evil.pt2", "models/model.json", retarget)
    with pytest.raises(UsageError, match=r"not a readable torch.export program.*getcwd"):
        load_source(str(evil))


def test_pt2_export_runs_untrusted_pickles_only_with_the_flag(tmp_path, capsys):
    """`kiln run` / `compiler.load` of a pt2 export read its model.pt2 with the safe loader."""
    from kiln import export, load

    module = _Tiny().eval()
    out = tmp_path / "export"
    export(module, (torch.randn(2, 4),), target="pt2", out=out)
    assert load(out)(np.ones((2, 4), np.float32))  # Kiln's own archive loads safely
    marker = tmp_path / "MARKER"
    inputs = torch.export.load(str(out / "model.pt2")).example_inputs
    model = out / "model.pt2"
    tampered = _rewrite(
        model, tmp_path / "tampered.pt2", "data/sample_inputs/model.pt", lambda _: _pickled(_Payload(marker, inputs))
    )
    tampered.replace(model)
    np.savez(tmp_path / "x.npz", x=np.ones((2, 4), np.float32))
    feeds = ("--inputs", tmp_path / "x.npz", "--output", tmp_path / "y.npz")
    code, _, err = run_cli("run", out, *feeds, capsys=capsys)
    assert_one_line_error(code, err, "data/sample_inputs/model.pt")
    assert not marker.exists()
    with pytest.raises(UsageError):
        load(out)
    assert not marker.exists()
    code, _, err = run_cli("run", out, *feeds, "--trust-pickle", "-q", capsys=capsys)
    assert code == 0, err
    assert marker.exists()


@pytest.mark.parametrize(
    "expression",
    [
        "Symbol('s77', positive=True, integer=True)",
        "Mul(Integer(16), Symbol('s41', positive=True, integer=True))",
        "Max(1, s77)",
        "FloorDiv(s77, 2) + Mod(s0, 3)",
        "2*s77 - 1",
        "Eq(s0, 2)",
    ],
)
def test_shape_expressions_torch_writes_are_accepted(expression):
    from kiln.compiler.capture.pt2_archive import _is_shape_expression

    assert _is_shape_expression(expression)


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('true')",
        "Symbol('s' + str(1))",
        "Symbol('a b')",
        "s77.__class__",
        "(lambda: 1)()",
        "eval('1')",
        "10**10**10",
    ],
)
def test_shape_expressions_beyond_arithmetic_are_refused(expression):
    from kiln.compiler.capture.pt2_archive import _is_shape_expression

    assert not _is_shape_expression(expression)
