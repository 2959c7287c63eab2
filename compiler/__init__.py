"""Kiln's core, by concern: `capture/` (model sources, torch.export, the ONNX lowering, dynamic dims, rewrites),
`export/` (the export flow and its steps), `parity/` (the reference, the gate, input files, verify),
`diagnose/` (where an artifact diverges), `generation/` (text generation with a KV cache), `perf/` (timing,
bench, tune), `quantization/`, `matrix/`; the leaf modules (errors, types, metrics, image layout, progress,
limits, safe file access, signals, host) at the top. The library API is `kiln` itself (`kiln.export`, ...)."""
