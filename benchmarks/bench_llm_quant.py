#!/usr/bin/env python3
"""The quantized text-generation gate's figures: every held-out decoder family exported at fp32, int8 and int4 to
onnx and openvino and at int8 to tflite, and the planted too-coarse quantizations, each judged by the real gate.

Run by hand::

    .venv/bin/python benchmarks/bench_llm_quant.py
    .venv/bin/python benchmarks/bench_llm_quant.py --families llama,qwen2 --json llm_quant.json

For each family of tests/models/decoders.py (small configs, random weights) and precision, one `kiln export
--task text-generation` (onnx and openvino share a capture; tflite gets its own, static cache). Each row: whether
the gate published it; the decoding states' worst logits cosine and SNR (the per-output check, at the precision's
Tolerance); and the teacher-forced streams of kiln.compiler.generation.stream_gate against the user's fp32 model:
top-1 agreement, mean and worst step logit cosine, perplexity ratio (fp32 rows: the greedy tokens, identical or
not). Then the planted rows (tests/models/coarse_weights.py): int4 asked of the toolchains as 2 bits, and int4
with one scale per matrix on onnx, which the gate must reject. Nothing is hard-coded: every figure comes from the
manifests the run writes.

`--speed` instead measures what the quantization buys: benchmarks/bench_generate.py's ~20M-parameter Llama-style
model (hidden 320, 6 layers, vocab 16000, random weights at transformers' init) exported at fp32, int8 and int4
to each target (each gated as always), then per target: the artifact's bytes over fp32's, and one decode step
(past of `--context` - 1 tokens from a real prefill, one new token) of the three precisions timed interleaved (one
of each per round, `--repeat` rounds), medians and ratios to fp32. Threads: each runtime's default.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FAMILIES = ("llama", "qwen2", "phi3", "gpt_neox", "olmo2")
CELLS = (("onnx,openvino", "fp32"), ("onnx,openvino", "int8"), ("onnx,openvino", "int4"), ("tflite", "int8"))


def planted_cells() -> list[tuple[str, str, str, AbstractContextManager[Any], dict[str, Any]]]:
    """(label, targets, precision, context, other options) of the planted too-coarse or broken quantizations."""
    from tests.models.coarse_weights import dropped_zero_points, per_tensor_onnx_weights, two_bit_weights

    return [
        ("int4 asked as 2 bits", "onnx,openvino", "int4", two_bit_weights(), {}),
        ("int4 one scale per matrix", "onnx", "int4", per_tensor_onnx_weights(), {}),
        (
            "int4 asym, zero points dropped",
            "onnx",
            "int4",
            dropped_zero_points(),
            {"weights": "asym", "group_size": 32},
        ),
    ]


def row(family: str, label: str, result: Any, seconds: float) -> dict[str, Any]:
    """The figures of one export's manifest."""
    parity = result.manifest.parity if result.manifest is not None else None
    out: dict[str, Any] = {"family": family, "target": result.target, "precision": label, "seconds": round(seconds, 1)}
    out["published"] = bool(result.published)
    if parity is None:
        out["failure"] = result.failure.message if result.failure else "no parity report"
        return out
    logits = next((o for o in parity.outputs if o.name == "logits"), None)
    out["states_cosine"] = round(logits.min_cosine, 4) if logits else None
    out["states_snr_db"] = round(logits.snr_db, 1) if logits else None
    generation = parity.generation or {}
    if generation.get("kind") == "teacher-forced streams":
        for key in ("top1", "top1_decided", "top1_all", "mean_logit_cosine", "min_logit_cosine", "ppl_ratio"):
            value = generation.get(key)
            out[key] = round(value, 4) if isinstance(value, float) else value
        out["tokens"] = generation.get("tokens")
    else:
        out["identical"] = generation.get("identical")
        out["tokens"] = generation.get("tokens")
    return out


