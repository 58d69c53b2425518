// SPDX-License-Identifier: Apache-2.0
// GGUF v3 writer and (untrusted-input) reader.
//
// File layout (ggml docs/gguf.md): "GGUF" magic, uint32 version (3), uint64 tensor count, uint64 key-value
// count, the key-values (gguf string key, uint32 type, value), the tensor infos (gguf string name, uint32
// n_dims, uint64 ne[n_dims] fastest dimension first, uint32 ggml type, uint64 offset into the data section),
// padding to general.alignment (default 32), then the data section, each tensor starting aligned. Little-endian;
// a gguf string is a uint64 byte count followed by the bytes. A row of ne[0] weights of a block-quantized type
// (Q8_0, Q4_0) is ne[0] / 32 consecutive blocks (core/quant.hpp: the f16 scale, little-endian, then the codes).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/quant.hpp"
#include "../core/tensor_view.hpp"
#include "detail/bytes.hpp"
#include "detail/file.hpp"
#include "detail/tensor_values.hpp"

namespace factorllm {
namespace io {

/// Types of GGUF key-value values (gguf_type).
enum class GgufValueType : std::uint32_t {
  u8 = 0, i8 = 1, u16 = 2, i16 = 3, u32 = 4, i32 = 5, f32 = 6, boolean = 7, string = 8, array = 9, u64 = 10,
  i64 = 11, f64 = 12
};

/// Tensor element types this module reads and writes (ggml_type ids). Of ggml's quantized types, Q4_0 and Q8_0
/// (blocks of 32 weights: core/quant.hpp's q4_0 and q8_0).
enum class GgmlType : std::uint32_t {
  f32 = 0, f16 = 1, q4_0 = 2, q8_0 = 8, i8 = 24, i16 = 25, i32 = 26, i64 = 27, f64 = 28, bf16 = 30
};

/// Returns ggml's name of a tensor type ("F32", ...).
inline char const* to_string(GgmlType t) noexcept {
  switch (t) {
    case GgmlType::f32: return "F32";
    case GgmlType::f16: return "F16";
    case GgmlType::q4_0: return "Q4_0";
    case GgmlType::q8_0: return "Q8_0";
    case GgmlType::i8: return "I8";
    case GgmlType::i16: return "I16";
    case GgmlType::i32: return "I32";
    case GgmlType::i64: return "I64";
    case GgmlType::f64: return "F64";
    case GgmlType::bf16: return "BF16";
  }
  return "?";
}

/// Returns the bytes of one stored element of a supported type (ggml_type_size): one value, or for Q4_0 and Q8_0
/// one block of ggml_block_weights(id) weights (18 and 34 bytes); 0 for an id this module does not support.
inline std::size_t ggml_type_bytes(std::uint32_t id) noexcept {
  switch (static_cast<GgmlType>(id)) {
    case GgmlType::q4_0: return sizeof(q4_0);
    case GgmlType::q8_0: return sizeof(q8_0);
    case GgmlType::i8: return 1;
    case GgmlType::f16:
    case GgmlType::bf16:
    case GgmlType::i16: return 2;
    case GgmlType::f32:
    case GgmlType::i32: return 4;
    case GgmlType::i64:
    case GgmlType::f64: return 8;
  }
  return 0;
}

/// Returns the weights one stored element holds (ggml_blck_size): 32 for Q4_0 and Q8_0, 1 for the other types.
inline std::int64_t ggml_block_weights(std::uint32_t id) noexcept {
  auto const t = static_cast<GgmlType>(id);
  return t == GgmlType::q4_0 || t == GgmlType::q8_0 ? kQuantBlock : 1;
}
inline std::int64_t ggml_block_weights(GgmlType t) noexcept { return ggml_block_weights(static_cast<std::uint32_t>(t)); }

/// The GGUF type that stores a weight format as it is: F32, F64, F16, BF16, Q8_0, Q4_0.
template <class W>
constexpr GgmlType ggml_type_of() noexcept {
  using T = std::remove_const_t<W>;
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, f16> ||
                    std::is_same_v<T, bf16> || std::is_same_v<T, q8_0> || std::is_same_v<T, q4_0>,
                "ggml_type_of: not a weight format");
  if constexpr (std::is_same_v<T, float>) return GgmlType::f32;
  else if constexpr (std::is_same_v<T, double>) return GgmlType::f64;
  else if constexpr (std::is_same_v<T, f16>) return GgmlType::f16;
  else if constexpr (std::is_same_v<T, bf16>) return GgmlType::bf16;
  else if constexpr (std::is_same_v<T, q8_0>) return GgmlType::q8_0;
  else return GgmlType::q4_0;
}

namespace detail {
/// Decodes one block from its file bytes (the little-endian f16 scale, then the codes), on any host.
template <class Block>
Block load_block(unsigned char const* p) noexcept {
  Block b;
  b.d = f16::from_bits(load_le_u16(p));
  std::memcpy(b.qs, p + 2, sizeof b.qs);
  return b;
}
/// Appends one block in file order.
template <class Block>
void store_block(ByteSink& s, Block const& b) {
  s.u16(b.d.bits);
  s.raw(b.qs, sizeof b.qs);
}
}  // namespace detail

/// One GGUF key-value value. Scalars fill one field; arrays keep their elements compactly (numeric arrays as the
/// file's little-endian bytes, string arrays as strings), so a hostile array costs at most a few times its size.
struct GgufValue {
  GgufValueType type = GgufValueType::u8;
  std::uint64_t u = 0;  ///< u8, u16, u32, u64, and bool (0 or 1)
  std::int64_t i = 0;   ///< i8, i16, i32, i64
  double f = 0;         ///< f32, f64
  std::string s;        ///< string
  GgufValueType array_type = GgufValueType::u8;  ///< arrays: element type (never array)
  std::uint64_t array_size = 0;                  ///< arrays: element count
  std::vector<unsigned char> array_raw;          ///< numeric arrays: array_size little-endian elements
  std::vector<std::string> array_strings;        ///< string arrays

