"""Text-generation export of a `transformers` causal LM: the decoder with its KV cache as named inputs and outputs,
and the greedy loop that runs it (parity, `kiln run --generate`, benchmarks/bench_generate.py).

One graph with a dynamic past length, not two (prefill + decode): the prompt is run with an empty cache (past
length 0), each next token with the cache the previous step returned. One graph means one file and one set of weights
(two graphs would duplicate them or need shared external data), one build and one parity gate per target; ONNX
Runtime and OpenVINO both take a zero-length past (Optimum's merged decoder and OpenVINO GenAI's stateless model feed
the same empty cache). torch.export is traced at a past of 5 with `Dim("past", min=0)`, so the 0 is not specialized.

I/O (batch, seq, past and total = past + seq are named dynamic dims):
`input_ids[batch, seq]`, `attention_mask[batch, total]`, `position_ids[batch, seq]`,
`past_key_values.{i}.key|value[batch, kv_heads, past, head_dim]` -> `logits[batch, seq, vocab]`,
`present.{i}.key|value[batch, kv_heads, total, head_dim]`.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from kiln.compiler.errors import UsageError
from kiln.compiler.generation.attention_masks import AttentionPattern
from kiln.compiler.generation.causal_lm import (
    cache_shape,
    decoder_source,
    decoder_spec,
    is_causal_lm,
)
from kiln.compiler.generation.decoding import FORWARD, TASKS, TEXT_GENERATION, decoding_of, input_names, layout_of
from kiln.compiler.generation.llm_format import GENAI, language_model_of
from kiln.compiler.generation.static_kv_cache import name_static_io, static_generation_source
from torch import nn

if TYPE_CHECKING:
    from kiln.compiler.capture.program import CapturedModel
    from kiln.compiler.capture.sources import ModelSource
    from kiln.compiler.export.artifacts import Artifact
    from kiln.compiler.export.options import ExportOptions
    from kiln.compiler.generation.stream_gate import TokenStream
    from kiln.compiler.parity.gate import ParitySamples
    from kiln.compiler.progress import Progress
    from kiln.compiler.types import ParityReport
    from kiln.targets.base import Target

# What a target's `kv_cache` says it takes: a growing cache (one graph, the past length dynamic) or a static one (a
# fixed-length cache, all shapes static).
GROWING, STATIC = "growing", "static"
GENERATION_NOTE = "exported for text generation, with its KV cache (--task forward: one full-sequence forward)"
_CAPTURE = {"batch": 2, "seq": 3, "past": 5}  # example sizes at capture: none 0 or 1 (torch.export specializes those)


def wants_generation(
    source: ModelSource, task: str | None, cache_size: int | None = None, llm_format: str | None = None
) -> bool:
    """Whether to export `source` for text generation: `--task text-generation`, or (no --task) a causal LM;
    `--cache-size` and `--llm-format` on any other export are refused rather than ignored."""
    from kiln.compiler.capture.hf_folder import TASKS as FOLDER_TASKS

    if task is not None and task not in (*TASKS, *FOLDER_TASKS):
        raise UsageError(f"--task {task}: unknown task", f"use one of: {', '.join(FOLDER_TASKS)}")
    causal = source.kind == "torch" and source.exported is None and is_causal_lm(source.module)
    if task == TEXT_GENERATION and not causal:
        raise UsageError(
            f"--task {TEXT_GENERATION} needs a transformers causal LM (e.g. LlamaForCausalLM); "
            f"{source.description} is not one",
            "return the *ForCausalLM model itself from the factory, or drop --task",
        )
    wanted = causal and task != FORWARD
    if cache_size is not None and not wanted:
        raise UsageError(
            f"--cache-size applies to a text-generation export only, and {source.description} is not exported so",
            "drop --cache-size (or export a transformers causal LM to a static-cache target: tflite, tpu, executorch)",
        )
    if llm_format is not None and not wanted:
        raise UsageError(
            f"--llm-format applies to a text-generation export only, and {source.description} is not exported so",
            "drop --llm-format",
        )
    return wanted


def check_generation_request(
    targets: list[Target],
    asked_all: bool,
    precision_of: Callable[[Target], str],
    dynamic: object,
    cache_size: int | None = None,
) -> list[Target]:
    """The targets of a generation export (`--target all`: those that take a growing cache); refuse targets,
    precisions and flags it does not build, and a mix of growing-cache and static-cache targets, before any
    capture work. What each target takes is its `kv_cache` (kiln.targets.base.Target)."""
    from kiln.targets import TARGETS

    by_cache = {kind: sorted(t.name for t in TARGETS if t.kv_cache == kind) for kind in (GROWING, STATIC)}
    if asked_all:
        targets = [t for t in targets if t.kv_cache == GROWING]
    other = [t.name for t in targets if t.kv_cache is None]
    if other:
        raise UsageError(
            f"text-generation export supports {', '.join(by_cache[GROWING])} (a growing KV cache) and "
            f"{', '.join(by_cache[STATIC])} (a static one), not {', '.join(other)}",
            f"use --target {','.join(by_cache[GROWING])}, or --task forward for one full-sequence forward",
        )
    static = [t.name for t in targets if t.kv_cache == STATIC]
    growing = [t.name for t in targets if t.kv_cache == GROWING]
    if static and growing:
        raise UsageError(
            f"{', '.join(static)} {'take' if len(static) > 1 else 'takes'} a static KV cache and "
            f"{', '.join(growing)} a growing one: two different graphs, not one export",
            f"export them separately (--target {','.join(static)}, then --target {','.join(growing)})",
        )
    if cache_size is not None and not static:
        raise UsageError(
            f"--cache-size applies to a static KV cache ({', '.join(by_cache[STATIC])}) only",
            "drop --cache-size for this target",
        )
    for target in targets:
        offered = ("fp32", *target.weight_only)
        if precision_of(target) not in offered:
            why = target.precision_notes.get(precision_of(target))
            raise UsageError(
                f"text-generation export to {target.name} is built at {', '.join(offered)}, not "
                f"{precision_of(target)}" + (f": {why}" if why else ""),
                f"use --precision {' or '.join(offered)} for {target.name}, or --task forward",
            )
    if dynamic is not None:
        raise UsageError(
            "--dynamic/--dynamic-batch do not apply to a text-generation export: its shapes are set by the export",
            "drop --dynamic and --dynamic-batch",
        )
    return targets


def generation_targets(
    source: ModelSource, chosen: list[Target], asked: str | list[str], options: ExportOptions, say: Callable[[str], Any]
) -> list[Target]:
    """The targets of a generation export, checked before any work (`check_generation_request`); says when the
    task was detected rather than asked for."""
    asked_all = isinstance(asked, str) and asked.strip().lower() == "all"
    chosen = check_generation_request(
        chosen, asked_all, options.precision_for, options.shapes.dynamic, options.source.cache_size
    )
    check_weight_request(chosen, options, generation=True)
    if options.parity.inputs_files:
        raise UsageError(
            "--inputs does not apply to a text-generation export: its parity sets are decoding states the model "
            "itself makes (a cache from a file has no token history to run the model on)",
            "drop --inputs",
        )
    if options.source.llm_format == GENAI:
        plain = [t.name for t in chosen if not any(r.llm_format for r in t.routes())]
        if plain:
            raise UsageError(
                f"--llm-format genai: {', '.join(plain)} {'has' if len(plain) == 1 else 'have'} no runtime LLM "
                "format (onnx writes an onnxruntime-genai folder, openvino OpenVINO GenAI's stateful model)",
                "drop --llm-format for these targets",
            )
    if options.source.task is None:
        say(f"{type(source.module).__name__} is a causal LM: {GENERATION_NOTE}")
    return chosen


def check_weight_request(targets: list[Target], options: ExportOptions, generation: bool) -> None:
    """Refuse, before any capture work, what the weight-only int8/int4 of text generation does not take: int4 or
    `--group-size`/`--weights` on an export that is not text generation (`generation` False), the flags at fp32,
    asymmetric weights on a toolchain without them, and `--calib` (weight-only quantization calibrates nothing)."""
    from kiln.compiler.quantization.weight_only import weight_flags_refusal

    for target in targets:
        precision = options.precision_for(target)
        if precision == "int4" and not generation:
            raise UsageError(
                f"--precision int4 is the weight-only 4-bit of a text-generation export, and {target.name} is not "
                "exported for text generation here",
                "export a transformers causal LM (--task text-generation), or use int8 or int8-dynamic",
            )
        refusal = weight_flags_refusal(
            precision, options.weight_only.group_size, options.weight_only.weights, generation
        )
        if refusal:
            raise UsageError(refusal, "drop them, or export a causal LM with --precision int8 or int4")
        if generation and options.weight_only.weights == "asym" and not target.asymmetric_weights:
            raise UsageError(f"{target.name} takes symmetric weights only", f"drop --weights asym for {target.name}")
    if generation and options.calibration.spec.source is not None:
        raise UsageError(
            "--calib does not apply to a text-generation export: its int8 and int4 are weight-only (no activation "
            "ranges to calibrate)",
            "drop --calib",
        )


class CausalLMWithCache(nn.Module):
    """A causal LM taking flat tensors: the cache's tensors go in and come out by name, so that torch.export and the
    runtimes see plain tensors. Every layer keeps its whole past (a `DynamicCache` of plain layers is built inside);
    the attention masks, one per kind of layer, are built here from the positions (`AttentionPattern.masks`): a
    sliding layer sees its window, a full layer everything, and `attention_mask` drops padded keys."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        config: Any = model.config
        self.layers = int(config.num_hidden_layers)
        self.pattern = AttentionPattern.of(config)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)])
        seen = past[0].shape[2]
        query = torch.arange(input_ids.shape[1]) + seen
        keys = torch.arange(attention_mask.shape[1])
        mask = self.pattern.masks(query, keys, attention_mask != 0, past[0].dtype)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        result = {"logits": out.logits}
        for i, layer in enumerate(out.past_key_values.layers):
            result[f"present.{i}.key"], result[f"present.{i}.value"] = layer.keys, layer.values
        return result


