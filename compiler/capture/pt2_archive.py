"""Loading a `.pt2` (`torch.export.save`) archive without running code from it.

`torch.export.load` unpickles parts of the archive with `weights_only=False` (the sample inputs
when the safe load fails, weights and constants marked `use_pickle`, custom objects), evaluates
the graph's symbolic shape expressions with `sympy.sympify` (Python `eval`), and `exec`s the
program's guard code when `.module()` is called. Any of these runs code a crafted file carries.

`load_program(path)` reads the same archive (torch 2.13's format, `torch/export/pt2_archive/`)
itself: every pickled member with `torch.load(weights_only=True)` (tensors and containers
only), every shape expression and guard checked against a small arithmetic grammar first (torch's
own verifier then refuses graph nodes that call anything but operators). What cannot be
read that way is refused with a UsageError naming the archive member; `trust_pickle=True`
(`--trust-pickle`) hands the file to `torch.export.load` unchanged instead.

The default for callers that do not pass `trust_pickle` is `False`, or what an enclosing
`trusting_pickles(...)` block says (the CLI's flag and the library's keyword set it for one
command), so that a target's runner loading a `.pt2` follows the user's choice.
"""

from __future__ import annotations

import ast
import io
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import UsageError

if TYPE_CHECKING:
    import torch

MODEL_NAME = "model"  # the program `torch.export.save` writes and `torch.export.load` returns
TRUST_HINT = (
    "Kiln does not run code from a .pt2 file; if you trust this file, pass --trust-pickle (library: trust_pickle=True)"
)
_TRUST: ContextVar[bool] = ContextVar("kiln_trust_pickle", default=False)

# sympy names that torch prints in serialized shape expressions (plus torch's own sympy functions)
# fmt: off
_SYMPY_NAMES = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Max", "Min", "Abs", "Mod", "floor", "ceiling", "Eq", "Ne", "Lt", "Le",
    "Gt", "Ge", "And", "Or", "Not", "Piecewise", "ITE", "sqrt", "oo", "zoo", "nan", "true", "false", "True", "False",
})
_SYMBOL_KEYWORDS = frozenset({
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "nonzero", "zero", "commutative",
})
_SYMBOL_NAME = re.compile(r"[a-z]+\d+")
# guard code: `L['x'].size()[0] <= 32`, `math.floor(...)`, `max(...)`
_GUARD_NAMES = frozenset({
    "L", "math", "inf", "max", "min", "abs", "int", "float", "bool", "round", "IsNonOverlappingAndDenseIndicator",
})
_GUARD_ATTRIBUTES = frozenset({
    "size", "stride", "storage_offset", "dim", "floor", "ceil", "trunc", "sqrt", "isnan", "isinf", "inf",
})
# fmt: on
_ARITHMETIC = (
    ast.Expression,
    ast.BinOp,
    ast.UnaryOp,
    ast.BoolOp,
    ast.Compare,
    ast.Load,
    ast.operator,
    ast.unaryop,
    ast.boolop,
    ast.cmpop,
)


@contextmanager
def trusting_pickles(trust: bool) -> Iterator[None]:
    """Within this block, `load_program` calls that do not pass `trust_pickle` use `trust`."""
    token = _TRUST.set(bool(trust))
    try:
        yield
    finally:
        _TRUST.reset(token)


def load_program(path: str | Path, trust_pickle: bool | None = None) -> torch.export.ExportedProgram:
    """The exported program in a `.pt2` archive, read without running code from it unless `trust_pickle`.

    `trust_pickle=None` follows the enclosing `trusting_pickles` block (default: not trusted).
    Raises UsageError for a member that cannot be read safely; other read errors propagate.
    """
    import torch

    trust = _TRUST.get() if trust_pickle is None else trust_pickle
    if trust:
        return torch.export.load(str(path))
    return _load_untrusted(Path(path))


