// SPDX-License-Identifier: Apache-2.0
// Layer-local recovery by distillation: Adam on the gate, up and down weights of the experts a fixed routing
// selects, toward the dense FFN's outputs on the calibration set.
//
// Computation: Eigen products in the activation type (double for double weights, which the gradient tests use);
// Eigen runs single-threaded, so results do not depend on the OpenMP thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../core/tensor_view.hpp"
#include "../detail/eigen_serial.hpp"
#include "../ffn/factorize.hpp"
#include "../ffn/swiglu.hpp"
#include "../moe/gating.hpp"
#include "../moe/router.hpp"
#include "adam.hpp"
#include "detail/batch_sampler.hpp"
#include "detail/calibration_passes.hpp"
#include "detail/recovery_checks.hpp"
#include "fixed_routing.hpp"
#include "swiglu_backward.hpp"

namespace factorllm {
namespace train {

/// Settings of recover_distill (Adam on the experts' weights; Adam's defaults, docs/math.md §4.1 uses beta2 = 0.95).
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

}  // namespace train

namespace detail {

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
/// to minimize mean_t || MoE(x_t) - F(x_t) ||^2 on seeded minibatches of the calibration set (docs/math.md §3.2 stage
/// B, done layer-locally). Only the experts a minibatch uses get a gradient. The teacher outputs are computed once
/// for the calibration set; the step loop does not allocate (besides Eigen's GEMM packing buffers). Training runs on
/// master weights in the activation type (float for bf16 weights), written back rounded to T.
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
