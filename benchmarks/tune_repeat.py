#!/usr/bin/env python3
"""Does `kiln tune` make the same choice when it is run again, and does its choice hold up against the peers'
defaults when timed again in fresh processes (issue 30)?

Run by hand::

    .venv/bin/python benchmarks/tune_repeat.py --json repeat.json        # four models, three tunes each
    .venv/bin/python benchmarks/tune_repeat.py --models resnet18 --repeats 2 --precisions fp32,int8

**Repeatability.** For each model (benchmarks/models.py, random weights: `resnet18`, `bert_mini` and `vit_tiny`
from `transformers` configs, `mobilenet_v2`), `kiln tune` runs --repeats times in a child process into one
directory (--work/MODEL): the first run builds, the others reuse the builds and time everything again (the noise
probe, the ranking, the confirmation in fresh processes), as a user who runs the command again would. The table
gives each run's pick, whether it was decided, the probability that it is faster than each other contender, and
the candidates it was tied with. A model is *consistent* when every decided run names the same pick and every
undecided run names that pick among the tied ones.

**Against the peers.** Each decided pick (with --all-picks, every pick), as published in --work/MODEL/best/ by the
last run, is timed again against the peers' defaults: ONNX Runtime on `torch.onnx.export`'s model,
`openvino.convert_model` at its default and at f32 precision, `litert_torch.convert` (each runtime at its own
thread count, as a user gets it, or at --threads where it has a setting: litert_torch has none;
`benchmarks/bench_tune_peers.py`), by the confirmation's method
(`kiln.compiler.perf.confirm`: blocks of fresh processes, each one alone and warm, alternating rounds) for up to
--peer-budget seconds, with the margin of `kiln tune` (3%, or the machine's noise when larger). A peer is within
the pick's accuracy budget when its cosine against PyTorch eager on the example is at least the pick's (to 6
digits); the pick *holds up* when no such peer beats it (P(peer faster by over the margin) >= 0.95).

The load average is recorded with every run: on a shared machine the timings are bound by its noise, and most
differences cannot be decided; rerun on a quiet machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ("resnet18", "bert_mini", "vit_tiny", "mobilenet_v2")
PEER_MODULE = "benchmarks.peer_worker"


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def tune_once(name: str, run: int, args: argparse.Namespace) -> dict[str, Any]:
    """One `kiln tune` of `name` into --work/NAME (a child process); what its leaderboard says of its pick."""
    out = Path(args.work) / name
    command = [sys.executable, str(ROOT / "cli.py"), "tune", f"{ROOT / 'benchmarks' / 'models.py'}:{name}",
               "--out", str(out), "--targets", args.targets, "--precisions", args.precisions,
               "--confirm-budget", str(args.confirm_budget), "-q"]  # fmt: skip
    command += ["--no-plain"] if args.no_plain else []
    command += ["--threads", str(args.threads)] if args.threads else []
    load, started = _load(), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = round(time.perf_counter() - started, 1)
    board_file = out / "leaderboard.json"
    if done.returncode != 0 or not board_file.is_file():
        return {"model": name, "run": run, "error": f"kiln tune exited {done.returncode}: {done.stderr.strip()[-300:]}"}
    shutil.copy(board_file, out / f"leaderboard-{run}.json")
    shutil.copy(out / "leaderboard.md", out / f"leaderboard-{run}.md")
    board = json.loads(board_file.read_text())
    winner = board.get("winner") or {}
    found = board.get("confirmation") or {}
    return {"model": name, "run": run, "pick": winner.get("name"), "decided": board.get("decided"),
            "confidence": board.get("confidence"), "tied": board.get("tied") or [], "why": board.get("why"),
            "noise_pct": (board.get("noise") or {}).get("percent"), "blocks": found.get("blocks"),
            "candidates": len(board.get("candidates", [])), "wall_s": wall, "load_before": load,
            "load_after": _load(), "directory": str(out / "best")}  # fmt: skip


def consistent(runs: list[dict[str, Any]]) -> bool:
    """Every decided run names the same pick, and every undecided run names it among its tied candidates."""
    done = [r for r in runs if "error" not in r]
    decided = {r["pick"] for r in done if r["decided"]}
    if len(decided) > 1 or len(done) < len(runs):
        return False
    if not decided:
        return len({r["pick"] for r in done}) == 1 or all(len(r["tied"]) > 1 for r in done)
    (pick,) = decided
    return all(r["decided"] or pick in r["tied"] for r in done)


def against_peers(name: str, pick: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The published pick against the peers' defaults, timed in blocks of fresh processes; each peer's cosine, its
    median time over the pick's, the probability the pick is faster, and whether the peer beats it."""
    import torch
    from kiln.compiler.metrics import cosine
    from kiln.compiler.perf.confirm import Comparison, ConfirmSettings, Contender, time_blocks
    from kiln.compiler.perf.noise import measure
    from kiln.compiler.perf.tune import MIN_ROUND_MS
    from kiln.compiler.perf.tune_confirm import margin
    from kiln.compiler.progress import Progress
    from kiln.compiler.types import Manifest

    from benchmarks.bench_tune_peers import Variant, fp32_peers, kiln_variant
    from benchmarks.models import MODELS as FACTORIES

    module, inputs = FACTORIES[name]()
    with torch.no_grad():
        output = module(*inputs)
    reference = output.numpy()
    best = Path(pick["directory"])
    precision = Manifest.read(best).precision
    row = {"directory": str(best), "runtime_settings": {}, "precision": precision, "name": pick["pick"]}
    variants: list[Variant] = [kiln_variant(row, args.threads)]
    found = fp32_peers(module, inputs, args.threads, Path(args.work) / name / "peers")
    variants += [v for v in found if isinstance(v, Variant)]
    example = [t.numpy() for t in inputs]
    cosines = [float(cosine(v.predict(example), reference)) for v in variants]
    contenders = [Contender(v.label, v.job, PEER_MODULE) for v in variants]
    failures = [v for v in found if isinstance(v, str)]
    del variants, found  # the runtimes loaded here to measure accuracy: none stays beside the timed ones
    gc.collect()
    progress = Progress()
    noise = measure(progress, args.threads)
    needed = margin(noise)
    settings = ConfirmSettings(args.peer_budget, needed, runs=10, min_round_ms=MIN_ROUND_MS)
    blocks = time_blocks(contenders, settings, progress)
    rows = []
    for index in range(1, len(contenders)):
        if index in blocks.failed or 0 in blocks.failed:
            rows.append({"peer": contenders[index].label, "failure": blocks.failed.get(index, blocks.failed.get(0))})
            continue
        mine = Comparison(contenders[0].label, contenders[index].label, blocks.ratios(0, index))
        theirs = Comparison(contenders[index].label, contenders[0].label, blocks.ratios(index, 0))
        rows.append({"peer": contenders[index].label, "cosine": round(cosines[index], 7),
                     "in_budget": cosines[index] >= cosines[0] - 1e-6, "median_ratio": round(mine.median_ratio, 3),
                     "p_pick_faster": round(mine.confidence, 3), "pick_beats_peer": mine.decided(needed),
                     "peer_beats_pick": theirs.decided(needed)})  # fmt: skip
    kept = [r for r in rows if "failure" not in r]
    return {"model": name, "pick": pick["pick"], "pick_cosine": round(cosines[0], 7), "blocks": blocks.count,
            "seconds": blocks.seconds, "margin_pct": round(100 * needed, 2), "noise_pct": noise.percent,
            "peers": rows, "peer_failures": failures,
            "holds_up": not any(r["in_budget"] and r["peer_beats_pick"] for r in kept),
            "undecided": [r["peer"] for r in kept if r["in_budget"] and not r["pick_beats_peer"]
                          and not r["peer_beats_pick"]],
            "pick_ms": round(statistics.median(statistics.median(b) for b in blocks.medians[0]), 4)
            if blocks.medians[0] else None, "load": _load()}  # fmt: skip


