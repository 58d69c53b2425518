// SPDX-License-Identifier: Apache-2.0
// Hugging Face safetensors reader (untrusted input) and writer.
//
// File layout (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length n, then n bytes
// of UTF-8 JSON {"__metadata__": {str: str}, "<name>": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]},
// ...}, then the data section; offsets are relative to the data section and the tensors tile it exactly.
// Needs nlohmann-json (Debian nlohmann-json3-dev) for the header.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../core/tensor_view.hpp"
#include "detail/bytes.hpp"
#include "detail/file.hpp"
#include "detail/tensor_values.hpp"

namespace factorllm {
namespace io {

/// Element types of the safetensors format (names as written in the header: "F32", "BF16", ...).
enum class SafetensorsDtype { boolean, u8, i8, f8_e5m2, f8_e4m3, i16, u16, f16, bf16, i32, u32, f32, f64, i64, u64 };

/// Returns the header spelling of a dtype ("F32", ...).
inline char const* to_string(SafetensorsDtype d) noexcept {
  switch (d) {
    case SafetensorsDtype::boolean: return "BOOL";
    case SafetensorsDtype::u8: return "U8";
    case SafetensorsDtype::i8: return "I8";
    case SafetensorsDtype::f8_e5m2: return "F8_E5M2";
    case SafetensorsDtype::f8_e4m3: return "F8_E4M3";
    case SafetensorsDtype::i16: return "I16";
    case SafetensorsDtype::u16: return "U16";
    case SafetensorsDtype::f16: return "F16";
    case SafetensorsDtype::bf16: return "BF16";
    case SafetensorsDtype::i32: return "I32";
    case SafetensorsDtype::u32: return "U32";
    case SafetensorsDtype::f32: return "F32";
    case SafetensorsDtype::f64: return "F64";
    case SafetensorsDtype::i64: return "I64";
    case SafetensorsDtype::u64: return "U64";
  }
  return "?";
}

/// Returns the size in bytes of one element of a dtype.
inline std::size_t element_bytes(SafetensorsDtype d) noexcept {
  switch (d) {
    case SafetensorsDtype::boolean:
    case SafetensorsDtype::u8:
    case SafetensorsDtype::i8:
    case SafetensorsDtype::f8_e5m2:
    case SafetensorsDtype::f8_e4m3: return 1;
    case SafetensorsDtype::i16:
    case SafetensorsDtype::u16:
    case SafetensorsDtype::f16:
    case SafetensorsDtype::bf16: return 2;
    case SafetensorsDtype::i32:
    case SafetensorsDtype::u32:
    case SafetensorsDtype::f32: return 4;
    case SafetensorsDtype::f64:
    case SafetensorsDtype::i64:
    case SafetensorsDtype::u64: return 8;
  }
  return 0;
}

/// Parses a header dtype name; returns false for a name the format does not define.
inline bool safetensors_dtype_from_string(std::string const& name, SafetensorsDtype& out) noexcept {
  for (int i = 0; i <= static_cast<int>(SafetensorsDtype::u64); ++i) {
    auto const d = static_cast<SafetensorsDtype>(i);
    if (name == to_string(d)) {
      out = d;
      return true;
    }
  }
  return false;
}

/// One tensor entry of a safetensors header, validated.
struct SafetensorsTensorInfo {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::f32;
  std::vector<std::int64_t> shape;  // row-major extents, each >= 0
  std::uint64_t data_begin = 0;     // byte offsets into the data section, data_begin <= data_end
  std::uint64_t data_end = 0;

