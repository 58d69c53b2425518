// SPDX-License-Identifier: Apache-2.0
// Per-target decode kernels of the CpuSimd backend, compiled once for every Highway target by
// backend/simd/target_dispatch.hpp (foreach_target.h re-includes this file with HWY_TARGET set; no #pragma once).
// Include target_dispatch.hpp, never this file (docs/design.md §8).
//
// What each target runs (the arguments are the plain structs of target_dispatch.hpp):
//   qdot_rows   q8_0 / q4_0 weight rows against activations quantized per block of 32 (quant_dot.hpp states the
//               rounding). AVX3_DL (AVX-512 VNNI): four rows per pass, one `vpdpbusd` per 64 (q4_0) or 32 (q8_0)
//               codes and row, block scales converted four at a time; AVX2 and AVX3: `vpsignb` + `vpmaddubsw` +
//               `vpmaddwd` a row at a time; every other target (SSE4, NEON, SVE, EMU128): widened integer products
//               written with Highway ops. Each block's integer sum is exact on every target; it is scaled by
//               d_w * d_x and accumulated in float in block order, so a row's result depends on n alone.
//   bf16_dot_rows  bf16 weight rows against activations rounded to bf16, with AVX512-BF16 `vdpbf16ps` (AVX3 and
//               AVX3_DL targets on a CPU that has it); returns false elsewhere and the caller widens instead.
//   dot_peak_loop  a register-only loop of a dot instruction, for the benchmarks' peak figures.
//
// Instructions Highway 1.0 does not wrap (vpdpbusd on 512 bits, vdpbf16ps) are intrinsics inside functions whose
// target attribute adds the feature to the Highway target's own; the x86 paths run only when Highway chose
// that target, i.e. the CPU has it (bf16 is also checked with cpuid, as no Highway 1.0 target implies it).
// Everything here has internal linkage: each translation unit owns its copy, so translation units compiled with
// different -march flags never share a definition.

#if defined(FLLM_BACKEND_SIMD_DISPATCH_KERNELS_INL_) == defined(HWY_TARGET_TOGGLE)
#ifdef FLLM_BACKEND_SIMD_DISPATCH_KERNELS_INL_
#undef FLLM_BACKEND_SIMD_DISPATCH_KERNELS_INL_
#else
#define FLLM_BACKEND_SIMD_DISPATCH_KERNELS_INL_
#endif

#include <hwy/highway.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

