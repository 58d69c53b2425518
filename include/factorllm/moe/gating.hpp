// SPDX-License-Identifier: Apache-2.0
// Gating: which experts a token uses (TopK) and with what weight they are combined (docs/math.md §2.3).
//
// Every mode selects the K experts with the largest selection score s_n = z_n + bias_n (z = router logits,
// bias = the optional per-expert selection bias, zero when absent). Ties go to the lower expert index;
// a NaN score ranks below every number. The bias changes WHICH experts are chosen, never their weights.
// Selected experts S (|S| = K) are combined as y = output_scale * sum_{n in S} w_n E_n(x), with w_n:
//
// | mode                  | w_n for n in S                                   | notes                                   |
// |-----------------------|--------------------------------------------------|-----------------------------------------|
// | code_ref              | floor(N / K)                                     | paper code (docs/math.md §2.3, Q6): unweighted   |
// |                       |                                                  | sum; K=3 of 4 gives scale 1, not 4/3    |
// | softmax_topk          | p_n = exp(z_n) / sum_{i=1..N} exp(z_i)           | full softmax, NOT renormalized          |
// | softmax_topk_renorm   | p_n / sum_{i in S} p_i                           | Mixtral / llama.cpp llama-arch gating   |
// | topk_softmax          | exp(z_n) / sum_{i in S} exp(z_i)                 | softmax over the K selected logits;     |
// |                       |                                                  | equal to softmax_topk_renorm in exact   |
// |                       |                                                  | arithmetic, computed from z directly    |
// | sigmoid_topk          | sigmoid(z_n), or sigmoid(z_n) / sum_{i in S}     | DeepSeek-V3 style when renormalized     |
// |                       | sigmoid(z_i) when sigmoid_renormalize is true    | (there the bias is added to sigmoid     |
// |                       |                                                  | scores; here it is added to logits)     |
//
// Softmaxes subtract the maximum logit first (no overflow). When the renormalizing modes' selected mass underflows
// (possible with a selection bias or very negative logits), they use the equal-in-exact-arithmetic softmax over
// the selected logits (log-sigmoids for sigmoid_topk), so finite logits always give finite weights.
// NaN policy: a NaN in a token's input or logits makes that token's weights and output NaN; other tokens are
// unaffected; nothing throws at run time.
#pragma once

#include <cmath>
#include <cstddef>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../core/kernel_args.hpp"

namespace factorllm {
namespace moe {

// CombineMode, to_string and combine_mode_from_string live with the kernel arguments (core/kernel_args.hpp);
// they are part of this namespace's API as well.
using factorllm::CombineMode;
using factorllm::combine_mode_from_string;
using factorllm::to_string;

/// The gating configuration of one MoE layer. The default mode is softmax_topk_renorm, the Mixtral / llama.cpp
/// convention (the K selected weights are positive and sum to 1); the paper code's unweighted x floor(N/K) rule is
/// kept by name as code_ref (docs/math.md §2.3) and is the mode in which K = N reproduces the dense FFN exactly.
struct Gating {
  CombineMode mode = CombineMode::softmax_topk_renorm;
  /// Number of experts per token, 1 <= top_k <= n_experts.
  std::ptrdiff_t top_k = 1;
  /// sigmoid_topk only: divide the K sigmoid weights by their sum.
  bool sigmoid_renormalize = false;
  /// Optional per-expert selection bias (empty = none, else n_experts finite values): added to the logits
  /// for choosing experts only.
  std::vector<float> selection_bias;
  /// Multiplies every weight (after the mode's formula).
  float output_scale = 1.0f;

  /// \throws value_error if mode is not one of the CombineMode values, top_k is outside [1, n_experts], the
  ///         bias has non-finite values, or output_scale is not finite; shape_error if the bias has the wrong length.
  void validate(std::ptrdiff_t n_experts, char const* function) const {
    // A CombineMode cast from an out-of-range integer would silently give zero weights.
    bool known = false;
    for (auto m : {CombineMode::code_ref, CombineMode::softmax_topk, CombineMode::softmax_topk_renorm,
                   CombineMode::topk_softmax, CombineMode::sigmoid_topk})
      known |= m == mode;
    if (!known)
      throw value_error(detail::concat(function, ": mode ", static_cast<int>(mode), " is not a CombineMode"));
    if (n_experts < 1) throw value_error(detail::concat(function, ": n_experts must be >= 1, got ", n_experts));
    if (top_k < 1 || top_k > n_experts)
      throw value_error(detail::concat(function, ": top_k = ", top_k, " must be in [1, n_experts = ", n_experts, "]"));
    if (!selection_bias.empty() && static_cast<std::ptrdiff_t>(selection_bias.size()) != n_experts)
      throw shape_error(detail::concat(function, ": argument 'selection_bias' has shape [", selection_bias.size(),
                                       "], expected [] or [", n_experts, "]"));
    for (std::size_t i = 0; i < selection_bias.size(); ++i)
      if (!std::isfinite(selection_bias[i]))
        throw value_error(detail::concat(function, ": selection_bias[", i, "] is not finite"));
    if (!std::isfinite(output_scale)) throw value_error(detail::concat(function, ": output_scale is not finite"));
  }

  /// The code_ref scale floor(N / K) (docs/math.md §2.3).
  static double code_ref_scale(std::ptrdiff_t n_experts, std::ptrdiff_t top_k) noexcept {
    return GatingParams::code_ref_scale(n_experts, top_k);
  }

  /// The plain-value form kernels take; points into selection_bias, so it is valid while this Gating lives
  /// unchanged. Validate first: kernels trust it.
  GatingParams params() const noexcept {
    return GatingParams{mode, top_k, sigmoid_renormalize, selection_bias.empty() ? nullptr : selection_bias.data(),
                        static_cast<std::ptrdiff_t>(selection_bias.size()), output_scale};
  }
};

}  // namespace moe
}  // namespace factorllm
