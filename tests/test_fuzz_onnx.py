"""Seeded fuzzing of the ONNX frontend: malformed models are bad input (exit 2), never an internal error.

Mutants of a small valid model (byte flips, truncations, renamed ops, retyped initializers, bad dims,
cycles, missing outputs, opset 99...), and one mutant per byte of the file (`whole_file_flips`), are exported
with `kiln export MUTANT --target onnx`. All run in one worker process (`cli.main` per mutant, so torch is
imported once); a worker that dies (a native crash) is restarted after the mutant that killed it, which is
reported as a failure.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import ROOT

SEED = 14
TIMEOUT_S = 240


def valid_model() -> onnx.ModelProto:
    """X[1,4] -> MatMul W -> Add B -> Relu -> Y[1,3], plus a Conv branch: Z[1,2,5,5] -> Conv -> Sigmoid -> C."""
    import numpy as np

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "B"),
        numpy_helper.from_array(rng.standard_normal((2, 2, 3, 3)).astype(np.float32), "K"),
    ]
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["xw"], name="matmul"),
        helper.make_node("Add", ["xw", "B"], ["xwb"], name="add"),
        helper.make_node("Relu", ["xwb"], ["Y"], name="relu"),
        helper.make_node("Conv", ["Z", "K"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["conv"], ["C"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "fuzz",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("Z", TensorProto.FLOAT, [1, 2, 5, 5]),
        ],
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 3]),
            helper.make_tensor_value_info("C", TensorProto.FLOAT, [1, 2, 5, 5]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _edit(change: Callable[[onnx.ModelProto], object]) -> Callable[[], bytes]:
    def make() -> bytes:
        model = valid_model()
        change(model)
        return model.SerializeToString()

    return make


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(i for i in model.graph.initializer if i.name == name)


def _dim(value_info: onnx.ValueInfoProto, index: int) -> onnx.TensorShapeProto.Dimension:
    return value_info.type.tensor_type.shape.dim[index]


def _set(obj: object, **fields: object) -> None:
    for name, value in fields.items():
        setattr(obj, name, value)


def _structural_mutants() -> dict[str, Callable[[], bytes]]:
    """Named, hand-made malformations (each a different check Kiln must make)."""
    g = "graph"
    return {
        "valid": _edit(lambda m: None),
        "renamed-op": _edit(lambda m: _set(_node(m, "relu"), op_type="Relux")),
        "renamed-op-in-conv-branch": _edit(lambda m: _set(_node(m, "conv"), op_type="Convolution")),
        "unknown-domain": _edit(lambda m: _set(_node(m, "add"), domain="com.example")),
        "opset-99": _edit(lambda m: _set(m.opset_import[0], version=99)),
        "opset-1": _edit(lambda m: _set(m.opset_import[0], version=1)),
        "ir-version-99": _edit(lambda m: _set(m, ir_version=99)),
        "no-graph-output": _edit(lambda m: m.graph.ClearField("output")),
        "no-nodes": _edit(lambda m: m.graph.ClearField("node")),
        "no-inputs": _edit(lambda m: m.graph.ClearField("input")),
        "cycle": _edit(lambda m: _node(m, "matmul").input.__setitem__(0, "Y")),
        "self-loop": _edit(lambda m: _node(m, "relu").input.__setitem__(0, "Y")),
        "undefined-input": _edit(lambda m: _node(m, "add").input.__setitem__(1, "nowhere")),
        "duplicate-output-name": _edit(lambda m: _node(m, "add").output.__setitem__(0, "xw")),
        "initializer-int64-data-float": _edit(lambda m: _set(_init(m, "W"), data_type=TensorProto.INT64)),
        "initializer-double": _edit(lambda m: _set(_init(m, "B"), data_type=TensorProto.DOUBLE)),
        "initializer-fp16": _edit(lambda m: _set(_init(m, "K"), data_type=TensorProto.FLOAT16)),
        "initializer-wrong-dims": _edit(lambda m: _init(m, "W").dims.__setitem__(0, 5)),
        "initializer-rank-1": _edit(lambda m: (_init(m, "W").ClearField("dims"), _init(m, "W").dims.append(12))),
        "initializer-no-data": _edit(lambda m: _init(m, "B").ClearField("raw_data")),
        "input-dim-minus-1": _edit(lambda m: _set(_dim(m.graph.input[0], 1), dim_value=-1)),
        "input-dim-0": _edit(lambda m: _set(_dim(m.graph.input[0], 1), dim_value=0)),
        "input-dim-huge": _edit(lambda m: _set(_dim(m.graph.input[0], 0), dim_value=1 << 40)),
        "input-int64": _edit(lambda m: _set(m.graph.input[0].type.tensor_type, elem_type=TensorProto.INT64)),
        "input-string": _edit(lambda m: _set(m.graph.input[1].type.tensor_type, elem_type=TensorProto.STRING)),
        "input-undefined-type": _edit(lambda m: _set(m.graph.input[0].type.tensor_type, elem_type=0)),
        "input-rank-mismatch": _edit(
            lambda m: m.graph.input[0].type.tensor_type.shape.dim.add().__setattr__("dim_value", 2)
        ),
        "conv-rank-mismatch": _edit(lambda m: m.graph.input[1].type.tensor_type.shape.ClearField("dim")),
        "output-wrong-type": _edit(lambda m: _set(m.graph.output[0].type.tensor_type, elem_type=TensorProto.INT32)),
        "output-wrong-shape": _edit(lambda m: _set(_dim(m.graph.output[0], 1), dim_value=7)),
        "bad-attribute": _edit(lambda m: _node(m, "conv").attribute.append(helper.make_attribute("pads", [1]))),
        "conv-group-3": _edit(lambda m: _node(m, "conv").attribute.append(helper.make_attribute("group", 3))),
        "input-also-initializer": _edit(
            lambda m: m.graph.initializer.append(
                numpy_helper.from_array(__import__("numpy").zeros((1, 4), "float32"), "X")
            )
        ),
        "empty-file": lambda: b"",
        "not-protobuf": lambda: b"this is not an onnx model\n" * 4,
        "corrupt-header": lambda: b"\xff\xff\xff\xff" + valid_model().SerializeToString()[4:],
        "model-without-graph": _edit(lambda m: m.ClearField(g)),
    }


def _random_mutants(rng: random.Random) -> dict[str, Callable[[], bytes]]:
    """Byte flips and truncations of the serialized valid model, from a fixed seed."""
    data = valid_model().SerializeToString()
    mutants: dict[str, Callable[[], bytes]] = {}
    for i in range(12):
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        mutants[f"flip-{i}"] = lambda b=bytes(flipped): b
    for i in range(6):
        size = rng.randrange(1, len(data))
        mutants[f"truncate-{i}"] = lambda n=size: data[:n]
    return mutants


def whole_file_flips(seed: int = SEED) -> dict[str, bytes]:
    """One mutant per byte of the serialized valid model (header, names, attributes, shapes and weights alike),
    that byte XORed with a seeded random non-zero mask: `at-<offset>`."""
    rng = random.Random(seed)
    data = valid_model().SerializeToString()
    flipped = {}
    for offset in range(len(data)):
        mutant = bytearray(data)
        mutant[offset] ^= rng.randrange(1, 256)
        flipped[f"at-{offset}"] = bytes(mutant)
    return flipped


def mutants() -> dict[str, bytes]:
    """Every mutant by name (about 55, the same on every run)."""
    made = _structural_mutants() | _random_mutants(random.Random(SEED))
    return {name: make() for name, make in made.items()}


_WORKER = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from pathlib import Path
    from kiln import cli
    work, results = Path(sys.argv[1]), Path(sys.argv[2])
    with results.open("a") as log:
        for name in sys.argv[3:]:
            log.write(json.dumps({"start": name}) + "\\n"); log.flush()
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = cli.main(["export", str(work / f"{name}.onnx"), "--target", "onnx",
                                 "--out", str(work / "out" / name), "-q"])
            log.write(json.dumps({"name": name, "code": code, "stderr": err.getvalue()}) + "\\n"); log.flush()
    """
)


