#!/usr/bin/env python3
"""Kiln command line: export models, list targets, verify and run exports.

Errors become one line and an exit code here, in one place:
0 done, 1 parity failure, 2 bad input or usage, 3 target unavailable on this machine,
4 internal error (a bug: rerun with KILN_DEBUG=1 for the traceback), 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM: cleaned up as for Ctrl-C, see kiln.compiler.signals).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any


def _checkout_as_kiln() -> None:
    """`python cli.py` from a checkout: this folder is the package `kiln` (installed, the same files are)."""
    import importlib.util

    root = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("kiln", root / "__init__.py", submodule_search_locations=[str(root)])
    assert spec is not None and spec.loader is not None
    sys.modules["kiln"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["kiln"])


if __name__ == "__main__" and not __package__:
    _checkout_as_kiln()
    import importlib

    importlib.import_module("kiln.cli").main_entry()  # this file again, as the module kiln.cli

from kiln.cli_matrix import cmd_matrix  # noqa: E402 (after the checkout's own bootstrap)
from kiln.cli_parser import attach_dash_values, build_parser  # noqa: E402
from kiln.compiler.errors import EXIT_BROKEN_PIPE, KilnError, as_kiln_error, within_kiln  # noqa: E402
from kiln.compiler.progress import quiet_libraries  # noqa: E402
from kiln.compiler.signals import Terminated, interrupted_exit_code, sigterm_as_interrupt  # noqa: E402


def cmd_export(args: argparse.Namespace) -> int:
    """`kiln export`: capture once, build every requested target, gate on parity."""
    from kiln.compiler.export.options import KEYWORDS, export_options
    from kiln.compiler.export.pipeline import export_targets
    from kiln.compiler.progress import Progress

    quiet_libraries()
    options = export_options(**{name: value for name, value in vars(args).items() if name in KEYWORDS})
    out = Path(args.out) if args.out else Path("exports") / _model_stem(args.model)
    results = export_targets(args.model, args.target, out, options, progress=Progress(quiet=args.quiet or args.json))
    failed = [r for r in results if r.failure is not None or (r.parity is not None and not r.parity.passed)]
    if args.json:
        from kiln.compiler.memory import peak_rss

        report = {"ok": not failed, "peak_rss": peak_rss(), "results": [r.to_dict() for r in results]}
        print(json.dumps(report, indent=2))
    elif not args.quiet:
        for result in results:
            if result.failure is not None:
                print(f"{result.target:<10} {'FAILED at ' + result.failure.step:<26} {result.failure.message}")
                continue
            status = "published" if result.published else "REJECTED (parity failed)"
            print(f"{result.target:<10} {status:<26} {result.directory}")
            if result.parity and not result.parity.passed:
                for failure in result.parity.failures():
                    print(f"           {failure.summary()}")
            if result.parity and result.parity.divergence:
                print(f"           {result.parity.divergence['summary']}")
    return 1 if failed else 0


def _model_stem(model: str) -> str:
    if model.startswith("zoo:"):
        return model[4:]
    if Path(model).is_dir():
        return Path(model).resolve().name
    path, _, factory = model.rpartition(":") if ":" in model else (model, "", "")
    return factory or Path(path or model).stem


def cmd_targets(args: argparse.Namespace) -> int:
    """`kiln targets`: every target, its aliases, precisions, needs and availability here."""
    from kiln.targets import TARGETS

    rows: list[dict[str, Any]] = []
    for target in TARGETS:
        reason = target.unavailable_reason()
        rows.append(
            {
                "name": target.name,
                "aliases": list(target.aliases),
                "precisions": list(target.precisions),
                "text_generation": _generation_row(target),
                "devices": list(target.devices),
                "consumes": target.consumes,
                "accuracy_aware": target.accuracy_aware,
                "kv_cache": target.kv_cache,
                "tappable": target.tappable,
                "tuned_by_default": target.tuned_by_default,
                "requires": list(target.requires.values()),
                "available": reason is None,
                "why_unavailable": reason,
                "limited_here": target.limitation() if reason is None else None,
                "description": target.description,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        state = "available" if row["available"] else f"unavailable: {row['why_unavailable']}"
        if row["limited_here"]:
            state += f", limited here: {row['limited_here']}"
        aliases = f" (aliases: {', '.join(row['aliases'])})" if row["aliases"] else ""
        devices = f"; devices: {', '.join(row['devices'])}" if row["devices"] else ""
        generation = row["text_generation"]
        if generation:
            devices += f"; text generation ({generation['kv_cache']} cache): {', '.join(generation['precisions'])}"
        print(
            f"{row['name']}{aliases}\n    {row['description']}\n    precisions: {', '.join(row['precisions'])}"
            f"{devices}; needs: {', '.join(row['requires'])}; {state}"
        )
    return 0


def _generation_row(target: Any) -> dict[str, Any] | None:
    """A target's text-generation export (None: none): its KV cache and precisions (int8/int4:
    docs/llm-quantization.md)."""
    return {"kv_cache": target.kv_cache, "precisions": ["fp32", *target.weight_only]} if target.kv_cache else None


def cmd_passes(args: argparse.Namespace) -> int:
    """`kiln passes`: every graph pass, its IR, the level that runs it, and what it does."""
    from kiln.passes import PASSES
    from kiln.passes.base import LEVELS

    rows: list[dict[str, Any]] = [
        {
            "name": p.name,
            "ir": p.ir,
            "level": p.level,
            "targets": list(p.targets),
            "needs": list(p.needs),
            "preserves": list(p.preserves),
            "description": p.description,
        }
        for p in PASSES.values()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        "level: -O0 none (the exporter's raw ONNX graph), -O1 cleanup, -O2 fusion (default), -O3 target-specific; "
        "--passes +name,-name adjusts"
    )
    for row in rows:
        only = f" [{', '.join(row['targets'])} only]" if row["targets"] else ""
        print(f"{row['name']:<34} {row['ir']:<5} -O{row['level']} {LEVELS[row['level']]:<16}{row['description']}{only}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """`kiln verify`: re-run parity on an existing export."""
    from kiln.compiler.export.loading import verify

    quiet_libraries()
    results = list(verify(args.export_dir, args.model, trust_pickle=args.trust_pickle))
    if args.json:
        from dataclasses import asdict

        print(
            json.dumps(
                [
                    {
                        "directory": str(r.directory),
                        "target": r.manifest.target,
                        "notes": r.notes,
                        "parity": asdict(r.report),
                    }
                    for r in results
                ],
                indent=2,
                default=str,
            )
        )
    else:
        for result in results:
            print(f"{result.manifest.target} ({result.directory}):")
            for note in result.notes:
                print(f"  note: {note}")
            print("  " + result.report.summary().replace("\n", "\n  "))
    return 0 if all(r.report.passed for r in results) else 1


def cmd_debug(args: argparse.Namespace) -> int:
    """`kiln debug`: the first module where an export diverges from its PyTorch model (`--all`: every one)."""
    from kiln.compiler.diagnose.profile_html import HTML_FILE, write_profile
    from kiln.compiler.parity.input_files import check_output_file

    if args.html:
        check_output_file(Path(args.html), "--html", HTML_FILE)  # before any work (and torch's import), not after
    from kiln.compiler.diagnose.debug import debug, profile_table
    from kiln.compiler.progress import Progress

    quiet_libraries()
    progress = Progress(quiet=args.quiet or args.json)
    method = "bisection" if args.bisect else "auto"
    found = list(debug(args.export_dir, args.model, args.all, args.calib, progress, args.trust_pickle, method))
    if args.html:
        write_profile([d.divergence for d in found], Path(args.html))
    if args.json:
        print(json.dumps([{"directory": str(d.directory), **d.divergence.to_dict()} for d in found], default=str))
    elif not args.quiet:
        for diagnosis in found:
            print(f"{diagnosis.divergence.target} ({diagnosis.directory}):")
            print("  " + profile_table(diagnosis.divergence).replace("\n", "\n  "))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """`kiln run`: execute an export on inputs from an .npz and save the outputs."""
    from kiln.compiler.capture.inputs import read_inputs_file
    from kiln.compiler.export.loading import load
    from kiln.compiler.parity.input_files import outputs_file, save_npz

    quiet_libraries()
    if args.prompt is not None and args.generate is None:
        from kiln.compiler.errors import UsageError

        raise UsageError("--prompt applies to --generate", "add --generate: kiln run DIR --generate --prompt TEXT")
    output = outputs_file(args.output) if args.generate is None else None  # checked before any work
    model = load(args.export_dir, args.target, trust_pickle=args.trust_pickle)
    if output is None:
        return _generate(model, args)
    notes: list[str] = []
    feeds = read_inputs_file(Path(args.inputs), model.inputs, notes)
    for note in notes:  # casts done and NaN/Inf inputs: shown even with -q or --json
        print(f"kiln: warning: {note}", file=sys.stderr)
    outputs = model.run(feeds)
    save_npz(output, dict(outputs))
    if args.json:
        print(
            json.dumps(
                {
                    "output_file": str(output),
                    "outputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in outputs.items()},
                }
            )
        )
    elif not args.quiet:
        for name, value in outputs.items():
            print(f"{name}: {value.dtype}{list(value.shape)}")
        print(f"saved to {output}")
    return 0


def _generate(model: Any, args: argparse.Namespace) -> int:
    """`kiln run --generate IDS`: greedy tokens from a text-generation export, printed as ids; with `--prompt TEXT`
    the prompt is encoded, and the tokens decoded, by the tokenizer the export carries."""
    from kiln.compiler.capture.hf_folder import load_tokenizer
    from kiln.compiler.errors import UsageError
    from kiln.compiler.generation.decoding import DecoderSpec, generate_with_export, parse_prompt

    if args.prompt is not None and args.generate:
        raise UsageError("--generate IDS and --prompt TEXT both give a prompt", "give one of them")
    tokenizer = load_tokenizer(model.directory) if args.prompt is not None else None
    if tokenizer is not None:
        prompt = [int(t) for t in tokenizer(args.prompt)["input_ids"]]
        if not prompt:
            raise UsageError("--prompt encodes to no tokens", "give a longer prompt")
    elif not args.generate:
        raise UsageError("--generate needs prompt token ids, or --prompt TEXT", "e.g. --generate 1,5,9,3")
    else:
        prompt = parse_prompt(args.generate)
    spec = DecoderSpec.from_dict(model.manifest.source.get("decoder"))
    tokens = generate_with_export(model.runner, model.inputs, spec, prompt, args.max_new_tokens)
    text = None
    if tokenizer is not None:
        end = tokenizer.eos_token_id
        tokens = tokens[: tokens.index(end)] if end is not None and end in tokens else tokens  # stop at the end
        text = tokenizer.decode(tokens, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"prompt": prompt, "generated": tokens} | ({"text": text} if text is not None else {})))
    elif not args.quiet:
        print(text if text is not None else ",".join(map(str, tokens)))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """`kiln bench`: time exports in interleaved rounds, each in its own process."""
    from kiln.compiler.errors import EXIT_PARITY
    from kiln.compiler.perf.bench_report import table, timing_failures
    from kiln.compiler.perf.benchmark import BenchOptions, run_bench
    from kiln.compiler.progress import Progress

    options = BenchOptions(
        threads=args.threads,
        rounds=args.rounds,
        runs=args.runs,
        warmup=args.warmup,
        batch=args.batch,
        compare_eager=args.compare_eager,
        model=args.model,
        compile_timeout_s=args.compile_timeout,
        round_timeout_s=args.round_timeout,
        trust_pickle=args.trust_pickle,
        write=not args.no_write,
    )
    result = run_bench(args.export_dirs, options, Progress(quiet=args.quiet))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif not args.quiet:
        print(table(result))
    failures = timing_failures(result)
    for line in failures:  # the report is written and printed, but an incomplete run is not a success
        print(f"kiln: error: {line}", file=sys.stderr)
    return EXIT_PARITY if failures else 0  # a candidate that could not be timed failed, as one that fails parity


def cmd_tune(args: argparse.Namespace) -> int:
    """`kiln tune`: build and verify every candidate, time the survivors, publish the fastest to OUT/best."""
    from kiln.compiler.perf.tune import (
        DEFAULT_PRECISIONS,
        TuneOptions,
        default_targets,
        parse_list,
        parse_threads,
    )
    from kiln.compiler.perf.tune_candidates import parse_io
    from kiln.compiler.perf.tune_deploy import tune_or_time
    from kiln.compiler.progress import Progress

    options = TuneOptions(
        targets=parse_list(args.targets, default_targets(), "--targets"),
        precisions=parse_list(args.precisions, DEFAULT_PRECISIONS, "--precisions"),
        objective=args.objective,
        threads=parse_threads(args.threads),
        min_cosine=args.min_cosine,
        max_drop=args.max_drop,
        metric=args.metric,
        calib=args.calib,
        plain=not args.no_plain,
        runtime_search=not args.no_runtime_search,
        rounds=args.rounds,
        runs=args.runs,
        warmup=args.warmup,
        executor=args.executor,
        build_only=args.build_only,
        io=parse_io(args.io),
        batch=args.batch,
        round_timeout_s=args.round_timeout,
        confirm_budget_s=args.confirm_budget,
        force=args.force,
        wait=args.wait,
    )
    building = {"MODEL": args.model, "--targets": args.targets, "--precisions": args.precisions, "--calib": args.calib,
                "--min-cosine": args.min_cosine, "--max-drop": args.max_drop, "--metric": args.metric,
                "--no-plain": args.no_plain, "--executor": args.executor != "local", "--io": args.io,
                "--batch": args.batch}  # fmt: skip
    board = tune_or_time(args.model, Path(args.out), options, Progress(quiet=args.quiet or args.json),
                         time_only=building if args.time_only else None)  # fmt: skip
    if args.json:
        print(json.dumps(board, indent=2, default=str))
    elif not args.quiet:
        from kiln.compiler.perf.leaderboard import markdown

        print(markdown(board))
    return 0 if board["winner"] is not None or (args.build_only and board["candidates"]) else 1


def cmd_quant_report(args: argparse.Namespace) -> int:
    """`kiln quant-report`: the per-layer error of a quantized export against fp32, worst layer first."""
    from kiln.compiler.export.loading import export_dirs
    from kiln.compiler.quantization.report import REPORT_FILE, QuantReport, not_quantized

    directories = export_dirs(args.export_dir)
    quantized = [d for d in directories if (d / REPORT_FILE).is_file()]
    if not quantized:
        raise not_quantized(args.export_dir)
    reports = [(d, QuantReport.read(d)) for d in quantized]
    if args.json:
        print(json.dumps([{"directory": str(d), **r.to_dict(args.top)} for d, r in reports], indent=2))
        return 0
    for directory, report in reports:
        if len(reports) > 1 or len(directories) > 1:
            print(f"{directory}:")
        print(report.table(args.top))
    return 0


HANDLERS = {
    "export": cmd_export,
    "targets": cmd_targets,
    "passes": cmd_passes,
    "verify": cmd_verify,
    "run": cmd_run,
    "debug": cmd_debug,
    "quant-report": cmd_quant_report,
    "bench": cmd_bench,
    "tune": cmd_tune,
    "matrix": cmd_matrix,
}
__all__ = ["HANDLERS", "main", "main_entry"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(attach_dash_values(sys.argv[1:] if argv is None else list(argv)))
    try:
        # SIGTERM cleans up like Ctrl-C, then exits 143; a bug's exception reaches the handlers below as it is
        with sigterm_as_interrupt(), within_kiln():
            return int(HANDLERS[args.command](args))
    except KilnError as error:
        print(f"kiln: error: {error.one_line()}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:  # `kiln targets | head`: the reader left; say nothing more, as shell tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt as interrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the goodbye
        what = "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"
        print(f"kiln: {what}; temporary files removed, nothing was published", file=sys.stderr)
        return interrupted_exit_code(interrupt)
    except Exception as error:  # a bug in Kiln or a backend: say so in one line
        if os.environ.get("KILN_DEBUG"):
            raise
        internal = as_kiln_error(error)
        print(f"kiln: {internal.one_line()}", file=sys.stderr)
        return internal.exit_code


def main_entry() -> None:
    """Console-script entry point (`kiln`)."""
    sys.exit(main())


if __name__ == "__main__":
    main_entry()
