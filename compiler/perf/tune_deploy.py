"""`kiln tune` timed where the artifact will run: build here, time there.

`kiln tune MODEL --out DIR --build-only` builds and gates every candidate (runtime settings that change the numbers
re-gated too) and writes a leaderboard of candidates "built, not timed", and no `best/`. Copy the whole DIR to the
deployment machine, at any path, and run `kiln tune --time-only --out DIR` there: it takes the builds recorded in
DIR/builds (the matrix's plan.json and results.jsonl), rebuilds nothing, gates the runtime settings again on that
CPU, times the candidates there and publishes `best/`. It needs Kiln and the targets' runtimes, not MODEL nor the
packages the model's code imports. `kiln tune MODEL --out DIR` on a moved DIR resumes too, where the cells' keys
are unchanged (same model path, CPU and toolchain); on another machine they are not, and it would rebuild.

results.jsonl records each cell's `cell_dir` as an absolute path where DIR was when it was built (relative to the
working folder then, by a Kiln before issue 24, for a relative --out); `tune_files.locate_builds` finds each
cell's files at DIR/builds/cells/<cell> wherever DIR is now. The file is treated as hostile: a `cell_dir` that is
not that cell's own directory (`/etc`, `../../x`), or a cell directory that is a symbolic link, rejects that build
with the reason, never followed; what is found there is checked by `kiln.compiler.perf.tune_files.check_build`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import UsageError
from kiln.compiler.perf.tune import TuneOptions, evaluate, run_tune
from kiln.compiler.perf.tune_files import BUILDS_DIR, plan_of, read_state, tune_directory

if TYPE_CHECKING:
    from kiln.compiler.matrix.results import CellResult
    from kiln.compiler.progress import Progress

BUILDING_FLAGS_HINT = "drop them: they were fixed when the builds were made (build again to change them)"


def tune_or_time(
    model: str | None, out: Path, options: TuneOptions, progress: Progress, time_only: dict[str, Any] | None
) -> dict[str, Any]:
    """`kiln tune`: build (and, unless `options.build_only`, time) MODEL; or, with `time_only` (the flags that
    decide the builds, as given: none may be), time the builds already in `out`. The leaderboard."""
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
    planned = plan_of(state)
    assert planned is not None  # read_state checked it
    return evaluate(state["model"], out, builds, planned, options, progress)
