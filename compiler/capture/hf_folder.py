"""A Hugging Face checkpoint folder as a model source: `config.json` and the weights as `save_pretrained` or a hub
download leaves them (`*.safetensors`, sharded or not), and perhaps a tokenizer.

- **The task** comes from the config's architecture, as Optimum's task manager infers it: a causal LM is exported for
  text generation (with its KV cache, `kiln.compiler.generation.export`); a sequence or token classifier, an image
  classifier, a masked LM and a bare encoder (`BertModel`) export one forward; an encoder-decoder (T5, BART,
  Whisper) exports its encoder. `--task` overrides it (`TASKS`).
- **Example inputs** come from the config: token ids of `min(128, max positions)` with their attention mask, an
  image of the config's `image_size` and `num_channels`, Whisper's log-mel frames; `--shape NAME=DIMS` overrides
  one input's shape (`1x64`).
- **Nothing in the folder runs code**: weights are read from safetensors only (memory-mapped by transformers, never
  unpickled); a folder with pickled weights only (`pytorch_model.bin`) needs `--trust-pickle`, and one whose config
  asks for its own code (`auto_map`, an architecture transformers lacks) needs `--trust-remote-code`.
- **A tokenizer** in the folder (`tokenizer.json`, `tokenizer.model`, `vocab.txt`, ...) is copied into the export
  (`tokenizer/`), where `kiln run --generate --prompt TEXT` finds it.

The model exported for a task other than text generation is the checkpoint's model behind a thin module that names
its inputs and returns its task's outputs (`logits`, or `last_hidden_state`): the reference of the gate is that
model, run by transformers, unmodified.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from kiln.compiler.errors import UsageError
from kiln.compiler.generation.decoding import FORWARD, TEXT_GENERATION
from kiln.compiler.safe_fs import refused, within
from torch import nn

CONFIG = "config.json"
ENCODER = "encoder"
# Task -> the transformers Auto class that loads its model, and the output it exports.
TASK_MODELS: dict[str, tuple[str, str]] = {
    TEXT_GENERATION: ("AutoModelForCausalLM", "logits"),
    FORWARD: ("AutoModelForCausalLM", "logits"),
    "text-classification": ("AutoModelForSequenceClassification", "logits"),
    "token-classification": ("AutoModelForTokenClassification", "logits"),
    "image-classification": ("AutoModelForImageClassification", "logits"),
    "fill-mask": ("AutoModelForMaskedLM", "logits"),
    "feature-extraction": ("AutoModel", "last_hidden_state"),
    ENCODER: ("AutoModel", "last_hidden_state"),
}
TASKS = tuple(TASK_MODELS)
# Architecture name endings -> task, tried in order (LMHeadModel before Model).
ARCHITECTURE_TASKS = (
    ("ForCausalLM", TEXT_GENERATION),
    ("LMHeadModel", TEXT_GENERATION),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForImageClassification", "image-classification"),
    ("ForMaskedLM", "fill-mask"),
    ("Model", "feature-extraction"),
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
VOCABULARIES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "vocab.json",
)
TOKENIZER_DIR = "tokenizer"
DEFAULT_SEQUENCE = 128
CONFIG_BYTES = 1 << 22  # a config.json beyond 4 MiB is not a config


@dataclass(frozen=True)
class FolderRequest:
    """What the user asked of a checkpoint folder: the task (None: inferred), input shapes by name, and whether
    pickled weights and the folder's own code may be run."""

    task: str | None = None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    trust_remote_code: bool = False
    trust_pickle: bool = False


def is_checkpoint_folder(path: Path) -> bool:
    """Whether `path` is a directory holding a `config.json` (a Hugging Face checkpoint folder)."""
    return path.is_dir() and (path / CONFIG).is_file()


def parse_shapes(specs: list[str] | tuple[str, ...] | None) -> dict[str, tuple[int, ...]]:
    """`--shape NAME=DIMS` (repeatable; DIMS like `1x64` or `1,3,224,224`) as name -> shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or ():
        name, _, dims = spec.partition("=")
        parts = dims.replace(",", "x").split("x")
        if not name.strip() or not dims or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
            raise UsageError(f"--shape '{spec}' is not NAME=DIMS", "write for example --shape input_ids=1x64")
        shapes[name.strip()] = tuple(int(p) for p in parts)
    return shapes


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's config.json as a dict; a UsageError when it is not a readable JSON object."""
    path = folder / CONFIG
    try:
        if path.stat().st_size > CONFIG_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes")
        config = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise UsageError(f"cannot read {path}: {str(exc)[:200]}", "pass a folder written by save_pretrained") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path} is not a JSON object", "pass a folder written by save_pretrained")
    return config