def export_rows(
    family: str, targets: str, precision: str, label: str, context: Any, scratch: Path, **other: Any
) -> list[dict]:
    """One export (in-process, so that a planted quantizer applies), its rows."""
    from kiln.compiler.export.options import export_options
    from kiln.compiler.export.pipeline import export_targets

    models = ROOT / "tests" / "models" / "decoders.py"
    out = scratch / f"{family}-{targets.replace(',', '+')}-{label.replace(' ', '_')}"
    options = export_options(precision=precision, force=True, **other)
    started = time.perf_counter()
    with context:
        results = export_targets(f"{models}:{family}", targets, out, options)
    seconds = time.perf_counter() - started
    return [row(family, label, r, seconds) for r in results]


SPEED_PRECISIONS = ("fp32", "int8", "int4")


def artifact_bytes(directory: Path) -> int:
    """The bytes of an export's model files (what a deployment ships; not the manifest)."""
    return sum(
        p.stat().st_size for p in directory.rglob("*") if p.is_file() and p.suffix in (".onnx", ".xml", ".bin", ".data")
    )


def speed_rows(
    targets: str, context: int, repeat: int, warmup: int, precisions: tuple[str, ...] = SPEED_PRECISIONS
) -> list[dict[str, Any]]:
    """Size and interleaved decode-step time of the fp32, int8 and int4 exports of the ~20M Llama, per target."""
    import statistics

    import torch
    from kiln.compiler.export.loading import load
    from kiln.compiler.export.options import export_options
    from kiln.compiler.export.pipeline import export_targets
    from kiln.compiler.generation.decoding import CacheLayout

    from benchmarks.bench_generate import build_model, step_feeds

    model = build_model()
    example = (torch.zeros(1, 8, dtype=torch.long),)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-llm-speed-") as scratch:
        built: dict[tuple[str, str], Any] = {}
        for precision in precisions:
            started = time.perf_counter()
            options = export_options(precision=precision, force=True)
            results = export_targets(model, targets, Path(scratch) / precision, options, example_inputs=example)
            print(f"exported {precision} in {time.perf_counter() - started:.0f}s", flush=True)
            for result in results:
                if result.published and result.manifest is not None:
                    built[(result.target, precision)] = result
                else:  # not timed; the gate's figures say why
                    why = result.failure.message if result.failure else rejection(result)
                    print(f"{result.target} {precision} REJECTED: {why}", flush=True)
                    rows.append({"target": result.target, "precision": precision, "rejected": why})
        for target in dict.fromkeys(t for t, _ in built):
            timed = [p for p in precisions if (target, p) in built]
            runs, feeds = {}, {}
            for precision in timed:
                loaded = load(built[(target, precision)].directory)
                runs[precision] = loaded.run
                feeds[precision] = step_feeds(loaded.run, CacheLayout.from_specs(loaded.inputs), context)[0]
            for _ in range(warmup):
                for precision in timed:
                    runs[precision](feeds[precision])
            times: dict[str, list[float]] = {p: [] for p in timed}
            for _ in range(repeat):
                for precision in timed:
                    start = time.perf_counter()
                    runs[precision](feeds[precision])
                    times[precision].append((time.perf_counter() - start) * 1000)
            if "fp32" not in timed:  # nothing to compare with
                continue
            fp32_ms = statistics.median(times["fp32"])
            fp32_bytes = artifact_bytes(built[(target, "fp32")].directory)
            for precision in timed:
                result = built[(target, precision)]
                size = artifact_bytes(result.directory)
                ms = statistics.median(times[precision])
                generation = result.manifest.parity.generation or {}
                rows.append({
                    "target": target, "precision": precision, "bytes": size, "size_ratio": round(size / fp32_bytes, 3),
                    "decode_ms": round(ms, 3), "speedup": round(fp32_ms / ms, 2),
                    "spread": round(max(times[precision]) / min(times[precision]), 2),
                    "top1": generation.get("top1"), "ppl_ratio": generation.get("ppl_ratio"),
                })  # fmt: skip
    return rows


