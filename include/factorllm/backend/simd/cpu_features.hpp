// SPDX-License-Identifier: Apache-2.0
// What the running CPU supports: the one check behind CpuSimd<Arch>::available() and the ISA module loader.
//
// xsimd::available_architectures() (cpuid at run time) is the first half. xsimd 8.1 checks neither AVX-512VL,
// F16C nor the OS's XCR0 state (and reads the AVX bit from the wrong cpuid leaf), so on x86 this header's own
// cpuid/xgetbv query is the second half: an ISA level is supported only when both agree.
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <xsimd/xsimd.hpp>

namespace factorllm {
namespace detail {

/// The x86 features the SIMD code needs, from cpuid leaves 1 and 7 and XCR0 (xgetbv). All false elsewhere.
struct X86Features {
  bool sse4_2 = false;
  bool avx2_fma_f16c = false;         // AVX, AVX2, FMA, F16C and the OS saves XMM+YMM state
  bool avx512_f_cd_bw_dq_vl = false;  // plus the OS saves opmask and ZMM state
};

inline X86Features query_x86_features() noexcept {
  X86Features f;
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  unsigned const ecx1 = c;
  f.sse4_2 = (ecx1 >> 20) & 1u;
  bool const osxsave = (ecx1 >> 27) & 1u;
  std::uint64_t xcr0 = 0;
  if (osxsave) {
    // xgetbv(0) through inline asm: the intrinsic would need -mxsave on a baseline host.
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = (static_cast<std::uint64_t>(hi) << 32) | lo;
  }
  bool const os_ymm = (xcr0 & 0x6u) == 0x6u;    // XMM, YMM
  bool const os_zmm = (xcr0 & 0xE6u) == 0xE6u;  // XMM, YMM, opmask, ZMM_Hi256, Hi16_ZMM
  bool const avx = (ecx1 >> 28) & 1u, fma = (ecx1 >> 12) & 1u, f16c = (ecx1 >> 29) & 1u;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  bool const avx2 = (b >> 5) & 1u;
  f.avx2_fma_f16c = os_ymm && avx && avx2 && fma && f16c;
  bool const avx512f = (b >> 16) & 1u, avx512dq = (b >> 17) & 1u, avx512cd = (b >> 28) & 1u,
             avx512bw = (b >> 30) & 1u, avx512vl = (b >> 31) & 1u;
  f.avx512_f_cd_bw_dq_vl = f.avx2_fma_f16c && os_zmm && avx512f && avx512dq && avx512cd && avx512bw && avx512vl;
#endif
  return f;
}

/// The ISA levels the library tells apart, lowest first (the ISA module variants are built per level).
enum class IsaLevel { generic, sse4_2, avx2, avx512 };

/// True when the running CPU and OS support `level` (both halves of the check; see the file comment).
inline bool cpu_supports_level(IsaLevel level) noexcept {
  if (level == IsaLevel::generic) return true;
#if defined(__x86_64__) || defined(__i386__)
  auto const xs = xsimd::available_architectures();
  auto const own = query_x86_features();
  switch (level) {
    case IsaLevel::avx512: return xs.avx512bw && xs.avx512dq && xs.avx512cd && xs.avx512f && own.avx512_f_cd_bw_dq_vl;
    case IsaLevel::avx2: return xs.fma3_avx2 && own.avx2_fma_f16c;
    case IsaLevel::sse4_2: return xs.sse4_2 && own.sse4_2;
    case IsaLevel::generic: return true;
  }
#endif
  return false;
}

/// The x86 level an xsimd architecture needs (generic for sse2..sse4_1 and for non-x86 archs).
template <class Arch>
constexpr IsaLevel isa_level_of() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  if (Arch::version() >= xsimd::avx512f::version()) return IsaLevel::avx512;
  if (Arch::version() >= xsimd::avx2::version()) return IsaLevel::avx2;
  if (Arch::version() >= xsimd::sse4_2::version()) return IsaLevel::sse4_2;
#endif
  return IsaLevel::generic;
}

/// True when the running CPU supports xsimd architecture Arch: xsimd reports it, and on x86 the level it needs
/// passes cpu_supports_level.
template <class Arch>
bool cpu_supports_arch() noexcept {
  return Arch::version() <= xsimd::available_architectures().best && cpu_supports_level(isa_level_of<Arch>());
}

}  // namespace detail
}  // namespace factorllm
