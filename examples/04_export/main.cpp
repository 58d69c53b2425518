// SPDX-License-Identifier: Apache-2.0
// Export: converts stories260K into a K-of-N MoE that llama.cpp can run (softmax-TopK-renormalize gating, bias-free
// routers), writes the dense and MoE models as GGUF (F32 and F16), the MoE also with Q8_0 and Q4_0 experts (d_expert
// padded to whole 32-weight blocks with zero neurons: ffn::pad_experts), the MoE as a factorized safetensors file and
// as a Hugging Face Mixtral checkpoint, and records our engine's greedy tokens (from BOS and from sampled prompts) and
// teacher-forced next-token logits and probabilities for each GGUF file in reference.json (tests/llama_cpp/check.mjs
// compares llama.cpp with them). For the Q8_0 / Q4_0 files our engine runs the same blocks on the CpuScalar oracle
// (exact weights, unrounded activations), and, as "act8", on CpuSimd's decode kernels, which round activations to
// 8 bits per block as ggml does; it prints how far apart the two are (activation rounding alone).
//
// Usage: factorllm_export [--out DIR] [--model PATH] [--tokenizer PATH] [--experts N] [--top-k K] [--router R]
//                         [--steps S] [--calib N] [--length L] [--forced T] [--prompts P] [--prompt-steps G]
//   --out DIR     output folder (created; default factorllm_export)
//   --experts N   routed experts per layer (default 4; must divide hidden_dim = 172)
//   --top-k K     experts per token (default 2)
//   --router R    lsq (default): bias-free least-squares router (below); par: train::train_router (PAR + balance,
//                 docs/math.md §3.2) with train_bias = false, from train::router_from_partition; par_subset: the same
//                 toward the best K-subset labels (LabelKind::subset; 300 steps, lr 1e-2, the fidelity report's)
//   --recovery R  refit (default): train::recover_refit; distill: train::recover_distill (30 epochs, lr 1e-3, the
//                 fidelity report's); refit+distill: both, in that order. All under the fixed renormalized routing
//   --scale-k     gating output scale K during recovery (equal weights = the plain sum of the K experts), folded into
//                 the down projections afterwards (exact: K = 1, 2, 4 are powers of two; default: scale 1)
//   --steps S     greedy tokens generated from BOS for the reference (default 128)
//   --calib N     calibration sequences for the conversion (default 64), --length L tokens each (default 128)
//   --forced T    length of the teacher-forced sequence, BOS included (default 96)
//   --prompts P   greedy prompts (BOS + 24 tokens sampled from the dense model, seeds 5000 + i; default 8), each
//                 continued for --prompt-steps G greedy tokens (default 40)
//   --moe FILE    no conversion: the MoE layers of a factorized safetensors file (e.g. finetune_recipe.py --save with
//                 --router-bias none); output_scale is folded into the down projections (exact for a power of two),
//                 a non-zero router bias is refused (llama.cpp has none). Files are named ft-n{N}k{K}-*.
//   --heldout F   held-out sequences for the fidelity figures (JSON list of token lists, BOS first, e.g.
//                 finetune_recipe.py --save-heldout); default: 32 x (BOS + 128) sampled from the dense model with
//                 seeds 1000000 + i, the fidelity report's set. reference.json gets them and, for dense-f32 and the
//                 F32 MoE, our engine's argmax per position, next_token_acc, ppl and top-1 agreement with dense.
// Exit status: 0 on success, 1 if a self-check fails (reloaded files disagree with what was written, or the padded
// experts do not compute what the unpadded ones do), 2 on bad usage or input.
//
// The conversion (per layer, bottom-up on the inputs the converted lower layers produce):
//   1. partition the neurons by co-activation (ffn::cluster_activations) and factorize (docs/math.md §1.2);
//   2. a bias-free router (llama.cpp and Mixtral have no router bias): by default fitted by least squares to the
//      log-norm of each expert's output (lsq_router); --router par trains one with train::train_router and
//      train_bias = false instead. On stories260K N=4 K=2 the lsq router keeps more of the dense model under this
//      gating (top-1 agreement with dense ~0.55 against ~0.33 for PAR: PAR's targets are not the renormalized
//      softmax weights llama.cpp combines with);
//   3. gating softmax_topk_renorm, the one llama.cpp's llama architecture computes;
//   4. recovery: the K renormalized weights sum to 1, so train::recover_refit refits the down projections jointly
//      to reproduce the dense FFN's output under that routing.

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
#include <iterator>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Dense>
#include <nlohmann/json.hpp>

#include "factorllm/factorllm.hpp"
#include "factorllm/ffn/clustering.hpp"
#include "factorllm/io/factorized_checkpoint.hpp"
#include "factorllm/io/gguf.hpp"
#include "factorllm/io/gguf_llama_export.hpp"
#include "factorllm/io/mixtral_export.hpp"
#include "factorllm/train/distillation.hpp"
#include "factorllm/train/refit.hpp"
#include "factorllm/train/router_training.hpp"

#include "../common/calibration.hpp"
#include "../common/llama2c_engine.hpp"

#ifndef FACTORLLM_SHARED_DIR
#define FACTORLLM_SHARED_DIR "../shared"
#endif

