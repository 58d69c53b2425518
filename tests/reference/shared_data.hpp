// SPDX-License-Identifier: Apache-2.0
// Tests that read ../shared (the real model, golden vectors): one rule for when a file is missing.
//
// Catch2 v2 has no SKIP. A developer without ../shared should still get a green run, so by default a missing
// file WARNs and the test returns. CI configures with -DFACTORLLM_REQUIRE_SHARED_DATA=ON (compile definition
// FLLM_REQUIRE_SHARED_DATA=1): there a missing file fails the test, so a broken data path cannot pass silently.
#pragma once

#include <catch2/catch.hpp>

#include <fstream>
#include <initializer_list>
#include <string>

#ifndef FLLM_REQUIRE_SHARED_DATA
#define FLLM_REQUIRE_SHARED_DATA 0
#endif

namespace fixture {

/// Returns true when every path can be opened for reading. Otherwise reports the missing ones and returns false
/// (the caller returns): a test failure when the build requires the shared data, a warning when it does not.
inline bool have_shared_data(std::initializer_list<std::string> paths) {
  std::string missing;
  for (std::string const& path : paths)
    if (!std::ifstream(path, std::ios::binary).good()) missing += (missing.empty() ? "" : ", ") + path;
  if (missing.empty()) return true;
#if FLLM_REQUIRE_SHARED_DATA
  FAIL_CHECK("shared data missing (FACTORLLM_REQUIRE_SHARED_DATA is ON): " << missing);
#else
  WARN("shared data missing, test skipped: " << missing);
#endif
  return false;
}

}  // namespace fixture