def _load_untrusted(path: Path) -> torch.export.ExportedProgram:
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass
    from torch.export.pt2_archive import constants as names
    from torch.export.pt2_archive._package import PT2ArchiveReader

    with PT2ArchiveReader(str(path)) as reader:
        members = set(reader.get_file_names())
        version = reader.read_string(names.ARCHIVE_VERSION_PATH) if names.ARCHIVE_VERSION_PATH in members else "?"
        if version != names.ARCHIVE_VERSION_VALUE:
            raise UsageError(
                f"{path}: archive version {version} is not {names.ARCHIVE_VERSION_VALUE}, the one this torch reads",
                "save it again with torch.export.save from the torch version Kiln uses",
            )
        program_member = names.MODELS_FILENAME_FORMAT.format(MODEL_NAME)
        if program_member not in members:
            raise UsageError(f"{path} holds no exported program ({program_member})", "save it with torch.export.save")
        program = json.loads(reader.read_string(program_member))
        _check_program_json(program, path, program_member)
        state_dict = _tensors(reader, members, path, names.WEIGHTS_DIR, names.WEIGHTS_CONFIG_FILENAME_FORMAT)
        constants = _tensors(reader, members, path, names.CONSTANTS_DIR, names.CONSTANTS_CONFIG_FILENAME_FORMAT)
        inputs_member = names.SAMPLE_INPUTS_FILENAME_FORMAT.format(MODEL_NAME)
        example_inputs = _unpickle(reader, inputs_member, path) if inputs_member in members else None
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        raise UsageError(f"{path}: {inputs_member} is not an (args, kwargs) pair", "save it with torch.export.save")
    exported = ExportedProgramDeserializer(None).deserialize(
        _dict_to_dataclass(schema.ExportedProgram, program), state_dict, constants, example_inputs or None
    )
    return exported  # torch's verifier has refused nodes that call anything but operators


