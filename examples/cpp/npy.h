// npy.h: read and write .npy files (numpy.save's format, version 1.0 to 3.0) without any library, for the C++
// runners of Kiln's exports (examples/cpp/run_aoti.cpp, examples/executorch_cpp/run_pte.cpp).
//
// An array is its numpy type code without the byte order ("f4", "i8", "b1"...), its shape and its raw bytes in C
// order. Only little-endian (or single-byte) types in C order are read; anything else is a std::runtime_error
// that says what to change.
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace npy {

struct Array {
  std::string code;  // e.g. "f4" (float32), "i8" (int64), "b1" (bool)
  std::vector<int64_t> shape;
  std::vector<char> data;  // C order
};

inline const char* magic() { return "\x93NUMPY"; }
constexpr size_t kMagicSize = 6;

// The size in bytes of one item of a type code ("f4" -> 4).
inline size_t item_size(const std::string& code) {
  if (code.size() < 2 || std::string("fiub").find(code[0]) == std::string::npos) {
    throw std::runtime_error("unsupported .npy type " + code);
  }
  return static_cast<size_t>(std::stoul(code.substr(1)));
}

// The value text of `'key': VALUE` in a .npy header dict.
inline std::string header_field(const std::string& header, const std::string& key) {
  const auto at = header.find("'" + key + "'");
  if (at == std::string::npos) {
    throw std::runtime_error("the .npy header has no '" + key + "'");
  }
  auto start = header.find(':', at) + 1;
  while (start < header.size() && header[start] == ' ') {
    ++start;
  }
  const char open = header[start];
  const auto end = open == '(' ? header.find(')', start) + 1
                   : open == '\'' ? header.find('\'', start + 1) + 1
                                  : header.find_first_of(",}", start);
  return header.substr(start, end - start);
}

inline Array read(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    throw std::runtime_error("cannot open " + path);
  }
  char head[kMagicSize + 2];
  file.read(head, sizeof(head));
  if (!file || std::memcmp(head, magic(), kMagicSize) != 0) {
    throw std::runtime_error(path + " is not a .npy file (write it with numpy.save)");
  }
  const int major = static_cast<unsigned char>(head[kMagicSize]);
  uint32_t header_size = 0;
  unsigned char size_bytes[4] = {0, 0, 0, 0};
  file.read(reinterpret_cast<char*>(size_bytes), major == 1 ? 2 : 4);
  for (int i = 3; i >= 0; --i) {
    header_size = (header_size << 8) | size_bytes[i];
  }
  std::string header(header_size, '\0');
  file.read(header.data(), header_size);

  Array array;
  const std::string descr = header_field(header, "descr");  // e.g. '<f4'
  if (descr.size() < 4 || descr[1] == '>') {
    throw std::runtime_error(path + ": unsupported dtype " + descr + " (need little-endian numeric or bool)");
  }
  array.code = descr.substr(2, descr.size() - 3);
  const size_t item = item_size(array.code);
  if (header_field(header, "fortran_order") != "False") {
    throw std::runtime_error(path + " is in Fortran order: save numpy.ascontiguousarray(x)");
  }
  std::stringstream dims(header_field(header, "shape"));
  std::string dim;
  dims.ignore(1);  // '('
  while (std::getline(dims, dim, ',')) {
    if (dim.find_first_of("0123456789") != std::string::npos) {
      array.shape.push_back(std::stoll(dim));
    }
  }
  const auto count = std::accumulate(array.shape.begin(), array.shape.end(), int64_t{1}, std::multiplies<>());
  array.data.resize(static_cast<size_t>(count) * item);
  file.read(array.data.data(), static_cast<std::streamsize>(array.data.size()));
  if (!file) {
    throw std::runtime_error(path + " is shorter than its header says");
  }
  return array;
}

inline void write(const std::string& path, const std::string& code, const std::vector<int64_t>& shape,
                  const void* data, size_t nbytes) {
  std::string dims = "(";
  for (size_t axis = 0; axis < shape.size(); ++axis) {
    dims += (axis ? ", " : "") + std::to_string(shape[axis]);
  }
  dims += shape.size() == 1 ? ",)" : ")";  // numpy writes (), (3,) and (1, 3)
  const char order = item_size(code) == 1 ? '|' : '<';
  std::string header =
      "{'descr': '" + std::string(1, order) + code + "', 'fortran_order': False, 'shape': " + dims + ", }";
  const size_t unpadded = kMagicSize + 2 + 2 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  std::ofstream file(path, std::ios::binary);
  const uint16_t size = static_cast<uint16_t>(header.size());
  const char version[2] = {1, 0};
  const char size_bytes[2] = {static_cast<char>(size & 0xff), static_cast<char>(size >> 8)};
  file.write(magic(), kMagicSize);
  file.write(version, 2);
  file.write(size_bytes, 2);
  file.write(header.data(), static_cast<std::streamsize>(header.size()));
  file.write(static_cast<const char*>(data), static_cast<std::streamsize>(nbytes));
  if (!file) {
    throw std::runtime_error("cannot write " + path);
  }
}

}  // namespace npy
