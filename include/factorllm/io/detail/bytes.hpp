// SPDX-License-Identifier: Apache-2.0
// Internal byte-level helpers of the file formats (llama2.c, safetensors, GGUF): little-endian words, IEEE half,
// overflow-checked sizes, a little-endian writer and a bounds-checked reader of untrusted bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "../../core/dtype.hpp"
#include "../../core/error.hpp"

namespace factorllm {
namespace io {
namespace detail {

// The io headers build their messages with detail::concat; inside namespace io that name resolves here.
using ::factorllm::detail::concat;

/// True on a little-endian host (the files are little-endian; a big-endian host swaps bytes).
inline bool host_is_little_endian() noexcept {
  std::uint32_t const one = 1;
  unsigned char first = 0;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

/// Reads a little-endian 16-bit word.
inline std::uint16_t load_le_u16(unsigned char const* p) noexcept {
  return static_cast<std::uint16_t>(p[0] | (p[1] << 8));
}

/// Reads a little-endian 32-bit word from 4 bytes (no alignment needed).
inline std::uint32_t load_le_u32(unsigned char const* p) noexcept {
  return static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) |
         (static_cast<std::uint32_t>(p[2]) << 16) | (static_cast<std::uint32_t>(p[3]) << 24);
}

/// Reads a little-endian int32 (two's complement, bit-copied so no implementation-defined conversion).
inline std::int32_t load_le_i32(unsigned char const* p) noexcept {
  std::uint32_t const u = load_le_u32(p);
  std::int32_t v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

/// Reads a little-endian IEEE-754 float32.
inline float load_le_f32(unsigned char const* p) noexcept {
  std::uint32_t const u = load_le_u32(p);
  float v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

/// Reads a little-endian 64-bit word.
inline std::uint64_t load_le_u64(unsigned char const* p) noexcept {
  return static_cast<std::uint64_t>(load_le_u32(p)) | (static_cast<std::uint64_t>(load_le_u32(p + 4)) << 32);
}

/// Reads a little-endian IEEE-754 float64.
inline double load_le_f64(unsigned char const* p) noexcept {
  std::uint64_t const u = load_le_u64(p);
  double v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

/// Converts `n` floats just copied raw from a little-endian file to host order (a no-op on little-endian hosts).
inline void floats_from_le(float* p, std::size_t n) noexcept {
  if (host_is_little_endian()) return;
  for (std::size_t i = 0; i < n; ++i) {
    unsigned char b[4];
    std::memcpy(b, p + i, 4);
    p[i] = load_le_f32(b);
  }
}

/// Converts IEEE-754 binary16 bits to the float they represent (exact): the f16 format of core/dtype.hpp.
inline float half_to_float(std::uint16_t h) noexcept { return f16::from_bits(h).to_float(); }

/// Converts a float to IEEE-754 binary16 bits, rounding to nearest with ties to even (as numpy and ggml do);
/// values beyond the half range become infinity, NaN becomes the quiet NaN 0x7e00 (with the sign).
inline std::uint16_t float_to_half(float value) noexcept { return f16(value).bits; }

/// Returns a * b for non-negative operands, or -1 when the product does not fit in int64.
inline std::int64_t mul_nonneg(std::int64_t a, std::int64_t b) noexcept {
  if (a != 0 && b > std::numeric_limits<std::int64_t>::max() / a) return -1;
  return a * b;
}

/// Returns a + b for non-negative operands, or -1 when the sum does not fit in int64.
inline std::int64_t add_nonneg(std::int64_t a, std::int64_t b) noexcept {
  if (b > std::numeric_limits<std::int64_t>::max() - a) return -1;
  return a + b;
}

/// Appends little-endian values to a byte buffer (the files are little-endian whatever the host).
class ByteSink {
 public:
  void u8(std::uint8_t v) { bytes_.push_back(v); }
  void u16(std::uint16_t v) {
    for (int i = 0; i < 2; ++i) bytes_.push_back(static_cast<unsigned char>(v >> (8 * i)));
  }
  void u32(std::uint32_t v) {
    for (int i = 0; i < 4; ++i) bytes_.push_back(static_cast<unsigned char>(v >> (8 * i)));
  }
  void u64(std::uint64_t v) {
    for (int i = 0; i < 8; ++i) bytes_.push_back(static_cast<unsigned char>(v >> (8 * i)));
  }
  void i32(std::int32_t v) {
    std::uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    u32(u);
  }
  void i64(std::int64_t v) {
    std::uint64_t u;
    std::memcpy(&u, &v, sizeof u);
    u64(u);
  }
  void f32(float v) {
    std::uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    u32(u);
  }
  void f64(double v) {
    std::uint64_t u;
    std::memcpy(&u, &v, sizeof u);
    u64(u);
  }
  void raw(void const* p, std::size_t n) {
    auto const* b = static_cast<unsigned char const*>(p);
    bytes_.insert(bytes_.end(), b, b + n);
  }
  /// Appends zero bytes until the size is a multiple of `alignment` (> 0).
  void pad_to(std::size_t alignment, unsigned char fill = 0) {
    while (bytes_.size() % alignment != 0) bytes_.push_back(fill);
  }
  std::size_t size() const noexcept { return bytes_.size(); }
  std::vector<unsigned char>& bytes() noexcept { return bytes_; }

 private:
  std::vector<unsigned char> bytes_;
};

/// A cursor over untrusted bytes: every read checks that the bytes exist and throws format_error naming the
/// source, the field and the offset otherwise. Never reads outside [data, data + size).
class ByteCursor {
 public:
  ByteCursor(unsigned char const* data, std::size_t size, std::string source)
      : data_(data), size_(size), source_(std::move(source)) {}

  std::size_t offset() const noexcept { return at_; }
  std::size_t remaining() const noexcept { return size_ - at_; }
  std::string const& source() const noexcept { return source_; }

  /// Throws format_error unless `n` more bytes exist; `what` names the field being read.
  void need(std::uint64_t n, char const* what) const {
    if (n > remaining())
      throw format_error(::factorllm::detail::concat(source_, ": truncated: ", what, " needs ", n, " bytes at offset ",
                                                     at_, ", only ", remaining(), " remain"));
  }
  unsigned char const* take(std::uint64_t n, char const* what) {
    need(n, what);
    unsigned char const* p = data_ + at_;
    at_ += static_cast<std::size_t>(n);
    return p;
  }
  std::uint8_t u8(char const* what) { return *take(1, what); }
  std::uint16_t u16(char const* what) { return load_le_u16(take(2, what)); }
  std::uint32_t u32(char const* what) { return load_le_u32(take(4, what)); }
  std::uint64_t u64(char const* what) { return load_le_u64(take(8, what)); }
  float f32(char const* what) { return load_le_f32(take(4, what)); }
  double f64(char const* what) { return load_le_f64(take(8, what)); }
  void skip(std::uint64_t n, char const* what) { take(n, what); }

 private:
  unsigned char const* data_;
  std::size_t size_;
  std::size_t at_ = 0;
  std::string source_;
};

}  // namespace detail
}  // namespace io
}  // namespace factorllm
