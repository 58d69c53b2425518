// SPDX-License-Identifier: Apache-2.0
// Portable seeded random numbers: the same values on every standard library (std distributions are
// implementation-defined, so the library draws its own from std::mt19937_64).
#pragma once

#include <cmath>
#include <cstdint>
#include <random>

namespace factorllm {
namespace detail {

/// Returns a uniform double in [0, 1) with 53 random bits.
inline double uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * (1.0 / 9007199254740992.0); }

/// Returns a standard normal draw (Box-Muller on two uniforms; log argument kept away from 0).
inline double standard_normal(std::mt19937_64& rng) {
  double const u1 = 1.0 - uniform01(rng);  // (0, 1]
  double const u2 = uniform01(rng);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925 * u2);
}

}  // namespace detail
}  // namespace factorllm
