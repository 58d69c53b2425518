// SPDX-License-Identifier: Apache-2.0
// Tests of core/quant.hpp and the block formats through the library: q8_0 / q4_0 blocks derived by hand from
// ggml's rules, a randomized comparison with an independent quantizer written here, the round-trip error bounds,
// conversions (convert, Tensor::copy_from, ffn::convert_format), the CpuScalar oracle (and CpuSimd's fallback to
// it) against a plain double loop over the dequantized weights, and the refusals.
#include <catch2/catch.hpp>

#include <factorllm/core/quant.hpp>
#include <factorllm/core/tensor.hpp>
#include <factorllm/ffn/factorize.hpp>
#include <factorllm/ffn/swiglu.hpp>
#include <factorllm/moe/moe_ffn.hpp>
#include <factorllm/moe/shared_moe.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "reference/compiler_half.hpp"
#include "reference/reference.hpp"

using namespace factorllm;

namespace {

using Block32 = std::vector<float>;

/// Requires `fn` to throw E with a message containing every fragment.
template <class E, class F>
void require_throws_with(F&& fn, std::vector<std::string> const& fragments) {
  try {
    fn();
    FAIL("no exception");
  } catch (E const& e) {
    std::string const what = e.what();
    INFO("message: " << what);
    for (auto const& f : fragments) CHECK(what.find(f) != std::string::npos);
  }
}

// ---- The independent reference: ggml's rules written again, plainly, with each float rounding explicit. ----

/// Rounds a double to float through a volatile store (the compiler can neither skip nor fuse it).
float to_float_rounded(double v) {
  volatile float f = static_cast<float>(v);
  return f;
}

/// IEEE half bits of a float, round to nearest even: the compiler's half type when it has one (_Float16, or __fp16 on
/// aarch64; independent of the library's f16), else the library's conversion (tested against it in test_dtype.cpp).
std::uint16_t half_bits(float v) {
#if defined(FLLM_TEST_COMPILER_HALF)
  FLLM_TEST_COMPILER_HALF const h = static_cast<FLLM_TEST_COMPILER_HALF>(v);
  std::uint16_t b;
  std::memcpy(&b, &h, sizeof b);
  return b;
#else
  return f16(v).bits;
#endif
}

/// The value of half bits, from the IEEE binary16 definition.
double half_value(std::uint16_t b) {
  int const sign = b >> 15, exponent = (b >> 10) & 0x1f, mantissa = b & 0x3ff;
  double const magnitude = exponent == 0 ? std::ldexp(mantissa, -24) : std::ldexp(1024 + mantissa, exponent - 25);
  return sign ? -magnitude : magnitude;  // (no infinities or NaN in these tests)
}

struct RefQ8 {
  float d = 0;  // the float scale before f16 rounding
  std::uint16_t d_bits = 0;
  std::int8_t qs[32] = {};
};
struct RefQ4 {
  float d = 0;
  std::uint16_t d_bits = 0;
  std::uint8_t qs[16] = {};
};

/// Reciprocal of the scale: 0 for d = 0, and 0 where 1/d overflows to infinity (the library's documented policy for
/// |d| < 2^-128, where ggml's casts are undefined).
float ref_inverse(float d) {
  if (d == 0.0f) return 0.0f;
  double const r = 1.0 / static_cast<double>(d);
  // From the midpoint between the largest float and 2^128 on, the float quotient is infinite.
  return std::fabs(r) >= 0x1.ffffffp127 ? 0.0f : to_float_rounded(r);
}

/// q8_0 (ggml quantize_row_q8_0_ref): amax = max |x|; d = amax / 127; id = 1/d; q = roundf(x * id).
RefQ8 ref_q8(float const* x) {
  double amax = 0;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(static_cast<double>(x[i])));
  RefQ8 r;
  r.d = to_float_rounded(amax / 127.0);  // one correctly rounded float division (double has > 2 * 24 + 2 bits)
  r.d_bits = half_bits(r.d);
  float const id = ref_inverse(r.d);
  for (int i = 0; i < 32; ++i) {
    double const p = to_float_rounded(static_cast<double>(x[i]) * static_cast<double>(id));  // the float product
    double const q = p < 0 ? -std::floor(-p + 0.5) : std::floor(p + 0.5);                      // halves away from 0
    r.qs[i] = static_cast<std::int8_t>(q);
  }
  return r;
}

/// q4_0 (ggml quantize_row_q4_0_ref): m = the x of largest |x| (first on ties); d = m / -8; id = 1/d;
/// code = min(15, trunc(float(float(x * id) + 8.5f))); byte j = code(j) | code(j + 16) << 4.
RefQ4 ref_q4(float const* x) {
  double amax = 0, m = 0;
  for (int i = 0; i < 32; ++i)
    if (std::fabs(static_cast<double>(x[i])) > amax) {
      amax = std::fabs(static_cast<double>(x[i]));
      m = x[i];
    }
  RefQ4 r;
  r.d = to_float_rounded(m / -8.0);  // 0 / -8 is -0
  r.d_bits = half_bits(r.d);
  float const id = ref_inverse(r.d);
  auto code = [&](float v) {
    double const p = to_float_rounded(static_cast<double>(v) * static_cast<double>(id));
    double const s = to_float_rounded(p + 8.5);  // the float sum
    return std::min(15, static_cast<int>(std::trunc(s)));
  };
  for (int j = 0; j < 16; ++j) r.qs[j] = static_cast<std::uint8_t>(code(x[j]) | (code(x[j + 16]) << 4));
  return r;
}

