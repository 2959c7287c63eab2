// run_pte: load a Kiln `executorch` export (model.pte), run its `forward` on inputs read from .npy files, and
// write its outputs as .npy files. Built against the C++ runtime that ships in the executorch wheel (its
// headers, libexecutorch and the XNNPACK backend): no Python needed at run time.
//
//   run_pte MODEL.pte OUT_DIR INPUT.npy [INPUT.npy ...]
//
// Inputs are given in the order of the export's manifest ("inputs"), one .npy file each, written with
// numpy.save (C order, little-endian; float32/float64/float16, int64/int32/int16/int8, uint8 or bool). Outputs are
// written to OUT_DIR/output_0.npy, output_1.npy, ... in the order of the manifest's "outputs"; read them with
// numpy.load. Each input's dtype and rank are checked against the program before it runs; a size within a dynamic
// dim's range is accepted, anything else is refused by the runtime with an error code.

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <filesystem>
#include <iostream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "npy.h"

namespace {

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::runtime::EValue;

// numpy type code (without the byte-order character) <-> ExecuTorch scalar type.
const std::map<std::string, ScalarType>& npy_types() {
  static const std::map<std::string, ScalarType> types = {
      {"f4", ScalarType::Float}, {"f8", ScalarType::Double}, {"f2", ScalarType::Half},
      {"i8", ScalarType::Long},  {"i4", ScalarType::Int},    {"i2", ScalarType::Short},
      {"i1", ScalarType::Char},  {"u1", ScalarType::Byte},   {"b1", ScalarType::Bool},
  };
  return types;
}

std::string npy_code(ScalarType type) {
  for (const auto& [code, scalar] : npy_types()) {
    if (scalar == type) {
      return code;
    }
  }
  throw std::runtime_error(std::string("no .npy type for output dtype ") + executorch::runtime::toString(type));
}

void check(executorch::runtime::Error error, const std::string& what) {
  if (error != executorch::runtime::Error::Ok) {
    throw std::runtime_error(what + ": " + executorch::runtime::to_string(error));
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " MODEL.pte OUT_DIR INPUT.npy [INPUT.npy ...]\n";
    return 2;
  }
  try {
    Module module(argv[1], Module::LoadMode::File);
    check(module.load_forward(), std::string("cannot load the forward method of ") + argv[1]);
    const auto meta = module.method_meta("forward");
    check(meta.error(), "cannot read the forward method's signature");
    const size_t expected = meta->num_inputs();
    if (static_cast<size_t>(argc - 3) != expected) {
      throw std::runtime_error("the program takes " + std::to_string(expected) + " inputs, " +
                               std::to_string(argc - 3) + " given");
    }

    std::vector<npy::Array> arrays;  // own the input bytes while the program runs
    std::vector<executorch::extension::TensorPtr> tensors;
    std::vector<EValue> inputs;
    for (int i = 3; i < argc; ++i) {
      arrays.push_back(npy::read(argv[i]));
      npy::Array& array = arrays.back();
      const auto info = meta->input_tensor_meta(static_cast<size_t>(i - 3));
      check(info.error(), "input " + std::to_string(i - 3) + " is not a tensor");
      const auto type = npy_types().find(array.code);
      if (type == npy_types().end() || type->second != info->scalar_type()) {
        throw std::runtime_error(std::string(argv[i]) + ": dtype " + array.code + ", the program expects " +
                                 executorch::runtime::toString(info->scalar_type()));
      }
      if (array.shape.size() != info->sizes().size()) {
        throw std::runtime_error(std::string(argv[i]) + ": rank " + std::to_string(array.shape.size()) +
                                 ", the program expects " + std::to_string(info->sizes().size()));
      }
      std::vector<executorch::aten::SizesType> sizes(array.shape.begin(), array.shape.end());
      tensors.push_back(executorch::extension::make_tensor_ptr(sizes, array.data.data(), type->second));
      inputs.emplace_back(tensors.back());
    }
    const auto outputs = module.forward(inputs);
    check(outputs.error(), "forward failed");

    std::filesystem::create_directories(argv[2]);
    for (size_t i = 0; i < outputs->size(); ++i) {
      const auto& tensor = (*outputs)[i].toTensor();
      const std::vector<int64_t> shape(tensor.sizes().begin(), tensor.sizes().end());
      const std::string path = (std::filesystem::path(argv[2]) / ("output_" + std::to_string(i) + ".npy")).string();
      npy::write(path, npy_code(tensor.scalar_type()), shape, tensor.const_data_ptr(), tensor.nbytes());
      std::cout << path << ": " << executorch::runtime::toString(tensor.scalar_type()) << " [";
      for (size_t axis = 0; axis < shape.size(); ++axis) {
        std::cout << (axis ? ", " : "") << shape[axis];
      }
      std::cout << "]\n";
    }
  } catch (const std::exception& error) {
    std::cerr << "run_pte: error: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
