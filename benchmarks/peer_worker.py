"""One variant of `benchmarks/bench_tune.py` in its own process: `python -m benchmarks.peer_worker`.

It speaks `kiln.compiler.perf.bench_worker`'s protocol (`serve`), so Kiln's picks and the peers are timed alike: each
in its
own process, loaded once, in the same interleaved rounds (`kiln.compiler.perf.benchmark.interleave`), as `kiln tune`
times
its candidates. The job (first line) says what to load:

* `{"kind": "kiln", ...}`: a Kiln export with its runtime settings (`kiln.compiler.perf.bench_worker`'s artifact job);
* `{"kind": "ort", "path", "threads", "inputs"}`: an ONNX file in ONNX Runtime with its defaults but the thread
  count;
* `{"kind": "openvino", "path", "threads", "config", "inputs"}`: an OpenVINO IR compiled for the CPU with `config`;
* `{"kind": "litert", "path", "inputs"}`: a `.tflite` from `litert_torch.convert`, run by `litert_torch.load` (its
  own interpreter and defaults);
* `{"kind": "eager", "model", "threads"}`: a benchmark or zoo model in PyTorch eager, on its example.

`inputs` is an `.npz` of the example (`arg0`, `arg1`, ... in the reference layout).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from kiln.compiler.perf.bench_worker import load_candidate, serve


def _example(path: str) -> list[np.ndarray]:
    with np.load(path) as data:
        return [data[f"arg{i}"] for i in range(len(data.files))]


def _ort(job: dict[str, Any]) -> tuple[Callable[[], Any], dict[str, Any]]:
    import onnxruntime as ort
    from kiln.compiler.ort_session import ort_session

    session = ort_session(job["path"], int(job["threads"]))
    feeds = dict(zip([i.name for i in session.get_inputs()], _example(job["inputs"])))
    return lambda: session.run(None, feeds), {"runtime": f"onnxruntime {ort.__version__}"}


def _openvino(job: dict[str, Any]) -> tuple[Callable[[], Any], dict[str, Any]]:
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": int(job["threads"]), **job["config"]}
    compiled = ov.Core().compile_model(job["path"], "CPU", config)
    request, feeds = compiled.create_infer_request(), _example(job["inputs"])
    precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    return lambda: request.infer(feeds), {"runtime": f"openvino {ov.__version__}", "precision": precision}


def _litert(job: dict[str, Any]) -> tuple[Callable[[], Any], dict[str, Any]]:
    import litert_torch

    model, feeds = litert_torch.load(job["path"]), _example(job["inputs"])
    return lambda: model(*feeds), {"runtime": f"litert_torch {litert_torch.__version__}"}


def _eager(job: dict[str, Any]) -> tuple[Callable[[], Any], dict[str, Any]]:
    import torch
    from kiln.compiler.capture.zoo import ZOO

    from benchmarks.models import MODELS

    torch.set_num_threads(int(job["threads"]))
    module, inputs = (MODELS.get(job["model"]) or ZOO[job["model"]])()

    def run() -> Any:
        with torch.no_grad():
            return module(*inputs)

    return run, {"runtime": f"torch {torch.__version__}"}


LOADERS = {"ort": _ort, "openvino": _openvino, "litert": _litert, "eager": _eager}


def load(job: dict[str, Any]) -> tuple[Callable[[], Any], dict[str, Any]]:
    """The variant as a no-argument run, and what loading it found (the protocol's first answer)."""
    if job["kind"] == "kiln":
        return load_candidate(job | {"kind": "artifact"})
    started = time.perf_counter()
    run, info = LOADERS[job["kind"]](job)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    run()
    first_ms = (time.perf_counter() - started) * 1000
    return run, {"load_s": round(load_s, 4), "first_ms": round(first_ms, 3), "runtime_info": info}


if __name__ == "__main__":
    sys.exit(serve(load))
