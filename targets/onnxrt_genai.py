"""The `onnx` target's text-generation route, `onnxruntime-genai`: the folder `onnxruntime_genai.Model(folder)`
loads and its `Generator` runs.

- `model.onnx`: Kiln's step graph (`input_ids`, `attention_mask`, `position_ids`, `past_key_values.{i}.key|value`
  -> `logits`, `present.{i}.key|value`), rewritten for ONNX Runtime where a fused op helps
  (`kiln.passes.genai_attention`: each layer's attention and its cache append as one `GroupQueryAttention`, the
  RMS norms as `SimplifiedLayerNormalization`); with a fused attention the cache is one buffer of the model's
  length that the runtime appends to in place (`past_present_share_buffer`).
- `genai_config.json`: the decoder's file, I/O names, heads and layers, the special tokens and greedy search
  defaults; `config.json`, `generation_config.json` and, when the model has one, the tokenizer's files
  (`tokenizer.json`, which onnxruntime-genai's `Tokenizer` reads).

Kiln's runner (`kiln.targets.onnxrt.OnnxGenAIRunner`) runs the graph two ways: `run` with ONNX Runtime on the step
graph's feeds (the parity gate's decoding states, the cache fed in and out), and `decoder()` with onnxruntime-genai's
own `Generator` (`append_tokens`, `get_logits`), the cache kept by the runtime, as users run it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.targets.base import Route

if TYPE_CHECKING:
    from kiln.compiler.capture.language_model import LanguageModel
    from kiln.passes.genai_attention import Fusion
    from kiln.targets.base import BuildOutput

LLM_FORMAT = "onnxruntime-genai"  # target_info["llm_format"] of an artifact built by this route
GENAI_ROUTE = Route(LLM_FORMAT, "onnx", "dynamo", llm_format=True)
CONFIG_FILE = "genai_config.json"
# The decoder-only model types onnxruntime-genai 0.18 knows (its `model.type`); another model's graph runs as its
# generic decoder-only model, named "llama" (Kiln's graph carries everything model-specific itself).
GENAI_TYPES = (
    "chatglm", "ernie4_5", "gemma", "gemma2", "gemma3_text", "granite", "internlm2", "llama", "mistral",
    "nemotron", "olmo", "phi3", "qwen2", "qwen3", "smollm3",
)  # fmt: skip
GENERIC_TYPE = "llama"


def genai_config(language_model: LanguageModel, graph_file: str, shared_buffer: bool) -> dict[str, Any]:
    """genai_config.json for Kiln's step graph `graph_file` of `language_model` (`shared_buffer`: the graph appends
    to a cache buffer of the model's length in place, as a fused GroupQueryAttention does)."""
    known = language_model.model_type in GENAI_TYPES
    return {
        "model": {
            "type": language_model.model_type if known else GENERIC_TYPE,
            "bos_token_id": language_model.bos if language_model.bos is not None else 0,
            "eos_token_id": language_model.eos[0] if len(language_model.eos) == 1 else language_model.eos,
            "pad_token_id": language_model.pad if language_model.pad is not None else 0,
            "vocab_size": language_model.vocab,
            "context_length": language_model.context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": graph_file,
                "head_size": language_model.head_dim,
                "hidden_size": language_model.hidden,
                "num_attention_heads": language_model.heads,
                "num_key_value_heads": language_model.kv_heads,
                "num_hidden_layers": language_model.layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "max_length": language_model.context,
            "min_length": 0,
            "past_present_share_buffer": shared_buffer,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_folder(graph: Path, language_model: LanguageModel | None, built: BuildOutput) -> None:
    """Beside the built step graph `graph` (rewritten in place): genai_config.json, the model's config files and
    tokenizer; what it wrote into `built` (info, notes)."""
    if language_model is None:
        from kiln.compiler.errors import UnsupportedOpError

        raise UnsupportedOpError(f"the {LLM_FORMAT} route needs a text-generation export of a transformers causal LM")
    directory = graph.parent
    fusion = rewrite_graph(graph, language_model)
    built.info["genai_rewrite"] = fusion.to_dict()
    if fusion.skipped:
        built.notes.append(
            f"{len(fusion.skipped)} attention layer(s) left unfused for onnxruntime-genai: "
            + "; ".join(f"layer {k}: {v}" for k, v in list(fusion.skipped.items())[:2])
        )
    # A fused attention appends to the cache in place: the runtime passes one buffer as past and present. A graph
    # with any layer left as Concat(past, new) needs past and present apart.
    shared = fusion.fused_attention > 0 and not fusion.skipped
    config = genai_config(language_model, graph.name, shared)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    written = language_model.write_config_files(directory)
    if language_model.model_type not in GENAI_TYPES:
        built.notes.append(
            f"onnxruntime-genai has no model type {language_model.model_type!r}: {CONFIG_FILE} names its generic "
            f"decoder-only model ({GENERIC_TYPE!r}), which runs Kiln's graph as it is"
        )
    if language_model.tokenizer is None:
        built.notes.append(f"no tokenizer written ({language_model.tokenizer_origin}): the Generator takes token ids")
    built.info |= {
        "llm_format": LLM_FORMAT,
        "genai_config": {"type": config["model"]["type"], "past_present_share_buffer": shared},
        "tokenizer": language_model.tokenizer_record([n for n in written if n.startswith("tokenizer")]),
        "config_files": [CONFIG_FILE, *written],
    }


def rewrite_graph(path: Path, language_model: LanguageModel) -> Fusion:
    """The step graph at `path` rewritten in place for onnxruntime-genai (`kiln.passes.genai_attention`)."""
    import onnx_ir as ir
    from kiln.compiler.large_graphs import EXTERNAL_DATA_BYTES, data_locations, load_ir
    from kiln.passes.genai_attention import Attention, rewrite_for_genai

    read = data_locations(path)
    model = load_ir(path)
    windows = language_model.windows or (None,) * language_model.layers
    attention = Attention(
        language_model.heads, language_model.kv_heads, language_model.head_dim, windows, language_model.context
    )
    fusion = rewrite_for_genai(model, attention)
    if fusion.fused_attention or fusion.rms_norms:
        data = path.name + ".data"
        weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)
        large = weights > EXTERNAL_DATA_BYTES  # as save_onnx: external data written tensor by tensor
        written = path.parent / "rewritten"  # beside, not over, the files the lazy initializers still read
        written.mkdir()
        ir.save(model, str(written / path.name), external_data=data if large else None)
        del model
        for name in (path.name, data):
            if (written / name).exists():
                (written / name).replace(path.parent / name)
        kept = data_locations(path)
        for name in read | {data}:  # the data files only the old graph read (e.g. save_onnx's `.extra.data`)
            if Path(name).name == name and name not in kept and (path.parent / name).is_file():
                (path.parent / name).unlink()
        written.rmdir()
    return fusion