def rejection(result: Any) -> str:
    """Why the gate rejected a result: its failing outputs and the generation record's figures."""
    parity = result.parity
    if parity is None:
        return "no parity report"
    failing = [f"{o.name}: {o.summary()}" for o in parity.outputs if not o.passed]
    generation = parity.generation or {}
    figures = {k: generation.get(k) for k in ("top1", "mean_logit_cosine", "ppl_ratio", "failed")}
    return "; ".join([*failing[:2], f"streams {figures}"])


def print_speed(rows: list[dict[str, Any]], context: int, repeat: int) -> None:
    """The size and speed table."""
    print(f"\ndecode step at context {context}, batch 1, {repeat} interleaved rounds (median ms; speed-up over fp32)")
    print(f"{'target':<9} {'precision':<9} {'MB':>7} {'size/fp32':>9} {'ms/token':>9} {'speed-up':>8} {'spread':>6}")
    for r in rows:
        if "rejected" in r:
            print(f"{r['target']:<9} {r['precision']:<9} REJECTED by the gate: {r['rejected']}")
            continue
        print(
            f"{r['target']:<9} {r['precision']:<9} {r['bytes'] / 1e6:>7.1f} {r['size_ratio']:>9.3f} "
            f"{r['decode_ms']:>9.3f} {r['speedup']:>7.2f}x {r['spread']:>6.2f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", action="store_true", help="size and decode speed of fp32/int8/int4 instead")
    parser.add_argument("--targets", default="onnx,openvino", help="--speed: the targets")
    parser.add_argument("--context", type=int, default=128, help="--speed: the decode step's context")
    parser.add_argument("--repeat", type=int, default=40, help="--speed: interleaved rounds")
    parser.add_argument("--precisions", default=",".join(SPEED_PRECISIONS), help="--speed: the precisions")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated; none: the planted rows only")
    parser.add_argument("--no-planted", action="store_true", help="leave out the planted too-coarse rows")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()

    from kiln.compiler.generation.stream_gate import STREAM_TOLERANCES
    from kiln.compiler.progress import quiet_libraries

    quiet_libraries()
    if args.speed:
        precisions = tuple(args.precisions.split(","))
        speed = speed_rows(args.targets, args.context, args.repeat, warmup=3, precisions=precisions)
        print_speed(speed, args.context, args.repeat)
        if args.json:
            Path(args.json).write_text(json.dumps({"speed": speed}, indent=2))
        return 0
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-llm-quant-") as scratch:
        for family in filter(None, args.families.split(",")):
            for targets, precision in CELLS:
                rows += export_rows(family, targets, precision, precision, nullcontext(), Path(scratch))
                print(json.dumps(rows[-1]), flush=True)
        if not args.no_planted:
            for label, targets, precision, context, other in planted_cells():
                rows += export_rows("llama", targets, precision, label, context, Path(scratch), **other)
                print(json.dumps(rows[-1]), flush=True)
    print("\nthresholds:", {k: vars(v) for k, v in STREAM_TOLERANCES.items()})
    head = f"{'family':<9} {'target':<9} {'precision':<31} {'gate':<9} {'top-1':>6} {'mean cos':>9} {'min cos':>8}"
    print(head + f" {'ppl ratio':>9} {'states cos':>10} {'states SNR':>10}")
    for r in rows:
        gate = "published" if r["published"] else "REJECTED"
        if "top1" in r:
            top1 = "n/a" if r["top1"] is None else f"{r['top1']:.3f}"  # n/a: too few decided positions
            figures = f"{top1:>6} {r['mean_logit_cosine']:>9.4f} {r['min_logit_cosine']:>8.3f} {r['ppl_ratio']:>9.3f}"
        else:
            figures = f"{'identical' if r.get('identical') else 'DIFFER':>6} {'':>9} {'':>8} {'':>9}"
        states = f"{r.get('states_cosine')!s:>10} {r.get('states_snr_db')!s:>10}"
        print(f"{r['family']:<9} {r['target']:<9} {r['precision']:<31} {gate:<9} {figures} {states}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
