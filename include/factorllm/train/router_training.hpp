// SPDX-License-Identifier: Apache-2.0
// Router training on collected FFN inputs (docs/math.md §3.2, stage A of docs/math.md §3.2 "Total loss"): Adam on the
// PAR + balance loss of one layer, with the experts and the dense teacher frozen; and a router initialization from a
// clustered partition.
//
// Because the teacher and the experts do not change while the router trains, the PAR pseudo-labels of the
// calibration tokens are computed once per call (par_oracle_labels, chunked GEMMs in double); each step then costs
// only the router: O(batch_tokens * n_experts * d_model). par_loss_from_labels (train/par_loss_from_labels.hpp)
// evaluates exactly the loss and gradients of train::par_loss given those labels (tested equal to it). The labels are
// the paper's PAR labels or, with RouterTrainConfig::labels = LabelKind::subset, the K-subset whose summed output is
// closest to the dense output (the target of a plain-sum gating).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../backend/scalar/topk.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../core/tensor_view.hpp"
#include "../core/workspace.hpp"
#include "../ffn/factorize.hpp"
#include "../ffn/permutation.hpp"
#include "../moe/router.hpp"
#include "adam.hpp"
#include "detail/batch_sampler.hpp"
#include "detail/validation.hpp"
#include "oracle_labels.hpp"
#include "par_loss.hpp"
#include "par_loss_from_labels.hpp"

