// SPDX-License-Identifier: Apache-2.0
// Layer-local conversion of a Llama-family model's dense FFNs into K-of-N MoE layers (docs/model.md §4): partition
// -> factorize -> router (random, or trained on the PAR loss) -> routing fixed -> recovery (refit and/or distill),
// one layer at a time bottom-up, each layer calibrated on the inputs the already converted layers below produce.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "factorllm/backend/simd/cpu_simd.hpp"
#include "factorllm/core/error.hpp"
#include "factorllm/core/tensor.hpp"
#include "factorllm/ffn/clustering.hpp"
#include "factorllm/ffn/factorize.hpp"
#include "factorllm/ffn/permutation.hpp"
#include "factorllm/model/calibration.hpp"
#include "factorllm/model/llama_engine.hpp"
#include "factorllm/model/llama_model.hpp"
#include "factorllm/moe/gating.hpp"
#include "factorllm/moe/moe_ffn.hpp"
#include "factorllm/moe/router.hpp"
#include "factorllm/moe/shared_moe.hpp"
#include "factorllm/train/diagnostics.hpp"
#include "factorllm/train/distillation.hpp"
#include "factorllm/train/fixed_routing.hpp"
#include "factorllm/train/oracle_labels.hpp"
#include "factorllm/train/refit.hpp"
#include "factorllm/train/router_training.hpp"

namespace factorllm {
namespace model {

/// How the d_ff neurons are split into experts.
enum class PartitionKind { contiguous, random, cluster_weights, cluster_activations };
/// How the router is made: the paper's random init, or trained (Adam on PAR + balance) toward the paper's PAR
/// pseudo-labels or toward the best K-subset.
enum class RouterKind { random, par, par_subset };
/// How the experts are adapted to the fixed routing on the calibration inputs.
enum class RecoveryKind { none, refit, distill, refit_distill };
/// The combine: `plain_sum` = code_ref with weight 1 per selected expert (the natural "drop the other neurons"
/// approximation); `softmax_renorm` = softmax -> TopK -> renormalize with a bias-free router and output scale K, the
/// gating llama.cpp and Mixtral run once the scale is folded into the experts (io::fold_output_scale).
enum class GatingKind { plain_sum, softmax_renorm };

inline char const* name(PartitionKind p) noexcept {
  switch (p) {
    case PartitionKind::contiguous: return "contiguous";
    case PartitionKind::random: return "random";
    case PartitionKind::cluster_weights: return "cluster_weights";
    case PartitionKind::cluster_activations: return "cluster_activations";
  }
  return "?";
}
inline char const* name(RouterKind r) noexcept {
  switch (r) {
    case RouterKind::random: return "random_init";
    case RouterKind::par: return "par_trained";
    case RouterKind::par_subset: return "par_subset";
  }
  return "?";
}
inline char const* name(RecoveryKind r) noexcept {
  switch (r) {
    case RecoveryKind::none: return "none";
    case RecoveryKind::refit: return "refit";
    case RecoveryKind::distill: return "distill";
    case RecoveryKind::refit_distill: return "refit+distill";
  }
  return "?";
}
inline char const* name(GatingKind g) noexcept { return g == GatingKind::plain_sum ? "plain_sum" : "softmax_renorm"; }

/// One conversion recipe, applied to every layer.
struct ConvertConfig {
  std::ptrdiff_t n_experts = 4;  // N experts (including the shared ones)
  std::ptrdiff_t top_k = 2;      // K routed experts per token
  std::ptrdiff_t shared = 0;     // S always-on experts (same size as a routed one)
  PartitionKind partition = PartitionKind::contiguous;
  RouterKind router = RouterKind::par;
  RecoveryKind recovery = RecoveryKind::none;
  GatingKind gating = GatingKind::plain_sum;