def _verdict(row: dict[str, Any]) -> str:
    if row["peer_beats_pick"]:
        return "PEER FASTER"
    return "pick faster" if row["pick_beats_peer"] else "not decided"


def report(runs: list[dict[str, Any]], peers: list[dict[str, Any]]) -> str:
    """Markdown: the runs, each model's consistency, then the picks against the peers."""
    from kiln.compiler.host import host_info

    host = host_info()
    lines = [f"{time.strftime('%Y-%m-%d %H:%M')} {host['cpu']}, {host['cores']} cores, flags "
             f"{' '.join(host['cpu_flags'])}", "", "### Repeatability", "",
             "| model | run | pick | decided | P(pick faster) | tied with | noise % | blocks | wall s | load avg |",
             "|---|---:|---|---|---:|---|---:|---:|---:|---|"]  # fmt: skip
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['run']} | error: {r['error']} | | | | | | | |")
            continue
        tied = ", ".join(t for t in r["tied"] if t != r["pick"])
        confidence = "n/a" if r["confidence"] is None else f"{r['confidence']:.3f}"
        lines.append(f"| {r['model']} | {r['run']} | {r['pick']} | {'yes' if r['decided'] else 'no'} | {confidence} "
                     f"| {tied} | {r['noise_pct']} | {r['blocks']} | {r['wall_s']} | {r['load_before']} -> "
                     f"{r['load_after']} |")  # fmt: skip
    lines.append("")
    for model in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == model]
        lines.append(f"- {model}: {'consistent' if consistent(mine) else 'NOT consistent'}")
    if peers:
        lines += ["", "### Against the peers' defaults (fresh-process blocks)", "",
                  "| model | pick | peer | cosine | in budget | peer / pick | P(pick faster) | verdict |",
                  "|---|---|---|---:|---|---:|---:|---|"]  # fmt: skip
        for p in peers:
            for r in p["peers"]:
                if "failure" in r:
                    lines.append(f"| {p['model']} | {p['pick']} | {r['peer']} | failed: {r['failure']} | | | | |")
                    continue
                lines.append(f"| {p['model']} | {p['pick']} ({p['pick_ms']} ms) | {r['peer']} | {r['cosine']} | "
                             f"{'yes' if r['in_budget'] else 'no'} | {r['median_ratio']:.2f}x | {r['p_pick_faster']} "
                             f"| {_verdict(r)} |")  # fmt: skip
        lines.append("")
        for p in peers:
            held = "holds up" if p["holds_up"] else "is beaten by a peer within its accuracy budget"
            held += f" (not decided against {', '.join(p['undecided'])})" if p["holds_up"] and p["undecided"] else ""
            lines.append(f"- {p['model']}: {p['pick']} {held}; {p['blocks']} blocks, {p['seconds']} s, margin "
                         f"{p['margin_pct']}% (machine noise {p['noise_pct']}%), load {p['load']}; peers that did not "
                         f"convert or run: {'; '.join(p['peer_failures']) or 'none'}")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=3, help="kiln tune runs per model (default 3)")
    parser.add_argument("--targets", default="onnx,openvino,tflite")
    parser.add_argument("--precisions", default="fp32,bf16,int8")
    parser.add_argument("--no-plain", action="store_true", help="leave tune's plain -O0 candidates out (faster)")
    parser.add_argument("--threads", type=int, help="kiln tune --threads, and the peers' (default: each runtime's)")
    parser.add_argument("--confirm-budget", type=float, default=90.0, help="kiln tune --confirm-budget (default 90)")
    parser.add_argument("--peer-budget", type=float, default=120.0, help="seconds of fresh-process blocks per pick")
    parser.add_argument("--all-picks", action="store_true", help="time undecided picks against the peers too")
    parser.add_argument("--no-peers", action="store_true", help="only the repeated tunes")
    parser.add_argument("--reuse", metavar="FILE", help="take the runs from an earlier --json FILE, tune no more")
    parser.add_argument("--work", default="/tmp/kiln-tune-repeat")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    args = parser.parse_args()
    from kiln.compiler.progress import quiet_libraries

    quiet_libraries()
    runs: list[dict[str, Any]] = []
    peers: list[dict[str, Any]] = []
    earlier = json.loads(Path(args.reuse).read_text())["runs"] if args.reuse else []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if args.reuse:
            runs += [r for r in earlier if r["model"] == name]
        for run in range(1, 0 if args.reuse else args.repeats + 1):
            print(f"[tune_repeat] {name}: kiln tune run {run}/{args.repeats} (load {_load()}) ...", file=sys.stderr,
                  flush=True)  # fmt: skip
            runs.append(tune_once(name, run, args))
            print(f"[tune_repeat]   -> {runs[-1].get('pick')} decided={runs[-1].get('decided')} "
                  f"{runs[-1].get('error', '')}", file=sys.stderr, flush=True)  # fmt: skip
        last = runs[-1] if runs and runs[-1]["model"] == name else {"error": "no run"}
        if not args.no_peers and "error" not in last and (last["decided"] or args.all_picks):
            print(f"[tune_repeat] {name}: {last['pick']} against the peers ...", file=sys.stderr, flush=True)
            peers.append(against_peers(name, last, args))
        if args.json:  # so far, in case a later model stops the run
            Path(args.json).write_text(json.dumps({"runs": runs, "peers": peers}, indent=2, default=str))
    print(report(runs, peers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
