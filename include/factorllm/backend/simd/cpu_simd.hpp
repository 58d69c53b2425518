// SPDX-License-Identifier: Apache-2.0
// The CpuSimd backend tag and its building blocks: xsimd inner loops, bf16 and f16 widening, thread helpers.
//
// Why xsimd (not Highway) for the kernels: the ISA is a template parameter (xsimd::batch<float, Arch>), which
// fits a header-only library: the application instantiates CpuSimd<Arch> for the archs it compiles, and
// `dispatch` (backend/dispatch.hpp) picks the best one the CPU reports at run time. Highway's dynamic dispatch
// needs HWY_EXPORT tables in a .cc file that a header-only library cannot own.
// GEMMs (prefill) go through Eigen; tasks through an Executor (core/executor.hpp: OpenMP by default, or the
// caller's pool; without -fopenmp everything runs on one thread and gives the same bits).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // the bf16 and f16 (F16C) widening loads below; every other ISA takes the portable path
#endif

#include <xsimd/xsimd.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../../core/dtype.hpp"
#include "../../core/executor.hpp"
#include "../../detail/threads.hpp"
#include "../tags.hpp"
#include "cpu_features.hpp"

namespace factorllm {

/// CPU SIMD backend for the xsimd architecture Arch (default: the best one this translation unit is
/// compiled for). Derives from CpuScalar: an op without a SIMD kernel falls back to the oracle, and so do
/// the weight types it has no kernel for (double: only the oracle runs in double). Activations are float,
/// weights float, bf16 or f16. Weight views must be dense row-major (backend_error otherwise); inputs and outputs
/// may have any row stride.
template <class Arch = xsimd::default_arch>
struct CpuSimd : CpuScalar {
  using backend_self = CpuSimd;
  using fallback = CpuScalar;
  using arch = Arch;
  static constexpr char const* name() noexcept { return "cpu_simd"; }
  /// True when the running CPU supports Arch (the same check as the ISA module loader: cpu_features.hpp).
  static bool available() noexcept { return detail::cpu_supports_arch<Arch>(); }
};

/// The CPU backend host code should use by default: the SIMD backend for the best ISA compiled in.
using DefaultCpu = CpuSimd<>;

namespace detail {

/// Widens n bf16 values to float (exact: a bf16 is the upper half of a float).
inline void widen_bf16(bf16 const* FLLM_RESTRICT src, float* FLLM_RESTRICT dst, std::ptrdiff_t n) noexcept {
  // Written as a plain shift loop: GCC vectorizes it to vpmovzxwd + vpslld at -O2 for any enabled ISA.
  auto const* s = reinterpret_cast<std::uint16_t const*>(src);
  auto* d = reinterpret_cast<std::uint32_t*>(dst);
  for (std::ptrdiff_t i = 0; i < n; ++i) d[i] = static_cast<std::uint32_t>(s[i]) << 16;
}

/// Widens n IEEE halves to float (exact). F16C converts 8 at a time where the translation unit has it.
inline void widen_f16(f16 const* FLLM_RESTRICT src, float* FLLM_RESTRICT dst, std::ptrdiff_t n) noexcept {
  std::ptrdiff_t i = 0;
#if defined(__F16C__) && (defined(__x86_64__) || defined(__i386__))
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<__m128i const*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = src[i].to_float();
}

/// Loads one batch of weights as floats: a plain load for float; bf16 and f16 values are widened in registers
/// (bf16: zero-extend, shift left by 16; f16: F16C's vcvtph2ps; both exact), so decode streams half the bytes
/// with no extra pass.
template <class Arch, class W>
inline xsimd::batch<float, Arch> load_weights(W const* p) noexcept {
  using batch = xsimd::batch<float, Arch>;
  if constexpr (std::is_same_v<W, float>) {
    return batch::load_unaligned(p);
  } else if constexpr (std::is_same_v<W, f16>) {
#if defined(__AVX512F__) && (defined(__x86_64__) || defined(__i386__))
    if constexpr (batch::size == 16)
      return batch(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<__m256i const*>(p))));
#endif
#if defined(__F16C__) && (defined(__x86_64__) || defined(__i386__))
    if constexpr (batch::size == 8) return batch(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<__m128i const*>(p))));
