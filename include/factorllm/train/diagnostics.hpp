// SPDX-License-Identifier: Apache-2.0
// Conversion diagnostics of one MoE layer: error vs the dense FFN, router-vs-PAR-label agreement, expert load and
// its entropy, pseudo-label stability, and the PAR oracle for all tokens in one pass (Gram identity, spec 3.2).
//
// The PAR pseudo-label of a token (spec 3.2 step 5) is the set of K experts whose outputs e_n are closest to
// f / s, s = floor(N/K). When the experts still sum to the dense FFN (a factorization before any recovery),
// f = sum_m e_m, and with G the N x N Gram matrix of the expert outputs of the token (G_nm = <e_n, e_m>):
//   ||e_n - f/s||^2 = G_nn - (2/s) sum_m G_nm + (sum_{m,m'} G_mm') / s^2,
// so the dense output never has to be formed (par_oracle_labels_gram). After recovery the experts no longer
// sum to f, and par_oracle_labels computes f from the dense weights instead.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include <Eigen/Core>

#include "../backend/scalar/topk.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../core/tensor_view.hpp"
#include "../core/workspace.hpp"
#include "../detail/eigen_serial.hpp"
#include "../ffn/factorize.hpp"
#include "../ffn/swiglu.hpp"
#include "../moe/gating.hpp"
#include "../moe/moe_ffn.hpp"
#include "../moe/router.hpp"
#include "../moe/routing.hpp"
#include "../moe/shared_moe.hpp"
#include "../moe/topk.hpp"
#include "par_loss.hpp"