// GCC 12 reports -Wuninitialized and -Wmaybe-uninitialized inside its own AVX-512 intrinsics (the
// _mm*_undefined_* operands of _mm512_reduce_add_*, the casts and the broadcasts) once they are inlined here: false
// positives, silenced for this code only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
HWY_BEFORE_NAMESPACE();
namespace factorllm {
namespace detail {
namespace HWY_NAMESPACE {
namespace {

namespace hn = hwy::HWY_NAMESPACE;

/// The f16 scale stored in the first two bytes of a block, as raw bits.
inline std::uint16_t block_scale_bits(std::uint8_t const* block) {
  std::uint16_t h;
  std::memcpy(&h, block, 2);
  return h;
}

/// The running target's name ("AVX3_DL", "NEON", ...).
char const* dispatch_target_name() { return hwy::TargetName(HWY_TARGET); }

#if HWY_TARGET == HWY_AVX3_DL

/// Prefetches the next group of four rows (the bytes after this group's last row), spread over this group's blocks:
/// at block b, the next group's bytes [b, b + 1) x 4 blocks. The hardware prefetcher alone left a core at about half
/// of its DRAM read rate on these kernels (measured: q8_0 8.2 GB/s, q4_0 7.2 GB/s against 14 GB/s for a plain
/// AVX-512 read loop on one core).
template <std::ptrdiff_t kBlock>
HWY_INLINE void prefetch_next_group(std::uint8_t const* next, std::ptrdiff_t b) {
  std::uint8_t const* p = next + b * 4 * kBlock;
  for (std::ptrdiff_t k = 0; k < 4 * kBlock + 64; k += 64) _mm_prefetch(reinterpret_cast<char const*>(p + k), _MM_HINT_T0);
}

/// The f16 scales of block `off` of the four rows, packed in one general register (one move into a vector
/// afterwards, instead of a shuffle per scale).
inline std::uint64_t packed_scales(std::uint8_t const* const* wr, std::ptrdiff_t off) {
  return std::uint64_t{block_scale_bits(wr[0] + off)} | std::uint64_t{block_scale_bits(wr[1] + off)} << 16 |
         std::uint64_t{block_scale_bits(wr[2] + off)} << 32 | std::uint64_t{block_scale_bits(wr[3] + off)} << 48;
}

/// Four rows of q4_0 per pass (see the file comment). Lanes 4j..4j+3 of an accumulator hold row j's partial sums;
/// `vpdpbusd` multiplies the unsigned nibble codes u = w + 8 by the signed activation codes, and the accumulator
/// of each block starts at -8 * sum(x codes) (precomputed per block), so the block's integer sum is sum(w * x).
template <int NV>
__attribute__((target(HWY_TARGET_STR ",avx512vnni"))) void qdot_rows_q4_avx512(QDotArgs const& a) {
  constexpr std::ptrdiff_t kBlock = 18;
  constexpr std::ptrdiff_t nv = NV;
  std::ptrdiff_t const nb = a.row_blocks, row_bytes = nb * kBlock;
  auto const* base = static_cast<std::uint8_t const*>(a.w);
  __m512i const low4 = _mm512_set1_epi8(0x0F);
  __m512i const spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  for (std::ptrdiff_t r0 = 0; r0 < a.rows; r0 += 4) {
    std::uint8_t const* wr[4];
    for (int j = 0; j < 4; ++j) wr[j] = base + std::min(r0 + j, a.rows - 1) * row_bytes;
    std::uint8_t const* const next = r0 + 8 <= a.rows ? base + (r0 + 4) * row_bytes : nullptr;
    __m512 acc[NV];
    for (std::ptrdiff_t t = 0; t < nv; ++t) acc[t] = _mm512_setzero_ps();
    for (std::ptrdiff_t b = 0; b < nb; ++b) {
      std::ptrdiff_t const off = b * kBlock;
      if (next) prefetch_next_group<kBlock>(next, b);
      // Row j's 16 code bytes into 128-bit lane j: masked broadcast loads (a load and a blend each, no shuffle).
      __m512i raw = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<__m128i const*>(wr[0] + off + 2)));
      raw = _mm512_mask_broadcast_i32x4(raw, 0x00F0, _mm_loadu_si128(reinterpret_cast<__m128i const*>(wr[1] + off + 2)));
      raw = _mm512_mask_broadcast_i32x4(raw, 0x0F00, _mm_loadu_si128(reinterpret_cast<__m128i const*>(wr[2] + off + 2)));
      raw = _mm512_mask_broadcast_i32x4(raw, 0xF000, _mm_loadu_si128(reinterpret_cast<__m128i const*>(wr[3] + off + 2)));
      __m512i const lo = _mm512_and_si512(raw, low4);                         // weights 0..15 of each row
      __m512i const hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);   // weights 16..31
      __m512 const dw =
          _mm512_permutexvar_ps(spread, _mm512_zextps128_ps512(_mm_cvtph_ps(_mm_cvtsi64_si128(static_cast<long long>(packed_scales(wr, off))))));
      for (std::ptrdiff_t t = 0; t < nv; ++t) {
        std::int8_t const* x = a.xq + t * nb * 32 + b * 32;
        __m512i const xlo = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<__m128i const*>(x)));
        __m512i const xhi = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<__m128i const*>(x + 16)));
        __m512i d = _mm512_maskz_set1_epi32(0x1111, -8 * a.xsum[t * nb + b]);
        d = _mm512_dpbusd_epi32(d, lo, xlo);
        d = _mm512_dpbusd_epi32(d, hi, xhi);
        __m512 const scale = _mm512_mul_ps(dw, _mm512_set1_ps(a.xs[t * nb + b]));
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, acc[t]);
      }
    }
    for (std::ptrdiff_t t = 0; t < nv; ++t) {
      // Sum each 128-bit lane (one row): pairs, then pairs of pairs.
      __m512 s = _mm512_add_ps(acc[t], _mm512_shuffle_ps(acc[t], acc[t], _MM_SHUFFLE(2, 3, 0, 1)));
      s = _mm512_add_ps(s, _mm512_shuffle_ps(s, s, _MM_SHUFFLE(1, 0, 3, 2)));
      float lanes[16];
      _mm512_storeu_ps(lanes, s);
      for (std::ptrdiff_t j = 0; j < 4 && r0 + j < a.rows; ++j) a.out[(r0 + j) * a.out_stride + t] = lanes[4 * j];
    }
  }
}

