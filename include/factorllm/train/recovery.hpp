// SPDX-License-Identifier: Apache-2.0
// Layer-local recovery of the experts with the router fixed (stage B of spec 3.2, done per layer instead of with
// the LM loss): a closed-form ridge refit of every expert's down projection, and distillation of the selected
// experts' gate, up and down weights toward the dense FFN's output.
//
// Both minimize the layer's output error on calibration inputs x_t with the routing held fixed:
//   MoE(x_t) = sum_j w_tj E_{e_tj}(x_t),  E_e(x) = W_d,e (SiLU(W_g,e x) * (W_u,e x)),
// where e_tj and w_tj are the experts and combine weights that router + gating give token t (every gating mode;
// the weights do not depend on the expert parameters, so they are constants here). The routing is data
// (FixedRouting, computed once per call by fixed_routing from the fixed router), which also covers layers with
// always-on shared experts (moe::SharedExpertMoe): they are slots with weight 1 that every token uses.
// Computation: double Eigen products for the refit; Eigen products in the activation type for distillation (double
// for double weights, which the gradient tests use). Eigen runs single-threaded, so results do not depend on the
// OpenMP thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../core/tensor_view.hpp"
#include "../detail/math.hpp"
#include "../detail/eigen_serial.hpp"
#include "../ffn/factorize.hpp"
#include "../moe/gating.hpp"
#include "../moe/router.hpp"
#include "../moe/topk.hpp"
#include "adam.hpp"
#include "detail/batch_sampler.hpp"
#include "detail/calibration_passes.hpp"
#include "detail/validation.hpp"

