#!/usr/bin/env python3
"""Decode and prefill speed of Kiln's LLM artifacts against the tools people deploy LLMs with, in one interleaved run.

Run by hand (it builds what it times; a second run reuses what the first built under --work)::

    .venv/bin/python benchmarks/bench_llm.py                                  # every model, every candidate
    .venv/bin/python benchmarks/bench_llm.py --models smollm-135m --contexts 128,512 --rounds 3
    .venv/bin/python benchmarks/bench_llm.py --markdown docs/llm-bench-table.md --json llm.json

Models (`SHAPES`): transformers models built from configs with random weights, saved with `save_pretrained` (and a
byte-level BPE tokenizer trained here on a few strings) under `--work`: nothing is downloaded.

Candidates, each in its own worker process (`benchmarks/llm_worker.py`), each run with the tool a user would run it
with, all at `--threads` threads:

| candidate | built by | run by |
|---|---|---|
| `kiln onnx` | `kiln export DIR --target onnx` (the onnxruntime-genai route) | onnxruntime-genai `Generator` |
| `kiln openvino` | `kiln export DIR --target openvino` (OpenVINO GenAI route) | `openvino_genai.LLMPipeline` (f32) |
| `builder` | `python -m onnxruntime_genai.models.builder -p fp32\\|int4 -e cpu` | onnxruntime-genai `Generator` |
| `optimum-intel` | `optimum-cli export openvino` (`--weight-format fp32\\|int4`) | `OVModelForCausalLM.generate` |
| `transformers eager` | the `save_pretrained` folder | `AutoModelForCausalLM.generate` |

Kiln's int4 rows are `kiln export DIR --target onnx,openvino --precision int4` at Kiln's defaults, its quantized
gate included (symmetric groups of 128 along the input, the LM head in int8; onnx: MatMulNBits at accuracy level
4; openvino: NNCF); the builder's int4 is its default (symmetric blocks of 32, accuracy level 4), optimum-intel's
is asymmetric, group 128 (or 64 where 128 does not divide the widths). The `default` precision compares the two
OpenVINO artifacts at the runtime's own inference precision (bf16 on a CPU with AVX-512 BF16, else f32),
optimum-intel's default.

Method: for each round, context C (`--contexts`) and candidate (the order rotating per round), a prompt of C random
token ids and `--new-tokens` greedy tokens: `prefill` is the time to the first token, `decode` the median time of
each further token. A STREAM-like triad (`bandwidth_gbs`) is measured in the same rounds; a candidate's bound is the
bytes it must read per decoded token (the weights it multiplies with, and the KV cache at that context) over that
bandwidth. Ratios (a candidate's decode time over the fastest peer's at the same precision) are taken per round
and the median reported: the machine may be shared, and timings drift by minutes. Tokens are compared with
transformers' own greedy tokens at the first context (`=hf`: how many of them agree before the first difference).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "llm_worker.py"
OPTIMUM_PYTHON = "/work/venv-optimum/bin/python"  # see benchmarks/optimum-requirements.txt
TOKENIZER_VOCAB = 400

# The shapes, as transformers configs (class name, settings): random weights, initializer_range 0.02.
SHAPES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "smollm-135m": ("LlamaConfig", "LlamaForCausalLM", {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 2048, "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0}),
    "tinyllama-1.1b": ("LlamaConfig", "LlamaForCausalLM", {
        "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
        "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0}),
    "tiny": ("LlamaConfig", "LlamaForCausalLM", {  # a smoke test of the benchmark itself
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 2048, "tie_word_embeddings": True}),
    "qwen2-0.5b": ("Qwen2Config", "Qwen2ForCausalLM", {
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768, "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0}),
}  # fmt: skip
DEFAULT_MODELS = ("smollm-135m", "tinyllama-1.1b", "qwen2-0.5b")
CONTEXTS = (128, 512, 1024)
PRECISIONS = ("fp32", "int4", "default")


@dataclass
class Candidate:
    """One artifact and how it is run: the worker's job, its precision and whether it is Kiln's."""

    name: str
    precision: str
    kind: str
    path: Path
    kiln: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    python: str = sys.executable
    weight_bytes: int = 0
    kv_bytes_per_position: int = 0
    build_s: float | None = None
    skipped: str = ""  # why it is not timed

    def job(self, threads: int) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "threads": threads, "config": self.config}


# ---------------------------------------------------------------- building


def build_model(name: str, work: Path) -> Path:
    """The model's `save_pretrained` folder (with a tokenizer), made once."""
    folder = work / name / "hf"
    if (folder / "done").is_file():
        return folder
    import torch
    import transformers

    config_class, model_class, settings = SHAPES[name]
    config = getattr(transformers, config_class)(
        **settings, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.02
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    (folder / "done").write_text("")
    return folder


def make_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained on a few strings (the builder and optimum-intel want one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["the quick brown fox jumps over the lazy dog", "models run on many runtimes"] * 8
    tokenizer.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def timed_command(command: list[str], log: Path, allowed: tuple[int, ...] = (0,)) -> float:
    """Run `command` (its output into `log`); its wall seconds; a RuntimeError naming the log when it exits with a
    status not `allowed`."""
    started = time.perf_counter()
    with log.open("w") as out:
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, check=False).returncode
    if status not in allowed:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed (exit {status}): see {log}")
    return round(time.perf_counter() - started, 1)


def built(directory: Path, make: Any) -> float | None:
    """`make()` (it builds `directory`, returning seconds) unless a previous run left `directory/done`; the seconds
    it took (then or now), None when unknown."""
    marker = directory / "done"
    if marker.is_file():
        return json.loads(marker.read_text() or "{}").get("seconds")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    seconds = make()
    marker.write_text(json.dumps({"seconds": seconds}))
    return seconds


def kiln_exports(hf: Path, out: Path, precision: str, flags: Sequence[str] = ()) -> float | None:
    """`kiln export DIR --target onnx,openvino --precision PRECISION [FLAGS]` of the checkpoint folder `hf` (their
    LLM-format routes, the gate included) into `out/export`. With `--no-parity-gate` among the flags an artifact
    the gate refused is published too (the export exits 1): `gate_refused` tells them apart."""
    command = [sys.executable, str(ROOT / "cli.py"), "export", str(hf), "--target", "onnx,openvino",
               "--precision", precision, *flags, "--out", str(out / "export"), "--force", "--quiet"]  # fmt: skip
    allowed = (0, 1) if "--no-parity-gate" in flags else (0,)
    return built(out, lambda: timed_command(command, out / "export.log", allowed))


def gate_refused(artifact: Path) -> bool:
    """Whether the artifact's manifest says its parity gate failed (published with --no-parity-gate)."""
    manifest = artifact / "manifest.json"
    return manifest.is_file() and not json.loads(manifest.read_text()).get("parity", {}).get("passed", True)


def builder_output(hf: Path, out: Path, precision: str) -> float | None:
    """onnxruntime-genai's model builder on `hf` at `precision` (fp32 or int4) for the CPU."""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out / "model"),
               "-p", precision, "-e", "cpu", "-c", str(out / "cache")]  # fmt: skip
    return built(out, lambda: timed_command(command, out / "build.log"))