def generation_detail(targets: list[Target]) -> str:
    """The generation stage's line: which cache the targets take."""
    if any(t.kv_cache == STATIC for t in targets):
        return "static KV-cache decode step, torch.export (all shapes static)"
    return "KV-cache wrapper, torch.export (batch, seq, past dynamic)"


def generation_source(
    source: ModelSource, targets: list[Target] | None = None, cache_size: int | None = None
) -> ModelSource:
    """`source` (a causal LM) as its cached decoder: the wrapper module, example inputs at the capture sizes, and
    the program exported with batch, seq and past dynamic (`capture` takes a source's program as it is); for
    static-shape targets (tflite, tpu) the static-cache decode step of compiler/generation/static_kv_cache.py
    instead."""
    if any(t.kv_cache == STATIC for t in targets or []):
        return static_generation_source(source, cache_size)
    assert source.module is not None
    spec = decoder_spec(source.module)  # refuses attention Kiln does not build, before any work
    wrapper = CausalLMWithCache(source.module).eval()
    config: Any = source.module.config
    layers, kv_heads, head_dim = cache_shape(config)
    batch, seq, past = _CAPTURE["batch"], _CAPTURE["seq"], _CAPTURE["past"]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(config.vocab_size), (batch, seq), generator=generator)
    positions = torch.arange(past, past + seq).repeat(batch, 1)
    cache = [torch.randn(batch, kv_heads, past, head_dim, generator=generator) for _ in range(2 * layers)]
    dtype = next(source.module.parameters()).dtype
    examples = (ids, torch.ones(batch, past + seq, dtype=torch.long), positions, *[t.to(dtype) for t in cache])
    max_len = spec.max_positions
    dims = {
        "batch": torch.export.Dim("batch", min=1, max=1024),
        "seq": torch.export.Dim("seq", min=1, max=max_len),
        "past": torch.export.Dim("past", min=0, max=max_len),
    }
    shapes = (
        {0: dims["batch"], 1: dims["seq"]},
        {0: dims["batch"], 1: torch.export.Dim.DYNAMIC},
        {0: dims["batch"], 1: dims["seq"]},
        tuple({0: dims["batch"], 2: dims["past"]} for _ in cache),
    )
    generated = decoder_source(source, wrapper, examples, "dynamic KV cache", shapes)
    assert generated.decoder is not None
    return replace(generated, language_model=language_model_of(source.module, generated.decoder))


