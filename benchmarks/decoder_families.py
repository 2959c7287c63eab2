"""Every decoder family of tests/models/decoders.py exported for text generation to every generation target
(onnx, openvino: growing cache; tflite, tpu: static cache), with what the gate said: published or not, the greedy
tokens identical to the user's model, the largest step-logit error, and what the gate's prompts crossed.

    python benchmarks/decoder_families.py [--families llama,mistral] [--targets onnx,tflite] [--out DIR]

Prints a Markdown table (the test suite runs each family on two targets; this runs all of them)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.models.decoders import FAMILIES  # noqa: E402

TARGETS = ("onnx", "openvino", "tflite", "tpu")


def export(family: str, target: str, out: Path) -> dict[str, object]:
    """One `kiln export --json` in its own process: the row of the table."""
    started = time.monotonic()
    command = [sys.executable, str(ROOT / "cli.py"), "export", f"{ROOT / 'tests/models/decoders.py'}:{family}",
               "-t", target, "-o", str(out), "--json", "-q", "--force"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if run.returncode not in (0, 1) or not run.stdout.strip():
        return {"status": f"exit {run.returncode}: {run.stderr.strip().splitlines()[-1][:120]}", "seconds": seconds}
    (result,) = json.loads(run.stdout)["results"]
    manifest = out / ("manifest.json" if result["published"] else f".rejected/{target}/manifest.json")
    generation = json.loads(manifest.read_text())["parity"]["generation"]
    return {
        "status": "published" if result["published"] else "REJECTED",
        "identical": generation["identical"],
        "tokens": generation["tokens"],
        "max_err": generation["max_abs_logit_err"],
        "crossing": generation["crossing"],
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--out", type=Path, default=None, help="where the exports go (default: a temporary folder)")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="kiln-families-"))
    print("| family | target | gate | greedy tokens | max step-logit error | prompts | seconds |")
    print("|---|---|---|---|---|---|---|")
    for family in args.families.split(","):
        for target in args.targets.split(","):
            row = export(family, target, work / f"{family}-{target}")
            if "identical" not in row:
                print(f"| {family} | {target} | {row['status']} | | | | {row['seconds']:.0f} |", flush=True)
                continue
            same = f"{row['tokens']} identical" if row["identical"] else f"{row['tokens']} DIFFER"
            print(f"| {family} | {target} | {row['status']} | {same} | {row['max_err']:.2g} | {row['crossing']} | "
                  f"{row['seconds']:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