def int4_group_size(hf: Path) -> int:
    """OpenVINO's int4 group: optimum-intel's default 128 where it divides every layer's input width, else the largest
    of 64 and 32 that does (SmolLM's 576 is not a multiple of 128, and NNCF refuses a group that does not divide)."""
    config = json.loads((hf / "config.json").read_text())
    widths = (config["hidden_size"], config["intermediate_size"])
    return next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), 32)


def optimum_output(hf: Path, out: Path, weights: str | None) -> float | None:
    """optimum-intel's export of `hf` (`weights`: fp32 or int4, asymmetric, `int4_group_size`; None: its default,
    which is int8 weights for a model of more than 1B parameters)."""
    group = ["--group-size", str(int4_group_size(hf))] if weights == "int4" else []
    command = [OPTIMUM_PYTHON, "-m", "optimum.commands.optimum_cli", "export", "openvino", "-m", str(hf),
               "--task", "text-generation-with-past", *(["--weight-format", weights] if weights else []), *group,
               str(out / "model")]  # fmt: skip
    return built(out, lambda: timed_command(command, out / "build.log"))


# ---------------------------------------------------------------- what a token reads


def onnx_weight_bytes(path: Path) -> int:
    """Bytes of the initializers an ONNX decoder reads per token: all but tables only gathered from (an embedding
    reads one row)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    users: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    total = 0
    for tensor in model.graph.initializer:
        if users.get(tensor.name) == {"Gather"}:
            continue
        count = 1
        for dim in tensor.dims:
            count *= dim
        bits = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize * 8
        total += count * bits // 8
    return total


def openvino_weight_bytes(path: Path) -> int:
    """Bytes of an OpenVINO IR's constants but those an embedding only gathers from (through its decompression)."""
    import openvino as ov

    model = ov.Core().read_model(str(path))
    total = 0
    for op in model.get_ops():
        if op.get_type_name() != "Constant":
            continue
        if _only_gathered(op):
            continue
        shape, element = op.get_output_shape(0), op.get_output_element_type(0)
        count = 1
        for dim in shape:
            count *= dim
        total += count * element.bitwidth // 8
    return total


