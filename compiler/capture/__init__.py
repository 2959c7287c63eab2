"""From what the user gives to a captured program: model sources (`sources`, the zoo, `.pt2` archives read without
unpickling), torch.export and the ONNX lowering (`program`, `onnx_files`), dynamic dimensions (`dynamic`) and the
FX rewrites the converters need (`decompositions`)."""
