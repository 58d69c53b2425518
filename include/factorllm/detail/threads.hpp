// SPDX-License-Identifier: Apache-2.0
// Internal: the OpenMP thread count and id as every layer asks for them (1 and 0 without OpenMP).
#pragma once

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace factorllm {
namespace detail {

/// Threads an OpenMP region started by the calling thread may use (1 without OpenMP). Per-thread scratch is
/// sized with it, so a workspace sized on one thread may be too small on a thread with a larger team.
inline int max_threads() noexcept {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/// This thread's number in its OpenMP team (0 without OpenMP).
inline int thread_id() noexcept {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace detail
}  // namespace factorllm