  /// Returns true for integer scalar types (signed or unsigned).
  bool is_integer() const noexcept { return is_integer_type(type); }
  /// Returns the numeric array elements as int64 (integer and bool arrays). \throws format_error otherwise.
  std::vector<std::int64_t> ints() const {
    if (type != GgufValueType::array || !is_integer_type(array_type))
      throw format_error("GGUF value is not an integer array");
    std::size_t const w = scalar_bytes(array_type);
    std::vector<std::int64_t> out(static_cast<std::size_t>(array_size));
    for (std::size_t k = 0; k < out.size(); ++k) out[k] = load_int(array_type, array_raw.data() + k * w);
    return out;
  }
  /// Returns f32/f64 array elements as double. \throws format_error otherwise.
  std::vector<double> floats() const {
    if (type != GgufValueType::array || (array_type != GgufValueType::f32 && array_type != GgufValueType::f64))
      throw format_error("GGUF value is not a float array");
    std::vector<double> out(static_cast<std::size_t>(array_size));
    for (std::size_t k = 0; k < out.size(); ++k)
      out[k] = array_type == GgufValueType::f32 ? detail::load_le_f32(array_raw.data() + 4 * k)
                                                : detail::load_le_f64(array_raw.data() + 8 * k);
    return out;
  }

  /// Returns the size of a scalar type in bytes (0 for string and array).
  static std::size_t scalar_bytes(GgufValueType t) noexcept {
    switch (t) {
      case GgufValueType::u8:
      case GgufValueType::i8:
      case GgufValueType::boolean: return 1;
      case GgufValueType::u16:
      case GgufValueType::i16: return 2;
      case GgufValueType::u32:
      case GgufValueType::i32:
      case GgufValueType::f32: return 4;
      case GgufValueType::u64:
      case GgufValueType::i64:
      case GgufValueType::f64: return 8;
      default: return 0;
    }
  }
  static bool is_integer_type(GgufValueType t) noexcept {
    return t == GgufValueType::u8 || t == GgufValueType::i8 || t == GgufValueType::u16 || t == GgufValueType::i16 ||
           t == GgufValueType::u32 || t == GgufValueType::i32 || t == GgufValueType::u64 || t == GgufValueType::i64 ||
           t == GgufValueType::boolean;
  }
  /// Reads one integer element (u64 above the int64 range saturates: only used for arrays read back by tests).
  static std::int64_t load_int(GgufValueType t, unsigned char const* p) noexcept {
    switch (t) {
      case GgufValueType::u8:
      case GgufValueType::boolean: return p[0];
      case GgufValueType::i8: return static_cast<std::int8_t>(p[0]);
      case GgufValueType::u16: return detail::load_le_u16(p);
      case GgufValueType::i16: return static_cast<std::int16_t>(detail::load_le_u16(p));
      case GgufValueType::u32: return detail::load_le_u32(p);
      case GgufValueType::i32: return detail::load_le_i32(p);
      case GgufValueType::u64: {
        std::uint64_t const u = detail::load_le_u64(p);
        return u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())
                   ? std::numeric_limits<std::int64_t>::max()
                   : static_cast<std::int64_t>(u);
      }
      case GgufValueType::i64: {
        std::uint64_t const u = detail::load_le_u64(p);
        std::int64_t v;
        std::memcpy(&v, &u, sizeof v);
        return v;
      }
      default: return 0;
    }
  }
};

/// One tensor of a GGUF file, validated.
struct GgufTensorInfo {
  std::string name;
  std::vector<std::int64_t> ne;  ///< ggml order: ne[0] is the fastest-varying (row length)
  GgmlType type = GgmlType::f32;
  std::uint64_t offset = 0;  ///< into the data section, a multiple of the alignment
  std::uint64_t bytes = 0;

  /// Returns the row-major shape (ne reversed): a [rows, cols] matrix has ne = {cols, rows}.
  std::vector<std::int64_t> shape() const { return std::vector<std::int64_t>(ne.rbegin(), ne.rend()); }
  std::int64_t numel() const noexcept {
    std::int64_t n = 1;
    for (auto e : ne) n *= e;  // checked when read
    return n;
  }
};

namespace detail {
/// Longest tensor name ggml accepts (GGML_MAX_NAME = 64 including the terminating NUL).
constexpr std::size_t kGgufMaxTensorName = 63;
constexpr std::uint32_t kGgufDefaultAlignment = 32;
constexpr std::uint32_t kGgufVersion = 3;

inline std::uint64_t align_up(std::uint64_t v, std::uint64_t a) noexcept { return (v + a - 1) / a * a; }
}  // namespace detail