/// Four rows of q8_0 per pass, two rows a register. `vpdpbusd` takes the activation codes offset to unsigned
/// (x + 128, a sign-bit flip) against the signed weight codes; the accumulator starts at -128 * sum(w codes),
/// computed once per block and row by a `vpdpbusd` of the constant 128, so the integer sum is sum(w * x).
template <int NV>
__attribute__((target(HWY_TARGET_STR ",avx512vnni"))) void qdot_rows_q8_avx512(QDotArgs const& a) {
  constexpr std::ptrdiff_t kBlock = 34;
  constexpr std::ptrdiff_t nv = NV;
  std::ptrdiff_t const nb = a.row_blocks, row_bytes = nb * kBlock;
  auto const* base = static_cast<std::uint8_t const*>(a.w);
  __m512i const bias = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i const spread01 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512i const spread23 = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
  for (std::ptrdiff_t r0 = 0; r0 < a.rows; r0 += 4) {
    std::uint8_t const* wr[4];
    for (int j = 0; j < 4; ++j) wr[j] = base + std::min(r0 + j, a.rows - 1) * row_bytes;
    std::uint8_t const* const next = r0 + 8 <= a.rows ? base + (r0 + 4) * row_bytes : nullptr;
    __m512 acc01[NV], acc23[NV];
    for (std::ptrdiff_t t = 0; t < nv; ++t) acc01[t] = acc23[t] = _mm512_setzero_ps();
    for (std::ptrdiff_t b = 0; b < nb; ++b) {
      std::ptrdiff_t const off = b * kBlock;
      if (next) prefetch_next_group<kBlock>(next, b);
      auto load256 = [&](int j) { return _mm256_loadu_si256(reinterpret_cast<__m256i const*>(wr[j] + off + 2)); };
      // Two rows a register through masked broadcast loads (a load and a blend each, no shuffle).
      __m512i const w01 = _mm512_mask_broadcast_i64x4(_mm512_broadcast_i64x4(load256(0)), 0xF0, load256(1));
      __m512i const w23 = _mm512_mask_broadcast_i64x4(_mm512_broadcast_i64x4(load256(2)), 0xF0, load256(3));
      __m512i const n01 = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, w01));
      __m512i const n23 = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, w23));
      __m512 const s4 = _mm512_zextps128_ps512(_mm_cvtph_ps(_mm_cvtsi64_si128(static_cast<long long>(packed_scales(wr, off)))));
      __m512 const dw01 = _mm512_permutexvar_ps(spread01, s4), dw23 = _mm512_permutexvar_ps(spread23, s4);
      for (std::ptrdiff_t t = 0; t < nv; ++t) {
        std::int8_t const* x = a.xq + t * nb * 32 + b * 32;
        __m512i const xu =
            _mm512_xor_si512(_mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<__m256i const*>(x))), bias);
        __m512 const sx = _mm512_set1_ps(a.xs[t * nb + b]);
        acc01[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(n01, xu, w01)), _mm512_mul_ps(dw01, sx), acc01[t]);
        acc23[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(n23, xu, w23)), _mm512_mul_ps(dw23, sx), acc23[t]);
      }
    }
    for (std::ptrdiff_t t = 0; t < nv; ++t) {
      // Sum each 256-bit half (one row): halves of halves, then pairs.
      auto row_sums = [](__m512 v, float* two) {
        __m512 s = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));  // 128-bit lanes 0+1, 2+3
        s = _mm512_add_ps(s, _mm512_shuffle_ps(s, s, _MM_SHUFFLE(1, 0, 3, 2)));
        s = _mm512_add_ps(s, _mm512_shuffle_ps(s, s, _MM_SHUFFLE(2, 3, 0, 1)));
        float lanes[16];
        _mm512_storeu_ps(lanes, s);
        two[0] = lanes[0];
        two[1] = lanes[8];
      };
      float sums[4];
      row_sums(acc01[t], sums);
      row_sums(acc23[t], sums + 2);
      for (std::ptrdiff_t j = 0; j < 4 && r0 + j < a.rows; ++j) a.out[(r0 + j) * a.out_stride + t] = sums[j];
    }
  }
}

