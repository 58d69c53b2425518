// SPDX-License-Identifier: Apache-2.0
// CpuSimd int8 dot products for the block-quantized weight formats q8_0 and q4_0 (core/quant.hpp), the decode
// (streaming) path of the SwiGLU kernels (docs/formats.md).
//
// As ggml does, the activations of a quantized matrix product are themselves quantized to 8 bits per block of
// 32 (`ActQ8`: int8 codes and one scale per block), so each block's dot product is an exact integer sum scaled
// once by d_w * d_x. The activation rounding is stated here because it is the only approximation beyond the
// weights' own: the scale is amax / 127 rounded to f16 (as ggml stores it); codes are x / scale computed with the
// unrounded scale's reciprocal and rounded to nearest, ties to even (as ggml's AVX2 / AVX-512 quantizers do; its
// scalar reference rounds ties away from zero). The weight side is exact: the kernels agree with the
// dequantize-then-double oracle on the same quantized activations to float rounding of the block sums.
//
// Per block of 32 weights: AVX2 `vpsignb` + `vpmaddubsw` + `vpmaddwd` (AVX-VNNI / AVX512-VNNI `vpdpbusd` where the
// translation unit has it), one int -> float conversion and one FMA; q4_0 codes are unpacked in registers (low
// nibbles are weights 0..15, high nibbles 16..31: ggml's order). Other ISAs run a portable integer loop with the
// same per-block sums. The summation order depends on n alone, never on threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "../../core/dtype.hpp"
#include "../../core/quant.hpp"
#include "cpu_simd.hpp"

namespace factorllm {
namespace detail {

/// True for the block-quantized weight formats the int8 dot kernels handle.
template <class W>
inline constexpr bool is_q8_dot_format_v = std::is_same_v<W, q8_0> || std::is_same_v<W, q4_0>;

/// Quantizes n floats (n a multiple of 32) to 8-bit codes q[n] and one scale per block s[n / 32] (see the file
/// comment for the rounding). A non-finite block gets scale NaN, so the products it enters are NaN, as the float
/// kernels would give.
inline void quantize_act_q8(float const* FLLM_RESTRICT x, std::ptrdiff_t n, std::int8_t* FLLM_RESTRICT q,
                            float* FLLM_RESTRICT s) noexcept {
  for (std::ptrdiff_t b = 0; b * 32 < n; ++b) {
    float const* xb = x + b * 32;
    float amax = 0.f;
    bool finite = true;
    for (int i = 0; i < 32; ++i) {
      finite = finite && std::isfinite(xb[i]);
      amax = std::max(amax, std::fabs(xb[i]));
    }
    if (!finite) {
      s[b] = std::numeric_limits<float>::quiet_NaN();
      for (int i = 0; i < 32; ++i) q[b * 32 + i] = 0;
      continue;
    }
    float const d = amax / 127.f;
    float const id = d != 0.f ? 1.f / d : 0.f;
    s[b] = f16(d).to_float();
    for (int i = 0; i < 32; ++i) q[b * 32 + i] = static_cast<std::int8_t>(std::nearbyint(xb[i] * id));
  }
}

/// Portable 32-weight integer dot of one block with 32 activation codes (the block's codes as core/quant.hpp reads
/// them).
template <class W>
inline std::int32_t block_dot_scalar(W const& w, std::int8_t const* x) noexcept {
  std::int32_t acc = 0;
  for (int i = 0; i < 32; ++i) acc += block_quant(w, i) * x[i];
  return acc;
}

#if defined(__AVX2__) && (defined(__x86_64__) || defined(__i386__))
/// The block's 32 weight codes as signed bytes.
template <class W>
inline __m256i block_codes_avx2(W const& w) noexcept {
  if constexpr (std::is_same_v<W, q8_0>) {
    return _mm256_loadu_si256(reinterpret_cast<__m256i const*>(w.qs));
  } else {
    __m128i const raw = _mm_loadu_si128(reinterpret_cast<__m128i const*>(w.qs));
    __m256i const both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);  // low nibbles: lanes 0-15
    return _mm256_sub_epi8(_mm256_and_si256(both, _mm256_set1_epi8(0x0F)), _mm256_set1_epi8(8));
  }
}

/// Eight int32 partial sums of w[i] * x[i] over 32 signed bytes (|w| <= 127 or 8, |x| <= 127: no saturation).
inline __m256i dot_i8_avx2(__m256i w, __m256i x) noexcept {
  __m256i const aw = _mm256_sign_epi8(w, w);  // |w|, unsigned operand
  __m256i const sx = _mm256_sign_epi8(x, w);  // x with w's sign (0 where w is 0)
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1));
#endif
}