/// A GGUF file held in memory: validated key-values, tensor infos and the data section.
/// Immutable after construction; safe to share across threads.
class GgufFile {
 public:
  /// Loads and validates a file (see parse()). \throws format_error naming the path and what was wrong.
  static GgufFile load(std::string const& path) {
    std::vector<unsigned char> bytes = detail::read_whole_file(path, "gguf");
    return GgufFile(std::move(bytes), "gguf '" + path + "'");
  }

  /// Parses a file held in memory (copied).
  /// \throws format_error when: the magic is not "GGUF"; the version is not 2 or 3; a count, length, key, type,
  ///         value, dimension or offset is truncated, unknown or inconsistent; a key or tensor name repeats;
  ///         general.alignment is not a power-of-two u32; a tensor has 0 or more than 4 dimensions, an element
  ///         count or byte size that overflows, a type other than F32/F16/BF16/F64/Q8_0/Q4_0/I8/I16/I32/I64, a
  ///         block type (Q8_0, Q4_0) with ne[0] not a multiple of 32, an offset that is not aligned, data past the
  ///         end of the file, or data overlapping another tensor's.
  static GgufFile parse(void const* data, std::size_t bytes) {
    if (data == nullptr && bytes != 0) throw format_error("gguf: null data pointer with a non-zero size");
    auto const* p = static_cast<unsigned char const*>(data);
    return GgufFile(std::vector<unsigned char>(p, p + bytes), "gguf <memory buffer>");
  }

  std::uint32_t version() const noexcept { return version_; }
  std::uint32_t alignment() const noexcept { return alignment_; }
  /// Returns the key-values in file order.
  std::vector<std::pair<std::string, GgufValue>> const& kvs() const noexcept { return kvs_; }
  /// Returns the value of `key`, or nullptr.
  GgufValue const* find(std::string const& key) const noexcept {
    auto const it = kv_index_.find(key);
    return it == kv_index_.end() ? nullptr : &kvs_[it->second].second;
  }
  /// Returns the value of `key`. \throws format_error when absent.
  GgufValue const& kv(std::string const& key) const {
    auto const* v = find(key);
    if (v == nullptr) throw format_error(detail::concat(source_, ": no key '", key, "'"));
    return *v;
  }
  /// Returns an integer-valued key as int64. \throws format_error when absent or not an integer.
  std::int64_t get_int(std::string const& key) const {
    auto const& v = kv(key);
    if (!v.is_integer()) throw format_error(detail::concat(source_, ": key '", key, "' is not an integer"));
    bool const is_signed = v.type == GgufValueType::i8 || v.type == GgufValueType::i16 ||
                           v.type == GgufValueType::i32 || v.type == GgufValueType::i64;
    return is_signed ? v.i : static_cast<std::int64_t>(std::min<std::uint64_t>(v.u, std::numeric_limits<std::int64_t>::max()));
  }
  /// Returns a string key. \throws format_error when absent or not a string.
  std::string const& get_string(std::string const& key) const {
    auto const& v = kv(key);
    if (v.type != GgufValueType::string) throw format_error(detail::concat(source_, ": key '", key, "' is not a string"));
    return v.s;
  }
  /// Returns an f32/f64 key. \throws format_error when absent or not a float.
  double get_float(std::string const& key) const {
    auto const& v = kv(key);
    if (v.type != GgufValueType::f32 && v.type != GgufValueType::f64)
      throw format_error(detail::concat(source_, ": key '", key, "' is not a float"));
    return v.f;
  }

  /// Returns the tensor infos in file order.
  std::vector<GgufTensorInfo> const& tensors() const noexcept { return tensors_; }
  GgufTensorInfo const* find_tensor(std::string const& name) const noexcept {
    auto const it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
  }
  /// Returns the tensor called `name`. \throws format_error when absent.
  GgufTensorInfo const& tensor(std::string const& name) const {
    auto const* t = find_tensor(name);
    if (t == nullptr) throw format_error(detail::concat(source_, ": no tensor '", name, "'"));
    return *t;
  }
  /// Returns the elements of an F32, F16, BF16, F64, Q8_0 or Q4_0 tensor as float, in ggml (= row-major of
  /// shape()) order; the block types dequantize exactly (weight = f16 scale * integer; a hostile file's infinite or
  /// NaN scale gives infinities or NaN).
  /// \throws format_error when absent or of an integer type.
  std::vector<float> to_float(std::string const& name) const {
    auto const& t = tensor(name);
    // The type first: an integer tensor is refused even when it has no elements (found by fuzz_gguf).
    if (t.type != GgmlType::f32 && t.type != GgmlType::f16 && t.type != GgmlType::bf16 && t.type != GgmlType::f64 &&
        t.type != GgmlType::q8_0 && t.type != GgmlType::q4_0)
      throw format_error(detail::concat(source_, ": tensor '", name, "' has type ", to_string(t.type),
                                        ", expected a floating type"));
    unsigned char const* p = bytes_.data() + data_start_ + t.offset;
    std::vector<float> out(static_cast<std::size_t>(t.numel()));
    if (t.type == GgmlType::q8_0 || t.type == GgmlType::q4_0) {
      std::size_t const block_bytes = ggml_type_bytes(static_cast<std::uint32_t>(t.type));
      for (std::size_t b = 0; b < out.size() / kQuantBlock; ++b) {
        unsigned char const* q = p + b * block_bytes;  // inside the tensor's validated bytes
        float* o = out.data() + b * kQuantBlock;
        if (t.type == GgmlType::q8_0) {
          q8_0 const block = detail::load_block<q8_0>(q);
          dequantize_row(&block, kQuantBlock, o);
        } else {
          q4_0 const block = detail::load_block<q4_0>(q);
          dequantize_row(&block, kQuantBlock, o);
        }
      }
      return out;
    }
    for (std::size_t k = 0; k < out.size(); ++k) {
      switch (t.type) {
        case GgmlType::f32: out[k] = detail::load_le_f32(p + 4 * k); break;
        case GgmlType::f16: out[k] = detail::half_to_float(detail::load_le_u16(p + 2 * k)); break;
        case GgmlType::bf16: out[k] = bf16::from_bits(detail::load_le_u16(p + 2 * k)).to_float(); break;
        case GgmlType::f64: out[k] = static_cast<float>(detail::load_le_f64(p + 8 * k)); break;
        default: break;  // refused above
      }
    }
    return out;
  }

