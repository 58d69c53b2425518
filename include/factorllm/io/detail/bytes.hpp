// SPDX-License-Identifier: Apache-2.0
// Internal byte-level helpers of the file formats (safetensors, GGUF): little-endian words, IEEE half, a bounds-
// checked reader, and a writer that replaces its target file only once every byte has been written.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "../../core/dtype.hpp"
#include "../../core/error.hpp"
#include "../llama2c.hpp"

namespace factorllm {
namespace io {
namespace detail {

/// Reads a little-endian 16-bit word.
inline std::uint16_t load_le_u16(unsigned char const* p) noexcept {
  return static_cast<std::uint16_t>(p[0] | (p[1] << 8));
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

/// Converts IEEE-754 binary16 bits to the float they represent (exact: every half is a float).
inline float half_to_float(std::uint16_t h) noexcept {
  std::uint32_t const sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t const exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // infinity or NaN (payload kept)
  } else if (exp != 0) {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;  // signed zero
  } else {
    // Subnormal half: shift the mantissa up until its leading 1 becomes the implicit bit.
    int e = -1;
    do {
      mant <<= 1;
      ++e;
    } while ((mant & 0x400u) == 0);
    bits = sign | (static_cast<std::uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

/// Converts a float to IEEE-754 binary16 bits, rounding to nearest with ties to even (as numpy and ggml do);
/// values beyond the half range become infinity, NaN stays a quiet NaN.
inline std::uint16_t float_to_half(float value) noexcept {
  std::uint32_t u;
  std::memcpy(&u, &value, sizeof u);
  std::uint16_t const sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  std::uint32_t const abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
  if (abs >= 0x47800000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // >= 65536: overflow to infinity
  if (abs < 0x38800000u) {
    // Result is a half subnormal (or zero): value / 2^-24 rounded to an integer, ties to even.
    if (abs < 0x33000000u) return sign;  // below half the smallest subnormal: rounds to zero
    std::uint32_t const e = abs >> 23;
    std::uint32_t const m = (abs & 0x7fffffu) | 0x800000u;
    std::uint32_t const shift = 126 - e;  // in [14, 24]: m * 2^(e-150) / 2^-24 = m >> (126 - e)
    std::uint32_t const q = m >> shift;
    std::uint32_t const rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    std::uint32_t const r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    return static_cast<std::uint16_t>(sign | r);
  }
  // Normal: rebias the exponent and round 13 mantissa bits away; a carry may roll into the exponent (correct).
  std::uint32_t const lsb = (abs >> 13) & 1u;
  std::uint32_t const rounded = abs + 0xfffu + lsb;
  return static_cast<std::uint16_t>(sign | (((rounded >> 13) - ((127u - 15u) << 10)) & 0xffffu));
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

/// Writes `bytes` to `path` through a temporary file in the same folder that is renamed over `path` only after a
/// complete write, so a failed save never leaves a truncated file behind (and never clobbers the old one).
/// \throws format_error naming the path when the file cannot be written or renamed.
inline void write_file_atomically(std::string const& path, unsigned char const* bytes, std::size_t n,
                                  char const* what) {
  std::string const tmp = path + ".partial";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw format_error(::factorllm::detail::concat(what, " '", path, "': cannot open '", tmp, "' for writing"));
    constexpr std::size_t kChunk = std::size_t{1} << 26;
    for (std::size_t at = 0; at < n && out; at += kChunk)
      out.write(reinterpret_cast<char const*>(bytes + at), static_cast<std::streamsize>(std::min(kChunk, n - at)));
    out.flush();
    if (!out) {
      out.close();
      std::error_code ec;
      std::filesystem::remove(tmp, ec);
      throw format_error(::factorllm::detail::concat(what, " '", path, "': write failed (disk full?)"));
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    throw format_error(::factorllm::detail::concat(what, " '", path, "': cannot move the written file into place: ",
                                                   ec.message()));
  }
}

/// Reads a whole regular file; the buffer is sized by the file itself, never by a field inside it.
inline std::vector<unsigned char> read_whole_file(std::string const& path, char const* what) {
  std::ifstream in;
  std::uint64_t const bytes = open_and_measure(in, path, what);
  if (bytes > static_cast<std::uint64_t>(std::numeric_limits<std::ptrdiff_t>::max()))
    throw format_error(::factorllm::detail::concat(what, " '", path, "': ", bytes,
                                                   " bytes, more than this platform can address"));
  std::vector<unsigned char> buffer(static_cast<std::size_t>(bytes));
  read_exact(in, buffer.data(), bytes, path, what);
  return buffer;
}

}  // namespace detail
}  // namespace io
}  // namespace factorllm
