// SPDX-License-Identifier: Apache-2.0
// Library version, as macros for the preprocessor and as constexpr values.
#pragma once

#define FLLM_VERSION_MAJOR 0
#define FLLM_VERSION_MINOR 1
#define FLLM_VERSION_PATCH 0

namespace factorllm {
/// Returns the library version encoded as major * 10000 + minor * 100 + patch.
constexpr int version() noexcept {
  return FLLM_VERSION_MAJOR * 10000 + FLLM_VERSION_MINOR * 100 + FLLM_VERSION_PATCH;
}
}  // namespace factorllm
