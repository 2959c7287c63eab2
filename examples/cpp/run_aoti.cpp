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

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

const char kMagic[] = "\x93NUMPY";
const size_t kMagicSize = 6;

// numpy dtype string (without the byte-order character) <-> ATen scalar type.
const std::map<std::string, at::ScalarType>& npy_types() {
  static const std::map<std::string, at::ScalarType> types = {
      {"f4", at::kFloat}, {"f8", at::kDouble}, {"f2", at::kHalf}, {"i8", at::kLong}, {"i4", at::kInt},
      {"i2", at::kShort}, {"i1", at::kChar},   {"u1", at::kByte}, {"b1", at::kBool},
  };
  return types;
}

std::string npy_descr(at::ScalarType type) {
  for (const auto& [code, scalar] : npy_types()) {
    if (scalar == type) {
      return (code == "i1" || code == "u1" || code == "b1" ? "|" : "<") + code;
    }
  }
  throw std::runtime_error(std::string("no .npy type for output dtype ") + c10::toString(type));
}

// The value text of `'key': VALUE` in a .npy header dict.
std::string header_field(const std::string& header, const std::string& key) {
  const auto at = header.find("'" + key + "'");
  if (at == std::string::npos) {
    throw std::runtime_error("the .npy header has no '" + key + "'");
  }
  auto start = header.find(':', at) + 1;
  while (header[start] == ' ') {
    ++start;
  }
  const char open = header[start];
  const auto end = open == '(' ? header.find(')', start) + 1
                   : open == '\'' ? header.find('\'', start + 1) + 1
                                  : header.find_first_of(",}", start);
  return header.substr(start, end - start);
}

at::Tensor read_npy(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    throw std::runtime_error("cannot open " + path);
  }
  char magic[kMagicSize + 2];
  file.read(magic, sizeof(magic));
  if (!file || std::memcmp(magic, kMagic, kMagicSize) != 0) {
    throw std::runtime_error(path + " is not a .npy file (write it with numpy.save)");
  }
  const int major = static_cast<unsigned char>(magic[kMagicSize]);
  uint32_t header_size = 0;
  unsigned char size_bytes[4] = {0, 0, 0, 0};
  file.read(reinterpret_cast<char*>(size_bytes), major == 1 ? 2 : 4);
  for (int i = 3; i >= 0; --i) {
    header_size = (header_size << 8) | size_bytes[i];
  }
  std::string header(header_size, '\0');
  file.read(header.data(), header_size);

  const std::string descr = header_field(header, "descr");  // e.g. '<f4'
  const std::string code = descr.substr(2, descr.size() - 3);
  if (descr[1] == '>' || npy_types().count(code) == 0) {
    throw std::runtime_error(path + ": unsupported dtype " + descr + " (need little-endian numeric or bool)");
  }
  if (header_field(header, "fortran_order") != "False") {
    throw std::runtime_error(path + " is in Fortran order: save numpy.ascontiguousarray(x)");
  }
  std::vector<int64_t> shape;
  std::stringstream dims(header_field(header, "shape"));
  std::string dim;
  dims.ignore(1);  // '('
  while (std::getline(dims, dim, ',')) {
    if (dim.find_first_of("0123456789") != std::string::npos) {
      shape.push_back(std::stoll(dim));
    }
  }
  at::Tensor tensor = at::empty(shape, at::TensorOptions().dtype(npy_types().at(code)));
  file.read(static_cast<char*>(tensor.data_ptr()), static_cast<std::streamsize>(tensor.nbytes()));
  if (!file) {
    throw std::runtime_error(path + " is shorter than its header says");
  }
  return tensor;
}

void write_npy(const std::string& path, const at::Tensor& value) {
  const at::Tensor tensor = value.to(at::kCPU).contiguous();
  std::string shape = "(";
  for (int64_t axis = 0; axis < tensor.dim(); ++axis) {
    shape += (axis ? ", " : "") + std::to_string(tensor.size(axis));
  }
  shape += tensor.dim() == 1 ? ",)" : ")";  // numpy writes (), (3,) and (1, 3)
  std::string header =
      "{'descr': '" + npy_descr(tensor.scalar_type()) + "', 'fortran_order': False, 'shape': " + shape + ", }";
  const size_t unpadded = kMagicSize + 2 + 2 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  std::ofstream file(path, std::ios::binary);
  const uint16_t size = static_cast<uint16_t>(header.size());
  const char version[2] = {1, 0};
  const char size_bytes[2] = {static_cast<char>(size & 0xff), static_cast<char>(size >> 8)};
  file.write(kMagic, kMagicSize);
  file.write(version, 2);
  file.write(size_bytes, 2);
  file.write(header.data(), static_cast<std::streamsize>(header.size()));
  file.write(static_cast<const char*>(tensor.const_data_ptr()), static_cast<std::streamsize>(tensor.nbytes()));
  if (!file) {
    throw std::runtime_error("cannot write " + path);
  }
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
