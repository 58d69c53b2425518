// SPDX-License-Identifier: Apache-2.0
// Backend tag types: empty types that select kernel overloads; inheritance is the fallback chain.
#pragma once

#include <type_traits>

namespace factorllm {

/// The reference backend: plain loops, double accumulation, one thread. It is the oracle every other
/// backend is tested against, and the overload any derived CPU backend falls back to for an op it does
/// not specialize (overload resolution picks the most derived tag that has a kernel).
struct CpuScalar {
  static constexpr char const* name() noexcept { return "cpu_scalar"; }
  static constexpr bool is_device = false;
  static bool available() noexcept { return true; }
};

/// CUDA backend tag (device memory). Deliberately NOT derived from a CPU tag: an op without a CUDA
/// kernel must fail to compile rather than silently run host code on device pointers.
template <int kSm = 80>
struct Cuda {
  static constexpr int kMinComputeCapability = kSm;
  static constexpr bool is_device = true;
  static constexpr char const* name() noexcept { return "cuda"; }
};

/// True for the backend tag types this library defines (or a user tag deriving from CpuScalar).
template <class B, class = void>
struct is_backend : std::false_type {};
template <class B>
struct is_backend<B, std::enable_if_t<std::is_base_of_v<CpuScalar, B>>> : std::true_type {};
template <int kSm>
struct is_backend<Cuda<kSm>> : std::true_type {};
template <class B>
inline constexpr bool is_backend_v = is_backend<B>::value;

/// False for every type; used in static_asserts that must only fire when instantiated.
template <class>
inline constexpr bool dependent_false = false;

}  // namespace factorllm
