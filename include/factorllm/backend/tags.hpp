// SPDX-License-Identifier: Apache-2.0
// Backend tag types: empty types that select kernels; each names its memory space and the backend it falls back to.
#pragma once

#include <type_traits>

#include "../core/workspace.hpp"

namespace factorllm {

#if defined(FLLM_HAS_CUDA)
namespace cuda {
int device_count() noexcept;               // backend/cuda/context.hpp; defined in the factorllm::cuda library
int device_compute_capability() noexcept;  // major * 10 + minor of the current device, 0 without one
}  // namespace cuda
#endif

/// The end of every fallback chain: "no backend". An op resolved to it has no kernel (backend/ops.hpp).
struct NoBackend {
  static constexpr char const* name() noexcept { return "none"; }
};

/// The reference backend: plain loops, double accumulation, one thread. It is the oracle every other
/// backend is tested against, and the backend any derived CPU tag falls back to for an op it does not
/// implement (docs/design.md §4).
struct CpuScalar {
  using backend_self = CpuScalar;  // lets fallback_t tell a tag that re-declares nothing from its base
  using fallback = NoBackend;
  static constexpr char const* name() noexcept { return "cpu_scalar"; }
  static constexpr MemorySpace memory_space = MemorySpace::host;
  static constexpr bool is_device = false;
  static bool available() noexcept { return true; }
};

/// CUDA backend tag (device memory). Deliberately NOT derived from a CPU tag and falling back to nothing: an op
/// without a CUDA kernel must fail to compile rather than silently run host code on device pointers. Its kernels
/// are in backend/cuda/ (include backend/cuda/cuda.hpp, link factorllm::cuda; backend/README.md "CUDA").
/// available() is true when the program links factorllm::cuda (which defines FLLM_HAS_CUDA for its users) and the
/// CUDA runtime sees a device of compute capability kSm / 10 or newer; false otherwise (always false in a build
/// without the CUDA backend). Every translation unit of a program must agree on FLLM_HAS_CUDA.
template <int kSm = 80>
struct Cuda {
  using backend_self = Cuda;
  using fallback = NoBackend;
  static constexpr int kMinComputeCapability = kSm;
  static constexpr MemorySpace memory_space = MemorySpace::device;
  static constexpr bool is_device = true;
  static constexpr char const* name() noexcept { return "cuda"; }
  static bool available() noexcept {
#if defined(FLLM_HAS_CUDA)
    return cuda::device_count() > 0 && cuda::device_compute_capability() >= kSm;
#else
    return false;
#endif
  }
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

/// The backend B falls back to for an op it has no kernel for: B::fallback when B declares its own
/// (backend_self is B), else the library tag B derives from (a user tag `struct Mine : CpuSimd<A> {}` falls
/// back to CpuSimd<A>, not past it).
template <class B>
using fallback_t = std::conditional_t<std::is_same_v<typename B::backend_self, B>, typename B::fallback,
                                      typename B::backend_self>;

}  // namespace factorllm