  /// A short label: N4K2-contiguous-par_trained-refit (with S1 after K for shared experts, -softmax for softmax_renorm).
  std::string label() const {
    std::string s = "N" + std::to_string(n_experts) + "K" + std::to_string(top_k);
    if (shared > 0) s += "S" + std::to_string(shared);
    s += std::string("-") + name(partition) + "-" + name(router) + "-" + name(recovery);
    return gating == GatingKind::softmax_renorm ? s + "-softmax" : s;
  }

  /// \throws value_error naming the field unless 0 <= S < N <= d_ff, 1 <= K <= N - S, the subset labels' N - S is
  ///         small enough, and softmax_renorm gating has no shared experts.
  void validate(std::ptrdiff_t d_ff) const {
    if (n_experts < 1 || shared < 0 || shared >= n_experts)
      throw value_error(factorllm::detail::concat(label(), ": need 0 <= shared < n_experts"));
    if (top_k < 1 || top_k > n_experts - shared)
      throw value_error(factorllm::detail::concat(label(), ": top_k = ", top_k, " must be in [1, n_experts - shared = ",
                                       n_experts - shared, "]"));
    if (router == RouterKind::par_subset && n_experts - shared > train::kMaxSubsetExperts)
      throw value_error(factorllm::detail::concat(label(), ": the subset pseudo-labels enumerate all C(N, K) subsets; N <= ",
                                       train::kMaxSubsetExperts));
    if (n_experts > d_ff)
      throw value_error(factorllm::detail::concat(label(), ": n_experts = ", n_experts, " exceeds d_ff = ", d_ff));
    if (gating == GatingKind::softmax_renorm && shared > 0)
      throw value_error(factorllm::detail::concat(label(), ": softmax_renorm gating has no shared experts"));
  }
};

/// Knobs of the conversion methods.
struct MethodConfig {
  int router_steps = 300;      // Adam steps of router training (train::train_router)
  int router_batch = 256;      // tokens per router minibatch
  double router_lr = 0.01;
  double balance_ratio = 0.2;  // balance_weight / par_weight of the paper's code (0.01 / 0.05)
  double ridge = 1e-3;         // refit: ridge strength relative to the mean feature energy, toward the old weights
  int distill_epochs = 30;     // passes over the calibration tokens (train::recover_distill steps = epochs x batches)
  int distill_batch = 256;
  double distill_lr = 1e-3;
  int cluster_iters = 30;      // balanced k-means iterations
  std::uint64_t seed = 2024;   // layer l uses seed + l for its partition, router and training
};

/// Per-layer numbers a conversion reports.
struct LayerStats {
  double label_accuracy = 0;  // router TopK set == pseudo-label set, calibration tokens (before recovery)
  double rel_err_routed = 0;  // ||MoE(x) - F(x)|| / ||F(x)|| before recovery
  double rel_err_final = 0;   // after recovery
};

/// One converted layer: factorized experts (the first `shared` always on), router and gating.
struct ConvertedLayer {
  ffn::ExpertWeights<float> experts;
  moe::Router<float> router;
  moe::Gating gating;
  std::ptrdiff_t shared = 0;
  LayerStats stats;

