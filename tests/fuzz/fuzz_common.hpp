// SPDX-License-Identifier: Apache-2.0
// Helpers shared by the libFuzzer targets: a check that survives NDEBUG and the exception policy.
#pragma once

#include <cstdio>
#include <cstdlib>

#include <factorllm/core/error.hpp>

/// Aborts (a crash libFuzzer records, with the input) when an invariant of the library does not hold.
#define FUZZ_CHECK(cond)                                                                       \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      std::fprintf(stderr, "%s:%d: FUZZ_CHECK(%s) failed\n", __FILE__, __LINE__, #cond);       \
      std::abort();                                                                            \
    }                                                                                          \
  } while (false)

namespace fuzz {

/// Runs f(); a factorllm::error is the documented way to refuse bad input and is swallowed. Any other exception
/// (std::bad_alloc from an unchecked size, std::out_of_range, ...) escapes and libFuzzer reports it as a crash.
/// Returns true when f() returned normally.
template <class F>
bool expect_ok_or_error(F&& f) {
  try {
    f();
    return true;
  } catch (factorllm::error const&) {
    return false;
  }
}

}  // namespace fuzz