namespace factorllm {
namespace detail {

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

}  // namespace detail

namespace train {

/// A fixed routing of n_tokens tokens: which experts each token uses and with what weight its output is combined,
/// MoE(x_t) = sum_j weights(t, j) E_{ids(t, j)}(x_t). Recovery takes the routing as data so that it also covers
/// layers with always-on shared experts (fixed_routing with n_shared > 0).
template <class A>
struct FixedRouting {
  Matrix<std::int32_t> ids;  // [n_tokens, slots] expert ids, distinct within a row
  Matrix<A> weights;         // [n_tokens, slots] combine weights
};

/// Computes the routing router + gating give every row of x (logits, TopK with the selection bias, the mode's
/// combine weights and output scale: exactly what moe::MoeFfn does). With n_shared > 0 the routing is that of a
/// shared-expert layer (moe::SharedExpertMoe) over n_shared + n_routed experts: every token also uses experts
/// 0 .. n_shared-1 with weight 1 (slots 0 .. n_shared-1), and the router's expert e becomes expert n_shared + e.
/// \param x  [n_tokens, d_model]; \returns ids and weights of shape [n_tokens, n_shared + top_k]
/// \throws value_error for an invalid gating or n_shared < 0; shape_error if x does not match the router.
template <class A>
FixedRouting<A> fixed_routing(moe::Router<A> const& router, moe::Gating const& gating, MatrixView<A const> x,
                              std::ptrdiff_t n_shared = 0) {
  char const* fn = "fixed_routing";
  gating.validate(router.n_experts(), fn);
  if (n_shared < 0) throw value_error(detail::concat(fn, ": n_shared must be >= 0, got ", n_shared));
  detail::require_shape(x, {x.rows(), router.d_model()}, fn, "x");
  Matrix<std::int32_t> ids;
  Matrix<A> weights;
  detail::route_all(router, gating, x, ids, weights);
  if (n_shared == 0) return FixedRouting<A>{std::move(ids), std::move(weights)};
  std::ptrdiff_t const k = gating.top_k;
  FixedRouting<A> r{Matrix<std::int32_t>({x.rows(), n_shared + k}), Matrix<A>({x.rows(), n_shared + k})};
  for (std::ptrdiff_t t = 0; t < x.rows(); ++t) {
    for (std::ptrdiff_t s = 0; s < n_shared; ++s) {
      r.ids(t, s) = static_cast<std::int32_t>(s);
      r.weights(t, s) = A(1);
    }
    for (std::ptrdiff_t j = 0; j < k; ++j) {
      r.ids(t, n_shared + j) = static_cast<std::int32_t>(n_shared + ids(t, j));
      r.weights(t, n_shared + j) = weights(t, j);
    }
  }
  return r;
}

/// What recover_refit measured on the calibration set.
struct RefitReport {
  double initial_relative_error = 0;  // ||MoE(X) - F(X)||_F / ||F(X)||_F before the refit
  double final_relative_error = 0;    // the same after it (with the new weights rounded to T)
  double lambda = 0;                  // the absolute ridge strength used: ridge * tr(Z^T Z) / d_ff
  std::int64_t n_tokens = 0;
};

}  // namespace train

namespace detail {

template <class T>
void validate_recovery(ffn::ExpertWeights<T> const& experts, train::FixedRouting<activation_t<T>> const& routing,
                       MatrixView<activation_t<T> const> x, ffn::DenseFfnView<T> const& dense, char const* fn) {
  validate_dense_experts(dense, experts, fn);
  if (experts.gate_tensor().empty()) throw value_error(concat(fn, ": argument 'experts' holds no experts (default-constructed)"));
  if (x.rows() < 1) throw value_error(concat(fn, ": argument 'x_calib' has no tokens; recovery needs a calibration set"));
  require_shape(x, {x.rows(), dense.d_model()}, fn, "x_calib");
  std::ptrdiff_t const slots = routing.ids.extent(1), n = experts.n_experts();
  if (slots < 1) throw shape_error(concat(fn, ": argument 'routing.ids' has no slots per token"));
  require_shape(routing.ids.cview(), {x.rows(), slots}, fn, "routing.ids");
  require_shape(routing.weights.cview(), {x.rows(), slots}, fn, "routing.weights");
  for (std::ptrdiff_t t = 0; t < x.rows(); ++t)
    for (std::ptrdiff_t j = 0; j < slots; ++j) {
      std::int32_t const e = routing.ids(t, j);
      if (e < 0 || e >= n)
        throw value_error(concat(fn, ": argument 'routing.ids' entry (", t, ", ", j, ") = ", e, " is outside [0, n_experts = ", n, ")"));
      for (std::ptrdiff_t q = 0; q < j; ++q)
        if (routing.ids(t, q) == e) throw value_error(concat(fn, ": argument 'routing.ids' repeats expert ", e, " in row ", t));
    }
}

template <class T>
void validate_router(ffn::ExpertWeights<T> const& experts, moe::Router<activation_t<T>> const& router, moe::Gating const& gating,
                     std::ptrdiff_t n_shared, char const* fn) {
  if (n_shared < 0 || n_shared >= experts.n_experts())
    throw value_error(concat(fn, ": n_shared = ", n_shared, " must be in [0, n_experts = ", experts.n_experts(), ")"));
  if (router.n_experts() != experts.n_experts() - n_shared || router.d_model() != experts.d_model())
    throw shape_error(concat(fn, ": argument 'router' has shape ",
                             shape_string({router.n_experts(), router.d_model()}), ", expected ",
                             shape_string({experts.n_experts() - n_shared, experts.d_model()}),
                             " [routed experts, d_model]"));
  gating.validate(router.n_experts(), fn);
}

/// The masked, weighted hidden features of the refit: Z[r, e*m .. (e+1)*m) = w_tj h_e(x_t) for the experts e = e_tj
/// token t = t0 + r selects, zero elsewhere. h must hold every expert's hidden activations of the chunk.
template <class A>
void refit_features(Eigen::Ref<RowMatrixD const> h, std::ptrdiff_t t0, std::ptrdiff_t c, std::ptrdiff_t m,
                    train::FixedRouting<A> const& routing, Eigen::Ref<RowMatrixD> z) {
  z.setZero();
  for (std::ptrdiff_t r = 0; r < c; ++r)
    for (std::ptrdiff_t j = 0; j < routing.ids.extent(1); ++j) {
      std::ptrdiff_t const e = routing.ids(t0 + r, j);
      z.row(r).segment(e * m, m) = static_cast<double>(routing.weights(t0 + r, j)) * h.row(r).segment(e * m, m);
    }
}

}  // namespace detail

namespace train {

/// Refits every expert's down projection in closed form, all experts jointly, under the fixed routing:
///   minimize_D  sum_t || sum_j w_tj D_{e_tj} h_{e_tj}(x_t) - F(x_t) ||^2 + lambda || D - D_0 ||^2
/// over the stacked down weights D (D_e = W_d,e), where D_0 are the current down weights and
/// lambda = ridge * tr(Z^T Z) / d_ff (scale free: ridge is relative to the mean feature energy). With the features
/// z_t = [.., w_tj h_{e_tj}(x_t) in block e_tj, ..] of size n_experts * d_expert = d_ff, the solution is
///   (Z^T Z + lambda I) (D - D_0)^T = Z^T F - Z^T Z D_0^T,
/// solved by LDLT on the d_ff x d_ff normal matrix (accumulated in double over token chunks).
/// Why the ridge pulls toward D_0 and not toward 0: an expert that few calibration tokens select keeps its factorized
/// weights instead of being shrunk to zero, which matters on held-out tokens that do select it; ridge -> infinity
/// leaves the experts unchanged, ridge = 0 is plain least squares (LDLT with pivoting: directions no token excites,
/// e.g. the features of an expert no token selects, have zero pivots and keep their current weights).
/// Gate and up weights are untouched. Memory: O(d_ff^2) for the normal matrix.
/// \param experts  updated in place (down weights only); nothing is modified when an error is thrown
/// \param routing  the fixed routing of x_calib (fixed_routing(router, gating, x_calib[, n_shared]))
/// \param x_calib  [n_tokens >= 1, d_model] the layer's FFN inputs; \param dense  the dense FFN (the target F)
/// \param ridge    relative ridge strength, >= 0 and finite (e.g. 1e-3)
/// \returns relative errors on x_calib before and after, and the absolute lambda used
/// \throws value_error for an empty calibration set, a negative or non-finite ridge, a routing id outside
///         [0, n_experts) or repeated in a row, or a solve that is not finite (ridge = 0 on a numerically singular
///         system); shape_error for mismatched shapes.
template <class T>
RefitReport recover_refit(ffn::ExpertWeights<T>& experts, FixedRouting<activation_t<T>> const& routing,
                          MatrixView<activation_t<T> const> x_calib, ffn::DenseFfnView<T> const& dense, double ridge) {
  char const* fn = "recover_refit";
  detail::validate_recovery(experts, routing, x_calib, dense, fn);
  if (!(ridge >= 0) || !std::isfinite(ridge)) throw value_error(detail::concat(fn, ": ridge must be >= 0 and finite, got ", ridge));
  std::ptrdiff_t const n_tokens = x_calib.rows(), n = experts.n_experts(), m = experts.d_expert(), d = experts.d_model(),
                       p = n * m;
  RefitReport report;
  report.n_tokens = n_tokens;
  detail::run_eigen_serial([&] {
    using detail::RowMatrixD;
    auto const dw = detail::dense_double(dense);
    auto w = detail::experts_double(experts);
    std::ptrdiff_t const chunk = detail::kCalibrationChunkTokens;
    detail::ChunkScratch sc(chunk, d, std::max(p, dense.d_ff()), 0);
    RowMatrixD z(chunk, p);
    auto stacked_down = [&](detail::ExpertsDouble const& ew) {
      RowMatrixD s(p, d);  // [d_ff, d_model]: row e*m + i is column i of expert e's down
      for (std::ptrdiff_t e = 0; e < n; ++e) s.middleRows(e * m, m) = ew.down[static_cast<std::size_t>(e)].transpose();
      return s;
    };
    // One pass over the tokens: err = sum_t ||z_t D^T - f_t||^2 (and optionally the normal equations).
    auto pass = [&](RowMatrixD const& down_t, Eigen::MatrixXd* normal, RowMatrixD* rhs, double& f_sq) {
      double err = 0;
      f_sq = 0;
      for (std::ptrdiff_t t0 = 0; t0 < n_tokens; t0 += chunk) {
        std::ptrdiff_t const c = std::min(chunk, n_tokens - t0);
        detail::gather_rows_double(x_calib, t0, c, sc.x.topRows(c));
        detail::dense_output_chunk(dw, c, sc);
        detail::swiglu_hidden(w.gate, w.up, sc.x.topRows(c), sc.h.topLeftCorner(c, p), sc.pre.topLeftCorner(c, p));
        detail::refit_features(sc.h.topLeftCorner(c, p), t0, c, m, routing, z.topRows(c));
        if (normal != nullptr) {
          normal->selfadjointView<Eigen::Lower>().rankUpdate(z.topRows(c).transpose());
          rhs->noalias() += z.topRows(c).transpose() * sc.f.topRows(c);
        }
        err += (z.topRows(c) * down_t - sc.f.topRows(c)).squaredNorm();
        f_sq += sc.f.topRows(c).squaredNorm();
      }
      return err;
    };
    RowMatrixD const d0 = stacked_down(w);
    Eigen::MatrixXd normal = Eigen::MatrixXd::Zero(p, p);
    RowMatrixD rhs = RowMatrixD::Zero(p, d);
    double f_sq = 0;
    double const err0 = pass(d0, &normal, &rhs, f_sq);
    report.initial_relative_error = std::sqrt(err0) / std::max(std::sqrt(f_sq), 1e-300);
    // Normal equations of the update (D - D_0)^T, so the ridge pulls toward D_0 (see the brief above).
    double const lambda = ridge * normal.trace() / static_cast<double>(p);
    report.lambda = lambda;
    rhs.noalias() -= normal.selfadjointView<Eigen::Lower>() * d0;
    normal.diagonal().array() += lambda;
    Eigen::LDLT<Eigen::MatrixXd, Eigen::Lower> ldlt(normal);
    RowMatrixD const delta = ldlt.solve(rhs);
    if (ldlt.info() != Eigen::Success || !delta.allFinite())
      throw value_error(detail::concat(fn, ": the normal equations are singular (ridge = ", ridge,
                                       "); use ridge > 0 or more calibration tokens"));
    RowMatrixD const d1 = d0 + delta;
    auto& down = experts.mutable_down_tensor();
    for (std::ptrdiff_t e = 0; e < n; ++e)
      for (std::ptrdiff_t o = 0; o < d; ++o)
        for (std::ptrdiff_t i = 0; i < m; ++i) down(e, o, i) = from_double<T>(d1(e * m + i, o));
    w = detail::experts_double(experts);
    double const err1 = pass(stacked_down(w), nullptr, nullptr, f_sq);
    report.final_relative_error = std::sqrt(err1) / std::max(std::sqrt(f_sq), 1e-300);
  });
  return report;
}

/// recover_refit with the routing of router + gating (a plain K-of-N layer, moe::MoeFfn):
/// recover_refit(experts, fixed_routing(router, gating, x_calib), x_calib, dense, ridge).
/// \throws as the routing overload; value_error for an invalid gating; shape_error if the router does not match.
template <class T>
RefitReport recover_refit(ffn::ExpertWeights<T>& experts, moe::Router<activation_t<T>> const& router,
                          moe::Gating const& gating, MatrixView<activation_t<T> const> x_calib,
                          ffn::DenseFfnView<T> const& dense, double ridge) {
  detail::validate_router(experts, router, gating, 0, "recover_refit");
  detail::require_shape(x_calib, {x_calib.rows(), experts.d_model()}, "recover_refit", "x_calib");
  return recover_refit(experts, fixed_routing(router, gating, x_calib), x_calib, dense, ridge);
}

/// Settings of recover_distill (Adam on the experts' weights; Adam's defaults, spec 4.1 uses beta2 = 0.95).
struct DistillConfig {
  int steps = 300;          // Adam steps (0: only evaluate)
  int batch_tokens = 128;   // tokens per minibatch (all tokens when the calibration set is smaller)
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  std::uint64_t seed = 0;   // seeds the minibatch order
};

/// What recover_distill measured on the whole calibration set, before and after.
struct DistillReport {
  double initial_loss = 0, final_loss = 0;                      // mean_t ||MoE(x_t) - F(x_t)||^2
  double initial_relative_error = 0, final_relative_error = 0;  // ||MoE(X) - F(X)||_F / ||F(X)||_F
  int steps = 0;
};

/// Gradients of the distillation loss, shaped like the experts' stacked tensors (float for float and bf16
/// weights, double for double weights).
template <class A>
struct ExpertGrads {
  Tensor<A, 3> gate;  // [n_experts, d_expert, d_model]
  Tensor<A, 3> up;    // [n_experts, d_expert, d_model]
  Tensor<A, 3> down;  // [n_experts, d_model, d_expert]

