// SPDX-License-Identifier: Apache-2.0
// Configuration and result types of the PAR loss (spec 3.2), shared by the front and the backends.
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../core/tensor.hpp"

namespace factorllm {
namespace train {

/// Weights and clip of the router losses. Defaults are the paper code's constants (spec 3.2).
struct ParLossConfig {
  double par_weight = 0.05;      // route_weight in train.py
  double balance_weight = 0.01;  // balance_weight in train.py
  double clip = 1e-7;            // p and q are clipped to [clip, 1 - clip] before the KL
};

/// The PAR target q = softmax(multi-hot of K of N) (spec 3.2 step 6): its value for a selected and for an
/// unselected expert, e / (K e + N - K) and 1 / (K e + N - K).
struct ParTarget {
  double selected;
  double unselected;
};
inline ParTarget par_target_q(std::ptrdiff_t n_experts, std::ptrdiff_t top_k) noexcept {
  double const e = std::exp(1.0);
  double const denom = static_cast<double>(top_k) * e + static_cast<double>(n_experts - top_k);
  return ParTarget{e / denom, 1.0 / denom};
}

/// Everything one PAR evaluation reports. Reused across calls of the same shape without reallocating.
template <class A>
struct ParLossResult {
  double par_loss = 0;        // mean over tokens of KL(clip(p) || clip(q))
  double balance_loss = 0;    // mean over [tokens, experts] of TopK mask * p
  double total_loss = 0;      // par_weight * par_loss + balance_weight * balance_loss
  double label_accuracy = 0;  // fraction of tokens whose router TopK set equals the pseudo-label set
  Matrix<A> grad_weight;           // [n_experts, d_model] d total / d W_r
  Vector<A> grad_bias;             // [n_experts]          d total / d b_r
  Matrix<A> grad_weight_par;       // [n_experts, d_model] d par_loss / d W_r
  Vector<A> grad_bias_par;         // [n_experts]
  Matrix<A> grad_weight_balance;   // [n_experts, d_model] d balance_loss / d W_r
  Vector<A> grad_bias_balance;     // [n_experts]
  Matrix<A> mse_to_target;         // [n_tokens, n_experts] delta_n = mean_d (e_n - f / floor(N/K))^2
  Matrix<std::int32_t> pseudo_label;  // [n_tokens, top_k] the oracle's experts, smallest MSE first
  Matrix<std::int32_t> router_topk;   // [n_tokens, top_k] the router's experts, largest logit first

  /// Makes every tensor have the given sizes (allocating only on change).
  void resize(std::ptrdiff_t n_tokens, std::ptrdiff_t d_model, std::ptrdiff_t n_experts, std::ptrdiff_t top_k) {
    auto fit2 = [](auto& m, std::ptrdiff_t r, std::ptrdiff_t c) {
      if (m.extents() != std::array<std::ptrdiff_t, 2>{r, c}) m = std::decay_t<decltype(m)>({r, c});
    };
    auto fit1 = [](auto& v, std::ptrdiff_t r) {
      if (v.extent(0) != r) v = std::decay_t<decltype(v)>({r});
    };
    fit2(grad_weight, n_experts, d_model);
    fit2(grad_weight_par, n_experts, d_model);
    fit2(grad_weight_balance, n_experts, d_model);
    fit1(grad_bias, n_experts);
    fit1(grad_bias_par, n_experts);
    fit1(grad_bias_balance, n_experts);
    fit2(mse_to_target, n_tokens, n_experts);
    fit2(pseudo_label, n_tokens, top_k);
    fit2(router_topk, n_tokens, top_k);
  }
};

}  // namespace train
}  // namespace factorllm
