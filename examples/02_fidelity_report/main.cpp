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
//   partition (contiguous | random | ffn::cluster_weights | ffn::cluster_activations[_shared])
//   -> ffn::factorize -> router (random init, or train::train_router: Adam on the PAR loss with the paper's labels
//      or the subset labels, train::LabelKind) -> routing fixed (train::fixed_routing) -> recovery (none |
//      train::recover_refit | train::recover_distill | refit then distill) -> moe::MoeFfn<float, CpuSimd<>> (or
//      moe::SharedExpertMoe with shared experts) installed in the engine; train::diagnose_layer gives the label and
//      relerr columns. Everything but the grid, the zero padding for N = 8 and the evaluation is the library's.

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

/// Held-out metrics of one model against the dense one (the fidelity report's definitions).
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
using SimdSharedMoe = fl::moe::SharedExpertMoe<float, fl::CpuSimd<>>;

/// Knobs of the conversion methods (the report's defaults; --quick shortens training).
struct MethodConfig {
  int router_steps = 300;        // Adam steps of router training (train::train_router)
  int router_batch = 256;        // tokens per router minibatch
  double router_lr = 0.01;
  double balance_ratio = 0.2;    // balance_weight / par_weight of the paper's code (0.01 / 0.05)
  double ridge = 1e-3;           // refit: ridge strength relative to the mean feature energy, toward the old weights
  int distill_epochs = 30;       // passes over the calibration tokens (train::recover_distill steps = epochs x batches)
  int distill_batch = 256;
  double distill_lr = 1e-3;
  int cluster_iters = 30;        // balanced k-means iterations
  // Gating: code_ref with output_scale 1 / floor(N/K), so every selected expert has weight exactly 1 (a plain sum,
  // the natural "drop the unselected neurons" approximation; the paper's x floor(N/K) amplifies the kept part and
  // loses badly without recovery). false: the paper's code_ref weights floor(N/K). K = N is the dense FFN either way.
  bool plain_sum_gating = true;
};

/// The partition of the recipe (library ffn/ builders). With S shared experts, experts 0 .. S-1 are the always-on
/// ones (moe::make_shared_moe's layout): for co-activation clustering they take the neurons of largest mean
/// contribution and the rest are clustered into the N-S routed experts (ffn::cluster_activations_shared); for the
/// other partitions they are simply the partition's first S experts.
fl::ffn::ExpertPartition make_partition(ConvConfig const& cfg, fl::ffn::DenseFfnView<float> const& w,
                                        fl::MatrixView<float const> x, std::uint64_t seed, MethodConfig const& mc) {
  std::ptrdiff_t const n = cfg.n_experts, m_all = w.d_ff();
  switch (cfg.partition) {
    case PartitionKind::contiguous: return fl::ffn::ExpertPartition::contiguous(m_all, n);
    case PartitionKind::random: return fl::ffn::ExpertPartition::random(m_all, n, seed);
    case PartitionKind::cluster_weights: return fl::ffn::cluster_weights(w, n, seed, mc.cluster_iters);
    case PartitionKind::cluster_activations:
      if (cfg.shared > 0) return fl::ffn::cluster_activations_shared(w, x, cfg.shared, n - cfg.shared, seed, mc.cluster_iters);
      return fl::ffn::cluster_activations(w, x, n, seed, mc.cluster_iters);
  }
  throw fl::value_error("make_partition: unknown partition kind");
}

/// Per-layer numbers a conversion reports (averaged over layers in the table's notes).
struct LayerStats {
  double label_accuracy = 0;  // router TopK set == pseudo-label set, calibration tokens (before recovery)
  double rel_err_routed = 0;  // ||MoE(x) - F(x)|| / ||F(x)|| before recovery
  double rel_err_final = 0;   // after recovery
};

/// The deployed layer of a recipe: a plain K-of-N MoeFfn, or S shared + K of N-S routed experts.
fl::train::LayerDiagnostics diagnose(fl::ffn::ExpertWeights<float> const& experts, std::ptrdiff_t shared,
                                     fl::moe::Router<float> const& router, fl::moe::Gating const& gating,
                                     fl::MatrixView<float const> x, fl::ffn::DenseFfnView<float> const& dense,
                                     fl::train::ParLossConfig const& loss, fl::train::LabelKind labels) {
  if (shared == 0) return fl::train::diagnose_layer(SimdMoe(experts, router, gating), x, dense, loss, labels);
  return fl::train::diagnose_layer(fl::moe::make_shared_moe<fl::CpuSimd<>>(experts, shared, router, gating), x, dense,
                                   loss, labels);
}

