// SPDX-License-Identifier: Apache-2.0
// CpuSimd int8 dot products for the block-quantized weight formats q8_0 and q4_0 (core/quant.hpp), the decode
// (streaming) path of the SwiGLU kernels (docs/formats.md).
//
// As ggml does, the activations of a quantized matrix product are themselves quantized to 8 bits per block of
// 32 (int8 codes and one scale per block), so each block's dot product is an exact integer sum scaled once by
// d_w * d_x. The activation rounding is stated here because it is the only approximation beyond the weights' own:
// the scale is amax / 127 rounded to f16 (as ggml stores it); codes are x / scale computed with the unrounded
// scale's reciprocal and rounded to nearest, ties to even (as ggml's AVX2 / AVX-512 quantizers do; its scalar
// reference rounds ties away from zero). The weight side is exact: the kernels agree with the
// dequantize-then-double oracle on the same quantized activations to float rounding of the block sums.
//
// The dot kernels themselves are chosen at run time per CPU (target_dispatch.hpp: AVX-512 VNNI `vpdpbusd`, AVX2
// `vpmaddubsw` + `vpmaddwd`, or Highway's portable ops on NEON, SVE and the rest); q8_multi_dot is their entry
// for a single weight row. The summation order depends on n alone, never on threads or on the target's width
// within a block.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../../core/dtype.hpp"
#include "../../core/quant.hpp"
#include "cpu_simd.hpp"
#include "target_dispatch.hpp"

namespace factorllm {
namespace detail {

/// True for the block-quantized weight formats the int8 dot kernels handle.
template <class W>
inline constexpr bool is_q8_dot_format_v = std::is_same_v<W, q8_0> || std::is_same_v<W, q4_0>;

/// Quantizes n floats (n a multiple of 32) to 8-bit codes q[n], one scale per block s[n / 32] and the sum of each
/// block's codes sum[n / 32] (the q4_0 kernels' offset correction; see the file comment for the rounding). A
/// non-finite block gets scale NaN, so the products it enters are NaN, as the float kernels would give.
inline void quantize_act_q8(float const* FLLM_RESTRICT x, std::ptrdiff_t n, std::int8_t* FLLM_RESTRICT q,
                            float* FLLM_RESTRICT s, std::int32_t* FLLM_RESTRICT sum) noexcept {
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
      sum[b] = 0;
      for (int i = 0; i < 32; ++i) q[b * 32 + i] = 0;
      continue;
    }
    float const d = amax / 127.f;
    float const id = d != 0.f ? 1.f / d : 0.f;
    s[b] = f16(d).to_float();
    std::int32_t codes = 0;
    for (int i = 0; i < 32; ++i) {
      q[b * 32 + i] = static_cast<std::int8_t>(std::nearbyint(xb[i] * id));
      codes += q[b * 32 + i];
    }
    sum[b] = codes;
  }
}

/// out[r * out_stride + t] = dot of weight row r < rows (n / 32 blocks each, consecutive) with activation vector
/// t < n_vec (codes x + t * n, scales sx + t * n / 32, code sums xsum + t * n / 32), on the dispatched target.
template <class W>
inline void q8_dot_rows(W const* w, std::ptrdiff_t n, std::ptrdiff_t rows, std::int8_t const* x, float const* sx,
                        std::int32_t const* xsum, std::ptrdiff_t n_vec, float* out, std::ptrdiff_t out_stride) {
  QDotArgs args;
  args.w = w;
  args.row_blocks = n / 32;
  args.rows = rows;
  args.xq = x;
  args.xs = sx;
  args.xsum = xsum;
  args.n_vec = n_vec;
  args.out = out;
  args.out_stride = out_stride;
  args.format = std::is_same_v<W, q8_0> ? QDotFormat::q8_0 : QDotFormat::q4_0;
  qdot_rows_dispatch(args);
}

/// out[t] = dot of the one weight row w with activation vector t < n_vec (q8_dot_rows for a single row).
template <class W>
inline void q8_multi_dot(W const* w, std::int8_t const* x, float const* sx, std::int32_t const* xsum,
                         std::ptrdiff_t n_vec, std::ptrdiff_t n, float* out) {
  q8_dot_rows(w, n, 1, x, sx, xsum, n_vec, out, n_vec);
}

/// Dequantizes n weights (n / 32 blocks) to float on the dispatched target: the GEMM path's panel. The same values
/// as dequantize_row (d * code is exact in float), without its argument check.
template <class W>
inline void dequantize_blocks(W const* FLLM_RESTRICT w, std::ptrdiff_t n, float* FLLM_RESTRICT out) {
  dequantize_blocks_dispatch(w, std::is_same_v<W, q8_0> ? QDotFormat::q8_0 : QDotFormat::q4_0, n / 32, out);
}

}  // namespace detail
}  // namespace factorllm
