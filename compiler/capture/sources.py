"""Loading a model from what the user points at: a zoo name, a Python factory, a .pt2 or an .onnx file, or a
Hugging Face checkpoint folder (`kiln.compiler.capture.hf_folder`)."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from kiln.compiler.capture.inputs import read_npz
from kiln.compiler.errors import KilnError, UsageError, error_text
from kiln.compiler.ort_session import ort_session

if TYPE_CHECKING:
    from kiln.compiler.capture.hf_folder import FolderRequest
    from kiln.compiler.capture.language_model import LanguageModel
    from kiln.compiler.generation.decoding import DecoderSpec


@dataclass
class ModelSource:
    """A loaded model: the eager reference (PyTorch or ONNX) plus its example inputs."""

    description: str
    name: str
    kind: str  # "torch" or "onnx"
    example_inputs: tuple[Any, ...]
    module: torch.nn.Module | None = None
    exported: torch.export.ExportedProgram | None = None
    onnx_path: Path | None = None
    state_hash: str = ""
    task: str | None = (
        None  # "text-generation": a causal LM wrapped with its KV cache (kiln.compiler.generation.export)
    )
    # A text-generation export: `module` is Kiln's cache wrapper (what is captured), `reference_model` the user's own
    # causal LM, unmodified, which every parity check of the export runs (kiln.compiler.generation.gate), and `decoder`
    # what the export must know of it (vocabulary, positions, attention layers).
    reference_model: torch.nn.Module | None = None
    decoder: DecoderSpec | None = None
    language_model: LanguageModel | None = None  # what the runtimes' LLM formats need (a growing-cache export)
    # What the manifest records of a checkpoint folder (task, architecture, input shapes), and the files the export
    # carries beside its artifact (export-relative path -> source file: the folder's tokenizer).
    origin: dict[str, Any] = field(default_factory=dict)
    carried: dict[str, Path] = field(default_factory=dict)

    @property
    def reference_name(self) -> str:
        """What parity compares against."""
        if self.reference_model is not None:
            return f"transformers {type(self.reference_model).__name__} (the user's model, full-sequence forward)"
        if self.kind == "onnx":
            return "onnxruntime (source is ONNX)"
        if self.exported is not None and self.task is None:
            return "pytorch (exported program from .pt2)"
        return "pytorch eager"

    def weight_addresses(self) -> list[int]:
        """Where the model's weights are in memory (the data pointer of each parameter and buffer of the module, the
        reference model and the exported program), for `kiln.compiler.memory.release_pages`."""
        tensors: list[torch.Tensor] = []
        for module in (self.module, self.reference_model):
            if module is not None:
                tensors += [*module.parameters(), *module.buffers()]
        if self.exported is not None:
            tensors += list(self.exported.state_dict.values())
        return [t.data_ptr() for t in tensors if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel()]

    def with_batch(self, batch: int) -> ModelSource:
        """This source with example inputs resized to `batch` rows (for targets that need a fixed batch)."""
        if self.kind != "torch" or self.exported is not None:
            raise UsageError(
                f"{self.description} cannot be re-captured at batch {batch}",
                "give the model as file.py:factory or zoo:NAME, or export it with example inputs of that batch",
            )
        resized = tuple(t[torch.arange(batch) % t.shape[0]] if t.dim() else t for t in self.example_inputs)
        return replace(self, example_inputs=resized)


def load_source(
    spec: str,
    user_inputs: list[dict[str, np.ndarray]] | None = None,
    trust_pickle: bool | None = None,
    folder: FolderRequest | None = None,
) -> ModelSource:
    """Load a model source string: `zoo:NAME`, `file.py:factory`, `file.pt2`, `file.onnx` or a checkpoint folder
    (`folder`: what was asked of it; None: its task inferred, nothing trusted).

    A `.pt2` is read without running code from it unless `trust_pickle` (None: the enclosing
    `kiln.compiler.capture.pt2_archive.trusting_pickles` block decides, by default not trusted).
    """
    from kiln.compiler.capture.hf_folder import FolderRequest, is_checkpoint_folder

    if spec.startswith("zoo:"):
        return _load_zoo(spec)
    if is_checkpoint_folder(Path(spec)):
        return _load_folder(Path(spec), folder or FolderRequest(trust_pickle=bool(trust_pickle)))
    path_part, separator, factory = spec.rpartition(":")
    if not separator:
        path_part, factory = spec, ""
    path = Path(path_part)
    if path.suffix == ".py" or factory:
        return _load_python(path, factory, spec)
    if path.suffix == ".pt2":
        return _load_pt2(path, spec, trust_pickle)
    if path.suffix == ".onnx":
        return _load_onnx(path, spec, user_inputs)
    if path.is_dir():
        raise UsageError(f"{path} holds no config.json", "pass a checkpoint folder written by save_pretrained")
    raise UsageError(
        f"don't know how to load model '{spec}'",
        "use zoo:NAME, path/to/file.py:factory, file.pt2, file.onnx or a checkpoint folder "
        "(config.json + *.safetensors)",
    )


def _load_folder(folder: Path, request: FolderRequest) -> ModelSource:
    """A Hugging Face checkpoint folder: its model for the task, example inputs from its config, its tokenizer
    carried into the export."""
    from kiln.compiler.capture.hf_folder import TOKENIZER_DIR, load_folder, tokenizer_files

    module, inputs, record = load_folder(folder, request)
    source = from_module(module, inputs, str(folder))
    source.name = folder.resolve().name
    source.origin = record
    source.carried = {f"{TOKENIZER_DIR}/{path.name}": path for path in tokenizer_files(folder)}
    return source


def from_module(module: torch.nn.Module, example_inputs: Any, description: str = "") -> ModelSource:
    """Wrap an in-memory module and its example inputs (library use)."""
    if not isinstance(module, torch.nn.Module):
        raise UsageError(
            f"expected a torch.nn.Module, got {type(module).__name__}",
            "pass the model object itself, or a source string such as zoo:cnn",
        )
    inputs = _normalize_inputs(example_inputs, description or type(module).__name__)
    name = description or type(module).__name__.lower()
    return ModelSource(
        description or f"<{type(module).__name__}>",
        name,
        "torch",
        inputs,
        module=module.eval(),
        state_hash=state_hash(module.state_dict()),
    )


def _normalize_inputs(example_inputs: Any, where: str) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if not isinstance(example_inputs, tuple) or not example_inputs:
        raise UsageError(
            f"{where}: example inputs must be a tensor or a non-empty tuple of tensors, "
            f"got {type(example_inputs).__name__}",
            "return (model, (tensor1, tensor2, ...)) from the factory",
        )
    for i, value in enumerate(example_inputs):
        if not isinstance(value, torch.Tensor):
            raise UsageError(
                f"{where}: example input {i} is a {type(value).__name__}, not a torch.Tensor",
                "pass only tensors as example inputs",
            )
    return example_inputs


def _load_zoo(spec: str) -> ModelSource:
    from kiln.compiler.capture.zoo import ZOO

    name = spec.removeprefix("zoo:")
    if name not in ZOO:
        raise UsageError(f"no built-in model '{name}'", f"choose one of: {', '.join(sorted(ZOO))}")
    module, inputs = ZOO[name]()
    source = from_module(module, inputs, spec)
    source.name = name
    return source


def python_function(path: Path, name: str, spec: str, returns: str) -> Any:
    """The function `name` defined in the Python file `path` (given by the user as `spec`)."""
    if not path.is_file():
        raise UsageError(f"{path} does not exist", "check the path before ':'")
    if not name:
        raise UsageError(
            f"'{spec}' names no function after the colon", f"write {path}:FUNCTION, where FUNCTION returns {returns}"
        )
    module_name = f"kiln_user_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise UsageError(f"cannot import {path} as Python", "pass a .py file")
    user_module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = user_module
    try:
        loader_spec.loader.exec_module(user_module)
    except Exception as exc:
        raise UsageError(f"importing {path} failed: {error_text(exc)}", "fix the error in that file") from exc
    fn = getattr(user_module, name, None)
    if fn is None or not callable(fn):
        available = [n for n, v in vars(user_module).items() if inspect.isfunction(v) and v.__module__ == module_name]
        raise UsageError(
            f"{path} has no function '{name}'", f"functions defined there: {', '.join(available) or 'none'}"
        )
    return fn


def _load_python(path: Path, factory: str, spec: str) -> ModelSource:
    fn = python_function(path, factory, spec, "(module, example_inputs)")
    try:
        produced = fn()
    except Exception as exc:
        raise UsageError(f"{spec} raised {error_text(exc)}", "fix the factory so that it runs") from exc
    if isinstance(produced, torch.nn.Module):
        inputs = getattr(produced, "example_inputs", None)
        if inputs is None:
            raise UsageError(
                f"{spec} returned a module without example inputs",
                "return (module, example_inputs) or set module.example_inputs",
            )
        module = produced
    elif isinstance(produced, tuple) and len(produced) == 2 and isinstance(produced[0], torch.nn.Module):
        module, inputs = produced
    else:
        raise UsageError(
            f"{spec} returned {type(produced).__name__}, not (module, example_inputs)",
            "return a tuple (torch.nn.Module, tuple of example tensors)",
        )
    source = from_module(module, inputs, spec)
    source.name = factory
    return source


def _load_pt2(path: Path, spec: str, trust_pickle: bool | None = None) -> ModelSource:
    from kiln.compiler.capture.pt2_archive import load_program

    if not path.is_file():
        raise UsageError(f"model file {path} does not exist", "check the path")
    try:
        exported = load_program(path, trust_pickle)
    except KilnError:
        raise
    except Exception as exc:
        raise UsageError(
            f"{path} is not a readable torch.export program ({error_text(exc, 200)})",
            "save it with torch.export.save(torch.export.export(model, args), 'model.pt2')",
        ) from None
    args, kwargs = exported.example_inputs or ((), {})
    if kwargs:
        raise UsageError(f"{path} was exported with keyword inputs", "export it with positional example inputs")
    if not args:
        raise UsageError(f"{path} carries no example inputs", "export it with torch 2.5 or newer, which saves them")
    inputs = _normalize_inputs(tuple(args), spec)
    weights = dict(exported.state_dict) | {k: v for k, v in exported.constants.items() if isinstance(v, torch.Tensor)}
    return ModelSource(
        spec, path.stem, "torch", inputs, module=exported.module(), exported=exported, state_hash=state_hash(weights)
    )


def check_onnx_external_data(path: Path) -> None:
    """Refuse an ONNX file whose external-data locations point outside its own directory."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise UsageError(
            f"{path} is not a valid ONNX model ({error_text(exc, 200)})",
            "re-export it, or check that the file is complete",
        ) from None
    base = path.resolve().parent
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(base):
            raise UsageError(
                f"{path}: tensor '{tensor.name}' points at external data '{location}' outside the model's directory",
                "keep external data files next to the .onnx file (refused for safety)",
            )
        if not target.is_file():
            raise UsageError(f"{path}: external data file '{location}' is missing", "copy it next to the .onnx file")


