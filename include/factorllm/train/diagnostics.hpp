// SPDX-License-Identifier: Apache-2.0
// Conversion diagnostics of one MoE layer: error vs the dense FFN, router-vs-pseudo-label agreement, expert load and
// its entropy, and pseudo-label stability.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../core/tensor_view.hpp"
#include "../core/workspace.hpp"
#include "../ffn/factorize.hpp"
#include "../ffn/swiglu.hpp"
#include "../moe/moe_ffn.hpp"
#include "../moe/router.hpp"
#include "../moe/routing.hpp"
#include "../moe/shared_moe.hpp"
#include "detail/validation.hpp"
#include "oracle_labels.hpp"
#include "par_loss_from_labels.hpp"
#include "par_loss.hpp"

namespace factorllm {
namespace train {

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

/// Per-layer conversion diagnostics (see diagnose_layer).
struct LayerDiagnostics {
  std::int64_t n_tokens = 0;
  double relative_error = 0;           // ||MoE(X) - F(X)||_F / ||F(X)||_F over the tokens
  double label_accuracy = 0;           // fraction of tokens whose router TopK set equals the PAR pseudo-label set
  double par_loss = 0;                 // mean KL of the router to the PAR target (docs/math.md §3.2)
  std::vector<std::int64_t> load;      // [n_experts] token slots routed to each expert
  double load_entropy = 0;             // entropy of load (nats)
  double load_entropy_normalized = 0;  // load_entropy / log(n_experts): 1 = perfectly balanced (1 when N = 1)
};

}  // namespace train

namespace detail {

/// Relative error of `layer` (a MoeFfn or SharedExpertMoe) against the dense FFN on x, plus the routed layer's load.
template <class Backend, class Layer, class T, class A>
void output_and_load(Layer const& layer, MatrixView<A const> x, ffn::DenseFfnView<T> const& dense, std::ptrdiff_t n_routed,
                     train::LayerDiagnostics& r) {
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
  r.load = train::load_histogram(record);
  r.load_entropy = train::load_entropy(r.load);
  r.load_entropy_normalized = n_routed > 1 ? r.load_entropy / std::log(static_cast<double>(n_routed)) : 1.0;
}

/// The router of a layer against the chosen pseudo-labels: label_accuracy and par_loss of r. The labels come from
/// the chunked-GEMM oracles (par_oracle_labels equals par_loss's pseudo-labels), then par_loss_from_labels gives
/// par_loss's numbers without its per-token scalar expert forward.
template <class T, class A>
void router_against_labels(MatrixView<A const> x, ffn::DenseFfnView<T> const& dense, ffn::ExpertWeights<T> const& experts,
                           moe::Router<A> const& router, std::ptrdiff_t top_k, train::ParLossConfig const& config,
                           train::LabelKind labels, train::LayerDiagnostics& r) {
  Matrix<std::int32_t> const lab = labels == train::LabelKind::subset
                                        ? train::subset_oracle_labels(x, dense, experts, top_k)
                                        : train::par_oracle_labels(x, dense, experts, top_k);
  Workspace ws(train::par_loss_from_labels_workspace_bytes(experts.d_model(), experts.n_experts(), top_k));
  train::ParLossResult<A> res;
  train::par_loss_from_labels(x, lab.cview(), router, top_k, config, res, ws);
  r.label_accuracy = res.label_accuracy;
  r.par_loss = res.par_loss;
}

}  // namespace detail

namespace train {

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
  detail::validate_dense_experts(dense, layer.experts(), fn);
  detail::validate_experts_x(x, layer.experts(), layer.top_k(), fn);
  LayerDiagnostics r;
  detail::output_and_load<Backend>(layer, x, dense, layer.n_experts(), r);
  detail::router_against_labels(x, dense, layer.experts(), layer.router(), layer.top_k(), config, labels, r);
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
  detail::validate_experts_x(x, routed, layer.top_k(), fn);
  LayerDiagnostics r;
  detail::output_and_load<Backend>(layer, x, dense, layer.n_routed(), r);
  auto const routed_teacher = ffn::unfactorize(routed);
  detail::router_against_labels(x, routed_teacher.view(), routed, layer.routed().router(), layer.top_k(), config,
                                labels, r);
  return r;
}

}  // namespace train
}  // namespace factorllm