  /// Makes every tensor have the experts' shapes (allocating only on change).
  void resize(std::ptrdiff_t n_experts, std::ptrdiff_t d_expert, std::ptrdiff_t d_model) {
    std::array<std::ptrdiff_t, 3> const gu{n_experts, d_expert, d_model}, dn{n_experts, d_model, d_expert};
    if (gate.extents() != gu) gate = Tensor<A, 3>(gu);
    if (up.extents() != gu) up = Tensor<A, 3>(gu);
    if (down.extents() != dn) down = Tensor<A, 3>(dn);
  }
};

}  // namespace train

namespace detail {

/// d SiLU(a) / da = sigmoid(a) (1 + a (1 - sigmoid(a))), from the stable sigmoid.
inline double silu_prime(double a) noexcept {
  double const sg = sigmoid(a);
  return sg * (1.0 + a * (1.0 - sg));
}

/// Scratch of one distillation evaluation over up to max_rows tokens (allocated once, reused every step).
template <class A>
struct DistillScratch {
  using Mat = Eigen::Matrix<A, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Mat xs, g, u, h, o;  // [max_rows * top_k, d_model or d_expert], slots grouped by expert
  Mat y;               // [max_rows, d_model] MoE output, then dL/dy
  std::vector<std::ptrdiff_t> offsets, next, slot_token;
  std::vector<A> slot_weight;
  DistillScratch(std::ptrdiff_t max_rows, std::ptrdiff_t top_k, std::ptrdiff_t n, std::ptrdiff_t m, std::ptrdiff_t d)
      : xs(max_rows * top_k, d), g(max_rows * top_k, m), u(max_rows * top_k, m), h(max_rows * top_k, m),
        o(max_rows * top_k, d), y(max_rows, d), offsets(static_cast<std::size_t>(n + 1)), next(static_cast<std::size_t>(n)),
        slot_token(static_cast<std::size_t>(max_rows * top_k)), slot_weight(static_cast<std::size_t>(max_rows * top_k)) {}
};

/// Loss mean_t ||sum_j w_tj E_{e_tj}(x_t) - target_t||^2 over the rows of x and, when grads is not null, its
/// gradient w.r.t. every expert's gate, up and down weights (overwritten; zero for an expert no row selects).
/// Backward of E(x) = W_d h, h = SiLU(g) * u, g = W_g x, u = W_u x, with dL/dy = 2 (y - target) / n_rows:
///   dW_d += (w dL/dy) h^T;  dh = W_d^T (w dL/dy);  dW_g += (dh * u * SiLU'(g)) x^T;  dW_u += (dh * SiLU(g)) x^T.
/// Parameters are dense stacked tensors in the activation type A. The loss is accumulated in double.
template <class A>
double distill_batch(TensorView<A const, 3> gate, TensorView<A const, 3> up, TensorView<A const, 3> down,
                     MatrixView<A const> x, MatrixView<A const> target, MatrixView<std::int32_t const> ids,
                     MatrixView<A const> weights, train::ExpertGrads<A>* grads, DistillScratch<A>& s) {
  using Mat = typename DistillScratch<A>::Mat;
  using CMap = Eigen::Map<Mat const>;
  using MMap = Eigen::Map<Mat>;
  std::ptrdiff_t const rows = x.rows(), k = ids.cols(), n = gate.extent(0), m = gate.extent(1), d = gate.extent(2);
  // Group the slots (t, j) by expert with a stable counting sort (deterministic order).
  std::fill(s.offsets.begin(), s.offsets.end(), 0);
  for (std::ptrdiff_t t = 0; t < rows; ++t)
    for (std::ptrdiff_t j = 0; j < k; ++j) ++s.offsets[static_cast<std::size_t>(ids(t, j) + 1)];
  for (std::ptrdiff_t e = 0; e < n; ++e) s.offsets[static_cast<std::size_t>(e + 1)] += s.offsets[static_cast<std::size_t>(e)];
  std::copy(s.offsets.begin(), s.offsets.end() - 1, s.next.begin());
  for (std::ptrdiff_t t = 0; t < rows; ++t)
    for (std::ptrdiff_t j = 0; j < k; ++j) {
      auto const slot = static_cast<std::size_t>(s.next[static_cast<std::size_t>(ids(t, j))]++);
      s.slot_token[slot] = t;
      s.slot_weight[slot] = weights(t, j);
      std::copy(x.row(t), x.row(t) + d, s.xs.row(static_cast<Eigen::Index>(slot)).data());
    }
  // Forward, expert by expert on its own rows.
  s.y.topRows(rows).setZero();
  for (std::ptrdiff_t e = 0; e < n; ++e) {
    std::ptrdiff_t const o0 = s.offsets[static_cast<std::size_t>(e)], c = s.offsets[static_cast<std::size_t>(e + 1)] - o0;
    if (c == 0) continue;
    CMap const wg(gate.data() + e * m * d, m, d), wu(up.data() + e * m * d, m, d), wd(down.data() + e * d * m, d, m);
    s.g.middleRows(o0, c).noalias() = s.xs.middleRows(o0, c) * wg.transpose();
    s.u.middleRows(o0, c).noalias() = s.xs.middleRows(o0, c) * wu.transpose();
    for (std::ptrdiff_t r = o0; r < o0 + c; ++r)
      for (std::ptrdiff_t i = 0; i < m; ++i)
        s.h(r, i) = static_cast<A>(detail::silu(static_cast<double>(s.g(r, i)))) * s.u(r, i);
    s.o.middleRows(o0, c).noalias() = s.h.middleRows(o0, c) * wd.transpose();
  }
  for (std::ptrdiff_t slot = 0; slot < rows * k; ++slot)  // combine in grouped order: fixed, deterministic
    s.y.row(s.slot_token[static_cast<std::size_t>(slot)]) += s.slot_weight[static_cast<std::size_t>(slot)] * s.o.row(slot);
  double loss = 0;
  for (std::ptrdiff_t t = 0; t < rows; ++t)
    for (std::ptrdiff_t c = 0; c < d; ++c) {
      double const r = static_cast<double>(s.y(t, c)) - static_cast<double>(target(t, c));
      loss += r * r;
      s.y(t, c) = static_cast<A>(2.0 * r / static_cast<double>(rows));  // y now holds dL/dy
    }
  loss /= static_cast<double>(rows);
  if (grads == nullptr) return loss;

  // Backward, expert by expert (o becomes w * dL/dy per slot, h becomes dL/dh, g and u their gradients).
  for (std::ptrdiff_t e = 0; e < n; ++e) {
    std::ptrdiff_t const o0 = s.offsets[static_cast<std::size_t>(e)], c = s.offsets[static_cast<std::size_t>(e + 1)] - o0;
    MMap dwg(grads->gate.data() + e * m * d, m, d), dwu(grads->up.data() + e * m * d, m, d),
        dwd(grads->down.data() + e * d * m, d, m);
    if (c == 0) {
      dwg.setZero();
      dwu.setZero();
      dwd.setZero();
      continue;
    }
    CMap const wd(down.data() + e * d * m, d, m);
    for (std::ptrdiff_t r = o0; r < o0 + c; ++r)
      s.o.row(r) = s.slot_weight[static_cast<std::size_t>(r)] * s.y.row(s.slot_token[static_cast<std::size_t>(r)]);
    dwd.noalias() = s.o.middleRows(o0, c).transpose() * s.h.middleRows(o0, c);
    s.h.middleRows(o0, c).noalias() = s.o.middleRows(o0, c) * wd;
    for (std::ptrdiff_t r = o0; r < o0 + c; ++r)
      for (std::ptrdiff_t i = 0; i < m; ++i) {
        double const g = static_cast<double>(s.g(r, i)), dh = static_cast<double>(s.h(r, i));
        s.g(r, i) = static_cast<A>(dh * static_cast<double>(s.u(r, i)) * silu_prime(g));
        s.u(r, i) = static_cast<A>(dh * detail::silu(g));
      }
    dwg.noalias() = s.g.middleRows(o0, c).transpose() * s.xs.middleRows(o0, c);
    dwu.noalias() = s.u.middleRows(o0, c).transpose() * s.xs.middleRows(o0, c);
  }
  return loss;
}

/// Copies stacked expert tensors into the activation type (the master weights distillation updates).
template <class T>
Tensor<activation_t<T>, 3> to_activation_tensor(Tensor<T, 3> const& src) {
  Tensor<activation_t<T>, 3> dst(src.extents());
  for (std::ptrdiff_t i = 0; i < src.size(); ++i) dst[i] = static_cast<activation_t<T>>(to_double(src[i]));
  return dst;
}

/// F(x) of every row of x in the activation type, through chunked double GEMMs.
template <class T, class A>
Matrix<A> dense_targets(ffn::DenseFfnView<T> const& dense, MatrixView<A const> x) {
  std::ptrdiff_t const n_tokens = x.rows(), d = dense.d_model();
  Matrix<A> f({n_tokens, d});
  auto const dw = dense_double(dense);
  ChunkScratch sc(kCalibrationChunkTokens, d, dense.d_ff(), 0);
  for (std::ptrdiff_t t0 = 0; t0 < n_tokens; t0 += kCalibrationChunkTokens) {
    std::ptrdiff_t const c = std::min(kCalibrationChunkTokens, n_tokens - t0);
    gather_rows_double(x, t0, c, sc.x.topRows(c));
    dense_output_chunk(dw, c, sc);
    for (std::ptrdiff_t r = 0; r < c; ++r)
      for (std::ptrdiff_t o = 0; o < d; ++o) f(t0 + r, o) = static_cast<A>(sc.f(r, o));
  }
  return f;
}

}  // namespace detail

namespace train {

/// Computes the distillation loss mean_t || MoE(x_t) - F(x_t) ||^2 (squared L2 over d_model, mean over tokens) under
/// a fixed routing, and its gradient w.r.t. every expert's gate, up and down weights (the combine weights are
/// constants). The function recover_distill minimizes; exposed so that the gradient can be checked against finite
/// differences.
/// \param experts  the experts (any weight type; the computation runs in activation_t<T>)
/// \param routing  the routing of x (fixed_routing(router, gating, x[, n_shared]))
/// \param x        [n_tokens >= 1, d_model]; \param dense  the dense FFN (the target F)
/// \param grads    out: resized to the experts' shapes and overwritten (zero for an expert no token uses)
/// \returns the loss
/// \throws value_error for no tokens or a routing id outside [0, n_experts) or repeated; shape_error for mismatched
///         shapes.
template <class T>
double distill_loss_and_grad(ffn::ExpertWeights<T> const& experts, FixedRouting<activation_t<T>> const& routing,
                             MatrixView<activation_t<T> const> x, ffn::DenseFfnView<T> const& dense,
                             ExpertGrads<activation_t<T>>& grads) {
  using A = activation_t<T>;
  detail::validate_recovery(experts, routing, x, dense, "distill_loss_and_grad");
  std::ptrdiff_t const n = experts.n_experts(), m = experts.d_expert(), d = experts.d_model();
  grads.resize(n, m, d);
  double loss = 0;
  detail::run_eigen_serial([&] {
    Matrix<A> const target = detail::dense_targets(dense, x);
    auto const gate = detail::to_activation_tensor(experts.gate_tensor());
    auto const up = detail::to_activation_tensor(experts.up_tensor());
    auto const down = detail::to_activation_tensor(experts.down_tensor());
    detail::DistillScratch<A> scratch(x.rows(), routing.ids.extent(1), n, m, d);
    loss = detail::distill_batch<A>(gate.cview(), up.cview(), down.cview(), x, target.cview(), routing.ids.cview(),
                                    routing.weights.cview(), &grads, scratch);
  });
  return loss;
}

/// distill_loss_and_grad with the routing of router + gating (a plain K-of-N layer).
template <class T>
double distill_loss_and_grad(ffn::ExpertWeights<T> const& experts, moe::Router<activation_t<T>> const& router,
                             moe::Gating const& gating, MatrixView<activation_t<T> const> x,
                             ffn::DenseFfnView<T> const& dense, ExpertGrads<activation_t<T>>& grads) {
  detail::validate_router(experts, router, gating, 0, "distill_loss_and_grad");
  detail::require_shape(x, {x.rows(), experts.d_model()}, "distill_loss_and_grad", "x");
  return distill_loss_and_grad(experts, fixed_routing(router, gating, x), x, dense, grads);
}

/// Distills the experts toward the dense FFN under a fixed routing: Adam on every expert's gate, up and down weights
/// to minimize mean_t || MoE(x_t) - F(x_t) ||^2 on seeded minibatches of the calibration set (spec 3.2 stage B, done
/// layer-locally). Only the experts a minibatch uses get a gradient. The teacher outputs are computed once for the
/// calibration set; the step loop does not allocate (besides Eigen's GEMM packing buffers). Training runs on master
/// weights in the activation type (float for bf16 weights), written back rounded to T.
/// \param experts  updated in place; \param routing  the routing of x_calib (fixed_routing(...))
/// \param x_calib  [n_tokens >= 1, d_model] the layer's FFN inputs; \param dense  the dense FFN (the target F)
/// \returns loss and relative error on all of x_calib before and after (after: with the weights rounded to T)
/// \throws value_error for an empty calibration set, a bad routing or config; shape_error for mismatched shapes.
template <class T>
DistillReport recover_distill(ffn::ExpertWeights<T>& experts, FixedRouting<activation_t<T>> const& routing,
                              MatrixView<activation_t<T> const> x_calib, ffn::DenseFfnView<T> const& dense,
                              DistillConfig const& cfg) {
  using A = activation_t<T>;
  detail::validate_recovery(experts, routing, x_calib, dense, "recover_distill");
  detail::validate_adam_config(cfg, "recover_distill");
  std::ptrdiff_t const n_tokens = x_calib.rows(), n = experts.n_experts(), m = experts.d_expert(), d = experts.d_model(),
                       k = routing.ids.extent(1);
  std::ptrdiff_t const batch = std::min<std::ptrdiff_t>(cfg.batch_tokens, n_tokens);
  auto const ids = routing.ids.cview();
  auto const weights = routing.weights.cview();
  DistillReport report;
  report.steps = cfg.steps;
  detail::run_eigen_serial([&] {
    Matrix<A> const target = detail::dense_targets(dense, x_calib);
    double f_sq = 0;
    for (std::ptrdiff_t i = 0; i < target.size(); ++i) f_sq += static_cast<double>(target[i]) * static_cast<double>(target[i]);
    auto gate = detail::to_activation_tensor(experts.gate_tensor());
    auto up = detail::to_activation_tensor(experts.up_tensor());
    auto down = detail::to_activation_tensor(experts.down_tensor());
    detail::DistillScratch<A> scratch(batch, k, n, m, d);
    // Mean loss over all calibration tokens, in chunks of the batch size (same scratch).
    auto full_loss = [&] {
      double sum = 0;
      for (std::ptrdiff_t t0 = 0; t0 < n_tokens; t0 += batch) {
        std::ptrdiff_t const t1 = std::min(n_tokens, t0 + batch);
        sum += static_cast<double>(t1 - t0) *
               detail::distill_batch<A>(gate.cview(), up.cview(), down.cview(), x_calib.slice_rows(t0, t1),
                                        target.cview().slice_rows(t0, t1), ids.slice_rows(t0, t1),
                                        weights.slice_rows(t0, t1), nullptr, scratch);
      }
      return sum / static_cast<double>(n_tokens);
    };
    auto rel = [&](double loss) { return std::sqrt(loss * static_cast<double>(n_tokens)) / std::max(std::sqrt(f_sq), 1e-300); };
    report.initial_loss = full_loss();
    report.initial_relative_error = rel(report.initial_loss);

    ExpertGrads<A> grads;
    grads.resize(n, m, d);
    std::vector<A> m_g(static_cast<std::size_t>(gate.size()), A(0)), v_g(m_g), m_u(m_g), v_u(m_g),
        m_d(static_cast<std::size_t>(down.size()), A(0)), v_d(m_d);
    Matrix<A> xb({batch, d}), fb({batch, d}), wb({batch, k});
    Matrix<std::int32_t> ib({batch, k});
    detail::BatchSampler sampler(n_tokens, cfg.seed);
    for (int step = 1; step <= cfg.steps; ++step) {
      for (std::ptrdiff_t i = 0; i < batch; ++i) {
        std::ptrdiff_t const t = sampler.next();
        std::copy(x_calib.row(t), x_calib.row(t) + d, xb.view().row(i));
        std::copy(target.cview().row(t), target.cview().row(t) + d, fb.view().row(i));
        std::copy(weights.row(t), weights.row(t) + k, wb.view().row(i));
        std::copy(ids.row(t), ids.row(t) + k, ib.view().row(i));
      }
      detail::distill_batch<A>(gate.cview(), up.cview(), down.cview(), xb.cview(), fb.cview(), ib.cview(), wb.cview(),
                               &grads, scratch);
      detail::adam_update(gate.data(), grads.gate.data(), m_g.data(), v_g.data(), gate.size(), step, cfg.lr,
                          cfg.beta1, cfg.beta2, cfg.eps);
      detail::adam_update(up.data(), grads.up.data(), m_u.data(), v_u.data(), up.size(), step, cfg.lr, cfg.beta1,
                          cfg.beta2, cfg.eps);
      detail::adam_update(down.data(), grads.down.data(), m_d.data(), v_d.data(), down.size(), step, cfg.lr,
                          cfg.beta1, cfg.beta2, cfg.eps);
    }
    // Write back rounded to T, then measure what the caller gets.
    auto write_back = [](Tensor<A, 3> const& src, Tensor<T, 3>& dst) {
      for (std::ptrdiff_t i = 0; i < src.size(); ++i) dst[i] = from_double<T>(static_cast<double>(src[i]));
    };
    write_back(gate, experts.mutable_gate_tensor());
    write_back(up, experts.mutable_up_tensor());
    write_back(down, experts.mutable_down_tensor());
    gate = detail::to_activation_tensor(experts.gate_tensor());
    up = detail::to_activation_tensor(experts.up_tensor());
    down = detail::to_activation_tensor(experts.down_tensor());
    report.final_loss = full_loss();
    report.final_relative_error = rel(report.final_loss);
  });
  return report;
}

/// recover_distill with the routing of router + gating (a plain K-of-N layer, moe::MoeFfn):
/// recover_distill(experts, fixed_routing(router, gating, x_calib), x_calib, dense, cfg).
template <class T>
DistillReport recover_distill(ffn::ExpertWeights<T>& experts, moe::Router<activation_t<T>> const& router,
                              moe::Gating const& gating, MatrixView<activation_t<T> const> x_calib,
                              ffn::DenseFfnView<T> const& dense, DistillConfig const& cfg) {
  detail::validate_router(experts, router, gating, 0, "recover_distill");
  detail::require_shape(x_calib, {x_calib.rows(), experts.d_model()}, "recover_distill", "x_calib");
  return recover_distill(experts, fixed_routing(router, gating, x_calib), x_calib, dense, cfg);
}

}  // namespace train
}  // namespace factorllm