/// dot_peak_loop's vpdpbusd loop (see there).
__attribute__((target(HWY_TARGET_STR ",avx512vnni"))) std::int64_t dot_peak_vpdpbusd(std::int64_t iterations) {
  __m512i acc[12];
  for (auto& v : acc) v = _mm512_setzero_si512();
  __m512i const u = _mm512_set1_epi8(1), w = _mm512_set1_epi8(2);
  for (std::int64_t i = 0; i < iterations; ++i)
    for (auto& v : acc) v = _mm512_dpbusd_epi32(v, u, w);
  __m512i sum = acc[0];
  for (int j = 1; j < 12; ++j) sum = _mm512_add_epi32(sum, acc[j]);
  volatile int sink = _mm512_reduce_add_epi32(sum);
  (void)sink;
  return iterations * 12 * 64;
}

#endif  // HWY_TARGET == HWY_AVX3_DL

#if HWY_TARGET == HWY_AVX2 || HWY_TARGET == HWY_AVX3

/// One row at a time with AVX2: |w| (unsigned) times x with w's sign, `vpmaddubsw` then `vpmaddwd` into 8 lanes.
template <class Block, int NV>
void qdot_rows_avx2(QDotArgs const& a) {
  constexpr std::ptrdiff_t nv = NV;
  std::ptrdiff_t const nb = a.row_blocks;
  auto const* rows = static_cast<Block const*>(a.w);
  __m256i const ones16 = _mm256_set1_epi16(1);
  for (std::ptrdiff_t r = 0; r < a.rows; ++r) {
    Block const* w = rows + r * nb;
    __m256 acc[NV];
    for (std::ptrdiff_t t = 0; t < nv; ++t) acc[t] = _mm256_setzero_ps();
    for (std::ptrdiff_t b = 0; b < nb; ++b) {
      __m256i wq;
      if constexpr (sizeof(Block) == 34) {
        wq = _mm256_loadu_si256(reinterpret_cast<__m256i const*>(w[b].qs));
      } else {
        __m128i const raw = _mm_loadu_si128(reinterpret_cast<__m128i const*>(w[b].qs));
        __m256i const both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);  // low nibbles: weights 0-15
        wq = _mm256_sub_epi8(_mm256_and_si256(both, _mm256_set1_epi8(0x0F)), _mm256_set1_epi8(8));
      }
      __m256i const aw = _mm256_sign_epi8(wq, wq);
      float const dw = _cvtsh_ss(w[b].d.bits);
      for (std::ptrdiff_t t = 0; t < nv; ++t) {
        __m256i const xq = _mm256_loadu_si256(reinterpret_cast<__m256i const*>(a.xq + t * nb * 32 + b * 32));
        __m256i const prod = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xq, wq)), ones16);
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(prod), _mm256_set1_ps(dw * a.xs[t * nb + b]), acc[t]);
      }
    }
    for (std::ptrdiff_t t = 0; t < nv; ++t) {
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_movehdup_ps(s));
      a.out[r * a.out_stride + t] = _mm_cvtss_f32(s);
    }
  }
}

#endif  // HWY_TARGET == HWY_AVX2 || HWY_TARGET == HWY_AVX3

/// Portable path: each block's codes widened to int32 and multiplied with Highway ops (at most 8 lanes at a time,
/// so that 32 codes take whole steps on every vector length).
template <class Block>
void qdot_rows_portable(QDotArgs const& a) {
  hn::CappedTag<std::int32_t, 8> const d32;
  hn::Rebind<std::int8_t, decltype(d32)> const d8;
  std::ptrdiff_t const step = static_cast<std::ptrdiff_t>(hn::Lanes(d32));
  std::ptrdiff_t const nb = a.row_blocks, nv = a.n_vec;
  auto const* rows = static_cast<Block const*>(a.w);
  for (std::ptrdiff_t r = 0; r < a.rows; ++r) {
    Block const* w = rows + r * nb;
    float acc[kQDotMaxVectors] = {};
    for (std::ptrdiff_t b = 0; b < nb; ++b) {
      HWY_ALIGN std::int8_t codes[32];
      for (int i = 0; i < 32; ++i) codes[i] = static_cast<std::int8_t>(block_quant(w[b], i));
      float const dw = w[b].d.to_float();
      for (std::ptrdiff_t t = 0; t < nv; ++t) {
        std::int8_t const* x = a.xq + t * nb * 32 + b * 32;
        auto sum = hn::Zero(d32);
        for (std::ptrdiff_t k = 0; k < 32; k += step)
          sum = hn::Add(sum, hn::Mul(hn::PromoteTo(d32, hn::LoadU(d8, codes + k)), hn::PromoteTo(d32, hn::LoadU(d8, x + k))));
        acc[t] += static_cast<float>(hn::GetLane(hn::SumOfLanes(d32, sum))) * (dw * a.xs[t * nb + b]);
      }
    }
    for (std::ptrdiff_t t = 0; t < nv; ++t) a.out[r * a.out_stride + t] = acc[t];
  }
}

