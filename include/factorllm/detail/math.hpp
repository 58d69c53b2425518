// SPDX-License-Identifier: Apache-2.0
// Internal scalar math shared by the kernels: SiLU, sigmoid, a stable softmax, NaN-aware ordering.
#pragma once

#include <cmath>
#include <cstddef>

namespace factorllm {
namespace detail {

/// SiLU(a) = a * sigmoid(a), written so large |a| neither overflows nor produces NaN (docs/math.md §1.1).
inline double silu(double a) noexcept {
  if (a >= 0) return a / (1.0 + std::exp(-a));
  double const e = std::exp(a);
  return a * e / (1.0 + e);
}

/// Logistic sigmoid, stable for large |a|.
inline double sigmoid(double a) noexcept {
  if (a >= 0) return 1.0 / (1.0 + std::exp(-a));
  double const e = std::exp(a);
  return e / (1.0 + e);
}

/// d SiLU(a) / da = sigmoid(a) (1 + a (1 - sigmoid(a))), from the stable sigmoid.
inline double silu_grad(double a) noexcept {
  double const s = sigmoid(a);
  return s * (1.0 + a * (1.0 - s));
}

/// log(sigmoid(a)) = -log(1 + exp(-a)), finite for every finite a (no underflow to log(0)).
inline double log_sigmoid(double a) noexcept {
  if (a >= 0) return -std::log1p(std::exp(-a));
  return a - std::log1p(std::exp(a));
}

/// Ranking used by every TopK in the library: larger value first; on equal values the lower index wins;
/// NaN ranks below every number (so a NaN logit is chosen only when it must be) and NaNs keep index order.
inline bool ranks_before(double va, std::ptrdiff_t a, double vb, std::ptrdiff_t b) noexcept {
  bool const na = std::isnan(va), nb = std::isnan(vb);
  if (na || nb) return na == nb ? a < b : nb;
  if (va != vb) return va > vb;
  return a < b;
}

}  // namespace detail
}  // namespace factorllm