/// A block's f16 scale as float: one vcvtph2ps where the translation unit has F16C (the portable conversion is a
/// dozen branchy instructions, a measurable share of a 32-weight block's work).
inline float block_scale(f16 d) noexcept {
#if defined(__F16C__)
  return _cvtsh_ss(d.bits);
#else
  return d.to_float();
#endif
}

inline float hsum_avx2(__m256 v) noexcept {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

/// out[t] = sum_b d_w[b] * s_x[t][b] * (integer dot of block b) for t < NV vectors of activation codes
/// (x + t * n, scales sx + t * n / 32), one pass over the weight row w of n / 32 blocks.
template <int NV, class W>
inline void q8_multi_dot_n(W const* FLLM_RESTRICT w, std::int8_t const* FLLM_RESTRICT x, float const* FLLM_RESTRICT sx,
                           std::ptrdiff_t n, float* out) noexcept {
  std::ptrdiff_t const nb = n / 32;
#if defined(__AVX2__) && (defined(__x86_64__) || defined(__i386__))
  __m256 acc[NV];
  for (int t = 0; t < NV; ++t) acc[t] = _mm256_setzero_ps();
  for (std::ptrdiff_t b = 0; b < nb; ++b) {
    __m256i const wq = block_codes_avx2(w[b]);
    float const dw = block_scale(w[b].d);
    for (int t = 0; t < NV; ++t) {
      __m256i const xq = _mm256_loadu_si256(reinterpret_cast<__m256i const*>(x + t * n + b * 32));
      __m256 const scale = _mm256_set1_ps(dw * sx[t * nb + b]);
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i8_avx2(wq, xq)), scale, acc[t]);
    }
  }
  for (int t = 0; t < NV; ++t) out[t] = hsum_avx2(acc[t]);
#else
  for (int t = 0; t < NV; ++t) {
    float s = 0.f;
    for (std::ptrdiff_t b = 0; b < nb; ++b)
      s += static_cast<float>(block_dot_scalar(w[b], x + t * n + b * 32)) * (w[b].d.to_float() * sx[t * nb + b]);
    out[t] = s;
  }
#endif
}

/// q8_multi_dot_n for a run-time count of vectors, 1 <= n_vec <= 4.
template <class W>
inline void q8_multi_dot(W const* w, std::int8_t const* x, float const* sx, std::ptrdiff_t n_vec, std::ptrdiff_t n,
                         float* out) noexcept {
  switch (n_vec) {
    case 1: q8_multi_dot_n<1>(w, x, sx, n, out); break;
    case 2: q8_multi_dot_n<2>(w, x, sx, n, out); break;
    case 3: q8_multi_dot_n<3>(w, x, sx, n, out); break;
    default: q8_multi_dot_n<4>(w, x, sx, n, out); break;
  }
}

/// Dequantizes n weights (n / 32 blocks) to float: the GEMM path's panel. The same values as dequantize_row
/// (d * code is exact in float), without its argument check and with the scale converted once per block.
template <class W>
inline void dequantize_blocks(W const* FLLM_RESTRICT w, std::ptrdiff_t n, float* FLLM_RESTRICT out) noexcept {
  for (std::ptrdiff_t b = 0; b < n / 32; ++b) {
    float const d = w[b].d.to_float();
    for (int i = 0; i < 32; ++i) out[b * 32 + i] = d * static_cast<float>(block_quant(w[b], i));
  }
}

}  // namespace detail
}  // namespace factorllm