  /// Returns the blocks of a Q8_0 (Block = q8_0) or Q4_0 (Block = q4_0) tensor as stored, ne[0] / 32 per row, rows
  /// in ggml order: the raw weights, bit for bit (a Tensor<Block, R> of the shape() with the last extent / 32).
  /// \throws format_error when absent or of another type.
  template <class Block, class = std::enable_if_t<std::is_same_v<Block, q8_0> || std::is_same_v<Block, q4_0>>>
  std::vector<Block> to_blocks(std::string const& name) const {
    auto const& t = tensor(name);
    if (t.type != ggml_type_of<Block>())
      throw format_error(detail::concat(source_, ": tensor '", name, "' has type ", to_string(t.type), ", expected ",
                                        to_string(ggml_type_of<Block>())));
    unsigned char const* p = bytes_.data() + data_start_ + t.offset;
    std::vector<Block> out(static_cast<std::size_t>(t.numel() / kQuantBlock));
    for (std::size_t b = 0; b < out.size(); ++b) out[b] = detail::load_block<Block>(p + b * sizeof(Block));
    return out;
  }
  std::string const& source() const noexcept { return source_; }

 private:
  GgufFile(std::vector<unsigned char> bytes, std::string source) : bytes_(std::move(bytes)), source_(std::move(source)) {
    parse_all();
  }

  [[noreturn]] void fail(std::string const& what) const { throw format_error(source_ + ": " + what); }

  std::string read_string(detail::ByteCursor& c, char const* what) {
    std::uint64_t const n = c.u64(what);
    unsigned char const* s = c.take(n, what);  // checks n against the remaining bytes before anything is copied
    return std::string(reinterpret_cast<char const*>(s), static_cast<std::size_t>(n));
  }

  GgufValueType read_type(detail::ByteCursor& c, std::string const& key) {
    std::uint32_t const t = c.u32("value type");
    if (t > static_cast<std::uint32_t>(GgufValueType::f64)) fail(detail::concat("key '", key, "' has unknown value type ", t));
    return static_cast<GgufValueType>(t);
  }

  void read_scalar(detail::ByteCursor& c, GgufValueType t, GgufValue& v, std::string const& key) {
    switch (t) {
      case GgufValueType::u8: v.u = c.u8("u8 value"); break;
      case GgufValueType::i8: v.i = static_cast<std::int8_t>(c.u8("i8 value")); break;
      case GgufValueType::u16: v.u = c.u16("u16 value"); break;
      case GgufValueType::i16: v.i = static_cast<std::int16_t>(c.u16("i16 value")); break;
      case GgufValueType::u32: v.u = c.u32("u32 value"); break;
      case GgufValueType::i32: v.i = static_cast<std::int32_t>(c.u32("i32 value")); break;
      case GgufValueType::u64: v.u = c.u64("u64 value"); break;
      case GgufValueType::i64: v.i = GgufValue::load_int(GgufValueType::i64, c.take(8, "i64 value")); break;
      case GgufValueType::f32: v.f = c.f32("f32 value"); break;
      case GgufValueType::f64: v.f = c.f64("f64 value"); break;
      case GgufValueType::boolean: {
        v.u = c.u8("bool value");
        if (v.u > 1) fail(detail::concat("key '", key, "' has the bool value ", v.u, ", expected 0 or 1"));
        break;
      }
      case GgufValueType::string: v.s = read_string(c, "string value"); break;
      case GgufValueType::array: break;  // handled by the caller
    }
  }