def infer_task(config: dict[str, Any]) -> str:
    """The task of a checkpoint, from its config's architecture (an encoder-decoder: its encoder)."""
    architectures = config.get("architectures") or []
    architecture = architectures[0] if isinstance(architectures, list) and architectures else None
    whole = architecture is None or str(architecture).endswith(("Model", "ForConditionalGeneration"))
    if config.get("is_encoder_decoder") and whole:
        return ENCODER
    if isinstance(architecture, str):
        for ending, task in ARCHITECTURE_TASKS:
            if architecture.endswith(ending):
                return task
    raise UsageError(
        f"cannot tell the task of this checkpoint from its architecture ({architecture or 'none in config.json'})",
        f"pass --task ({', '.join(t for t in TASKS if t != FORWARD)})",
    )


def check_code(folder: Path, config: dict[str, Any], request: FolderRequest) -> None:
    """Refuse a checkpoint that needs its own Python code, unless `--trust-remote-code`."""
    import transformers

    if request.trust_remote_code:
        return
    tokenizer_config = folder / "tokenizer_config.json"
    custom = "auto_map" in config
    if tokenizer_config.is_file() and tokenizer_config.stat().st_size < CONFIG_BYTES:
        try:
            custom = custom or "auto_map" in json.loads(tokenizer_config.read_text())
        except (OSError, ValueError, RecursionError):
            pass
    architectures = config.get("architectures") or []
    unknown = [a for a in architectures if isinstance(a, str) and not hasattr(transformers, a)]
    if custom or unknown:
        what = "asks for its own code (auto_map)" if custom else f"needs code transformers lacks ({unknown[0]})"
        raise UsageError(
            f"{folder} {what}: loading it would run the Python files of the folder",
            "pass --trust-remote-code only for a checkpoint you trust (its code runs as you)",
        )


def check_weights(folder: Path, request: FolderRequest) -> bool:
    """Whether the weights are safetensors (True) or pickled files the user trusts (False); a UsageError when
    there are none, or only pickled ones without `--trust-pickle`."""
    if any(folder.glob("*.safetensors")):
        return True
    pickled = sorted(p.name for p in folder.glob("*.bin"))
    if not pickled:
        raise UsageError(f"{folder} holds no weights (*.safetensors)", "save the model there with save_pretrained")
    if not request.trust_pickle:
        raise UsageError(
            f"{folder} holds its weights as pickles only ({', '.join(pickled[:3])}): unpickling them can run code",
            "convert them to safetensors (load the model where you trust it and save_pretrained it again), or "
            "pass --trust-pickle for a checkpoint you trust",
        )
    return False


def load_folder(folder: Path, request: FolderRequest) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, Any]]:
    """The model of a checkpoint folder for its task, its example inputs, and what the manifest records of it
    (`task`, `architecture`, `input_shapes`). For text generation the module is the causal LM itself."""
    config = read_config(folder)
    task = request.task or infer_task(config)
    if task not in TASK_MODELS:
        raise UsageError(f"--task {task}: unknown task", f"use one of: {', '.join(TASKS)}")
    check_code(folder, config, request)
    safe = check_weights(folder, request)
    model = _from_pretrained(folder, task, config, request, safe)
    if task == ENCODER:
        if not hasattr(model, "get_encoder"):
            raise UsageError(f"{type(model).__name__} has no encoder to export", "pass another --task")
        model = model.get_encoder()
    module = model if task == TEXT_GENERATION else TaskOutputs.around(model, TASK_MODELS[task][1], task == FORWARD)
    inputs = example_inputs(model, config, module, request.shapes)
    record = {
        "folder": str(folder),
        "task": task,
        "architecture": type(model).__name__,
        "input_shapes": {name: list(t.shape) for name, t in zip(_input_names(module), inputs)},
        "tokenizer": bool(tokenizer_files(folder)),
    }
    return module.eval(), inputs, record


def _from_pretrained(folder: Path, task: str, config: dict[str, Any], request: FolderRequest, safe: bool) -> Any:
    """The checkpoint's model for `task`, in float32, weights memory-mapped from safetensors."""
    import transformers

    architectures = config.get("architectures") or []
    named = architectures[0] if architectures and request.task is None and "auto_map" not in config else None
    loader = getattr(transformers, named) if isinstance(named, str) and hasattr(transformers, named) else None
    if loader is None:  # the task's Auto class (which follows auto_map to the folder's code when that is trusted)
        loader = getattr(transformers, TASK_MODELS[task][0])
    try:
        return loader.from_pretrained(
            str(folder),
            dtype=torch.float32,
            trust_remote_code=request.trust_remote_code,
            use_safetensors=safe,
        )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"transformers cannot load {folder} as {loader.__name__}: {first}",
            "check the folder (config.json and its weights), or pass another --task",
        ) from None


