"""The command line's argument parser: every subcommand and its flags (cli.py runs them)."""

from __future__ import annotations

import argparse
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Export PyTorch models to deployable artifacts, "
        "each proven to match PyTorch before it is published.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    _export_parser(sub)
    _other_parsers(sub)
    _bench_parser(sub)
    _tune_parser(sub)
    _matrix_parser(sub)
    return parser


class _Symmetric(argparse.Action):
    """`--activations symmetric|asymmetric` as the export option `symmetric_activations` (True, False)."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, values == "symmetric")


def _export_parser(sub: Any) -> None:
    """`kiln export` and its flags (one long list: every flag of the export, in the order --help shows). Each
    export option's `dest` is its keyword of `kiln.export` (`kiln.compiler.export.options.KEYWORDS`): `cli.py`
    hands them over as they are."""
    export = sub.add_parser(
        "export",
        help="export a model to one or more targets",
        description="MODEL is zoo:NAME, path/file.py:factory (runs that file's code), file.pt2, file.onnx, or a "
        "Hugging Face checkpoint folder (config.json + *.safetensors).",
    )
    export.add_argument("model", help="zoo:NAME | file.py:factory | file.pt2 | file.onnx | checkpoint folder")
    export.add_argument("--target", "-t", required=True, help="target name, comma list, or all (see `kiln targets`)")
    export.add_argument("--out", "-o", help="output directory (default: exports/MODEL)")
    export.add_argument(
        "--precision",
        help="fp32, fp16, bf16, int8-dynamic, int8 where the target supports it (default: the target's own, "
        "fp32; int8 for edgetpu); for text generation int8 and int4 are weight-only",
    )
    export.add_argument(
        "--calib", metavar="SOURCE", help="int8 calibration data: FILE.npz, DIR of .npy/.npz, or file.py:loader"
    )
    export.add_argument("--calib-samples", type=int, default=100, metavar="N", help="calibration samples (default 100)")
    export.add_argument(
        "--calib-method",
        default="minmax",
        metavar="METHOD",
        help="how int8 ranges are chosen from the calibration samples: minmax (default), percentile or entropy",
    )
    export.add_argument(
        "--per-tensor",
        dest="per_channel",
        action="store_false",
        help="one int8 scale per weight tensor, not per channel",
    )
    export.add_argument(
        "--activations",
        dest="symmetric_activations",
        action=_Symmetric,
        choices=("symmetric", "asymmetric"),
        help="int8 activation ranges (default: each runtime's fast choice)",
    )
    export.add_argument(
        "--max-drop",
        type=float,
        metavar="X",
        help="accuracy-aware int8: revert the most sensitive layers to float until the metric drops at most X",
    )
    export.add_argument(
        "--metric",
        metavar="file.py:fn",
        help="metric for --max-drop, fn(outputs, inputs) -> float, higher is better (default: agreement with fp32)",
    )
    export.add_argument("--io", metavar="OPTS", help="I/O options: nhwc (channels-last image inputs and outputs)")
    export.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="device to compile for, for targets that compile for one (aoti/cuda: default cuda when present)",
    )
    export.add_argument(
        "--dynamic-batch", metavar="MIN:MAX", help="make dim 0 of every input dynamic (one symbol, `batch`)"
    )
    export.add_argument(
        "--dynamic",
        action="append",
        metavar="[SYM=]NAME:AXIS[,NAME:AXIS]=MIN:MAX[:OPT]",
        help="make an input axis dynamic (repeatable), e.g. input_ids:1=8:128:64; axes listed after one SYM= share "
        "that symbol, and separate specs with the same range and example size share one too; parity runs at "
        "MIN, OPT (default: the example's size), MAX and a random size",
    )
    export.add_argument(
        "--buckets",
        metavar="SYM=N,N",
        help="for static-shape targets (tpu) with --dynamic: build one program per size, e.g. seq=32,64,128",
    )
    export.add_argument(
        "--task",
        metavar="TASK",
        help="text-generation: a causal LM's decoder with its KV cache as inputs/outputs, gated on 32 greedy tokens "
        "(default for a transformers *ForCausalLM); forward: one full-sequence forward; for a checkpoint folder "
        "also text-classification, token-classification, image-classification, fill-mask, feature-extraction or "
        "encoder (an encoder-decoder's encoder); default: from its config's architecture",
    )
    export.add_argument(
        "--shape",
        action="append",
        metavar="NAME=DIMS",
        help="a checkpoint folder's example input shape (repeatable), e.g. input_ids=1x64, pixel_values=1x3x384x384",
    )
    export.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a checkpoint folder run its own Python code (auto_map): only for checkpoints you trust",
    )
    export.add_argument(
        "--cache-size",
        type=int,
        metavar="C",
        help="text-generation on tflite/tpu/executorch: the static KV cache's length in tokens (default 64)",
    )
    export.add_argument(
        "--llm-format",
        choices=("genai", "stateless"),
        help="text-generation on onnx/openvino: genai (default) writes the runtime's own LLM format, an "
        "onnxruntime-genai folder or OpenVINO GenAI's stateful model, with the tokenizer when the model has one; "
        "stateless: Kiln's step graph, the KV cache as inputs and outputs",
    )
    export.add_argument(
        "--group-size",
        type=int,
        metavar="G",
        help="text-generation at int4: input channels per weight scale, 16/32/64/128/256 (default 128; on onnx "
        "also int8's blocks)",
    )
    export.add_argument(
        "--weights",
        choices=("sym", "asym"),
        help="text-generation at int8/int4: symmetric weights (default) or with zero points (asym)",
    )
    export.add_argument("--inputs", action="append", metavar="FILE.npz", help="extra parity inputs (repeatable)")
    export.add_argument("--atol", type=float, help="absolute tolerance override")
    export.add_argument("--rtol", type=float, help="relative tolerance override")
    export.add_argument("--min-cosine", type=float, help="minimum cosine similarity per output (override)")
    export.add_argument(
        "--min-snr", dest="min_snr_db", type=float, metavar="DB", help="minimum signal-to-noise ratio in dB (override)"
    )
    export.add_argument("--min-top1", type=float, help="minimum top-1 agreement of classifier outputs (override)")
    export.add_argument(
        "--min-channel-cosine", type=float, help="minimum cosine of the worst channel, about its own mean (override)"
    )
    export.add_argument(
        "--min-channel-snr",
        dest="min_channel_snr_db",
        type=float,
        metavar="DB",
        help="minimum SNR of the worst channel, in dB (override)",
    )
    export.add_argument("--samples", type=int, default=4, help="parity input sets besides batch-range ones (default 4)")
    export.add_argument(
        "-O",
        dest="opt_level",
        type=int,
        choices=(0, 1, 2, 3),
        default=2,
        help="optimization level: 0 none (not even the ONNX exporter's own optimizer), 1 cleanup, 2 fusion (default), "
        "3 target-specific",
    )
    export.add_argument(
        "--passes", dest="adjust_passes", metavar="+NAME,-NAME", help="add or remove passes (see `kiln passes`)"
    )
    export.add_argument("--dump-passes", metavar="DIR", help="write each target's graph after every pass into DIR")
    where = export.add_mutually_exclusive_group()
    where.add_argument(
        "--localize",
        action="store_true",
        default=None,
        help="find the first module that diverges from PyTorch even if parity passes (default: when it fails)",
    )
    where.add_argument("--no-localize", dest="localize", action="store_false", help="do not localize a parity failure")
    export.add_argument(
        "--no-parity-gate", dest="parity_gate", action="store_false", help="publish even if parity fails (marked)"
    )
    export.add_argument("--force", action="store_true", help="replace an existing output directory")
    export.add_argument(
        "--all-or-nothing",
        action="store_true",
        help="with several targets, stop at the first that fails to build and publish nothing "
        "(default: publish the others, report the failure, exit 1)",
    )
    export.add_argument(
        "--wait", action="store_true", help="if another export to --out is running, wait for it instead of failing"
    )
    _trust_flag(export)
    _output_flags(export)


def _other_parsers(sub: Any) -> None:
    """`kiln targets`, `passes`, `verify`, `run` and `quant-report`."""
    targets = sub.add_parser("targets", help="list targets and whether they run here")
    targets.add_argument("--json", action="store_true", help="machine-readable output")

    passes = sub.add_parser("passes", help="list the graph passes and the -O level that runs each")
    passes.add_argument("--json", action="store_true", help="machine-readable output")

    verify = sub.add_parser("verify", help="re-run parity on an existing export")
    verify.add_argument("export_dir")
    verify.add_argument("--model", help="model source to recompute the reference (default: stored reference)")
    _trust_flag(verify)
    _output_flags(verify)

    debug = sub.add_parser("debug", help="find the first module where an export diverges from its PyTorch model")
    debug.add_argument("export_dir", help="an export directory, or its .rejected/<target> directory")
    debug.add_argument("--model", required=True, help="the PyTorch model source the export was made from")
    debug.add_argument("--all", action="store_true", help="build every module boundary: the error of each, in order")
    debug.add_argument("--calib", metavar="SOURCE", help="int8 calibration data the export used (default: random)")
    debug.add_argument(
        "--bisect", action="store_true", help="build prefixes even where the runtime can expose the boundaries"
    )
    debug.add_argument(
        "--html", metavar="FILE", help="write the error profile as one self-contained page (default: none)"
    )
    _trust_flag(debug)
    _output_flags(debug)

    run = sub.add_parser("run", help="run an export on inputs from an .npz, or generate tokens with a decoder")
    run.add_argument("export_dir")
    what = run.add_mutually_exclusive_group(required=True)
    what.add_argument("--inputs", metavar="FILE.npz", help="arrays named like the model's inputs")
    what.add_argument(
        "--generate",
        metavar="IDS",
        nargs="?",
        const="",
        help='greedy-decode after these prompt token ids ("1,5,9,3"), or after --prompt TEXT: text generation',
    )
    run.add_argument(
        "--prompt",
        metavar="TEXT",
        help="with --generate: a text prompt, encoded (and the tokens decoded) by the tokenizer the export carries",
    )
    run.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        metavar="N",
        help="tokens --generate adds (default 32; at most 4096, and within the model's positions)",
    )
    run.add_argument("--output", default="outputs.npz", help="where to save outputs (default outputs.npz)")
    run.add_argument("--target", help="which target of a multi-target export")
    _trust_flag(run)
    _output_flags(run)
    quant = sub.add_parser(
        "quant-report",
        help="per-layer error of a quantized export vs fp32, worst first, with PyTorch module names",
    )
    quant.add_argument("export_dir")
    quant.add_argument("--top", type=int, metavar="N", help="show the N worst layers only")
    quant.add_argument("--json", action="store_true", help="print one machine-readable JSON result")


def _bench_parser(sub: Any) -> None:
    """`kiln bench` and its flags."""
    bench = sub.add_parser(
        "bench",
        help="time existing exports here, in interleaved rounds (optionally against PyTorch eager)",
        description="Time each export (each target of a multi-target export) in its own process, in interleaved "
        "rounds; report latency percentiles, the spread across rounds, load and first-inference time, peak RSS "
        "and size; write bench.json beside each manifest.",
    )
    bench.add_argument("export_dirs", nargs="+", metavar="OUT", help="export directories (kiln export --out)")
    bench.add_argument("--batch", type=int, metavar="N", help="time at batch N (within the export's dynamic range)")
    bench.add_argument("--threads", type=int, metavar="N", help="runtime threads (default: each runtime's default)")
    bench.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    bench.add_argument("--runs", type=int, default=20, help="timed runs per candidate per round (default 20)")
    bench.add_argument("--warmup", type=int, default=5, help="untimed runs per candidate before round 1 (default 5)")
    bench.add_argument(
        "--compare-eager", action="store_true", help="also time PyTorch eager and torch.compile in the same rounds"
    )
    bench.add_argument(
        "--model", metavar="SOURCE", help="the PyTorch model for --compare-eager (default: the export's)"
    )
    bench.add_argument(
        "--compile-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds torch.compile may take before it is left out (default 300)",
    )
    _round_timeout_flag(bench)
    bench.add_argument("--no-write", action="store_true", help="do not write bench.json into the export directories")
    _trust_flag(bench)
    _output_flags(bench)


def _tune_parser(sub: Any) -> None:
    """`kiln tune` and its flags."""
    tune = sub.add_parser(
        "tune",
        help="build and verify every candidate, time the survivors, publish the fastest to OUT/best",
        description="Candidates: targets x precisions (x the plain -O0 export, NHWC image I/O, a dynamic batch, x "
        "runtime settings); each verified by "
        "the parity gate, the survivors timed in interleaved rounds; the winner goes to OUT/best, the leaderboard to "
        "OUT/leaderboard.{md,json,html}. A killed tune resumes (OUT/builds/results.jsonl).",
    )
    tune.add_argument("model", metavar="MODEL", nargs="?", help="zoo:NAME, file.py:factory, file.pt2")
    tune.add_argument("--out", required=True, help="output directory")
    tune.add_argument(
        "--targets", help="comma list (default: the targets `kiln targets --json` marks tuned_by_default)"
    )
    tune.add_argument("--precisions", help="comma list (default fp32,fp16,bf16,int8)")
    tune.add_argument("--objective", default="latency", help="latency (default), throughput or size")
    tune.add_argument("--threads", help="thread count(s) to time at, e.g. 2 or 1,2 (default: each runtime's)")
    tune.add_argument(
        "--io", help="image I/O layouts to build: nchw, nhwc or nchw,nhwc (default: NHWC too, at fp32 only)"
    )
    tune.add_argument(
        "--batch",
        type=int,
        help="the batch every candidate is timed at, 1 to 1024 (default: the example's); "
        "another than the example's builds dynamic-batch candidates",
    )
    tune.add_argument("--min-cosine", type=float, help="parity: the worst cosine every candidate must reach")
    tune.add_argument("--max-drop", type=float, help="accuracy budget of quantized candidates")
    tune.add_argument("--metric", help="file.py:fn measuring accuracy for --max-drop")
    tune.add_argument("--calib", help="calibration data for int8 (.npz or a directory)")
    tune.add_argument("--no-plain", action="store_true", help="do not build the plain -O0 export as a candidate")
    tune.add_argument("--no-runtime-search", action="store_true", help="time each build with its default settings")
    tune.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    tune.add_argument("--runs", type=int, default=10, help="timed runs per candidate per round (default 10)")
    tune.add_argument("--warmup", type=int, default=3, help="untimed runs per candidate first (default 3)")
    _round_timeout_flag(tune)
    from kiln.compiler.perf.confirm import CONFIRM_BUDGET_S

    tune.add_argument(
        "--confirm-budget", type=float, default=CONFIRM_BUDGET_S, metavar="S", help="seconds the confirmation may "
        "take: the best candidates timed again in fresh processes, in more blocks while undecided (default "
        f"{CONFIRM_BUDGET_S:g}; 0: no confirmation)"
    )  # fmt: skip
    tune.add_argument("--executor", default="local", help="local (default) or ray: where the builds run")
    tune.add_argument(
        "--force", action="store_true", help="tune into an existing directory that is not a tune directory, or "
        "replace a best/ that this tune directory's records do not show kiln tune published"
    )  # fmt: skip
    tune.add_argument(
        "--wait", action="store_true", help="if another Kiln run into --out is running, wait for it instead of failing"
    )
    tune.add_argument("--build-only", action="store_true", help="build and verify; time nothing, publish no best/")
    tune.add_argument(
        "--time-only", action="store_true", help="no MODEL: time the builds in OUT/builds here (copied from the "
        "build machine, at any path), publish OUT/best"
    )  # fmt: skip
    _output_flags(tune)


def _matrix_parser(sub: Any) -> None:
    matrix = sub.add_parser(
        "matrix",
        help="convert many models to many targets; reports for CI",
        description="Run every model on every target (each cell in its own process with time and memory limits), "
        "resumable, sharded or on Ray; writes report.md, report.json, junit.xml and report.html. "
        "`kiln matrix merge DIR...` joins shard results. Exit 1 when a cell expected to pass fails or regresses.",
    )
    matrix.add_argument("--config", help="matrix.toml: models, targets, precisions, per-cell options")
    matrix.add_argument("--models", help="comma list of sources: zoo:all, zoo:NAME, file.py:factory, .pt2, .onnx")
    matrix.add_argument("--targets", help="comma list of targets, or all (default: all registered targets)")
    matrix.add_argument("--precisions", help="comma list, all, or default (each target's own)")
    matrix.add_argument("--shard", metavar="I/N", help="run shard I of N (1-based) of the sorted cells")
    matrix.add_argument("--jobs", "-j", type=int, help="cells at a time with the local executor (default 1)")
    matrix.add_argument("--threads", type=int, help="threads per cell for runtimes and PyTorch (default 2)")
    matrix.add_argument("--repeat", type=int, help="timed runs per latency (default 20)")
    matrix.add_argument("--warmup", type=int, help="untimed runs before them (default 3)")
    matrix.add_argument("--timeout", type=float, help="seconds per cell before it is killed (default 600)")
    matrix.add_argument("--memory-limit-gb", type=float, help="address-space limit per cell (default: RAM; 0: none)")
    matrix.add_argument("--rerun", action="store_true", help="run every cell again (no resume, no cache hits)")
    matrix.add_argument("--cache-dir", help="where cell results are cached across runs (default ~/.cache/kiln/matrix)")
    matrix.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    matrix.add_argument("--keep-artifacts", action="store_true", help="keep each cell's export under OUT/cells/")
    matrix.add_argument(
        "--no-localize", action="store_true", help="do not localize parity failures (config key: localize = false)"
    )
    matrix.add_argument("--executor", choices=("local", "ray"), default="local", help="where cells run")
    matrix.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    matrix.add_argument("--list", action="store_true", help="print the cells of this shard and exit")
    _matrix_report_flags(matrix, "matrix-results")
    merge = matrix.add_subparsers(dest="matrix_command").add_parser(
        "merge", help="join shard output directories into one report"
    )
    merge.add_argument("directories", nargs="+", help="the --out directories of the shards")
    _matrix_report_flags(merge, "matrix-merged")
    matrix.set_defaults(matrix_command=None)


def _matrix_report_flags(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--out", "-o", default=out, help="output directory (default: %(default)s)")
    parser.add_argument("--baseline", metavar="OLD.json", help="a report.json to flag regressions against")
    parser.add_argument(
        "--allow-fail", action="append", metavar="PATTERN", help="model/target/precision globs allowed to fail"
    )
    parser.add_argument("--error-factor", type=float, default=10.0, help="parity error growth that is a regression")
    parser.add_argument(
        "--latency-tolerance", type=float, default=0.10, help="latency growth that is a regression (default 0.10)"
    )
    _output_flags(parser)


def _round_timeout_flag(parser: argparse.ArgumentParser) -> None:
    from kiln.compiler.perf.bench_worker import ROUND_TIMEOUT_S

    parser.add_argument(
        "--round-timeout",
        type=float,
        default=ROUND_TIMEOUT_S,
        metavar="S",
        help=f"seconds one candidate's runs of a round may take before its worker is killed and the candidate "
        f"reported as failed (default {ROUND_TIMEOUT_S:g})",
    )


def _trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="let a .pt2 file run the pickled code it carries (torch.export.load as is): only for files you trust",
    )


def _output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one machine-readable JSON result")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")


def attach_dash_values(argv: list[str]) -> list[str]:
    """`--passes -name` as `--passes=-name`: argparse takes a value starting with '-' for an option."""
    fixed: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        following = argv[index + 1] if index + 1 < len(argv) else None
        if (
            token == "--passes"
            and following is not None
            and following.startswith("-")
            and not following.startswith("--")
        ):
            fixed.append(f"--passes={following}")
            index += 2
            continue
        fixed.append(token)
        index += 1
    return fixed
