// SPDX-License-Identifier: Apache-2.0
// Portability macros shared by every header: restrict, debug assertions, host/device markers.
#pragma once

#include <cstdio>
#include <cstdlib>

#if defined(__CUDACC__)
#define FLLM_HOST_DEVICE __host__ __device__
#define FLLM_DEVICE __device__
#else
#define FLLM_HOST_DEVICE
#define FLLM_DEVICE
#endif

#if defined(_MSC_VER)
#define FLLM_RESTRICT __restrict
#else
#define FLLM_RESTRICT __restrict__
#endif

// Kernels trust the public fronts that validated their arguments (docs/design.md §9); in debug builds
// they still check their preconditions, and a failed check aborts with the location.
#if !defined(NDEBUG) || defined(FLLM_ENABLE_ASSERTS)
#define FLLM_ASSERT(cond)                                                                   \
  do {                                                                                      \
    if (!(cond)) {                                                                          \
      std::fprintf(stderr, "%s:%d: FLLM_ASSERT(%s) failed\n", __FILE__, __LINE__, #cond);   \
      std::abort();                                                                         \
    }                                                                                       \
  } while (false)
#else
#define FLLM_ASSERT(cond) ((void)0)
#endif
