// SPDX-License-Identifier: Apache-2.0
// Fidelity report: converts every FFN of stories260K into a K-of-N MoE (layer-local, bottom-up) for a grid of
// configurations and measures, on held-out sequences, how much of the dense model survives at each FFN budget.
//
// Usage: factorllm_fidelity_report [--quick] [--csv PATH] [--model PATH] [--tokenizer PATH] [--threads N]
//                                  [--calib SEQS] [--eval SEQS] [--length TOKENS] [--epochs N] [--ridge R]
//   --quick      the short version (N = 4, K = 1..3, co-activation partition, PAR-trained router, refit and
//                refit + distill; fewer calibration tokens and epochs): about 15 s on 2 cores
//   --csv PATH   where to write the CSV (default fidelity_report.csv; none in --quick mode unless given)
//   --threads N  configurations converted concurrently (default 2; each kernel call runs on one thread)
//   --epochs N, --ridge R   distillation epochs and refit ridge strength (see MethodConfig)
// Plot the CSV with examples/02_fidelity_report/plot.py.
// Exit status: 0 on success, 1 if the K = N check is not the dense model, 2 on bad usage or unreadable input.
//
// Pipeline per configuration and layer (layer l sees inputs produced by the already converted layers < l):
//   partition (contiguous | random | balanced k-means on [W_g | W_u] rows | on co-activations |h| ||W_d col||)
//   -> factorize -> router (random init, or Adam on the PAR loss with the paper's labels or subset labels)
//   -> routing fixed -> recovery (none | ridge refit of the down projections | distillation | refit then distill)
//   -> moe::MoeFfn<float, CpuSimd<>> installed in the engine.
// The conversion methods are written here, on the library's types, because the library's train/ versions
// (clustering, router training, recovery; issue 4) had not landed when this report was written.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <Eigen/Dense>

#include "factorllm/factorllm.hpp"

#include "../common/calibration.hpp"
#include "../common/llama2c_engine.hpp"

#ifndef FACTORLLM_SHARED_DIR
#define FACTORLLM_SHARED_DIR "../shared"
#endif

namespace {

namespace fl = factorllm;
namespace fx = factorllm_examples;

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// ---------------------------------------------------------------------------------------------------------------
// Configurations
// ---------------------------------------------------------------------------------------------------------------

enum class PartitionKind { contiguous, random, cluster_weights, cluster_activations };
enum class RouterKind { random, par, par_subset };
enum class RecoveryKind { none, refit, distill, refit_distill };

char const* name(PartitionKind p) {
  switch (p) {
    case PartitionKind::contiguous: return "contiguous";
    case PartitionKind::random: return "random";
    case PartitionKind::cluster_weights: return "cluster_weights";
    case PartitionKind::cluster_activations: return "cluster_activations";
  }
  return "?";
}
char const* name(RouterKind r) {
  switch (r) {
    case RouterKind::random: return "random_init";
    case RouterKind::par: return "par_trained";
    case RouterKind::par_subset: return "par_subset";
  }
  return "?";
}
char const* name(RecoveryKind r) {
  switch (r) {
    case RecoveryKind::none: return "none";
    case RecoveryKind::refit: return "refit";
    case RecoveryKind::distill: return "distill";
    case RecoveryKind::refit_distill: return "refit+distill";
  }
  return "?";
}

/// One conversion recipe, applied to every layer.
struct ConvConfig {
  std::ptrdiff_t n_experts = 4;  // N routed experts
  std::ptrdiff_t top_k = 2;      // K of them per token
  std::ptrdiff_t shared = 0;     // S always-on experts (same size as a routed one)
  PartitionKind partition = PartitionKind::contiguous;
  RouterKind router = RouterKind::par;
  RecoveryKind recovery = RecoveryKind::none;

