"""The runs `benchmarks/bench_tune.py` times: Kiln's candidates from a tune leaderboard, the peers' fp32 and int8
defaults, interleaved timing with spread, the machine's SGEMM rate and a model's FLOPs.

Each variant is built (and its outputs measured) here, and saved where it has to be; it is timed in its own
worker process (`benchmarks/peer_worker.py`, its `job`), as `kiln tune` and `kiln bench` time candidates: several
runtimes' thread pools in one process would disturb each other, and a deployment runs one."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

OPENVINO_TYPES = {"bfloat16": "bf16", "float32": "fp32", "f32": "fp32", "float16": "fp16", "f16": "fp16"}
Predict = Callable[[list[np.ndarray]], np.ndarray]  # inputs in the reference layout -> the first output


@dataclass
class Variant:
    """One thing timed: how to run it on the example, how to predict on other inputs, its precision."""

    label: str
    run: Callable[[], Any]
    predict: Predict
    precision: str  # what it computes in: fp32, bf16 (OpenVINO's CPU default on bf16 CPUs), int8...
    job: dict[str, Any]  # what its timing worker loads (benchmarks/peer_worker.py)


def save_example(arrays: list[np.ndarray], work: Path, name: str = "example.npz") -> Path:
    """The example as `work/name` (arg0, arg1, ...), for the timing workers."""
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / name, **{f"arg{i}": a for i, a in enumerate(arrays)})
    return work / name


def _first(outputs: Any, name: str | None = None) -> Any:
    """The first output: by `name` where the outputs are named (LiteRT returns its dict sorted by name, not in the
    model's order), else the first in order."""
    if isinstance(outputs, dict):
        return outputs[name] if name in outputs else next(iter(outputs.values()))
    if isinstance(outputs, (list, tuple)):
        return outputs[0]
    return outputs


def kiln_variant(row: dict[str, Any], threads: int | None) -> Variant:
    """A leaderboard candidate loaded with its runtime settings at `threads` threads (as `kiln bench` does); its
    `predict` takes and returns the reference's layout (an NHWC candidate's image I/O is transposed)."""
    from kiln.compiler.export.artifacts import Artifact, load_runner
    from kiln.compiler.image_layout import nchw_array, nhwc_array, nhwc_names
    from kiln.compiler.perf.timing import bench_feeds
    from kiln.targets.base import RuntimeSettings

    directory = Path(row["directory"])
    artifact = Artifact.read(directory)
    runner = load_runner(artifact, threads, RuntimeSettings.from_dict(row["runtime_settings"]))
    feeds = bench_feeds(directory, artifact.manifest, None, artifact_layout=True)
    names = [s.name for s in artifact.manifest.inputs]
    nhwc_in = set(nhwc_names(artifact.manifest.inputs))
    first = artifact.manifest.outputs[0].name
    nhwc_out = first in nhwc_names(artifact.manifest.outputs)

    def predict(xs: list[np.ndarray]) -> np.ndarray:
        got = runner.run({n: nhwc_array(x) if n in nhwc_in else x for n, x in zip(names, xs)})[first]
        return np.asarray(nchw_array(got) if nhwc_out else got)

    job = {"kind": "kiln", "directory": str(directory), "threads": threads, "batch": None, "trust_pickle": False,
           "runtime_settings": row["runtime_settings"]}  # fmt: skip
    return Variant(f"kiln tune: {row['name']}", lambda: runner.run(feeds), predict, row["precision"], job)


def eager_variant(name: str, module: Any, inputs: tuple[Any, ...], threads: int) -> Variant:
    import torch

    def predict(xs: list[np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return _first(module(*[torch.from_numpy(x) for x in xs])).numpy()

    job = {"kind": "eager", "model": name, "threads": threads}
    return Variant("pytorch eager", lambda: predict([t.numpy() for t in inputs]), predict, "fp32", job)


def _ort(
    path: Path, threads: int | None, label: str, precision: str, example: list[np.ndarray], inputs: Path
) -> Variant:
    from kiln.compiler.ort_session import ort_session

    session = ort_session(path, threads or 0)  # ORT's defaults, but the thread count every runtime gets (0: its own)
    names = [i.name for i in session.get_inputs()]

    def predict(xs: list[np.ndarray]) -> np.ndarray:
        return np.asarray(session.run(None, dict(zip(names, xs)))[0])

    job = {"kind": "ort", "path": str(path), "threads": threads, "inputs": str(inputs)}
    return Variant(label, lambda: predict(example), predict, precision, job)


def _openvino(xml: Path, threads: int | None, label: str, config: dict[str, str], example: list[np.ndarray],
              inputs: Path) -> Variant:  # fmt: skip
    """The IR at `xml` (saved uncompressed: `ov.save_model(m, xml, compress_to_fp16=False)`) as OpenVINO runs it
    (`threads` None: its own thread count)."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    compiled = ov.Core().compile_model(
        model, "CPU", {**({"INFERENCE_NUM_THREADS": threads} if threads else {}), **config}
    )
    request = compiled.create_infer_request()
    hint = str(compiled.get_property("INFERENCE_PRECISION_HINT")).replace("<Type: '", "").split("'")[0]
    precision = OPENVINO_TYPES.get(hint, hint)

    def predict(xs: list[np.ndarray]) -> np.ndarray:
        return np.asarray(request.infer(list(xs))[compiled.outputs[0]]).copy()

    job = {"kind": "openvino", "path": str(xml), "threads": threads, "config": config, "inputs": str(inputs)}
    return Variant(f"{label} [{precision}]", lambda: predict(example), predict, precision, job)


def _attempt(found: list[Variant | str], label: str, make: Callable[[], Variant | list[Variant]]) -> None:
    try:
        made = make()
        for variant in made if isinstance(made, list) else [made]:
            variant.run()  # a peer that converts but cannot run on the example fails here, not in the timing
        found.extend(made if isinstance(made, list) else [made])
    except Exception as error:
        found.append(f"{label}: failed: {type(error).__name__}: {' '.join(str(error).split())[:150]}")


def fp32_peers(module: Any, inputs: tuple[Any, ...], threads: int | None, work: Path) -> list[Variant | str]:
    """The peers' fp32 defaults (or the error that stopped one): `torch.onnx.export` + ONNX Runtime,
    `openvino.convert_model` compiled with the CPU's default inference precision and with f32 pinned,
    `litert_torch.convert` (its own interpreter; it has no thread setting)."""
    import torch

    example = [t.numpy() for t in inputs]
    saved = save_example(example, work)
    found: list[Variant | str] = []

    def onnx_export() -> Variant:
        torch.onnx.export(module, inputs, str(work / "peer.onnx"))
        return _ort(work / "peer.onnx", threads, "torch.onnx.export + ORT", "fp32", example, saved)

    def openvino() -> list[Variant]:
        import openvino as ov

        ov.save_model(ov.convert_model(module, example_input=inputs), work / "peer.xml", compress_to_fp16=False)
        f32 = {"INFERENCE_PRECISION_HINT": "f32"}
        return [_openvino(work / "peer.xml", threads, "openvino.convert_model default", {}, example, saved),
                _openvino(work / "peer.xml", threads, "openvino.convert_model f32", f32, example, saved)]  # fmt: skip

    def litert() -> Variant:
        import litert_torch

        edge = litert_torch.convert(module, inputs)
        edge.export(str(work / "peer.tflite"))
        with torch.no_grad():
            eager = module(*inputs)
        name = next(iter(eager)) if isinstance(eager, dict) else None

        def narrowed(xs: list[np.ndarray]) -> list[np.ndarray]:
            """litert_torch downcasts 64-bit model inputs to 32 bits (its default, enable_x64=False) and tells its
            users to feed them so."""
            return [x.astype(np.int32) if x.dtype == np.int64 else x for x in xs]

        predict: Predict = lambda xs: np.asarray(_first(edge(*narrowed(xs)), name))  # noqa: E731
        job = {
            "kind": "litert",
            "path": str(work / "peer.tflite"),
            "inputs": str(save_example(narrowed(example), work, "narrow.npz")),
        }
        return Variant("litert_torch.convert", lambda: predict(example), predict, "fp32", job)

    _attempt(found, "torch.onnx.export + ORT", onnx_export)
    _attempt(found, "openvino.convert_model", openvino)
    _attempt(found, "litert_torch.convert", litert)
    return found


def int8_peers(module: Any, inputs: tuple[Any, ...], rows: np.ndarray, threads: int, work: Path) -> list[Variant | str]:
    """The peers' int8 defaults on the same calibration rows: ORT `quantize_static(model, out, reader)` on
    `torch.onnx.export`'s model, and `nncf.quantize(openvino.convert_model(module), nncf.Dataset(rows))`
    compiled with OpenVINO's defaults (single-input models)."""
    import torch

    example = [t.numpy() for t in inputs]
    saved = save_example(example, work)
    found: list[Variant | str] = []

    def ort_static() -> Variant:
        from benchmarks.bench_quant import ort_defaults

        fp32 = work / "peer.onnx"
        torch.onnx.export(module, inputs, str(fp32))
        name = __import__("onnx").load(str(fp32)).graph.input[0].name
        ort_defaults(fp32, work / "peer-int8.onnx", name, rows)
        return _ort(work / "peer-int8.onnx", threads, "ort quantize_static defaults", "int8", example, saved)

    def nncf_default() -> Variant:
        import nncf
        import openvino as ov

        converted = ov.convert_model(module, example_input=inputs)
        quantized = nncf.quantize(converted, nncf.Dataset([row[None] for row in rows]), subset_size=len(rows))
        ov.save_model(quantized, work / "peer-nncf.xml", compress_to_fp16=False)
        variant = _openvino(work / "peer-nncf.xml", threads, "nncf.quantize defaults", {}, example, saved)
        variant.precision = f"int8+{variant.precision}"
        return variant

    _attempt(found, "ort quantize_static defaults", ort_static)
    _attempt(found, "nncf.quantize defaults", nncf_default)
    return found


def interleaved(variants: list[Variant], rounds: int, runs: int, warmup: int = 3) -> dict[str, list[float]]:
    """Each variant's median per round (ms), timed by Kiln's timing method (`kiln.compiler.perf.rounds`, as `kiln
    tune` ranks its candidates): each variant in its own worker process, alone (the others stopped) and warmed up
    at each turn, `rounds` rounds in a rotating order of at least `runs` runs and at least MIN_ROUND_MS."""
    from kiln.compiler.perf.bench_worker import LOAD_TIMEOUT_S, Worker
    from kiln.compiler.perf.rounds import interleave, sized_turns
    from kiln.compiler.perf.tune import MIN_ROUND_MS

    workers: list[Worker] = []
    try:
        for variant in variants:
            workers.append(Worker(variant.job, module="benchmarks.peer_worker"))
            workers[-1].start(LOAD_TIMEOUT_S)
            workers[-1].pause()
        failed: dict[int, str] = {}
        counts, warms = sized_turns(workers, runs, MIN_ROUND_MS, warmup, failed)
        times, failed = interleave(workers, rounds, counts, failed=failed, warm=warms)
    finally:
        for worker in workers:
            worker.close()
    if failed:
        raise RuntimeError("; ".join(f"{variants[i].label}: {why}" for i, why in failed.items()))
    return {v.label: [statistics.median(r) for r in times[i]] for i, v in enumerate(variants)}


def sgemm_gflops(threads: int, size: int = 2048, repeats: int = 10) -> float:
    """torch's fp32 GEMM rate (GFLOP/s) at `threads` threads: the median of `repeats` size x size products."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(times) / 1e9


def model_flops(module: Any, inputs: tuple[Any, ...]) -> int:
    """FLOPs of one forward pass (2 per multiply-add, torch's FlopCounterMode)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*inputs)
    return int(counter.get_total_flops())
