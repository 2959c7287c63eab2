#!/usr/bin/env python3
"""`kiln tune`'s picks against the peers' defaults, timed together in one run (issue 17's figures).

Run by hand::

    .venv/bin/python benchmarks/bench_tune.py --json tune.json
    .venv/bin/python benchmarks/bench_tune.py --quick                  # resnet18 and cnn, fewer rounds
    .venv/bin/python benchmarks/bench_tune.py --parts fp32 --models bert4,transformer --reuse

Each model is tuned by `kiln tune` in a child process (--work/MODEL; `--reuse` takes a leaderboard already there)
over --targets at fp32 and bf16 (and int8 for --int8-models with 50 calibration rows; resnet18 with the `cost`
part: fp32, fp16, bf16, int8). Its picks are read from the leaderboard with tune's own tie rule
(`kiln.compiler.perf.tune_report.choose`) and loaded with their runtime settings; then they and the peers are timed in
interleaved rounds at --threads threads, each in its own worker process as `kiln tune` times its candidates
(`benchmarks/peer_worker.py`; each round's runs last at least tune's MIN_ROUND_MS). Parts:

* `fp32`: tune's fp32 pick and its float pick (fp32/fp16/bf16) against `torch.onnx.export` + ONNX Runtime,
  `openvino.convert_model` (its default inference precision, bf16 on CPUs that have it, and f32 pinned) and
  `litert_torch.convert`; each with its cosine against PyTorch eager on the example. "fastest fp32 peer / kiln"
  counts only peers computing in fp32 (like for like); a bf16 peer is compared with tune's float pick.
* `int8`: tune's int8 pick against ORT `quantize_static` and `nncf.quantize` with their defaults on the same 50
  calibration rows, and PyTorch eager; agreement with eager fp32 on --probe held-back random inputs (top-1 for
  classifiers, the mean row cosine otherwise).
* `gflops`: ResNet-18's FLOPs / the fp32 and int8 picks' latency, against a 2048^2 SGEMM in torch, same run.
* `cost`: the wall time and the peak RSS (largest process: tune or one of its builds) of the resnet18 tune.

Every timing: the median of the per-round medians; spread = slowest / fastest round median.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_tune_peers import (  # noqa: E402
    Variant,
    eager_variant,
    fp32_peers,
    int8_peers,
    interleaved,
    kiln_variant,
    model_flops,
    sgemm_gflops,
)

CALIBRATION_ROWS = 50
FLOATS = ("fp32", "fp16", "bf16")


def _source(name: str) -> str:
    from benchmarks.models import MODELS

    return f"{ROOT / 'benchmarks' / 'models.py'}:{name}" if name in MODELS else f"zoo:{name}"


def _module(name: str) -> tuple[Any, tuple[Any, ...]]:
    from kiln.compiler.capture.zoo import ZOO

    from benchmarks.models import MODELS

    return (MODELS.get(name) or ZOO[name])()


def _rows(example: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` random rows shaped like the example's (normal floats; integers below the example's maximum)."""
    rng = np.random.default_rng(seed)
    shape = (count, *example.shape[1:])
    if example.dtype.kind in "iu":
        return rng.integers(0, int(example.max()) + 1, shape).astype(example.dtype)
    return rng.standard_normal(shape).astype(np.float32)


