"""Run a Kiln `tpu` export's portable StableHLO with JAX/PJRT, without TensorFlow.

    python examples/stablehlo_jax.py exports/cnn-tpu            # on this CPU
    python examples/stablehlo_jax.py exports/cnn-tpu --platform tpu   # on a Cloud TPU VM

Inputs are random arrays shaped like the manifest's inputs; outputs are printed by name. The weights are not in the
module: `@main` takes them as its first arguments, read here from `model.weights.safetensors` in the order the
manifest's `runtime_config.stablehlo_arguments` gives.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def load_stablehlo_text(export_dir: Path) -> str:
    """The StableHLO module of an export, read from its portable versioned bytecode."""
    from litert_converter.mlir import ir
    from litert_converter.mlir.dialects import stablehlo
    from litert_torch.backend.export_utils import create_ir_context

    bytecode = stablehlo.deserialize_portable_artifact_str((export_dir / "model.stablehlo.mlirbc").read_bytes())
    with create_ir_context():
        return ir.Module.parse(bytecode).operation.get_asm()


def arguments(export_dir: Path, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """`@main`'s arguments: the weights (from `model.weights.safetensors`), then `arrays` (the model's inputs, in
    manifest order), in the order the manifest lists them."""
    from safetensors.numpy import load_file

    manifest = json.loads((export_dir / "manifest.json").read_text())
    order = manifest["runtime_config"]["stablehlo_arguments"]["model.stablehlo.mlirbc"]
    weights = load_file(str(export_dir / "model.weights.safetensors"))
    inputs = dict(zip([spec["name"] for spec in manifest["inputs"]], arrays))
    return [weights[ref] if kind == "weight" else inputs[ref] for kind, ref in (a.split(":", 1) for a in order)]


def run(export_dir: Path, arrays: list[np.ndarray], platform: str = "cpu") -> list[np.ndarray]:
    """Compile the module with PJRT for `platform` and run it on `arrays` (in manifest input order)."""
    import jax
    from jax.extend.backend import get_backend

    devices = jax.devices(platform)[:1]
    executable = get_backend(platform).compile_and_load(load_stablehlo_text(export_dir), devices)
    results = executable.execute_sharded([jax.device_put(a, devices[0]) for a in arguments(export_dir, arrays)])
    return [np.asarray(per_device[0]) for per_device in results.disassemble_into_single_device_arrays()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--platform", default="cpu")
    args = parser.parse_args()
    manifest = json.loads((args.export_dir / "manifest.json").read_text())
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(spec["shape"]).astype(spec["dtype"]) for spec in manifest["inputs"]]
    for spec, value in zip(manifest["outputs"], run(args.export_dir, arrays, args.platform)):
        print(f"{spec['name']}: {value.dtype}{list(value.shape)}")


if __name__ == "__main__":
    main()