  void parse_all() {
    detail::ByteCursor c(bytes_.data(), bytes_.size(), source_);
    unsigned char const* magic = c.take(4, "magic");
    if (std::memcmp(magic, "GGUF", 4) != 0) fail("bad magic: not a GGUF file");
    version_ = c.u32("version");
    if (version_ != 2 && version_ != 3)
      fail(detail::concat("version ", version_, " is not supported (2 or 3; version 1 used 32-bit counts)"));
    std::uint64_t const n_tensors = c.u64("tensor count");
    std::uint64_t const n_kv = c.u64("key-value count");
    // Smallest encodings: a kv is an 8-byte key length + 4-byte type + 1 byte; a tensor info is 8 + 4 + 8 + 4 + 8.
    // Checking the counts against the bytes left bounds every reservation below by the input size.
    if (n_kv > c.remaining() / 13) fail(detail::concat("key-value count ", n_kv, " cannot fit in ", c.remaining(), " bytes"));
    if (n_tensors > c.remaining() / 32)
      fail(detail::concat("tensor count ", n_tensors, " cannot fit in ", c.remaining(), " bytes"));
    kvs_.reserve(static_cast<std::size_t>(n_kv));
    for (std::uint64_t k = 0; k < n_kv; ++k) {
      std::string key = read_string(c, "key");
      if (key.empty()) fail(detail::concat("key-value ", k, " has an empty key"));
      if (kv_index_.count(key) != 0) fail("key '" + key + "' appears twice");
      GgufValue v;
      v.type = read_type(c, key);
      if (v.type == GgufValueType::array) {
        v.array_type = read_type(c, key);
        if (v.array_type == GgufValueType::array) fail("key '" + key + "' is an array of arrays (not supported)");
        v.array_size = c.u64("array length");
        if (v.array_type == GgufValueType::string) {
          if (v.array_size > c.remaining() / 8)
            fail(detail::concat("key '", key, "' declares ", v.array_size, " strings, more than the bytes left"));
          v.array_strings.reserve(static_cast<std::size_t>(v.array_size));
          for (std::uint64_t e = 0; e < v.array_size; ++e) v.array_strings.push_back(read_string(c, "array string"));
        } else {
          std::size_t const w = GgufValue::scalar_bytes(v.array_type);
          if (v.array_size > c.remaining() / w)
            fail(detail::concat("key '", key, "' declares ", v.array_size, " elements, more than the bytes left"));
          unsigned char const* a = c.take(v.array_size * w, "array data");
          v.array_raw.assign(a, a + v.array_size * w);
          if (v.array_type == GgufValueType::boolean)
            for (unsigned char const b : v.array_raw)
              if (b > 1) fail("key '" + key + "' has a bool array element that is not 0 or 1");
        }
      } else {
        read_scalar(c, v.type, v, key);
      }
      kv_index_[key] = kvs_.size();
      kvs_.emplace_back(std::move(key), std::move(v));
    }
    if (auto const* a = find("general.alignment")) {
      if (a->type != GgufValueType::u32) fail("general.alignment is not a u32");
      if (a->u == 0 || (a->u & (a->u - 1)) != 0) fail(detail::concat("general.alignment ", a->u, " is not a power of two"));
      alignment_ = static_cast<std::uint32_t>(a->u);
    }
    tensors_.reserve(static_cast<std::size_t>(n_tensors));
    for (std::uint64_t k = 0; k < n_tensors; ++k) {
      GgufTensorInfo t;
      t.name = read_string(c, "tensor name");
      std::string const where = "tensor '" + t.name + "'";
      if (t.name.empty() || t.name.size() > detail::kGgufMaxTensorName)
        fail(detail::concat("tensor ", k, " has a name of ", t.name.size(), " bytes, expected 1..",
                            detail::kGgufMaxTensorName));
      if (tensor_index_.count(t.name) != 0) fail(where + " appears twice");
      std::uint32_t const n_dims = c.u32("n_dims");
      if (n_dims < 1 || n_dims > 4) fail(detail::concat(where, " has ", n_dims, " dimensions, expected 1..4"));
      std::int64_t numel = 1;
      for (std::uint32_t i = 0; i < n_dims; ++i) {
        std::uint64_t const e = c.u64("dimension");
        if (e > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
          fail(detail::concat(where, " ne[", i, "] = ", e, " exceeds the int64 range"));
        t.ne.push_back(static_cast<std::int64_t>(e));
        numel = numel < 0 ? -1 : detail::mul_nonneg(numel, static_cast<std::int64_t>(e));
      }
      if (numel < 0) fail(where + "'s element count overflows 64 bits");
      std::uint32_t const type = c.u32("tensor type");
      std::size_t const tb = ggml_type_bytes(type);
      if (tb == 0) fail(detail::concat(where, " has ggml type ", type, ", which this reader does not support"));
      t.type = static_cast<GgmlType>(type);
      // A block type stores each row of ne[0] weights as ne[0] / 32 blocks: ne[0] must be a multiple of 32, and the
      // bytes are numel / 32 blocks (ggml_row_size).
      std::int64_t const bw = ggml_block_weights(type);
      if (t.ne[0] % bw != 0)
        fail(detail::concat(where, " has type ", to_string(t.type), " with ne[0] = ", t.ne[0],
                            ", not a multiple of its ", bw, "-weight block"));
      std::int64_t const bytes = detail::mul_nonneg(numel / bw, static_cast<std::int64_t>(tb));
      if (bytes < 0) fail(where + "'s byte size overflows 64 bits");
      t.bytes = static_cast<std::uint64_t>(bytes);
      t.offset = c.u64("tensor offset");
      if (t.offset % alignment_ != 0)
        fail(detail::concat(where, " has offset ", t.offset, ", not a multiple of the alignment ", alignment_));
      tensor_index_[t.name] = tensors_.size();
      tensors_.push_back(std::move(t));
    }
    std::uint64_t const start = detail::align_up(c.offset(), alignment_);
    if (start > bytes_.size() && n_tensors > 0)
      fail(detail::concat("the data section would start at ", start, ", past the end of the ", bytes_.size(),
                          "-byte file"));
    data_start_ = static_cast<std::size_t>(std::min<std::uint64_t>(start, bytes_.size()));
    std::uint64_t const data_bytes = bytes_.size() - data_start_;
    std::vector<GgufTensorInfo const*> by_offset;
    for (auto const& t : tensors_) {
      if (t.offset > data_bytes || t.bytes > data_bytes - t.offset)
        fail(detail::concat("tensor '", t.name, "' at data offset ", t.offset, " with ", t.bytes,
                            " bytes runs past the data section of ", data_bytes, " bytes"));
      by_offset.push_back(&t);
    }
    std::sort(by_offset.begin(), by_offset.end(), [](auto a, auto b) { return a->offset < b->offset; });
    for (std::size_t k = 1; k < by_offset.size(); ++k)
      if (by_offset[k]->offset < by_offset[k - 1]->offset + by_offset[k - 1]->bytes)
        fail(detail::concat("tensor '", by_offset[k]->name, "' at offset ", by_offset[k]->offset, " overlaps '",
                            by_offset[k - 1]->name, "' which ends at ", by_offset[k - 1]->offset + by_offset[k - 1]->bytes));
  }

  std::vector<unsigned char> bytes_;
  std::string source_;
  std::uint32_t version_ = 0;
  std::uint32_t alignment_ = detail::kGgufDefaultAlignment;
  std::vector<std::pair<std::string, GgufValue>> kvs_;
  std::map<std::string, std::size_t> kv_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, std::size_t> tensor_index_;
  std::size_t data_start_ = 0;
};

/// Builds a GGUF v3 file. Key-values keep the order they are set in; tensors are laid out in the order they are
/// added, each starting at a multiple of the alignment. general.alignment is always written.
class GgufWriter {
 public:
  /// \throws value_error unless alignment is a power of two in [8, 2^16] (ggml requires a multiple of 8).
  explicit GgufWriter(std::uint32_t alignment = detail::kGgufDefaultAlignment) : alignment_(alignment) {
    if (alignment < 8 || alignment > 65536 || (alignment & (alignment - 1)) != 0)
      throw value_error(detail::concat("GgufWriter: alignment ", alignment, " is not a power of two in [8, 65536]"));
    GgufValue v;
    v.type = GgufValueType::u32;
    v.u = alignment;
    put("general.alignment", std::move(v));
  }

