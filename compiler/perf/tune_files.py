"""`kiln tune`'s directory (--out) on disk: which directory tune may use, and reading and writing in it without
following a link out of it.

A tune directory holds builds/ (the matrix of the builds: plan.json, results.jsonl, tune.json, best.json, the
matrix's reports and cells/<cell>/export/), the leaderboards and best/. It may have been copied from elsewhere,
edited or forged, and another Kiln may run into it. `tune_directory` holds the export lock of --out for the whole
run (`export.staging.output_lock`: a second run into it fails at once naming the first, or waits with --wait)
and `prepare`s it first:

* --out must be a directory or nothing; an existing, non-empty one that is no tune directory (no builds/plan.json
  nor builds/tune.json) is refused without --force, as `kiln export` refuses an existing --out;
* a symbolic link at a path tune or the matrix of its builds reads or writes (`watched`) is refused, even with
  --force: tune never reads or writes through a link in its directory (a link at or in one build rejects that
  build alone, see `check_build` and `cell_directory` below);
* a best/ that Kiln's own records do not prove a tune published (the sha256 of its manifest.json in
  builds/best.json, and nothing in it but the files that manifest lists) is refused without --force: tune
  replaces or removes only what it made.

Before a build can be timed or win, `check_build` proves its export is what its manifest lists and what tune's
records say it is. best/ is put in place and removed through a staging directory (`install_best`,
`withdraw_best`). Every file is read, written and copied by `kiln.compiler.safe_fs`, the one home of the link rule:
records and leaderboards are written whole (`write_file`: a link planted meanwhile is replaced, never written
through), records read back with O_NOFOLLOW (`read_bytes`), best/ copied from a build holding no link
(`copy_tree`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from kiln.compiler.errors import UsageError
from kiln.compiler.safe_fs import read_bytes, regular_files, write_file

if TYPE_CHECKING:
    from kiln.compiler.matrix.results import CellResult
    from kiln.compiler.perf.tune_candidates import Plan, Variant
    from kiln.compiler.progress import Progress
    from kiln.compiler.types import Manifest

BEST_DIR = "best"
BUILDS_DIR = "builds"
STATE_FILE = "tune.json"  # in DIR/builds: what `kiln tune` built, for `--time-only`
STATE_SCHEMA = "kiln.tune.builds/2"
BEST_RECORD = "best.json"  # in DIR/builds: the sha256 of each best/manifest.json tune published there
BEST_SCHEMA = "kiln.tune.best/1"
LEADERBOARDS = ("leaderboard.md", "leaderboard.json", "leaderboard.html")
WITHDRAWN = "withdrawn"  # inside a staging directory of best/: the best/ being removed


def watched() -> tuple[str, ...]:
    """The paths under --out that tune and the matrix of its builds read or write, relative to it."""
    from kiln.compiler.matrix.plan import CELLS_DIR, PLAN_FILE
    from kiln.compiler.matrix.reports import REPORT_FILES
    from kiln.compiler.matrix.results import RESULTS_FILE

    records = (PLAN_FILE, RESULTS_FILE, STATE_FILE, BEST_RECORD, CELLS_DIR, *REPORT_FILES)
    return (BUILDS_DIR, BEST_DIR, *LEADERBOARDS, *(f"{BUILDS_DIR}/{name}" for name in records))


@contextmanager
def tune_directory(out: Path, force: bool, wait: bool, progress: Progress, building: bool) -> Iterator[None]:
    """Hold the lock of `out` for the block, after `prepare`: `building` (not `--time-only`) refuses a directory
    that is not a tune directory. A best/ that a tune killed while replacing it left
    in a staging directory is put back first (`kiln.compiler.export.staging.remove_stale_staging`)."""
    from kiln.compiler.export.staging import output_lock, remove_stale_staging

    with output_lock(out, wait, progress.say, command="tune"):
        if out.is_dir():
            remove_stale_staging(out / BEST_DIR)
        prepare(out, force, building)
        yield


def prepare(out: Path, force: bool, building: bool) -> None:
    """Refuse (one-line UsageError) an `out` tune must not use; see the module's docstring."""
    from kiln.compiler.export.staging import check_output_dir
    from kiln.compiler.matrix.plan import PLAN_FILE

    check_output_dir(out, force=True)  # a file, or a link to nothing: refused even with --force, as by export
    if not out.is_dir():
        return
    linked = [name for name in watched() if (out / name).is_symlink()]
    if linked:
        more = f" (and {len(linked) - 1} more)" if len(linked) > 1 else ""
        raise UsageError(
            f"{out / linked[0]} is a symbolic link{more}: kiln tune never reads or writes through a link in its "
            "directory",
            "replace the link with what it points to (copy the directory with cp -rL), or tune into a new --out",
        )
    if building and not force and any(out.iterdir()) and not is_tune_directory(out):
        raise UsageError(
            f"--out {out} already exists and is not a kiln tune directory (it has no {BUILDS_DIR}/{PLAN_FILE})",
            "choose a new or empty --out, or pass --force to tune into it (its other files are left alone)",
        )
    why = foreign_best(out)
    if why is not None and not force:
        raise UsageError(
            f"{out / BEST_DIR} {why}: kiln tune replaces or removes only a best/ it published",
            "move it away, or pass --force to let this tune replace or remove it",
        )


