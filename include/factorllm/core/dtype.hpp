// SPDX-License-Identifier: Apache-2.0
// Storage types (bf16) and numeric traits: how each weight type converts to and from float/double.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace factorllm {

/// bfloat16 storage type: the upper 16 bits of an IEEE float. Arithmetic happens in float.
/// Conversion from float rounds to nearest, ties to even; NaN stays NaN (quiet), infinities stay infinite.
struct bf16 {
  std::uint16_t bits = 0;

  bf16() = default;
  /// Converts a float with round-to-nearest-even.
  explicit bf16(float value) noexcept : bits(from_float_bits(value)) {}

  /// Returns the float this value represents (exact).
  explicit operator float() const noexcept { return to_float(); }
  float to_float() const noexcept {
    std::uint32_t const u = static_cast<std::uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }

  /// Returns the bf16 bit pattern nearest to `value` (ties to even).
  static std::uint16_t from_float_bits(float value) noexcept {
    std::uint32_t u;
    std::memcpy(&u, &value, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) {
      // NaN: keep the sign and force a quiet-NaN payload so truncation cannot turn it into infinity.
      return static_cast<std::uint16_t>((u >> 16) | 0x0040u);
    }
    std::uint32_t const lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;  // round to nearest even; overflow to infinity is the IEEE result
    return static_cast<std::uint16_t>(u >> 16);
  }
  static bf16 from_bits(std::uint16_t b) noexcept {
    bf16 r;
    r.bits = b;
    return r;
  }
  friend bool operator==(bf16 a, bf16 b) noexcept { return a.bits == b.bits; }
  friend bool operator!=(bf16 a, bf16 b) noexcept { return a.bits != b.bits; }
};
static_assert(sizeof(bf16) == 2, "bf16 must be two bytes");

/// Numeric traits of a weight/activation type: the type activations use with it and its conversions.
/// Weights may be float, double (for oracles and gradient checks) or bf16; activations are float,
/// or double when the weights are double.
template <class T>
struct dtype_traits;

template <>
struct dtype_traits<float> {
  using activation_type = float;
  static constexpr char const* name() noexcept { return "f32"; }
  static double to_double(float v) noexcept { return v; }
  static float to_float(float v) noexcept { return v; }
  static float from_float(float v) noexcept { return v; }
};
template <>
struct dtype_traits<double> {
  using activation_type = double;
  static constexpr char const* name() noexcept { return "f64"; }
  static double to_double(double v) noexcept { return v; }
  static float to_float(double v) noexcept { return static_cast<float>(v); }
  static double from_float(float v) noexcept { return v; }
};
template <>
struct dtype_traits<bf16> {
  using activation_type = float;
  static constexpr char const* name() noexcept { return "bf16"; }
  static double to_double(bf16 v) noexcept { return v.to_float(); }
  static float to_float(bf16 v) noexcept { return v.to_float(); }
  static bf16 from_float(float v) noexcept { return bf16(v); }
};

/// The activation type used with weights of type T (float, or double for double weights).
template <class T>
using activation_t = typename dtype_traits<std::remove_const_t<T>>::activation_type;

/// Converts any supported element to double (the scalar oracle's accumulation type).
template <class T>
inline double to_double(T v) noexcept {
  return dtype_traits<std::remove_const_t<T>>::to_double(v);
}

/// Converts a double to the storage type T (rounding to nearest; ties to even for bf16).
template <class T>
inline T from_double(double v) noexcept {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return dtype_traits<T>::from_float(static_cast<float>(v));
  }
}

}  // namespace factorllm