namespace factorllm {
namespace train {

/// Settings of train_router. Defaults: Adam (beta1 0.9, beta2 0.999; the paper's code uses 0.95, docs/math.md §4.1)
/// at lr 1e-2, which suits a freshly initialized linear router; the loss weights are the paper code's
/// (docs/math.md §3.2).
struct RouterTrainConfig {
  int steps = 200;          // Adam steps (0: only evaluate)
  int batch_tokens = 256;   // tokens per minibatch (all tokens when the calibration set is smaller)
  double lr = 1e-2;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  std::uint64_t seed = 0;   // seeds the minibatch order
  bool train_bias = true;   // false: b_r is never updated (keeps a zero bias zero: llama.cpp has no router bias)
  ParLossConfig loss;       // PAR / balance weights and the clip
  LabelKind labels = LabelKind::par;  // pseudo-labels to train toward: the paper's PAR labels, or the K-subset whose
                                      // summed output is closest to F (subset_oracle_labels; N <= kMaxSubsetExperts),
                                      // which matches a plain-sum gating (code_ref, output_scale 1 / floor(N/K))
};

/// What train_router measured on the whole calibration set, before and after training.
struct RouterTrainReport {
  double initial_loss = 0, final_loss = 0;                      // total loss (par_weight * PAR + balance_weight * bal)
  double initial_label_accuracy = 0, final_label_accuracy = 0;  // router TopK set == pseudo-label set
  int steps = 0;
};

/// Trains a layer's router on its calibration FFN inputs: Adam on the PAR + balance total (docs/math.md §3.2) with
/// the experts and the teacher frozen, on seeded minibatches. The pseudo-labels are computed once from the dense
/// teacher (par_oracle_labels, or subset_oracle_labels when cfg.labels is LabelKind::subset), then every step
/// evaluates par_loss_from_labels on a minibatch. Allocates only before the step loop.
/// Shared-expert layers (moe::SharedExpertMoe): train the router of the N routed experts against their own sum,
/// train_router(router, x, ffn::unfactorize(routed).view(), routed, K, cfg), i.e. the teacher F minus the shared
/// experts (exact before recovery), since the shared experts already supply the rest of F.
/// \param router    trained in place (its bias too unless cfg.train_bias is false)
/// \param x_calib   [n_tokens >= 1, d_model] the layer's FFN inputs (post-attention RMSNorm outputs)
/// \param dense     the frozen dense FFN (teacher); \param experts  the frozen experts
/// \param top_k     K of the K-of-N gating the router is trained for
/// \returns total loss and label accuracy over all of x_calib before and after training
/// \throws value_error for an empty calibration set, a bad top_k or config (or n_experts > kMaxSubsetExperts with
///         subset labels); shape_error for mismatched shapes.
template <class T>
RouterTrainReport train_router(moe::Router<activation_t<T>>& router, MatrixView<activation_t<T> const> x_calib,
                               ffn::DenseFfnView<T> const& dense, ffn::ExpertWeights<T> const& experts,
                               std::ptrdiff_t top_k, RouterTrainConfig const& cfg) {
  using A = activation_t<T>;
  char const* fn = "train_router";
  detail::validate_dense_experts(dense, experts, fn);
  detail::validate_experts_x(x_calib, experts, top_k, fn);
  if (router.n_experts() != experts.n_experts() || router.d_model() != experts.d_model())
    throw shape_error(detail::concat(fn, ": argument 'router' has shape ",
                                     detail::shape_string({router.n_experts(), router.d_model()}), ", expected ",
                                     detail::shape_string({experts.n_experts(), experts.d_model()})));
  detail::validate_adam_config(cfg, "train_router");
  if (!(cfg.loss.clip > 0 && cfg.loss.clip < 0.5))
    throw value_error(detail::concat(fn, ": cfg.loss.clip = ", cfg.loss.clip, " must be in (0, 0.5)"));

  std::ptrdiff_t const n_tokens = x_calib.rows(), n = experts.n_experts(), d = experts.d_model();
  std::ptrdiff_t const batch = std::min<std::ptrdiff_t>(cfg.batch_tokens, n_tokens);
  // Labels once (experts and teacher are frozen): docs/math.md §3.2 steps 2-5, or the subset labels (cfg.labels).
  Matrix<std::int32_t> const labels = cfg.labels == LabelKind::subset ? subset_oracle_labels(x_calib, dense, experts, top_k)
                                                                      : par_oracle_labels(x_calib, dense, experts, top_k);
  Workspace ws(par_loss_from_labels_workspace_bytes(d, n, top_k));
  ParLossResult<A> full, res;
  par_loss_from_labels(x_calib, labels.cview(), router, top_k, cfg.loss, full, ws);
  RouterTrainReport report;
  report.initial_loss = full.total_loss;
  report.initial_label_accuracy = full.label_accuracy;
  report.steps = cfg.steps;

  Matrix<A> xb({batch, d});
  Matrix<std::int32_t> lb({batch, top_k});
  res.resize(batch, d, n, top_k);
  std::vector<double> m_w(static_cast<std::size_t>(n * d), 0.0), v_w(m_w), m_b(static_cast<std::size_t>(n), 0.0), v_b(m_b);
  detail::BatchSampler sampler(n_tokens, cfg.seed);
  for (int step = 1; step <= cfg.steps; ++step) {
    for (std::ptrdiff_t i = 0; i < batch; ++i) {
      std::ptrdiff_t const t = sampler.next();
      std::copy(x_calib.row(t), x_calib.row(t) + d, xb.view().row(i));
      std::copy(labels.cview().row(t), labels.cview().row(t) + top_k, lb.view().row(i));
    }
    par_loss_from_labels(xb.cview(), lb.cview(), router, top_k, cfg.loss, res, ws);
    detail::adam_update(router.mutable_weight().data(), res.grad_weight.data(), m_w.data(), v_w.data(), n * d, step,
                        cfg.lr, cfg.beta1, cfg.beta2, cfg.eps);
    if (cfg.train_bias)
      detail::adam_update(router.mutable_bias().data(), res.grad_bias.data(), m_b.data(), v_b.data(), n, step, cfg.lr,
                          cfg.beta1, cfg.beta2, cfg.eps);
  }
  par_loss_from_labels(x_calib, labels.cview(), router, top_k, cfg.loss, full, ws);
  report.final_loss = full.total_loss;
  report.final_label_accuracy = full.label_accuracy;
  return report;
}

/// Builds a router from a (clustered) partition, as an alternative to the paper's random init (docs/math.md §2.2):
///   c_e = mean over expert e's neurons i of W_gate[i, :] / ||W_gate[i, :]||   (the directions its neurons read)
///   W_r[e, :] = scale * (c_e - mean_e' c_e') / ||c_e - mean_e' c_e'||,   b_r = 0.
/// Subtracting the mean removes the component every expert shares, which softmax and TopK ignore anyway; the rows
/// are normalized so the initial logits are scale * <direction, x>. A row that vanishes (e.g. n_experts = 1) stays 0.
/// Meant as a starting point for train_router; with a clustered partition it already routes a token to the experts
/// whose gate rows align with it.
/// \param dense      the dense FFN the partition splits
/// \param partition  the partition (d_ff must match)
/// \param scale      the norm of every router row (> 0, finite)
/// \throws shape_error if partition.d_ff() != dense.d_ff() or dense is inconsistent; value_error for a bad scale.
template <class T>
moe::Router<activation_t<T>> router_from_partition(ffn::DenseFfnView<T> const& dense, ffn::ExpertPartition const& partition,
                                                   double scale = 1.0) {
  using A = activation_t<T>;
  char const* fn = "router_from_partition";
  dense.validate(fn);
  if (partition.d_ff() != dense.d_ff())
    throw shape_error(detail::concat(fn, ": the dense FFN has d_ff = ", dense.d_ff(), " but argument 'partition' is for d_ff = ",
                                     partition.d_ff()));
  if (!(scale > 0) || !std::isfinite(scale)) throw value_error(detail::concat(fn, ": scale must be positive and finite, got ", scale));
  std::ptrdiff_t const n = partition.n_experts(), m = partition.d_expert(), d = dense.d_model();
  std::vector<double> c(static_cast<std::size_t>(n * d), 0.0), mean(static_cast<std::size_t>(d), 0.0);
  auto const& perm = partition.permutation();
  for (std::ptrdiff_t e = 0; e < n; ++e)
    for (std::ptrdiff_t i = 0; i < m; ++i) {
      auto const* g = dense.gate.row(perm[static_cast<std::size_t>(e * m + i)]);
      double nrm = 0;
      for (std::ptrdiff_t k = 0; k < d; ++k) nrm += to_double(g[k]) * to_double(g[k]);
      nrm = std::sqrt(nrm);
      if (!(nrm > 0)) continue;
      for (std::ptrdiff_t k = 0; k < d; ++k) c[static_cast<std::size_t>(e * d + k)] += to_double(g[k]) / (nrm * static_cast<double>(m));
    }
  for (std::ptrdiff_t e = 0; e < n; ++e)
    for (std::ptrdiff_t k = 0; k < d; ++k) mean[static_cast<std::size_t>(k)] += c[static_cast<std::size_t>(e * d + k)] / static_cast<double>(n);
  Matrix<A> w({n, d});
  for (std::ptrdiff_t e = 0; e < n; ++e) {
    double nrm = 0;
    for (std::ptrdiff_t k = 0; k < d; ++k) {
      double const v = c[static_cast<std::size_t>(e * d + k)] - mean[static_cast<std::size_t>(k)];
      nrm += v * v;
    }
    nrm = std::sqrt(nrm);
    if (!(nrm > 1e-300)) continue;
    for (std::ptrdiff_t k = 0; k < d; ++k)
      w(e, k) = static_cast<A>(scale * (c[static_cast<std::size_t>(e * d + k)] - mean[static_cast<std::size_t>(k)]) / nrm);
  }
  return moe::Router<A>(std::move(w), Vector<A>({n}));
}

}  // namespace train
}  // namespace factorllm