def is_tune_directory(out: Path) -> bool:
    """Whether `out` holds the records of tune's builds (builds/plan.json or builds/tune.json)."""
    from kiln.compiler.matrix.plan import PLAN_FILE

    return any((out / BUILDS_DIR / name).is_file() for name in (PLAN_FILE, STATE_FILE))


def foreign_best(out: Path) -> str | None:
    """Why `out`/best is not proven to be what a tune published here, as it published it; None when it is, or
    when there is none."""
    from kiln.compiler.export.loading import check_files
    from kiln.compiler.types import MANIFEST_NAME, Manifest

    best = out / BEST_DIR
    if not os.path.lexists(best):
        return None
    if best.is_symlink() or not best.is_dir():
        return "is not a directory"
    try:
        regular_files(best)  # a tree Kiln wrote: no link at all, no special file
        digest = hashlib.sha256(read_bytes(best / MANIFEST_NAME)).hexdigest()
    except OSError as exc:
        return f"is not an export published by kiln tune ({MANIFEST_NAME}: {exc.strerror})"
    except UsageError as exc:
        return f"is not an export published by kiln tune ({exc.message})"
    if digest not in published(out):
        return f"is not recorded as published by kiln tune here (its {MANIFEST_NAME} is not in builds/{BEST_RECORD})"
    try:
        check_files(best, Manifest.read(best))
    except UsageError as exc:
        return f"has changed since kiln tune published it ({exc.message})"
    return None


