// SPDX-License-Identifier: Apache-2.0
// Demo: factorizes every FFN of a llama2.c model (stories260K) into 4 experts and reports, per layer, how far
// K-of-N MoE forward is from the dense FFN, the FFN FLOPs it keeps, and its cost on the scalar reference.
//
// Usage: factorllm_demo [path/to/stories260K.bin]
// Without an argument it reads FACTORLLM_SHARED_DIR/models/stories260K.bin; when that file is absent it says
// where to get it and runs on a generated model of the same shape (clearly labelled as such).
// Exit status: 0 on success, 1 if a K = N factorization is not exact (relative error > 1e-5),
// 2 on bad usage or a model that cannot be read.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "factorllm/factorllm.hpp"

#ifndef FACTORLLM_SHARED_DIR
// CMake passes the absolute path of the shared/ folder; a hand-built demo looks in ../shared from the current
// directory (where the project's README says the shared data lives, relative to the repository root).
#define FACTORLLM_SHARED_DIR "../shared"
#endif

namespace {

namespace fl = factorllm;
// The demo times the scalar oracle on both sides (named, not left to the API's default backend).
using ScalarMoe = fl::moe::MoeFfn<float, fl::CpuScalar>;

constexpr std::ptrdiff_t kExperts = 4;           // N: the paper's 1R4E setting; 172 = 4 x 43 for stories260K
constexpr std::ptrdiff_t kTokens = 64;           // hidden inputs per layer
constexpr double kRmsEps = 1e-5;                 // llama2.c's RMSNorm epsilon
constexpr double kExactTolerance = 1e-5;         // K = N must reproduce the dense FFN (docs/math.md §1.2)
constexpr std::uint64_t kRouterSeed = 1234;      // Router::random seed of layer l is kRouterSeed + l
constexpr std::uint64_t kPartitionSeed = 7;      // ExpertPartition::random seed of layer l is kPartitionSeed + l
constexpr std::uint64_t kGeneratedSeed = 260;    // weights of the generated stand-in model
constexpr double kMinTimingSeconds = 0.02;       // per measured configuration
constexpr int kMinTimingReps = 3;

/// The FFN of every layer of a model, and the hidden inputs that feed each one. Loaded from a llama2.c
/// checkpoint, or generated. Holds the owner of the weights its views point into, so it is neither copied
/// nor moved once filled.
struct ModelFfns {
  std::string description;                                 // one line for the report
  bool generated = false;
  std::vector<fl::ffn::DenseFfnView<float>> ffn;           // [n_layers]
  std::vector<fl::Matrix<float>> inputs;                   // [n_layers] of (n_tokens, d_model)
  std::optional<fl::io::Llama2cCheckpoint> checkpoint;     // owner when loaded
  std::vector<fl::ffn::DenseFfn<float>> generated_ffn;     // owner when generated

  ModelFfns() = default;
  ModelFfns(ModelFfns const&) = delete;
  ModelFfns& operator=(ModelFfns const&) = delete;
};

/// Returns up to kTokens token ids spread evenly over the vocabulary. Where the vocabulary is large enough
/// it skips ids below 259 (llama2.c's <unk>, BOS, EOS and 256 raw-byte tokens), whose rows are barely trained.
std::vector<std::ptrdiff_t> pick_tokens(std::ptrdiff_t vocab_size) {
  std::ptrdiff_t const first = vocab_size >= 259 + kTokens ? 259 : 0;
  std::ptrdiff_t const span = vocab_size - first;
  std::ptrdiff_t const n = std::min(kTokens, span);
  std::vector<std::ptrdiff_t> ids(static_cast<std::size_t>(n));
  for (std::ptrdiff_t i = 0; i < n; ++i) ids[static_cast<std::size_t>(i)] = first + i * span / n;
  return ids;
}

/// Returns the FFN inputs of one layer: each chosen token's embedding e, RMS-normalized with the layer's
/// rms_ffn weight w as llama2.c does before its FFN: x = e / sqrt(mean(e^2) + eps) * w (docs/math.md §1.1).
/// Embeddings stand in for the true post-attention hidden states, which would need a full forward pass.
fl::Matrix<float> ffn_inputs(fl::MatrixView<float const> embedding, fl::VectorView<float const> rms_weight,
                             std::vector<std::ptrdiff_t> const& tokens) {
  std::ptrdiff_t const d_model = embedding.cols();
  fl::Matrix<float> x({static_cast<std::ptrdiff_t>(tokens.size()), d_model});
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    float const* e = embedding.row(tokens[t]);
    double sum_sq = 0;
    for (std::ptrdiff_t k = 0; k < d_model; ++k) sum_sq += static_cast<double>(e[k]) * e[k];
    double const inv_rms = 1.0 / std::sqrt(sum_sq / static_cast<double>(d_model) + kRmsEps);
    for (std::ptrdiff_t k = 0; k < d_model; ++k)
      x(static_cast<std::ptrdiff_t>(t), k) = static_cast<float>(e[k] * inv_rms * rms_weight(k));
  }
  return x;
}