def run_mutants(work: Path, named: dict[str, bytes]) -> dict[str, dict]:
    """Export every mutant in worker processes: name -> {code, stderr}; a crashed worker's mutant gets its signal."""
    for name, data in named.items():
        (work / f"{name}.onnx").write_bytes(data)
    results: dict[str, dict] = {}
    log = work / "results.jsonl"
    pending = list(named)
    while pending:
        process = subprocess.run(
            [sys.executable, "-c", _WORKER, str(work), str(log), *pending],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
        )
        started = None
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if "start" in entry:
                started = entry["start"]
            else:
                results[entry["name"]] = entry
                started = None
        if started is not None and started not in results:  # the worker died on this one
            results[started] = {"name": started, "code": process.returncode, "stderr": process.stderr[-2000:]}
        pending = [n for n in named if n not in results]
        if process.returncode == 0 and pending:
            raise AssertionError(f"worker stopped early: {process.stderr[-2000:]}")
    return results


def _problems(results: dict[str, dict], out: Path) -> list[str]:
    """What breaks the rule: bad input is exit 2 with one line, a parity failure exit 1, nothing published then."""
    problems = []
    for name, result in sorted(results.items()):
        code, err = result["code"], result["stderr"]
        if code not in (0, 1, 2, 3) or "Traceback" in err or "internal error" in err:
            problems.append(f"{name}: exit {code}: {err.strip()[-300:]}")
        elif code != 0 and (out / name / "manifest.json").exists():
            problems.append(f"{name}: exit {code} but a manifest was published")
        elif code == 2 and not err.startswith("kiln: error: "):
            problems.append(f"{name}: exit 2 without a one-line error: {err[:200]}")
    return problems


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_malformed_onnx_models_are_bad_input(tmp_path):
    named = mutants()
    results = run_mutants(tmp_path, named)
    print("exit codes:", dict(sorted(Counter(r["code"] for r in results.values()).items())))
    problems = _problems(results, tmp_path / "out")
    assert not problems, "\n".join(problems)
    assert results["valid"]["code"] == 0, results["valid"]["stderr"]
    assert results["opset-99"]["code"] == 2 and "99" in results["opset-99"]["stderr"]


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_byte_flips_over_the_whole_file_are_bad_input(tmp_path):
    """Every byte of the file flipped in turn. Some of these pass the front door (ONNX's checker and a run in
    ONNX Runtime: a name that is no longer UTF-8 is still accepted there) and fail later, when the optimized graph
    is serialized: exit 2 naming the problem, as for any other malformed model."""
    results = run_mutants(tmp_path, whole_file_flips())
    print("exit codes:", dict(sorted(Counter(r["code"] for r in results.values()).items())))
    assert not _problems(results, tmp_path / "out"), "\n".join(_problems(results, tmp_path / "out"))
    unserializable = [name for name, r in results.items() if "cannot be serialized" in r["stderr"]]
    assert unserializable, "no mutant reached the serialization of the optimized graph: the test lost its point"
    assert any("UnicodeDecodeError" in results[name]["stderr"] for name in unserializable)