def name_generation_io(captured: CapturedModel) -> CapturedModel:
    """The captured model with its ONNX inputs named `past_key_values.{i}.key|value` (not the program's `past_0`)
    and its dynamic dims named batch/seq/past/total (not the exporter's `s43`); specs read back from the file.
    A static-cache capture (no ONNX file: tflite, tpu) gets its specs renamed and its prefill signature
    (`static_kv_cache.name_static_io`)."""
    import onnx
    from kiln.compiler.capture.onnx_files import onnx_signature

    if captured.onnx_path is None:
        return name_static_io(captured)
    proto = onnx.load(str(captured.onnx_path), load_external_data=False)
    graph = proto.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    names = input_names((len(inputs) - 3) // 2)
    renamed = {value.name: name for value, name in zip(inputs, names)}
    symbols: dict[str, str] = {}
    for value, axes in zip(inputs, [("batch", "seq"), ("batch", "total"), ("batch", "seq")]):
        for dim, name in zip(value.type.tensor_type.shape.dim, axes):
            symbols.setdefault(dim.dim_param, name)
    if len(inputs) > 3:
        symbols.setdefault(inputs[3].type.tensor_type.shape.dim[2].dim_param, "past")
    symbols.pop("", None)
    for value in inputs:
        value.name = renamed[value.name]
    for node in _all_nodes(graph):
        node.input[:] = [renamed.get(name, name) for name in node.input]
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, symbols)) + r")\b") if symbols else None
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if pattern is not None and dim.dim_param:
                dim.dim_param = pattern.sub(lambda m: symbols[m[1]], dim.dim_param).replace(" ", "")
    onnx.save(proto, str(captured.onnx_path))
    specs_in, specs_out, _ = onnx_signature(captured.onnx_path, torch_layout=False)
    return replace(captured, inputs=specs_in, outputs=specs_out)