def _load_onnx(path: Path, spec: str, user_inputs: list[dict[str, np.ndarray]] | None) -> ModelSource:
    import onnx

    if not path.is_file():
        raise UsageError(f"model file {path} does not exist", "check the path")
    check_onnx_external_data(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)  # full: strict shape and type inference too
    except Exception as exc:
        raise UsageError(
            f"{path} fails the ONNX checker: {_ort_error(exc)}", "re-export the model; Kiln accepts only valid ONNX"
        ) from None
    proto = onnx.load(str(path), load_external_data=False)
    newest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise UsageError(
                f"{path} imports ONNX opset {opset.version}; the newest this onnx {onnx.__version__} knows is {newest}",
                "re-export the model at a released opset",
            )
    if not proto.graph.output:
        raise UsageError(f"{path} has no graph outputs", "re-export the model with its outputs")
    initializers = {i.name for i in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in initializers]
    if user_inputs:
        inputs = tuple(
            torch.from_numpy(np.asarray(user_inputs[0][i.name])) for i in graph_inputs if i.name in user_inputs[0]
        )
        if len(inputs) != len(graph_inputs):
            raise UsageError(
                f"--inputs does not name every input of {path}",
                f"expected keys: {', '.join(i.name for i in graph_inputs)}",
            )
    else:
        inputs = tuple(_onnx_example(i, path) for i in graph_inputs)
    _check_runs(path, {i.name: t.numpy() for i, t in zip(graph_inputs, inputs)})
    digest = hashlib.sha256()
    digest.update(path.read_bytes())
    return ModelSource(spec, path.stem, "onnx", inputs, onnx_path=path, state_hash=digest.hexdigest())