namespace {

namespace fl = factorllm;
namespace fx = factorllm_examples;
namespace fs = std::filesystem;

using SimdMoe = fl::moe::MoeFfn<float, fl::CpuSimd<>>;

constexpr std::uint64_t kSeed = 2024;  // partition, router training of layer l use kSeed + l
constexpr int kPromptLength = 25;      // BOS + 24 sampled tokens per greedy prompt (distinct stories by then)
/// Largest |dp| allowed between the padded and unpadded f32 layers: float summation order only (measured 3.4e-6;
/// check.mjs's F32 tolerance).
constexpr double kPadTolerance = 1e-4;

/// How the routers are obtained (both bias-free).
enum class RouterKind { lsq, par, par_subset };
/// How the experts are recovered under the fixed routing (docs/math.md; the fidelity report's methods).
enum class RecoveryKind { refit, distill, refit_distill };

struct Options {
  std::string out = "factorllm_export";
  std::string model = std::string(FACTORLLM_SHARED_DIR) + "/models/stories260K.bin";
  std::string tokenizer;
  int experts = 4, top_k = 2, steps = 128, calib = 64, length = 128, forced = 96, prompts = 8, prompt_steps = 40;
  RouterKind router = RouterKind::lsq;
  RecoveryKind recovery = RecoveryKind::refit;
  bool scale_k = false;
  std::string moe_file, heldout_file;
};

[[noreturn]] void usage(std::string const& msg) {
  std::fprintf(stderr,
               "factorllm_export: %s\n"
               "usage: factorllm_export [--out DIR] [--model PATH] [--tokenizer PATH] [--experts N] [--top-k K]\n"
               "                        [--router lsq|par|par_subset] [--recovery refit|distill|refit+distill] [--scale-k] [--steps S] [--calib N] [--length L] [--forced T]\n"
               "                        [--prompts P] [--prompt-steps G] [--moe FACTORIZED] [--heldout FILE]\n",
               msg.c_str());
  std::exit(2);
}

Options parse_args(int argc, char** argv) {
  Options o;
  auto value = [&](int& i) -> std::string {
    if (i + 1 >= argc) usage(std::string(argv[i]) + " needs a value");
    return argv[++i];
  };
  auto integer = [&](int& i) {
    std::string const v = value(i);
    char* end = nullptr;
    long const x = std::strtol(v.c_str(), &end, 10);
    if (end == v.c_str() || *end != '\0' || x < 1 || x > 100000) usage("bad number '" + v + "'");
    return static_cast<int>(x);
  };
  for (int i = 1; i < argc; ++i) {
    std::string const a = argv[i];
    if (a == "--out") o.out = value(i);
    else if (a == "--model") o.model = value(i);
    else if (a == "--tokenizer") o.tokenizer = value(i);
    else if (a == "--experts") o.experts = integer(i);
    else if (a == "--top-k") o.top_k = integer(i);
    else if (a == "--steps") o.steps = integer(i);
    else if (a == "--calib") o.calib = integer(i);
    else if (a == "--length") o.length = integer(i);
    else if (a == "--forced") o.forced = integer(i);
    else if (a == "--prompts") o.prompts = integer(i);
    else if (a == "--prompt-steps") o.prompt_steps = integer(i);
    else if (a == "--moe") o.moe_file = value(i);
    else if (a == "--scale-k") o.scale_k = true;
    else if (a == "--heldout") o.heldout_file = value(i);
    else if (a == "--router") {
      std::string const r = value(i);
      if (r == "lsq") o.router = RouterKind::lsq;
      else if (r == "par") o.router = RouterKind::par;
      else if (r == "par_subset") o.router = RouterKind::par_subset;
      else usage("--router must be lsq, par or par_subset, got '" + r + "'");
    }
    else if (a == "--recovery") {
      std::string const r = value(i);
      if (r == "refit") o.recovery = RecoveryKind::refit;
      else if (r == "distill") o.recovery = RecoveryKind::distill;
      else if (r == "refit+distill") o.recovery = RecoveryKind::refit_distill;
      else usage("--recovery must be refit, distill or refit+distill, got '" + r + "'");
    }
    else if (a == "-h" || a == "--help") usage("help");
    else usage("unknown argument '" + a + "'");
  }
  if (o.tokenizer.empty()) o.tokenizer = (fs::path(o.model).parent_path() / "tok512.bin").string();
  if (o.top_k > o.experts) usage("--top-k must be <= --experts");
  return o;
}

// ---------------------------------------------------------------------------------------------------------------
// Conversion of one layer
// ---------------------------------------------------------------------------------------------------------------

/// Fits a bias-free router by least squares: its logits are fitted (ridge, no intercept) to the centred log-norm of
/// each expert's output on x_calib, so softmax ranks and weights the experts by how much they contribute to a token.
/// Softmax ignores a per-token shift, hence the centring; no intercept because the router must be bias-free.
fl::moe::Router<float> lsq_router(fl::ffn::ExpertWeights<float> const& experts, fl::MatrixView<float const> x_calib) {
  using RowMajor = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using MapF = Eigen::Map<Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> const>;
  std::ptrdiff_t const n = x_calib.rows(), d = experts.d_model(), ne = experts.n_experts();
  RowMajor x(n, d);
  for (std::ptrdiff_t t = 0; t < n; ++t)
    for (std::ptrdiff_t k = 0; k < d; ++k) x(t, k) = x_calib(t, k);
  RowMajor score(n, ne);
  for (std::ptrdiff_t e = 0; e < ne; ++e) {
    auto const g = experts.gate(e), u = experts.up(e), dn = experts.down(e);
    RowMajor const hg = x * MapF(g.data(), g.rows(), g.cols()).cast<double>().transpose();
    RowMajor const hu = x * MapF(u.data(), u.rows(), u.cols()).cast<double>().transpose();
    RowMajor h(hg.rows(), hg.cols());
    for (Eigen::Index i = 0; i < h.size(); ++i) h.data()[i] = hg.data()[i] / (1.0 + std::exp(-hg.data()[i])) * hu.data()[i];
    RowMajor const o = h * MapF(dn.data(), dn.rows(), dn.cols()).cast<double>().transpose();
    score.col(e) = (o.rowwise().norm().array() + 1e-6).log().matrix();
  }
  for (std::ptrdiff_t t = 0; t < n; ++t) score.row(t).array() -= score.row(t).mean();
  Eigen::MatrixXd gram = x.transpose() * x;
  gram.diagonal().array() += 1e-3 * gram.trace() / static_cast<double>(d);
  Eigen::MatrixXd const w = gram.ldlt().solve(x.transpose() * score);  // [d, N]
  fl::Matrix<float> rw({ne, d});
  for (std::ptrdiff_t e = 0; e < ne; ++e)
    for (std::ptrdiff_t k = 0; k < d; ++k) rw(e, k) = static_cast<float>(w(k, e));
  return fl::moe::Router<float>(std::move(rw), fl::Vector<float>({ne}));
}

/// The layer as llama.cpp's MoE computes it: output_scale folded into the down projections (gating output_scale 1).
/// Exact when the scale is a power of two.
template <class Layer>
SimdMoe fold_output_scale(Layer const& a) {
  fl::moe::Gating g = a.gating();
  fl::Tensor<float, 3> down = a.experts().down_tensor();
  for (std::ptrdiff_t i = 0; i < down.size(); ++i) down.data()[i] *= g.output_scale;
  g.output_scale = 1.f;
  fl::ffn::ExpertWeights<float> experts(fl::Tensor<float, 3>(a.experts().gate_tensor()),
                                        fl::Tensor<float, 3>(a.experts().up_tensor()), std::move(down),
                                        a.experts().partition());
  return SimdMoe(std::move(experts), a.router(), std::move(g));
}

/// Converts one dense FFN into a bias-free softmax-TopK-renormalize MoE (steps 1-4 in the file comment).
SimdMoe convert_layer(fl::ffn::DenseFfnView<float> const& dense, fl::MatrixView<float const> x_calib,
                      std::ptrdiff_t n_experts, std::ptrdiff_t top_k, RouterKind kind, RecoveryKind recovery,
                      bool scale_k, std::uint64_t seed) {
  auto const partition = fl::ffn::cluster_activations(dense, x_calib, n_experts, seed);
  auto experts = fl::ffn::factorize(dense, partition);
  fl::moe::Router<float> router;
  if (kind == RouterKind::lsq) {
    router = lsq_router(experts, x_calib);
  } else {
    router = fl::train::router_from_partition(dense, partition);  // b_r = 0
    fl::train::RouterTrainConfig rc;
    rc.seed = seed;
    rc.train_bias = false;  // llama.cpp and Mixtral have no router bias: it must stay exactly zero
    if (kind == RouterKind::par_subset) {  // toward the best K-subset; the fidelity report's settings
      rc.labels = fl::train::LabelKind::subset;
      rc.steps = 300;
      rc.batch_tokens = 256;
      rc.lr = 0.01;
      rc.loss.balance_weight = rc.loss.par_weight * 0.2;
    }
    fl::train::train_router(router, x_calib, dense, experts, top_k, rc);
  }
  fl::moe::Gating gating;
  gating.mode = fl::moe::CombineMode::softmax_topk_renorm;
  gating.top_k = top_k;
  // --scale-k: output scale K during recovery, so equal weights give the plain sum of the K experts (the recipe's and
  // model/convert.hpp's softmax_renorm choice); folded into the down projections below.
  if (scale_k) gating.output_scale = static_cast<float>(top_k);
  // The K renormalized weights sum to 1, so the experts must be refitted to reproduce the dense output under them.
  auto const routing = fl::train::fixed_routing(router, gating, x_calib);
  if (recovery != RecoveryKind::distill) fl::train::recover_refit(experts, routing, x_calib, dense, /*ridge=*/1e-3);
  if (recovery != RecoveryKind::refit) {  // the fidelity report's distillation: 30 epochs, batch 256, lr 1e-3
    fl::train::DistillConfig dc;
    dc.batch_tokens = 256;
    dc.steps = 30 * static_cast<int>((x_calib.rows() + 255) / 256);
    dc.lr = 1e-3;
    dc.seed = seed;
    fl::train::recover_distill(experts, routing, x_calib, dense, dc);
  }
  return fold_output_scale(SimdMoe(std::move(experts), std::move(router), std::move(gating)));
}

// ---------------------------------------------------------------------------------------------------------------
// F16 copies: what the engine computes when the weights are the ones an F16 GGUF file holds
// ---------------------------------------------------------------------------------------------------------------

float round_f16(float v) { return fl::io::detail::half_to_float(fl::io::detail::float_to_half(v)); }

/// Returns the checkpoint's bytes with every matrix rounded to F16 (norm weights stay F32, as in the F16 export).
std::vector<unsigned char> f16_checkpoint_bytes(std::string const& path, fl::io::Llama2cCheckpoint const& ck) {
  std::ifstream in(path, std::ios::binary);
  std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto const& c = ck.config();
  float const* base = ck.token_embedding().data();
  auto round_range = [&](float const* first, std::ptrdiff_t count) {
    std::size_t const at = fl::io::Llama2cCheckpoint::kHeaderBytes + static_cast<std::size_t>(first - base) * 4;
    for (std::ptrdiff_t i = 0; i < count; ++i) {
      float v;
      std::memcpy(&v, bytes.data() + at + 4 * static_cast<std::size_t>(i), 4);
      v = round_f16(v);
      std::memcpy(bytes.data() + at + 4 * static_cast<std::size_t>(i), &v, 4);
    }
  };
  std::ptrdiff_t const L = c.n_layers;
  round_range(ck.token_embedding().data(), ck.token_embedding().size());
  round_range(ck.wq(0).data(), L * ck.wq(0).size());
  round_range(ck.wk(0).data(), L * ck.wk(0).size());
  round_range(ck.wv(0).data(), L * ck.wv(0).size());
  round_range(ck.wo(0).data(), L * ck.wo(0).size());
  round_range(ck.w1(0).data(), L * ck.w1(0).size());
  round_range(ck.w2(0).data(), L * ck.w2(0).size());
  round_range(ck.w3(0).data(), L * ck.w3(0).size());
  if (!c.shared_classifier) round_range(ck.classifier().data(), ck.classifier().size());
  return bytes;
}

/// Returns a copy of the layer whose expert weights are rounded to F16 (the router stays F32, as exported).
SimdMoe f16_copy(SimdMoe const& a) {
  auto round_tensor = [](fl::Tensor<float, 3> t) {
    for (std::ptrdiff_t i = 0; i < t.size(); ++i) t[i] = round_f16(t[i]);
    return t;
  };
  auto const& ex = a.experts();
  fl::ffn::ExpertWeights<float> r(round_tensor(ex.gate_tensor()), round_tensor(ex.up_tensor()),
                                  round_tensor(ex.down_tensor()), ex.partition());
  return SimdMoe(std::move(r), a.router(), a.gating());
}

// ---------------------------------------------------------------------------------------------------------------
// Reference outputs
// ---------------------------------------------------------------------------------------------------------------

struct Reference {
  std::vector<int> greedy;                      // tokens after BOS
  std::vector<std::vector<int>> prompt_greedy;  // per prompt: the greedy tokens after it
  std::vector<std::vector<float>> probs;        // [forced.size(), vocab] next-token probabilities
  std::vector<std::vector<float>> logits;       // [forced.size(), vocab] the logits they come from
};

/// The greedy continuations and teacher-forced outputs of the engine as it is.
/// \param prompts         prompts (BOS first) to continue greedily for prompt_steps tokens each
/// \param step_by_step    run the teacher-forced sequence one forward_step per token (every FFN call sees one row)
///                        instead of one forward_sequence; for kernels whose decode path differs from prefill
Reference run_reference(fx::Llama2cEngine& engine, std::vector<int> const& forced, int steps,
                        std::vector<std::vector<int>> const& prompts, int prompt_steps, bool step_by_step = false) {
  Reference r;
  fx::Sampler greedy(0.f);
  r.greedy = engine.generate({fl::io::Llama2cTokenizer::kBos}, steps, greedy, /*stop_at_bos=*/false);
  for (auto const& prompt : prompts) {
    auto const n = static_cast<std::ptrdiff_t>(prompt.size());
    auto const out = engine.generate(prompt, static_cast<int>(n - 1) + prompt_steps, greedy, /*stop_at_bos=*/false);
    r.prompt_greedy.emplace_back(out.begin() + (n - 1), out.end());  // generate returns the forced prompt tokens too
  }
  std::ptrdiff_t const vocab = engine.vocab_size();
  auto add_row = [&](float const* row) {
    double const mx = *std::max_element(row, row + vocab);
    double sum = 0;
    for (std::ptrdiff_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(row[v]) - mx);
    std::vector<float> p(static_cast<std::size_t>(vocab));
    for (std::ptrdiff_t v = 0; v < vocab; ++v) p[static_cast<std::size_t>(v)] = static_cast<float>(std::exp(row[v] - mx) / sum);
    r.probs.push_back(std::move(p));
    r.logits.emplace_back(row, row + vocab);
  };
  if (step_by_step) {
    for (std::size_t t = 0; t < forced.size(); ++t) add_row(engine.forward_step(forced[t], static_cast<int>(t)).data());
  } else {
    auto const logits = engine.forward_sequence(forced);
    for (std::ptrdiff_t t = 0; t < logits.rows(); ++t) add_row(logits.row(t));
  }
  return r;
}

template <class Layer>
void install_moe(fx::Llama2cEngine& engine, std::vector<Layer> const& layers, std::ptrdiff_t max_tokens) {
  for (std::size_t l = 0; l < layers.size(); ++l)
    engine.set_ffn(static_cast<int>(l), std::make_unique<fx::MoeLayerAdapter<Layer>>(layers[l], max_tokens, "moe"));
}

/// The layers with their experts in block format Q (q8_0 or q4_0) on backend B: same router and gating.
template <class Q, class B>
std::vector<fl::moe::MoeFfn<Q, B>> quantized_layers(std::vector<SimdMoe> const& padded) {
  std::vector<fl::moe::MoeFfn<Q, B>> out;
  for (auto const& a : padded) out.emplace_back(fl::ffn::convert_format<Q>(a.experts()), a.router(), a.gating());
  return out;
}

/// Returns the largest |a - b| over the teacher-forced probabilities of two references.
double max_prob_diff(Reference const& a, Reference const& b) {
  double m = 0;
  for (std::size_t t = 0; t < a.probs.size(); ++t)
    for (std::size_t v = 0; v < a.probs[t].size(); ++v)
      m = std::max(m, std::fabs(static_cast<double>(a.probs[t][v]) - b.probs[t][v]));
  return m;
}

/// Returns the largest |a - b| over the teacher-forced logits of two references.
double max_logit_diff(Reference const& a, Reference const& b) {
  double m = 0;
  for (std::size_t t = 0; t < a.logits.size(); ++t)
    for (std::size_t v = 0; v < a.logits[t].size(); ++v)
      m = std::max(m, std::fabs(static_cast<double>(a.logits[t][v]) - b.logits[t][v]));
  return m;
}

/// Returns how many greedy tokens two references share before their paths part, over BOS and every prompt, and
/// the total.
std::pair<std::size_t, std::size_t> greedy_agreement(Reference const& a, Reference const& b) {
  std::size_t agree = 0, total = 0;
  auto prefix = [&](std::vector<int> const& x, std::vector<int> const& y) {
    std::size_t i = 0;
    while (i < x.size() && i < y.size() && x[i] == y[i]) ++i;
    agree += i;
    total += x.size();
  };
  prefix(a.greedy, b.greedy);
  for (std::size_t p = 0; p < a.prompt_greedy.size(); ++p) prefix(a.prompt_greedy[p], b.prompt_greedy[p]);
  return {agree, total};
}

/// Returns the fraction of positions where the two models' most likely next tokens agree.
double top1_agreement(Reference const& a, Reference const& b) {
  std::size_t agree = 0;
  for (std::size_t t = 0; t < a.probs.size(); ++t)
    agree += fx::Sampler::argmax(a.probs[t].data(), static_cast<std::ptrdiff_t>(a.probs[t].size())) ==
             fx::Sampler::argmax(b.probs[t].data(), static_cast<std::ptrdiff_t>(b.probs[t].size()));
  return static_cast<double>(agree) / static_cast<double>(a.probs.size());
}

/// Teacher-forced figures on the held-out sequences (model::evaluate: the fidelity report's definitions) and the
/// model's argmax at every position, for reference.json.
struct Heldout {
  std::vector<int> argmax;
  fl::model::Metrics m;
};
Heldout heldout_metrics(fx::Llama2cEngine& engine, std::vector<std::vector<int>> const& seqs,
                        fl::model::DenseReference* fill, fl::model::DenseReference const* ref) {
  Heldout h;
  h.m = fl::model::evaluate(engine, seqs, fill, ref, &h.argmax);
  return h;
}

/// The layers of a factorized file as llama.cpp's MoE computes them (fold_output_scale). The export refuses a
/// non-zero router bias.
std::vector<SimdMoe> load_for_llama(std::string const& path) {
  std::vector<SimdMoe> out;
  for (auto const& a : fl::io::load_factorized<fl::CpuSimd<>>(path)) {
    // Refused here, before any reference is computed (the GGUF export would refuse it at the end).
    auto const bias = a.router().bias();
    for (std::ptrdiff_t e = 0; e < bias.extent(0); ++e)
      if (bias(e) != 0.f)
        throw fl::value_error(path + ": layer " + std::to_string(out.size()) + " has router bias[" + std::to_string(e) +
                              "] = " + std::to_string(bias(e)) + ", but llama.cpp's MoE has no router bias (train it "
                              "bias-free: finetune_recipe.py --router-bias none)");
    out.push_back(fold_output_scale(a));
  }
  return out;
}

int run(Options const& o) {
  auto const t0 = std::chrono::steady_clock::now();
  auto const seconds = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  auto const ck = fl::io::Llama2cCheckpoint::load(o.model);
  auto const& c = ck.config();
  auto const tok = fl::io::Llama2cTokenizer::load(o.tokenizer, c.vocab_size);
  if (o.moe_file.empty() && c.hidden_dim % o.experts != 0)
    usage("--experts " + std::to_string(o.experts) + " does not divide hidden_dim " + std::to_string(c.hidden_dim));
  if (o.steps + 1 > c.seq_len || o.forced > c.seq_len || o.forced < 2) usage("--steps / --forced do not fit seq_len");
  if (kPromptLength + o.prompt_steps > c.seq_len) usage("--prompt-steps does not fit seq_len");
  fs::create_directories(o.out);
  std::vector<SimdMoe> layers;
  if (!o.moe_file.empty()) layers = load_for_llama(o.moe_file);
  int const n_experts = layers.empty() ? o.experts : static_cast<int>(layers[0].n_experts());
  int const top_k = layers.empty() ? o.top_k : static_cast<int>(layers[0].top_k());
  std::string const moe_tag =
      (layers.empty() ? "moe-n" : "ft-n") + std::to_string(n_experts) + "k" + std::to_string(top_k);

  // Dense reference, and the teacher-forced sequence: a temperature-1 sample of the dense model (seed 4242), so the
  // forced path differs from the greedy one.
  fx::Llama2cEngine engine(ck);
  fx::Sampler sampler(1.f, 4242);
  std::vector<int> forced{fl::io::Llama2cTokenizer::kBos};
  auto const sampled = engine.generate(forced, o.forced - 1, sampler, /*stop_at_bos=*/false);
  forced.insert(forced.end(), sampled.begin(), sampled.end());
  // Prompts for greedy continuations: BOS + 24 tokens sampled from the dense model (seeds 5000 + i); shorter ones
  // would nearly all be "Once upon a time,".
  auto const prompts = fx::sample_sequences(engine, o.prompts, kPromptLength - 1, 5000);
  auto const reference = [&](fx::Llama2cEngine& e, bool step_by_step = false) {
    return run_reference(e, forced, o.steps, prompts, o.prompt_steps, step_by_step);
  };
  Reference const dense = reference(engine);
  std::printf("dense greedy: %s\n", tok.decode(dense.greedy).c_str());
  std::vector<std::vector<int>> heldout;
  if (o.heldout_file.empty()) {
    heldout = fx::sample_sequences(engine, 32, 128, 1000000);
  } else {
    heldout = nlohmann::json::parse(std::ifstream(o.heldout_file)).get<std::vector<std::vector<int>>>();
    for (auto const& s : heldout)
      if (s.size() < 2 || static_cast<int>(s.size()) > c.seq_len ||
          std::any_of(s.begin(), s.end(), [&](int t) { return t < 0 || t >= c.vocab_size; }))
        usage(o.heldout_file + ": a held-out sequence is too short, too long or has a token outside the vocabulary");
  }
  fl::model::DenseReference dense_ref;
  Heldout const dense_h = heldout_metrics(engine, heldout, &dense_ref, nullptr);
  std::printf("held-out: %zu sequences, %zu positions; dense next_token_acc %.4f, ppl %.3f\n", heldout.size(),
              dense_h.argmax.size(), dense_h.m.next_token_acc, dense_h.m.ppl);

  // Conversion, bottom-up on calibration text sampled from the dense model.
  if (layers.empty()) {
    auto const calib = fx::sample_sequences(engine, o.calib, o.length, 1000);
    fx::convert_layers_in_order(engine, calib, [&](int l, fl::Matrix<float> const& x) -> std::unique_ptr<fx::FfnLayer> {
      layers.push_back(convert_layer(ck.ffn(l), x.cview(), o.experts, o.top_k, o.router, o.recovery, o.scale_k, kSeed + static_cast<std::uint64_t>(l)));
      return std::make_unique<fx::MoeFfnLayer>(layers.back(), c.seq_len, moe_tag);
    });
  } else {
    install_moe(engine, layers, c.seq_len);
  }
  Reference const moe = reference(engine);
  Heldout const moe_h = heldout_metrics(engine, heldout, nullptr, &dense_ref);
  std::printf("%s held-out: next_token_acc %.4f, retention %.4f, top-1 agreement %.4f, ppl %.3f\n", moe_tag.c_str(),
              moe_h.m.next_token_acc, moe_h.m.next_token_acc / dense_h.m.next_token_acc, moe_h.m.top1_agreement, moe_h.m.ppl);
  std::printf("%s greedy: %s\n", moe_tag.c_str(), tok.decode(moe.greedy).c_str());
  std::printf("%s top-1 agreement with dense on the forced sequence: %.3f (%.1fs)\n", moe_tag.c_str(),
              top1_agreement(dense, moe), seconds());

  // F16 references: the same engine on F16-rounded weights (what the F16 files hold).
  std::vector<unsigned char> const ck16_bytes = f16_checkpoint_bytes(o.model, ck);
  auto const ck16 = fl::io::Llama2cCheckpoint::parse(ck16_bytes.data(), ck16_bytes.size());
  fx::Llama2cEngine engine16(ck16);
  Reference const dense16 = reference(engine16);
  std::vector<SimdMoe> layers16;
  for (auto const& a : layers) layers16.push_back(f16_copy(a));
  install_moe(engine16, layers16, c.seq_len);
  Reference const moe16 = reference(engine16);

  // Q8_0 / Q4_0 experts. d_expert = hidden_dim / N (43 for N = 4) holds no whole 32-weight block, so every expert is
  // first padded with zero neurons to a multiple of 32 (ffn::pad_experts: the same function), then quantized with
  // ggml's reference rounding. Our references run the quantized layers on the CpuScalar oracle: every weight
  // dequantized exactly, double sums, activations never rounded. Everything else stays F32, as in the files.
  std::vector<SimdMoe> padded;
  for (auto const& a : layers) padded.emplace_back(fl::ffn::pad_experts(a.experts(), fl::kQuantBlock), a.router(), a.gating());
  std::ptrdiff_t const d_expert_padded = padded[0].d_expert();
  fx::Llama2cEngine engine_pad(ck);
  install_moe(engine_pad, padded, c.seq_len);
  Reference const moe_pad = reference(engine_pad);
  auto const q8 = quantized_layers<fl::q8_0, fl::CpuScalar>(padded);
  auto const q4 = quantized_layers<fl::q4_0, fl::CpuScalar>(padded);
  fx::Llama2cEngine engine_q(ck);
  install_moe(engine_q, q8, c.seq_len);
  Reference const moe_q8 = reference(engine_q);
  install_moe(engine_q, q4, c.seq_len);
  Reference const moe_q4 = reference(engine_q);
  // The same quantized weights on CpuSimd's decode kernels, which also round each FFN input and h to 8 bits per
  // block of 32 as ggml does (backend/simd/quant_dot.hpp): run one token per forward call so that every FFN call
  // takes that path. Reported next to the oracle to show what activation rounding alone moves.
  install_moe(engine_q, quantized_layers<fl::q8_0, fl::CpuSimd<>>(padded), c.seq_len);
  Reference const moe_q8_act8 = reference(engine_q, /*step_by_step=*/true);
  install_moe(engine_q, quantized_layers<fl::q4_0, fl::CpuSimd<>>(padded), c.seq_len);
  Reference const moe_q4_act8 = reference(engine_q, /*step_by_step=*/true);
  auto const report = [&](char const* what, Reference const& a, Reference const& b) {
    auto const [agree, total] = greedy_agreement(a, b);
    std::printf("%s: greedy tokens equal %zu/%zu (BOS + %d prompts), teacher-forced max |dp| %.2e, max |dlogit| %.2e, "
                "top-1 agreement %.3f\n", what, agree, total, o.prompts, max_prob_diff(a, b), max_logit_diff(a, b),
                top1_agreement(a, b));
  };
  std::printf("experts padded with zero neurons: d_expert %td -> %td\n", layers[0].d_expert(), d_expert_padded);
  report("padded f32 vs unpadded f32 (same function)", moe_pad, moe);
  report("q8_0 (oracle) vs f32", moe_q8, moe);
  report("q4_0 (oracle) vs f32", moe_q4, moe);
  report("q8_0 8-bit activations (CpuSimd decode) vs q8_0 oracle", moe_q8_act8, moe_q8);
  report("q4_0 8-bit activations (CpuSimd decode) vs q4_0 oracle", moe_q4_act8, moe_q4);

  // Files.
  auto const path = [&](std::string const& name) { return (fs::path(o.out) / name).string(); };
  fl::io::GgufExportOptions f32_opts, f16_opts;
  f16_opts.weight_type = fl::io::GgmlType::f16;
  f32_opts.name = f16_opts.name = "stories260K";
  fl::io::export_llama_gguf(path("dense-f32.gguf"), ck, tok, f32_opts);
  fl::io::export_llama_gguf(path("dense-f16.gguf"), ck, tok, f16_opts);
  f32_opts.name = f16_opts.name = "stories260K-" + moe_tag;
  fl::io::export_llama_gguf(path(moe_tag + "-f32.gguf"), ck, tok, layers, f32_opts);
  fl::io::export_llama_gguf(path(moe_tag + "-f16.gguf"), ck, tok, layers, f16_opts);
  // expert_type unset: the q8_0 / q4_0 layers are written in their own format, bit for bit; the rest F32.
  fl::io::export_llama_gguf(path(moe_tag + "-q8_0.gguf"), ck, tok, q8, f32_opts);
  fl::io::export_llama_gguf(path(moe_tag + "-q4_0.gguf"), ck, tok, q4, f32_opts);
  fl::io::FactorizedSaveOptions fopts;
  fopts.metadata["source_model"] = fs::path(o.model).filename().string();
  fl::io::save_factorized(path(moe_tag + ".factorized.safetensors"), layers, fopts);
  fl::io::export_mixtral(path(moe_tag + "-mixtral"), ck, layers);

  // Self-checks: the factorized file reloads into the same model (same greedy tokens), and the GGUF reader finds
  // the MoE tensors bit-exact.
  int failures = 0;
  {
    auto reloaded = fl::io::load_factorized<fl::CpuSimd<>>(path(moe_tag + ".factorized.safetensors"));
    fx::Llama2cEngine check(ck);
    install_moe(check, reloaded, c.seq_len);
    fx::Sampler greedy(0.f);
    bool const same = check.generate({fl::io::Llama2cTokenizer::kBos}, o.steps, greedy, false) == moe.greedy;
    std::printf("factorized safetensors reload: %s\n", same ? "same greedy tokens" : "DIFFERENT greedy tokens");
    failures += !same;
    auto const g = fl::io::GgufFile::load(path(moe_tag + "-f32.gguf"));
    auto const gate = g.to_float("blk.0.ffn_gate_exps.weight");
    auto const& want = layers[0].experts().gate_tensor();
    bool const exact = std::equal(gate.begin(), gate.end(), want.data());
    std::printf("GGUF reload of blk.0.ffn_gate_exps: %s\n", exact ? "bit-exact" : "MISMATCH");
    failures += !exact;
    // The Q8_0 / Q4_0 files hold our blocks bit for bit.
    auto const g8 = fl::io::GgufFile::load(path(moe_tag + "-q8_0.gguf")).to_blocks<fl::q8_0>("blk.1.ffn_down_exps.weight");
    auto const g4 = fl::io::GgufFile::load(path(moe_tag + "-q4_0.gguf")).to_blocks<fl::q4_0>("blk.1.ffn_down_exps.weight");
    auto const& w8 = q8[1].experts().down_tensor();
    auto const& w4 = q4[1].experts().down_tensor();
    bool const blocks = static_cast<std::ptrdiff_t>(g8.size()) == w8.size() && static_cast<std::ptrdiff_t>(g4.size()) == w4.size() &&
                        std::memcmp(g8.data(), w8.data(), g8.size() * sizeof(fl::q8_0)) == 0 &&
                        std::memcmp(g4.data(), w4.data(), g4.size() * sizeof(fl::q4_0)) == 0;
    std::printf("GGUF reload of blk.1.ffn_down_exps (Q8_0, Q4_0): %s\n", blocks ? "bit-exact blocks" : "MISMATCH");
    failures += !blocks;
    // Zero-neuron padding computes the same function: float rounding only (the kernels block 64 neurons, not 43).
    double const pad_dp = max_prob_diff(moe_pad, moe);
    bool const pad_same = pad_dp <= kPadTolerance && moe_pad.greedy == moe.greedy;
    std::printf("padded experts: %s (max |dp| %.2e, tolerance %.0e)\n",
                pad_same ? "same greedy tokens and probabilities" : "DIFFERENT from the unpadded layers", pad_dp,
                kPadTolerance);
    failures += !pad_same;
  }

  // reference.json for tests/llama_cpp/check.mjs.
  nlohmann::json ref;
  ref["generator"] = "factorllm_export";
  ref["source_model"] = fs::path(o.model).filename().string();
  ref["bos"] = fl::io::Llama2cTokenizer::kBos;
  ref["eos"] = fl::io::Llama2cTokenizer::kEos;
  ref["vocab_size"] = c.vocab_size;
  ref["greedy_steps"] = o.steps;
  ref["forced_tokens"] = forced;
  // Tokenizer probe: our encoding of a text (ASCII, punctuation, digits, a newline and UTF-8 that needs byte
  // fallback), which llama.cpp's tokenizer must reproduce from the exported vocabulary.
  std::string const probe = "Once upon a time, there was a little dog named Max.\nHe said: \"Let's run 123 miles!\" \xC3\xBC\xE2\x9C\x93";
  ref["tokenizer_probe"] = {{"text", probe}, {"tokens", tok.encode(probe, /*bos=*/false, /*eos=*/false)}};
  ref["prompts"] = prompts;
  ref["prompt_steps"] = o.prompt_steps;
  ref["moe"] = {{"n_experts", n_experts}, {"top_k", top_k}, {"d_expert", layers[0].d_expert()},
                {"router", !o.moe_file.empty() ? "file"
                            : o.router == RouterKind::lsq ? "lsq"
                            : o.router == RouterKind::par ? "par" : "par_subset"},
                {"output_scale_k", o.scale_k},
                {"recovery", !o.moe_file.empty() ? "finetune"
                              : o.recovery == RecoveryKind::refit ? "refit"
                              : o.recovery == RecoveryKind::distill ? "distill" : "refit+distill"},
                {"source", o.moe_file.empty() ? "layer-local conversion" : fs::path(o.moe_file).filename().string()},
                {"combine_mode", "softmax_topk_renorm"}, {"router_bias", false},
                {"top1_agreement_with_dense", top1_agreement(dense, moe)}};
  auto outputs = [&](Reference const& r) {
    return nlohmann::json{{"greedy_tokens", r.greedy},
                          {"prompt_greedy", r.prompt_greedy},
                          {"forced_probs", r.probs},
                          {"forced_logits", r.logits}};
  };
  // weight_type: every 2-D weight but the experts; expert_type: the ffn_*_exps tensors (MoE only).
  auto entry = [&](std::string const& name, char const* type, char const* expert_type, std::ptrdiff_t d_expert,
                   Reference const& r) {
    nlohmann::json e{{"name", name}, {"file", name + ".gguf"}, {"weight_type", type}, {"moe", d_expert > 0},
                     {"greedy_text", tok.decode(r.greedy)}};
    e.update(outputs(r));
    if (d_expert > 0) {
      e["expert_type"] = expert_type;
      e["d_expert"] = d_expert;
    }
    return e;
  };
  std::ptrdiff_t const d_expert = layers[0].d_expert();
  auto q_entry = [&](char const* suffix, char const* type, Reference const& r, Reference const& act8) {
    auto e = entry(moe_tag + suffix, "F32", type, d_expert_padded, r);
    e["act8"] = outputs(act8);  // CpuSimd's decode path: activations rounded to 8 bits as ggml does (informational)
    return e;
  };
  ref["heldout"] = {{"source", o.heldout_file.empty() ? "sampled: seeds 1000000 + i" : o.heldout_file},
                    {"sequences", heldout}};
  auto with_heldout = [](nlohmann::json e, Heldout const& h) {
    e["heldout"] = {{"argmax", h.argmax}, {"next_token_acc", h.m.next_token_acc}, {"ppl", h.m.ppl},
                    {"top1_agreement", h.m.top1_agreement}};
    return e;
  };
  ref["models"] = {with_heldout(entry("dense-f32", "F32", "", 0, dense), dense_h),
                   entry("dense-f16", "F16", "", 0, dense16),
                   with_heldout(entry(moe_tag + "-f32", "F32", "F32", d_expert, moe), moe_h),
                   entry(moe_tag + "-f16", "F16", "F16", d_expert, moe16),
                   q_entry("-q8_0", "Q8_0", moe_q8, moe_q8_act8),
                   q_entry("-q4_0", "Q4_0", moe_q4, moe_q4_act8)};
  std::ofstream(path("reference.json")) << ref.dump() << "\n";
  std::printf("wrote %s/{dense,%s}-{f32,f16}.gguf, %s-{q8_0,q4_0}.gguf, %s.factorized.safetensors, %s-mixtral/, "
              "reference.json (%.1fs)\n",
              o.out.c_str(), moe_tag.c_str(), moe_tag.c_str(), moe_tag.c_str(), moe_tag.c_str(), seconds());
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  Options const o = parse_args(argc, argv);
  try {
    return run(o);
  } catch (std::exception const& e) {
    std::fprintf(stderr, "factorllm_export: %s\n", e.what());
    return 2;
  }
}
