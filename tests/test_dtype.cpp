// SPDX-License-Identifier: Apache-2.0
// Weight formats (core/dtype.hpp): f16 conversions against bit patterns computed by hand and against the
// compiler's own IEEE binary16 type (_Float16; __fp16 on aarch64), and the format traits every kernel-argument view relies on.
#include <catch2/catch.hpp>

#include <factorllm/core/dtype.hpp>
#include <factorllm/core/kernel_args.hpp>
#include <factorllm/core/tensor.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>

#include "reference/compiler_half.hpp"

using namespace factorllm;

namespace {
float from_bits32(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
}  // namespace

TEST_CASE("f16 from float: hand-computed bit patterns (rounding to nearest even, subnormals, overflow)", "[dtype]") {
  struct Case {
    float value;
    std::uint16_t bits;
  };
  Case const cases[] = {
      {0.0f, 0x0000},
      {-0.0f, 0x8000},
      {1.0f, 0x3c00},
      {-2.0f, 0xc000},
      {0.5f, 0x3800},
      {65504.0f, 0x7bff},                       // largest half
      {65519.0f, 0x7bff},                       // below the halfway point to 65536
      {65520.0f, 0x7c00},                       // halfway, 0x7bff is odd: rounds up to infinity
      {1e6f, 0x7c00},                           // overflow
      {std::ldexp(1.0f, -14), 0x0400},          // smallest normal
      {std::ldexp(1.0f, -24), 0x0001},          // smallest subnormal
      {std::ldexp(1.0f, -25), 0x0000},          // halfway to the smallest subnormal: ties to even (0)
      {std::ldexp(1.5f, -25), 0x0001},          // above halfway
      {std::ldexp(3.0f, -25), 0x0002},          // 1.5 subnormal units: tie, to even (2)
      {1.0f + std::ldexp(1.0f, -11), 0x3c00},   // halfway between 1 and 1 + 2^-10: ties to even
      {1.0f + std::ldexp(3.0f, -11), 0x3c02},   // halfway between 1 + 2^-10 and 1 + 2^-9: to even (up)
      {std::ldexp(1023.0f, -24) + std::ldexp(1.0f, -25), 0x0400},  // largest subnormal + half a unit: to even
      {std::numeric_limits<float>::infinity(), 0x7c00},
      {-std::numeric_limits<float>::infinity(), 0xfc00},
  };
  for (auto const& c : cases) {
    INFO("value " << c.value);
    CHECK(f16(c.value).bits == c.bits);
  }
  f16 const nan(std::numeric_limits<float>::quiet_NaN());
  CHECK((nan.bits & 0x7c00u) == 0x7c00u);
  CHECK((nan.bits & 0x03ffu) != 0);
  CHECK(std::isnan(nan.to_float()));
}

TEST_CASE("f16 to float is exact and round-trips every non-NaN half", "[dtype]") {
  CHECK(f16::from_bits(0x3c00).to_float() == 1.0f);
  CHECK(f16::from_bits(0x0001).to_float() == std::ldexp(1.0f, -24));
  CHECK(f16::from_bits(0x03ff).to_float() == std::ldexp(1023.0f, -24));
  CHECK(f16::from_bits(0x7bff).to_float() == 65504.0f);
  CHECK(f16::from_bits(0xfc00).to_float() == -std::numeric_limits<float>::infinity());
  for (std::uint32_t b = 0; b <= 0xffffu; ++b) {
    f16 const h = f16::from_bits(static_cast<std::uint16_t>(b));
    float const f = h.to_float();
    if (std::isnan(f)) continue;
    REQUIRE(f16(f).bits == h.bits);
  }
}

TEST_CASE("f16 from float agrees with the compiler's half conversion (_Float16, __fp16 on aarch64) on a million floats", "[dtype]") {
#if defined(FLLM_TEST_COMPILER_HALF)
  std::mt19937 rng(7);
  std::uniform_int_distribution<std::uint32_t> any;
  for (int i = 0; i < 1000000; ++i) {
    // Exponents concentrated around the half range so that subnormals, normals and overflow all occur.
    std::uint32_t u = any(rng);
    std::uint32_t const exponent = 100u + (u >> 24) % 50u;  // 2^-27 .. 2^22
    u = (u & 0x807fffffu) | (exponent << 23);
    float const f = from_bits32(u);
    FLLM_TEST_COMPILER_HALF const h = static_cast<FLLM_TEST_COMPILER_HALF>(f);  // IEEE round to nearest even
    std::uint16_t hw;
    std::memcpy(&hw, &h, sizeof hw);
    INFO("float bits " << u);
    REQUIRE(f16(f).bits == hw);
    REQUIRE(static_cast<float>(h) == f16::from_bits(hw).to_float());
  }
#else
  WARN("this compiler has no IEEE half type: the comparison is not run (the hand-computed cases still are)");
#endif
}

TEST_CASE("weight formats: traits and block sizes", "[dtype]") {
  STATIC_REQUIRE(is_weight_format_v<float>);
  STATIC_REQUIRE(is_weight_format_v<double>);
  STATIC_REQUIRE(is_weight_format_v<bf16>);
  STATIC_REQUIRE(is_weight_format_v<f16 const>);
  STATIC_REQUIRE_FALSE(is_weight_format_v<int>);
  STATIC_REQUIRE(dtype_traits<f16>::block_weights == 1);
  STATIC_REQUIRE(std::is_same_v<activation_t<f16>, float>);
  CHECK(std::string(dtype_traits<f16>::name()) == "f16");
  CHECK(to_double(f16(0.25f)) == 0.25);
  CHECK(from_double<f16>(3.0).bits == 0x4200);
}

TEST_CASE("format conversion: Tensor::copy_from and convert round to nearest even, widen exactly", "[dtype][convert]") {
  float const values[] = {1.0f, 1.00390625f, -3.14159f, 65504.0f, 1e-6f, 0.0f};  // 1 + 2^-8: a bf16 tie
  Matrix<float> src({2, 3});
  for (int i = 0; i < 6; ++i) src[i] = values[i];
  Matrix<bf16> b({2, 3});
  b.copy_from(src.cview());  // float view into a bf16 tensor (used to fail to compile)
  Matrix<f16> h = convert<f16>(src.cview());
  for (int i = 0; i < 6; ++i) {
    CHECK(b[i] == bf16(values[i]));
    CHECK(h[i] == f16(values[i]));
  }
  CHECK(b[1].bits == bf16(1.0f).bits);  // the tie went to even
  Matrix<float> back = convert<float>(b.cview());
  Matrix<double> wide = convert<double>(h.cview());
  for (int i = 0; i < 6; ++i) {
    CHECK(back[i] == b[i].to_float());
    CHECK(wide[i] == static_cast<double>(h[i].to_float()));
  }
  Matrix<bf16> again = convert<bf16>(back.cview());
  for (int i = 0; i < 6; ++i) CHECK(again[i] == b[i]);  // bf16 -> float -> bf16 is the identity
}
