// SPDX-License-Identifier: Apache-2.0
// Run-time target dispatch for the CpuSimd decode kernels of the block-quantized and bf16 formats, through Google
// Highway (docs/design.md §8): one binary runs the best kernel the CPU has (AVX3_DL with AVX-512 VNNI and, where
// present, AVX512-BF16; AVX3; AVX2; SSE4; NEON; SVE; a portable fallback), with no -march flag.
//
// How it is instantiated (the library stays header-only): every translation unit that includes this header compiles
// dispatch_kernels-inl.hpp once per Highway target (foreach_target.h) and owns a private dispatch table
// (HWY_EXPORT, internal linkage). Highway chooses the target once per process (hwy::GetChosenTarget(), shared by
// every table), on the first call. The cost is compile time in those translation units, not a library to build.
// The program links Highway's small runtime (libhwy: target detection), which the CMake target factorllm::factorllm
// brings in. Which targets are compiled follows Highway's policy: the translation unit's baseline (its -march) and
// every better one; FLLM_DISPATCH_ALL_TARGETS (defined before the first include) compiles every attainable target,
// the lesser ones included, so that tests can run each of them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#endif

#include "../../config.hpp"
#include "../../core/dtype.hpp"
#include "../../core/quant.hpp"

#ifndef HWY_WANT_AVX3_DL
#define HWY_WANT_AVX3_DL  // Highway 1.0 compiles AVX3_DL (AVX-512 VNNI and friends) only on request
#endif
#if defined(FLLM_DISPATCH_ALL_TARGETS) && !defined(HWY_COMPILE_ALL_ATTAINABLE)
#define HWY_COMPILE_ALL_ATTAINABLE
#endif

namespace factorllm {
namespace detail {

/// Activation vectors one dispatched call handles (the decode kernels' kGemvMaxRows).
inline constexpr std::ptrdiff_t kQDotMaxVectors = 8;

enum class QDotFormat : int { q8_0, q4_0 };

/// qdot_rows: out[r * out_stride + t] = sum_b d_w(r, b) * xs[t][b] * sum_i w(r, b, i) * xq[t][32 b + i] for rows r <
/// `rows` of a block-quantized matrix in ggml's layout and t < n_vec activation vectors (quant_dot.hpp's
/// quantize_act_q8 makes xq, xs and xsum).
struct QDotArgs {
  void const* w = nullptr;           // row 0's first block; rows follow each other (row_blocks blocks a row)
  std::ptrdiff_t row_blocks = 0;     // blocks a row: n / 32
  std::ptrdiff_t rows = 0;
  std::int8_t const* xq = nullptr;   // [n_vec, n] activation codes
  float const* xs = nullptr;         // [n_vec, n / 32] activation block scales
  std::int32_t const* xsum = nullptr;  // [n_vec, n / 32] sums of each block's activation codes
  std::ptrdiff_t n_vec = 0;          // 1 .. kQDotMaxVectors
  float* out = nullptr;
  std::ptrdiff_t out_stride = 0;
  QDotFormat format = QDotFormat::q8_0;
};

/// bf16_dot_rows: out[r * out_stride + t] = dot(w row r, xb row t) for rows r < `rows` of [rows, n] bf16 weights
/// and t < n_vec activation vectors already rounded to bf16.
struct Bf16DotArgs {
  bf16 const* w = nullptr;
  std::ptrdiff_t n = 0;
  std::ptrdiff_t rows = 0;
  bf16 const* xb = nullptr;  // [n_vec, n]
  std::ptrdiff_t n_vec = 0;
  float* out = nullptr;
  std::ptrdiff_t out_stride = 0;
};

/// The dot instructions whose peak dot_peak_loop measures: int8 products (vpdpbusd on AVX3_DL, vpmaddubsw +
/// vpmaddwd on AVX2 / AVX3), bf16 pairs (vdpbf16ps), float FMA at the target's vector width.
enum class DotInstruction : int { int8_dot, bf16_dot, f32_fma };

/// True when the CPU and OS support AVX512-BF16 (cpuid leaf 7 sub-leaf 1, EAX bit 5, and ZMM state saved); false
/// off x86. Queried once.
inline bool cpu_has_avx512_bf16() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  static bool const has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u)) return false;  // OSXSAVE
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0xE6u) != 0xE6u) return false;  // XMM, YMM, opmask, ZMM state
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((b >> 16) & 1u)) return false;  // AVX512F
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    return ((a >> 5) & 1u) != 0;
  }();
  return has;
