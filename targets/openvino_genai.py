"""The `openvino` target's text-generation route, `openvino-genai`: OpenVINO GenAI's own LLM format, the folder that
`openvino_genai.LLMPipeline(folder, "CPU")` and optimum-intel's `OVModelForCausalLM.from_pretrained(folder)` load.

- `openvino_model.xml` / `.bin`: the IR of Kiln's step graph, each attention as one `ScaledDotProductAttention`
  (`fuse_attention`: what the CPU plugin fuses with the cache it keeps), made **stateful** as optimum-intel makes
  it: a `beam_idx` input gathers every cache tensor along the batch (beam reordering), and OpenVINO's
  `MakeStateful` turns each `past_key_values.{i}.key|value` input and its `present.{i}.key|value` output into one
  internal variable, so the runtime keeps the cache between calls (inputs: `input_ids`, `attention_mask`,
  `position_ids`, `beam_idx`; output: `logits`). A new sequence starts with `reset_state()`.
- `config.json`, `generation_config.json` (the model's own), and when the model has a tokenizer
  (`kiln.compiler.generation.language_model`): its files and `openvino_tokenizer.xml` / `openvino_detokenizer.xml`
  converted by openvino-tokenizers.

Kiln's runner (`OpenVinoStatefulRunner`) runs the same compiled model two ways: its `run` takes the step graph's
feeds, the cache included (the parity gate's decoding states: the variables are set from the fed cache and read
back as `present.*`), and its `decoder()` decodes as OpenVINO GenAI does, the cache never leaving the runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import error_text
from kiln.targets.base import Route, Runner

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import numpy as np
    import openvino as ov
    from kiln.compiler.capture.language_model import LanguageModel
    from kiln.compiler.types import Manifest
    from kiln.targets.base import BuildOutput

LLM_FORMAT = "openvino-genai"  # target_info["llm_format"] of an artifact built by this route
GENAI_ROUTE = Route(LLM_FORMAT, "onnx", "dynamo", llm_format=True)
ATTENTION_BACKEND = "ATTENTION_BACKEND"  # an LLMPipeline property: SDPA (the stateful model) or PA (paged attention)
PIPELINE_PROPERTIES = (ATTENTION_BACKEND,)  # runtime_config keys for LLMPipeline, not the CPU plugin
MODEL_FILE = "openvino_model.xml"
TOKENIZER_FILE, DETOKENIZER_FILE = "openvino_tokenizer.xml", "openvino_detokenizer.xml"
BEAM_INPUT = "beam_idx"
CACHE_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."


def make_stateful(ov_model: ov.Model) -> list[str]:
    """Make `ov_model` (Kiln's step graph: `past_key_values.{i}.*` inputs, `present.{i}.*` outputs) stateful in
    place, as optimum-intel does: the `beam_idx` input with a Gather on every cache input, then MakeStateful, then
    each variable's initial value built as zeros of the batch of `input_ids`; the cache input names, in order."""
    import numpy as np
    import openvino as ov
    from openvino import opset13
    from openvino._offline_transformations import apply_make_stateful_transformation

    cache = [i.get_any_name() for i in ov_model.inputs if i.get_any_name().startswith(CACHE_PREFIX)]
    batch = ov_model.input("input_ids").get_partial_shape()[0]
    beam = opset13.parameter(ov.PartialShape([batch]), ov.Type.i32, name=BEAM_INPUT)
    beam.output(0).get_tensor().set_names({BEAM_INPUT})
    ov_model.add_parameters([beam])
    for name in cache:
        port = ov_model.input(name)
        consumers = list(port.get_target_inputs())
        gathered = opset13.gather(port, beam, opset13.constant(np.int64(0)))
        for consumer in consumers:
            consumer.replace_source_output(gathered.output(0))
    ov_model.validate_nodes_and_infer_types()
    apply_make_stateful_transformation(ov_model, {n: n.replace(CACHE_PREFIX, PRESENT_PREFIX, 1) for n in cache})
    ids_shape = opset13.shape_of(ov_model.input("input_ids"), output_type="i64")
    rows = opset13.gather(ids_shape, opset13.constant(np.array([0], np.int64)), opset13.constant(np.int64(0)))
    for op in ov_model.get_ops():
        if op.get_type_name() == "ReadValue":
            dims: list[Any] = [d.get_min_length() for d in op.get_output_partial_shape(0)]
            parts = [rows] + [opset13.constant(np.array([d], np.int64)) for d in dims[1:]]
            zeros = opset13.broadcast(opset13.constant(0.0, op.get_output_element_type(0)), opset13.concat(parts, 0))
            op.set_arguments([zeros])
    ov_model.validate_nodes_and_infer_types()
    return cache


def fuse_attention(ov_model: ov.Model) -> int:
    """Each attention of `ov_model` (Kiln's step graph: `MatMul(q, k^T)`, the mask's `Add`, `Softmax`, `MatMul` with
    the values) as one `ScaledDotProductAttention`, which the CPU plugin fuses with a stateful cache into its own
    attention over a cache kept in place; the count fused. An attention whose scores are soft-capped (a Tanh
    between the MatMul and the Add), or read otherwise, is left as it is."""
    import numpy as np
    from openvino import opset13

    fused = 0
    for softmax in [op for op in ov_model.get_ordered_ops() if op.get_type_name() == "Softmax"]:
        add = softmax.input_value(0).get_node()
        weighted = [t.get_node() for t in softmax.output(0).get_target_inputs()]
        if add.get_type_name() != "Add" or len(weighted) != 1 or not _plain_matmul(weighted[0]):
            continue
        scores = next((add.input_value(i) for i in (0, 1) if _plain_matmul(add.input_value(i).get_node())), None)
        if scores is None or weighted[0].input_value(0).get_node() is not softmax:
            continue
        mask = add.input_value(1) if add.input_value(0) == scores else add.input_value(0)
        query, query_scale = _unscaled(scores.get_node().input_value(0))
        key, key_scale = _unscaled(scores.get_node().input_value(1))
        key = _untransposed(key)
        value = weighted[0].input_value(1)
        if key is None or any(v.get_partial_shape().rank.get_length() != 4 for v in (query, key, value)):
            continue
        scale = opset13.constant(np.float32(query_scale * key_scale), query.get_element_type())
        attention = opset13.scaled_dot_product_attention(query, key, value, mask, scale, causal=False)
        weighted[0].output(0).replace(attention.output(0))
        fused += 1
    if fused:
        ov_model.validate_nodes_and_infer_types()
    return fused


def _plain_matmul(node: Any) -> bool:
    attributes = node.get_attributes() if node.get_type_name() == "MatMul" else {}
    return bool(attributes) and not attributes["transpose_a"] and not attributes["transpose_b"]


def _unscaled(output: Any) -> tuple[Any, float]:
    """`output` before the Multiplys by scalar constants that make it, and their product."""
    import numpy as np

    scale = 1.0
    while output.get_node().get_type_name() == "Multiply":
        node = output.get_node()
        constant = next((i for i in (0, 1) if node.input_value(i).get_node().get_type_name() == "Constant"), None)
        if constant is None:
            break
        data = node.input_value(constant).get_node().get_data()
        if np.asarray(data).size != 1:
            break
        scale *= float(np.asarray(data).reshape(-1)[0])
        output = node.input_value(1 - constant)
    return output, scale


def _untransposed(output: Any) -> Any:
    """The [B, H, T, D] keys whose transpose [B, H, D, T] `output` is: a Transpose of the last two axes, or the
    exporter's 3-D form of it (Reshape to [B*H, T, D], Transpose (0, 2, 1), Reshape to [B, H, D, T]); else None."""
    import numpy as np

    node = output.get_node()
    if node.get_type_name() == "Transpose":
        order = node.input_value(1).get_node()
        if order.get_type_name() == "Constant" and list(np.asarray(order.get_data())) == [0, 1, 3, 2]:
            return node.input_value(0)
        return None
    chain = ["Reshape", "Transpose", "Reshape"]
    for kind in chain:
        if node.get_type_name() != kind:
            return None
        if kind == "Transpose":
            order = node.input_value(1).get_node()
            if order.get_type_name() != "Constant" or list(np.asarray(order.get_data())) != [0, 2, 1]:
                return None
        output, node = node.input_value(0), node.input_value(0).get_node()
    return output


def write_genai_folder(
    ov_model: ov.Model, directory: Path, language_model: LanguageModel | None, precision_config: dict[str, Any],
    built: BuildOutput, fp16_weights: bool = False,
) -> None:  # fmt: skip
    """The `openvino-genai` folder of a converted step graph (quantized already, if asked): the stateful IR, the
    model's config files and its tokenizer converted; what it wrote into `built` (info, notes)."""
    import openvino as ov

    if language_model is None:
        from kiln.compiler.errors import UnsupportedOpError

        raise UnsupportedOpError(f"the {LLM_FORMAT} route needs a text-generation export of a transformers causal LM")
    attention = fuse_attention(ov_model)
    cache = make_stateful(ov_model)
    if any(window is not None for window in language_model.windows):
        precision_config[ATTENTION_BACKEND] = "SDPA"
        built.notes.append(
            "LLMPipeline's default PagedAttention backend gives other tokens once a sliding window is crossed: "
            f"runtime_config asks {ATTENTION_BACKEND}=SDPA (the stateful model as gated)"
        )
    for key in ("KV_CACHE_PRECISION",):  # what LLMPipeline reads from the model itself (runtime_options)
        if key in precision_config:
            ov_model.set_rt_info(str(precision_config[key]), ["runtime_options", key])
    ov.save_model(ov_model, str(directory / MODEL_FILE), compress_to_fp16=fp16_weights)
    written = language_model.write_config_files(directory)
    converted, note = convert_tokenizer(language_model, directory)
    if note:
        built.notes.append(note)
    built.info |= {
        "llm_format": LLM_FORMAT,
        "stateful": {
            "inputs": [i.get_any_name() for i in ov_model.inputs],
            "outputs": [o.get_any_name() for o in ov_model.outputs],
            "states": len(cache),
            "fused_attention": attention,
        },
        "tokenizer": language_model.tokenizer_record(converted),
        "config_files": written,
    }


def convert_tokenizer(language_model: LanguageModel, directory: Path) -> tuple[list[str], str]:
    """The model's tokenizer as OpenVINO models (openvino-tokenizers), next to the LLM; the files written and a note
    when none was written (no tokenizer, or one openvino-tokenizers cannot convert: the LLM still takes ids)."""
    import openvino as ov

    if language_model.tokenizer is None:
        return [], f"no tokenizer converted ({language_model.tokenizer_origin}): LLMPipeline takes token ids"
    try:
        from openvino_tokenizers import convert_tokenizer as convert

        tokenizer, detokenizer = convert(language_model.tokenizer, with_detokenizer=True)
    except ImportError:
        return [], "no tokenizer converted: openvino-tokenizers is not installed (pip install openvino-tokenizers)"
    except Exception as exc:  # a tokenizer the converter does not know: the LLM itself is still usable
        return [], f"the tokenizer was not converted by openvino-tokenizers: {error_text(exc)}"
    ov.save_model(tokenizer, str(directory / TOKENIZER_FILE))
    ov.save_model(detokenizer, str(directory / DETOKENIZER_FILE))
    return [TOKENIZER_FILE, DETOKENIZER_FILE], ""


def plugin_config(runtime_config: dict[str, Any]) -> dict[str, Any]:
    """The CPU plugin's part of an artifact's runtime_config (LLMPipeline's own properties left out)."""
    return {k: v for k, v in runtime_config.items() if k not in PIPELINE_PROPERTIES}


class OpenVinoStatefulRunner(Runner):
    """Runs an `openvino-genai` artifact (the stateful IR) on the CPU plugin."""

    thread_control = "openvino INFERENCE_NUM_THREADS"
    keeps_cache = True

    def __init__(self, directory: Path, manifest: Manifest):
        import openvino as ov

        config = plugin_config(manifest.runtime_config)
        self.compiled = ov.Core().compile_model(str(directory / MODEL_FILE), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.inputs, self.outputs = manifest.inputs, manifest.outputs
        self.cache = [s.name for s in manifest.inputs if s.name.startswith(CACHE_PREFIX)]
        names = {f"{n}{n.replace(CACHE_PREFIX, PRESENT_PREFIX, 1)}": n for n in self.cache}
        self.states = {names[s.name]: s for s in self.request.query_state() if s.name in names}
        if len(self.states) != len(self.cache):
            from kiln.compiler.errors import UsageError

            raise UsageError(
                f"{directory / MODEL_FILE} keeps {len(self.request.query_state())} states where the manifest lists "
                f"{len(self.cache)} cache inputs",
                "re-export the model (the IR is not the one the manifest describes)",
            )

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The step graph's outputs for its feeds. With the cache fed (`past_key_values.*`), the variables are set
        from it and returned as `present.*` after the step; without it, the step continues the state the
        previous call left (a new sequence, past length 0, starts from an empty one)."""
        import numpy as np
        import openvino as ov

        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        fed = [n for n in self.cache if n in feeds]
        if fed:
            for name in self.cache:
                self.states[name].state = ov.Tensor(np.ascontiguousarray(feeds[name]))
        elif mask.shape[1] == ids.shape[1]:
            self.request.reset_state()
        names = ("input_ids", "attention_mask", "position_ids")
        step: dict[str, np.ndarray] = {n: feeds[n] for n in names if n in feeds}
        step[BEAM_INPUT] = np.arange(ids.shape[0], dtype=np.int32)
        results = self.request.infer(step)
        outputs = {"logits": results[self.compiled.output("logits")].copy()}
        if fed:
            for name in self.cache:
                outputs[name.replace(CACHE_PREFIX, PRESENT_PREFIX, 1)] = self.states[name].state.data.copy()
        return outputs

    def decoder(self) -> Callable[[Sequence[int]], np.ndarray]:
        """A new sequence on its own infer request (its own state), decoded as LLMPipeline does."""
        return _StatefulDecoder(self.compiled.create_infer_request())

    def runtime_info(self) -> dict[str, Any]:
        """The precisions the CPU plugin computes and keeps the cache in, and its threads."""
        import openvino as ov

        def name(value: Any) -> str:
            return value.get_type_name() if hasattr(value, "get_type_name") else str(value)

        return {
            "runtime": f"openvino {ov.get_version()} (stateful)",
            "inference_precision": name(self.compiled.get_property("INFERENCE_PRECISION_HINT")),
            "kv_cache_precision": name(self.compiled.get_property("KV_CACHE_PRECISION")),
            "threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS")),
        }


class _StatefulDecoder:
    """One sequence decoded on a stateful model's infer request: the ids with a mask of ones over every position so
    far, their positions, and `beam_idx` 0; the last position's logits."""

    def __init__(self, request: Any):
        self.request, self.length = request, 0
        request.reset_state()

    def __call__(self, ids: Sequence[int]) -> np.ndarray:
        import numpy as np

        seq = len(ids)
        feeds = {
            "input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.ones((1, self.length + seq), np.int64),
            "position_ids": np.arange(self.length, self.length + seq, dtype=np.int64)[None],
            BEAM_INPUT: np.zeros(1, np.int32),
        }
        results = self.request.infer(feeds)
        self.length += seq
        return np.asarray(results["logits"][0, -1]).copy()
