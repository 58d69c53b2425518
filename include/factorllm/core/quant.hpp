// SPDX-License-Identifier: Apache-2.0
// Block-quantized weight formats q8_0 and q4_0 in ggml's exact block layouts, their traits, and the reference
// quantization and dequantization of rows (docs/formats.md: layouts, rounding, error bounds).
//
// A row of n weights (n a multiple of 32) is stored as n / 32 consecutive blocks, ggml's row layout; a view over
// such rows has n / 32 elements per row (ExpertWeightsView::d_model() multiplies by block_weights). A block holds
// an f16 scale d and 32 small integers q_i; weight i is d * q_i, which is exact in float (an f16 significand has
// 11 bits, q_i at most 8), so dequantization never rounds. Quantization follows ggml's reference functions
// (quantize_row_q8_0_ref, quantize_row_q4_0_ref) step for step, so the same floats give the same block bytes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "dtype.hpp"
#include "error.hpp"

namespace factorllm {

/// Weights per block of q8_0 and q4_0 (ggml's QK8_0 = QK4_0 = 32).
inline constexpr std::ptrdiff_t kQuantBlock = 32;

/// ggml's Q8_0 block (block_q8_0, ggml type 8): an f16 scale, then 32 signed bytes; weight i = d * qs[i].
/// 34 bytes, no padding, 2-byte aligned: an array of blocks is byte for byte a row of a GGUF Q8_0 tensor on a
/// little-endian host.
struct q8_0 {
  f16 d;                    ///< the block's scale (amax / 127, rounded to f16)
  std::int8_t qs[32] = {};  ///< the quantized weights, in order
};
static_assert(sizeof(q8_0) == 34 && alignof(q8_0) == 2 && std::is_trivially_copyable_v<q8_0> &&
                  std::is_standard_layout_v<q8_0>,
              "q8_0 must be ggml's 34-byte block_q8_0");

/// ggml's Q4_0 block (block_q4_0, ggml type 2): an f16 scale, then 16 bytes of 4-bit codes. Byte j (0..15) holds
/// weight j in its LOW nibble and weight j + 16 in its HIGH nibble; weight = d * (nibble - 8). 18 bytes, no
/// padding, 2-byte aligned.
struct q4_0 {
  f16 d;                     ///< the block's scale (the value of largest magnitude / -8, rounded to f16)
  std::uint8_t qs[16] = {};  ///< qs[j] = code(j) | code(j + 16) << 4
};
static_assert(sizeof(q4_0) == 18 && alignof(q4_0) == 2 && std::is_trivially_copyable_v<q4_0> &&
                  std::is_standard_layout_v<q4_0>,
              "q4_0 must be ggml's 18-byte block_q4_0");

/// q8_0 traits: activations are float, one element is a block of 32 weights; no per-element conversions.
template <>
struct dtype_traits<q8_0> {
  using activation_type = float;
  static constexpr char const* name() noexcept { return "q8_0"; }
  static constexpr std::ptrdiff_t block_weights = kQuantBlock;
};

/// q4_0 traits: activations are float, one element is a block of 32 weights; no per-element conversions.
template <>
struct dtype_traits<q4_0> {
  using activation_type = float;
  static constexpr char const* name() noexcept { return "q4_0"; }
  static constexpr std::ptrdiff_t block_weights = kQuantBlock;
};

/// Returns the integer of weight i (0..31) of a q8_0 block: qs[i], in [-128, 127].
inline int block_quant(q8_0 const& b, int i) noexcept { return b.qs[i]; }

/// Returns the integer of weight i (0..31) of a q4_0 block: its nibble minus 8, in [-8, 7].
inline int block_quant(q4_0 const& b, int i) noexcept {
  unsigned const byte = b.qs[i & 15];
  return static_cast<int>(i < 16 ? (byte & 0x0fu) : (byte >> 4)) - 8;
}

/// Returns weight i (0..31) of a block: its f16 scale times the integer, computed exactly in float.
template <class Block, class = std::enable_if_t<std::is_same_v<Block, q8_0> || std::is_same_v<Block, q4_0>>>
inline float block_weight(Block const& b, int i) noexcept {
  return b.d.to_float() * static_cast<float>(block_quant(b, i));
}

namespace detail {

template <class Block>
inline constexpr bool is_quant_block_v = std::is_same_v<Block, q8_0> || std::is_same_v<Block, q4_0>;

/// The float scale ggml computes for one block, before it is rounded to f16 (docs/formats.md):
///   q8_0: d = amax / 127, amax = max_i |x_i|;
///   q4_0: d = m / -8, m = the x_i of largest magnitude (the first one on ties, with its sign).
inline float block_scale_float(float const* x, q8_0 const*) noexcept {
  float amax = 0.0f;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
  return amax / 127.0f;
}
inline float block_scale_float(float const* x, q4_0 const*) noexcept {
  float amax = 0.0f, m = 0.0f;
  for (int i = 0; i < 32; ++i)
    if (amax < std::fabs(x[i])) {  // strict: the first of equal magnitudes wins
      amax = std::fabs(x[i]);
      m = x[i];
    }
  return m / -8.0f;
}

/// The reciprocal ggml multiplies by: 1 / d, or 0 for d = 0. Where 1 / d overflows to infinity (|d| < 2^-128: a
/// block whose largest |x| is below about 3.7e-37 for q8_0 or 2.3e-38 for q4_0) it is 0 as well, so every code is
/// the block's zero (q8_0: 0; q4_0: nibble 8). ggml's C casts infinities to int8 there, which is undefined
/// behaviour (x86 builds give q8_0 codes 0 but q4_0 nibbles 0); both dequantize to 0, since f16(d) = 0.
inline float block_inverse_scale(float d) noexcept {
  if (d == 0.0f) return 0.0f;
  float const id = 1.0f / d;
  return std::isfinite(id) ? id : 0.0f;
}

/// Quantizes 32 finite floats into one q8_0 block: qs_i = round(x_i * id), halves away from zero (roundf).
inline void quantize_block(float const* x, q8_0& out) noexcept {
  float const d = block_scale_float(x, &out);
  float const id = block_inverse_scale(d);
  out.d = f16(d);
  for (int i = 0; i < 32; ++i) out.qs[i] = static_cast<std::int8_t>(std::round(x[i] * id));  // |x_i * id| <= 127.5
}

/// Quantizes 32 finite floats into one q4_0 block: code = min(15, trunc(x * id + 8.5f)).
inline void quantize_block(float const* x, q4_0& out) noexcept {
  float const d = block_scale_float(x, &out);
  float const id = block_inverse_scale(d);
  out.d = f16(d);
  auto code = [id](float v) {
    // x * id is rounded to float, then + 8.5f rounded to float: two separate float operations, as in ggml's
    // reference. The volatile store keeps the compiler from contracting them into one fused multiply-add (GCC does
    // under its default -ffp-contract=fast with FMA targets, and the fused sum truncates differently when x * id
    // + 8.5 rounds up to an integer: x * id = 1.5 - 2^-21 gives 10 unfused, 9 fused). The sum lies in
    // [0.5, 16.5] (|x * id| <= 8 up to rounding), so the cast truncates toward zero safely.
    volatile float const scaled = v * id;
    float const shifted = scaled + 8.5f;
    return std::min(15u, static_cast<unsigned>(shifted));
  };
  for (int j = 0; j < 16; ++j) out.qs[j] = static_cast<std::uint8_t>(code(x[j]) | (code(x[j + 16]) << 4));
}

/// Widens 32 elements of a plain weight format to float.
template <class T>
void widen_block(T const* x, float* buf) noexcept {
  for (int i = 0; i < 32; ++i) buf[i] = dtype_traits<T>::to_float(x[i]);
}

template <class Block>
void require_block_multiple(std::ptrdiff_t n, char const* function) {
  if (n < 0 || n % kQuantBlock != 0)
    throw value_error(concat(function, " (", dtype_traits<Block>::name(), "): argument 'n' = ", n,
                             " is not a non-negative multiple of ", kQuantBlock, " (the block size)"));
}

/// Throws value_error unless the n weights of x (n a multiple of 32) can be quantized to Block: every one finite,
/// every block's scale within f16. Messages name the function, the argument and the weight's index plus
/// index_offset (its position in a larger tensor).
template <class Block, class T>
void check_quantizable(T const* x, std::ptrdiff_t n, char const* function, char const* argument,
                       std::ptrdiff_t index_offset) {
  float buf[32];
  for (std::ptrdiff_t b = 0; b < n / kQuantBlock; ++b) {
    widen_block(x + b * kQuantBlock, buf);
    std::ptrdiff_t const first = index_offset + b * kQuantBlock;
    for (int i = 0; i < 32; ++i)
      if (!std::isfinite(buf[i]))
        throw value_error(concat(function, " (", dtype_traits<Block>::name(), "): argument '", argument,
                                 "' has the non-finite value ", buf[i], " at index ", first + i));
    float const d = block_scale_float(buf, static_cast<Block const*>(nullptr));
    if (!std::isfinite(f16(d).to_float()))
      throw value_error(concat(function, " (", dtype_traits<Block>::name(), "): argument '", argument,
                               "': the block of indices [", first, ", ", first + kQuantBlock, ") has the scale ", d,
                               ", beyond the largest f16 (65504): its weights are too large to quantize"));
  }
}

}  // namespace detail

/// Quantizes a row of n weights into n / 32 blocks of `Block` (q8_0 or q4_0) with ggml's reference rounding
/// (docs/formats.md), so the same floats give the bytes of ggml's quantize_row_q8_0_ref / quantize_row_q4_0_ref.
/// Elements of bf16, f16 or double are converted to float first (exact for bf16 and f16).
/// \param x    [n] the weights
/// \param n    a multiple of 32
/// \param out  [n / 32] blocks; left untouched when the call throws
/// \throws value_error naming n if it is negative or not a multiple of 32; naming the index i if x[i] is NaN or
///         infinite; naming the block if its scale overflows f16 (q8_0: max |x| >= 65520 * 127 about 8.3e6; q4_0:
///         max |x| >= 65520 * 8 about 5.2e5), which would dequantize to infinities.
template <class T, class Block, class = std::enable_if_t<detail::is_quant_block_v<Block>>>
void quantize_row(T const* x, std::ptrdiff_t n, Block* out) {
  static_assert(is_weight_format_v<T> && !is_block_format_v<T>,
                "quantize_row: the input must be a plain weight format (float, bf16, f16 or double)");
  detail::require_block_multiple<Block>(n, "quantize_row");
  detail::check_quantizable<Block>(x, n, "quantize_row", "x", 0);  // everything before anything is written
  float buf[32];
  for (std::ptrdiff_t b = 0; b < n / kQuantBlock; ++b) {
    detail::widen_block(x + b * kQuantBlock, buf);
    detail::quantize_block(buf, out[b]);
  }
}

/// Dequantizes n / 32 blocks into n floats: out[32 b + i] = block_weight(in[b], i), exact.
/// \throws value_error naming n if it is negative or not a multiple of 32.
template <class Block, class = std::enable_if_t<detail::is_quant_block_v<Block>>>
void dequantize_row(Block const* in, std::ptrdiff_t n, float* out) {
  detail::require_block_multiple<Block>(n, "dequantize_row");
  for (std::ptrdiff_t b = 0; b < n / kQuantBlock; ++b)
    for (int i = 0; i < 32; ++i) out[b * kQuantBlock + i] = block_weight(in[b], i);
}

}  // namespace factorllm
