// SPDX-License-Identifier: Apache-2.0
// The oracle pseudo-labels of the calibration tokens, computed for all tokens in chunked double GEMMs: the PAR labels
// (against the dense teacher, or through the Gram identity while the experts still sum to it) and the subset labels.
//
// The PAR pseudo-label of a token (docs/math.md §3.2 step 5) is the set of K experts whose outputs e_n are closest to
// f / s, s = floor(N/K). When the experts still sum to the dense FFN (a factorization before any recovery),
// f = sum_m e_m, and with G the N x N Gram matrix of the expert outputs of the token (G_nm = <e_n, e_m>):
//   ||e_n - f/s||^2 = G_nn - (2/s) sum_m G_nm + (sum_{m,m'} G_mm') / s^2,
// so the dense output never has to be formed (par_oracle_labels_gram). After recovery the experts no longer
// sum to f, and par_oracle_labels computes f from the dense weights instead.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "../backend/scalar/topk.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../core/tensor_view.hpp"
#include "../detail/eigen_serial.hpp"
#include "../ffn/factorize.hpp"
#include "../ffn/swiglu.hpp"
#include "../moe/gating.hpp"
#include "detail/calibration_passes.hpp"
#include "detail/validation.hpp"

namespace factorllm {
namespace detail {

/// Pseudo-labels of token t from its per-expert MSEs delta [n_experts]: the top_k smallest, ties to the lower index
/// (as par_loss, docs/math.md §3.2 step 5), into row t of labels; and the MSEs into row t of *mse unless it is null.
inline void labels_from_mse(std::vector<double> const& delta, std::ptrdiff_t top_k, std::ptrdiff_t t,
                            Matrix<std::int32_t>& labels, Matrix<double>* mse) {
  std::ptrdiff_t const n = static_cast<std::ptrdiff_t>(delta.size());
  kernel::topk_indices([&](std::ptrdiff_t e) { return -delta[static_cast<std::size_t>(e)]; }, n, top_k,
                       labels.view().row(t));
  if (mse != nullptr)
    for (std::ptrdiff_t a = 0; a < n; ++a) (*mse)(t, a) = delta[static_cast<std::size_t>(a)];
}

}  // namespace detail

namespace train {

/// Which pseudo-labels a router is trained toward (RouterTrainConfig::labels) and measured against (diagnose_layer).
enum class LabelKind {
  par,     ///< the paper's PAR labels (docs/math.md §3.2 step 5): the K experts individually closest to f / floor(N/K)
  subset,  ///< the K-subset S whose SUMMED output is closest to f, argmin_S || sum_{n in S} e_n - f || (the paper
           ///< code's unused get_label, docs/math.md §3.2): what a plain-sum gating (code_ref with output_scale
           ///< 1 / floor(N/K), every selected expert weighted 1) actually outputs
};

/// The largest n_experts subset_oracle_labels accepts: it enumerates all C(N, K) subsets per token.
inline constexpr std::ptrdiff_t kMaxSubsetExperts = 16;

/// Computes the PAR pseudo-labels (docs/math.md §3.2 step 5) of every token in one pass through the Gram identity
/// (file comment): valid when the experts sum to the dense FFN, i.e. for a factorization that has not been recovered
/// (after recovery use par_oracle_labels). Equal to par_loss's pseudo_label up to rounding of exact near-ties.
/// \param x       [n_tokens >= 1, d_model] FFN inputs (any row stride)
/// \param experts the factorized experts (f = sum of all of them)
/// \param top_k   K; the target is f / floor(N/K) (docs/math.md §3.2, quirk Q5)
/// \param mse     optional out: [n_tokens, n_experts] delta_n = mean_d (e_n - f/s)^2 (resized)
/// \returns [n_tokens, top_k] expert ids, smallest MSE first, ties to the lower index
/// \throws value_error for no tokens or top_k outside [1, n_experts]; shape_error if x is not [n_tokens, d_model].
template <class T, class A>
Matrix<std::int32_t> par_oracle_labels_gram(MatrixView<A const> x, ffn::ExpertWeights<T> const& experts,
                                            std::ptrdiff_t top_k, Matrix<double>* mse = nullptr) {
  char const* fn = "par_oracle_labels_gram";
  detail::validate_experts_x(x, experts, top_k, fn);
  std::ptrdiff_t const n_tokens = x.rows(), n = experts.n_experts(), d = experts.d_model();
  Matrix<std::int32_t> labels({n_tokens, top_k});
  if (mse != nullptr && mse->extents() != std::array<std::ptrdiff_t, 2>{n_tokens, n}) *mse = Matrix<double>({n_tokens, n});
  double const s = moe::Gating::code_ref_scale(n, top_k);  // docs/math.md §3.2 step 4 (quirk Q5)
  detail::run_eigen_serial([&] {
    auto const w = detail::experts_double(experts);
    detail::ChunkScratch sc(detail::kCalibrationChunkTokens, d, n * w.m, n);
    detail::RowMatrixD gram(n, n);
    std::vector<double> delta(static_cast<std::size_t>(n));
    for (std::ptrdiff_t t0 = 0; t0 < n_tokens; t0 += detail::kCalibrationChunkTokens) {
      std::ptrdiff_t const c = std::min(detail::kCalibrationChunkTokens, n_tokens - t0);
      detail::gather_rows_double(x, t0, c, sc.x.topRows(c));
      detail::expert_outputs_chunk(w, c, sc);
      for (std::ptrdiff_t r = 0; r < c; ++r) {
        double total = 0;
        for (std::ptrdiff_t a = 0; a < n; ++a)
          for (std::ptrdiff_t b = a; b < n; ++b) {
            gram(a, b) = gram(b, a) = sc.e_out[static_cast<std::size_t>(a)].row(r).dot(sc.e_out[static_cast<std::size_t>(b)].row(r));
            total += a == b ? gram(a, b) : 2.0 * gram(a, b);
          }
        // ||e_n - f/s||^2 = G_nn - (2/s) sum_m G_nm + sum G / s^2 (Gram identity, file comment)
        for (std::ptrdiff_t a = 0; a < n; ++a)
          delta[static_cast<std::size_t>(a)] =
              std::max(0.0, gram(a, a) - 2.0 / s * gram.row(a).sum() + total / (s * s)) / static_cast<double>(d);
        detail::labels_from_mse(delta, top_k, t0 + r, labels, mse);
      }
    }
  });
  return labels;
}

/// Computes the PAR pseudo-labels of every token against the dense teacher f = F(x) (docs/math.md §3.2 steps 2-5),
/// valid for any experts (also after recovery); the same labels as par_loss's pseudo_label, computed with chunked
/// GEMMs in double instead of per-token loops.
/// \param x       [n_tokens >= 1, d_model]; \param dense  the teacher; \param experts  the current experts
/// \param mse     optional out: [n_tokens, n_experts] delta_n = mean_d (e_n - f/s)^2
/// \returns [n_tokens, top_k] expert ids, smallest MSE first, ties to the lower index
/// \throws value_error for no tokens or a bad top_k; shape_error for mismatched shapes.
template <class T, class A>
Matrix<std::int32_t> par_oracle_labels(MatrixView<A const> x, ffn::DenseFfnView<T> const& dense,
                                       ffn::ExpertWeights<T> const& experts, std::ptrdiff_t top_k,
                                       Matrix<double>* mse = nullptr) {
  char const* fn = "par_oracle_labels";
  detail::validate_dense_experts(dense, experts, fn);
  detail::validate_experts_x(x, experts, top_k, fn);
  std::ptrdiff_t const n_tokens = x.rows(), n = experts.n_experts(), d = experts.d_model();
  Matrix<std::int32_t> labels({n_tokens, top_k});
  if (mse != nullptr && mse->extents() != std::array<std::ptrdiff_t, 2>{n_tokens, n}) *mse = Matrix<double>({n_tokens, n});
  double const s = moe::Gating::code_ref_scale(n, top_k);  // docs/math.md §3.2 step 4 (quirk Q5)
  std::vector<double> delta(static_cast<std::size_t>(n));
  detail::for_each_teacher_expert_chunk(x, dense, experts, [&](std::ptrdiff_t t0, std::ptrdiff_t c,
                                                                    detail::ChunkScratch const& sc) {
    for (std::ptrdiff_t r = 0; r < c; ++r) {
      for (std::ptrdiff_t a = 0; a < n; ++a)
        delta[static_cast<std::size_t>(a)] =
            (sc.e_out[static_cast<std::size_t>(a)].row(r) - sc.f.row(r) / s).squaredNorm() / static_cast<double>(d);
      detail::labels_from_mse(delta, top_k, t0 + r, labels, mse);
    }
  });
  return labels;
}

/// Computes the subset pseudo-labels of every token (LabelKind::subset): the K-subset S of the experts minimizing
/// || sum_{n in S} e_n(x_t) - F(x_t) ||^2, exhaustively over the C(N, K) subsets. With G the N x N Gram matrix of
/// the token's expert outputs and b_n = <e_n, f>, the error of S is sum_{n,m in S} G_nm - 2 sum_{n in S} b_n + ||f||^2,
/// so each subset costs O(K^2) once G and b are known (chunked double GEMMs, as par_oracle_labels).
/// Valid for any experts (the target is the dense teacher, also after recovery).
/// \param x       [n_tokens >= 1, d_model] FFN inputs (any row stride)
/// \param dense   the teacher F; \param experts  the current experts (n_experts <= kMaxSubsetExperts)
/// \param top_k   K = |S|
/// \returns [n_tokens, top_k] expert ids in increasing order; ties go to the first subset in lexicographic order of
///          the increasing id lists (e.g. {0, 3} before {1, 2})
/// \throws value_error for no tokens, a bad top_k or n_experts > kMaxSubsetExperts; shape_error for mismatched shapes.
template <class T, class A>
Matrix<std::int32_t> subset_oracle_labels(MatrixView<A const> x, ffn::DenseFfnView<T> const& dense,
                                          ffn::ExpertWeights<T> const& experts, std::ptrdiff_t top_k) {
  char const* fn = "subset_oracle_labels";
  detail::validate_dense_experts(dense, experts, fn);
  detail::validate_experts_x(x, experts, top_k, fn);
  std::ptrdiff_t const n_tokens = x.rows(), n = experts.n_experts(), k = top_k;
  if (n > kMaxSubsetExperts)
    throw value_error(detail::concat(fn, ": n_experts = ", n, " exceeds ", kMaxSubsetExperts,
                                     " (the subset labels enumerate all C(N, K) subsets per token)"));
  Matrix<std::int32_t> labels({n_tokens, k});
  detail::RowMatrixD gram(n, n);
  std::vector<double> dot_f(static_cast<std::size_t>(n));
  std::vector<std::ptrdiff_t> pick(static_cast<std::size_t>(k)), best(static_cast<std::size_t>(k));
  detail::for_each_teacher_expert_chunk(x, dense, experts, [&](std::ptrdiff_t t0, std::ptrdiff_t c,
                                                                    detail::ChunkScratch const& sc) {
    for (std::ptrdiff_t r = 0; r < c; ++r) {
      for (std::ptrdiff_t a = 0; a < n; ++a) {
        auto const ea = sc.e_out[static_cast<std::size_t>(a)].row(r);
        dot_f[static_cast<std::size_t>(a)] = ea.dot(sc.f.row(r));
        for (std::ptrdiff_t b = a; b < n; ++b) gram(a, b) = gram(b, a) = ea.dot(sc.e_out[static_cast<std::size_t>(b)].row(r));
      }
      // Lexicographic enumeration of the increasing index lists pick[0] < ... < pick[k-1]; strict < keeps the
      // first of equal errors. ||f||^2 is the same for every subset and is left out.
      for (std::ptrdiff_t j = 0; j < k; ++j) pick[static_cast<std::size_t>(j)] = j;
      double best_err = std::numeric_limits<double>::infinity();
      while (true) {
        double err = 0;
        for (std::ptrdiff_t i = 0; i < k; ++i) {
          std::ptrdiff_t const a = pick[static_cast<std::size_t>(i)];
          err += gram(a, a) - 2.0 * dot_f[static_cast<std::size_t>(a)];
          for (std::ptrdiff_t j = i + 1; j < k; ++j) err += 2.0 * gram(a, pick[static_cast<std::size_t>(j)]);
        }
        if (err < best_err) {
          best_err = err;
          best = pick;
        }
        std::ptrdiff_t i = k - 1;
        while (i >= 0 && pick[static_cast<std::size_t>(i)] == n - k + i) --i;
        if (i < 0) break;
        ++pick[static_cast<std::size_t>(i)];
        for (std::ptrdiff_t j = i + 1; j < k; ++j) pick[static_cast<std::size_t>(j)] = pick[static_cast<std::size_t>(j - 1)] + 1;
      }
      for (std::ptrdiff_t j = 0; j < k; ++j) labels(t0 + r, j) = static_cast<std::int32_t>(best[static_cast<std::size_t>(j)]);
    }
  });
  return labels;
}

}  // namespace train
}  // namespace factorllm