def published(out: Path) -> list[str]:
    """The sha256 of each best/manifest.json tune recorded as published in `out` (builds/best.json); none when
    the record is missing or not what `install_best` writes."""

    try:
        data = json.loads(read_bytes(out / BUILDS_DIR / BEST_RECORD))
    except (OSError, ValueError, RecursionError, UsageError):
        return []
    digests = data.get("manifests") if isinstance(data, dict) and data.get("schema") == BEST_SCHEMA else None
    if not isinstance(digests, list):
        return []
    return [d for d in digests if isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdef" for c in d)]


def install_best(tree: Path, best: Path) -> None:
    """Move the finished export `tree` (in a staging directory of `best`, `kiln.compiler.export.staging.staging_area`)
    to
    `best`. Its manifest's sha256 is recorded first, beside that of the best/ it replaces when that one was
    proven tune's: a tune killed between the two still finds whichever best/ is there proven."""
    from kiln.compiler.export.staging import install_tree
    from kiln.compiler.types import MANIFEST_NAME

    out = best.parent
    digests = [hashlib.sha256(read_bytes(tree / MANIFEST_NAME)).hexdigest()]
    with suppress(OSError, UsageError):
        current = hashlib.sha256(read_bytes(best / MANIFEST_NAME)).hexdigest()
        digests = [d for d in published(out) if d == current] + digests
    (out / BUILDS_DIR).mkdir(exist_ok=True)
    write_file(out / BUILDS_DIR / BEST_RECORD, json.dumps({"schema": BEST_SCHEMA, "manifests": digests}) + "\n")
    install_tree(tree, best)


def withdraw_best(best: Path, progress: Progress) -> None:
    """Remove `best` (which `prepare` proved tune's, or --force allowed) when this tune chose no winner: the
    leaderboard written now does not describe it, and a script that deploys DIR/best must not find it. It is
    moved into a staging directory first, and removed with it: nothing under it is followed."""
    from kiln.compiler.export.staging import staging_area

    if not os.path.lexists(best):
        return
    with staging_area(best) as root:
        best.rename(root / WITHDRAWN)
    progress.warn(f"removed {best}: an earlier tune published it, and this one chose no winner")


def check_build(directory: Path, target: str, precision: str, variant: Variant) -> Manifest:
    """The manifest of a build's export at `directory`, once the export is proven to be what that manifest lists
    (no link, no special file, no file added, missing or changed: what `kiln verify` checks,
    `kiln.compiler.export.loading.check_files`) and what tune's records say it is (target, precision, the variant's
    layout
    and batch range, a passed parity gate with figures that can be). Else ValueError: the one-line reason."""
    from kiln.compiler.export.loading import check_files
    from kiln.compiler.export.manifest import manifest_figures
    from kiln.compiler.image_layout import nhwc_names
    from kiln.compiler.types import Manifest

    try:
        regular_files(directory)  # before anything is read: Kiln wrote no link and no special file there
        manifest = Manifest.read(directory)
        check_files(directory, manifest)
    except (UsageError, ValueError, OSError) as exc:
        raise ValueError(f"{getattr(exc, 'message', exc)}: not timed, never published") from None
    recorded = {"target": target, "precision": precision, "I/O layout": "NHWC" if variant.layout == "nhwc" else "NCHW",
                "batch range": variant.batch_range or "static"}  # fmt: skip
    actual = {"target": manifest.target, "precision": manifest.precision,
              "I/O layout": "NHWC" if nhwc_names(manifest.inputs) else "NCHW",
              "batch range": str(manifest.target_info.get("dynamic_batch") or "static")}  # fmt: skip
    for what, value in recorded.items():
        if actual[what] != value:
            raise ValueError(
                f"tune's records say its {what} is {value}, its manifest says {actual[what]} "
                f"(tune.json or results.jsonl edited or forged?): not timed, never published"
            )
    figures = manifest_figures(manifest)
    cosine, error = figures["min_cosine"], figures["max_abs_error"]
    if not (manifest.published and manifest.parity is not None and manifest.parity.passed):
        raise ValueError("its manifest records no passed parity gate (edited or forged?): not timed, never published")
    if not (math.isfinite(cosine) and -1 <= cosine <= 1 and math.isfinite(error) and error >= 0):
        raise ValueError(
            f"its manifest records impossible parity figures (min cosine {cosine}, max error {error}; edited or "
            "forged?): not timed, never published"
        )
    return manifest


def save_builds(builds_dir: Path, source: str, planned: Plan, executor: str) -> None:
    """DIR/builds/tune.json: the model, the (target, precision) pairs not built and why, each model entry's
    variant (layout, batch range) and the batch to time at, and the machine that ran the builds (the cells record
    their own, which with Ray is the node)."""
    from kiln.compiler.host import this_machine

    variants = {name: {"layout": v.layout, "batch_range": v.batch_range, "plain": v.plain}
                for name, v in planned.variants.items()}  # fmt: skip
    state = {"schema": STATE_SCHEMA, "model": source, "skipped": planned.skipped, "executor": executor,
             "variants": variants, "batch": planned.batch}  # fmt: skip
    write_file(builds_dir / STATE_FILE, json.dumps(state | {"built_on": this_machine()}, indent=1) + "\n")


def read_state(builds_dir: Path) -> dict[str, Any]:
    """DIR/builds/tune.json checked field by field (it may come from another machine); a UsageError if it is
    missing or not what `save_builds` writes."""
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
        and plan_of(state) is not None
    ):
        raise UsageError(f"{path} is not a record of `kiln tune`'s builds ({STATE_SCHEMA})", hint)
    return state


def plan_of(state: dict[str, Any]) -> Plan | None:
    """The plan a tune.json records (nothing to build: its variants, batch and what was not built), or None when
    a field is not what `save_builds` writes."""
    from kiln.compiler.capture.dynamic import parse_batch
    from kiln.compiler.perf.tune_candidates import LAYOUTS, MAX_BATCH, Plan, Variant

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


def provenance(builds_dir: Path, builds: list[CellResult], timed_threads: tuple[int, ...] | None) -> dict[str, Any]:
    """Where the timing ran (this machine and `timed_threads`, the thread counts timed at, empty: each runtime's
    default; None when nothing was timed) and where the builds ran (each distinct machine the passed cells
    recorded, else the one in tune.json), and whether that was elsewhere: a leaderboard moved between machines
    says so."""
    from kiln.compiler.host import this_machine
    from kiln.compiler.matrix.results import PASSED

    timed_on = None
    if timed_threads is not None:
        threads: Any = list(timed_threads) or "each runtime's default"
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
