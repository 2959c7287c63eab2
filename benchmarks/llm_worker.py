#!/usr/bin/env python3
"""One candidate of `benchmarks/bench_llm.py` in its own process, timed with the tool a user would run it with.

Standalone (it imports nothing of Kiln): it also runs under the optimum-intel virtual environment, whose
`transformers` is older than Kiln's. One JSON job on the first line of stdin, one JSON answer per line on stdout:

* the job: `{"kind", "path", "threads", "config"}`; kinds:
  - `genai`: an onnxruntime-genai folder (Kiln's `onnx` export, the model builder's output), `onnxruntime_genai`'s
    Generator: `append_tokens(prompt)` is the prefill, then one `generate_next_token()` per token;
  - `llmpipeline`: an OpenVINO GenAI folder (Kiln's `openvino` export), `openvino_genai.LLMPipeline` with `config` as
    its properties (e.g. INFERENCE_PRECISION_HINT), greedy, `ignore_eos`;
  - `optimum`: an optimum-intel folder, `OVModelForCausalLM.from_pretrained(path, ov_config=config).generate`;
  - `eager`: a `save_pretrained` folder in transformers' own `generate` (PyTorch eager).
  The answer: `{"ok": true, "load_s", "info"}` or `{"ok": false, "error"}`.
* `{"op": "run", "prompt": [ids], "new": N}` -> `{"prefill_ms", "decode_ms": [N - 1 per-token times], "tokens"}`:
  greedy decoding of N tokens; `prefill_ms` is the time to the first new token (the prompt's forward and its
  choice), each `decode_ms` one further token (a forward of one token over the cache and its choice). The
  `generate` kinds are timed by a streamer's timestamps, as a user's streamer would see the tokens arrive.
* `{"op": "quit"}` (or the end of stdin) ends it; `{"op": "stats"}` -> `{"peak_rss_mib"}`.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

Run = Callable[[list[int], int], tuple[float, list[float], list[int]]]


def _genai(job: dict[str, Any]) -> tuple[Run, dict[str, Any]]:
    import onnxruntime_genai as og

    config = og.Config(job["path"])
    options = {"session_options": {"intra_op_num_threads": int(job["threads"])}}
    config.overlay(json.dumps({"model": {"decoder": options}}))
    model = og.Model(config)

    def run(prompt: list[int], new: int) -> tuple[float, list[float], list[int]]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new + 1, do_sample=False)
        generator = og.Generator(model, params)
        started = time.perf_counter()
        generator.append_tokens(prompt)
        generator.generate_next_token()  # the choice of the first token from the prompt's logits
        stamps = [time.perf_counter()]
        for _ in range(new - 1):
            generator.generate_next_token()  # one forward of the last token, and the next choice
            stamps.append(time.perf_counter())
        tokens = [int(t) for t in generator.get_sequence(0)[len(prompt) :]]
        return (*_times(started, stamps), tokens)

    return run, {"runtime": f"onnxruntime-genai {og.__version__}"}


def _llmpipeline(job: dict[str, Any]) -> tuple[Run, dict[str, Any]]:
    import numpy as np
    import openvino as ov
    import openvino_genai as ovg

    properties = {"INFERENCE_NUM_THREADS": int(job["threads"]), **job.get("config", {})}
    pipe = ovg.LLMPipeline(job["path"], "CPU", **properties)

    class Stamps(ovg.StreamerBase):
        def __init__(self) -> None:
            super().__init__()
            self.stamps: list[float] = []
            self.tokens: list[int] = []

        def write(self, token: Any) -> Any:
            self.stamps.append(time.perf_counter())
            self.tokens.extend([int(token)] if isinstance(token, int) else [int(t) for t in token])
            return ovg.StreamingStatus.RUNNING

        def end(self) -> None:
            pass

    def run(prompt: list[int], new: int) -> tuple[float, list[float], list[int]]:
        config = ovg.GenerationConfig()
        config.max_new_tokens, config.ignore_eos, config.do_sample = new, True, False
        ids = ov.Tensor(np.asarray([prompt], np.int64))
        inputs = ovg.TokenizedInputs(ids, ov.Tensor(np.ones((1, len(prompt)), np.int64)))
        streamer = Stamps()
        started = time.perf_counter()
        pipe.generate(inputs, config, streamer)
        return (*_times(started, streamer.stamps), streamer.tokens)

    return run, {"runtime": f"openvino-genai {ovg.__version__}", "properties": properties}


def _generate_with_stamps(model: Any, torch: Any) -> Run:
    """transformers' `generate`, timed by a streamer: its first `put` is the prompt, each next one a new token."""

    class Stamps:
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.seen_prompt = False

        def put(self, value: Any) -> None:
            if self.seen_prompt:
                self.stamps.append(time.perf_counter())
            self.seen_prompt = True

        def end(self) -> None:
            pass

    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    def run(prompt: list[int], new: int) -> tuple[float, list[float], list[int]]:
        ids = torch.tensor([prompt])
        streamer = Stamps()
        with torch.no_grad():
            started = time.perf_counter()
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, streamer=streamer
            )
        return (*_times(started, streamer.stamps), [int(t) for t in out[0, len(prompt) :]])

    return run


def _optimum(job: dict[str, Any]) -> tuple[Run, dict[str, Any]]:
    from importlib.metadata import version

    import torch
    from optimum.intel import OVModelForCausalLM

    config = {"INFERENCE_NUM_THREADS": str(job["threads"]), **{k: str(v) for k, v in job.get("config", {}).items()}}
    model = OVModelForCausalLM.from_pretrained(job["path"], ov_config=config)
    return _generate_with_stamps(model, torch), {"runtime": f"optimum-intel {version('optimum-intel')}"}


def _eager(job: dict[str, Any]) -> tuple[Run, dict[str, Any]]:
    import torch
    import transformers

    torch.set_num_threads(int(job["threads"]))
    model = transformers.AutoModelForCausalLM.from_pretrained(job["path"]).eval()
    return _generate_with_stamps(model, torch), {"runtime": f"torch {torch.__version__} eager"}


def _times(started: float, stamps: list[float]) -> tuple[float, list[float]]:
    """(time to the first token, each further token's time), in ms."""
    if not stamps:
        return 0.0, []
    decode = [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]
    return (stamps[0] - started) * 1000, decode


LOADERS: dict[str, Callable[[dict[str, Any]], tuple[Run, dict[str, Any]]]] = {
    "genai": _genai,
    "llmpipeline": _llmpipeline,
    "optimum": _optimum,
    "eager": _eager,
}


def main() -> int:
    answers = os.fdopen(os.dup(1), "w", buffering=1)  # what runtimes print goes to stderr, not the answers
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def answer(message: dict[str, Any]) -> None:
        answers.write(json.dumps(message) + "\n")

    try:
        job = json.loads(sys.stdin.readline() or "{}")
        started = time.perf_counter()
        run, info = LOADERS[job["kind"]](job)
        answer({"ok": True, "load_s": round(time.perf_counter() - started, 2), "info": info})
    except Exception as exc:
        answer({"ok": False, "error": f"{type(exc).__name__}: {str(exc).strip()[:500]}"})
        return 1
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "run":
            prefill, decode, tokens = run(request["prompt"], int(request["new"]))
            answer({"prefill_ms": prefill, "decode_ms": decode, "tokens": tokens})
        elif request["op"] == "stats":
            answer({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        else:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