/// Fills `model` from a llama2.c checkpoint. \throws factorllm::error if the file cannot be read.
void load_checkpoint(std::string const& path, ModelFfns& model) {
  auto const& ckpt = model.checkpoint.emplace(fl::io::Llama2cCheckpoint::load(path));
  auto const& cfg = ckpt.config();
  model.description = "llama2.c checkpoint " + path + " (dim " + std::to_string(cfg.dim) + ", hidden_dim " +
                      std::to_string(cfg.hidden_dim) + ", n_layers " + std::to_string(cfg.n_layers) + ", vocab " +
                      std::to_string(cfg.vocab_size) + ")";
  auto const tokens = pick_tokens(ckpt.token_embedding().rows());
  for (int l = 0; l < cfg.n_layers; ++l) {
    model.ffn.push_back(ckpt.ffn(l));
    model.inputs.push_back(ffn_inputs(ckpt.token_embedding(), ckpt.rms_ffn(l), tokens));
  }
}

/// Fills `model` with a seeded random stand-in of stories260K's shape (dim 64, hidden 172, 5 layers, vocab
/// 512), at the scales measured on the trained checkpoint: embeddings with std 0.3, FFN weights with std
/// 1/sqrt(dim) = 0.125, and rms_ffn weights around 0.6 to 1.0, rising with depth.
void generate_stand_in(ModelFfns& model) {
  std::ptrdiff_t const dim = 64, hidden_dim = 172, n_layers = 5, vocab_size = 512;
  model.generated = true;
  model.description = "GENERATED stand-in, seed " + std::to_string(kGeneratedSeed) + " (dim " + std::to_string(dim) +
                      ", hidden_dim " + std::to_string(hidden_dim) + ", n_layers " + std::to_string(n_layers) +
                      ", vocab " + std::to_string(vocab_size) + "; random weights scaled like stories260K)";
  // The library's portable normal draw (std::normal_distribution differs between standard libraries), so the
  // stand-in model is the same everywhere.
  std::mt19937_64 rng(kGeneratedSeed);
  auto normal = [&rng](double stddev) { return static_cast<float>(stddev * fl::detail::standard_normal(rng)); };
  fl::Matrix<float> embedding({vocab_size, dim});
  for (std::ptrdiff_t i = 0; i < embedding.size(); ++i) embedding[i] = normal(0.3);
  double const w_std = 1.0 / std::sqrt(static_cast<double>(dim));
  auto const tokens = pick_tokens(vocab_size);
  for (std::ptrdiff_t l = 0; l < n_layers; ++l) {
    fl::Vector<float> rms_ffn({dim});
    for (std::ptrdiff_t k = 0; k < dim; ++k)
      rms_ffn[k] = static_cast<float>(0.6 + 0.1 * static_cast<double>(l)) + normal(0.1);
    fl::ffn::DenseFfn<float> ffn{fl::Matrix<float>({hidden_dim, dim}), fl::Matrix<float>({hidden_dim, dim}),
                                 fl::Matrix<float>({dim, hidden_dim})};
    for (fl::Matrix<float>* w : {&ffn.gate, &ffn.up, &ffn.down})
      for (std::ptrdiff_t i = 0; i < w->size(); ++i) (*w)[i] = normal(w_std);
    model.inputs.push_back(ffn_inputs(embedding.cview(), rms_ffn.cview(), tokens));
    model.generated_ffn.push_back(std::move(ffn));
  }
  // Views are taken only once the vector has stopped growing; Tensor moves keep their heap buffers anyway.
  for (auto const& ffn : model.generated_ffn) model.ffn.push_back(ffn.view());
}