  void set_u32(std::string const& key, std::uint32_t value) { put(key, scalar_u(GgufValueType::u32, value)); }
  void set_u64(std::string const& key, std::uint64_t value) { put(key, scalar_u(GgufValueType::u64, value)); }
  void set_i32(std::string const& key, std::int32_t value) {
    GgufValue v;
    v.type = GgufValueType::i32;
    v.i = value;
    put(key, std::move(v));
  }
  void set_f32(std::string const& key, float value) {
    GgufValue v;
    v.type = GgufValueType::f32;
    v.f = value;
    put(key, std::move(v));
  }
  void set_bool(std::string const& key, bool value) { put(key, scalar_u(GgufValueType::boolean, value ? 1 : 0)); }
  void set_string(std::string const& key, std::string const& value) {
    GgufValue v;
    v.type = GgufValueType::string;
    v.s = value;
    put(key, std::move(v));
  }
  void set_string_array(std::string const& key, std::vector<std::string> const& values) {
    GgufValue v;
    v.type = GgufValueType::array;
    v.array_type = GgufValueType::string;
    v.array_size = values.size();
    v.array_strings = values;
    put(key, std::move(v));
  }
  void set_f32_array(std::string const& key, std::vector<float> const& values) {
    detail::ByteSink s;
    for (float const x : values) s.f32(x);
    put(key, array_of(GgufValueType::f32, values.size(), std::move(s.bytes())));
  }
  void set_i32_array(std::string const& key, std::vector<std::int32_t> const& values) {
    detail::ByteSink s;
    for (std::int32_t const x : values) s.i32(x);
    put(key, array_of(GgufValueType::i32, values.size(), std::move(s.bytes())));
  }