class TaskOutputs(nn.Module):
    """A checkpoint's model with named tensor inputs (its `main_input_name`, and `attention_mask` for token ids)
    returning its task's output (`logits`, `last_hidden_state`) by name: what the export captures and what the
    gate runs. It only picks an output of the model; the model is called as transformers calls it."""

    def __init__(self, model: nn.Module, output: str, no_cache: bool) -> None:
        super().__init__()
        self.model = model
        self.output = output
        self.extra = {"use_cache": False} if no_cache else {}

    @staticmethod
    def around(model: nn.Module, output: str, no_cache: bool = False) -> TaskOutputs:
        """The wrapper whose `forward` takes the model's main input (and its attention mask, where it has one)."""
        main = getattr(model, "main_input_name", "input_ids")
        if main == "input_ids":
            takes_mask = "attention_mask" in inspect.signature(model.forward).parameters
            return (TokensAndMask if takes_mask else Tokens)(model, output, no_cache)
        wrappers = {"pixel_values": Pixels, "input_features": Features, "input_values": Values}
        if main not in wrappers:
            raise UsageError(f"{type(model).__name__} takes {main}, which Kiln cannot make an example of", "")
        return wrappers[main](model, output, no_cache)

    def pick(self, outputs: Any) -> dict[str, torch.Tensor]:
        """The task's output of the model's output object."""
        return {self.output: outputs[self.output]}


class TokensAndMask(TaskOutputs):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.pick(self.model(input_ids=input_ids, attention_mask=attention_mask, **self.extra))


class Tokens(TaskOutputs):
    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.pick(self.model(input_ids=input_ids, **self.extra))


class Pixels(TaskOutputs):
    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.pick(self.model(pixel_values=pixel_values))


class Features(TaskOutputs):
    def forward(self, input_features: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.pick(self.model(input_features=input_features))


class Values(TaskOutputs):
    def forward(self, input_values: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.pick(self.model(input_values=input_values))


def _input_names(module: nn.Module) -> list[str]:
    """The names `module.forward` takes its inputs by."""
    if not isinstance(module, TaskOutputs):
        return ["input_ids"]
    return [p for p in inspect.signature(module.forward).parameters]


def example_inputs(
    model: nn.Module, config: dict[str, Any], module: nn.Module, shapes: dict[str, tuple[int, ...]]
) -> tuple[torch.Tensor, ...]:
    """Example inputs from the config (token ids of min(128, max positions) with their mask, an image of the
    config's size, Whisper's mel frames), each `--shape` given overriding its input's shape."""
    names = _input_names(module)
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise UsageError(f"--shape {unknown[0]}: the model has no such input", f"its inputs: {', '.join(names)}")
    text = getattr(model, "config", None)
    text_config = text.get_text_config() if text is not None and hasattr(text, "get_text_config") else text
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for name in names:
        shape = shapes.get(name) or (shapes.get("input_ids") if name == "attention_mask" else None)
        shape = shape or _default_shape(name, config, text_config)
        if name == "input_ids":
            vocab = int(getattr(text_config, "vocab_size", None) or config.get("vocab_size") or 2)
            inputs.append(torch.randint(0, vocab, shape, generator=generator))
        elif name == "attention_mask":
            inputs.append(torch.ones(shape, dtype=torch.int64))
        else:
            inputs.append(torch.randn(shape, generator=generator))
    return tuple(inputs)


def _default_shape(name: str, config: dict[str, Any], text_config: Any) -> tuple[int, ...]:
    """The example shape of one input, from the config."""
    if name in ("input_ids", "attention_mask"):
        positions = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
        return (1, min(DEFAULT_SEQUENCE, int(positions or DEFAULT_SEQUENCE)))
    if name == "pixel_values":
        size = config.get("image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        return (1, int(config.get("num_channels", 3)), int(height), int(width))
    if name == "input_features":  # Whisper: mel bins x twice the encoder's positions (3000 frames for 1500)
        return (1, int(config.get("num_mel_bins", 80)), 2 * int(config.get("max_source_positions", 1500)))
    return (1, 16000)  # raw audio, one second at 16 kHz


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files of a checkpoint folder (regular files only); none when it has no vocabulary file. They
    are copied into the export as they are, so a link among them must stay inside the folder, or, for a folder of
    the Hugging Face hub's cache (`snapshots/REVISION/`, whose files link to `../../blobs/`), inside that model's
    cache directory: a link elsewhere is a UsageError, never followed into the export."""
    root = folder.parent.parent if folder.parent.name == "snapshots" else folder
    present = [folder / name for name in TOKENIZER_FILES if (folder / name).is_symlink() or (folder / name).exists()]
    for path in present:
        within(path, root)
        if not path.is_file():
            raise refused(path, "not a regular file")
    if not any(path.name in VOCABULARIES for path in present):
        return []
    return present


def load_tokenizer(directory: Path) -> Any:
    """The tokenizer an export carries (`tokenizer/`), loaded by transformers without running any code of it; a
    UsageError when the export has none."""
    from transformers import AutoTokenizer

    path = directory / TOKENIZER_DIR
    if not path.is_dir():
        raise UsageError(
            f"{directory} carries no tokenizer (its source was not a checkpoint folder with one)",
            "pass token ids instead: --generate 1,5,9,3",
        )
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:
        raise UsageError(
            f"the tokenizer of {directory} cannot be loaded: {type(exc).__name__}: {str(exc)[:200]}",
            "pass token ids instead: --generate 1,5,9,3",
        ) from None