def _all_nodes(graph: Any) -> list[Any]:
    """Every node of an ONNX graph, those of subgraphs (If/Loop bodies) included."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            for sub in [attribute.g, *attribute.graphs] if attribute.HasField("g") else attribute.graphs:
                nodes.extend(_all_nodes(sub))
    return nodes


def skip_localization(options: ExportOptions, report: ParityReport, progress: Progress) -> ExportOptions:
    """The options with localization off for a text-generation export, said when it would have run: the divergence
    probes feed the FX program by its own input names (`past_0`), which the renamed cache inputs no longer match."""
    if options.parity.localize is False or (options.parity.localize is None and report.passed):
        return options
    progress.warn(
        "localization does not support text-generation exports yet: not localized (its prefix probes would feed "
        "the captured program's own cache inputs, `past_0`..., not the exported `past_key_values.{i}.key|value`)"
    )
    return replace(options, parity=replace(options.parity, localize=False))


def generation_samples(source: ModelSource, captured: CapturedModel, options: ExportOptions) -> ParitySamples:
    """The parity sets of a text-generation export: decoding states made by the user's model
    (`kiln.compiler.generation.gate.decoding_samples`), `--samples` of them at least."""
    from kiln.compiler.generation.gate import decoding_samples
    from kiln.compiler.generation.reference import CausalLMReference

    assert source.reference_model is not None and source.decoder is not None
    layout = layout_of(captured.inputs, source.decoder)
    return decoding_samples(CausalLMReference(source.reference_model), layout, source.decoder, options.parity.samples)


def generation_streams(source: ModelSource, captured: CapturedModel) -> list[TokenStream]:
    """The token streams a weight-quantized export is judged on (`stream_gate.reference_streams`), made once by the
    user's model for every target of the capture."""
    from kiln.compiler.generation.gate import capacity_of
    from kiln.compiler.generation.reference import CausalLMReference
    from kiln.compiler.generation.stream_gate import reference_streams

    assert source.reference_model is not None and source.decoder is not None
    capacity = capacity_of(source.decoder, layout_of(captured.inputs, source.decoder))
    return reference_streams(CausalLMReference(source.reference_model), source.decoder, capacity)


def with_generation(
    report: ParityReport, artifact: Artifact, source: ModelSource, streams: list[TokenStream] | None = None
) -> ParityReport:
    """The parity report with the generation check added (`report.generation`, see
    `kiln.compiler.generation.gate.judge_generation`): it fails when the artifact's greedy tokens are not the user's
    model's or a step's logits are outside the report's tolerance (fp32), or when a weight-quantized artifact's
    teacher-forced figures miss their thresholds (kiln.compiler.generation.stream_gate). At fp32 the artifact
    decodes every prompt first and its runtime is let go before the user's model runs, so that the two never hold
    their weights at once."""
    from kiln.compiler.backend_errors import backend_failures
    from kiln.compiler.export.artifacts import load_runner
    from kiln.compiler.generation.gate import (
        capacity_of,
        decode_prompts,
        gate_prompts,
        judge_decoding,
        judge_generation,
    )
    from kiln.compiler.generation.reference import CausalLMReference
    from kiln.compiler.generation.stream_gate import stream_gated
    from kiln.compiler.memory import release_pages

    assert source.reference_model is not None and source.decoder is not None
    runner = load_runner(artifact)
    layout = decoding_of(runner, artifact.manifest.inputs, source.decoder)
    reference = CausalLMReference(source.reference_model)
    precision = artifact.manifest.precision
    if stream_gated(precision):
        with backend_failures(artifact.target, "run"):
            record = judge_generation(
                runner.run, layout, reference, source.decoder, precision, report.tolerance, streams
            )
        return replace(report, passed=report.passed and record["passed"], generation=record)
    plan = gate_prompts(source.decoder, capacity_of(source.decoder, layout))
    with backend_failures(artifact.target, "run"):
        decoded = decode_prompts(runner.run, layout, plan)
    del runner, layout
    gc.collect()
    release_pages([artifact.directory])
    record = judge_decoding(decoded, reference, plan, report.tolerance)
    return replace(report, passed=report.passed and record["passed"], generation=record)
