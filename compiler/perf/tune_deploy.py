"""`kiln tune` timed where the artifact will run: build here, time there.

`kiln tune MODEL --out DIR --build-only` builds and gates every candidate (runtime settings that change the numbers
re-gated too) and writes a leaderboard of candidates "built, not timed", and no `best/`. Copy the whole DIR to the
deployment machine, at any path, and run `kiln tune --time-only --out DIR` there: it takes the builds recorded in
DIR/builds (the matrix's plan.json and results.jsonl), rebuilds nothing, gates the runtime settings again on that
CPU, times the candidates there and publishes `best/`. It needs Kiln and the targets' runtimes, not MODEL nor the
packages the model's code imports. `kiln tune MODEL --out DIR` on a moved DIR resumes too, where the cells' keys
are unchanged (same model path, CPU and toolchain); on another machine they are not, and it would rebuild.

results.jsonl records each cell's `cell_dir` as an absolute path where DIR was when it was built (relative to the
working folder then, by a Kiln before issue 24, for a relative --out); `locate_builds` finds each cell's files at
DIR/builds/cells/<cell> wherever DIR is now. The file is treated as hostile: a `cell_dir` that is not that cell's
own directory (`/etc`, `../../x`), or a cell directory that is a symbolic link, rejects that build with the
reason, never followed; what is found there is checked by `kiln.compiler.perf.tune_files.check_build`.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import UsageError

if TYPE_CHECKING:
    from kiln.compiler.matrix.results import CellResult
    from kiln.compiler.perf.tune import Plan, TuneOptions
    from kiln.compiler.progress import Progress

STATE_FILE = "tune.json"  # in DIR/builds: what `kiln tune` built, for `--time-only`
STATE_SCHEMA = "kiln.tune.builds/2"
BUILDING_FLAGS_HINT = "drop them: they were fixed when the builds were made (build again to change them)"


def save_builds(builds_dir: Path, source: str, planned: Plan, executor: str) -> None:
    """DIR/builds/tune.json: the model, the (target, precision) pairs not built and why, each model entry's
    variant (layout, batch range) and the batch to time at, and the machine that ran the builds (the cells record
    their own, which with Ray is the node)."""
    from kiln.compiler.host import this_machine
    from kiln.compiler.safe_fs import write_file

    variants = {name: {"layout": v.layout, "batch_range": v.batch_range, "plain": v.plain}
                for name, v in planned.variants.items()}  # fmt: skip
    state = {"schema": STATE_SCHEMA, "model": source, "skipped": planned.skipped, "executor": executor,
             "variants": variants, "batch": planned.batch}  # fmt: skip
    write_file(builds_dir / STATE_FILE, json.dumps(state | {"built_on": this_machine()}, indent=1) + "\n")


def read_state(builds_dir: Path) -> dict[str, Any]:
    """DIR/builds/tune.json checked field by field (it may come from another machine); a UsageError if it is
    missing or not what `save_builds` writes."""
    from kiln.compiler.safe_fs import read_bytes

    path = builds_dir / STATE_FILE
    hint = "run `kiln tune MODEL --out DIR --build-only` first (on the build machine), then copy the whole DIR here"
    try:
        state = json.loads(read_bytes(path))
    except FileNotFoundError:
        raise UsageError(f"{path.parent.parent} holds no builds of `kiln tune` (no {path})", hint) from None
    except (OSError, ValueError, RecursionError) as exc:
        raise UsageError(f"cannot read {path}: {str(exc)[:200]}", hint) from None
    skipped = state.get("skipped") if isinstance(state, dict) else None
    if not (
        isinstance(state, dict)
        and state.get("schema") == STATE_SCHEMA
        and isinstance(state.get("model"), str)
        and isinstance(skipped, list)
        and all(isinstance(s, dict) and all(isinstance(v, str) for v in s.values()) for s in skipped)
        and isinstance(state.get("built_on", {}), dict)
        and _plan_of(state) is not None
    ):
        raise UsageError(f"{path} is not a record of `kiln tune`'s builds ({STATE_SCHEMA})", hint)
    return state


def _plan_of(state: dict[str, Any]) -> Plan | None:
    """The plan a tune.json records (nothing to build: its variants, batch and what was not built), or None when
    a field is not what `save_builds` writes."""
    from kiln.compiler.capture.dynamic import parse_batch
    from kiln.compiler.perf.tune import Plan
    from kiln.compiler.perf.tune_candidates import LAYOUTS, MAX_BATCH, Variant

    batch, variants = state.get("batch"), state.get("variants")
    if not (batch is None or (type(batch) is int and 1 <= batch <= MAX_BATCH)) or not isinstance(variants, dict):
        return None
    found: dict[str, Variant] = {}
    for name, kind in variants.items():
        if not isinstance(kind, dict) or set(kind) != {"layout", "batch_range", "plain"}:
            return None
        layout, batch_range, plain = kind["layout"], kind["batch_range"], kind["plain"]
        try:  # the rule of --dynamic-batch MIN:MAX, which made it
            ranged = isinstance(batch_range, str) and parse_batch(batch_range) is not None
        except UsageError:
            return None
        if layout not in (None, *LAYOUTS) or not (batch_range is None or ranged) or type(plain) is not bool:
            return None
        found[str(name)] = Variant(layout, batch_range, plain)
    return Plan(None, state["skipped"], found, batch)


def tune_or_time(
    model: str | None, out: Path, options: TuneOptions, progress: Progress, time_only: dict[str, Any] | None
) -> dict[str, Any]:
    """`kiln tune`: build (and, unless `options.build_only`, time) MODEL; or, with `time_only` (the flags that
    decide the builds, as given: none may be), time the builds already in `out`. The leaderboard."""
    from kiln.compiler.perf.tune import run_tune

    if time_only is not None:
        check_time_only(time_only)
        return time_builds(out, options, progress)
    if model is None:
        raise UsageError("kiln tune needs MODEL", "e.g. kiln tune zoo:cnn --out DIR (--time-only --out DIR: no MODEL)")
    return run_tune(model, out, options, progress)


def check_time_only(given: dict[str, Any]) -> None:
    """`--time-only` takes no MODEL and none of the flags that decide the builds: a UsageError naming those given
    (`given`: flag -> its value, None or False when not given)."""
    named = [flag for flag, value in given.items() if value is not None and value is not False]
    if named:
        raise UsageError(
            f"--time-only times the builds already in OUT/builds: {', '.join(named)} only apply when building",
            BUILDING_FLAGS_HINT,
        )


def time_builds(out: Path, options: TuneOptions, progress: Progress) -> dict[str, Any]:
    """`kiln tune --time-only --out DIR`: the builds recorded in DIR/builds (nothing rebuilt, no model needed),
    their runtime settings gated again and the candidates timed on this machine, the winner published to
    DIR/best, the leaderboards written; the leaderboard."""
    from kiln.compiler.perf.tune_files import tune_directory

    if options.build_only:
        raise UsageError("--build-only and --time-only together do nothing", "use one of them")
    options.check()
    out = Path(os.path.abspath(out))
    with tune_directory(out, options.force, options.wait, progress, building=False):
        return _time_builds(out, options, progress)


def _time_builds(out: Path, options: TuneOptions, progress: Progress) -> dict[str, Any]:
    """`time_builds` in a prepared, locked `out`."""
    from kiln.compiler.matrix.plan import Plan
    from kiln.compiler.matrix.process import identity
    from kiln.compiler.matrix.results import NOT_RUN, RESULTS_FILE, read_results
    from kiln.compiler.perf.tune import BUILDS_DIR, evaluate

    builds_dir = out / BUILDS_DIR
    state = read_state(builds_dir)
    plan = Plan.read(builds_dir)
    results = read_results(builds_dir / RESULTS_FILE, progress.warn)
    builds: list[CellResult] = []
    for cell in plan.cells:
        key = plan.keys[cell.cell_id]
        found = results.get(key)
        if found is None or found.cell_id != cell.cell_id:
            why = "no finished build of it in results.jsonl (killed before it ended?): run the build step again"
            found = identity(cell, key, status=NOT_RUN, reason=why)
        builds.append(found)
    built_on = state.get("built_on", {}).get("host", "an unknown machine")
    count = f"{len(builds)} build{'' if len(builds) == 1 else 's'}"
    progress.say(f"time-only: {count} in {builds_dir} (built on {built_on}); none is rebuilt")
    planned = _plan_of(state)
    assert planned is not None  # read_state checked it
    return evaluate(state["model"], out, builds, planned, options, progress)


def locate_builds(builds: list[CellResult], builds_dir: Path) -> tuple[list[CellResult], dict[str, str]]:
    """The builds with each passed one's `cell_dir` made the path its files have now (under `builds_dir`), and
    why each build whose recorded `cell_dir` is refused (by cell id; `kiln.compiler.perf.tune._entries` rejects it with
    that reason, never opening it). A missing directory is not refused here: the candidate is rejected as gone."""
    from kiln.compiler.matrix.results import PASSED

    located: list[CellResult] = []
    refused: dict[str, str] = {}
    for build in builds:
        if build.status == PASSED:  # a build that did not pass is never opened: its status is its reason
            try:
                build = replace(build, cell_dir=str(cell_directory(build, builds_dir)))
            except ValueError as exc:
                refused[build.cell_id] = str(exc)
        located.append(build)
    return located, refused


def cell_directory(build: CellResult, builds_dir: Path) -> Path:
    """Where a build's cell directory is now: `builds_dir`/cells/<the cell's name>, the place the matrix wrote it.
    The recorded `cell_dir` must name that place: a path ending in builds/cells/<name> (DIR's path when it was
    built, maybe on another machine; relative to where that tune ran when its --out was), or cells/<name> relative
    to the builds. The recorded path itself is never opened. Raises ValueError (the reason) for anything else, and
    for a cell or export directory that is a symbolic link (`kiln.compiler.safe_fs`: the matrix writes none, so where
    it leads is never looked into); the rest of the tune goes on."""
    from kiln.compiler.matrix.plan import CELLS_DIR, safe_name
    from kiln.compiler.perf.tune import BUILDS_DIR
    from kiln.compiler.safe_fs import refused

    expected = (CELLS_DIR, safe_name(build.cell_id))
    parts = PurePath(build.cell_dir).parts
    if parts[-3:] != (BUILDS_DIR, *expected) and parts != expected:
        raise ValueError(
            f"its recorded build directory {build.cell_dir!r} is not its own under {builds_dir} "
            f"({'/'.join(expected)}): refused, not followed (results.jsonl edited or forged?)"
        )
    directory = builds_dir.joinpath(*expected)
    for path in (directory, directory / "export"):  # the matrix made both directories: neither is a link
        if os.path.islink(path):
            outside = not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(builds_dir))
            raise ValueError(f"its build directory {refused(path, root=builds_dir if outside else None).message}")
    return directory


def provenance(builds_dir: Path, builds: list[CellResult], options: TuneOptions) -> dict[str, Any]:
    """Where the timing ran (this machine and the threads; None when nothing was timed) and where the builds
    ran (each distinct machine the passed cells recorded, else the one in tune.json), and whether that was
    elsewhere: a leaderboard moved between machines says so."""
    from kiln.compiler.host import this_machine
    from kiln.compiler.matrix.results import PASSED

    timed_on = None
    if not options.build_only:
        threads: Any = list(options.threads) or "each runtime's default"
        timed_on = this_machine() | {"threads": threads}
    machines = [_machine(b.host) for b in builds if b.status == PASSED and b.host]
    if not machines:
        try:
            machines = [_machine(read_state(builds_dir).get("built_on") or {})]
        except UsageError:
            machines = []
    built_on = list({_identity(m): m for m in machines}.values())
    elsewhere = timed_on is not None and any(_identity(m) != _identity(timed_on) for m in built_on)
    return {"timed_on": timed_on, "built_on": built_on, "built_elsewhere": elsewhere}


def _machine(recorded: dict[str, Any]) -> dict[str, Any]:
    """A machine as a cell or tune.json recorded it (`kiln.compiler.host.this_machine`), reduced to plain strings and
    numbers: the record may come from another machine, or be forged."""
    flags = recorded.get("cpu_flags")
    cores = recorded.get("cores")
    return {
        "host": str(recorded.get("host", "unknown"))[:200],
        "cpu": str(recorded.get("cpu", "unknown"))[:200],
        "cpu_flags": [str(f)[:40] for f in flags[:50]] if isinstance(flags, list) else [],
        "cores": cores if isinstance(cores, int) and not isinstance(cores, bool) else None,
    }


def _identity(machine: dict[str, Any]) -> str:
    """What tells two machines apart for the leaderboard: host name, CPU and its flags."""
    return json.dumps([machine.get("host"), machine.get("cpu"), machine.get("cpu_flags")], default=str)
