// SPDX-License-Identifier: Apache-2.0
// The backend trait: the contract every backend tag fulfils, and how host code asks about it.
//
// Contract (DESIGN.md "Backends"):
//  * A backend is an empty tag type B with `static char const* name()`, `static bool available()` and
//    `static constexpr bool is_device`.
//  * For each op the library defines a thin public front (validates arguments, then calls
//    `kernel::<op>(..., B{})`). Kernels for B are overloads taking `B const&` as their last argument, in
//    `backend/<name>/<op>.hpp`, with the same file names in every backend folder.
//  * CpuScalar must implement every op (it is the oracle: double accumulation, fixed order). A CPU tag
//    deriving from CpuScalar inherits every op it does not overload (derived-to-base conversion).
//  * Every backend must agree with CpuScalar within the op's written tolerance, and bit for bit on the
//    exact ops (permutation, factorize, grouping). Results never depend on the thread count.
//  * Kernels trust their fronts: they check preconditions only with FLLM_ASSERT (debug builds).
//  * Fronts call `kernel::op` qualified, so overloads are found at the front's definition: each front
//    header includes the kernel header of every CPU backend for its op (scalar/ and simd/); a new backend
//    adds its header there (the CUDA umbrella cuda.hpp includes its kernels before the fronts).
#pragma once

#include <cstddef>

#include "tags.hpp"

namespace factorllm {

/// Compile-time facts about a backend tag B; specialize for new backends.
template <class B>
struct backend_traits {
  static_assert(is_backend_v<B>, "backend_traits: not a factorllm backend tag");
  static constexpr char const* name() noexcept { return B::name(); }
  static bool available() noexcept { return B::available(); }
  static constexpr bool is_device = B::is_device;
  /// Byte alignment the backend prefers for weight and workspace buffers.
  static constexpr std::size_t alignment = 64;
  /// True when the backend has native bf16 dot products (otherwise bf16 is widened to float).
  static constexpr bool has_native_bf16 = false;
};

}  // namespace factorllm