/// Returns ||y - ref||_F / ||ref||_F over all tokens, in double.
double relative_error(fl::MatrixView<float const> y, fl::MatrixView<float const> ref) {
  double diff = 0, norm = 0;
  for (std::ptrdiff_t t = 0; t < ref.rows(); ++t)
    for (std::ptrdiff_t k = 0; k < ref.cols(); ++k) {
      double const r = ref(t, k), delta = static_cast<double>(y(t, k)) - r;
      diff += delta * delta;
      norm += r * r;
    }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

/// Returns max over tokens t of ||y_t - ref_t|| / ||ref_t||: the stricter, per-token form used for exactness.
double max_token_relative_error(fl::MatrixView<float const> y, fl::MatrixView<float const> ref) {
  double worst = 0;
  for (std::ptrdiff_t t = 0; t < ref.rows(); ++t)
    worst = std::max(worst, relative_error(y.slice_rows(t, t + 1), ref.slice_rows(t, t + 1)));
  return worst;
}

/// Returns the mean wall time in seconds of f() over at least kMinTimingReps calls and kMinTimingSeconds,
/// after one warm-up call.
template <class F>
double mean_seconds(F const& f) {
  using clock = std::chrono::steady_clock;
  f();
  int reps = 0;
  double elapsed = 0;
  auto const start = clock::now();
  do {
    f();
    ++reps;
    elapsed = std::chrono::duration<double>(clock::now() - start).count();
  } while (reps < kMinTimingReps || elapsed < kMinTimingSeconds);
  return elapsed / reps;
}

/// Builds the K-of-N layer from factorized experts (copied: they are small) and a router.
ScalarMoe make_moe(fl::ffn::ExpertWeights<float> const& experts, fl::moe::Router<float> const& router,
                                std::ptrdiff_t top_k, fl::moe::CombineMode mode) {
  fl::moe::Gating gating;
  gating.mode = mode;
  gating.top_k = top_k;
  return ScalarMoe(experts, router, gating);
}

/// Runs the code_ref K = N layer for a partition and returns its max per-token relative error vs the dense FFN.
double k_equals_n_error(fl::ffn::DenseFfnView<float> const& dense, fl::ffn::ExpertPartition const& partition,
                        fl::MatrixView<float const> x, fl::MatrixView<float const> y_dense, fl::Workspace& ws) {
  auto const layer = make_moe(fl::ffn::factorize(dense, partition),
                              fl::moe::Router<float>::random(dense.d_model(), partition.n_experts(), kRouterSeed),
                              partition.n_experts(), fl::moe::CombineMode::code_ref);
  fl::Matrix<float> y({x.rows(), x.cols()});
  ws.reserve(layer.workspace_bytes(x.rows()));
  layer.forward(x, y.view(), ws);
  return max_token_relative_error(y.cview(), y_dense);
}

int run(std::string const& path) {
  ModelFfns model;
  if (std::filesystem::exists(path)) {
    load_checkpoint(path, model);
  } else {
    std::printf(
        "Model file not found: %s\n"
        "  It is one of llama2.c's published tinyllamas checkpoints: https://huggingface.co/karpathy/tinyllamas\n"
        "  (file stories260K/stories260K.bin), e.g.\n"
        "    wget https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K/stories260K.bin\n"
        "  then run: factorllm_demo path/to/stories260K.bin\n\n"
        "*** Running on a GENERATED model of the same shape instead. Its numbers describe random weights, ***\n"
        "*** not the trained stories260K model.                                                          ***\n\n",
        path.c_str());
    generate_stand_in(model);
  }

  std::printf("factorllm %d.%d.%d demo: dense SwiGLU FFN -> %td experts, K-of-N MoE forward\n", FLLM_VERSION_MAJOR,
              FLLM_VERSION_MINOR, FLLM_VERSION_PATCH, kExperts);
  std::printf("model:  %s\n", model.description.c_str());
  std::printf("inputs: %td token embeddings, RMS-normed with each layer's rms_ffn weight (eps %.0e)\n",
              model.inputs.empty() ? std::ptrdiff_t{0} : model.inputs[0].extent(0), kRmsEps);
  std::printf("router: moe::Router::random (N(0, 0.02^2), untrained), seed %llu + layer; partition: contiguous\n\n",
              static_cast<unsigned long long>(kRouterSeed));

  std::printf("%5s %3s %3s  %-19s  %-21s  %9s  %10s  %10s  %9s\n", "layer", "N", "K", "gating", "rel. error vs dense",
              "FFN FLOPs", "MoE us", "dense us", "MoE/dense");
  std::printf("%5s %3s %3s  %-19s  %-21s  %9s  %10s  %10s  %9s\n", "-----", "---", "---", "-------------------",
              "---------------------", "---------", "----------", "----------", "---------");

  struct Config {
    std::ptrdiff_t top_k;
    fl::moe::CombineMode mode;
  };
  std::vector<Config> configs{{kExperts, fl::moe::CombineMode::code_ref}};
  for (std::ptrdiff_t k = 1; k < kExperts; ++k) {
    configs.push_back({k, fl::moe::CombineMode::code_ref});
    configs.push_back({k, fl::moe::CombineMode::softmax_topk_renorm});
  }

  bool exact = true;
  double worst_contiguous = 0, worst_random = 0, worst_assignment = 0;
  fl::Workspace moe_ws, dense_ws;  // reused by every call; each grows once to the largest need
  for (std::size_t l = 0; l < model.ffn.size(); ++l) {
    auto const& dense = model.ffn[l];
    auto const x = model.inputs[l].cview();
    std::ptrdiff_t const n_tokens = x.rows(), d_model = dense.d_model(), d_ff = dense.d_ff();
    fl::Matrix<float> y_dense({n_tokens, d_model}), y_moe({n_tokens, d_model});
    dense_ws.reserve(fl::ffn::swiglu_workspace_bytes<fl::CpuScalar>(n_tokens, d_model, d_ff));
    auto dense_forward = [&] { fl::ffn::swiglu_forward<fl::CpuScalar>(dense, x, y_dense.view(), dense_ws); };
    double const dense_s = mean_seconds(dense_forward);

    auto const experts = fl::ffn::factorize(dense, fl::ffn::ExpertPartition::contiguous(d_ff, kExperts));
    auto const router = fl::moe::Router<float>::random(d_model, kExperts, kRouterSeed + l);
    for (auto const& config : configs) {
      auto const layer = make_moe(experts, router, config.top_k, config.mode);
      moe_ws.reserve(layer.workspace_bytes(n_tokens));
      auto moe_forward = [&] { layer.forward(x, y_moe.view(), moe_ws); };
      double const moe_s = mean_seconds(moe_forward);
      double const err = relative_error(y_moe.cview(), y_dense.cview());
      char err_buf[64];
      if (config.top_k == kExperts) {
        // Exactness uses the per-token maximum, the stricter of the two measures.
        double const token_err = max_token_relative_error(y_moe.cview(), y_dense.cview());
        worst_contiguous = std::max(worst_contiguous, token_err);
        bool const ok = token_err <= kExactTolerance;
        exact = exact && ok;
        std::snprintf(err_buf, sizeof err_buf, "%.1e %s", err, ok ? "(exact)" : "NOT EXACT");
      } else {
        std::snprintf(err_buf, sizeof err_buf, "%.4f", err);
      }
      std::printf("%5zu %3td %3td  %-19s  %-21s  %9.2f  %10.1f  %10.1f  %9.2f\n", l, kExperts, config.top_k,
                  fl::moe::to_string(config.mode), err_buf, layer.ffn_flops_fraction(), moe_s * 1e6, dense_s * 1e6,
                  moe_s / dense_s);
    }
    std::fflush(stdout);

    // Every other partition builder must be exact at K = N too (docs/math.md §1.2: one shared permutation).
    auto const random_partition = fl::ffn::ExpertPartition::random(d_ff, kExperts, kPartitionSeed + l);
    std::vector<std::int32_t> round_robin(static_cast<std::size_t>(d_ff));  // neuron i -> expert i mod N (balanced)
    for (std::size_t i = 0; i < round_robin.size(); ++i) round_robin[i] = static_cast<std::int32_t>(i % kExperts);
    auto const assigned_partition = fl::ffn::ExpertPartition::from_assignment(round_robin, kExperts);
    worst_random = std::max(worst_random, k_equals_n_error(dense, random_partition, x, y_dense.cview(), moe_ws));
    worst_assignment =
        std::max(worst_assignment, k_equals_n_error(dense, assigned_partition, x, y_dense.cview(), moe_ws));
  }

  std::printf("\nK = N exactness of every partition builder (code_ref, all %zu layers, max per-token relative error, "
              "limit %.0e):\n",
              model.ffn.size(), kExactTolerance);
  struct Builder {
    std::string name;
    double error;
  };
  for (auto const& b : {Builder{"contiguous", worst_contiguous},
                        Builder{"random(seed " + std::to_string(kPartitionSeed) + " + layer)", worst_random},
                        Builder{"from_assignment(neuron mod N)", worst_assignment}}) {
    bool const ok = b.error <= kExactTolerance;
    exact = exact && ok;
    std::printf("  ExpertPartition::%-30s %.2e  %s\n", b.name.c_str(), b.error, ok ? "exact" : "NOT EXACT");
  }

  std::printf(
      "\nColumns:\n"
      "  rel. error  ||y_moe - y_dense||_F / ||y_dense||_F over the token set; K = N rows must be exact.\n"
      "  gating      code_ref = the paper code's rule: unweighted sum of the K chosen experts times floor(N/K)\n"
      "              (K = 3 of 4 gives x1, not x4/3); softmax_topk_renorm = softmax weights of the chosen K,\n"
      "              renormalized to sum 1 (Mixtral style). The router is random and untrained, so K < N rows\n"
      "              are the starting point that PAR router training (train/) improves on.\n"
      "  FFN FLOPs   fraction of the dense FFN's multiply-adds run per token: K / N (router excluded).\n"
      "  MoE us, dense us  mean wall time of one MoeFfn::forward / ffn::swiglu_forward call on all %td tokens.\n"
      "              These are SCALAR-REFERENCE timings (CpuScalar: plain loops, double accumulation, one thread);\n"
      "              MoE includes router, top-k, grouping and combine. They show the work saved, not kernel speed.\n",
      model.inputs.empty() ? std::ptrdiff_t{0} : model.inputs[0].extent(0));
  if (model.generated) std::printf("\nNote: all numbers above come from a GENERATED model, not stories260K.\n");
  if (!exact) {
    std::printf("\nFAILED: a K = N factorization is not exact (relative error above %.0e).\n", kExactTolerance);
    return 1;
  }
  std::printf("\nOK: every K = N factorization reproduces the dense FFN.\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 2 || (argc == 2 && (std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help"))) {
    std::fprintf(stderr, "usage: %s [path/to/stories260K.bin]\n  default: %s\n", argv[0],
                 FACTORLLM_SHARED_DIR "/models/stories260K.bin");
    return 2;
  }
  std::string const path = argc == 2 ? argv[1] : FACTORLLM_SHARED_DIR "/models/stories260K.bin";
  try {
    return run(path);
  } catch (std::exception const& e) {
    std::fprintf(stderr, "factorllm_demo: error: %s\n", e.what());
    return 2;
  }
}