def tune(name: str, precisions: tuple[str, ...], calib: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    """`kiln tune` in a child process; its leaderboard with `cost` (wall s, peak RSS MB of the largest process)."""
    out = Path(args.work) / name
    board_file, cost_file = out / "leaderboard.json", out / "bench-cost.json"
    if args.reuse and board_file.is_file():
        board = json.loads(board_file.read_text())
        return board | {"cost": json.loads(cost_file.read_text()) if cost_file.is_file() else None}
    command = [sys.executable, "-m", "cli", "tune", _source(name), "--out", str(out), "--targets", args.targets,
               "--precisions", ",".join(precisions), "--threads", str(args.threads), "-q"]  # fmt: skip
    command += ["--calib", str(calib)] if calib is not None else []
    command += ["--no-plain"] if args.no_plain else []
    command += ["--rounds", "3", "--runs", "5"] if args.quick else []
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # so far: the largest child
    if done.returncode != 0 or not board_file.is_file():
        return {"winner": None, "why": f"kiln tune exited {done.returncode}: {done.stderr.strip()[-300:]}"}
    cost = {"wall_s": round(wall, 1), "peak_rss_mb": round(peak_mb), "precisions": list(precisions),
            "targets": args.targets, "builds": None}  # fmt: skip
    board = json.loads(board_file.read_text())
    cost["builds"] = board.get("builds")
    cost_file.write_text(json.dumps(cost))
    return board | {"cost": cost}


def pick(board: dict[str, Any], precisions: tuple[str, ...]) -> dict[str, Any] | None:
    """Tune's choice among its verified candidates of these precisions (its tie rule)."""
    from kiln.compiler.perf.tune_report import choose

    alive = [r for r in board.get("candidates", []) if r["precision"] in precisions]
    return choose(alive, board.get("objective", "latency"))[0] if alive else None


def _agreement(got: np.ndarray, want: np.ndarray) -> float:
    from kiln.compiler.metrics import is_classifier, mean_row_cosine, top1_matches

    if is_classifier(want):
        return top1_matches(got, want) / len(want)
    return mean_row_cosine(got, want)


def _time(variants: list[Variant], args: argparse.Namespace) -> dict[str, list[float]]:
    return interleaved(variants, args.rounds, args.runs)


def _line(model: str, variant: Variant, medians: list[float], quality: float, base_ms: float | None) -> dict:
    p50 = statistics.median(medians)
    return {"model": model, "variant": variant.label, "precision": variant.precision, "p50_ms": round(p50, 3),
            "spread": round(max(medians) / min(medians), 2), "round_medians_ms": [round(m, 3) for m in medians],
            "quality": quality, "vs_kiln": round(p50 / base_ms, 2) if base_ms else None}  # fmt: skip


def fp32_part(name: str, board: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Tune's fp32 and float picks against the peers' fp32 defaults, with each one's cosine on the example."""
    import torch
    from kiln.compiler.metrics import cosine

    module, inputs = _module(name)
    with torch.no_grad():
        reference = eager_variant(name, module, inputs, args.threads).predict([t.numpy() for t in inputs])
    picks = {p["name"]: p for p in (pick(board, ("fp32",)), pick(board, FLOATS)) if p}
    if not picks:
        return {"model": name, "error": f"no fp32 candidate: {board.get('why')}"}
    variants: list[Variant] = [kiln_variant(p, args.threads) for p in picks.values()]
    found = fp32_peers(module, inputs, args.threads, Path(args.work) / name)
    variants += [v for v in found if isinstance(v, Variant)]
    medians = _time(variants, args)
    base = statistics.median(medians[variants[0].label])
    rows = []
    for variant in variants:
        quality = round(cosine(variant.predict([t.numpy() for t in inputs]), reference), 7)
        rows.append(_line(name, variant, medians[variant.label], quality, base))
    floor = rows[0]["quality"] - 1e-6  # equal or better parity than the fp32 pick (to 6 digits)
    like = [r for r in rows[len(picks) :] if r["precision"] == "fp32" and r["quality"] >= floor]
    fastest = min(like, key=lambda r: r["p50_ms"], default=None)
    return {"model": name, "rows": rows, "failures": [v for v in found if isinstance(v, str)],
            "fastest_fp32_peer": fastest and fastest["variant"],
            "fp32_ratio": round(fastest["p50_ms"] / rows[0]["p50_ms"], 2) if fastest else None}  # fmt: skip


def int8_part(name: str, board: dict[str, Any], calib: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Tune's int8 pick against the quantizers' defaults on the same rows, and eager; agreement on held-back rows."""
    import torch

    chosen = pick(board, ("int8",))
    if chosen is None:
        return {"model": name, "error": "no int8 candidate passed"}
    module, inputs = _module(name)
    probe = _rows(inputs[0].numpy(), args.probe, seed=7)
    eager = eager_variant(name, module, inputs, args.threads)
    variants = [kiln_variant(chosen, args.threads), eager]
    found = int8_peers(module, inputs, calib, args.threads, Path(args.work) / name)
    variants += [v for v in found if isinstance(v, Variant)]
    medians = _time(variants, args)
    base = statistics.median(medians[variants[0].label])
    with torch.no_grad():
        want = np.concatenate([eager.predict([row[None]]) for row in probe])
    rows = []
    for variant in variants:
        got = np.concatenate([variant.predict([row[None]]) for row in probe])
        rows.append(_line(name, variant, medians[variant.label], round(_agreement(got, want), 4), base))
    peers = [r for r in rows[2:] if r["quality"] >= rows[0]["quality"]]
    faster = min(rows[2:], key=lambda r: r["p50_ms"], default=None)
    return {"model": name, "rows": rows, "failures": [v for v in found if isinstance(v, str)],
            "int8_ratio": round(faster["p50_ms"] / base, 2) if faster else None,
            "faster_peer": faster and faster["variant"], "peers_at_equal_agreement": [r["variant"] for r in peers],
            "eager_ratio": rows[1]["vs_kiln"]}  # fmt: skip


def gflops_part(results: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """ResNet-18's fp32 and int8 picks' rates (FLOPs / p50) against torch's SGEMM rate now."""
    module, inputs = _module("resnet18")
    flops = model_flops(module, inputs)
    gemm = sgemm_gflops(args.threads)
    found: dict[str, Any] = {"flops": flops, "sgemm_gflops": round(gemm, 1), "threads": args.threads}
    for part in ("fp32", "int8"):
        rows = results.get(part, {}).get("resnet18", {}).get("rows")
        if rows:
            rate = flops / rows[0]["p50_ms"] / 1e6
            found[part] = {"variant": rows[0]["variant"], "gflops": round(rate, 1), "of_sgemm": round(rate / gemm, 3)}
    return found


def _table(title: str, rows: list[dict[str, Any]], quality: str) -> str:
    lines = [f"\n### {title}\n", f"| model | variant | precision | p50 ms | spread | {quality} | / kiln |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['precision']} | {r['p50_ms']:.3f} | {r['spread']:.2f} | "
                     f"{r['quality']} | {r['vs_kiln']:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def report(results: dict[str, Any]) -> str:
    """Markdown: one table per part, the ratios and the failures under it."""
    from kiln.compiler.host import host_info

    host = host_info()
    text = [f"{time.strftime('%Y-%m-%d')} {host['cpu']}, {host['cores']} cores, flags {' '.join(host['cpu_flags'])}"]
    for part, quality, ratio in (("fp32", "cosine vs eager", "fp32_ratio"), ("int8", "agreement", "int8_ratio")):
        done = [r for r in results.get(part, {}).values() if "rows" in r]
        if done:
            text.append(_table(part, [row for r in done for row in r["rows"]], quality))
            ratios = [r[ratio] for r in done if r[ratio]]
            text += [f"- {r['model']}: {ratio} {r[ratio]}" for r in done]
            if ratios:
                text.append(f"- median {ratio}: {statistics.median(ratios):.2f}")
        text += [f"- {r['model']}: {r['error']}" for r in results.get(part, {}).values() if "error" in r]
        text += [f"- {f}" for r in done for f in r["failures"]]
    if "gflops" in results:
        text.append(f"\n### gflops\n\n```\n{json.dumps(results['gflops'])}\n```")
    if "cost" in results:
        text.append(f"\n### cost\n\n```\n{json.dumps(results['cost'])}\n```")
    return "\n".join(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet18,bert4,cnn,mobilenet,transformer", help="fp32 part's models")
    parser.add_argument("--int8-models", default="resnet18,cnn,mobilenet", help="int8 part's (single input)")
    parser.add_argument("--parts", default="fp32,int8,gflops,cost")
    parser.add_argument("--targets", default="onnx,openvino,tflite")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--probe", type=int, default=100, help="held-back inputs for int8 agreement")
    parser.add_argument("--work", default="/tmp/kiln-bench-tune")
    parser.add_argument("--reuse", action="store_true", help="use a leaderboard already in --work/MODEL")
    parser.add_argument("--no-plain", action="store_true", help="leave tune's plain -O0 candidates out (faster)")
    parser.add_argument("--quick", action="store_true", help="resnet18 and cnn, 3 rounds, no -O0 candidates")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    args = parser.parse_args()
    if args.quick:
        args.models, args.int8_models, args.rounds, args.runs, args.no_plain = (
            "resnet18,cnn",
            "resnet18,cnn",
            3,
            5,
            True,
        )
    import torch
    from kiln.compiler.progress import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    fp32_models = [m.strip() for m in args.models.split(",")] if "fp32" in parts else []
    int8_models = [m.strip() for m in args.int8_models.split(",")] if parts & {"int8", "gflops"} else []
    results: dict[str, Any] = {"fp32": {}, "int8": {}}
    for name in dict.fromkeys(fp32_models + int8_models + (["resnet18"] if "cost" in parts else [])):
        precisions = ("fp32", "fp16", "bf16", "int8") if name == "resnet18" and "cost" in parts else ("fp32", "bf16")
        calib = None
        if name in int8_models or "int8" in precisions:
            precisions = tuple(dict.fromkeys((*precisions, "int8")))
            rows = _rows(_module(name)[1][0].numpy(), CALIBRATION_ROWS, seed=0)
            calib = Path(args.work) / f"{name}-calib.npz"
            calib.parent.mkdir(parents=True, exist_ok=True)
            np.savez(calib, arg0=rows)
        print(f"[bench_tune] {name}: kiln tune {','.join(precisions)} ...", file=sys.stderr, flush=True)
        board = tune(name, precisions, calib, args)
        if name == "resnet18" and "cost" in parts:
            results["cost"] = board.get("cost") or {"error": board.get("why")}
        if name in fp32_models:
            results["fp32"][name] = fp32_part(name, board, args)
        if name in int8_models and calib is not None:
            results["int8"][name] = int8_part(name, board, np.load(calib)["arg0"], args)
        if args.json:  # so far, in case a later model stops the run
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if "gflops" in parts:
        results["gflops"] = gflops_part(results, args)
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
