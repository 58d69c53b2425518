// SPDX-License-Identifier: Apache-2.0
// The Adam optimizer the layer-local trainers share (router training and expert distillation): the check of the Adam
// fields of a trainer's config, and one bias-corrected Adam update.
#pragma once

#include <cmath>
#include <cstddef>

#include "../core/error.hpp"

namespace factorllm {
namespace detail {

/// Checks the Adam fields every trainer's config has (steps, batch_tokens, lr, beta1, beta2, eps), e.g.
/// train::RouterTrainConfig and train::DistillConfig.
/// \param cfg  any config with those fields
/// \param fn   the trainer's name, which starts the message of the value_error
/// \throws value_error unless steps >= 0, batch_tokens >= 1, lr and eps are positive and finite and beta1, beta2 are
///         in [0, 1).
template <class AdamConfig>
void validate_adam_config(AdamConfig const& cfg, char const* fn) {
  if (cfg.steps < 0) throw value_error(concat(fn, ": cfg.steps must be >= 0, got ", cfg.steps));
  if (cfg.batch_tokens < 1) throw value_error(concat(fn, ": cfg.batch_tokens must be >= 1, got ", cfg.batch_tokens));
  if (!(cfg.lr > 0) || !std::isfinite(cfg.lr)) throw value_error(concat(fn, ": cfg.lr must be positive and finite, got ", cfg.lr));
  if (!(cfg.beta1 >= 0 && cfg.beta1 < 1) || !(cfg.beta2 >= 0 && cfg.beta2 < 1))
    throw value_error(concat(fn, ": cfg.beta1 and cfg.beta2 must be in [0, 1), got ", cfg.beta1, " and ", cfg.beta2));
  if (!(cfg.eps > 0) || !std::isfinite(cfg.eps)) throw value_error(concat(fn, ": cfg.eps must be positive and finite, got ", cfg.eps));
}

/// Applies one Adam update (bias-corrected) to `count` parameters:
///   m = beta1 m + (1 - beta1) g,  v = beta2 v + (1 - beta2) g^2,
///   param -= lr (m / (1 - beta1^step)) / (sqrt(v / (1 - beta2^step)) + eps).
/// Arithmetic in double whatever the storage types, so float parameters with double moments (router training) and
/// float moments (distillation) run the same update; each value is rounded once, when it is stored.
/// \param param  [count] updated in place; \param grad  [count] the gradient at param
/// \param m, v   [count] first and second moments, updated in place (zero before step 1)
/// \param step   the 1-based step number (bias correction)
template <class P, class G, class M>
void adam_update(P* param, G const* grad, M* m, M* v, std::ptrdiff_t count, int step, double lr, double beta1,
                 double beta2, double eps) {
  double const c1 = 1.0 - std::pow(beta1, step), c2 = 1.0 - std::pow(beta2, step);
  for (std::ptrdiff_t i = 0; i < count; ++i) {
    double const g = static_cast<double>(grad[i]);
    double const mi = beta1 * static_cast<double>(m[i]) + (1.0 - beta1) * g;
    double const vi = beta2 * static_cast<double>(v[i]) + (1.0 - beta2) * g * g;
    m[i] = static_cast<M>(mi);
    v[i] = static_cast<M>(vi);
    param[i] = static_cast<P>(static_cast<double>(param[i]) - lr * (mi / c1) / (std::sqrt(vi / c2) + eps));
  }
}

}  // namespace detail
}  // namespace factorllm