/// Converts one dense FFN (d_ff divisible by N) into the engine FFN the recipe describes, with the library's
/// train/ API: partition -> factorize -> train::train_router (routed experts only) -> routing fixed
/// (train::fixed_routing) -> train::recover_refit and/or train::recover_distill -> MoeFfn or SharedExpertMoe.
std::unique_ptr<fx::FfnLayer> convert_layer(ConvConfig const& cfg, int l, fl::ffn::DenseFfnView<float> const& dense,
                                            fl::MatrixView<float const> x, std::ptrdiff_t max_tokens,
                                            MethodConfig const& mc, LayerStats& stats) {
  std::uint64_t const seed = kSeed + static_cast<std::uint64_t>(l);
  std::ptrdiff_t const n = cfg.n_experts, n_routed = n - cfg.shared, d = dense.d_model();
  fl::ffn::ExpertWeights<float> experts = fl::ffn::factorize(dense, make_partition(cfg, dense, x, seed, mc));

  fl::moe::Gating gating;
  gating.mode = fl::moe::CombineMode::code_ref;
  gating.top_k = cfg.top_k;
  if (mc.plain_sum_gating)
    gating.output_scale = static_cast<float>(1.0 / fl::moe::Gating::code_ref_scale(n_routed, cfg.top_k));
  fl::train::LabelKind const labels =
      cfg.router == RouterKind::par_subset ? fl::train::LabelKind::subset : fl::train::LabelKind::par;
  fl::train::RouterTrainConfig rc;
  rc.steps = mc.router_steps;
  rc.batch_tokens = mc.router_batch;
  rc.lr = mc.router_lr;
  rc.seed = seed;
  rc.loss.balance_weight = rc.loss.par_weight * mc.balance_ratio;
  rc.labels = labels;

  auto router = fl::moe::Router<float>::random(d, n_routed, seed);
  if (cfg.router != RouterKind::random) {
    if (cfg.shared == 0) {
      fl::train::train_router(router, x, dense, experts, cfg.top_k, rc);
    } else {  // the routed experts approximate what the shared ones leave: their own sum (= F - shared) is the teacher
      auto const routed = fl::moe::split_experts(experts, cfg.shared).second;
      fl::train::train_router(router, x, fl::ffn::unfactorize(routed).view(), routed, cfg.top_k, rc);
    }
  }
  // Routing is fixed from here on: recovery adapts the experts to the router, not the reverse.
  fl::train::LayerDiagnostics const before = diagnose(experts, cfg.shared, router, gating, x, dense, rc.loss, labels);
  stats.label_accuracy = before.label_accuracy;
  stats.rel_err_routed = before.relative_error;
  stats.rel_err_final = before.relative_error;
  if (cfg.recovery != RecoveryKind::none) {
    auto const routing = fl::train::fixed_routing(router, gating, x, cfg.shared);
    if (cfg.recovery == RecoveryKind::refit || cfg.recovery == RecoveryKind::refit_distill)
      fl::train::recover_refit(experts, routing, x, dense, mc.ridge);
    if (cfg.recovery == RecoveryKind::distill || cfg.recovery == RecoveryKind::refit_distill) {
      fl::train::DistillConfig dc;
      dc.batch_tokens = mc.distill_batch;
      dc.steps = mc.distill_epochs * static_cast<int>((x.rows() + mc.distill_batch - 1) / mc.distill_batch);
      dc.lr = mc.distill_lr;
      dc.seed = seed;
      fl::train::recover_distill(experts, routing, x, dense, dc);
    }
    stats.rel_err_final = diagnose(experts, cfg.shared, router, gating, x, dense, rc.loss, labels).relative_error;
  }
  if (cfg.shared == 0)
    return std::make_unique<fx::MoeFfnLayer>(SimdMoe(std::move(experts), std::move(router), std::move(gating)),
                                             max_tokens, cfg.label());
  return std::make_unique<fx::MoeLayerAdapter<SimdSharedMoe>>(
      fl::moe::make_shared_moe<fl::CpuSimd<>>(experts, cfg.shared, std::move(router), std::move(gating)), max_tokens,
      cfg.label());
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
  if (c.router == RouterKind::par_subset && c.n_experts - c.shared > fl::train::kMaxSubsetExperts)
    throw fl::value_error(fl::detail::concat(c.label(), ": the subset pseudo-labels enumerate all C(N, K) subsets; N <= ",
                                             fl::train::kMaxSubsetExperts));
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
  std::printf("method: layers converted bottom-up; router Adam %d steps (batch %d) on PAR KL (+ balance x %.2f); refit "
              "ridge %.0e; distill Adam %d epochs (batch %d, lr %.0e); gating = %s\n",
              mc.router_steps, mc.router_batch, mc.balance_ratio, mc.ridge, mc.distill_epochs, mc.distill_batch,
              mc.distill_lr, mc.plain_sum_gating ? "plain sum of the selected experts" : "code_ref (x floor(N/K))");
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