  std::string label() const {
    std::string s = "N" + std::to_string(n_experts) + "K" + std::to_string(top_k);
    if (shared > 0) s += "S" + std::to_string(shared);
    return s + "-" + name(partition) + "-" + name(router) + "-" + name(recovery);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------------------------

/// Held-out metrics of one model against the dense one (issue 4 definitions).
struct Metrics {
  double top1_agreement = 0;  // argmax equals the dense model's argmax
  double next_token_acc = 0;  // argmax equals the sequence's next token
  double ppl = 0;             // exp(mean NLL of the next token)
  double kl_to_dense = 0;     // mean KL(dense || model) of the next-token distributions
  std::int64_t positions = 0;
};

/// The dense model's next-token distributions on the held-out set, computed once.
struct DenseReference {
  std::vector<std::vector<float>> log_probs;  // per sequence: [T - 1, vocab] log-softmax rows
  std::vector<std::vector<int>> argmax;       // per sequence: [T - 1]
  Metrics metrics;                            // the dense model's own numbers (agreement 1, KL 0)
};

/// Writes log-softmax of `logits` [vocab] into `out` (double internally: the max is subtracted first).
void log_softmax(float const* logits, std::ptrdiff_t vocab, float* out) {
  float const mx = *std::max_element(logits, logits + vocab);
  double sum = 0;
  for (std::ptrdiff_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i] - mx));
  double const lse = static_cast<double>(mx) + std::log(sum);
  for (std::ptrdiff_t i = 0; i < vocab; ++i) out[i] = static_cast<float>(static_cast<double>(logits[i]) - lse);
}

/// Runs the engine on every held-out sequence; compares with `ref` when given, else fills it (the dense pass).
Metrics evaluate(fx::Llama2cEngine& engine, std::vector<fx::TokenSequence> const& eval, DenseReference* fill,
                 DenseReference const* ref) {
  std::ptrdiff_t const vocab = engine.vocab_size();
  std::vector<float> lp(static_cast<std::size_t>(vocab));
  std::int64_t agree = 0, correct = 0, positions = 0;
  double nll = 0, kl = 0;
  for (std::size_t i = 0; i < eval.size(); ++i) {
    auto const& seq = eval[i];
    auto const logits = engine.forward_sequence(seq);
    std::ptrdiff_t const n_pred = static_cast<std::ptrdiff_t>(seq.size()) - 1;  // row t predicts token t + 1
    if (fill != nullptr) {
      fill->log_probs.emplace_back(static_cast<std::size_t>(n_pred * vocab));
      fill->argmax.emplace_back(static_cast<std::size_t>(n_pred));
    }
    for (std::ptrdiff_t t = 0; t < n_pred; ++t) {
      float const* row = logits.row(t);
      int const top = fx::Sampler::argmax(row, vocab);
      int const target = seq[static_cast<std::size_t>(t) + 1];
      float* out = fill != nullptr ? fill->log_probs.back().data() + t * vocab : lp.data();
      log_softmax(row, vocab, out);
      nll -= out[target];
      correct += top == target;
      if (fill != nullptr) {
        fill->argmax.back()[static_cast<std::size_t>(t)] = top;
        agree += 1;
      } else {
        float const* dense_lp = ref->log_probs[i].data() + t * vocab;
        agree += top == ref->argmax[i][static_cast<std::size_t>(t)];
        double k = 0;
        for (std::ptrdiff_t v = 0; v < vocab; ++v)
          k += std::exp(static_cast<double>(dense_lp[v])) * (static_cast<double>(dense_lp[v]) - out[v]);
        kl += k;
      }
      ++positions;
    }
  }
  Metrics m;
  m.positions = positions;
  m.top1_agreement = static_cast<double>(agree) / static_cast<double>(positions);
  m.next_token_acc = static_cast<double>(correct) / static_cast<double>(positions);
  m.ppl = std::exp(nll / static_cast<double>(positions));
  m.kl_to_dense = kl / static_cast<double>(positions);
  if (fill != nullptr) fill->metrics = m;
  return m;
}

// ---------------------------------------------------------------------------------------------------------------
// Conversion of one layer
// ---------------------------------------------------------------------------------------------------------------

/// A dense FFN whose d_ff is zero-padded to a multiple of n_experts. Padded neurons have zero gate, up and down
/// weights, so they contribute exactly 0 (SiLU(0) * 0 = 0): the padded FFN equals the original one.
struct PaddedFfn {
  fl::ffn::DenseFfn<float> weights;
  std::ptrdiff_t d_ff_original = 0;
};

PaddedFfn pad_ffn(fl::ffn::DenseFfnView<float> const& dense, std::ptrdiff_t multiple) {
  std::ptrdiff_t const d = dense.d_model(), m = dense.d_ff(), mp = (m + multiple - 1) / multiple * multiple;
  PaddedFfn p{{fl::Matrix<float>({mp, d}), fl::Matrix<float>({mp, d}), fl::Matrix<float>({d, mp})}, m};
  for (std::ptrdiff_t i = 0; i < m; ++i)
    for (std::ptrdiff_t k = 0; k < d; ++k) {
      p.weights.gate(i, k) = dense.gate(i, k);
      p.weights.up(i, k) = dense.up(i, k);
    }
  for (std::ptrdiff_t o = 0; o < d; ++o)
    for (std::ptrdiff_t i = 0; i < m; ++i) p.weights.down(o, i) = dense.down(o, i);
  return p;
}

constexpr std::uint64_t kSeed = 2024;  // partitions, routers and training of layer l use kSeed + l

using SimdMoe = fl::moe::MoeFfn<float, fl::CpuSimd<>>;
using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstRowMap = Eigen::Map<RowMat const>;

/// Knobs of the conversion methods (the report's defaults; --quick shortens training).
struct MethodConfig {
  int router_steps = 300;        // full-batch Adam steps of router training
  double router_lr = 0.01;
  double balance_ratio = 0.2;    // balance_weight / par_weight of the paper's code (0.01 / 0.05)
  double ridge = 1e-3;           // refit: ridge strength relative to the mean feature energy, toward the old weights
  int distill_epochs = 30;       // passes over the calibration tokens
  int distill_batch = 256;
  double distill_lr = 1e-3;
  int cluster_iters = 30;        // balanced k-means iterations
};

float silu(float a) { return a / (1.f + std::exp(-a)); }

/// The dense FFN's hidden activations h = SiLU(x W_g^T) * (x W_u^T) [T, d_ff] and output F(x) [T, d_model].
struct DenseActs {
  RowMat h, f;
};
DenseActs dense_acts(fl::ffn::DenseFfnView<float> const& w, fl::MatrixView<float const> x) {
  std::ptrdiff_t const d = w.d_model(), m = w.d_ff();
  ConstRowMap xm(x.data(), x.rows(), d);
  DenseActs a;
  a.h = xm * ConstRowMap(w.gate.data(), m, d).transpose();
  RowMat const u = xm * ConstRowMap(w.up.data(), m, d).transpose();
  a.h = a.h.unaryExpr([](float v) { return silu(v); }).cwiseProduct(u);
  a.f = a.h * ConstRowMap(w.down.data(), d, m).transpose();
  return a;
}

/// Balanced k-means on the rows of `feat` (L2-normalized, cosine similarity): every cluster gets exactly
/// rows / n_clusters members. Assignment is greedy on the globally sorted similarities (a standard balanced
/// heuristic, deterministic given the seed), then centroids are re-estimated.
std::vector<std::int32_t> balanced_kmeans(RowMat feat, std::ptrdiff_t n_clusters, std::uint64_t seed, int iters) {
  std::ptrdiff_t const rows = feat.rows(), cap = rows / n_clusters;
  for (std::ptrdiff_t i = 0; i < rows; ++i) feat.row(i) /= std::max(feat.row(i).norm(), 1e-12f);
  std::vector<std::int32_t> a(static_cast<std::size_t>(rows), -1);
  // Seeds: a seeded random pick of distinct rows.
  std::vector<std::ptrdiff_t> pick(static_cast<std::size_t>(rows));
  for (std::ptrdiff_t i = 0; i < rows; ++i) pick[static_cast<std::size_t>(i)] = i;
  std::mt19937_64 rng(seed);
  for (std::ptrdiff_t i = rows - 1; i > 0; --i)
    std::swap(pick[static_cast<std::size_t>(i)], pick[static_cast<std::size_t>(rng() % static_cast<std::uint64_t>(i + 1))]);
  RowMat c(n_clusters, feat.cols());
  for (std::ptrdiff_t k = 0; k < n_clusters; ++k) c.row(k) = feat.row(pick[static_cast<std::size_t>(k)]);
  std::vector<std::pair<float, std::ptrdiff_t>> order(static_cast<std::size_t>(rows * n_clusters));
  for (int it = 0; it < iters; ++it) {
    RowMat const sim = feat * c.transpose();  // [rows, n_clusters]
    for (std::ptrdiff_t i = 0; i < rows; ++i)
      for (std::ptrdiff_t k = 0; k < n_clusters; ++k)
        order[static_cast<std::size_t>(i * n_clusters + k)] = {-sim(i, k), i * n_clusters + k};
    std::sort(order.begin(), order.end());
    std::fill(a.begin(), a.end(), -1);
    std::vector<std::ptrdiff_t> count(static_cast<std::size_t>(n_clusters), 0);
    for (auto const& [neg, ik] : order) {
      std::ptrdiff_t const i = ik / n_clusters, k = ik % n_clusters;
      if (a[static_cast<std::size_t>(i)] < 0 && count[static_cast<std::size_t>(k)] < cap) {
        a[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(k);
        ++count[static_cast<std::size_t>(k)];
      }
    }
    c.setZero();
    for (std::ptrdiff_t i = 0; i < rows; ++i) c.row(a[static_cast<std::size_t>(i)]) += feat.row(i);
    for (std::ptrdiff_t k = 0; k < n_clusters; ++k) c.row(k) /= std::max(c.row(k).norm(), 1e-12f);
  }
  return a;
}

/// The partition of the recipe. With S shared experts, experts N-S .. N-1 are the always-on ones: for the
/// clustering partitions they take the neurons of largest mean contribution E|h_i| * ||W_d[:, i]||, and the rest
/// are clustered into the N-S routed experts.
fl::ffn::ExpertPartition make_partition(ConvConfig const& cfg, fl::ffn::DenseFfnView<float> const& w,
                                        DenseActs const& acts, std::uint64_t seed, MethodConfig const& mc) {
  std::ptrdiff_t const n = cfg.n_experts, m_all = w.d_ff(), d = w.d_model(), m = m_all / n, r = n - cfg.shared;
  if (cfg.partition == PartitionKind::contiguous) return fl::ffn::ExpertPartition::contiguous(m_all, n);
  if (cfg.partition == PartitionKind::random) return fl::ffn::ExpertPartition::random(m_all, n, seed);
  Eigen::VectorXf down_norm(m_all);
  for (std::ptrdiff_t i = 0; i < m_all; ++i) {
    double s = 0;
    for (std::ptrdiff_t o = 0; o < d; ++o) s += static_cast<double>(w.down(o, i)) * w.down(o, i);
    down_norm(i) = static_cast<float>(std::sqrt(s));
  }
  RowMat const contrib = (acts.h.cwiseAbs() * down_norm.asDiagonal()).transpose();  // [d_ff, T]
  std::vector<std::ptrdiff_t> routed;  // neurons left for the routed experts
  std::vector<std::int32_t> assign(static_cast<std::size_t>(m_all), -1);
  {
    std::vector<std::ptrdiff_t> by_importance(static_cast<std::size_t>(m_all));
    for (std::ptrdiff_t i = 0; i < m_all; ++i) by_importance[static_cast<std::size_t>(i)] = i;
    Eigen::VectorXf const importance = contrib.rowwise().sum();
    std::stable_sort(by_importance.begin(), by_importance.end(),
                     [&](std::ptrdiff_t a, std::ptrdiff_t b) { return importance(a) > importance(b); });
    for (std::ptrdiff_t j = 0; j < m_all; ++j) {
      std::ptrdiff_t const i = by_importance[static_cast<std::size_t>(j)];
      if (j < cfg.shared * m) assign[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(r + j / m);
      else routed.push_back(i);
    }
    std::sort(routed.begin(), routed.end());
  }
  RowMat feat(static_cast<std::ptrdiff_t>(routed.size()), 0);
  if (cfg.partition == PartitionKind::cluster_weights) {
    // Neurons with similar [W_g | W_u] rows respond to similar inputs.
    feat.resize(static_cast<std::ptrdiff_t>(routed.size()), 2 * d);
    for (std::size_t j = 0; j < routed.size(); ++j)
      for (std::ptrdiff_t k = 0; k < d; ++k) {
        feat(static_cast<std::ptrdiff_t>(j), k) = w.gate(routed[j], k);
        feat(static_cast<std::ptrdiff_t>(j), d + k) = w.up(routed[j], k);
      }
  } else {
    // Co-activation: neurons whose contributions |h_i| ||W_d[:, i]|| rise and fall on the same tokens.
    feat.resize(static_cast<std::ptrdiff_t>(routed.size()), contrib.cols());
    for (std::size_t j = 0; j < routed.size(); ++j) feat.row(static_cast<std::ptrdiff_t>(j)) = contrib.row(routed[j]);
  }
  std::vector<std::int32_t> const a = balanced_kmeans(std::move(feat), r, seed, mc.cluster_iters);
  for (std::size_t j = 0; j < routed.size(); ++j) assign[static_cast<std::size_t>(routed[j])] = a[j];
  return fl::ffn::ExpertPartition::from_assignment(assign, n);
}

/// Expert weights as Eigen matrices while they are being trained: gate, up [d_expert, d_model], down
/// [d_model, d_expert] per expert (routed first, then shared).
struct Blocks {
  std::vector<RowMat> gate, up, down;
};

Blocks to_blocks(fl::ffn::ExpertWeights<float> const& ew) {
  Blocks b;
  for (std::ptrdiff_t e = 0; e < ew.n_experts(); ++e) {
    b.gate.emplace_back(ConstRowMap(ew.gate(e).data(), ew.d_expert(), ew.d_model()));
    b.up.emplace_back(ConstRowMap(ew.up(e).data(), ew.d_expert(), ew.d_model()));
    b.down.emplace_back(ConstRowMap(ew.down(e).data(), ew.d_model(), ew.d_expert()));
  }
  return b;
}

/// Output of block e on the rows x [T, d_model] (hidden activations into h when given).
RowMat block_out(Blocks const& b, std::size_t e, RowMat const& x, RowMat* h_out = nullptr) {
  RowMat h = x * b.gate[e].transpose();
  RowMat const u = x * b.up[e].transpose();
  h = h.unaryExpr([](float v) { return silu(v); }).cwiseProduct(u);
  RowMat out = h * b.down[e].transpose();
  if (h_out != nullptr) *h_out = std::move(h);
  return out;
}

/// Pseudo-labels of the routed experts, one bitmask per token.
///   par:    the paper's PAR labels (spec 3.2 step 5): the K experts whose outputs e_n are closest to f / floor(N/K)
///   subset: the K-subset whose SUMMED output is closest to f (the paper code's unused get_label; spec 3.2), which
///           is what the report's plain-sum gating actually outputs.
/// f is the dense output minus the shared experts' output.
std::vector<std::uint32_t> pseudo_labels(std::vector<RowMat> const& e_out, RowMat const& target, std::ptrdiff_t k,
                                         bool subset) {
  std::ptrdiff_t const n = static_cast<std::ptrdiff_t>(e_out.size()), t_count = target.rows();
  std::vector<std::uint32_t> lab(static_cast<std::size_t>(t_count), 0);
  double const s = fl::moe::Gating::code_ref_scale(n, k);
  for (std::ptrdiff_t t = 0; t < t_count; ++t) {
    if (!subset) {
      std::vector<std::pair<double, std::ptrdiff_t>> delta(static_cast<std::size_t>(n));
      for (std::ptrdiff_t e = 0; e < n; ++e)
        delta[static_cast<std::size_t>(e)] = {(e_out[static_cast<std::size_t>(e)].row(t).cast<double>() -
                                               target.row(t).cast<double>() / s).squaredNorm(), e};
      std::stable_sort(delta.begin(), delta.end());  // ties: lower index first
      for (std::ptrdiff_t j = 0; j < k; ++j) lab[static_cast<std::size_t>(t)] |= 1u << delta[static_cast<std::size_t>(j)].second;
      continue;
    }
    double best = INFINITY;
    for (std::uint32_t mask = 0; mask < (1u << n); ++mask) {
      if (__builtin_popcount(mask) != k) continue;
      Eigen::RowVectorXd sum = -target.row(t).cast<double>();
      for (std::ptrdiff_t e = 0; e < n; ++e)
        if (mask >> e & 1u) sum += e_out[static_cast<std::size_t>(e)].row(t).cast<double>();
      double const err = sum.squaredNorm();
      if (err < best) {
        best = err;
        lab[static_cast<std::size_t>(t)] = mask;
      }
    }
  }
  return lab;
}

/// Trains the router on the PAR objective (spec 3.2): mean_t KL(clip(p) || clip(q)) with q = softmax(multi-hot
/// label), plus the balance term at the paper's relative weight, full-batch Adam (betas 0.9 / 0.999) from the
/// paper's random init. Labels are fixed because the experts are fixed while the router trains.
/// \returns the fraction of tokens whose router TopK set equals the label set
double train_router(fl::moe::Router<float>& router, RowMat const& x, std::vector<std::uint32_t> const& labels,
                    std::ptrdiff_t k, MethodConfig const& mc) {
  std::ptrdiff_t const n = router.n_experts(), d = router.d_model(), t_count = x.rows();
  auto const q = fl::train::par_target_q(n, k);
  double const clip = fl::train::ParLossConfig{}.clip;
  Eigen::Map<RowMat> w(router.mutable_weight().data(), n, d);
  Eigen::Map<Eigen::RowVectorXf> b(router.mutable_bias().data(), n);
  RowMat mw = RowMat::Zero(n, d), vw = RowMat::Zero(n, d);
  Eigen::RowVectorXf mb = Eigen::RowVectorXf::Zero(n), vb = Eigen::RowVectorXf::Zero(n);
  RowMat dz(t_count, n);
  auto topk_mask = [&](Eigen::Ref<Eigen::RowVectorXf const> z) {
    std::uint32_t mask = 0;
    for (std::ptrdiff_t j = 0; j < k; ++j) {
      std::ptrdiff_t best = -1;
      for (std::ptrdiff_t e = 0; e < n; ++e)
        if (!(mask >> e & 1u) && (best < 0 || z(e) > z(best))) best = e;
      mask |= 1u << best;
    }
    return mask;
  };
  // Per-token constants, hoisted out of the step loop: log q of each expert under the token's label.
  RowMat log_q(t_count, n);
  for (std::ptrdiff_t t = 0; t < t_count; ++t)
    for (std::ptrdiff_t e = 0; e < n; ++e)
      log_q(t, e) = static_cast<float>(std::log((labels[static_cast<std::size_t>(t)] >> e & 1u) ? q.selected : q.unselected));
  RowMat z(t_count, n);
  for (int step = 1; step <= mc.router_steps; ++step) {
    z.noalias() = x * w.transpose();
    z.rowwise() += b;
    float const bal = static_cast<float>(mc.balance_ratio / static_cast<double>(n));
    for (std::ptrdiff_t t = 0; t < t_count; ++t) {
      float* zr = z.data() + t * n;  // becomes p
      float* dr = dz.data() + t * n;  // holds g, then dL/dz
      std::uint32_t const sel = topk_mask(z.row(t));
      float const mx = *std::max_element(zr, zr + n);
      float sum = 0.f;
      for (std::ptrdiff_t e = 0; e < n; ++e) sum += zr[e] = std::exp(zr[e] - mx);
      float pg = 0.f;
      for (std::ptrdiff_t e = 0; e < n; ++e) {
        float const p = zr[e] /= sum;
        // dKL/dp_n = log p^ - log q^ + 1 where the clip passes (spec 3.2); balance: d/dp_n = 1[n in TopK(p)] / N.
        float g = (p >= clip && p <= 1.0 - clip) ? std::log(p) - log_q(t, e) + 1.f : 0.f;
        if (sel >> e & 1u) g += bal;
        dr[e] = g;
        pg += p * g;
      }
      for (std::ptrdiff_t e = 0; e < n; ++e) dr[e] = zr[e] * (dr[e] - pg) / static_cast<float>(t_count);
    }
    RowMat const gw = dz.transpose() * x;
    Eigen::RowVectorXf const gb = dz.colwise().sum();
    double const c1 = 1 - std::pow(0.9, step), c2 = 1 - std::pow(0.999, step);
    float const lr = static_cast<float>(mc.router_lr);
    mw = 0.9f * mw + 0.1f * gw;
    vw = 0.999f * vw + 0.001f * gw.cwiseProduct(gw);
    mb = 0.9f * mb + 0.1f * gb;
    vb = 0.999f * vb + 0.001f * gb.cwiseProduct(gb);
    w.array() -= lr * (mw.array() / static_cast<float>(c1)) / ((vw.array() / static_cast<float>(c2)).sqrt() + 1e-8f);
    b.array() -= lr * (mb.array() / static_cast<float>(c1)) / ((vb.array() / static_cast<float>(c2)).sqrt() + 1e-8f);
  }
  z.noalias() = x * w.transpose();
  z.rowwise() += b;
  std::ptrdiff_t hits = 0;
  for (std::ptrdiff_t t = 0; t < t_count; ++t) hits += topk_mask(z.row(t)) == labels[static_cast<std::size_t>(t)];
  return static_cast<double>(hits) / static_cast<double>(t_count);
}

/// Which blocks each token uses: its routed experts (from the deployed router and gating) plus every shared one.
std::vector<std::vector<std::ptrdiff_t>> active_blocks(SimdMoe const& routed, fl::MatrixView<float const> x,
                                                       std::ptrdiff_t shared) {
  fl::moe::RoutingRecord<float> rec;
  fl::Matrix<float> y({x.rows(), x.cols()});
  fl::Workspace ws(routed.workspace_bytes(x.rows()));
  routed.forward(x, y.view(), ws, &rec);
  std::ptrdiff_t const n_r = routed.n_experts();
  std::vector<std::vector<std::ptrdiff_t>> rows(static_cast<std::size_t>(n_r + shared));  // tokens per block
  for (std::ptrdiff_t t = 0; t < x.rows(); ++t) {
    for (std::ptrdiff_t j = 0; j < routed.top_k(); ++j) rows[static_cast<std::size_t>(rec.ids(t, j))].push_back(t);
    for (std::ptrdiff_t s = 0; s < shared; ++s) rows[static_cast<std::size_t>(n_r + s)].push_back(t);
  }
  return rows;
}

RowMat gather_rows(RowMat const& src, std::vector<std::ptrdiff_t> const& rows) {
  RowMat out(static_cast<std::ptrdiff_t>(rows.size()), src.cols());
  for (std::size_t i = 0; i < rows.size(); ++i) out.row(static_cast<std::ptrdiff_t>(i)) = src.row(rows[i]);
  return out;
}

/// Closed-form ridge refit of every block's down projection under the fixed routing: minimizes
/// sum_t || sum_{e active at t} W_d,e h_e(x_t) - F(x_t) ||^2 + lambda ||W_d - W_d,old||^2 jointly over all blocks
/// (the blocks interact through the sum). lambda = ridge * trace(H^T H) / d_ff keeps it scale free.
void refit_down(Blocks& b, RowMat const& x, RowMat const& f, std::vector<std::vector<std::ptrdiff_t>> const& rows,
                double ridge) {
  std::ptrdiff_t const n = static_cast<std::ptrdiff_t>(b.gate.size()), m = b.gate[0].rows(), d = x.cols(),
                       p = n * m, t_count = x.rows();
  RowMat z = RowMat::Zero(t_count, p);  // masked hidden activations of every block
  for (std::ptrdiff_t e = 0; e < n; ++e) {
    auto const& r = rows[static_cast<std::size_t>(e)];
    if (r.empty()) continue;
    RowMat h;
    block_out(b, static_cast<std::size_t>(e), gather_rows(x, r), &h);
    for (std::size_t i = 0; i < r.size(); ++i) z.block(r[i], e * m, 1, m) = h.row(static_cast<std::ptrdiff_t>(i));
  }
  Eigen::MatrixXd const zd = z.cast<double>();
  Eigen::MatrixXd a = zd.transpose() * zd;
  Eigen::MatrixXd rhs = zd.transpose() * f.cast<double>();  // [p, d]
  double const lambda = ridge * a.trace() / static_cast<double>(p);
  Eigen::MatrixXd w0(p, d);
  for (std::ptrdiff_t e = 0; e < n; ++e) w0.middleRows(e * m, m) = b.down[static_cast<std::size_t>(e)].transpose().cast<double>();
  a.diagonal().array() += lambda;
  rhs += lambda * w0;
  Eigen::MatrixXd const w = a.ldlt().solve(rhs);
  for (std::ptrdiff_t e = 0; e < n; ++e) b.down[static_cast<std::size_t>(e)] = w.middleRows(e * m, m).transpose().cast<float>();
}

/// Layer-local distillation: Adam on every block's gate, up and down to minimize mean_t || MoE(x_t) - F(x_t) ||^2
/// with the routing fixed, on shuffled minibatches; gradients by hand per block with batched GEMMs.
void distill(Blocks& b, RowMat const& x, RowMat const& f, std::vector<std::vector<std::ptrdiff_t>> const& rows,
             std::uint64_t seed, MethodConfig const& mc) {
  std::size_t const n = b.gate.size();
  std::ptrdiff_t const t_count = x.rows(), d = x.cols();
  struct Adam {
    RowMat m, v;
  };
  std::vector<Adam> opt(3 * n);
  for (std::size_t e = 0; e < n; ++e) {
    opt[3 * e] = {RowMat::Zero(b.gate[e].rows(), d), RowMat::Zero(b.gate[e].rows(), d)};
    opt[3 * e + 1] = opt[3 * e];
    opt[3 * e + 2] = {RowMat::Zero(d, b.down[e].cols()), RowMat::Zero(d, b.down[e].cols())};
  }
  // Per token: the list of blocks it uses, to build each minibatch's per-block row lists.
  std::vector<std::vector<std::size_t>> blocks_of(static_cast<std::size_t>(t_count));
  for (std::size_t e = 0; e < n; ++e)
    for (std::ptrdiff_t t : rows[e]) blocks_of[static_cast<std::size_t>(t)].push_back(e);
  std::vector<std::ptrdiff_t> order(static_cast<std::size_t>(t_count));
  for (std::ptrdiff_t t = 0; t < t_count; ++t) order[static_cast<std::size_t>(t)] = t;
  std::mt19937_64 rng(seed);
  int step = 0;
  float const lr = static_cast<float>(mc.distill_lr);
  auto adam = [&](RowMat& param, Adam& s, RowMat const& g) {
    float const c1 = static_cast<float>(1 - std::pow(0.9, step)), c2 = static_cast<float>(1 - std::pow(0.999, step));
    s.m = 0.9f * s.m + 0.1f * g;
    s.v = 0.999f * s.v + 0.001f * g.cwiseProduct(g);
    param.array() -= lr * (s.m.array() / c1) / ((s.v.array() / c2).sqrt() + 1e-8f);
  };
  std::vector<std::vector<std::ptrdiff_t>> local(n);  // per block: positions inside the minibatch
  std::vector<RowMat> xe(n), g(n), u(n), h(n);
  for (int epoch = 0; epoch < mc.distill_epochs; ++epoch) {
    for (std::ptrdiff_t i = t_count - 1; i > 0; --i)
      std::swap(order[static_cast<std::size_t>(i)], order[static_cast<std::size_t>(rng() % static_cast<std::uint64_t>(i + 1))]);
    for (std::ptrdiff_t b0 = 0; b0 < t_count; b0 += mc.distill_batch) {
      std::ptrdiff_t const nb = std::min<std::ptrdiff_t>(mc.distill_batch, t_count - b0);
      for (auto& l : local) l.clear();
      RowMat xb(nb, d), resid(nb, d);
      for (std::ptrdiff_t i = 0; i < nb; ++i) {
        std::ptrdiff_t const t = order[static_cast<std::size_t>(b0 + i)];
        xb.row(i) = x.row(t);
        resid.row(i) = -f.row(t);
        for (std::size_t e : blocks_of[static_cast<std::size_t>(t)]) local[e].push_back(i);
      }
      for (std::size_t e = 0; e < n; ++e) {  // forward: resid = MoE(x) - F(x)
        if (local[e].empty()) continue;
        xe[e] = gather_rows(xb, local[e]);
        g[e] = xe[e] * b.gate[e].transpose();
        u[e] = xe[e] * b.up[e].transpose();
        h[e] = g[e].unaryExpr([](float v) { return silu(v); }).cwiseProduct(u[e]);
        RowMat const out = h[e] * b.down[e].transpose();
        for (std::size_t i = 0; i < local[e].size(); ++i) resid.row(local[e][i]) += out.row(static_cast<std::ptrdiff_t>(i));
      }
      resid *= 2.f / static_cast<float>(nb);  // d/dy of the batch-mean squared error
      ++step;
      for (std::size_t e = 0; e < n; ++e) {  // backward through each block's SwiGLU
        if (local[e].empty()) continue;
        RowMat const r = gather_rows(resid, local[e]);
        RowMat const g_down = r.transpose() * h[e];
        RowMat const dh = r * b.down[e];
        RowMat dg(dh.rows(), dh.cols()), du(dh.rows(), dh.cols());
        for (std::ptrdiff_t i = 0; i < dh.size(); ++i) {
          float const a = g[e].data()[i], sg = 1.f / (1.f + std::exp(-a));
          du.data()[i] = dh.data()[i] * a * sg;                                    // d/du of silu(a) * u
          dg.data()[i] = dh.data()[i] * u[e].data()[i] * sg * (1.f + a * (1.f - sg));  // silu'(a) = s (1 + a (1 - s))
        }
        adam(b.gate[e], opt[3 * e], dg.transpose() * xe[e]);
        adam(b.up[e], opt[3 * e + 1], du.transpose() * xe[e]);
        adam(b.down[e], opt[3 * e + 2], g_down);
      }
    }
  }
}

/// Always-on shared experts plus a routed MoE (S + K of N experts per token), built from library parts: the
/// shared experts run as one dense SwiGLU of S * d_expert neurons, the routed ones as a moe::MoeFfn.
class SharedPlusRoutedLayer final : public fx::FfnLayer {
 public:
  SharedPlusRoutedLayer(fl::ffn::DenseFfn<float> shared, SimdMoe routed, std::ptrdiff_t max_tokens, std::string label)
      : shared_(std::move(shared)), shared_ffn_(shared_.view(), max_tokens),
        routed_(std::move(routed), max_tokens, std::move(label)) {}
  void forward(fl::MatrixView<float const> x, fl::MatrixView<float> y) override {
    if (tmp_.extent(0) < x.rows()) tmp_ = fl::Matrix<float>({x.rows(), x.cols()});  // grows once
    fl::MatrixView<float> const t = tmp_.view().slice_rows(0, x.rows());
    shared_ffn_.forward(x, t);
    routed_.forward(x, y);
    for (std::ptrdiff_t r = 0; r < x.rows(); ++r)
      for (std::ptrdiff_t c = 0; c < x.cols(); ++c) y(r, c) += t(r, c);
  }
  std::string describe() const override { return routed_.describe(); }

 private:
  fl::ffn::DenseFfn<float> shared_;  // owner of the weights shared_ffn_ views (never moved after construction)
  fx::DenseFfnLayer shared_ffn_;
  fx::MoeLayerAdapter<SimdMoe> routed_;
  fl::Matrix<float> tmp_;
};

/// Packs blocks [first, first + count) into stacked expert tensors with a contiguous partition.
fl::ffn::ExpertWeights<float> pack_experts(Blocks const& b, std::size_t first, std::size_t count) {
  std::ptrdiff_t const m = b.gate[0].rows(), d = b.gate[0].cols(), n = static_cast<std::ptrdiff_t>(count);
  fl::Tensor<float, 3> gate({n, m, d}), up({n, m, d}), down({n, d, m});
  for (std::ptrdiff_t e = 0; e < n; ++e) {
    Eigen::Map<RowMat>(gate.data() + e * m * d, m, d) = b.gate[first + static_cast<std::size_t>(e)];
    Eigen::Map<RowMat>(up.data() + e * m * d, m, d) = b.up[first + static_cast<std::size_t>(e)];
    Eigen::Map<RowMat>(down.data() + e * d * m, d, m) = b.down[first + static_cast<std::size_t>(e)];
  }
  return fl::ffn::ExpertWeights<float>(std::move(gate), std::move(up), std::move(down),
                                       fl::ffn::ExpertPartition::contiguous(n * m, n));
}

/// Per-layer numbers a conversion reports (averaged over layers in the table's notes).
struct LayerStats {
  double label_accuracy = 0;  // router TopK set == pseudo-label set, calibration tokens
  double rel_err_routed = 0;  // ||MoE(x) - F(x)|| / ||F(x)|| before recovery
  double rel_err_final = 0;   // after recovery
};

double rel_err(Blocks const& b, RowMat const& x, RowMat const& f, std::vector<std::vector<std::ptrdiff_t>> const& rows) {
  RowMat y = RowMat::Zero(x.rows(), x.cols());
  for (std::size_t e = 0; e < b.gate.size(); ++e) {
    if (rows[e].empty()) continue;
    RowMat const out = block_out(b, e, gather_rows(x, rows[e]));
    for (std::size_t i = 0; i < rows[e].size(); ++i) y.row(rows[e][i]) += out.row(static_cast<std::ptrdiff_t>(i));
  }
  return std::sqrt((y - f).squaredNorm() / std::max(f.squaredNorm(), 1e-30f));
}

/// Converts one dense FFN (d_ff divisible by N) into the engine FFN the recipe describes.
std::unique_ptr<fx::FfnLayer> convert_layer(ConvConfig const& cfg, int l, fl::ffn::DenseFfnView<float> const& dense,
                                            fl::MatrixView<float const> x_calib, std::ptrdiff_t max_tokens,
                                            MethodConfig const& mc, LayerStats& stats) {
  std::uint64_t const seed = kSeed + static_cast<std::uint64_t>(l);
  std::ptrdiff_t const n = cfg.n_experts, n_routed = n - cfg.shared, d = dense.d_model();
  RowMat const x = ConstRowMap(x_calib.data(), x_calib.rows(), d);
  DenseActs const acts = dense_acts(dense, x_calib);
  Blocks blocks = to_blocks(fl::ffn::factorize(dense, make_partition(cfg, dense, acts, seed, mc)));

  // Router over the routed experts. Gating code_ref with output_scale 1 / floor(N/K): every selected expert has
  // weight exactly 1 (a plain sum, the natural "drop the unselected neurons" approximation; the paper's x floor(N/K)
  // amplifies the kept part and loses badly without recovery). For K = N it is exactly the dense FFN.
  fl::moe::Gating gating;
  gating.mode = fl::moe::CombineMode::code_ref;
  gating.top_k = cfg.top_k;
  gating.output_scale = static_cast<float>(1.0 / fl::moe::Gating::code_ref_scale(n_routed, cfg.top_k));
  auto router = fl::moe::Router<float>::random(d, n_routed, seed);
  if (cfg.router != RouterKind::random) {
    std::vector<RowMat> e_out;
    RowMat target = acts.f;
    for (std::ptrdiff_t e = 0; e < n; ++e) {
      RowMat out = block_out(blocks, static_cast<std::size_t>(e), x);
      if (e < n_routed) e_out.push_back(std::move(out));
      else target -= out;  // the routed experts approximate what the shared ones leave
    }
    auto const labels = pseudo_labels(e_out, target, cfg.top_k, cfg.router == RouterKind::par_subset);
    stats.label_accuracy = train_router(router, x, labels, cfg.top_k, mc);
  }
  // Routing is fixed from here on: recovery adapts the experts to the router, not the reverse.
  auto const rows = active_blocks(SimdMoe(pack_experts(blocks, 0, static_cast<std::size_t>(n_routed)), router, gating),
                                  x_calib, cfg.shared);
  stats.rel_err_routed = rel_err(blocks, x, acts.f, rows);
  if (cfg.recovery == RecoveryKind::refit || cfg.recovery == RecoveryKind::refit_distill)
    refit_down(blocks, x, acts.f, rows, mc.ridge);
  if (cfg.recovery == RecoveryKind::distill || cfg.recovery == RecoveryKind::refit_distill)
    distill(blocks, x, acts.f, rows, seed, mc);
  stats.rel_err_final = rel_err(blocks, x, acts.f, rows);

  SimdMoe routed(pack_experts(blocks, 0, static_cast<std::size_t>(n_routed)), std::move(router), std::move(gating));
  if (cfg.shared == 0) return std::make_unique<fx::MoeFfnLayer>(std::move(routed), max_tokens, cfg.label());
  fl::ffn::ExpertWeights<float> const sh = pack_experts(blocks, static_cast<std::size_t>(n_routed),
                                                        static_cast<std::size_t>(cfg.shared));
  fl::ffn::DenseFfn<float> shared = fl::ffn::unfactorize(sh);
  return std::make_unique<SharedPlusRoutedLayer>(std::move(shared), std::move(routed), max_tokens, cfg.label());
}

// ---------------------------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------------------------

struct Row {
  ConvConfig cfg;
  double flops_fraction = 0;
  Metrics m;
  LayerStats stats;  // mean over layers
  double seconds = 0;
};

struct Options {
  bool quick = false;
  std::string csv;
  std::string model = std::string(FACTORLLM_SHARED_DIR) + "/models/stories260K.bin";
  std::string tokenizer;
  int threads = 2;
  int n_calib = -1, n_eval = -1, length = -1, epochs = -1;
  double ridge = -1;
};

[[noreturn]] void usage(char const* msg) {
  std::fprintf(stderr,
               "factorllm_fidelity_report: %s\n"
               "usage: factorllm_fidelity_report [--quick] [--csv PATH] [--model PATH] [--tokenizer PATH]\n"
               "         [--threads N] [--calib SEQS] [--eval SEQS] [--length TOKENS] [--epochs N] [--ridge R]\n",
               msg);
  std::exit(2);
}

Options parse_args(int argc, char** argv) {
  Options o;
  auto value = [&](int& i) -> std::string {
    if (i + 1 >= argc) usage((std::string(argv[i]) + " needs a value").c_str());
    return argv[++i];
  };
  auto integer = [&](int& i, int lo) {
    std::string const v = value(i);
    char* end = nullptr;
    long const x = std::strtol(v.c_str(), &end, 10);
    if (end == v.c_str() || *end != '\0' || x < lo || x > 100000) usage(("bad number '" + v + "'").c_str());
    return static_cast<int>(x);
  };
  for (int i = 1; i < argc; ++i) {
    std::string const a = argv[i];
    if (a == "--quick") o.quick = true;
    else if (a == "--csv") o.csv = value(i);
    else if (a == "--model") o.model = value(i);
    else if (a == "--tokenizer") o.tokenizer = value(i);
    else if (a == "--threads") o.threads = integer(i, 1);
    else if (a == "--calib") o.n_calib = integer(i, 1);
    else if (a == "--eval") o.n_eval = integer(i, 1);
    else if (a == "--length") o.length = integer(i, 2);
    else if (a == "--epochs") o.epochs = integer(i, 0);
    else if (a == "--ridge") {
      std::string const v = value(i);
      char* end = nullptr;
      o.ridge = std::strtod(v.c_str(), &end);
      if (end == v.c_str() || *end != '\0' || !(o.ridge >= 0)) usage(("bad ridge '" + v + "'").c_str());
    } else if (a == "-h" || a == "--help") usage("help");
    else usage(("unknown argument '" + a + "'").c_str());
  }
  if (o.tokenizer.empty()) o.tokenizer = (std::filesystem::path(o.model).parent_path() / "tok512.bin").string();
  if (o.csv.empty() && !o.quick) o.csv = "fidelity_report.csv";
  return o;
}

/// The report's configurations. Budgets 25 / 50 / 75 % are K = N/4, N/2, 3N/4 routed (or S + K with shared experts).
std::vector<ConvConfig> grid(bool quick) {
  using P = PartitionKind;
  using R = RouterKind;
  using C = RecoveryKind;
  std::vector<ConvConfig> out;
  if (quick) {
    for (std::ptrdiff_t k = 1; k <= 3; ++k)
      for (auto rec : {C::refit, C::refit_distill}) out.push_back({4, k, 0, P::cluster_activations, R::par_subset, rec});
    return out;
  }
  // N = 4 at every budget: each partition with a random router and no recovery, and with the PAR-trained router
  // (subset labels) under every recovery; the random router under refit / distill for contiguous (the paper's
  // partition) and co-activation (the best); the paper's PAR labels and refit then distill for co-activation.
  for (std::ptrdiff_t k = 1; k <= 3; ++k)
    for (auto p : {P::contiguous, P::random, P::cluster_weights, P::cluster_activations}) {
      bool const main_partition = p == P::contiguous || p == P::cluster_activations;
      out.push_back({4, k, 0, p, R::random, C::none});
      if (main_partition)
        for (auto rec : {C::refit, C::distill}) out.push_back({4, k, 0, p, R::random, rec});
      for (auto rec : {C::none, C::refit, C::distill}) out.push_back({4, k, 0, p, R::par_subset, rec});
      if (p == P::contiguous) out.push_back({4, k, 0, p, R::par, C::none});
      if (p == P::cluster_activations)
        for (auto rec : {C::none, C::refit, C::distill}) out.push_back({4, k, 0, p, R::par, rec});
      if (p == P::cluster_activations) out.push_back({4, k, 0, p, R::par_subset, C::refit_distill});
    }
  // N = 8 (zero-padded) and N = 2, the best partition and router.
  for (std::ptrdiff_t k : {2, 4, 6})
    out.push_back({8, k, 0, P::cluster_activations, R::par_subset, C::refit_distill});
  out.push_back({2, 1, 0, P::cluster_activations, R::par_subset, C::refit_distill});
  // One shared always-on expert: S = 1 + K of the other 3 (50 %, 75 %).
  for (std::ptrdiff_t k : {1, 2})
    out.push_back({4, k, 1, P::cluster_activations, R::par_subset, C::refit_distill});
  return out;
}

void print_header() {
  std::printf("\n%-58s %5s  %6s  %6s  %6s  %8s  %6s  %6s  %6s  %6s\n", "config", "flops", "top1", "acc", "retain",
              "ppl", "kl", "label", "relerr", "time");
}

void print_row(Row const& r, Metrics const& dense) {
  std::printf("%-58s %5.3f  %6.3f  %6.3f  %6.3f  %8.3f  %6.3f  %6.3f  %6.3f  %5.1fs\n", r.cfg.label().c_str(),
              r.flops_fraction, r.m.top1_agreement, r.m.next_token_acc, r.m.next_token_acc / dense.next_token_acc,
              r.m.ppl, r.m.kl_to_dense, r.stats.label_accuracy, r.stats.rel_err_final, r.seconds);
}

/// Prints two texts side by side in columns of `width` characters (newlines become spaces).
void side_by_side(std::string const& left_title, std::string a, std::string const& right_title, std::string b,
                  std::size_t width) {
  for (auto* s : {&a, &b}) std::replace(s->begin(), s->end(), '\n', ' ');
  std::printf("  %-*s | %s\n", static_cast<int>(width), left_title.c_str(), right_title.c_str());
  std::printf("  %s-+-%s\n", std::string(width, '-').c_str(), std::string(width, '-').c_str());
  for (std::size_t at = 0; at < std::max(a.size(), b.size()); at += width) {
    std::string const l = at < a.size() ? a.substr(at, width) : "";
    std::string const r = at < b.size() ? b.substr(at, width) : "";
    std::printf("  %-*s | %s\n", static_cast<int>(width), l.c_str(), r.c_str());
  }
}

/// A converted model: the engine plus the padded weights some of its layers view.
struct Converted {
  std::unique_ptr<fx::Llama2cEngine> engine;
  std::vector<std::unique_ptr<PaddedFfn>> padded;
  std::ptrdiff_t d_ff_used = 0;
  LayerStats stats;
};

/// Converts every layer bottom-up with the recipe (layer l calibrated on inputs from the converted layers < l).
Converted convert_model(fl::io::Llama2cCheckpoint const& ckpt, ConvConfig const& c,
                        std::vector<fx::TokenSequence> const& calibration, MethodConfig const& mc) {
  Converted out;
  out.engine = std::make_unique<fx::Llama2cEngine>(ckpt);
  std::ptrdiff_t const d_ff = ckpt.config().hidden_dim;
  int const n_layers = ckpt.config().n_layers;
  fx::convert_layers_in_order(*out.engine, calibration, [&](int l, fl::Matrix<float> const& x) {
    fl::ffn::DenseFfnView<float> view = ckpt.ffn(l);
    if (d_ff % c.n_experts != 0) {
      out.padded.push_back(std::make_unique<PaddedFfn>(pad_ffn(view, c.n_experts)));
      view = out.padded.back()->weights.view();
    }
    out.d_ff_used = view.d_ff();
    LayerStats st;
    auto layer = convert_layer(c, l, view, x.cview(), out.engine->max_seq_len(), mc, st);
    out.stats.label_accuracy += st.label_accuracy / n_layers;
    out.stats.rel_err_routed += st.rel_err_routed / n_layers;
    out.stats.rel_err_final += st.rel_err_final / n_layers;
    return layer;
  });
  return out;
}

/// Checks a recipe against the model before any long computation starts.
void validate(ConvConfig const& c, std::ptrdiff_t d_ff) {
  if (c.n_experts < 1 || c.shared < 0 || c.shared >= c.n_experts)
    throw fl::value_error(fl::detail::concat(c.label(), ": need 0 <= shared < N"));
  if (c.top_k < 1 || c.top_k > c.n_experts - c.shared)
    throw fl::value_error(fl::detail::concat(c.label(), ": K = ", c.top_k, " must be in [1, N - S = ",
                                             c.n_experts - c.shared, "]"));
  if (c.n_experts - c.shared > 16)
    throw fl::value_error(fl::detail::concat(c.label(), ": the subset pseudo-labels enumerate 2^N masks; N <= 16"));
  if (c.n_experts > d_ff)
    throw fl::value_error(fl::detail::concat(c.label(), ": N = ", c.n_experts, " exceeds d_ff = ", d_ff));
}

}  // namespace

int main(int argc, char** argv) {
  Options const opt = parse_args(argc, argv);
  auto const t_start = Clock::now();
  std::optional<fl::io::Llama2cCheckpoint> ckpt;
  std::optional<fl::io::Llama2cTokenizer> tok;
  try {
    ckpt.emplace(fl::io::Llama2cCheckpoint::load(opt.model));
    tok.emplace(fl::io::Llama2cTokenizer::load(opt.tokenizer, ckpt->config().vocab_size));
  } catch (fl::error const& e) {
    std::fprintf(stderr, "factorllm_fidelity_report: %s\n(the model lives in shared/models/, see its README)\n", e.what());
    return 2;
  }
  auto const& cfg = ckpt->config();
  std::ptrdiff_t const d_ff = cfg.hidden_dim;
  std::vector<ConvConfig> const configs = grid(opt.quick);
  try {
    for (auto const& c : configs) validate(c, d_ff);
  } catch (fl::error const& e) {
    std::fprintf(stderr, "factorllm_fidelity_report: %s\n", e.what());
    return 2;
  }

  MethodConfig mc;
  if (opt.quick) mc.distill_epochs = 15;
  if (opt.epochs >= 0) mc.distill_epochs = opt.epochs;
  if (opt.ridge >= 0) mc.ridge = opt.ridge;
  fx::DataSplitConfig data;
  data.n_calibration = opt.n_calib > 0 ? opt.n_calib : (opt.quick ? 48 : 96);
  data.n_evaluation = opt.n_eval > 0 ? opt.n_eval : (opt.quick ? 16 : 32);
  data.length = opt.length > 0 ? opt.length : (opt.quick ? 96 : 128);

#if defined(_OPENMP)
  // stories260K's layers are tiny (d_model 64, d_ff 172): an OpenMP region per FFN call costs more than the work
  // it splits. Threads go to whole configurations instead (one engine each); the kernels inside run on one.
  omp_set_num_threads(1);
  omp_set_max_active_levels(1);
#endif
  fx::Llama2cEngine dense_engine(*ckpt);
  fx::DataSplit split;
  try {
    split = fx::make_data_split(dense_engine, data);
  } catch (fl::error const& e) {
    std::fprintf(stderr, "factorllm_fidelity_report: %s\n", e.what());
    return 2;
  }
  DenseReference ref;
  Metrics const dense = evaluate(dense_engine, split.evaluation, &ref, nullptr);
  std::int64_t calib_tokens = 1;
  for (auto const& s : split.calibration) calib_tokens += static_cast<std::int64_t>(s.size()) - 1;
  std::printf("model %s: dim %d, hidden %d, %d layers, %d heads (%d kv)\n", opt.model.c_str(), cfg.dim, cfg.hidden_dim,
              cfg.n_layers, cfg.n_heads, cfg.n_kv_heads);
  std::printf("data: %d calibration + %d held-out sequences of BOS + %d tokens, sampled from the dense model (T = 1, "
              "disjoint seeds, no identical sequence); %lld calibration tokens per layer\n",
              data.n_calibration, data.n_evaluation, data.length, static_cast<long long>(calib_tokens));
  std::printf("held-out: %lld next-token positions; dense next_token_acc %.4f, ppl %.3f\n",
              static_cast<long long>(dense.positions), dense.next_token_acc, dense.ppl);
  std::printf("method: layers converted bottom-up; router Adam %d steps on PAR KL (+ balance x %.2f); refit ridge %.0e; "
              "distill Adam %d epochs (batch %d, lr %.0e); gating = plain sum of the selected experts\n",
              mc.router_steps, mc.balance_ratio, mc.ridge, mc.distill_epochs, mc.distill_batch, mc.distill_lr);
  if (d_ff % 8 != 0)
    std::printf("note: N = 8 cannot split d_ff = %lld = 4 x 43 into equal experts; it zero-pads d_ff to %lld (%lld dead "
                "neurons: exact, SiLU(0) * 0 = 0) and its FLOPs fraction counts the padded experts against the real "
                "%lld\n",
                static_cast<long long>(d_ff), static_cast<long long>((d_ff + 7) / 8 * 8),
                static_cast<long long>((d_ff + 7) / 8 * 8 - d_ff), static_cast<long long>(d_ff));
  std::printf("columns: flops = FFN FLOPs fraction, top1 = top1_agreement, acc = next_token_acc, retain = "
              "acc_retention, kl = kl_to_dense, label = router TopK == pseudo-label (calibration), relerr = layer "
              "||MoE - F|| / ||F|| (calibration), both means over layers\n");

  // Exactness check first: K = N (code_ref, weights 1) must be the dense model.
  {
    ConvConfig full{4, 4, 0, PartitionKind::random, RouterKind::random, RecoveryKind::none};
    Converted conv = convert_model(*ckpt, full, split.calibration, mc);
    Metrics const m = evaluate(*conv.engine, split.evaluation, nullptr, &ref);
    std::printf("check: K = N = 4 (random partition and router, no recovery): top1_agreement %.4f, kl %.2e, ppl %.4f "
                "vs %.4f\n",
                m.top1_agreement, m.kl_to_dense, m.ppl, dense.ppl);
    if (m.top1_agreement != 1.0 || m.kl_to_dense > 1e-6) {
      std::fprintf(stderr, "factorllm_fidelity_report: K = N is not the dense model\n");
      return 1;
    }
  }

  print_header();
  std::vector<Row> rows(configs.size());
  std::unique_ptr<Converted> best;  // the best 50 % configuration, for the generation sample
  double best_retention = -1;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(opt.threads)
#endif
  for (std::size_t i = 0; i < configs.size(); ++i) {
    auto const t0 = Clock::now();
    ConvConfig const& c = configs[i];
    auto conv = std::make_unique<Converted>(convert_model(*ckpt, c, split.calibration, mc));
    Row r;
    r.cfg = c;
    r.flops_fraction = static_cast<double>((c.top_k + c.shared) * (conv->d_ff_used / c.n_experts)) / static_cast<double>(d_ff);
    r.m = evaluate(*conv->engine, split.evaluation, nullptr, &ref);
    r.stats = conv->stats;
    r.seconds = seconds_since(t0);
    rows[i] = r;
#if defined(_OPENMP)
#pragma omp critical(report_output)
#endif
    {
      print_row(r, dense);
      std::fflush(stdout);
      double const retention = r.m.next_token_acc / dense.next_token_acc;
      if (std::fabs(r.flops_fraction - 0.5) < 0.02 && retention > best_retention) {
        best_retention = retention;
        best = std::move(conv);
        best->stats = r.stats;
      }
    }
  }

  // Best row per budget (the table's key rows).
  std::printf("\nbest per FFN budget (held-out, %lld positions; dense acc %.4f):\n", static_cast<long long>(dense.positions),
              dense.next_token_acc);
  print_header();
  for (double const budget : {0.25, 0.5, 0.75}) {
    Row const* b = nullptr;
    for (Row const& r : rows)
      if (std::fabs(r.flops_fraction - budget) < 0.02 &&
          (b == nullptr || r.m.next_token_acc > b->m.next_token_acc))
        b = &r;
    if (b != nullptr) print_row(*b, dense);
  }

  if (best != nullptr) {
    std::string best_label;
    for (Row const& r : rows)
      if (std::fabs(r.flops_fraction - 0.5) < 0.02 && std::fabs(r.m.next_token_acc / dense.next_token_acc - best_retention) < 1e-12)
        best_label = r.cfg.label();
    fx::Sampler g1, g2;  // greedy
    fx::Llama2cEngine gen(*ckpt);
    std::vector<int> const a = gen.generate({fl::io::Llama2cTokenizer::kBos}, 120, g1);
    std::vector<int> const b = best->engine->generate({fl::io::Llama2cTokenizer::kBos}, 120, g2);
    auto text = [&](std::vector<int> t) {
      t.insert(t.begin(), fl::io::Llama2cTokenizer::kBos);
      return tok->decode(t);
    };
    std::printf("\ngreedy generation from BOS, 120 steps:\n");
    side_by_side("dense", text(a), best_label + " (50 % FFN FLOPs)", text(b), 56);
  }

  if (!opt.csv.empty()) {
    std::ofstream csv(opt.csv);
    csv << "config,N,K,shared,partition,router,recovery,ffn_flops_fraction,top1_agreement,next_token_acc,"
           "acc_retention,ppl,ppl_dense,kl_to_dense\n";
    for (Row const& r : rows) {
      char line[512];
      std::snprintf(line, sizeof line, "%s,%lld,%lld,%lld,%s,%s,%s,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f\n",
                    r.cfg.label().c_str(), static_cast<long long>(r.cfg.n_experts), static_cast<long long>(r.cfg.top_k),
                    static_cast<long long>(r.cfg.shared), name(r.cfg.partition), name(r.cfg.router),
                    name(r.cfg.recovery), r.flops_fraction, r.m.top1_agreement, r.m.next_token_acc,
                    r.m.next_token_acc / dense.next_token_acc, r.m.ppl, dense.ppl, r.m.kl_to_dense);
      csv << line;
    }
    if (!csv) {
      std::fprintf(stderr, "factorllm_fidelity_report: cannot write %s\n", opt.csv.c_str());
      return 2;
    }
    std::printf("\nwrote %s (%zu rows); plot: python3 examples/02_fidelity_report/plot.py %s\n", opt.csv.c_str(),
                rows.size(), opt.csv.c_str());
  }
  std::printf("total %.1f s\n", seconds_since(t_start));
  return 0;
}
