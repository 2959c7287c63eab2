#!/usr/bin/env python3
"""What the KV cache buys: per-token decode latency of a text-generation export with its cache vs recomputing the
whole sequence every token, on the same artifact and runtime.

Run by hand::

    .venv/bin/python benchmarks/bench_generate.py
    .venv/bin/python benchmarks/bench_generate.py --context 256 --repeat 30 --targets onnx,openvino --json gen.json

A Llama-style causal LM of about 20M parameters (LlamaConfig: hidden 320, 6 layers, 8 heads / 4 KV heads,
vocab 16000, random weights) is exported with `--task text-generation` (each artifact passes the 32-token greedy
gate). At context length C: `cached` is one decode step with a past of C-1 tokens and 1 new token; `recompute` is the
step a cache-less model must take for the same token: all C tokens with an empty past. The two are timed interleaved
(one of each per round, `--repeat` rounds after `--warmup`), and the row gives their medians and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def build_model() -> Any:
    """The ~20M-parameter Llama-style causal LM (random weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=320, intermediate_size=1280, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
        vocab_size=16000, max_position_embeddings=1024,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def step_feeds(run: Any, layout: Any, context: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Feeds of the cached step (past = context-1 tokens from a real prefill, 1 new token) and of the recomputing
    step (all `context` tokens, empty past)."""
    import numpy as np
    from kiln.compiler.generation.decoding import CachedDecoder, input_names

    ids = list(np.random.default_rng(0).integers(0, 16000, context))
    decoder = CachedDecoder(run, layout)
    decoder(ids[:-1])
    names = input_names(layout.layers)
    cached = {
        "input_ids": np.asarray([ids[-1:]], np.int64),
        "attention_mask": np.ones((1, context), np.int64),
        "position_ids": np.asarray([[context - 1]], np.int64),
        **dict(zip(names[3:], decoder.cache)),
    }
    empty = [c[:, :, :0] for c in decoder.cache]
    full = {
        "input_ids": np.asarray([ids], np.int64),
        "attention_mask": np.ones((1, context), np.int64),
        "position_ids": np.arange(context, dtype=np.int64)[None],
        **dict(zip(names[3:], empty)),
    }
    return cached, full


def time_interleaved(
    run: Any, cached: dict[str, Any], full: dict[str, Any], repeat: int, warmup: int
) -> dict[str, float]:
    """Median ms of the cached and the recomputing step, timed alternately."""
    for _ in range(warmup):
        run(cached), run(full)
    times: dict[str, list[float]] = {"cached": [], "recompute": []}
    for _ in range(repeat):
        for name, feeds in (("cached", cached), ("recompute", full)):
            start = time.perf_counter()
            run(feeds)
            times[name].append((time.perf_counter() - start) * 1000)
    row = {name: round(statistics.median(values), 3) for name, values in times.items()}
    row["ratio"] = round(row["recompute"] / row["cached"], 2)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--targets", default="onnx,openvino")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()

    import torch
    from kiln.compiler.export.loading import load
    from kiln.compiler.export.pipeline import export_targets
    from kiln.compiler.generation.decoding import CacheLayout
    from kiln.compiler.progress import quiet_libraries

    quiet_libraries()
    model = build_model()
    params = sum(p.numel() for p in model.parameters())
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-gen-") as scratch:
        results = export_targets(
            model, args.targets, Path(scratch) / "out", example_inputs=(torch.zeros(1, 8, dtype=torch.long),)
        )
        for result in results:
            assert result.published and result.manifest is not None, f"{result.target} did not pass parity"
            loaded = load(result.directory)
            cached, full = step_feeds(loaded.run, CacheLayout.from_specs(loaded.inputs), args.context)
            row = {
                "target": result.target,
                "context": args.context,
                **time_interleaved(loaded.run, cached, full, args.repeat, args.warmup),
            }
            row["generation"] = {k: result.manifest.parity.generation[k] for k in ("identical", "max_abs_logit_err")}
            rows.append(row)
    print(f"Llama-style causal LM, {params / 1e6:.1f}M parameters, context {args.context}, batch 1, fp32, CPU")
    print(f"{'runtime':<10} {'cached ms/token':>16} {'recompute ms/token':>19} {'ratio':>7}")
    for row in rows:
        print(f"{row['target']:<10} {row['cached']:>16.3f} {row['recompute']:>19.3f} {row['ratio']:>6.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"parameters": params, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
