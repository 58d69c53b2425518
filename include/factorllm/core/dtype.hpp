// SPDX-License-Identifier: Apache-2.0
// Weight formats: the storage types a weight may have (f32, f64, bf16, f16) and their numeric traits.
//
// A weight format is a type W with a dtype_traits<W> specialization: its name, the activation type used with
// it, how many weights one stored element holds (1 for the plain types; a block-quantized format stores a
// block of weights with its scale in one element), and its conversions. Kernel-argument views
// (core/kernel_args.hpp) are templates over W, so a new format adds a type, its traits and kernels, and no
// front changes (docs/design.md §3). The block-quantized formats q8_0 and q4_0 live in core/quant.hpp: they
// have no per-element conversions (to_double, from_double and convert_element refuse them at compile time);
// kernels dequantize whole blocks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace factorllm {
namespace detail {

/// std::bit_cast (C++20) for the 32-bit words the conversions below work on.
template <class To, class From>
To bit_cast(From const& from) noexcept {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: sizes differ");
  To to;
  std::memcpy(&to, &from, sizeof to);
  return to;
}

/// What the 16-bit storage formats share: the bit pattern, construction from bits, bitwise equality and the
/// explicit float conversion. Format F supplies to_float() and from_float_bits(float).
template <class F>
struct Storage16 {
  std::uint16_t bits = 0;

  /// Returns the float this value represents (exact).
  explicit operator float() const noexcept { return static_cast<F const&>(*this).to_float(); }
  static F from_bits(std::uint16_t b) noexcept {
    F r;
    r.bits = b;
    return r;
  }
  friend bool operator==(F a, F b) noexcept { return a.bits == b.bits; }
  friend bool operator!=(F a, F b) noexcept { return a.bits != b.bits; }
};

}  // namespace detail

/// bfloat16 storage type: the upper 16 bits of an IEEE float. Arithmetic happens in float.
/// Conversion from float rounds to nearest, ties to even; NaN stays NaN (quiet), infinities stay infinite.
struct bf16 : detail::Storage16<bf16> {
  bf16() = default;
  /// Converts a float with round-to-nearest-even.
  explicit bf16(float value) noexcept { bits = from_float_bits(value); }

  /// Returns the float this value represents (exact).
  float to_float() const noexcept {
    return detail::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
  }

  /// Returns the bf16 bit pattern nearest to `value` (ties to even).
  static std::uint16_t from_float_bits(float value) noexcept {
    std::uint32_t u = detail::bit_cast<std::uint32_t>(value);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) {
      // NaN: keep the sign and force a quiet-NaN payload so truncation cannot turn it into infinity.
      return static_cast<std::uint16_t>((u >> 16) | 0x0040u);
    }
    std::uint32_t const lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;  // round to nearest even; overflow to infinity is the IEEE result
    return static_cast<std::uint16_t>(u >> 16);
  }
};
static_assert(sizeof(bf16) == 2 && std::is_trivially_copyable_v<bf16>, "bf16 must be two plain bytes");

/// IEEE 754 binary16 storage type. Arithmetic happens in float. Conversion from float rounds to nearest, ties to
/// even (subnormals included); values beyond the largest half (65504) become infinities; NaN stays a quiet NaN.
struct f16 : detail::Storage16<f16> {
  f16() = default;
  /// Converts a float with round-to-nearest-even.
  explicit f16(float value) noexcept { bits = from_float_bits(value); }

  /// Returns the float this value represents (exact: every half is a float).
  float to_float() const noexcept {
    std::uint32_t const sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
    std::uint32_t const exponent = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu;
    std::uint32_t u;
    if (exponent == 0x1fu) {
      u = sign | 0x7f800000u | (mantissa << 13);  // infinity or NaN (payload kept)
    } else if (exponent != 0) {
      u = sign | ((exponent + 112u) << 23) | (mantissa << 13);  // rebias 15 -> 127
    } else if (mantissa == 0) {
      u = sign;  // signed zero
    } else {
      // Subnormal half m * 2^-24: normalize the mantissa into a float.
      int shift = 0;
      std::uint32_t m = mantissa;
      while ((m & 0x400u) == 0) {
        m <<= 1;
        ++shift;
      }
      u = sign | (static_cast<std::uint32_t>(113 - shift) << 23) | ((m & 0x3ffu) << 13);
    }
    return detail::bit_cast<float>(u);
  }

  /// Returns the half bit pattern nearest to `value` (ties to even).
  static std::uint16_t from_float_bits(float value) noexcept {
    std::uint32_t u = detail::bit_cast<std::uint32_t>(value);
    std::uint32_t const sign = (u >> 16) & 0x8000u, abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN: the canonical quiet NaN
    if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds past 65504: infinity
    if (abs >= 0x38800000u) {
      // Normal half: drop 13 mantissa bits with round-to-nearest-even; a carry correctly bumps the exponent.
      std::uint32_t const rebased = abs - 0x38000000u;  // exponent 127 -> 15
      std::uint32_t const lsb = (rebased >> 13) & 1u;
      return static_cast<std::uint16_t>(sign | ((rebased + 0xfffu + lsb) >> 13));
    }
    if (abs < 0x33000000u) return static_cast<std::uint16_t>(sign);  // below half the smallest subnormal: zero
    // Subnormal half: the value in units of 2^-24, rounded to nearest even.
    std::uint32_t const exponent = abs >> 23, mantissa = (abs & 0x7fffffu) | 0x800000u;
    std::uint32_t const shift = 126u - exponent;  // 14..24: value = mantissa * 2^(exponent - 150) = q * 2^-24
    std::uint32_t q = mantissa >> shift;
    std::uint32_t const rest = mantissa & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rest > half || (rest == half && (q & 1u))) ++q;
    return static_cast<std::uint16_t>(sign | q);
  }
};
static_assert(sizeof(f16) == 2 && std::is_trivially_copyable_v<f16>, "f16 must be two plain bytes");