/// Calls kernel.template run<NV>() for NV = n_vec (1..kQDotMaxVectors): the vector count is a compile-time constant
/// inside the kernels, so their accumulators stay in registers (with a run-time count they went through the stack:
/// measured 40% slower per call).
template <class Kernel>
HWY_INLINE void with_vector_count(std::ptrdiff_t n_vec, Kernel const& kernel) {
  switch (n_vec) {
    case 1: kernel.template run<1>(); break;
    case 2: kernel.template run<2>(); break;
    case 3: kernel.template run<3>(); break;
    case 4: kernel.template run<4>(); break;
    case 5: kernel.template run<5>(); break;
    case 6: kernel.template run<6>(); break;
    case 7: kernel.template run<7>(); break;
    default: kernel.template run<8>(); break;
  }
}

/// qdot_rows's kernel for this target, by vector count.
struct QDotKernel {
  QDotArgs const& a;
  template <int NV>
  void run() const {
#if HWY_TARGET == HWY_AVX3_DL
    if (a.format == QDotFormat::q8_0) qdot_rows_q8_avx512<NV>(a);
    else qdot_rows_q4_avx512<NV>(a);
#elif HWY_TARGET == HWY_AVX2 || HWY_TARGET == HWY_AVX3
    if (a.format == QDotFormat::q8_0) qdot_rows_avx2<q8_0, NV>(a);
    else qdot_rows_avx2<q4_0, NV>(a);
#else
    if (a.format == QDotFormat::q8_0) qdot_rows_portable<q8_0>(a);
    else qdot_rows_portable<q4_0>(a);
#endif
  }
};

void qdot_rows(QDotArgs const& a) {
  if (a.rows <= 0) return;
#if HWY_TARGET == HWY_AVX3_DL || HWY_TARGET == HWY_AVX2 || HWY_TARGET == HWY_AVX3
  with_vector_count(a.n_vec, QDotKernel{a});
#else
  QDotKernel{a}.run<1>();  // the portable kernel takes the count at run time
#endif
}

#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL

