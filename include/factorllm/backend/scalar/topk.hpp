// SPDX-License-Identifier: Apache-2.0
// Scalar oracle for TopK selection and the combine weights of every gating mode (docs/math.md §2.3).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "../../core/kernel_args.hpp"
#include "../../core/tensor_view.hpp"
#include "../../detail/math.hpp"
#include "../ops.hpp"

namespace factorllm {
namespace kernel {

/// Writes the indices of the k best scores score(0..n) into ids[0..k), best first, ranked by
/// detail::ranks_before (larger first, lower index on ties, NaN last). O(n * k^2), no scratch: n and k are
/// the expert counts (small), and this is the oracle.
template <class Score>
void topk_indices(Score const& score, std::ptrdiff_t n, std::ptrdiff_t k, std::int32_t* ids) {
  for (std::ptrdiff_t j = 0; j < k; ++j) {
    std::ptrdiff_t best = -1;
    double best_score = 0;
    for (std::ptrdiff_t i = 0; i < n; ++i) {
      bool taken = false;
      for (std::ptrdiff_t q = 0; q < j; ++q) taken |= ids[q] == i;
      if (taken) continue;
      double const s = score(i);
      if (best < 0 || detail::ranks_before(s, i, best_score, best)) {
        best = i;
        best_score = s;
      }
    }
    ids[j] = static_cast<std::int32_t>(best);
  }
}

/// TopK over rows of logits (plus the optional selection bias) and the combine weights of `gating`
/// (table in moe/gating.hpp). Shapes: logits [n_tokens, n_experts]; ids, weights [n_tokens, top_k].
template <>
struct SelectExperts<CpuScalar> {
  static constexpr bool implemented = true;
  template <class A>
  static void run(MatrixView<A const> logits, GatingParams const& gating, MatrixView<std::int32_t> ids,
                  MatrixView<A> weights);
};

template <class A>
void SelectExperts<CpuScalar>::run(MatrixView<A const> logits, GatingParams const& gating, MatrixView<std::int32_t> ids,
                                   MatrixView<A> weights) {
  std::ptrdiff_t const n = logits.cols(), k = gating.top_k;
  bool const has_bias = gating.has_selection_bias();
  for (std::ptrdiff_t t = 0; t < logits.rows(); ++t) {
    A const* z = logits.row(t);
    std::int32_t* id = ids.row(t);
    A* w = weights.row(t);
    auto logit = [&](std::ptrdiff_t i) { return static_cast<double>(z[i]); };
    // Selection scores: logits plus the selection-only bias (docs/math.md §2.3).
    topk_indices([&](std::ptrdiff_t i) { return logit(i) + (has_bias ? static_cast<double>(gating.selection_bias[i]) : 0.0); },
                 n, k, id);
    bool any_nan = false;
    double max_all = -std::numeric_limits<double>::infinity(), max_sel = max_all;
    for (std::ptrdiff_t i = 0; i < n; ++i) {
      any_nan |= std::isnan(logit(i));
      max_all = std::fmax(max_all, logit(i));
    }
    for (std::ptrdiff_t j = 0; j < k; ++j) max_sel = std::fmax(max_sel, logit(id[j]));
    double all_sum = 0, sel_sum = 0;  // softmax denominators over all N and over S
    for (std::ptrdiff_t i = 0; i < n; ++i) all_sum += std::exp(logit(i) - max_all);
    auto raw_weight = [&](std::ptrdiff_t j) -> double {
      double const zj = logit(id[j]);
      switch (gating.mode) {
        case CombineMode::code_ref: return GatingParams::code_ref_scale(n, k);
        case CombineMode::softmax_topk:
        case CombineMode::softmax_topk_renorm: return std::exp(zj - max_all) / all_sum;
        case CombineMode::topk_softmax: return std::exp(zj - max_sel);
        case CombineMode::sigmoid_topk: return detail::sigmoid(zj);
      }
      return 0.0;
    };
    bool const renormalize = gating.mode == CombineMode::softmax_topk_renorm ||
                             gating.mode == CombineMode::topk_softmax ||
                             (gating.mode == CombineMode::sigmoid_topk && gating.sigmoid_renormalize);
    for (std::ptrdiff_t j = 0; j < k; ++j) sel_sum += raw_weight(j);
    // Finite logits can still make sum_S of the raw weights underflow (a selection bias picks experts far below the
    // largest logit, or every selected sigmoid is below 1e-308): p_n / sum_S p would be 0/0. Then use the form that
    // is equal in exact arithmetic and cannot underflow: a softmax over the selected logits (for sigmoid, over their
    // log-sigmoids, since sigmoid_n / sum_S sigmoid = exp(ls_n - max ls) / sum_S exp(ls_i - max ls)).
    bool const underflow = renormalize && !(sel_sum >= std::numeric_limits<double>::min());
    auto stable_score = [&](std::ptrdiff_t j) {
      return gating.mode == CombineMode::sigmoid_topk ? detail::log_sigmoid(logit(id[j])) : logit(id[j]);
    };
    double stable_max = -std::numeric_limits<double>::infinity(), stable_sum = 0;
    if (underflow) {
      for (std::ptrdiff_t j = 0; j < k; ++j) stable_max = std::fmax(stable_max, stable_score(j));
      for (std::ptrdiff_t j = 0; j < k; ++j) stable_sum += std::exp(stable_score(j) - stable_max);
    }
    for (std::ptrdiff_t j = 0; j < k; ++j) {
      double const wj = underflow     ? std::exp(stable_score(j) - stable_max) / stable_sum
                        : renormalize ? raw_weight(j) / sel_sum
                                      : raw_weight(j);
      // NaN policy (moe/gating.hpp): a NaN logit poisons this token's weights in every mode, code_ref included.
      w[j] = any_nan ? std::numeric_limits<A>::quiet_NaN() : static_cast<A>(gating.output_scale * wj);
    }
  }
}

}  // namespace kernel
}  // namespace factorllm