#else
  return false;
#endif
}

}  // namespace detail
}  // namespace factorllm

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "factorllm/backend/simd/dispatch_kernels-inl.hpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "dispatch_kernels-inl.hpp"

#if HWY_ONCE
namespace factorllm {
namespace detail {
namespace {
HWY_EXPORT(qdot_rows);
HWY_EXPORT(bf16_dot_rows);
HWY_EXPORT(bf16_native_dot);
HWY_EXPORT(dispatch_target_name);
HWY_EXPORT(dot_peak_loop);
HWY_EXPORT(dequantize_blocks);
}  // namespace

/// Runs the q8_0 / q4_0 decode kernel of the chosen target (see QDotArgs).
inline void qdot_rows_dispatch(QDotArgs const& args) {
  FLLM_ASSERT(args.n_vec >= 1 && args.n_vec <= kQDotMaxVectors);
  HWY_DYNAMIC_DISPATCH(qdot_rows)(args);
}

/// Runs the native bf16 kernel and returns true, or returns false (nothing written) when the chosen target has none.
inline bool bf16_dot_rows_dispatch(Bf16DotArgs const& args) {
  FLLM_ASSERT(args.n_vec >= 1 && args.n_vec <= kQDotMaxVectors);
  return HWY_DYNAMIC_DISPATCH(bf16_dot_rows)(args);
}

/// True when the chosen target multiplies bf16 natively (the activations are then rounded to bf16 first).
inline bool bf16_native_dot_dispatch() { return HWY_DYNAMIC_DISPATCH(bf16_native_dot)(); }

/// The chosen target's name. (HWY_DYNAMIC_DISPATCH takes an unqualified name: with a single compiled target it
/// becomes N_<target>::name, so every call sits in this namespace.)
inline char const* dispatch_target_name_dispatch() { return HWY_DYNAMIC_DISPATCH(dispatch_target_name)(); }

/// Dequantizes n_blocks consecutive q8_0 / q4_0 blocks to float (32 each) on the chosen target.
inline void dequantize_blocks_dispatch(void const* w, QDotFormat format, std::ptrdiff_t n_blocks, float* out) {
  HWY_DYNAMIC_DISPATCH(dequantize_blocks)(w, format, n_blocks, out);
}

/// Runs the chosen target's register-only loop of `kind` (`iterations` rounds) and returns the multiply-adds done,
/// 0 when the target has no such instruction.
inline std::int64_t dot_peak_loop_dispatch(DotInstruction kind, std::int64_t iterations) {
  return HWY_DYNAMIC_DISPATCH(dot_peak_loop)(kind, iterations);
}

}  // namespace detail

/// The Highway target the CpuSimd decode kernels run on now ("AVX3_DL", "AVX2", "NEON", ...).
inline std::string simd_dispatch_target() { return detail::dispatch_target_name_dispatch(); }

/// The targets compiled into this translation unit that the CPU supports, best first (Highway's bit values, for
/// force_simd_dispatch_target).
inline std::vector<std::int64_t> simd_dispatch_targets() { return hwy::SupportedAndGeneratedTargets(); }

/// Makes the decode kernels run on `target` (one of simd_dispatch_targets()), process-wide; 0 returns to the best
/// target the CPU has. For tests and for comparing targets; not thread safe against running kernels.
inline void force_simd_dispatch_target(std::int64_t target) {
  hwy::SetSupportedTargetsForTest(target);
  hwy::GetChosenTarget().Update(hwy::SupportedTargets());
}

}  // namespace factorllm
#endif  // HWY_ONCE