/// Rows of bf16 weights against bf16 activations with `vdpbf16ps` (pairs of products summed into float lanes; the
/// instruction flushes subnormal inputs to zero). Two accumulators a vector (four for one vector) hide its latency.
template <int NV>
__attribute__((target(HWY_TARGET_STR ",avx512bf16"))) void bf16_dot_rows_native(Bf16DotArgs const& a) {
  constexpr std::ptrdiff_t nv = NV;
  std::ptrdiff_t const n = a.n;
  std::ptrdiff_t const full = n / 64 * 64;
  __mmask32 const tail_mask = static_cast<__mmask32>((std::uint64_t{1} << (n % 32)) - 1);
  for (std::ptrdiff_t r = 0; r < a.rows; ++r) {
    auto const* w = reinterpret_cast<std::uint16_t const*>(a.w) + r * n;
    __m512 acc[NV][2];
    for (std::ptrdiff_t t = 0; t < nv; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    auto x_at = [&](std::ptrdiff_t t, std::ptrdiff_t k) {
      return reinterpret_cast<std::uint16_t const*>(a.xb) + t * n + k;
    };
    // The next row, prefetched over this one's iterations (rows are contiguous; see prefetch_next_group).
    auto const* next = r + 1 < a.rows ? reinterpret_cast<char const*>(w + n) : nullptr;
    std::ptrdiff_t k = 0;
    for (; k < full; k += 64) {
      if (next) {
        _mm_prefetch(next + 2 * k, _MM_HINT_T0);
        _mm_prefetch(next + 2 * k + 64, _MM_HINT_T0);
      }
      __m512bh const w0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + k));
      __m512bh const w1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + k + 32));
      for (std::ptrdiff_t t = 0; t < nv; ++t) {
        acc[t][0] = _mm512_dpbf16_ps(acc[t][0], w0, reinterpret_cast<__m512bh>(_mm512_loadu_si512(x_at(t, k))));
        acc[t][1] = _mm512_dpbf16_ps(acc[t][1], w1, reinterpret_cast<__m512bh>(_mm512_loadu_si512(x_at(t, k + 32))));
      }
    }
    for (; k + 32 <= n; k += 32) {
      __m512bh const w0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + k));
      for (std::ptrdiff_t t = 0; t < nv; ++t)
        acc[t][0] = _mm512_dpbf16_ps(acc[t][0], w0, reinterpret_cast<__m512bh>(_mm512_loadu_si512(x_at(t, k))));
    }
    if (k < n) {  // masked loads read nothing past the row
      __m512bh const w0 = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(tail_mask, w + k));
      for (std::ptrdiff_t t = 0; t < nv; ++t)
        acc[t][1] = _mm512_dpbf16_ps(acc[t][1], w0, reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(tail_mask, x_at(t, k))));
    }
    for (std::ptrdiff_t t = 0; t < nv; ++t)
      a.out[r * a.out_stride + t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
  }
}

/// dot_peak_loop's vdpbf16ps loop (see there).
__attribute__((target(HWY_TARGET_STR ",avx512bf16"))) std::int64_t dot_peak_vdpbf16ps(std::int64_t iterations) {
  __m512 acc[12];
  for (auto& v : acc) v = _mm512_setzero_ps();
  __m512bh const u = reinterpret_cast<__m512bh>(_mm512_set1_epi16(0x3f80)), w = u;  // 1.0 in bf16
  for (std::int64_t i = 0; i < iterations; ++i)
    for (auto& v : acc) v = _mm512_dpbf16_ps(v, u, w);
  __m512 sum = acc[0];
  for (int j = 1; j < 12; ++j) sum = _mm512_add_ps(sum, acc[j]);
  volatile float sink = _mm512_reduce_add_ps(sum);
  (void)sink;
  return iterations * 12 * 32;
}

#endif  // HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL

#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
/// bf16_dot_rows's native kernel, by vector count.
struct Bf16Kernel {
  Bf16DotArgs const& a;
  template <int NV>
  void run() const {
    bf16_dot_rows_native<NV>(a);
  }
};
#endif

/// True when this target runs bf16 dot products natively on this CPU (bf16_dot_rows then returns true).
bool bf16_native_dot() {
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
  return cpu_has_avx512_bf16();
#else
  return false;
#endif
}

bool bf16_dot_rows(Bf16DotArgs const& a) {
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
  if (!cpu_has_avx512_bf16()) return false;
  if (a.rows > 0) with_vector_count(a.n_vec, Bf16Kernel{a});
  return true;
#else
  (void)a;
  return false;
#endif
}

/// Dequantizes n_blocks blocks of q8_0 or q4_0 (ggml's layout, consecutive) to 32 floats each: d * code, exact in
/// float, so the same values as core/quant.hpp's dequantize_row. The prefill path's panels.
template <class Block>
void dequantize_blocks_impl(Block const* HWY_RESTRICT w, std::ptrdiff_t n_blocks, float* HWY_RESTRICT out) {
  hn::CappedTag<float, 16> const df;
  hn::Rebind<std::int32_t, decltype(df)> const d32;
  hn::Rebind<std::int8_t, decltype(df)> const d8;
  std::ptrdiff_t const step = static_cast<std::ptrdiff_t>(hn::Lanes(df));
  for (std::ptrdiff_t b = 0; b < n_blocks; ++b) {
    HWY_ALIGN std::int8_t codes[32];
    if constexpr (sizeof(Block) == 34) {
      std::memcpy(codes, w[b].qs, 32);
    } else {
      for (int i = 0; i < 16; ++i) {  // ggml's nibble order: low nibbles are weights 0..15
        codes[i] = static_cast<std::int8_t>((w[b].qs[i] & 0x0F) - 8);
        codes[i + 16] = static_cast<std::int8_t>((w[b].qs[i] >> 4) - 8);
      }
    }
    auto const scale = hn::Set(df, w[b].d.to_float());
    for (std::ptrdiff_t k = 0; k < 32; k += step)
      hn::StoreU(hn::Mul(hn::ConvertTo(df, hn::PromoteTo(d32, hn::LoadU(d8, codes + k))), scale), df, out + b * 32 + k);
  }
}

