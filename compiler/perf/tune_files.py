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
  build alone, see `check_build` and `kiln.compiler.perf.tune_deploy.cell_directory`);
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
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.compiler.errors import UsageError
from kiln.compiler.safe_fs import read_bytes, regular_files, write_file

if TYPE_CHECKING:
    from kiln.compiler.perf.tune_candidates import Variant
    from kiln.compiler.progress import Progress
    from kiln.compiler.types import Manifest

BEST_RECORD = "best.json"  # in DIR/builds: the sha256 of each best/manifest.json tune published there
BEST_SCHEMA = "kiln.tune.best/1"
LEADERBOARDS = ("leaderboard.md", "leaderboard.json", "leaderboard.html")
WITHDRAWN = "withdrawn"  # inside a staging directory of best/: the best/ being removed


def watched() -> tuple[str, ...]:
    """The paths under --out that tune and the matrix of its builds read or write, relative to it."""
    from kiln.compiler.matrix.plan import CELLS_DIR, PLAN_FILE
    from kiln.compiler.matrix.reports import REPORT_FILES
    from kiln.compiler.matrix.results import RESULTS_FILE
    from kiln.compiler.perf.tune import BEST_DIR, BUILDS_DIR
    from kiln.compiler.perf.tune_deploy import STATE_FILE

    records = (PLAN_FILE, RESULTS_FILE, STATE_FILE, BEST_RECORD, CELLS_DIR, *REPORT_FILES)
    return (BUILDS_DIR, BEST_DIR, *LEADERBOARDS, *(f"{BUILDS_DIR}/{name}" for name in records))


@contextmanager
def tune_directory(out: Path, force: bool, wait: bool, progress: Progress, building: bool) -> Iterator[None]:
    """Hold the lock of `out` for the block, after `prepare`: `building` (not `--time-only`) refuses a directory
    that is not a tune directory. A best/ that a tune killed while replacing it left
    in a staging directory is put back first (`kiln.compiler.export.staging.remove_stale_staging`)."""
    from kiln.compiler.export.staging import output_lock, remove_stale_staging
    from kiln.compiler.perf.tune import BEST_DIR

    with output_lock(out, wait, progress.say, command="tune"):
        if out.is_dir():
            remove_stale_staging(out / BEST_DIR)
        prepare(out, force, building)
        yield


def prepare(out: Path, force: bool, building: bool) -> None:
    """Refuse (one-line UsageError) an `out` tune must not use; see the module's docstring."""
    from kiln.compiler.export.staging import check_output_dir
    from kiln.compiler.matrix.plan import PLAN_FILE
    from kiln.compiler.perf.tune import BEST_DIR, BUILDS_DIR

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
    from kiln.compiler.perf.tune import BUILDS_DIR
    from kiln.compiler.perf.tune_deploy import STATE_FILE

    return any((out / BUILDS_DIR / name).is_file() for name in (PLAN_FILE, STATE_FILE))


def foreign_best(out: Path) -> str | None:
    """Why `out`/best is not proven to be what a tune published here, as it published it; None when it is, or
    when there is none."""
    from kiln.compiler.export.loading import check_files
    from kiln.compiler.perf.tune import BEST_DIR
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
    from kiln.compiler.perf.tune import BUILDS_DIR

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
    from kiln.compiler.perf.tune import BUILDS_DIR
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