def _ort_error(exc: BaseException) -> str:
    """ONNX Runtime's exception named (`error_text`) by what it says: its first line without the
    "[ONNXRuntimeError] : N : CODE :" prefix and the "Load model from PATH failed:" preamble."""
    text = next((line for line in str(exc).splitlines() if line.strip()), "")
    text = text.split(" failed:", 1)[-1] if "Load model from" in text else text
    return error_text(exc, 240, re.sub(r"^\s*\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text))


def _check_runs(path: Path, feeds: dict[str, np.ndarray]) -> None:
    """Prove ONNX Runtime (the reference) can load the model and run it once on the example inputs."""

    try:
        session = ort_session(path)
        session.run(None, feeds)
    except Exception as exc:
        raise UsageError(
            f"ONNX Runtime cannot run {path}: {_ort_error(exc)}",
            "Kiln's reference for an .onnx source is ONNX Runtime: re-export a model it can run",
        ) from None


def _onnx_example(value_info: Any, path: Path) -> torch.Tensor:
    """A plausible example input for an ONNX graph input: dynamic dims become 1."""
    import onnx

    tensor_type = value_info.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor_type.shape.dim]
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        torch.from_numpy(np.zeros(0, dtype))
    except Exception:
        kind = value_info.type.WhichOneof("value") or "untyped"
        what = onnx.TensorProto.DataType.Name(tensor_type.elem_type) if kind == "tensor_type" else kind
        raise UsageError(
            f"{path}: input '{value_info.name}' is {what}, not a tensor Kiln can feed",
            "Kiln feeds numeric and bool tensors; change the model's input type",
        ) from None
    if any(d < 0 for d in shape):
        raise UsageError(f"{path}: input '{value_info.name}' has a negative dimension {shape}", "fix the input shape")
    if int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > 1 << 31:
        raise UsageError(
            f"{path}: input '{value_info.name}' of shape {shape} needs more than 2 GiB for one example",
            "fix the input shape, or pass --inputs with real arrays",
        )
    generator = np.random.default_rng(0)
    if np.issubdtype(dtype, np.floating):
        return torch.from_numpy(generator.standard_normal(shape).astype(dtype))
    if dtype == np.bool_:
        return torch.ones(shape, dtype=torch.bool)
    return torch.from_numpy(generator.integers(0, 2, shape).astype(dtype))


def state_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a model's weights and buffers."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def load_model(
    model: str | Path | torch.nn.Module,
    example_inputs: Any,
    inputs_files: Sequence[Path] = (),
    request: FolderRequest | None = None,
) -> ModelSource:
    """The model the user gave: a source string (a checkpoint folder, zoo:NAME, file.py:factory, .pt2, .onnx) or a
    module; an .onnx source takes its example inputs from the first of the user's `inputs_files` (`--inputs`) when
    given, a checkpoint folder what `request` asks (--task, --shape, --trust-remote-code, --trust-pickle)."""
    from kiln.compiler.capture.hf_folder import TASKS as FOLDER_TASKS
    from kiln.compiler.capture.hf_folder import FolderRequest, is_checkpoint_folder
    from kiln.compiler.generation.decoding import TASKS

    request = request or FolderRequest()
    folder = isinstance(model, (str, Path)) and is_checkpoint_folder(Path(model))
    if request.task is not None and request.task not in FOLDER_TASKS:
        raise UsageError(f"--task {request.task}: unknown task", f"use one of: {', '.join(FOLDER_TASKS)}")
    if request.task not in (None, *TASKS) and not folder:
        raise UsageError(
            f"--task {request.task} applies to a checkpoint folder (config.json + *.safetensors) only",
            f"pass such a folder, or --task {' or '.join(TASKS)}",
        )
    if (request.shapes or request.trust_remote_code) and not folder:
        raise UsageError(
            "--shape and --trust-remote-code apply to a checkpoint folder only",
            "drop them, or give example inputs in the factory",
        )
    if isinstance(model, (str, Path)):
        user = [read_npz(p, "--inputs") for p in inputs_files] if str(model).endswith(".onnx") else None
        return load_source(str(model), user, folder=request)
    if not isinstance(model, torch.nn.Module):
        raise UsageError(
            f"the model must be a torch.nn.Module or a source string, not {type(model).__name__}",
            "pass a module with example_inputs, or e.g. 'zoo:cnn', 'model.onnx', 'file.py:factory'",
        )
    if example_inputs is None:
        raise UsageError("export(module, ...) needs example_inputs", "pass example_inputs=(tensor, ...)")
    return from_module(model, example_inputs)
