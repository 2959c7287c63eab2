// run_aoti: load a Kiln `aoti` export (model.pt2, an AOTInductor package), run it on inputs read from
// .npy files, and write its outputs as .npy files. No Python needed at run time.
//
//   run_aoti MODEL.pt2 OUT_DIR INPUT.npy [INPUT.npy ...]
//
// Inputs are given in the order of the export's manifest ("inputs"), one .npy file each, written with
// numpy.save (C order, little-endian; float32/float64/float16, int64/int32/int8, uint8 or bool). Outputs are
// written to OUT_DIR/output_0.npy, output_1.npy, ... in the order of the manifest's "outputs"; read them
// with numpy.load. The package runs on the device it was compiled for (cpu or cuda): inputs are moved
// there and outputs back to the CPU.

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "npy.h"

namespace {

// numpy type code (without the byte-order character) <-> ATen scalar type.
const std::map<std::string, at::ScalarType>& npy_types() {
  static const std::map<std::string, at::ScalarType> types = {
      {"f4", at::kFloat}, {"f8", at::kDouble}, {"f2", at::kHalf}, {"i8", at::kLong}, {"i4", at::kInt},
      {"i2", at::kShort}, {"i1", at::kChar},   {"u1", at::kByte}, {"b1", at::kBool},
  };
  return types;
}

at::Tensor read_npy(const std::string& path) {
  const npy::Array array = npy::read(path);
  if (npy_types().count(array.code) == 0) {
    throw std::runtime_error(path + ": unsupported dtype " + array.code + " (need little-endian numeric or bool)");
  }
  at::Tensor tensor = at::empty(array.shape, at::TensorOptions().dtype(npy_types().at(array.code)));
  std::memcpy(tensor.data_ptr(), array.data.data(), array.data.size());
  return tensor;
}

void write_npy(const std::string& path, const at::Tensor& value) {
  const at::Tensor tensor = value.to(at::kCPU).contiguous();
  for (const auto& [code, scalar] : npy_types()) {
    if (scalar == tensor.scalar_type()) {
      npy::write(path, code, tensor.sizes().vec(), tensor.const_data_ptr(), tensor.nbytes());
      return;
    }
  }
  throw std::runtime_error(std::string("no .npy type for output dtype ") + c10::toString(tensor.scalar_type()));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt2 OUT_DIR INPUT.npy [INPUT.npy ...]\n";
    return 2;
  }
  // Have the package check each input's dtype, shape and device against what it was compiled for.
  setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", 0);
  try {
    c10::InferenceMode no_autograd;
    // fp32 convolutions and matmuls in full fp32 (no TF32 on NVIDIA GPUs), as Kiln validated the package.
    at::globalContext().setAllowTF32CuDNN(false);
    at::globalContext().setAllowTF32CuBLAS(false);
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    const auto metadata = loader.get_metadata();
    const auto device_key = metadata.find("AOTI_DEVICE_KEY");
    const at::Device device(device_key == metadata.end() ? "cpu" : device_key->second);

    std::vector<at::Tensor> inputs;
    for (int i = 3; i < argc; ++i) {
      inputs.push_back(read_npy(argv[i]).to(device));
    }
    const std::vector<at::Tensor> outputs = loader.run(inputs);

    std::filesystem::create_directories(argv[2]);
    for (size_t i = 0; i < outputs.size(); ++i) {
      const std::string path = (std::filesystem::path(argv[2]) / ("output_" + std::to_string(i) + ".npy")).string();
      write_npy(path, outputs[i]);
      std::cout << path << ": " << c10::toString(outputs[i].scalar_type()) << outputs[i].sizes() << "\n";
    }
  } catch (const c10::Error& error) {
    std::cerr << "run_aoti: error: " << error.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& error) {
    std::cerr << "run_aoti: error: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