  /// Returns the number of elements (1 for a rank-0 tensor).
  std::int64_t numel() const noexcept {
    std::int64_t n = 1;
    for (auto e : shape) n *= e;  // cannot overflow: checked when the header was read
    return n;
  }
  std::uint64_t bytes() const noexcept { return data_end - data_begin; }
};

namespace detail {
/// Formats a shape for messages: [a, b, c].
inline std::string shape_text(std::vector<std::int64_t> const& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

/// Largest header the reader accepts; the reference implementation has the same 100 MB cap.
constexpr std::uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;
/// Deepest JSON nesting a valid header has is 3 (object -> tensor object -> shape array); 8 leaves room.
constexpr int kMaxSafetensorsJsonDepth = 8;

/// Returns the deepest nesting of [ and { outside strings (a scan bounded by the header, before the JSON parser
/// allocates anything), so that hostile headers cannot drive a recursive structure arbitrarily deep.
inline int json_nesting_depth(unsigned char const* p, std::size_t n) noexcept {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (std::size_t i = 0; i < n; ++i) {
    unsigned char const c = p[i];
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      deepest = std::max(deepest, ++depth);
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return deepest;
}
}  // namespace detail

/// A safetensors file held in memory: its validated header and its data section.
/// Immutable after construction; safe to share across threads.
class SafetensorsFile {
 public:
  /// Loads a file. The header length is checked against the file size before the header is read, and the header is
  /// fully validated (see parse()) before the data section is allocated and read.
  /// \throws format_error naming the path and what was wrong.
  static SafetensorsFile load(std::string const& path) {
    std::ifstream in;
    std::uint64_t const file_bytes = detail::open_and_measure(in, path, "safetensors");
    std::string const source = "safetensors '" + path + "'";
    if (file_bytes < 8)
      throw format_error(detail::concat(source, ": ", file_bytes, " bytes, shorter than the 8-byte header length"));
    unsigned char len[8];
    detail::read_exact(in, len, 8, path, "safetensors");
    std::uint64_t const n = check_header_length(detail::load_le_u64(len), file_bytes, source);
    std::vector<unsigned char> header(static_cast<std::size_t>(n));
    detail::read_exact(in, header.data(), n, path, "safetensors");
    SafetensorsFile f;
    f.source_ = source;
    f.parse_header(header.data(), header.size(), file_bytes - 8 - n);
    f.data_.resize(static_cast<std::size_t>(file_bytes - 8 - n));
    detail::read_exact(in, f.data_.data(), f.data_.size(), path, "safetensors");
    return f;
  }

  /// Parses a file held in memory (the data section is copied).
  /// \throws format_error when: the input is shorter than 8 bytes; the header length exceeds the input or 100 MB;
  ///         the header is not UTF-8 JSON, nests deeper than 8, repeats a key or is not an object; __metadata__ is
  ///         not an object of strings; a tensor entry is not {dtype, shape, data_offsets} with a known dtype, a
  ///         shape of non-negative integers whose byte size fits 64 bits, and 2 offsets begin <= end; an entry's
  ///         byte range differs from dtype size * shape product, or runs past the data section; or the entries
  ///         do not tile the data section exactly (overlap, gap, or unused trailing bytes).
  static SafetensorsFile parse(void const* data, std::size_t bytes) {
    if (data == nullptr && bytes != 0) throw format_error("safetensors: null data pointer with a non-zero size");
    auto const* p = static_cast<unsigned char const*>(data);
    SafetensorsFile f;
    f.source_ = "safetensors <memory buffer>";
    if (bytes < 8)
      throw format_error(detail::concat(f.source_, ": ", bytes, " bytes, shorter than the 8-byte header length"));
    std::uint64_t const n = check_header_length(detail::load_le_u64(p), bytes, f.source_);
    f.parse_header(p + 8, static_cast<std::size_t>(n), bytes - 8 - n);
    f.data_.assign(p + 8 + n, p + bytes);
    return f;
  }

  /// Returns the __metadata__ strings (empty when the file has none).
  std::map<std::string, std::string> const& metadata() const noexcept { return metadata_; }
  /// Returns the tensors in data-section order.
  std::vector<SafetensorsTensorInfo> const& tensors() const noexcept { return tensors_; }
  /// Returns the tensor called `name`, or nullptr.
  SafetensorsTensorInfo const* find(std::string const& name) const noexcept {
    auto const it = index_.find(name);
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }
  /// Returns the tensor called `name`. \throws format_error when the file has none.
  SafetensorsTensorInfo const& info(std::string const& name) const {
    auto const* t = find(name);
    if (t == nullptr) throw format_error(detail::concat(source_, ": no tensor '", name, "'"));
    return *t;
  }
  /// Returns the little-endian bytes of a tensor. \throws format_error when the file has no such tensor.
  unsigned char const* raw(std::string const& name) const { return data_.data() + info(name).data_begin; }
  /// Returns the name of the source ("safetensors '<path>'") for messages.
  std::string const& source() const noexcept { return source_; }

  /// Converts a floating-point tensor (F32, F16, BF16 or F64) to float.
  /// \throws format_error when the file has no such tensor or its dtype is not a floating type.
  std::vector<float> to_float(std::string const& name) const {
    auto const& t = info(name);
    unsigned char const* p = data_.data() + t.data_begin;
    std::size_t const n = static_cast<std::size_t>(t.numel());
    std::vector<float> out(n);
    switch (t.dtype) {
      case SafetensorsDtype::f32:
        for (std::size_t i = 0; i < n; ++i) out[i] = detail::load_le_f32(p + 4 * i);
        break;
      case SafetensorsDtype::f16:
        for (std::size_t i = 0; i < n; ++i) out[i] = detail::half_to_float(detail::load_le_u16(p + 2 * i));
        break;
      case SafetensorsDtype::bf16:
        for (std::size_t i = 0; i < n; ++i) out[i] = bf16::from_bits(detail::load_le_u16(p + 2 * i)).to_float();
        break;
      case SafetensorsDtype::f64:
        for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<float>(detail::load_le_f64(p + 8 * i));
        break;
      default:
        throw format_error(detail::concat(source_, ": tensor '", name, "' has dtype ", to_string(t.dtype),
                                          ", expected a floating type (F32, F16, BF16, F64)"));
    }
    return out;
  }

  /// Converts an integer tensor (I8..I64, U8..U64, BOOL) to int64.
  /// \throws format_error when the file has no such tensor, its dtype is not an integer type, or a U64 value
  ///         exceeds the int64 range.
  std::vector<std::int64_t> to_int64(std::string const& name) const {
    auto const& t = info(name);
    unsigned char const* p = data_.data() + t.data_begin;
    std::size_t const n = static_cast<std::size_t>(t.numel());
    // The dtype is checked before the loop: a tensor with no elements must be refused too, not returned empty.
    switch (t.dtype) {
      case SafetensorsDtype::boolean:
      case SafetensorsDtype::u8:
      case SafetensorsDtype::i8:
      case SafetensorsDtype::u16:
      case SafetensorsDtype::i16:
      case SafetensorsDtype::u32:
      case SafetensorsDtype::i32:
      case SafetensorsDtype::i64:
      case SafetensorsDtype::u64: break;
      default:
        throw format_error(detail::concat(source_, ": tensor '", name, "' has dtype ", to_string(t.dtype),
                                          ", expected an integer type"));
    }
    std::vector<std::int64_t> out(n);
    for (std::size_t i = 0; i < n; ++i) {
      switch (t.dtype) {
        case SafetensorsDtype::boolean:
        case SafetensorsDtype::u8: out[i] = p[i]; break;
        case SafetensorsDtype::i8: out[i] = static_cast<std::int8_t>(p[i]); break;
        case SafetensorsDtype::u16: out[i] = detail::load_le_u16(p + 2 * i); break;
        case SafetensorsDtype::i16: out[i] = static_cast<std::int16_t>(detail::load_le_u16(p + 2 * i)); break;
        case SafetensorsDtype::u32: out[i] = detail::load_le_u32(p + 4 * i); break;
        case SafetensorsDtype::i32: out[i] = detail::load_le_i32(p + 4 * i); break;
        case SafetensorsDtype::i64: {
          std::uint64_t const u = detail::load_le_u64(p + 8 * i);
          std::memcpy(&out[i], &u, sizeof u);
          break;
        }
        case SafetensorsDtype::u64: {
          std::uint64_t const u = detail::load_le_u64(p + 8 * i);
          if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
            throw format_error(detail::concat(source_, ": tensor '", name, "' element ", i, " = ", u,
                                              " exceeds the int64 range"));
          out[i] = static_cast<std::int64_t>(u);
          break;
        }
        default: break;  // refused above
      }
    }
    return out;
  }

  /// Reads a floating-point tensor whose shape must equal `expected`.
  /// \throws format_error when the tensor is missing, not floating-point, or has another shape.
  template <int Rank>
  Tensor<float, Rank> read_float(std::string const& name, std::array<std::ptrdiff_t, Rank> const& expected) const {
    require_shape(name, std::vector<std::int64_t>(expected.begin(), expected.end()));
    std::vector<float> const v = to_float(name);
    Tensor<float, Rank> out(expected);
    std::copy(v.begin(), v.end(), out.data());
    return out;
  }

  /// Throws format_error unless tensor `name` exists with exactly this shape.
  void require_shape(std::string const& name, std::vector<std::int64_t> const& expected) const {
    auto const& t = info(name);
    if (t.shape != expected)
      throw format_error(detail::concat(source_, ": tensor '", name, "' has shape ", detail::shape_text(t.shape),
                                        ", expected ", detail::shape_text(expected)));
  }

 private:
  SafetensorsFile() = default;

  static std::uint64_t check_header_length(std::uint64_t n, std::uint64_t total, std::string const& source) {
    if (n > total - 8)
      throw format_error(detail::concat(source, ": header length ", n, " exceeds the ", total - 8,
                                        " bytes that follow it (truncated file or corrupt length)"));
    if (n > detail::kMaxSafetensorsHeaderBytes)
      throw format_error(detail::concat(source, ": header length ", n, " exceeds the ",
                                        detail::kMaxSafetensorsHeaderBytes, "-byte limit"));
    if (n < 2) throw format_error(detail::concat(source, ": header length ", n, " cannot hold a JSON object"));
    return n;
  }

  [[noreturn]] void fail(std::string const& what) const { throw format_error(source_ + ": " + what); }

  /// Returns a non-negative JSON integer that fits int64, or fails naming `what`.
  std::int64_t json_count(nlohmann::json const& v, std::string const& what) const {
    if (!v.is_number_unsigned() || v.get<std::uint64_t>() > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
      fail(detail::concat(what, " is ", v.dump(), ", expected a non-negative integer below 2^63"));
    return static_cast<std::int64_t>(v.get<std::uint64_t>());
  }

  /// Validates the JSON header completely (nothing of the data section is touched) and fills metadata_/tensors_.
  void parse_header(unsigned char const* h, std::size_t n, std::uint64_t data_bytes) {
    int const depth = detail::json_nesting_depth(h, n);
    if (depth > detail::kMaxSafetensorsJsonDepth)
      fail(detail::concat("header nests JSON ", depth, " levels deep, more than ", detail::kMaxSafetensorsJsonDepth));
    // JSON lets an object repeat a key (the parser keeps the last); a header that does so is ambiguous: refuse it.
    std::vector<std::set<std::string>> keys;
    std::string duplicate;
    auto const on_event = [&](int, nlohmann::json::parse_event_t ev, nlohmann::json& parsed) {
      if (ev == nlohmann::json::parse_event_t::object_start) keys.emplace_back();
      else if (ev == nlohmann::json::parse_event_t::object_end && !keys.empty()) keys.pop_back();
      else if (ev == nlohmann::json::parse_event_t::key && !keys.empty() && parsed.is_string() &&
               !keys.back().insert(parsed.get<std::string>()).second && duplicate.empty())
        duplicate = parsed.get<std::string>();
      return true;
    };
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(h, h + n, on_event);
    } catch (nlohmann::json::exception const& e) {
      fail(detail::concat("header is not valid JSON: ", e.what()));
    }
    if (!duplicate.empty()) fail("header repeats the key '" + duplicate + "'");
    if (!j.is_object()) fail("header is not a JSON object");

    for (auto it = j.begin(); it != j.end(); ++it) {
      std::string const& name = it.key();
      nlohmann::json const& v = it.value();
      if (name == "__metadata__") {
        if (!v.is_object()) fail("__metadata__ is not an object");
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string()) fail("__metadata__ value of '" + m.key() + "' is not a string");
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      std::string const where = "tensor '" + name + "'";
      if (!v.is_object()) fail(where + " is not an object");
      for (auto k = v.begin(); k != v.end(); ++k)
        if (k.key() != "dtype" && k.key() != "shape" && k.key() != "data_offsets")
          fail(where + " has the unknown field '" + k.key() + "'");
      auto const dt = v.find("dtype"), sh = v.find("shape"), off = v.find("data_offsets");
      if (dt == v.end() || sh == v.end() || off == v.end())
        fail(where + " lacks one of the fields dtype, shape, data_offsets");
      SafetensorsTensorInfo t;
      t.name = name;
      if (!dt->is_string() || !safetensors_dtype_from_string(dt->get<std::string>(), t.dtype))
        fail(where + " has the unknown dtype " + dt->dump());
      if (!sh->is_array()) fail(where + " has a shape that is not an array");
      std::int64_t bytes = static_cast<std::int64_t>(element_bytes(t.dtype));
      for (std::size_t i = 0; i < sh->size(); ++i) {
        std::int64_t const e = json_count((*sh)[i], detail::concat(where, " shape[", i, "]"));
        t.shape.push_back(e);
        bytes = bytes < 0 ? -1 : detail::mul_nonneg(bytes, e);
      }
      if (bytes < 0) fail(where + " has shape " + detail::shape_text(t.shape) + " whose byte size overflows 64 bits");
      if (!off->is_array() || off->size() != 2) fail(where + " needs data_offsets [begin, end]");
      t.data_begin = static_cast<std::uint64_t>(json_count((*off)[0], where + " data_offsets[0]"));
      t.data_end = static_cast<std::uint64_t>(json_count((*off)[1], where + " data_offsets[1]"));
      if (t.data_begin > t.data_end)
        fail(detail::concat(where, " has data_offsets [", t.data_begin, ", ", t.data_end, "]: begin > end"));
      if (t.data_end > data_bytes)
        fail(detail::concat(where, " has data_offsets [", t.data_begin, ", ", t.data_end,
                            "] beyond the data section of ", data_bytes, " bytes"));
      if (t.data_end - t.data_begin != static_cast<std::uint64_t>(bytes))
        fail(detail::concat(where, " spans ", t.data_end - t.data_begin, " bytes but dtype ", to_string(t.dtype),
                            " x shape ", detail::shape_text(t.shape), " needs ", bytes));
      tensors_.push_back(std::move(t));
    }
    // The entries must tile the data section: sorted by offset, each starts where the previous ended (no overlap,
    // which would alias two tensors, and no gap or tail, as the reference implementation requires).
    std::sort(tensors_.begin(), tensors_.end(), [](auto const& a, auto const& b) {
      return a.data_begin != b.data_begin ? a.data_begin < b.data_begin : a.data_end < b.data_end;
    });
    std::uint64_t at = 0;
    for (auto const& t : tensors_) {
      if (t.data_begin < at)
        fail(detail::concat("tensor '", t.name, "' at bytes [", t.data_begin, ", ", t.data_end,
                            ") overlaps the previous tensor, which ends at ", at));
      if (t.data_begin > at)
        fail(detail::concat("bytes [", at, ", ", t.data_begin, ") of the data section belong to no tensor (before '",
                            t.name, "')"));
      at = t.data_end;
    }
    if (at != data_bytes)
      fail(detail::concat("the tensors cover ", at, " bytes but the data section has ", data_bytes,
                          " (trailing bytes)"));
    for (std::size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
  }

  std::string source_;
  std::map<std::string, std::string> metadata_;
  std::vector<SafetensorsTensorInfo> tensors_;
  std::map<std::string, std::size_t> index_;  // name -> position in tensors_
  std::vector<unsigned char> data_;           // the data section
};

/// Builds a safetensors file: tensors are laid out in the order they are added, the header is padded with spaces
/// so that the data section starts at a multiple of 8 bytes. Each add copies (and converts) the data at once.
class SafetensorsWriter {
 public:
  /// Sets a __metadata__ entry (replacing an earlier value of the same key).
  void set_metadata(std::string const& key, std::string const& value) { metadata_[key] = value; }

  /// Adds a tensor from floats, stored as `dtype` (F32, F16 with round-to-nearest-even, BF16, or F64).
  /// \param shape  row-major extents (>= 0); `values` holds their product many floats
  /// \throws value_error for an empty, repeated or reserved name, a negative extent, a size overflow, or a dtype
  ///         that is not F32, F16, BF16 or F64.
  void add(std::string const& name, SafetensorsDtype dtype, std::vector<std::int64_t> const& shape, float const* values) {
    std::size_t const n = check_entry(name, shape);
    detail::ByteSink sink;
    switch (dtype) {
      case SafetensorsDtype::f32: for (std::size_t i = 0; i < n; ++i) sink.f32(values[i]); break;
      case SafetensorsDtype::f16: for (std::size_t i = 0; i < n; ++i) sink.u16(detail::float_to_half(values[i])); break;
      case SafetensorsDtype::bf16: for (std::size_t i = 0; i < n; ++i) sink.u16(bf16(values[i]).bits); break;
      case SafetensorsDtype::f64: for (std::size_t i = 0; i < n; ++i) sink.f64(values[i]); break;
      default:
        throw value_error(detail::concat("SafetensorsWriter::add: tensor '", name, "': dtype ", to_string(dtype),
                                         " cannot be written from floats (use F32, F16, BF16 or F64)"));
    }
    entries_.push_back({name, dtype, shape, std::move(sink.bytes())});
  }

  /// Adds an integer tensor stored as I32 or I64. \throws value_error as add(), or when a value does not fit I32.
  void add_int(std::string const& name, SafetensorsDtype dtype, std::vector<std::int64_t> const& shape,
               std::int64_t const* values) {
    std::size_t const n = check_entry(name, shape);
    detail::ByteSink sink;
    if (dtype == SafetensorsDtype::i32) {
      for (std::size_t i = 0; i < n; ++i) {
        if (values[i] < std::numeric_limits<std::int32_t>::min() || values[i] > std::numeric_limits<std::int32_t>::max())
          throw value_error(detail::concat("SafetensorsWriter::add_int: tensor '", name, "' element ", i, " = ",
                                           values[i], " does not fit I32"));
        sink.i32(static_cast<std::int32_t>(values[i]));
      }
    } else if (dtype == SafetensorsDtype::i64) {
      for (std::size_t i = 0; i < n; ++i) sink.i64(values[i]);
    } else {
      throw value_error(detail::concat("SafetensorsWriter::add_int: tensor '", name, "': dtype ", to_string(dtype),
                                       " is not I32 or I64"));
    }
    entries_.push_back({name, dtype, shape, std::move(sink.bytes())});
  }

  /// Adds a dense tensor view of float, double or bf16 (any strides), converted to `dtype` as add() does.
  template <class T, int Rank>
  void add(std::string const& name, SafetensorsDtype dtype, TensorView<T, Rank> const& view) {
    std::vector<std::int64_t> shape(view.extents().begin(), view.extents().end());
    std::vector<float> const values = detail::row_major_floats(view);
    add(name, dtype, shape, values.data());
  }

  /// Returns the complete file.
  /// \throws value_error when a name or metadata string is not valid UTF-8 (JSON requires it).
  std::vector<unsigned char> serialize() const {
    nlohmann::json header = nlohmann::json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::uint64_t at = 0;
    for (auto const& e : entries_) {
      std::uint64_t const end = at + e.bytes.size();
      header[e.name] = {{"dtype", to_string(e.dtype)}, {"shape", e.shape}, {"data_offsets", {at, end}}};
      at = end;
    }
    std::string text;
    try {
      text = header.dump();
    } catch (nlohmann::json::exception const& ex) {
      throw value_error(detail::concat("SafetensorsWriter: a tensor name or metadata string is not valid UTF-8: ",
                                       ex.what()));
    }
    // Pad with spaces (valid JSON whitespace) so the data section starts 8-byte aligned.
    while ((8 + text.size()) % 8 != 0) text.push_back(' ');
    detail::ByteSink out;
    out.u64(text.size());
    out.raw(text.data(), text.size());
    for (auto const& e : entries_) out.raw(e.bytes.data(), e.bytes.size());
    return std::move(out.bytes());
  }

  /// Writes the file (through a temporary file renamed into place, so a failure leaves no partial file).
  /// \throws format_error when the file cannot be written; value_error as serialize().
  void save(std::string const& path) const {
    std::vector<unsigned char> const bytes = serialize();
    detail::write_file_atomically(path, bytes.data(), bytes.size(), "safetensors");
  }

 private:
  struct Entry {
    std::string name;
    SafetensorsDtype dtype;
    std::vector<std::int64_t> shape;
    std::vector<unsigned char> bytes;
  };

  std::size_t check_entry(std::string const& name, std::vector<std::int64_t> const& shape) const {
    if (name.empty() || name == "__metadata__")
      throw value_error(detail::concat("SafetensorsWriter: invalid tensor name '", name, "'"));
    for (auto const& e : entries_)
      if (e.name == name) throw value_error(detail::concat("SafetensorsWriter: tensor '", name, "' added twice"));
    std::int64_t n = 1;
    for (auto const e : shape) {
      if (e < 0)
        throw value_error(detail::concat("SafetensorsWriter: tensor '", name, "' has a negative extent in ",
                                         detail::shape_text(shape)));
      n = detail::mul_nonneg(n, e);
      if (n < 0 || n > std::numeric_limits<std::int64_t>::max() / 8)
        throw value_error(detail::concat("SafetensorsWriter: tensor '", name, "' of shape ", detail::shape_text(shape),
                                         " is too large"));
    }
    return static_cast<std::size_t>(n);
  }

  std::map<std::string, std::string> metadata_;
  std::vector<Entry> entries_;
};

}  // namespace io
}  // namespace factorllm
