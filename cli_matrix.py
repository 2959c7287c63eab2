"""`kiln matrix`: the conversion matrix's command-line handler (kept apart from cli.py for size)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from kiln.compiler.signals import Terminated, interrupted_exit_code


def cmd_matrix(args: argparse.Namespace) -> int:
    """`kiln matrix`: every model on every target, each cell in its own limited process; reports for CI."""
    try:
        return _matrix(args)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (cli.main runs every command in sigterm_as_interrupt)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the goodbye
        what = "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"
        print(
            f"kiln: {what}; running cells were stopped, finished ones are in {Path(args.out) / 'results.jsonl'}: "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return interrupted_exit_code(interrupt)


def _matrix(args: argparse.Namespace) -> int:
    from kiln.compiler.matrix.config import load_config
    from kiln.compiler.matrix.plan import RunSettings, Shard
    from kiln.compiler.matrix.run import merge_matrix, run_matrix
    from kiln.compiler.progress import Progress

    allow_fail = [p.strip() for value in args.allow_fail or [] for p in value.split(",") if p.strip()]
    settings = RunSettings(
        out=Path(args.out),
        baseline=Path(args.baseline) if args.baseline else None,
        allow_fail=allow_fail,
        error_factor=args.error_factor,
        latency_factor=1 + args.latency_tolerance,
    )
    progress = Progress(quiet=args.quiet or args.json)
    if args.matrix_command == "merge":
        report, code = merge_matrix([Path(d) for d in args.directories], settings)
    else:
        config = load_config(
            Path(args.config) if args.config else None,
            {
                "models": args.models,
                "targets": args.targets,
                "precisions": args.precisions,
                "jobs": args.jobs,
                "threads": args.threads,
                "repeat": args.repeat,
                "warmup": args.warmup,
                "timeout": args.timeout,
                "memory_limit_gb": args.memory_limit_gb,
                "localize": False if args.no_localize else None,
            },
        )
        settings.allow_fail = config.allow_fail + allow_fail
        settings.shard = Shard.parse(args.shard) if args.shard else Shard()
        settings.rerun = args.rerun
        settings.cache_dir = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else _cache_home()
        settings.keep_artifacts = args.keep_artifacts
        settings.executor = args.executor
        settings.address = args.address
        if args.list:
            return _list_cells(config, settings, args.json)
        report, code = run_matrix(config, settings, progress)
    reports = [str(settings.out / name) for name in ("report.md", "report.json", "junit.xml", "report.html")]
    if args.json:
        print(json.dumps({"ok": code == 0, "summary": report["summary"], "reports": reports}, indent=2))
    elif not args.quiet:
        print(f"{report['summary']['cells']} cells; reports: {', '.join(reports)}")
        for cell_id in report["summary"]["unexpected_failure_ids"]:
            print(f"  unexpected failure: {cell_id}")
        for regression in report["regressions"]:
            print(f"  regression: {regression['cell_id']}: {regression['detail']}")
    return code


def _list_cells(config: Any, settings: Any, as_json: bool) -> int:
    """`kiln matrix --list`: the cells this shard would run, without running them."""
    from kiln.compiler.matrix.plan import plan_matrix

    plan = plan_matrix(config, settings.shard, settings.executor)
    cells = plan.mine()
    if as_json:
        print(json.dumps([{"cell_id": c.cell_id, "key": plan.keys[c.cell_id], **c.to_dict()} for c in cells], indent=2))
    else:
        for cell in cells:
            print(cell.cell_id + (f"  (unavailable: {cell.not_applicable})" if cell.not_applicable else ""))
    return 0


def _cache_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kiln" / "matrix"