/// Weight i of a q4_0 block from its bytes: d * (nibble - 8), the nibble of byte i % 16 (low for i < 16).
double ref_q4_weight(q4_0 const& b, int i) {
  int const nibble = i < 16 ? (b.qs[i] & 0x0f) : (b.qs[i - 16] >> 4);
  return half_value(b.d.bits) * (nibble - 8);
}
double ref_q8_weight(q8_0 const& b, int i) { return half_value(b.d.bits) * b.qs[i]; }

template <class Block>
double ref_weight(Block const& b, int i) {
  if constexpr (std::is_same_v<Block, q8_0>) return ref_q8_weight(b, i);
  else return ref_q4_weight(b, i);
}

/// Weight k of a stored row of blocks.
template <class Block>
double ref_row_weight(Block const* row, std::ptrdiff_t k) {
  return ref_weight(row[k / 32], static_cast<int>(k % 32));
}

/// 32 floats of one random block: a scale 2^e with e in [e_lo, e_hi], and one of several shapes (uniform, values
/// on a grid of quarters so that x * id often lands on halves, equal magnitudes of both signs, sparse).
Block32 random_block(std::mt19937_64& rng, int e_lo, int e_hi) {
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(e_lo, e_hi), kind(0, 4), grid(-16, 16);
  float const scale = std::ldexp(1.0f, exponent(rng));
  int const k = kind(rng);
  Block32 x(32);
  for (int i = 0; i < 32; ++i) {
    switch (k) {
      case 0: x[static_cast<std::size_t>(i)] = u(rng) * scale; break;
      case 1: x[static_cast<std::size_t>(i)] = static_cast<float>(grid(rng)) * 0.25f * scale; break;
      case 2: x[static_cast<std::size_t>(i)] = (i % 3 == 0 ? -1.0f : 1.0f) * scale; break;
      case 3: x[static_cast<std::size_t>(i)] = i % 4 == 0 ? u(rng) * scale : 0.0f; break;
      default: x[static_cast<std::size_t>(i)] = static_cast<float>(grid(rng)) * 0.5f * scale; break;
    }
  }
  return x;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Types and traits
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("quant: q8_0 and q4_0 have ggml's block layouts and the block-format traits", "[quant]") {
  STATIC_REQUIRE(sizeof(q8_0) == 34);
  STATIC_REQUIRE(sizeof(q4_0) == 18);
  STATIC_REQUIRE(offsetof(q8_0, qs) == 2);
  STATIC_REQUIRE(offsetof(q4_0, qs) == 2);
  STATIC_REQUIRE(std::is_trivially_copyable_v<q8_0>);
  STATIC_REQUIRE(std::is_trivially_copyable_v<q4_0>);
  STATIC_REQUIRE(is_weight_format_v<q8_0>);
  STATIC_REQUIRE(is_weight_format_v<q4_0 const>);
  STATIC_REQUIRE(is_block_format_v<q8_0>);
  STATIC_REQUIRE(is_block_format_v<q4_0>);
  STATIC_REQUIRE_FALSE(is_block_format_v<float>);
  STATIC_REQUIRE_FALSE(is_block_format_v<f16>);
  STATIC_REQUIRE_FALSE(is_block_format_v<int>);
  STATIC_REQUIRE(dtype_traits<q8_0>::block_weights == 32);
  STATIC_REQUIRE(dtype_traits<q4_0>::block_weights == 32);
  STATIC_REQUIRE(block_weights_v<q4_0 const> == 32);
  STATIC_REQUIRE(block_weights_v<bf16> == 1);
  STATIC_REQUIRE(std::is_same_v<activation_t<q8_0>, float>);
  STATIC_REQUIRE(std::is_same_v<activation_t<q4_0>, float>);
  CHECK(std::string(dtype_traits<q8_0>::name()) == "q8_0");
  CHECK(std::string(dtype_traits<q4_0>::name()) == "q4_0");
  // A view over rows of blocks: d_model counts weights, the last extent blocks.
  Tensor<q8_0, 3> g({2, 3, 4}), u({2, 3, 4}), dn({2, 128, 1});
  ExpertWeightsView<q8_0> v{g.cview(), u.cview(), dn.cview()};
  CHECK(v.d_model() == 128);
  CHECK(v.d_expert() == 3);
}

TEST_CASE("quant: block_quant and block_weight read ggml's nibble order", "[quant]") {
  q4_0 b;
  b.d = f16(0.5f);
  for (int j = 0; j < 16; ++j) b.qs[j] = static_cast<std::uint8_t>(j | ((15 - j) << 4));  // low j, high 15 - j
  for (int j = 0; j < 16; ++j) {
    CHECK(block_quant(b, j) == j - 8);
    CHECK(block_quant(b, j + 16) == 7 - j);
    CHECK(block_weight(b, j) == 0.5f * static_cast<float>(j - 8));
  }
  q8_0 c;
  c.d = f16::from_bits(0x0001);  // the smallest subnormal half, 2^-24: d * q is still exact in float
  c.qs[3] = -128;
  c.qs[4] = 127;
  CHECK(block_weight(c, 3) == -std::ldexp(1.0f, -17));
  CHECK(block_weight(c, 4) == std::ldexp(127.0f, -24));
  CHECK(block_weight(c, 5) == 0.0f);
}

// ---------------------------------------------------------------------------------------------------------------
// Blocks computed by hand
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("quant: q8_0 blocks computed by hand", "[quant][q8_0]") {
  struct Case {
    char const* what;
    Block32 x;
    std::uint16_t d_bits;
    std::vector<int> qs;
  };
  std::vector<Case> cases;
  {
    // amax = 127 (x[0]) -> d = 127 / 127 = 1 exactly, f16(1) = 0x3c00; id = 1, so q = roundf(x): halves go away from
    // zero (2.5 -> 3, -2.5 -> -3, 0.5 -> 1, 126.5 -> 127: round-to-even would give 2, -2, 0, 126); -100.25 -> -100;
    // the float just below 0.5 (0.49999997) -> 0; 3.75 -> 4; x[11..31] = i - 20 are integers and stay.
    Block32 x = {127, -100.25f, 2.5f, -2.5f, 0.5f, -0.5f, 1.5f, 126.5f, -126.5f, 0.49999997f, 3.75f};
    std::vector<int> q = {127, -100, 3, -3, 1, -1, 2, 127, -127, 0, 4};
    for (int i = 11; i < 32; ++i) {
      x.push_back(static_cast<float>(i - 20));
      q.push_back(i - 20);
    }
    cases.push_back({"d = 1, halfway cases", x, 0x3c00, q});
  }
  {
    // The largest magnitude is negative (-127): amax = 127 still, d = +1 (the scale of q8_0 is never negative).
    Block32 x(32, 0.0f);
    x[0] = 3;
    x[1] = -127;
    x[2] = 64.5f;  // -> 65
    std::vector<int> q(32, 0);
    q[0] = 3;
    q[1] = -127;
    q[2] = 65;
    cases.push_back({"negative maximum", x, 0x3c00, q});
  }
  {
    // amax = 1: d = float(1 / 127) = 0x1.020408p-7. In half: 2^-7 * (1 + 8.06 / 1024) -> exponent 8, mantissa 8:
    // bits 0x2008. id = float(1 / d) = 127 exactly, so q = roundf(127 x): 1 -> 127, 0.5 -> 63.5 -> 64,
    // 0.25 -> 31.75 -> 32, 0.1f -> 12.7 -> 13, -0.3f -> -38.1 -> -38, 0.75 -> 95.25 -> 95.
    Block32 x = {1, -1, 0.5f, -0.5f, 0.25f, 0.1f, -0.3f, 0.75f};
    x.resize(32, 0.0f);
    std::vector<int> q = {127, -127, 64, -64, 32, 13, -38, 95};
    q.resize(32, 0);
    cases.push_back({"amax = 1, d rounded to f16", x, 0x2008, q});
  }
  cases.push_back({"all zeros: d = 0, id = 0", Block32(32, 0.0f), 0x0000, std::vector<int>(32, 0)});
  for (auto const& c : cases) {
    INFO(c.what);
    q8_0 b;
    quantize_row(c.x.data(), 32, &b);
    CHECK(b.d.bits == c.d_bits);
    for (int i = 0; i < 32; ++i) {
      INFO("weight " << i << " x = " << c.x[static_cast<std::size_t>(i)]);
      CHECK(static_cast<int>(b.qs[i]) == c.qs[static_cast<std::size_t>(i)]);
    }
  }
}

TEST_CASE("quant: q4_0 blocks computed by hand", "[quant][q4_0]") {
  struct Case {
    char const* what;
    Block32 x;
    std::uint16_t d_bits;
    std::vector<std::uint8_t> qs;
  };
  std::vector<Case> cases;
  {
    // m = +8 (x[0]; x[1] = -8 and x[16] = -8 tie in magnitude but come later) -> d = 8 / -8 = -1 (0xbc00), id = -1,
    // code = min(15, trunc(8.5 - x)):
    //   x[0..15] = 8 -8 0 1 -1 0.5 -0.5 7.5 -7.5 -7.25 3.2 2.5 -2.5 0.49 4 -4
    //   codes    = 0 15 8 7  9  8    9   1   15    15   5   6   11   8  4 12   (16.5 and 16.0 clamp to 15;
    //              3.2f: 8.5 - 3.2000000477 = 5.2999999523 -> 5; 0.49: 8.01 -> 8)
    //   x[16 + j] = j - 8 -> 16.5 - j -> codes 15 15 14 13 12 11 10 9 8 7 6 5 4 3 2 1
    //   byte j = low | high << 4.
    Block32 x = {8, -8, 0, 1, -1, 0.5f, -0.5f, 7.5f, -7.5f, -7.25f, 3.2f, 2.5f, -2.5f, 0.49f, 4, -4};
    for (int j = 0; j < 16; ++j) x.push_back(static_cast<float>(j - 8));
    cases.push_back({"positive maximum first on a tie, the 15 clamp", x, 0xbc00,
                     {0xF0, 0xFF, 0xE8, 0xD7, 0xC9, 0xB8, 0xA9, 0x91, 0x8F, 0x7F, 0x65, 0x56, 0x4B, 0x38, 0x24, 0x1C}});
  }
  {
    // m = -8 (x[0], before x[1] = +8) -> d = +1 (0x3c00), id = 1, code = min(15, trunc(x + 8.5)):
    //   -8 -> 0, 8 -> 16.5 -> 15, -4 -> 4, 4.5 -> 13, -0.5 -> 8, 0.5 -> 9; zeros -> 8 (all high nibbles 8).
    Block32 x = {-8, 8, -4, 4.5f, -0.5f, 0.5f};
    x.resize(32, 0.0f);
    cases.push_back({"negative maximum first on a tie", x, 0x3c00,
                     {0x80, 0x8F, 0x84, 0x8D, 0x88, 0x89, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88}});
  }
  {
    // m = 2 (x[0]; x[16] = -2 ties later) -> d = -0.25 (0xb400), id = -4, code = min(15, trunc(8.5 - 4 x)):
    //   low:  2 -> 0, 0.3f -> 8.5 - 1.2000000477 = 7.2999999523 -> 7, -0.3f -> 9.7 -> 9, 1.875 -> 1, -1.875 -> 16 -> 15,
    //         0.125 -> 8, -0.125 -> 9, zeros -> 8
    //   high: -2 -> 16.5 -> 15, 1 -> 4.5 -> 4, zeros -> 8
    Block32 x = {2, 0.3f, -0.3f, 1.875f, -1.875f, 0.125f, -0.125f};
    x.resize(32, 0.0f);
    x[16] = -2;
    x[17] = 1;
    cases.push_back({"d = -0.25, codes in both nibbles", x, 0xb400,
                     {0xF0, 0x47, 0x89, 0x81, 0x8F, 0x88, 0x89, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88}});
  }
  {
    // Two float roundings, not one fused multiply-add: m = 3 -> d = -0.375 (0xb600), id = float(-1 / 0.375) =
    // -0x1.555556p+1. x[1] = 0x1.80000cp-3: x * id = -0.500000238... rounds to p = -0.5 - 2^-22; p + 8.5 = 8 - 2^-22
    // is the midpoint between 8 - 2^-21 and 8, ties to even: 8 -> code 8. Fused, the exact product (below p) gives
    // 7.9999995 -> code 7 (byte 0x87). x[0] = 3: 3 * id rounds to -8 - 2^-19, + 8.5 -> 0.4999981 -> code 0.
    Block32 x(32, 0.0f);
    x[0] = 3;
    x[1] = 0x1.80000cp-3f;
    cases.push_back({"no fused multiply-add", x, 0xb600,
                     {0x80, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88, 0x88}});
  }
  // All zeros: m = 0, d = 0 / -8 = -0 (0x8000: ggml stores the negative zero), id = 0, every code 8.
  cases.push_back({"all zeros: d = -0", Block32(32, 0.0f), 0x8000, std::vector<std::uint8_t>(16, 0x88)});
  for (auto const& c : cases) {
    INFO(c.what);
    q4_0 b;
    quantize_row(c.x.data(), 32, &b);
    CHECK(b.d.bits == c.d_bits);
    for (int j = 0; j < 16; ++j) {
      INFO("byte " << j);
      CHECK(static_cast<int>(b.qs[j]) == static_cast<int>(c.qs[static_cast<std::size_t>(j)]));
    }
  }
}

TEST_CASE("quant: blocks of tiny values follow the documented policy", "[quant]") {
  // amax = 1e-36: d = amax / 127 = 7.87e-39 is subnormal but 1/d = 1.27e38 is finite, so ggml's arithmetic applies
  // unchanged: x * id = 126.99999 -> 127 and -31.749998 -> -32; f16(d) = 0, so every weight dequantizes to 0.
  Block32 x(32, 0.0f);
  x[0] = 1e-36f;
  x[1] = -0.25e-36f;
  q8_0 b;
  quantize_row(x.data(), 32, &b);
  CHECK(b.d.bits == 0x0000);
  CHECK(b.qs[0] == 127);
  CHECK(b.qs[1] == -32);
  // amax = 1e-38: 1/d overflows to infinity; the policy takes id = 0, so every code is the block's zero (ggml's C
  // casts infinities to int8 there: undefined behaviour).
  x[0] = 1e-38f;
  x[1] = -0.5e-38f;
  quantize_row(x.data(), 32, &b);
  CHECK(b.d.bits == 0x0000);
  for (int i = 0; i < 32; ++i) CHECK(b.qs[i] == 0);
  q4_0 c;
  quantize_row(x.data(), 32, &c);
  CHECK(c.d.bits == 0x8000);  // d = 1e-38 / -8 rounds to -0 in half
  for (int j = 0; j < 16; ++j) CHECK(c.qs[j] == 0x88);
  float y[32];
  dequantize_row(&c, 32, y);
  for (float v : y) CHECK(v == 0.0f);
}

// ---------------------------------------------------------------------------------------------------------------
// Randomized: the library against the independent quantizer above
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("quant: quantize_row gives the independent reference's bytes on 20000 random blocks", "[quant]") {
  std::uint64_t const seed = 20240;
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  int const n_blocks = 20000;
  for (int r = 0; r < n_blocks / 4; ++r) {
    // Rows of 4 blocks with scales from 2^-135 (1/d overflows: the policy) to 2^18 (q4_0's d near the f16 limit).
    std::vector<float> row;
    for (int b = 0; b < 4; ++b) {
      auto const x = random_block(rng, -135, 18);
      row.insert(row.end(), x.begin(), x.end());
    }
    q8_0 q8[4];
    q4_0 q4[4];
    // The library refuses a row with a block whose f16 scale would be infinite.
    bool q8_fits = true, q4_fits = true;
    for (int b = 0; b < 4; ++b) {
      q8_fits = q8_fits && (ref_q8(row.data() + 32 * b).d_bits & 0x7c00) != 0x7c00;
      q4_fits = q4_fits && (ref_q4(row.data() + 32 * b).d_bits & 0x7c00) != 0x7c00;
    }
    if (q8_fits) quantize_row(row.data(), 128, q8);
    else CHECK_THROWS_AS(quantize_row(row.data(), 128, q8), value_error);
    if (q4_fits) quantize_row(row.data(), 128, q4);
    else CHECK_THROWS_AS(quantize_row(row.data(), 128, q4), value_error);
    for (int b = 0; b < 4; ++b) {
      INFO("row " << r << " block " << b);
      if (q8_fits) {
        RefQ8 const want = ref_q8(row.data() + 32 * b);
        REQUIRE(q8[b].d.bits == want.d_bits);
        for (int i = 0; i < 32; ++i) REQUIRE(q8[b].qs[i] == want.qs[i]);
      }
      if (q4_fits) {
        RefQ4 const want = ref_q4(row.data() + 32 * b);
        REQUIRE(q4[b].d.bits == want.d_bits);
        for (int j = 0; j < 16; ++j) REQUIRE(q4[b].qs[j] == want.qs[j]);
      }
    }
    // Dequantization is exact: d * q in double equals the float the library returns.
    float y[128];
    if (q8_fits) {
      dequantize_row(q8, 128, y);
      for (int k = 0; k < 128; ++k) REQUIRE(static_cast<double>(y[k]) == ref_q8_weight(q8[k / 32], k % 32));
    }
    if (q4_fits) {
      dequantize_row(q4, 128, y);
      for (int k = 0; k < 128; ++k) REQUIRE(static_cast<double>(y[k]) == ref_q4_weight(q4[k / 32], k % 32));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Round-trip error bounds (docs/formats.md states them)
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("quant: round-trip errors stay within the stated bounds", "[quant]") {
  // With d the float scale (before f16 rounding) and d_h = f16(d) the stored one, per element:
  //   q8_0: |x' - x| <= d/2 + 127 |d_h - d| + 2^-16 d
  //   q4_0: |x' - x| <= |d|/2 + 8 |d_h - d| + 2^-19 |d|, except where the code clamps to 15 (x * id >= 7.5, i.e. x
  //         within |d|/2 of -m): there |d| + 8 |d_h - d| + 2^-19 |d|.
  // (2^-16 d and 2^-19 |d| bound the float roundings of x * id and of + 8.5; see docs/formats.md.)
  std::uint64_t const seed = 77;
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  double worst8 = 0, worst4 = 0, worst4_clamped = 0;
  for (int r = 0; r < 5000; ++r) {
    auto const x = random_block(rng, -20, 15);  // normal scales
    q8_0 b8;
    q4_0 b4;
    quantize_row(x.data(), 32, &b8);
    quantize_row(x.data(), 32, &b4);
    float y8[32], y4[32];
    dequantize_row(&b8, 32, y8);
    dequantize_row(&b4, 32, y4);
    double const d8 = ref_q8(x.data()).d, dh8 = half_value(b8.d.bits);
    double const d4 = std::fabs(static_cast<double>(ref_q4(x.data()).d)), dh4 = std::fabs(half_value(b4.d.bits));
    float const id4 = ref_inverse(ref_q4(x.data()).d);
    for (int i = 0; i < 32; ++i) {
      double const xi = x[static_cast<std::size_t>(i)];
      INFO("block " << r << " weight " << i << " x = " << xi);
      double const e8 = std::fabs(static_cast<double>(y8[i]) - xi);
      double const bound8 = d8 / 2 + 127 * std::fabs(dh8 - d8) + 0x1p-16 * d8;
      REQUIRE(e8 <= bound8);
      if (d8 > 0) worst8 = std::max(worst8, (e8 - 127 * std::fabs(dh8 - d8)) / d8);
      bool const clamped = static_cast<double>(x[static_cast<std::size_t>(i)] * id4) >= 7.5;
      double const e4 = std::fabs(static_cast<double>(y4[i]) - xi);
      double const bound4 = (clamped ? d4 : d4 / 2) + 8 * std::fabs(dh4 - d4) + 0x1p-19 * d4;
      REQUIRE(e4 <= bound4);
      if (d4 > 0) {
        double const rel = (e4 - 8 * std::fabs(dh4 - d4)) / d4;
        double& worst = clamped ? worst4_clamped : worst4;
        worst = std::max(worst, rel);
      }
    }
  }
  // The bounds are attained (so they are not loose): the worst cases come within 1% of d/2 and d.
  CHECK(worst8 > 0.49);
  CHECK(worst4 > 0.49);
  CHECK(worst4_clamped > 0.99);
}

// ---------------------------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("quant: convert and Tensor::copy_from quantize and dequantize rows", "[quant][convert]") {
  std::mt19937_64 rng(3);
  std::normal_distribution<float> normal(0.0f, 0.5f);
  Tensor<float, 3> x({2, 3, 64});
  for (std::ptrdiff_t i = 0; i < x.size(); ++i) x[i] = normal(rng);
  auto const q8 = convert<q8_0>(x.cview());
  auto const q4 = convert<q4_0>(x.cview());
  REQUIRE(q8.extents() == std::array<std::ptrdiff_t, 3>{2, 3, 2});
  REQUIRE(q4.extents() == std::array<std::ptrdiff_t, 3>{2, 3, 2});
  for (std::ptrdiff_t row = 0; row < 6; ++row) {
    q8_0 want8[2];
    q4_0 want4[2];
    quantize_row(x.data() + row * 64, 64, want8);
    quantize_row(x.data() + row * 64, 64, want4);
    CHECK(std::memcmp(want8, q8.data() + row * 2, sizeof want8) == 0);
    CHECK(std::memcmp(want4, q4.data() + row * 2, sizeof want4) == 0);
  }
  // Back to float: exact dequantization, [.., 64] again; to double the same values.
  auto const back = convert<float>(q8.cview());
  auto const wide = convert<double>(q4.cview());
  REQUIRE(back.extents() == x.extents());
  for (std::ptrdiff_t k = 0; k < x.size(); ++k) {
    CHECK(static_cast<double>(back[k]) == ref_row_weight(q8.data(), k));
    CHECK(wide[k] == ref_row_weight(q4.data(), k));
  }
  // The same format copies bit for bit; between block formats the rows go through float.
  Tensor<q8_0, 3> copy(q8.cview());
  CHECK(std::memcmp(copy.data(), q8.data(), sizeof(q8_0) * 12) == 0);
  auto const q4_from_q8 = convert<q4_0>(q8.cview());
  auto const expected = convert<q4_0>(back.cview());
  CHECK(std::memcmp(q4_from_q8.data(), expected.data(), sizeof(q4_0) * 12) == 0);
  // bf16 and f16 sources widen exactly first.
  auto const xb = convert<bf16>(x.cview());
  auto const xh = convert<f16>(x.cview());
  auto const from_bf16 = convert<q8_0>(xb.cview());
  auto const from_f16 = convert<q4_0>(xh.cview());
  auto const want_bf16 = convert<q8_0>(convert<float>(xb.cview()).cview());
  auto const want_f16 = convert<q4_0>(convert<float>(xh.cview()).cview());
  CHECK(std::memcmp(from_bf16.data(), want_bf16.data(), sizeof(q8_0) * 12) == 0);
  CHECK(std::memcmp(from_f16.data(), want_f16.data(), sizeof(q4_0) * 12) == 0);
  // A strided source view: the rows it names, not the padding.
  std::vector<float> padded(3 * 96, 1e30f);
  for (int r = 0; r < 3; ++r)
    for (int k = 0; k < 64; ++k) padded[static_cast<std::size_t>(r * 96 + k)] = x[r * 64 + k];
  TensorView<float const, 2> strided(padded.data(), {3, 64}, {96, 1});
  Matrix<q8_0> from_strided({3, 2});
  from_strided.copy_from(strided);
  CHECK(std::memcmp(from_strided.data(), q8.data(), sizeof(q8_0) * 6) == 0);
}

TEST_CASE("quant: convert_format quantizes experts and dequantizes them back", "[quant][convert]") {
  auto const f = ref::random_ffn(64, 128, 9);
  Matrix<float> g({128, 64}), u({128, 64}), dn({64, 128});
  for (std::size_t i = 0; i < f.gate.size(); ++i) {
    g[static_cast<std::ptrdiff_t>(i)] = static_cast<float>(f.gate[i]);
    u[static_cast<std::ptrdiff_t>(i)] = static_cast<float>(f.up[i]);
    dn[static_cast<std::ptrdiff_t>(i)] = static_cast<float>(f.down[i]);
  }
  auto const experts = ffn::factorize(ffn::DenseFfnView<float>{g.cview(), u.cview(), dn.cview()},
                                      ffn::ExpertPartition::random(128, 4, 5));
  auto const q = ffn::convert_format<q8_0>(experts);
  CHECK(q.n_experts() == 4);
  CHECK(q.d_expert() == 32);
  CHECK(q.d_model() == 64);
  CHECK(q.gate_tensor().extents() == std::array<std::ptrdiff_t, 3>{4, 32, 2});
  CHECK(q.down_tensor().extents() == std::array<std::ptrdiff_t, 3>{4, 64, 1});
  CHECK(q.partition().permutation() == experts.partition().permutation());
  CHECK(q.expert(1).d_model() == 64);
  CHECK(q.expert(1).d_ff() == 32);
  auto const back = ffn::convert_format<float>(q);
  CHECK(back.gate_tensor().extents() == experts.gate_tensor().extents());
  CHECK(back.down_tensor().extents() == experts.down_tensor().extents());
  for (std::ptrdiff_t k = 0; k < back.down_tensor().size(); ++k)
    CHECK(static_cast<double>(back.down_tensor()[k]) == ref_row_weight(q.down_tensor().data(), k));
  auto const from_bf16 = ffn::convert_format<q4_0>(ffn::convert_format<bf16>(experts));
  CHECK(from_bf16.gate_tensor().extents() == std::array<std::ptrdiff_t, 3>{4, 32, 2});
}

// ---------------------------------------------------------------------------------------------------------------
// The oracle on block-quantized weights
// ---------------------------------------------------------------------------------------------------------------

namespace {

/// A router, gating and float experts of d_model 64, d_expert 32 (n_experts 4), the layer's input, and the
/// experts in Block format.
template <class Block>
struct QuantLayer {
  std::ptrdiff_t d = 64, n = 4, n_tokens = 13;
  moe::Gating gating;
  moe::Router<float> router = moe::Router<float>::random(64, 4, 21, 1.0);
  ffn::ExpertWeights<Block> experts;
  Matrix<float> x{{13, 64}};

  QuantLayer() {
    gating.mode = moe::CombineMode::softmax_topk_renorm;
    gating.top_k = 2;
    auto const f = ref::random_ffn(64, 128, 31);
    Matrix<float> g({128, 64}), u({128, 64}), dn({64, 128});
    for (std::size_t i = 0; i < f.gate.size(); ++i) {
      g[static_cast<std::ptrdiff_t>(i)] = static_cast<float>(f.gate[i]);
      u[static_cast<std::ptrdiff_t>(i)] = static_cast<float>(f.up[i]);
      dn[static_cast<std::ptrdiff_t>(i)] = static_cast<float>(f.down[i]);
    }
    experts = ffn::convert_format<Block>(ffn::factorize(ffn::DenseFfnView<float>{g.cview(), u.cview(), dn.cview()},
                                                        ffn::ExpertPartition::random(128, 4, 8)));
    auto const xv = ref::randn(static_cast<std::size_t>(x.size()), 41, 1.0);
    for (std::ptrdiff_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(xv[static_cast<std::size_t>(i)]);
  }

  /// Expert e on one token, in double, from the blocks' bytes (the test's own dequantization).
  std::vector<double> expert_ref(std::ptrdiff_t e, float const* xt) const {
    std::ptrdiff_t const m = experts.d_expert();
    auto const gate = experts.gate(e), up = experts.up(e), down = experts.down(e);
    std::vector<double> h(static_cast<std::size_t>(m)), y(static_cast<std::size_t>(d), 0.0);
    for (std::ptrdiff_t i = 0; i < m; ++i) {
      double sg = 0, su = 0;
      for (std::ptrdiff_t k = 0; k < d; ++k) {
        sg += ref_row_weight(gate.row(i), k) * xt[k];
        su += ref_row_weight(up.row(i), k) * xt[k];
      }
      h[static_cast<std::size_t>(i)] = sg / (1 + std::exp(-sg)) * su;
    }
    for (std::ptrdiff_t o = 0; o < d; ++o)
      for (std::ptrdiff_t i = 0; i < m; ++i) y[static_cast<std::size_t>(o)] += ref_row_weight(down.row(o), i) * h[static_cast<std::size_t>(i)];
    return y;
  }
};

}  // namespace

TEMPLATE_TEST_CASE("quant: MoeFfn on q8_0 / q4_0 experts matches a double loop over the dequantized weights",
                   "[quant][moe]", q8_0, q4_0) {
  QuantLayer<TestType> L;
  moe::MoeFfn<TestType, CpuScalar> scalar(L.experts, L.router, L.gating);
  Matrix<float> y({L.n_tokens, L.d});
  moe::RoutingRecord<float> record;
  // (CpuSimd's int8 kernels for these formats are tested against this oracle in test_quant_kernels.cpp.)
  Workspace ws(scalar.workspace_bytes(L.n_tokens));
  scalar.forward(L.x.cview(), y.view(), ws, &record);
  // Reference: the routing the layer recorded (routing is tested on its own in test_moe_ffn.cpp), the experts from
  // the blocks' bytes, the combine, all in double. Tolerance: the oracle accumulates in double and rounds y to
  // float once, so every element is within half a float ulp (relative 2^-24) of the double result, plus 1e-12
  // relative for the two double summation orders.
  std::vector<double> ref_y(static_cast<std::size_t>(y.size()), 0.0);
  for (std::ptrdiff_t t = 0; t < L.n_tokens; ++t)
    for (std::ptrdiff_t j = 0; j < L.gating.top_k; ++j) {
      auto const o = L.expert_ref(record.ids(t, j), L.x.data() + t * L.d);
      for (std::ptrdiff_t c = 0; c < L.d; ++c)
        ref_y[static_cast<std::size_t>(t * L.d + c)] += static_cast<double>(record.weights(t, j)) * o[static_cast<std::size_t>(c)];
    }
  for (std::ptrdiff_t k = 0; k < y.size(); ++k) {
    double const want = ref_y[static_cast<std::size_t>(k)];
    INFO("element " << k);
    REQUIRE(std::fabs(static_cast<double>(y[k]) - want) <= (0x1p-24 + 1e-12) * std::fabs(want) + 1e-300);
  }
  CHECK(ref::rel_l2(y.data(), ref_y.data(), ref_y.size()) <= 1e-7);
  // Routing ids are the independent top-2 of the router logits (no ties in this data).
  for (std::ptrdiff_t t = 0; t < L.n_tokens; ++t) {
    ref::Vec z(static_cast<std::size_t>(L.n));
    for (std::ptrdiff_t e = 0; e < L.n; ++e) {
      double s = L.router.bias()(e);
      for (std::ptrdiff_t c = 0; c < L.d; ++c) s += static_cast<double>(L.router.weight()(e, c)) * L.x(t, c);
      z[static_cast<std::size_t>(e)] = s;
    }
    auto const sel = ref::topk(z, 2);
    CHECK(record.ids(t, 0) == sel[0]);
    CHECK(record.ids(t, 1) == sel[1]);
  }
}

TEMPLATE_TEST_CASE("quant: MoeFfn on blocks equals MoeFfn<float> on the dequantized experts, bit for bit",
                   "[quant][moe]", q8_0, q4_0) {
  QuantLayer<TestType> L;
  moe::MoeFfn<TestType, CpuScalar> quant(L.experts, L.router, L.gating);
  moe::MoeFfn<float, CpuScalar> dequant(ffn::convert_format<float>(L.experts), L.router, L.gating);
  Matrix<float> a({L.n_tokens, L.d}), b({L.n_tokens, L.d});
  quant.forward(L.x.cview(), a.view());
  dequant.forward(L.x.cview(), b.view());
  // Exact: every dequantized weight is a float (d * q is exact), and the oracle runs the same double sums in the
  // same order on the same values.
  for (std::ptrdiff_t k = 0; k < a.size(); ++k) REQUIRE(a[k] == b[k]);
  // The dense oracle and the shared-expert layer take block weights as well (the same exactness).
  auto const e0 = L.experts.expert(0);
  auto const f0 = ffn::convert_format<float>(L.experts);
  Matrix<float> c({L.n_tokens, L.d}), e({L.n_tokens, L.d});
  ffn::swiglu_forward(e0, L.x.cview(), c.view(), CpuScalar{});
  ffn::swiglu_forward(f0.expert(0), L.x.cview(), e.view(), CpuScalar{});
  for (std::ptrdiff_t k = 0; k < c.size(); ++k) REQUIRE(c[k] == e[k]);
  auto const shared_q = moe::make_shared_moe<CpuScalar>(L.experts, 1, moe::Router<float>::random(L.d, 3, 5), L.gating);
  auto const shared_f = moe::make_shared_moe<CpuScalar>(f0, 1, moe::Router<float>::random(L.d, 3, 5), L.gating);
  shared_q.forward(L.x.cview(), c.view());
  shared_f.forward(L.x.cview(), e.view());
  for (std::ptrdiff_t k = 0; k < c.size(); ++k) REQUIRE(c[k] == e[k]);
}

// ---------------------------------------------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------------------------------------------

TEST_CASE("quant: bad input is refused with a typed error naming the argument", "[quant][errors]") {
  std::vector<float> x(64, 0.25f);
  q8_0 b8[2];
  q4_0 b4[2];
  require_throws_with<value_error>([&] { quantize_row(x.data(), 33, b8); }, {"quantize_row", "q8_0", "'n' = 33", "32"});
  require_throws_with<value_error>([&] { quantize_row(x.data(), -32, b4); }, {"'n' = -32"});
  require_throws_with<value_error>([&] { dequantize_row(b4, 31, x.data()); }, {"dequantize_row", "q4_0", "'n' = 31"});
  SECTION("non-finite weights name their index, and nothing is written") {
    for (float const bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity()}) {
      x[45] = bad;
      b8[0].qs[0] = 99;
      b4[0].qs[0] = 0x12;
      require_throws_with<value_error>([&] { quantize_row(x.data(), 64, b8); }, {"quantize_row", "'x'", "index 45"});
      require_throws_with<value_error>([&] { quantize_row(x.data(), 64, b4); }, {"index 45"});
      CHECK(b8[0].qs[0] == 99);
      CHECK(b4[0].qs[0] == 0x12);
    }
  }
  SECTION("a block scale beyond f16 is refused") {
    x[40] = 1e7f;  // q8_0: d = 1e7 / 127 = 78740 > 65504; q4_0: 1e7 / 8 as well
    require_throws_with<value_error>([&] { quantize_row(x.data(), 64, b8); }, {"[32, 64)", "f16"});
    require_throws_with<value_error>([&] { quantize_row(x.data(), 64, b4); }, {"[32, 64)", "f16"});
    x[40] = 6e5f;  // q8_0 still fits (d = 4724), q4_0 does not (d = -75000)
    CHECK_NOTHROW(quantize_row(x.data(), 64, b8));
    CHECK_THROWS_AS(quantize_row(x.data(), 64, b4), value_error);
  }
  SECTION("conversions name 'src' and the multiple of 32") {
    Matrix<float> m({2, 48});
    require_throws_with<shape_error>([&] { (void)convert<q8_0>(m.cview()); }, {"convert", "'src'", "48", "multiple of 32"});
    Matrix<q4_0> dst({2, 2});
    require_throws_with<shape_error>([&] { dst.copy_from(m.cview()); }, {"Tensor::copy_from", "'src'", "multiple of 32"});
    Matrix<float> m64({3, 64});
    require_throws_with<shape_error>([&] { dst.copy_from(m64.cview()); }, {"Tensor::copy_from", "'src'", "[3, 64]", "[2, 64]"});
    Matrix<float> f({2, 48});
    Matrix<q8_0> src({2, 2});
    require_throws_with<shape_error>([&] { f.copy_from(src.cview()); }, {"Tensor::copy_from", "'src'"});
    m64[70] = std::numeric_limits<float>::quiet_NaN();
    Matrix<q8_0> into({3, 2});
    into[0].qs[0] = 42;
    require_throws_with<value_error>([&] { into.copy_from(m64.cview()); }, {"'src'", "index 70"});
    CHECK(into[0].qs[0] == 42);  // checked before the first row was written
  }
  SECTION("experts whose d_model or d_expert is not a multiple of 32") {
    Tensor<float, 3> g({2, 32, 48}), u({2, 32, 48}), dn({2, 48, 32});
    ffn::ExpertWeights<float> e48(g, u, dn, ffn::ExpertPartition::contiguous(64, 2));
    require_throws_with<shape_error>([&] { (void)ffn::convert_format<q8_0>(e48); },
                                     {"convert_format", "'experts'", "d_model = 48", "multiple"});
    Tensor<float, 3> g2({2, 16, 64}), u2({2, 16, 64}), dn2({2, 64, 16});
    ffn::ExpertWeights<float> e16(g2, u2, dn2, ffn::ExpertPartition::contiguous(32, 2));
    require_throws_with<shape_error>([&] { (void)ffn::convert_format<q4_0>(e16); }, {"d_expert = 16"});
    Tensor<q8_0, 3> gq({2, 16, 2}), uq({2, 16, 2}), dq({2, 64, 1});
    require_throws_with<shape_error>(
        [&] { ffn::ExpertWeights<q8_0>(gq, uq, dq, ffn::ExpertPartition::contiguous(32, 2)); },
        {"ExpertWeights", "'partition'", "d_expert = 16", "multiple of 32"});
    Tensor<q8_0, 3> dq_wrong({2, 32, 1});
    Tensor<q8_0, 3> gq32({2, 32, 2}), uq32({2, 32, 2});
    require_throws_with<shape_error>(
        [&] { ffn::ExpertWeights<q8_0>(gq32, uq32, dq_wrong, ffn::ExpertPartition::contiguous(64, 2)); },
        {"'down'", "[2, 32, 1]", "[2, 64, 1]"});
    Matrix<q8_0> dg({48, 2}), du({48, 2}), dd({64, 1});
    require_throws_with<shape_error>(
        [&] { ffn::DenseFfnView<q8_0>{dg.cview(), du.cview(), dd.cview()}.validate("swiglu_forward"); },
        {"d_ff = 48", "multiple of 32"});
  }
}