  /// The layer as a plain MoE (shared == 0). \throws value_error when it has shared experts.
  LlamaMoe to_moe() && {
    if (shared != 0) throw value_error("ConvertedLayer::to_moe: the layer has shared experts (use make_shared_moe)");
    return LlamaMoe(std::move(experts), std::move(router), std::move(gating));
  }
};

/// The partition of the recipe (library ffn/ builders). With S shared experts, experts 0 .. S-1 are the always-on
/// ones (moe::make_shared_moe's layout): for co-activation clustering they take the neurons of largest mean
/// contribution and the rest are clustered into the N-S routed experts; for the other partitions they are simply
/// the partition's first S experts.
inline ffn::ExpertPartition make_partition(ConvertConfig const& cfg, ffn::DenseFfnView<float> const& w,
                                           MatrixView<float const> x, std::uint64_t seed, MethodConfig const& mc) {
  std::ptrdiff_t const n = cfg.n_experts, m_all = w.d_ff();
  switch (cfg.partition) {
    case PartitionKind::contiguous: return ffn::ExpertPartition::contiguous(m_all, n);
    case PartitionKind::random: return ffn::ExpertPartition::random(m_all, n, seed);
    case PartitionKind::cluster_weights: return ffn::cluster_weights(w, n, seed, mc.cluster_iters);
    case PartitionKind::cluster_activations:
      if (cfg.shared > 0) return ffn::cluster_activations_shared(w, x, cfg.shared, n - cfg.shared, seed, mc.cluster_iters);
      return ffn::cluster_activations(w, x, n, seed, mc.cluster_iters);
  }
  throw value_error("make_partition: unknown partition kind");
}

namespace detail {
inline train::LayerDiagnostics diagnose(ConvertedLayer const& c, MatrixView<float const> x,
                                        ffn::DenseFfnView<float> const& dense, train::ParLossConfig const& loss,
                                        train::LabelKind labels) {
  if (c.shared == 0) return train::diagnose_layer(LlamaMoe(c.experts, c.router, c.gating), x, dense, loss, labels);
  return train::diagnose_layer(moe::make_shared_moe<DefaultCpu>(c.experts, c.shared, c.router, c.gating), x, dense,
                               loss, labels);
}
}  // namespace detail

/// Converts one dense FFN (d_ff divisible by N) on its calibration inputs x [n_tokens, d_model]: partition ->
/// factorize -> train::train_router (routed experts only) -> routing fixed (train::fixed_routing) ->
/// train::recover_refit and/or train::recover_distill. `l` selects the layer's seeds (mc.seed + l).
/// \throws value_error for an invalid config (ConvertConfig::validate) or d_ff not divisible by N.
inline ConvertedLayer convert_layer(ConvertConfig const& cfg, int l, ffn::DenseFfnView<float> const& dense,
                                    MatrixView<float const> x, MethodConfig const& mc) {
  cfg.validate(dense.d_ff());
  if (dense.d_ff() % cfg.n_experts != 0)
    throw value_error(factorllm::detail::concat("convert_layer: d_ff = ", dense.d_ff(), " is not a multiple of n_experts = ",
                                     cfg.n_experts, " (pad it with ffn::pad_hidden)"));
  std::uint64_t const seed = mc.seed + static_cast<std::uint64_t>(l);
  std::ptrdiff_t const n = cfg.n_experts, n_routed = n - cfg.shared, d = dense.d_model();
  ConvertedLayer out{ffn::factorize(dense, make_partition(cfg, dense, x, seed, mc)),
                     moe::Router<float>::random(d, n_routed, seed), moe::Gating{}, cfg.shared, {}};
  out.gating.top_k = cfg.top_k;
  if (cfg.gating == GatingKind::plain_sum) {
    out.gating.mode = moe::CombineMode::code_ref;
    out.gating.output_scale = static_cast<float>(1.0 / moe::Gating::code_ref_scale(n_routed, cfg.top_k));
  } else {
    out.gating.mode = moe::CombineMode::softmax_topk_renorm;
    out.gating.output_scale = static_cast<float>(cfg.top_k);  // equal weights sum the K experts, as plain_sum
  }
  train::LabelKind const labels = cfg.router == RouterKind::par_subset ? train::LabelKind::subset : train::LabelKind::par;
  train::RouterTrainConfig rc;
  rc.steps = mc.router_steps;
  rc.batch_tokens = mc.router_batch;
  rc.lr = mc.router_lr;
  rc.seed = seed;
  rc.loss.balance_weight = rc.loss.par_weight * mc.balance_ratio;
  rc.labels = labels;
  rc.train_bias = cfg.gating != GatingKind::softmax_renorm;  // llama.cpp and Mixtral have no router bias
  if (cfg.router != RouterKind::random) {
    if (cfg.shared == 0) {
      train::train_router(out.router, x, dense, out.experts, cfg.top_k, rc);
    } else {  // the routed experts approximate what the shared ones leave: their own sum (= F - shared) is the teacher
      auto const routed = moe::split_experts(out.experts, cfg.shared).second;
      train::train_router(out.router, x, ffn::unfactorize(routed).view(), routed, cfg.top_k, rc);
    }
  }
  // Routing is fixed from here on: recovery adapts the experts to the router, not the reverse.
  train::LayerDiagnostics const before = detail::diagnose(out, x, dense, rc.loss, labels);
  out.stats.label_accuracy = before.label_accuracy;
  out.stats.rel_err_routed = out.stats.rel_err_final = before.relative_error;
  if (cfg.recovery != RecoveryKind::none) {
    auto const routing = train::fixed_routing(out.router, out.gating, x, cfg.shared);
    if (cfg.recovery == RecoveryKind::refit || cfg.recovery == RecoveryKind::refit_distill)
      train::recover_refit(out.experts, routing, x, dense, mc.ridge);
    if (cfg.recovery == RecoveryKind::distill || cfg.recovery == RecoveryKind::refit_distill) {
      train::DistillConfig dc;
      dc.batch_tokens = mc.distill_batch;
      dc.steps = mc.distill_epochs * static_cast<int>((x.rows() + mc.distill_batch - 1) / mc.distill_batch);
      dc.lr = mc.distill_lr;
      dc.seed = seed;
      train::recover_distill(out.experts, routing, x, dense, dc);
    }
    out.stats.rel_err_final = detail::diagnose(out, x, dense, rc.loss, labels).relative_error;
  }
  return out;
}

/// Reports the progress of convert_model: called after each layer with (layer, n_layers, its stats).
using ConvertProgress = std::function<void(int layer, int n_layers, LayerStats const& stats)>;

/// Converts every dense layer of `m` in place (layer l's `moe` is set, its dense FFN released) bottom-up: layer l
/// is calibrated on the FFN inputs of `calibration` produced by the model with layers < l already converted. A
/// d_ff that N does not divide is zero-padded to the next multiple first (ffn::pad_hidden: the same function).
/// \returns the mean of the layers' stats
/// \throws value_error for an invalid config, shared experts (a LlamaModel layer holds a plain MoE), a model that
///         already has MoE layers, or empty calibration data.
inline LayerStats convert_model(LlamaModel& m, std::vector<TokenSequence> const& calibration,
                                ConvertConfig const& cfg, MethodConfig const& mc, ConvertProgress const& progress = {}) {
  cfg.validate(m.config.d_ff);
  if (cfg.shared != 0) throw value_error("convert_model: shared experts cannot be stored in a LlamaModel layer");
  if (m.has_moe()) throw value_error(factorllm::detail::concat("convert_model: ", m.source, " already has MoE layers"));
  std::size_t longest = 1;
  for (auto const& seq : calibration) longest = std::max(longest, seq.size());
  LlamaEngine engine(m, static_cast<std::int64_t>(longest));
  LayerStats mean;
  int const n_layers = engine.n_layers();
  for (int l = 0; l < n_layers; ++l) {
    Matrix<float> const x = collect_ffn_inputs(engine, calibration, l);
    auto& layer = m.layers[static_cast<std::size_t>(l)];
    ffn::DenseFfn<float> dense = m.config.d_ff % cfg.n_experts == 0
                                     ? std::move(layer.ffn)
                                     : ffn::pad_hidden(layer.ffn.view(), cfg.n_experts);
    ConvertedLayer c = convert_layer(cfg, l, dense.view(), x.cview(), mc);
    LayerStats const st = c.stats;
    layer.moe.emplace(std::move(c).to_moe());
    layer.ffn = ffn::DenseFfn<float>{};
    engine.reset_ffn(l);  // the engine now runs the converted layer
    mean.label_accuracy += st.label_accuracy / n_layers;
    mean.rel_err_routed += st.rel_err_routed / n_layers;
    mean.rel_err_final += st.rel_err_final / n_layers;
    if (progress) progress(l, n_layers, st);
  }
  return mean;
}

}  // namespace model
}  // namespace factorllm