void dequantize_blocks(void const* w, QDotFormat format, std::ptrdiff_t n_blocks, float* out) {
  if (format == QDotFormat::q8_0)
    dequantize_blocks_impl(static_cast<q8_0 const*>(w), n_blocks, out);
  else
    dequantize_blocks_impl(static_cast<q4_0 const*>(w), n_blocks, out);
}

/// Register-only loop of `kind` for `iterations` rounds of 12 independent accumulators; returns the multiply-adds
/// done (0 when this target or CPU has no such instruction). The benchmarks time it for the peak their kernels'
/// dot instruction can reach (bench_moe_ffn's dot_peak_fraction).
std::int64_t dot_peak_loop(DotInstruction kind, std::int64_t iterations) {
  constexpr int kAcc = 12;
  if (kind == DotInstruction::f32_fma) {
    // Named accumulators, not an array: SVE vectors are sizeless and cannot be array elements.
    hn::ScalableTag<float> const df;
    auto const u = hn::Set(df, 1.0001f), w = hn::Set(df, 0.9999f);
    auto a0 = hn::Zero(df), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0,
         a10 = a0, a11 = a0;
    for (std::int64_t i = 0; i < iterations; ++i) {
      a0 = hn::MulAdd(u, w, a0), a1 = hn::MulAdd(u, w, a1), a2 = hn::MulAdd(u, w, a2), a3 = hn::MulAdd(u, w, a3);
      a4 = hn::MulAdd(u, w, a4), a5 = hn::MulAdd(u, w, a5), a6 = hn::MulAdd(u, w, a6), a7 = hn::MulAdd(u, w, a7);
      a8 = hn::MulAdd(u, w, a8), a9 = hn::MulAdd(u, w, a9), a10 = hn::MulAdd(u, w, a10), a11 = hn::MulAdd(u, w, a11);
    }
    auto const sum = hn::Add(hn::Add(hn::Add(hn::Add(a0, a1), hn::Add(a2, a3)), hn::Add(hn::Add(a4, a5), hn::Add(a6, a7))),
                             hn::Add(hn::Add(a8, a9), hn::Add(a10, a11)));
    volatile float sink = hn::GetLane(sum);
    (void)sink;
    return iterations * kAcc * static_cast<std::int64_t>(hn::Lanes(df));
  }
#if HWY_TARGET == HWY_AVX3_DL
  if (kind == DotInstruction::int8_dot) return dot_peak_vpdpbusd(iterations);
#endif
#if HWY_TARGET == HWY_AVX2 || HWY_TARGET == HWY_AVX3
  if (kind == DotInstruction::int8_dot) {
    __m256i acc[kAcc];
    for (auto& v : acc) v = _mm256_setzero_si256();
    __m256i const u = _mm256_set1_epi8(1), w = _mm256_set1_epi8(2), one = _mm256_set1_epi16(1);
    for (std::int64_t i = 0; i < iterations; ++i)
      for (auto& v : acc) v = _mm256_add_epi32(v, _mm256_madd_epi16(_mm256_maddubs_epi16(u, w), one));
    __m256i sum = acc[0];
    for (int j = 1; j < kAcc; ++j) sum = _mm256_add_epi32(sum, acc[j]);
    volatile int sink = _mm256_extract_epi32(sum, 0);
    (void)sink;
    return iterations * kAcc * 32;
  }
#endif
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
  if (kind == DotInstruction::bf16_dot && cpu_has_avx512_bf16()) return dot_peak_vdpbf16ps(iterations);
#endif
  return 0;
}

}  // namespace
}  // namespace HWY_NAMESPACE
}  // namespace detail
}  // namespace factorllm
HWY_AFTER_NAMESPACE();
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // toggle guard