def _unpickle(reader: Any, member: str, path: Path) -> Any:
    """A pickled member loaded with `torch.load(weights_only=True)`; refused if it holds anything else."""
    import torch

    data = reader.read_bytes(member)
    if not data:
        return None
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:
        text = str(exc)
        why = re.search(r"WeightsUnpickler error: ([^.\n]*)", text)
        reason = why[1] if why else (text.strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(
            f"{path}: archive member '{member}' cannot be read as plain tensors without running pickled code "
            f"({reason[:160]})",
            TRUST_HINT,
        ) from None


def _tensors(reader: Any, members: set[str], path: Path, directory: str, config_format: str) -> dict[str, Any]:
    """The weights (or tensor constants) of the program, as `torch.export.load` builds them, pickles loaded safely."""
    import torch
    from torch._export.serde.serialize import deserialize_size, deserialize_storage_offset, deserialize_stride
    from torch.export.pt2_archive import constants as names
    from torch.export.pt2_archive._package import _build_file_map, _load_payload_config

    config_member = config_format.format(MODEL_NAME)
    if config_member not in members:
        legacy = f"{directory}{MODEL_NAME}.pt"
        if legacy not in members:
            return {}
        loaded = _unpickle(reader, legacy, path) or {}
        if not isinstance(loaded, dict):
            raise UsageError(f"{path}: archive member '{legacy}' is not a dict of tensors", TRUST_HINT)
        return loaded
    config = _load_payload_config(reader, config_member)
    flat = _build_file_map(reader, config, directory)  # raw tensor bytes: no pickle involved
    tensors: dict[str, Any] = {}
    for fqn, meta in config.config.items():
        member = f"{directory}{meta.path_name}"
        if directory == names.CONSTANTS_DIR and not meta.path_name.startswith(names.TENSOR_CONSTANT_FILENAME_PREFIX):
            raise UsageError(
                f"{path}: archive member '{member}' holds a pickled Python object (constant '{fqn}')", TRUST_HINT
            )
        if meta.use_pickle:
            tensor = _unpickle(reader, member, path)
            if not isinstance(tensor, torch.Tensor):
                raise UsageError(f"{path}: archive member '{member}' is not a tensor", TRUST_HINT)
        else:
            tensor_meta = meta.tensor_meta
            if tensor_meta is None or meta.path_name not in flat:
                raise UsageError(f"{path}: archive member '{member}' has no tensor description", "save it again")
            tensor = torch.as_strided(
                flat[meta.path_name],
                deserialize_size(tensor_meta.sizes),
                deserialize_stride(tensor_meta.strides),
                deserialize_storage_offset(tensor_meta.storage_offset),
            )
            if meta.is_param:
                tensor = torch.nn.Parameter(tensor, requires_grad=tensor_meta.requires_grad)
        tensors[fqn] = tensor
    return tensors


def _check_program_json(program: Any, path: Path, member: str) -> None:
    """Refuse shape expressions (sympified) and guards (exec'd) that are more than arithmetic on shapes."""
    if not isinstance(program, dict):
        raise UsageError(f"{path}: archive member '{member}' is not a serialized program", "save it again")
    for expression in _values_of(program, "expr_str"):
        if not (isinstance(expression, str) and _is_shape_expression(expression)):
            raise UsageError(
                f"{path}: archive member '{member}' has a shape expression that is not plain arithmetic: "
                f"{str(expression)[:80]!r}",
                TRUST_HINT,
            )
    guards = program.get("guards_code") or []
    for guard in guards if isinstance(guards, list) else [guards]:
        if not (isinstance(guard, str) and _is_guard(guard)):
            raise UsageError(
                f"{path}: archive member '{member}' has guard code that is not a shape check: {str(guard)[:80]!r}",
                TRUST_HINT,
            )


def _values_of(tree: Any, key: str) -> Iterator[Any]:
    """Every value stored under `key` anywhere in a JSON tree."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for name, value in node.items():
                if name == key:
                    yield value
                else:
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)


def _parse(text: str) -> ast.Expression | None:
    if len(text) > 2000:
        return None
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return None


def _is_shape_expression(text: str) -> bool:
    """A sympy expression over shape symbols: numbers, symbols, arithmetic, calls of sympy's functions."""
    import torch.utils._sympy.functions as sympy_functions

    tree = _parse(text)
    if tree is None:
        return False
    for node in ast.walk(tree):
        if isinstance(node, _ARITHMETIC) and not (isinstance(node, ast.BinOp) and _huge_power(node)):
            continue
        if isinstance(node, ast.Name) and (
            node.id in _SYMPY_NAMES or _SYMBOL_NAME.fullmatch(node.id) or _is_sympy_function(node.id, sympy_functions)
        ):
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            continue
        if isinstance(node, ast.keyword) and node.arg in _SYMBOL_KEYWORDS:
            continue
        if isinstance(node, ast.Constant) and (
            isinstance(node.value, (int, float, bool))
            or (isinstance(node.value, str) and _SYMBOL_NAME.fullmatch(node.value))
        ):
            continue
        return False
    return True


def _is_sympy_function(name: str, module: Any) -> bool:
    """A sympy expression class (`Mul`, `Integer`, ... as `srepr` writes them) or one of torch's sympy functions
    (FloorDiv, ModularIndexing, ...), which torch's deserializer knows by name."""
    import sympy

    if name.startswith("_"):
        return False
    value = getattr(sympy, name, None)
    if isinstance(value, type) and issubclass(value, sympy.Basic):
        return True
    return name[:1].isupper() and isinstance(getattr(module, name, None), type)


def _huge_power(node: ast.BinOp) -> bool:
    """`a ** n` with a constant n beyond 64: sympy would compute the number (a hang, not a shape)."""
    right = node.right
    return isinstance(node.op, ast.Pow) and not (
        isinstance(right, ast.Name)
        or (isinstance(right, ast.Constant) and isinstance(right.value, (int, float)) and abs(right.value) <= 64)
    )


def _is_guard(text: str) -> bool:
    """Guard code torch writes, e.g. `L['x'].size()[0] <= 32`: shape lookups, arithmetic, comparisons.

    Strings appear only as the input names subscripting `L` (torch replaces `L['x']` textually before
    it execs the code, so anything else in quotes could be turned into code).
    """
    tree = _parse(text)
    if tree is None:
        return False
    keys = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            keys.add(id(node.slice))
    for node in ast.walk(tree):
        if isinstance(node, _ARITHMETIC) and not (isinstance(node, ast.BinOp) and _huge_power(node)):
            continue
        if isinstance(node, ast.Name) and node.id in _GUARD_NAMES:
            continue
        if isinstance(node, ast.Attribute) and node.attr in _GUARD_ATTRIBUTES:
            continue
        if isinstance(node, (ast.Call, ast.Subscript)) and not getattr(node, "keywords", None):
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool)) and id(node) not in keys:
            continue
        if isinstance(node, ast.Constant) and id(node) in keys and re.fullmatch(r"\w+", str(node.value)):
            continue
        return False
    return True