namespace factorllm {
namespace train {
namespace detail_train {

using factorllm::detail::RowMatrixD;
using factorllm::detail::concat;

/// Tokens per chunk of the Eigen passes over calibration sets (bounds their scratch).
inline constexpr std::ptrdiff_t kChunkTokens = 256;

/// Double copies of stacked expert weights: gate and up as [n_experts * d_expert, d_model] (expert-major rows,
/// i.e. the experts' permuted neuron order), down as one [d_model, d_expert] matrix per expert.
struct ExpertsDouble {
  std::ptrdiff_t n = 0, m = 0, d = 0;
  RowMatrixD gate, up;
  std::vector<RowMatrixD> down;
};

template <class T>
ExpertsDouble experts_double(ffn::ExpertWeights<T> const& experts) {
  ExpertsDouble r;
  r.n = experts.n_experts();
  r.m = experts.d_expert();
  r.d = experts.d_model();
  r.gate = factorllm::detail::to_eigen_double(matrix_view(experts.gate_tensor().data(), r.n * r.m, r.d));
  r.up = factorllm::detail::to_eigen_double(matrix_view(experts.up_tensor().data(), r.n * r.m, r.d));
  for (std::ptrdiff_t e = 0; e < r.n; ++e) r.down.push_back(factorllm::detail::to_eigen_double(experts.down(e)));
  return r;
}

/// Double copies of a dense FFN's weights.
struct DenseDouble {
  RowMatrixD gate, up, down;  // [d_ff, d_model], [d_ff, d_model], [d_model, d_ff]
};
template <class T>
DenseDouble dense_double(ffn::DenseFfnView<T> const& dense) {
  return DenseDouble{factorllm::detail::to_eigen_double(dense.gate), factorllm::detail::to_eigen_double(dense.up),
                     factorllm::detail::to_eigen_double(dense.down)};
}

/// Scratch of the chunked passes: input rows, hidden activations, pre-activations, outputs.
struct ChunkScratch {
  RowMatrixD x, h, pre, f;
  std::vector<RowMatrixD> e_out;  // [n_experts] of [chunk, d_model]
  ChunkScratch(std::ptrdiff_t chunk, std::ptrdiff_t d_model, std::ptrdiff_t d_hidden, std::ptrdiff_t n_experts)
      : x(chunk, d_model), h(chunk, d_hidden), pre(chunk, d_hidden), f(chunk, d_model),
        e_out(static_cast<std::size_t>(n_experts), RowMatrixD(chunk, d_model)) {}
};

/// Dense teacher F(x) of the c rows in s.x into s.f (uses s.h, s.pre of width >= dense d_ff).
inline void dense_output_chunk(DenseDouble const& w, std::ptrdiff_t c, ChunkScratch& s) {
  std::ptrdiff_t const m = w.gate.rows();
  factorllm::detail::swiglu_hidden(w.gate, w.up, s.x.topRows(c), s.h.topLeftCorner(c, m), s.pre.topLeftCorner(c, m));
  s.f.topRows(c).noalias() = s.h.topLeftCorner(c, m) * w.down.transpose();
}

/// Every expert's output on the c rows in s.x into s.e_out[e]; leaves the experts' hidden activations in
/// s.h[:, e*m .. (e+1)*m).
inline void expert_outputs_chunk(ExpertsDouble const& w, std::ptrdiff_t c, ChunkScratch& s) {
  std::ptrdiff_t const nm = w.n * w.m;
  factorllm::detail::swiglu_hidden(w.gate, w.up, s.x.topRows(c), s.h.topLeftCorner(c, nm), s.pre.topLeftCorner(c, nm));
  for (std::ptrdiff_t e = 0; e < w.n; ++e)
    s.e_out[static_cast<std::size_t>(e)].topRows(c).noalias() = s.h.block(0, e * w.m, c, w.m) * w.down[static_cast<std::size_t>(e)].transpose();
}

/// Runs body(t0, c, scratch) for consecutive chunks of at most kChunkTokens rows of x, with scratch.f holding the
/// dense teacher's outputs F(x) and scratch.e_out[e] every expert's outputs E_e(x) for those rows (double, Eigen
/// held serial): the shared front of the oracle labellers (PAR and subset labels).
template <class T, class A, class Body>
void for_each_teacher_expert_chunk(MatrixView<A const> x, ffn::DenseFfnView<T> const& dense,
                                   ffn::ExpertWeights<T> const& experts, Body&& body) {
  factorllm::detail::run_eigen_serial([&] {
    auto const w = experts_double(experts);
    auto const dw = dense_double(dense);
    ChunkScratch sc(kChunkTokens, experts.d_model(), std::max(experts.n_experts() * w.m, dense.d_ff()), experts.n_experts());
    for (std::ptrdiff_t t0 = 0; t0 < x.rows(); t0 += kChunkTokens) {
      std::ptrdiff_t const c = std::min(kChunkTokens, x.rows() - t0);
      factorllm::detail::gather_rows_double(x, t0, c, sc.x.topRows(c));
      dense_output_chunk(dw, c, sc);
      expert_outputs_chunk(w, c, sc);
      body(t0, c, sc);
    }
  });
}

template <class T, class A>
void validate_experts_x(MatrixView<A const> x, ffn::ExpertWeights<T> const& experts, std::ptrdiff_t top_k, char const* fn) {
  if (experts.gate_tensor().empty()) throw value_error(concat(fn, ": argument 'experts' holds no experts (default-constructed)"));
  if (x.rows() < 1) throw value_error(concat(fn, ": argument 'x' has no tokens"));
  factorllm::detail::require_shape(x, {x.rows(), experts.d_model()}, fn, "x");
  if (top_k < 1 || top_k > experts.n_experts())
    throw value_error(concat(fn, ": top_k = ", top_k, " must be in [1, n_experts = ", experts.n_experts(), "]"));
}

template <class T>
void validate_dense_experts(ffn::DenseFfnView<T> const& dense, ffn::ExpertWeights<T> const& experts, char const* fn) {
  dense.validate(fn);
  if (experts.d_model() != dense.d_model() || experts.d_ff() != dense.d_ff())
    throw shape_error(concat(fn, ": argument 'experts' has d_model ", experts.d_model(), ", d_ff ", experts.d_ff(),
                             "; the dense FFN has d_model ", dense.d_model(), ", d_ff ", dense.d_ff()));
}

/// Pseudo-labels from per-token MSEs: the top_k smallest, ties to the lower index (spec 3.2 step 5, as par_loss).
inline void labels_from_mse(double const* mse, std::ptrdiff_t n, std::ptrdiff_t k, std::int32_t* ids) {
  kernel::topk_indices([&](std::ptrdiff_t e) { return -mse[e]; }, n, k, ids);
}

/// The routing of every row of x by router + gating (logits, TopK with the selection bias, combine weights),
/// exactly as moe::MoeFfn's scalar oracle computes it.
template <class A>
void route_all(moe::Router<A> const& router, moe::Gating const& gating, MatrixView<A const> x, Matrix<std::int32_t>& ids,
               Matrix<A>& weights) {
  Matrix<A> logits({x.rows(), router.n_experts()});
  ids = Matrix<std::int32_t>({x.rows(), gating.top_k});
  weights = Matrix<A>({x.rows(), gating.top_k});
  moe::router_logits(router, x, logits.view());
  moe::select_experts(logits.cview(), gating, ids.view(), weights.view());
}

}  // namespace detail_train

/// Computes the PAR pseudo-labels (spec 3.2 step 5) of every token in one pass through the Gram identity (file
/// comment): valid when the experts sum to the dense FFN, i.e. for a factorization that has not been recovered
/// (after recovery use par_oracle_labels). Equal to par_loss's pseudo_label up to rounding of exact near-ties.
/// \param x       [n_tokens >= 1, d_model] FFN inputs (any row stride)
/// \param experts the factorized experts (f = sum of all of them)
/// \param top_k   K; the target is f / floor(N/K) (spec 3.2, quirk Q5)
/// \param mse     optional out: [n_tokens, n_experts] delta_n = mean_d (e_n - f/s)^2 (resized)
/// \returns [n_tokens, top_k] expert ids, smallest MSE first, ties to the lower index
/// \throws value_error for no tokens or top_k outside [1, n_experts]; shape_error if x is not [n_tokens, d_model].
template <class T, class A>
Matrix<std::int32_t> par_oracle_labels_gram(MatrixView<A const> x, ffn::ExpertWeights<T> const& experts,
                                            std::ptrdiff_t top_k, Matrix<double>* mse = nullptr) {
  char const* fn = "par_oracle_labels_gram";
  detail_train::validate_experts_x(x, experts, top_k, fn);
  std::ptrdiff_t const n_tokens = x.rows(), n = experts.n_experts(), d = experts.d_model();
  Matrix<std::int32_t> labels({n_tokens, top_k});
  if (mse != nullptr && mse->extents() != std::array<std::ptrdiff_t, 2>{n_tokens, n}) *mse = Matrix<double>({n_tokens, n});
  double const s = moe::Gating::code_ref_scale(n, top_k);  // spec 3.2 step 4 (quirk Q5)
  factorllm::detail::run_eigen_serial([&] {
    auto const w = detail_train::experts_double(experts);
    detail_train::ChunkScratch sc(detail_train::kChunkTokens, d, n * w.m, n);
    factorllm::detail::RowMatrixD gram(n, n);
    std::vector<double> delta(static_cast<std::size_t>(n));
    for (std::ptrdiff_t t0 = 0; t0 < n_tokens; t0 += detail_train::kChunkTokens) {
      std::ptrdiff_t const c = std::min(detail_train::kChunkTokens, n_tokens - t0);
      factorllm::detail::gather_rows_double(x, t0, c, sc.x.topRows(c));
      detail_train::expert_outputs_chunk(w, c, sc);
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
        detail_train::labels_from_mse(delta.data(), n, top_k, labels.view().row(t0 + r));
        if (mse != nullptr)
          for (std::ptrdiff_t a = 0; a < n; ++a) (*mse)(t0 + r, a) = delta[static_cast<std::size_t>(a)];
      }
    }
  });
  return labels;
}

/// Computes the PAR pseudo-labels of every token against the dense teacher f = F(x) (spec 3.2 steps 2-5), valid for
/// any experts (also after recovery); the same labels as par_loss's pseudo_label, computed with chunked GEMMs in
/// double instead of per-token loops.
/// \param x       [n_tokens >= 1, d_model]; \param dense  the teacher; \param experts  the current experts
/// \param mse     optional out: [n_tokens, n_experts] delta_n = mean_d (e_n - f/s)^2
/// \returns [n_tokens, top_k] expert ids, smallest MSE first, ties to the lower index
/// \throws value_error for no tokens or a bad top_k; shape_error for mismatched shapes.
template <class T, class A>
Matrix<std::int32_t> par_oracle_labels(MatrixView<A const> x, ffn::DenseFfnView<T> const& dense,
                                       ffn::ExpertWeights<T> const& experts, std::ptrdiff_t top_k,
                                       Matrix<double>* mse = nullptr) {
  char const* fn = "par_oracle_labels";
  detail_train::validate_dense_experts(dense, experts, fn);
  detail_train::validate_experts_x(x, experts, top_k, fn);
  std::ptrdiff_t const n_tokens = x.rows(), n = experts.n_experts(), d = experts.d_model();
  Matrix<std::int32_t> labels({n_tokens, top_k});
  if (mse != nullptr && mse->extents() != std::array<std::ptrdiff_t, 2>{n_tokens, n}) *mse = Matrix<double>({n_tokens, n});
  double const s = moe::Gating::code_ref_scale(n, top_k);  // spec 3.2 step 4 (quirk Q5)
  std::vector<double> delta(static_cast<std::size_t>(n));
  detail_train::for_each_teacher_expert_chunk(x, dense, experts, [&](std::ptrdiff_t t0, std::ptrdiff_t c,
                                                                    detail_train::ChunkScratch const& sc) {
    for (std::ptrdiff_t r = 0; r < c; ++r) {
      for (std::ptrdiff_t a = 0; a < n; ++a)
        delta[static_cast<std::size_t>(a)] =
            (sc.e_out[static_cast<std::size_t>(a)].row(r) - sc.f.row(r) / s).squaredNorm() / static_cast<double>(d);
      detail_train::labels_from_mse(delta.data(), n, top_k, labels.view().row(t0 + r));
      if (mse != nullptr)
        for (std::ptrdiff_t a = 0; a < n; ++a) (*mse)(t0 + r, a) = delta[static_cast<std::size_t>(a)];
    }
  });
  return labels;
}

/// Returns the fraction of rows whose label SETS agree (order within a row ignored): e.g. the pseudo-labels of
/// the same tokens from two calibration passes (label stability), or a router's TopK against the labels.
/// \param a, b  [n_tokens, top_k] expert ids, each row without repeats
/// \returns a value in [0, 1]; 1 for n_tokens = 0
/// \throws shape_error if the shapes differ.
inline double label_set_agreement(MatrixView<std::int32_t const> a, MatrixView<std::int32_t const> b) {
  detail::require_shape(b, a.extents(), "label_set_agreement", "b");
  if (a.rows() == 0) return 1.0;
  std::int64_t same = 0;
  for (std::ptrdiff_t t = 0; t < a.rows(); ++t) {
    bool eq = true;
    for (std::ptrdiff_t j = 0; j < a.cols() && eq; ++j) {
      bool found = false;
      for (std::ptrdiff_t q = 0; q < b.cols(); ++q) found |= b(t, q) == a(t, j);
      eq = found;
    }
    same += eq ? 1 : 0;
  }
  return static_cast<double>(same) / static_cast<double>(a.rows());
}

/// Returns the number of token slots routed to each expert in one forward pass (its load histogram).
template <class A>
std::vector<std::int64_t> load_histogram(moe::RoutingRecord<A> const& record) {
  std::ptrdiff_t const n = record.offsets.extent(0) - 1;
  std::vector<std::int64_t> load(static_cast<std::size_t>(std::max<std::ptrdiff_t>(n, 0)));
  for (std::ptrdiff_t e = 0; e < n; ++e) load[static_cast<std::size_t>(e)] = record.load(e);
  return load;
}

/// Returns the entropy (nats) of the load distribution load / sum(load): log(n_experts) when perfectly balanced,
/// 0 when one expert takes everything (and for an empty histogram or no load).
inline double load_entropy(std::vector<std::int64_t> const& load) {
  double total = 0;
  for (auto v : load) total += static_cast<double>(v);
  if (!(total > 0)) return 0.0;
  double h = 0;
  for (auto v : load)
    if (v > 0) {
      double const p = static_cast<double>(v) / total;
      h -= p * std::log(p);
    }
  return h;
}

/// Bytes of scratch par_loss_from_labels needs (independent of n_tokens).
/// \throws value_error unless d_model, n_experts >= 1 and 1 <= top_k <= n_experts.
inline std::size_t par_loss_from_labels_workspace_bytes(std::ptrdiff_t d_model, std::ptrdiff_t n_experts,
                                                        std::ptrdiff_t top_k) {
  if (d_model < 1 || n_experts < 1 || top_k < 1 || top_k > n_experts)
    throw value_error(detail::concat("par_loss_from_labels_workspace_bytes: need d_model, n_experts >= 1 and top_k in ",
                                     "[1, n_experts]; got ", d_model, ", ", n_experts, ", ", top_k));
  if (n_experts > (std::ptrdiff_t{1} << 40) / (d_model + 1))
    throw value_error("par_loss_from_labels_workspace_bytes: sizes too large: the workspace size would overflow");
  detail::WorkspaceLayout layout;
  return detail::ParRouterAccumulator::add_scratch(layout, d_model, n_experts, top_k).bytes();
}

/// Computes the PAR + balance losses and their router gradients (the same quantities as train::par_loss, spec 3.2)
/// for tokens whose pseudo-labels are already known, e.g. from par_oracle_labels. Fills every field of `out` except
/// mse_to_target, which is left as it was (the MSEs are not needed once the labels are known).
/// \param x       [n_tokens >= 1, d_model]; \param labels  [n_tokens, top_k] the tokens' pseudo-labels
/// \param ws      scratch of at least par_loss_from_labels_workspace_bytes(d_model, n_experts, top_k) bytes
/// \throws value_error for no tokens, a bad top_k or clip, or a label outside [0, n_experts); shape_error for
///         mismatched shapes; backend_error if ws is too small.
template <class A>
void par_loss_from_labels(MatrixView<A const> x, MatrixView<std::int32_t const> labels, moe::Router<A> const& router,
                          std::ptrdiff_t top_k, ParLossConfig const& config, ParLossResult<A>& out, Workspace& ws) {
  char const* fn = "par_loss_from_labels";
  std::ptrdiff_t const n_tokens = x.rows(), n = router.n_experts(), d = router.d_model(), k = top_k;
  if (n_tokens < 1) throw value_error("par_loss_from_labels: argument 'x' has no tokens; the loss is a mean over tokens");
  detail::require_shape(x, {n_tokens, d}, fn, "x");
  if (k < 1 || k > n) throw value_error(detail::concat(fn, ": top_k = ", k, " must be in [1, n_experts = ", n, "]"));
  detail::require_shape(labels, {n_tokens, k}, fn, "labels");
  if (!(config.clip > 0 && config.clip < 0.5))
    throw value_error(detail::concat(fn, ": config.clip = ", config.clip, " must be in (0, 0.5)"));
  for (std::ptrdiff_t t = 0; t < n_tokens; ++t)
    for (std::ptrdiff_t j = 0; j < k; ++j)
      if (labels(t, j) < 0 || labels(t, j) >= n)
        throw value_error(detail::concat(fn, ": argument 'labels' entry (", t, ", ", j, ") = ", labels(t, j),
                                         " is outside [0, ", n, ")"));
  out.resize(n_tokens, d, n, k);

  detail::WorkspaceCursor cursor(ws, fn);
  detail::ParRouterAccumulator router_terms(cursor, n_tokens, d, n, k, config.clip);
  for (std::ptrdiff_t t = 0; t < n_tokens; ++t) {
    A const* xr = x.row(t);
    router_terms.route(router, xr);                  // spec 3.2 step 1
    router_terms.add_token(t, xr, labels.row(t), out);  // steps 6-7 and the balance term
  }
  router_terms.finish(config, out);
}

/// Which pseudo-labels a router is trained toward (RouterTrainConfig::labels) and measured against (diagnose_layer).
enum class LabelKind {
  par,     ///< the paper's PAR labels (spec 3.2 step 5): the K experts individually closest to f / floor(N/K)
  subset,  ///< the K-subset S whose SUMMED output is closest to f, argmin_S || sum_{n in S} e_n - f || (the paper
           ///< code's unused get_label, spec 3.2): what a plain-sum gating (code_ref with output_scale
           ///< 1 / floor(N/K), every selected expert weighted 1) actually outputs
};

/// The largest n_experts subset_oracle_labels accepts: it enumerates all C(N, K) subsets per token.
inline constexpr std::ptrdiff_t kMaxSubsetExperts = 16;

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
  detail_train::validate_dense_experts(dense, experts, fn);
  detail_train::validate_experts_x(x, experts, top_k, fn);
  std::ptrdiff_t const n_tokens = x.rows(), n = experts.n_experts(), k = top_k;
  if (n > kMaxSubsetExperts)
    throw value_error(detail::concat(fn, ": n_experts = ", n, " exceeds ", kMaxSubsetExperts,
                                     " (the subset labels enumerate all C(N, K) subsets per token)"));
  Matrix<std::int32_t> labels({n_tokens, k});
  factorllm::detail::RowMatrixD gram(n, n);
  std::vector<double> dot_f(static_cast<std::size_t>(n));
  std::vector<std::ptrdiff_t> pick(static_cast<std::size_t>(k)), best(static_cast<std::size_t>(k));
  detail_train::for_each_teacher_expert_chunk(x, dense, experts, [&](std::ptrdiff_t t0, std::ptrdiff_t c,
                                                                    detail_train::ChunkScratch const& sc) {
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

/// Per-layer conversion diagnostics (see diagnose_layer).
struct LayerDiagnostics {
  std::int64_t n_tokens = 0;
  double relative_error = 0;           // ||MoE(X) - F(X)||_F / ||F(X)||_F over the tokens
  double label_accuracy = 0;           // fraction of tokens whose router TopK set equals the PAR pseudo-label set
  double par_loss = 0;                 // mean KL of the router to the PAR target (spec 3.2)
  std::vector<std::int64_t> load;      // [n_experts] token slots routed to each expert
  double load_entropy = 0;             // entropy of load (nats)
  double load_entropy_normalized = 0;  // load_entropy / log(n_experts): 1 = perfectly balanced (1 when N = 1)
};

namespace detail_train {

/// Relative error of `layer` (a MoeFfn or SharedExpertMoe) against the dense FFN on x, plus the routed layer's load.
template <class Backend, class Layer, class T, class A>
void output_and_load(Layer const& layer, MatrixView<A const> x, ffn::DenseFfnView<T> const& dense, std::ptrdiff_t n_routed,
                     LayerDiagnostics& r) {
  std::ptrdiff_t const n_tokens = x.rows(), d = dense.d_model();
  r.n_tokens = n_tokens;
  Matrix<A> y_moe({n_tokens, d}), y_dense({n_tokens, d});
  moe::RoutingRecord<A> record;
  {
    Workspace ws(layer.workspace_bytes(n_tokens));
    layer.forward(x, y_moe.view(), ws, &record);
  }
  ffn::swiglu_forward(dense, x, y_dense.view(), Backend{});
  double num = 0, den = 0;
  for (std::ptrdiff_t i = 0; i < y_moe.size(); ++i) {
    double const diff = static_cast<double>(y_moe[i]) - static_cast<double>(y_dense[i]);
    num += diff * diff;
    den += static_cast<double>(y_dense[i]) * static_cast<double>(y_dense[i]);
  }
  r.relative_error = std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
  r.load = load_histogram(record);
  r.load_entropy = load_entropy(r.load);
  r.load_entropy_normalized = n_routed > 1 ? r.load_entropy / std::log(static_cast<double>(n_routed)) : 1.0;
}

/// The router of a layer against the chosen pseudo-labels: label_accuracy and par_loss of r. The labels come from
/// the chunked-GEMM oracles (par_oracle_labels equals par_loss's pseudo-labels), then par_loss_from_labels gives
/// par_loss's numbers without its per-token scalar expert forward.
template <class T, class A>
void router_against_labels(MatrixView<A const> x, ffn::DenseFfnView<T> const& dense, ffn::ExpertWeights<T> const& experts,
                           moe::Router<A> const& router, std::ptrdiff_t top_k, ParLossConfig const& config,
                           LabelKind labels, LayerDiagnostics& r) {
  Matrix<std::int32_t> const lab = labels == LabelKind::subset ? subset_oracle_labels(x, dense, experts, top_k)
                                                               : par_oracle_labels(x, dense, experts, top_k);
  Workspace ws(par_loss_from_labels_workspace_bytes(experts.d_model(), experts.n_experts(), top_k));
  ParLossResult<A> res;
  par_loss_from_labels(x, lab.cview(), router, top_k, config, res, ws);
  r.label_accuracy = res.label_accuracy;
  r.par_loss = res.par_loss;
}

}  // namespace detail_train

/// Measures one converted layer on the tokens x: the MoE output against the dense FFN, the router against the PAR
/// pseudo-labels (par_loss's label_accuracy: the router's TopK of the raw logits, without the gating's selection
/// bias, against the labels computed from the dense teacher), and the expert load of the layer's own routing.
/// \param layer   the MoE layer (any backend; its forward is what is measured)
/// \param x       [n_tokens >= 1, d_model] FFN inputs
/// \param dense   the dense FFN the layer replaces
/// \param labels  the pseudo-labels label_accuracy and par_loss refer to: LabelKind::par (par_loss's own labels) or
///                LabelKind::subset (subset_oracle_labels; n_experts <= kMaxSubsetExperts), e.g. the kind the
///                router was trained on (RouterTrainConfig::labels)
/// \throws value_error for no tokens (or n_experts > kMaxSubsetExperts with subset labels); shape_error for
///         mismatched shapes.
template <class T, class Backend, class A>
LayerDiagnostics diagnose_layer(moe::MoeFfn<T, Backend> const& layer, MatrixView<A const> x,
                                ffn::DenseFfnView<T> const& dense, ParLossConfig const& config = {},
                                LabelKind labels = LabelKind::par) {
  char const* fn = "diagnose_layer";
  detail_train::validate_dense_experts(dense, layer.experts(), fn);
  detail_train::validate_experts_x(x, layer.experts(), layer.top_k(), fn);
  LayerDiagnostics r;
  detail_train::output_and_load<Backend>(layer, x, dense, layer.n_experts(), r);
  detail_train::router_against_labels(x, dense, layer.experts(), layer.router(), layer.top_k(), config, labels, r);
  return r;
}

/// Measures a shared-expert layer (moe::SharedExpertMoe) like diagnose_layer: the whole layer's output against the
/// dense FFN, the routed experts' load (n_routed entries), and the router against the PAR labels of the ROUTED
/// experts, whose teacher is their own sum (= F minus the shared experts before any recovery; the same target
/// train_router uses when given ffn::unfactorize(routed experts) as the dense FFN).
/// \param labels  as for the MoeFfn overload (the labels of the routed experts against their own sum)
/// \throws value_error for no tokens; shape_error for mismatched shapes.
template <class T, class Backend, class A>
LayerDiagnostics diagnose_layer(moe::SharedExpertMoe<T, Backend> const& layer, MatrixView<A const> x,
                                ffn::DenseFfnView<T> const& dense, ParLossConfig const& config = {},
                                LabelKind labels = LabelKind::par) {
  char const* fn = "diagnose_layer";
  dense.validate(fn);
  auto const& routed = layer.routed().experts();
  if (layer.d_model() != dense.d_model() || (layer.n_shared() + layer.n_routed()) * layer.d_expert() != dense.d_ff())
    throw shape_error(detail::concat(fn, ": argument 'layer' has d_model ", layer.d_model(), " and ",
                                     layer.n_shared() + layer.n_routed(), " experts of ", layer.d_expert(),
                                     " neurons; the dense FFN has d_model ", dense.d_model(), ", d_ff ", dense.d_ff()));
  detail_train::validate_experts_x(x, routed, layer.top_k(), fn);
  LayerDiagnostics r;
  detail_train::output_and_load<Backend>(layer, x, dense, layer.n_routed(), r);
  auto const routed_teacher = ffn::unfactorize(routed);
  detail_train::router_against_labels(x, routed_teacher.view(), routed, layer.routed().router(), layer.top_k(), config,
                                      labels, r);
  return r;
}

}  // namespace train
}  // namespace factorllm
