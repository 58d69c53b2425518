// SPDX-License-Identifier: Apache-2.0
// The CpuSimd backend tag and its building blocks: xsimd inner loops, bf16 widening, thread helpers.
//
// Why xsimd (not Highway) for the kernels: the ISA is a template parameter (xsimd::batch<float, Arch>), which
// fits a header-only library: the application instantiates CpuSimd<Arch> for the archs it compiles, and
// `dispatch` (backend/dispatch.hpp) picks the best one the CPU reports at run time. Highway's dynamic dispatch
// needs HWY_EXPORT tables in a .cc file that a header-only library cannot own (STYLE.md S2(d)).
// GEMMs (prefill) go through Eigen; threads through OpenMP (optional: without -fopenmp everything runs on
// one thread and gives the same bits).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <xsimd/xsimd.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "../../core/dtype.hpp"
#include "../tags.hpp"

namespace factorllm {

/// CPU SIMD backend for the xsimd architecture Arch (default: the best one this translation unit is
/// compiled for). Derives from CpuScalar: an op without a SIMD kernel falls back to the oracle.
template <class Arch = xsimd::default_arch>
struct CpuSimd : CpuScalar {
  using arch = Arch;
  static constexpr char const* name() noexcept { return "cpu_simd"; }
  static constexpr bool is_device = false;
  /// True when the running CPU supports Arch.
  static bool available() noexcept { return Arch::version() <= xsimd::available_architectures().best; }
};

namespace detail {

/// Threads an OpenMP region may use (1 without OpenMP).
inline int max_threads() noexcept {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}
inline int thread_id() noexcept {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

/// Widens n bf16 values to float (exact: a bf16 is the upper half of a float).
inline void widen_bf16(bf16 const* FLLM_RESTRICT src, float* FLLM_RESTRICT dst, std::ptrdiff_t n) noexcept {
  // Written as a plain shift loop: GCC vectorizes it to vpmovzxwd + vpslld at -O2 for any enabled ISA.
  auto const* s = reinterpret_cast<std::uint16_t const*>(src);
  auto* d = reinterpret_cast<std::uint32_t*>(dst);
  for (std::ptrdiff_t i = 0; i < n; ++i) d[i] = static_cast<std::uint32_t>(s[i]) << 16;
}

/// Returns a pointer to row data as float: the row itself for float weights, else widened into `buffer`.
template <class W>
inline float const* row_as_float(W const* row, std::ptrdiff_t n, float* buffer) noexcept {
  if constexpr (std::is_same_v<W, float>) {
    (void)n;
    (void)buffer;
    return row;
  } else {
    static_assert(std::is_same_v<W, bf16>, "CpuSimd: weights must be float or bf16");
    widen_bf16(row, buffer, n);
    return buffer;
  }
}

/// out[t] = dot(w, v + t * v_stride) for t < n_vec (n_vec <= 4), one pass over w: the weight row is loaded
/// once per SIMD step and reused for every vector (decode is bound by the weight stream).
template <class Arch>
inline void multi_dot(float const* FLLM_RESTRICT w, float const* FLLM_RESTRICT v, std::ptrdiff_t v_stride,
                      std::ptrdiff_t n_vec, std::ptrdiff_t n, float* out) noexcept {
  using batch = xsimd::batch<float, Arch>;
  constexpr std::ptrdiff_t kW = static_cast<std::ptrdiff_t>(batch::size);
  std::ptrdiff_t const n_main = n - n % kW;
  batch acc0(0.f), acc1(0.f), acc2(0.f), acc3(0.f);
  for (std::ptrdiff_t k = 0; k < n_main; k += kW) {
    batch const wk = batch::load_unaligned(w + k);
    acc0 = xsimd::fma(wk, batch::load_unaligned(v + k), acc0);
    if (n_vec > 1) acc1 = xsimd::fma(wk, batch::load_unaligned(v + v_stride + k), acc1);
    if (n_vec > 2) acc2 = xsimd::fma(wk, batch::load_unaligned(v + 2 * v_stride + k), acc2);
    if (n_vec > 3) acc3 = xsimd::fma(wk, batch::load_unaligned(v + 3 * v_stride + k), acc3);
  }
  batch const accs[4] = {acc0, acc1, acc2, acc3};
  for (std::ptrdiff_t t = 0; t < n_vec; ++t) {
    float s = xsimd::hadd(accs[t]);
    for (std::ptrdiff_t k = n_main; k < n; ++k) s += w[k] * v[t * v_stride + k];
    out[t] = s;
  }
}

/// SiLU in float, written to stay finite for large |a| (exp of a non-positive argument only).
inline float silu_f(float a) noexcept {
  float const e = std::exp(-std::fabs(a));
  return a >= 0 ? a / (1.f + e) : a * e / (1.f + e);
}

}  // namespace detail
}  // namespace factorllm