  /// Adds a tensor from floats.
  /// \param shape  ROW-MAJOR extents (outermost first), 1 to 4 of them, each >= 1; the file stores them reversed
  ///               (ggml's ne[0] is the row length), so a [rows, cols] matrix becomes ne = {cols, rows}
  /// \param type   F32, F16 or BF16 (round to nearest even), or Q8_0 / Q4_0: each row of shape.back() weights (a
  ///               multiple of 32) quantized into its blocks with ggml's reference rounding (core/quant.hpp)
  /// \throws value_error for a bad name (empty, longer than 63 bytes, repeated), shape or type, or, for Q8_0 and
  ///         Q4_0, rows that are not a multiple of 32, a non-finite value or a block scale beyond f16 (naming the
  ///         tensor and the value's row-major index).
  void add_tensor(std::string const& name, GgmlType type, std::vector<std::int64_t> const& shape, float const* values) {
    std::size_t const count = check_new_tensor(name, type, shape);
    detail::ByteSink s;
    switch (type) {
      case GgmlType::f32: for (std::size_t k = 0; k < count; ++k) s.f32(values[k]); break;
      case GgmlType::f16: for (std::size_t k = 0; k < count; ++k) s.u16(detail::float_to_half(values[k])); break;
      case GgmlType::bf16: for (std::size_t k = 0; k < count; ++k) s.u16(bf16(values[k]).bits); break;
      case GgmlType::q8_0: quantize_rows<q8_0>(name, shape.back(), count, values, s); break;
      case GgmlType::q4_0: quantize_rows<q4_0>(name, shape.back(), count, values, s); break;
      default:
        throw value_error(detail::concat("GgufWriter::add_tensor: tensor '", name, "': type ", to_string(type),
                                         " cannot be written from floats (use F32, F16, BF16, Q8_0 or Q4_0)"));
    }
    tensors_.push_back({name, std::vector<std::int64_t>(shape.rbegin(), shape.rend()), type, std::move(s.bytes())});
  }

  /// Adds a tensor from a view of any weight format (any strides); its extents are the row-major shape, with the
  /// last one counting weights (for a view of q8_0 or q4_0 blocks: 32 x its last extent). A view of blocks written
  /// as its own type (q8_0 as Q8_0, q4_0 as Q4_0) is copied bit for bit; otherwise the weights go through float
  /// (exact for bf16, f16 and blocks) and are encoded as the overload above does.
  /// \throws value_error as the overload above.
  template <class T, int Rank>
  void add_tensor(std::string const& name, GgmlType type, TensorView<T, Rank> const& view) {
    using W = std::remove_const_t<T>;
    std::vector<std::int64_t> shape(view.extents().begin(), view.extents().end());
    if constexpr (is_block_format_v<W>) {
      shape.back() *= kQuantBlock;
      if (type == ggml_type_of<W>()) {
        check_new_tensor(name, type, shape);
        detail::ByteSink s;
        for_each_row(view, 0, 0, [&](W const* row) {
          for (std::ptrdiff_t b = 0; b < view.extent(Rank - 1); ++b) detail::store_block(s, row[b]);
        });
        tensors_.push_back({name, std::vector<std::int64_t>(shape.rbegin(), shape.rend()), type, std::move(s.bytes())});
        return;
      }
      std::vector<float> values;
      values.reserve(static_cast<std::size_t>(view.size()) * kQuantBlock);
      std::ptrdiff_t const row_weights = view.extent(Rank - 1) * kQuantBlock;
      for_each_row(view, 0, 0, [&](W const* row) {
        std::size_t const at = values.size();
        values.resize(at + static_cast<std::size_t>(row_weights));
        dequantize_row(row, row_weights, values.data() + at);
      });
      add_tensor(name, type, shape, values.data());
    } else {
      std::vector<float> const values = detail::row_major_floats(view);
      add_tensor(name, type, shape, values.data());
    }
  }

  /// Returns the complete file.
  std::vector<unsigned char> serialize() const {
    detail::ByteSink out;
    out.raw("GGUF", 4);
    out.u32(detail::kGgufVersion);
    out.u64(tensors_.size());
    out.u64(kvs_.size());
    for (auto const& [key, v] : kvs_) {
      write_string(out, key);
      out.u32(static_cast<std::uint32_t>(v.type));
      if (v.type == GgufValueType::array) {
        out.u32(static_cast<std::uint32_t>(v.array_type));
        out.u64(v.array_size);
        if (v.array_type == GgufValueType::string) {
          for (auto const& s : v.array_strings) write_string(out, s);
        } else {
          out.raw(v.array_raw.data(), v.array_raw.size());
        }
      } else {
        write_scalar(out, v);
      }
    }
    std::uint64_t offset = 0;
    for (auto const& t : tensors_) {
      write_string(out, t.name);
      out.u32(static_cast<std::uint32_t>(t.ne.size()));
      for (auto const e : t.ne) out.u64(static_cast<std::uint64_t>(e));
      out.u32(static_cast<std::uint32_t>(t.type));
      out.u64(offset);
      offset = detail::align_up(offset + t.bytes.size(), alignment_);
    }
    out.pad_to(alignment_);
    for (auto const& t : tensors_) {
      out.raw(t.bytes.data(), t.bytes.size());
      out.pad_to(alignment_);
    }
    return std::move(out.bytes());
  }

  /// Writes the file (through a temporary file renamed into place). \throws format_error when it cannot.
  void save(std::string const& path) const {
    std::vector<unsigned char> const bytes = serialize();
    detail::write_file_atomically(path, bytes.data(), bytes.size(), "gguf");
  }

 private:
  struct Entry {
    std::string name;
    std::vector<std::int64_t> ne;
    GgmlType type;
    std::vector<unsigned char> bytes;
  };

