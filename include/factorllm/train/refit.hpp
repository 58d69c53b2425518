// SPDX-License-Identifier: Apache-2.0
// Layer-local recovery by a closed-form ridge refit of every expert's down projection under a fixed routing.
//
// Computation: double Eigen products, the normal equations accumulated over token chunks; Eigen runs single-threaded,
// so results do not depend on the OpenMP thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../core/tensor_view.hpp"
#include "../detail/eigen_serial.hpp"
#include "../ffn/factorize.hpp"
#include "../ffn/swiglu.hpp"
#include "../moe/gating.hpp"
#include "../moe/router.hpp"
#include "detail/calibration_passes.hpp"
#include "detail/recovery_checks.hpp"
#include "fixed_routing.hpp"

namespace factorllm {
namespace train {

/// What recover_refit measured on the calibration set.
struct RefitReport {
  double initial_relative_error = 0;  // ||MoE(X) - F(X)||_F / ||F(X)||_F before the refit
  double final_relative_error = 0;    // the same after it (with the new weights rounded to T)
  double lambda = 0;                  // the absolute ridge strength used: ridge * tr(Z^T Z) / d_ff
  std::int64_t n_tokens = 0;
};

}  // namespace train

namespace detail {

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

}  // namespace train
}  // namespace factorllm