def _only_gathered(op: Any) -> bool:
    """Whether a constant reaches only Gather data inputs (through Convert/Subtract/Multiply/Reshape)."""
    frontier, seen = [op], 0
    while frontier and seen < 16:
        node, seen = frontier.pop(), seen + 1
        for target in node.output(0).get_target_inputs():
            user = target.get_node()
            kind = user.get_type_name()
            if kind == "Gather" and target.get_index() == 0:
                continue
            if kind in ("Convert", "Subtract", "Multiply", "Reshape"):
                frontier.append(user)
                continue
            return False
    return True


def eager_weight_bytes(hf: Path) -> int:
    """fp32 bytes of the parameters a token reads (an untied input embedding reads one row)."""
    from safetensors import safe_open

    tied = json.loads((hf / "config.json").read_text()).get("tie_word_embeddings")
    total = 0
    with safe_open(str(hf / "model.safetensors"), "np") as weights:
        for key in list(weights.keys()):  # a safetensors file is not iterable
            if "embed_tokens" not in key or tied:
                count = 1
                for dim in weights.get_slice(key).get_shape():
                    count *= dim
                total += count * 4
    return total


def kv_bytes(hf: Path, element: int = 4) -> int:
    """KV-cache bytes per position (keys and values of every layer)."""
    config = json.loads((hf / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim * element


# ---------------------------------------------------------------- the candidates of one model


def candidates(name: str, work: Path, args: argparse.Namespace) -> list[Candidate]:
    """Everything timed for one model, built (or reused) now; a candidate that cannot be built says why."""
    hf = build_model(name, work)
    found: list[Candidate] = []
    kv = kv_bytes(hf)

    def add(candidate: Candidate, make: Any) -> None:
        try:
            candidate.build_s = make()
        except Exception as exc:  # one peer that does not build is reported, the others still run
            candidate.skipped = f"{type(exc).__name__}: {str(exc)[:200]}"
        found.append(candidate)

    own = work / name
    int4_flags = args.kiln_int4.split()
    int4_dir = own / "-".join(["kiln-int4", *(flag.strip("-") for flag in int4_flags)])
    export, export_int4 = own / "kiln" / "export", int4_dir / "export"
    state: dict[str, Any] = {}

    def kiln_build(precision: str = "fp32") -> Any:
        def make() -> float | None:
            if precision not in state:
                state[precision] = (
                    kiln_exports(hf, own / "kiln", precision)
                    if precision == "fp32"
                    else kiln_exports(hf, int4_dir, precision, int4_flags)
                )
            return state[precision]

        return make

    f32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
    optimum = "optimum" in args.peers
    plan: list[tuple[bool, Candidate, Any]] = [
        (True, Candidate("kiln onnx", "fp32", "genai", export / "onnx", kiln=True), kiln_build()),
        (True, Candidate("kiln openvino", "fp32", "llmpipeline", export / "openvino", True, f32), kiln_build()),
        (True, Candidate("builder", "fp32", "genai", own / "builder-fp32" / "model"),
         lambda: builder_output(hf, own / "builder-fp32", "fp32")),
        (optimum, Candidate("optimum-intel", "fp32", "optimum", own / "optimum-fp32" / "model", config=f32,
                            python=OPTIMUM_PYTHON), lambda: optimum_output(hf, own / "optimum-fp32", "fp32")),
        ("eager" in args.peers, Candidate("transformers eager", "fp32", "eager", hf), lambda: None),
        (True, Candidate("kiln onnx int4", "int4", "genai", export_int4 / "onnx", kiln=True), kiln_build("int4")),
        (True, Candidate("kiln openvino int4", "int4", "llmpipeline", export_int4 / "openvino", True),
         kiln_build("int4")),
        (True, Candidate("builder int4", "int4", "genai", own / "builder-int4" / "model"),
         lambda: builder_output(hf, own / "builder-int4", "int4")),
        (optimum, Candidate("optimum-intel int4", "int4", "optimum", own / "optimum-int4" / "model",
                            python=OPTIMUM_PYTHON), lambda: optimum_output(hf, own / "optimum-int4", "int4")),
        (True, Candidate("kiln openvino default", "default", "llmpipeline", export / "openvino", True), kiln_build()),
        (optimum, Candidate("optimum-intel defaults", "default", "optimum", own / "optimum-default" / "model",
                            python=OPTIMUM_PYTHON), lambda: optimum_output(hf, own / "optimum-default", None)),
    ]  # fmt: skip
    for wanted, candidate, make in plan:
        if wanted and candidate.precision in args.precisions:
            add(candidate, make)
            if candidate.kiln and candidate.precision == "int4" and int4_flags:
                candidate.name += f" [{' '.join(int4_flags)}]"
            if candidate.kiln and not candidate.skipped and gate_refused(candidate.path):
                candidate.name += " (gate refused)"
    for candidate in found:
        if candidate.skipped:
            continue
        candidate.kv_bytes_per_position = kv
        try:
            candidate.weight_bytes = weight_bytes(candidate, hf)
        except Exception as exc:
            candidate.skipped = f"not readable: {type(exc).__name__}: {str(exc)[:200]}"
    return found


def weight_bytes(candidate: Candidate, hf: Path) -> int:
    """The bytes of weights one decoded token reads, from the candidate's own files."""
    if candidate.kind == "genai":
        return onnx_weight_bytes(candidate.path / "model.onnx")
    if candidate.kind in ("llmpipeline", "optimum"):
        return openvino_weight_bytes(candidate.path / "openvino_model.xml")
    return eager_weight_bytes(hf)


# ---------------------------------------------------------------- timing


class Worker:
    """A candidate's worker process."""

    def __init__(self, candidate: Candidate, threads: int):
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        self.process = subprocess.Popen(
            [candidate.python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env=env, cwd=ROOT,
        )  # fmt: skip
        self.hello = self.ask(candidate.job(threads))
        if not self.hello.get("ok"):
            self.close()
            raise RuntimeError(self.hello.get("error", "the worker did not start"))

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker exited (status {self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        try:
            if self.process.stdin:
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def bandwidth_gbs(threads: int, megabytes: int = 256, repeats: int = 5) -> float:
    """A STREAM-like triad (a = b + 3 c over three arrays of `megabytes`) at `threads` threads: the best GB/s."""
    import torch

    torch.set_num_threads(threads)
    count = megabytes * 2**20 // 4
    a, b, c = torch.empty(count), torch.rand(count), torch.rand(count)
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best = max(best, 3 * count * 4 / (time.perf_counter() - started) / 1e9)
    return best


def prompt_of(context: int, vocab: int, seed: int = 0) -> list[int]:
    import numpy as np

    return [int(t) for t in np.random.default_rng(seed).integers(3, min(vocab, 30000), context)]


def time_model(name: str, found: list[Candidate], args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved rounds over the model's candidates; every measurement and the bandwidth of each round."""
    vocab = SHAPES[name][2]["vocab_size"]
    live = [c for c in found if not c.skipped]
    results: dict[str, dict[int, list[dict[str, Any]]]] = {c.name: {n: [] for n in args.contexts} for c in live}
    loaded: dict[str, dict[str, Any]] = {}
    bandwidths: list[float] = []
    workers: dict[str, Worker] = {}
    try:
        for round_index in range(args.rounds + 1):  # round 0 warms every candidate up and is not counted
            if round_index:
                bandwidths.append(bandwidth_gbs(args.threads))
            order = live[round_index % len(live) :] + live[: round_index % len(live)]
            for candidate in order:
                if candidate.skipped:
                    continue
                worker = workers.get(candidate.name)
                if worker is None:
                    try:
                        worker = Worker(candidate, args.threads)
                    except RuntimeError as exc:
                        candidate.skipped = f"did not load: {exc}"
                        continue
                    loaded.setdefault(candidate.name, worker.hello)
                    worker.ask({"op": "run", "prompt": prompt_of(16, vocab), "new": 2})  # first-call costs
                    if args.keep_loaded:
                        workers[candidate.name] = worker
                for context in args.contexts if round_index else args.contexts[:1]:
                    answer = worker.ask({"op": "run", "prompt": prompt_of(context, vocab), "new": args.new_tokens})
                    if round_index:
                        results[candidate.name][context].append(answer | {"round": round_index})
                if not args.keep_loaded:
                    worker.close()
                print(f"[bench_llm] {name} round {round_index} {candidate.name} done", file=sys.stderr, flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    return {"results": results, "loaded": loaded, "bandwidth_gbs": bandwidths}


# ---------------------------------------------------------------- reporting


def summarize(name: str, found: list[Candidate], timed: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Per candidate: median decode ms per context, prefill tokens/s, tokens agreeing with transformers, the share
    of the bandwidth bound; per precision: Kiln's best over the fastest peer (median of per-round ratios)."""
    results, bandwidth = timed["results"], statistics.median(timed["bandwidth_gbs"])
    rows: list[dict[str, Any]] = []
    reference = _reference_tokens(results, args.contexts[0])
    for candidate in found:
        row: dict[str, Any] = {"candidate": candidate.name, "precision": candidate.precision, "kiln": candidate.kiln,
                               "build_s": candidate.build_s, "skipped": candidate.skipped,
                               "weight_mb": round(candidate.weight_bytes / 2**20, 1)}  # fmt: skip
        measured = results.get(candidate.name, {})
        for context in args.contexts:
            runs = measured.get(context) or []
            if not runs:
                continue
            decode = statistics.median(statistics.median(r["decode_ms"]) for r in runs if r["decode_ms"])
            prefill = statistics.median(r["prefill_ms"] for r in runs)
            read = candidate.weight_bytes + candidate.kv_bytes_per_position * context
            bound_ms = read / (bandwidth * 1e9) * 1000
            row[f"decode_ms@{context}"] = round(decode, 2)
            row[f"prefill_tps@{context}"] = round(context / (prefill / 1000), 1)
            row[f"bound_share@{context}"] = round(bound_ms / decode, 3)
        first = (measured.get(args.contexts[0]) or [{}])[0].get("tokens")
        if first is not None and reference is not None:
            row["tokens_agree"] = next((i for i, (a, b) in enumerate(zip(first, reference)) if a != b), len(first))
            row["tokens_total"] = len(reference)
        rows.append(row)
    return {"model": name, "bandwidth_gbs": round(bandwidth, 2), "rows": rows,
            "ratios": _ratios(found, results, args)}  # fmt: skip


def _reference_tokens(results: dict[str, Any], context: int) -> list[int] | None:
    runs = results.get("transformers eager", {}).get(context) or []
    return runs[0]["tokens"] if runs else None


def _ratios(found: list[Candidate], results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Per precision and context: Kiln's best decode time over the fastest peer's, per round (median, spread)."""
    ratios: dict[str, Any] = {}
    for precision in args.precisions:
        kiln = [c for c in found if c.precision == precision and c.kiln and c.name in results]
        peers = [c for c in found if c.precision == precision and not c.kiln and c.name in results]
        if not kiln or not peers:
            continue
        for context in args.contexts:
            per_round = []
            for index in range(1, args.rounds + 1):
                best_kiln = _best(results, kiln, context, index)
                best_peer = _best(results, peers, context, index)
                if best_kiln and best_peer:
                    per_round.append(best_peer / best_kiln)  # > 1: Kiln is faster
            if per_round:
                ratios[f"{precision}@{context}"] = {
                    "speedup_median": round(statistics.median(per_round), 3),
                    "min": round(min(per_round), 3),
                    "max": round(max(per_round), 3),
                }
    return ratios


def _best(results: dict[str, Any], group: list[Candidate], context: int, index: int) -> float | None:
    """The fastest median decode time among `group` in round `index` at `context`."""
    times = []
    for candidate in group:
        runs = [r for r in results[candidate.name].get(context, []) if r["round"] == index and r["decode_ms"]]
        if runs:
            times.append(statistics.median(runs[0]["decode_ms"]))
    return min(times, default=None)


def markdown(summaries: list[dict[str, Any]], args: argparse.Namespace, host: dict[str, Any]) -> str:
    """The tables: one per model, then Kiln's speedup over the fastest peer."""
    lines = [f"Threads: {args.threads}. Host: {host['cpu']}; {host['load']}. Rounds: {args.rounds}; "
             f"{args.new_tokens} new tokens per run.", ""]  # fmt: skip
    for summary in summaries:
        lines += [f"### {summary['model']} (triad bandwidth {summary['bandwidth_gbs']} GB/s)", ""]
        head = ["candidate", "precision", "weights MB", *[f"decode ms @{c}" for c in args.contexts],
                *[f"prefill tok/s @{c}" for c in args.contexts], f"bound share @{args.contexts[0]}", "= hf",
                "build s"]  # fmt: skip
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in summary["rows"]:
            if row["skipped"]:
                lines.append(f"| {row['candidate']} | {row['precision']} | not timed: {row['skipped']} |")
                continue
            name = f"**{row['candidate']}**" if row["kiln"] else row["candidate"]
            agree = f"{row['tokens_agree']}/{row['tokens_total']}" if "tokens_agree" in row else "-"
            cells = [name, row["precision"], row["weight_mb"],
                     *[row.get(f"decode_ms@{c}", "-") for c in args.contexts],
                     *[row.get(f"prefill_tps@{c}", "-") for c in args.contexts],
                     row.get(f"bound_share@{args.contexts[0]}", "-"), agree, row["build_s"] or "-"]  # fmt: skip
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    lines += ["### Kiln's best over the fastest peer (decode; median of per-round ratios, > 1: Kiln faster)", ""]
    keys = [f"{p}@{c}" for p in args.precisions for c in args.contexts]
    lines += ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for summary in summaries:
        cells = []
        for key in keys:
            value = summary["ratios"].get(key)
            cells.append(f"{value['speedup_median']}x ({value['min']}-{value['max']})" if value else "-")
        lines.append(f"| {summary['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def host_info() -> dict[str, Any]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        cpu += " (" + ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni") if f" {f}" in flags) + ")"
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()
    return {"cpu": cpu, "cores": os.cpu_count(), "load": f"load average {load[0]:.1f} on {os.cpu_count()} cores"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), help="prompt lengths (tokens)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma list of {', '.join(PRECISIONS)}")
    parser.add_argument("--peers", default="optimum,eager", help="optional peers: optimum, eager")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per run (default 16)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round (default 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--kiln-int4",
        default="",
        help='more flags for Kiln\'s int4 export, e.g. "--group-size 32" (the builder\'s blocks), "--no-parity-gate" '
        "(publish and time an artifact the gate refuses: its rows say so)",
    )
    parser.add_argument("--keep-loaded", action="store_true", help="keep every worker loaded (needs the memory)")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "kiln-bench-llm"), help="builds, reused")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--markdown", help="write the tables here")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.contexts = [int(c) for c in args.contexts.split(",") if c]
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.peers = {p for p in args.peers.split(",") if p}
    unknown = [m for m in args.models if m not in SHAPES] + [p for p in args.precisions if p not in PRECISIONS]
    if unknown or args.rounds < 1 or args.new_tokens < 2 or not args.contexts:
        parser.error(f"unknown or invalid: {unknown or 'rounds/new-tokens/contexts'}")
    if "optimum" in args.peers and not Path(OPTIMUM_PYTHON).is_file():
        note = "optimum-intel left out (see benchmarks/optimum-requirements.txt)"
        print(f"[bench_llm] {OPTIMUM_PYTHON} not found: {note}", file=sys.stderr)
        args.peers.discard("optimum")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    host = host_info()
    summaries = []
    for name in args.models:
        found = candidates(name, work, args)
        timed = time_model(name, found, args)
        summaries.append(summarize(name, found, timed, args))
    host["load"] = host_info()["load"]
    table = markdown(summaries, args, host)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host, "args": {k: sorted(v) if isinstance(v, set) else v
                                                                     for k, v in vars(args).items()},
                                               "models": summaries}, indent=2, default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