  /// Validates a new tensor's name, shape and element count (for its type) and returns the count of weights.
  std::size_t check_new_tensor(std::string const& name, GgmlType type, std::vector<std::int64_t> const& shape) const {
    if (name.empty() || name.size() > detail::kGgufMaxTensorName)
      throw value_error(detail::concat("GgufWriter::add_tensor: name '", name, "' must have 1..",
                                       detail::kGgufMaxTensorName, " bytes"));
    for (auto const& t : tensors_)
      if (t.name == name) throw value_error("GgufWriter::add_tensor: tensor '" + name + "' added twice");
    if (shape.empty() || shape.size() > 4)
      throw value_error(detail::concat("GgufWriter::add_tensor: tensor '", name, "' has rank ", shape.size(),
                                       ", expected 1..4"));
    std::int64_t n = 1;
    for (auto const e : shape) {
      if (e < 1) throw value_error(detail::concat("GgufWriter::add_tensor: tensor '", name, "' has an extent ", e, " < 1"));
      n = detail::mul_nonneg(n, e);
      if (n < 0 || n > std::numeric_limits<std::int64_t>::max() / 8)
        throw value_error("GgufWriter::add_tensor: tensor '" + name + "' is too large");
    }
    std::int64_t const bw = ggml_block_weights(type);
    if (shape.back() % bw != 0)
      throw value_error(detail::concat("GgufWriter::add_tensor: tensor '", name, "' of type ", to_string(type),
                                       " has rows of ", shape.back(), " weights, expected a multiple of ", bw,
                                       " (ggml stores each row as whole blocks)"));
    return static_cast<std::size_t>(n);
  }

  /// Quantizes `count` floats, rows of row_weights, into Block blocks (checked first: nothing is added on error).
  template <class Block>
  static void quantize_rows(std::string const& name, std::int64_t row_weights, std::size_t count, float const* values,
                            detail::ByteSink& s) {
    std::string const fn = "GgufWriter::add_tensor: tensor '" + name + "'";
    std::size_t const rw = static_cast<std::size_t>(row_weights);
    for (std::size_t r = 0; r < count / rw; ++r)
      ::factorllm::detail::check_quantizable<Block>(values + r * rw, row_weights, fn.c_str(), "values",
                                                    static_cast<std::ptrdiff_t>(r * rw));
    std::vector<Block> blocks(rw / kQuantBlock);
    for (std::size_t r = 0; r < count / rw; ++r) {
      quantize_row(values + r * rw, row_weights, blocks.data());
      for (auto const& b : blocks) detail::store_block(s, b);
    }
  }

  /// Calls f(row pointer) for every row of the last dimension of a view, in row-major order.
  template <class T, int Rank, class F>
  static void for_each_row(TensorView<T, Rank> const& v, int dim, std::ptrdiff_t off, F&& f) {
    if (dim == Rank - 1) {
      f(v.data() + off);
      return;
    }
    for (std::ptrdiff_t i = 0; i < v.extent(dim); ++i) for_each_row(v, dim + 1, off + i * v.stride(dim), f);
  }

  void put(std::string const& key, GgufValue v) {
    if (key.empty()) throw value_error("GgufWriter: empty key");
    for (auto const& kv : kvs_)
      if (kv.first == key) throw value_error("GgufWriter: key '" + key + "' set twice");
    kvs_.emplace_back(key, std::move(v));
  }
  static GgufValue scalar_u(GgufValueType t, std::uint64_t u) {
    GgufValue v;
    v.type = t;
    v.u = u;
    return v;
  }
  static GgufValue array_of(GgufValueType t, std::size_t n, std::vector<unsigned char> raw) {
    GgufValue v;
    v.type = GgufValueType::array;
    v.array_type = t;
    v.array_size = n;
    v.array_raw = std::move(raw);
    return v;
  }
  static void write_string(detail::ByteSink& out, std::string const& s) {
    out.u64(s.size());
    out.raw(s.data(), s.size());
  }
  static void write_scalar(detail::ByteSink& out, GgufValue const& v) {
    switch (v.type) {
      case GgufValueType::u8:
      case GgufValueType::boolean: out.u8(static_cast<std::uint8_t>(v.u)); break;
      case GgufValueType::i8: out.u8(static_cast<std::uint8_t>(static_cast<std::int8_t>(v.i))); break;
      case GgufValueType::u16: out.u16(static_cast<std::uint16_t>(v.u)); break;
      case GgufValueType::i16: out.u16(static_cast<std::uint16_t>(static_cast<std::int16_t>(v.i))); break;
      case GgufValueType::u32: out.u32(static_cast<std::uint32_t>(v.u)); break;
      case GgufValueType::i32: out.i32(static_cast<std::int32_t>(v.i)); break;
      case GgufValueType::u64: out.u64(v.u); break;
      case GgufValueType::i64: out.i64(v.i); break;
      case GgufValueType::f32: out.f32(static_cast<float>(v.f)); break;
      case GgufValueType::f64: out.f64(v.f); break;
      case GgufValueType::string: write_string(out, v.s); break;
      case GgufValueType::array: break;
    }
  }
  std::uint32_t alignment_;
  std::vector<std::pair<std::string, GgufValue>> kvs_;
  std::vector<Entry> tensors_;
};

}  // namespace io
}  // namespace factorllm