/// Numeric traits of a weight/activation type: the type activations use with it and its conversions.
/// Weights may be float, double (for oracles and gradient checks), bf16 or f16 (here), or the block-quantized q8_0
/// and q4_0 (core/quant.hpp, traits without per-element conversions); activations are float, or double when the
/// weights are double. `block_weights` is how many weights one stored element holds.
template <class T>
struct dtype_traits;

template <>
struct dtype_traits<float> {
  using activation_type = float;
  static constexpr char const* name() noexcept { return "f32"; }
  static constexpr std::ptrdiff_t block_weights = 1;
  static double to_double(float v) noexcept { return v; }
  static float to_float(float v) noexcept { return v; }
  static float from_float(float v) noexcept { return v; }
};
template <>
struct dtype_traits<double> {
  using activation_type = double;
  static constexpr char const* name() noexcept { return "f64"; }
  static constexpr std::ptrdiff_t block_weights = 1;
  static double to_double(double v) noexcept { return v; }
  static float to_float(double v) noexcept { return static_cast<float>(v); }
  static double from_float(float v) noexcept { return v; }
};
template <>
struct dtype_traits<bf16> {
  using activation_type = float;
  static constexpr char const* name() noexcept { return "bf16"; }
  static constexpr std::ptrdiff_t block_weights = 1;
  static double to_double(bf16 v) noexcept { return v.to_float(); }
  static float to_float(bf16 v) noexcept { return v.to_float(); }
  static bf16 from_float(float v) noexcept { return bf16(v); }
};

template <>
struct dtype_traits<f16> {
  using activation_type = float;
  static constexpr char const* name() noexcept { return "f16"; }
  static constexpr std::ptrdiff_t block_weights = 1;
  static double to_double(f16 v) noexcept { return v.to_float(); }
  static float to_float(f16 v) noexcept { return v.to_float(); }
  static f16 from_float(float v) noexcept { return f16(v); }
};

/// True for the types that have weight-format traits.
template <class T, class = void>
struct is_weight_format : std::false_type {};
template <class T>
struct is_weight_format<T, std::void_t<decltype(dtype_traits<T>::block_weights)>> : std::true_type {};
template <class T>
inline constexpr bool is_weight_format_v = is_weight_format<std::remove_const_t<T>>::value;

namespace detail {
template <class T, bool = is_weight_format_v<T>>
struct block_weights_of : std::integral_constant<std::ptrdiff_t, 1> {};
template <class T>
struct block_weights_of<T, true> : std::integral_constant<std::ptrdiff_t, dtype_traits<std::remove_const_t<T>>::block_weights> {};
}  // namespace detail

/// Weights one stored element of T holds: dtype_traits<T>::block_weights for a weight format (32 for q8_0 and
/// q4_0), 1 for any other type (so generic code may ask about int or std::int32_t too).
template <class T>
inline constexpr std::ptrdiff_t block_weights_v = detail::block_weights_of<T>::value;

/// True for the block-quantized weight formats (more than one weight per stored element: q8_0, q4_0).
template <class T>
inline constexpr bool is_block_format_v = block_weights_v<T> > 1;

/// The activation type used with weights of type T (float, or double for double weights).
template <class T>
using activation_t = typename dtype_traits<std::remove_const_t<T>>::activation_type;

/// Converts any supported element to double (the scalar oracle's accumulation type). Not for a block format:
/// one q8_0 or q4_0 element is 32 weights (dequantize its rows, core/quant.hpp).
template <class T>
inline double to_double(T v) noexcept {
  static_assert(!is_block_format_v<T>, "to_double: a block-quantized format (q8_0, q4_0) has no per-element value; "
                                       "dequantize whole blocks (block_weight / dequantize_row, core/quant.hpp)");
  return dtype_traits<std::remove_const_t<T>>::to_double(v);
}

/// Converts a double to the storage type T (rounding to nearest; ties to even for bf16). Not for a block format.
template <class T>
inline T from_double(double v) noexcept {
  static_assert(!is_block_format_v<T>, "from_double: a block-quantized format (q8_0, q4_0) is written whole rows at a "
                                       "time (quantize_row, core/quant.hpp)");
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return dtype_traits<T>::from_float(static_cast<float>(v));
  }
}

/// Converts one element between storage types: exact when widening (bf16/f16 -> f32 -> f64), round to nearest even
/// when narrowing to bf16 or f16 (a double rounds through float first); other arithmetic types convert as
/// static_cast does. Block formats convert by rows (Tensor::copy_from, convert; core/quant.hpp).
template <class To, class From>
inline To convert_element(From v) noexcept {
  static_assert(std::is_same_v<To, std::remove_const_t<From>> || (!is_block_format_v<To> && !is_block_format_v<From>),
                "convert_element: block-quantized formats (q8_0, q4_0) convert whole rows (quantize_row / "
                "dequantize_row, core/quant.hpp)");
  if constexpr (std::is_same_v<To, std::remove_const_t<From>>) {
    return v;
  } else if constexpr (is_weight_format_v<To> && is_weight_format_v<From>) {
    return from_double<To>(to_double(v));
  } else {
    return static_cast<To>(v);
  }
}

}  // namespace factorllm
