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
#include "factorllm/model/convert.hpp"
#include "factorllm/model/evaluate.hpp"

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

using fl::model::ConvertConfig;
using fl::model::DenseReference;
using fl::model::LayerStats;
using fl::model::MethodConfig;
using fl::model::Metrics;
using fl::model::PartitionKind;
using fl::model::RecoveryKind;
using fl::model::RouterKind;
using ConvConfig = ConvertConfig;
using fl::model::name;

using SimdSharedMoe = fl::moe::SharedExpertMoe<float, fl::CpuSimd<>>;

Metrics evaluate(fx::Llama2cEngine& engine, std::vector<fx::TokenSequence> const& eval, DenseReference* fill,
                 DenseReference const* ref) {
  return fl::model::evaluate(engine, eval, fill, ref);
}

/// Converts one dense FFN with the library's recipe (model::convert_layer) into the engine FFN: a MoeFfn, or a
/// SharedExpertMoe with shared experts.
std::unique_ptr<fx::FfnLayer> convert_layer(ConvConfig const& cfg, int l, fl::ffn::DenseFfnView<float> const& dense,
                                            fl::MatrixView<float const> x, std::ptrdiff_t max_tokens,
                                            MethodConfig const& mc, LayerStats& stats) {
  fl::model::ConvertedLayer c = fl::model::convert_layer(cfg, l, dense, x, mc);
  stats = c.stats;
  if (c.shared == 0) return std::make_unique<fx::MoeFfnLayer>(std::move(c).to_moe(), max_tokens, cfg.label());
  return std::make_unique<fx::MoeLayerAdapter<SimdSharedMoe>>(
      fl::moe::make_shared_moe<fl::CpuSimd<>>(c.experts, c.shared, std::move(c.router), std::move(c.gating)),
      max_tokens, cfg.label());
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
  std::vector<std::unique_ptr<fl::ffn::DenseFfn<float>>> padded;
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
      out.padded.push_back(std::make_unique<fl::ffn::DenseFfn<float>>(fl::ffn::pad_hidden(view, c.n_experts)));
      view = out.padded.back()->view();
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
    for (auto const& c : configs) c.validate(d_ff);
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
              mc.distill_lr, "plain sum of the selected experts");
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