#endif
    alignas(64) float tmp[batch::size];
    widen_f16(p, tmp, static_cast<std::ptrdiff_t>(batch::size));
    return batch::load_aligned(tmp);
  } else {
    static_assert(std::is_same_v<W, bf16>, "CpuSimd: weights must be float, bf16 or f16");
#if defined(__AVX512F__) && (defined(__x86_64__) || defined(__i386__))
    if constexpr (batch::size == 16) {
      __m256i const h = _mm256_loadu_si256(reinterpret_cast<__m256i const*>(p));
      return batch(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
#endif
#if defined(__AVX2__) && (defined(__x86_64__) || defined(__i386__))
    if constexpr (batch::size == 8) {
      __m128i const h = _mm_loadu_si128(reinterpret_cast<__m128i const*>(p));
      return batch(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
#endif
    alignas(64) float tmp[batch::size];
    widen_bf16(p, tmp, static_cast<std::ptrdiff_t>(batch::size));
    return batch::load_aligned(tmp);
  }
}

/// out[t] = dot(w, v + t * v_stride) for t < NV, one pass over w: each weight batch is loaded once and used
/// for every vector (decode is bound by the weight stream). NV * U independent accumulators hide the FMA
/// latency. The summation order is fixed by n alone.
template <class Arch, int NV, class W>
inline void multi_dot_n(W const* FLLM_RESTRICT w, float const* FLLM_RESTRICT v, std::ptrdiff_t v_stride,
                        std::ptrdiff_t n, float* out) noexcept {
  using batch = xsimd::batch<float, Arch>;
  constexpr int U = NV == 1 ? 4 : 2;
  constexpr std::ptrdiff_t kW = static_cast<std::ptrdiff_t>(batch::size);
  batch acc[NV][U];
  for (int t = 0; t < NV; ++t)
    for (int u = 0; u < U; ++u) acc[t][u] = batch(0.f);
  std::ptrdiff_t k = 0;
  // Decode streams consecutive rows: the next row's bytes at the same offset are prefetched (the hardware prefetcher
  // alone leaves a core well short of its DRAM read rate on these kernels; see dispatch_kernels-inl.hpp).
  char const* next_row = reinterpret_cast<char const*>(w + n);
  for (; k + U * kW <= n; k += U * kW) {
    for (std::ptrdiff_t b = 0; b < static_cast<std::ptrdiff_t>(U * kW * sizeof(W)); b += 64)
      __builtin_prefetch(next_row + k * static_cast<std::ptrdiff_t>(sizeof(W)) + b);
    for (int u = 0; u < U; ++u) {
      batch const wk = load_weights<Arch>(w + k + u * kW);
      for (int t = 0; t < NV; ++t) acc[t][u] = xsimd::fma(wk, batch::load_unaligned(v + t * v_stride + k + u * kW), acc[t][u]);
    }
  }
  for (; k + kW <= n; k += kW) {
    batch const wk = load_weights<Arch>(w + k);
    for (int t = 0; t < NV; ++t) acc[t][0] = xsimd::fma(wk, batch::load_unaligned(v + t * v_stride + k), acc[t][0]);
  }
  for (int t = 0; t < NV; ++t) {
    batch sum = acc[t][0];
    for (int u = 1; u < U; ++u) sum += acc[t][u];
    float s = xsimd::hadd(sum);
    for (std::ptrdiff_t r = k; r < n; ++r) s += static_cast<float>(to_double(w[r])) * v[t * v_stride + r];
    out[t] = s;
  }
}

/// multi_dot_n for a run-time count of vectors, 1 <= n_vec <= 4.
template <class Arch, class W>
inline void multi_dot(W const* w, float const* v, std::ptrdiff_t v_stride, std::ptrdiff_t n_vec, std::ptrdiff_t n,
                      float* out) noexcept {
  switch (n_vec) {
    case 1: multi_dot_n<Arch, 1>(w, v, v_stride, n, out); break;
    case 2: multi_dot_n<Arch, 2>(w, v, v_stride, n, out); break;
    case 3: multi_dot_n<Arch, 3>(w, v, v_stride, n, out); break;
    default: multi_dot_n<Arch, 4>(w, v, v_stride, n, out); break;
  }
}

/// SiLU in float, written to stay finite for large |a| (exp of a non-positive argument only).
inline float silu_f(float a) noexcept {
  float const e = std::exp(-std::fabs(a));
  return a >= 0 ? a / (1.f + e) : a * e / (1.f + e);
}

}  // namespace detail
}  // namespace factorllm
