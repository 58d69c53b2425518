// SPDX-License-Identifier: Apache-2.0
// Tests of the examples' llama2.c engine on the real stories260K model: greedy text, KV cache vs whole-sequence
// forward, K = N MoE equal to dense, and the calibration data split.
#include <catch2/catch.hpp>

#include <factorllm/core/error.hpp>
#include <factorllm/ffn/factorize.hpp>
#include <factorllm/ffn/permutation.hpp>
#include <factorllm/io/llama2c.hpp>
#include <factorllm/moe/gating.hpp>
#include <factorllm/moe/moe_ffn.hpp>
#include <factorllm/moe/router.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "../examples/common/calibration.hpp"
#include "../examples/common/llama2c_engine.hpp"
#include "reference/shared_data.hpp"

namespace {

namespace fl = factorllm;
using factorllm_examples::Llama2cEngine;
using factorllm_examples::MoeFfnLayer;
using factorllm_examples::Sampler;

std::string const kModelPath = std::string(FACTORLLM_SHARED_DIR) + "/models/stories260K.bin";
std::string const kTokenizerPath = std::string(FACTORLLM_SHARED_DIR) + "/models/tok512.bin";

// The check value of shared/models/README.md: greedy decoding from BOS for 60 steps (float32 reference).
std::string const kGreedyText =
    " Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw "
    "a big, red ball. She wanted to play with it, but it was too high";
constexpr int kGreedySteps = 60;
// Logits of two float32 forwards that differ only in summation order (GEMM blocking, FFN kernel path).
constexpr float kLogitTolerance = 1e-4f;

struct Model {
  fl::io::Llama2cCheckpoint checkpoint;
  fl::io::Llama2cTokenizer tokenizer;
};

/// Loads the model once for all tests; null (with a WARN) when the shared files are absent.
Model const* model() {
  static std::optional<Model> const loaded = []() -> std::optional<Model> {
    if (!std::ifstream(kModelPath, std::ios::binary).good() || !std::ifstream(kTokenizerPath, std::ios::binary).good())
      return std::nullopt;
    auto ckpt = fl::io::Llama2cCheckpoint::load(kModelPath);
    auto tok = fl::io::Llama2cTokenizer::load(kTokenizerPath, ckpt.config().vocab_size);
    return Model{std::move(ckpt), std::move(tok)};
  }();
  if (!loaded) fixture::have_shared_data({kModelPath, kTokenizerPath});
  return loaded ? &*loaded : nullptr;
}

/// Decodes generated tokens as llama2.c prints them after BOS... except that the first piece keeps its leading
/// space, as the README's check string does (it concatenates the raw pieces).
std::string raw_text(fl::io::Llama2cTokenizer const& tok, std::vector<int> const& tokens) {
  std::string out;
  int prev = -1;
  for (int const t : tokens) {
    out += tok.decode(prev, t);
    prev = t;
  }
  return out;
}

std::vector<int> greedy(Llama2cEngine& engine, int steps) {
  Sampler sampler;  // temperature 0
  return engine.generate({fl::io::Llama2cTokenizer::kBos}, steps, sampler);
}

/// Installs in every layer a K = N code_ref MoE (random partition, random router): weights floor(N/K) = 1, so the
/// layer computes the sum of all experts, i.e. the dense FFN.
void install_full_moe(Llama2cEngine& engine, std::ptrdiff_t n_experts) {
  auto const& ckpt = engine.checkpoint();
  for (int l = 0; l < engine.n_layers(); ++l) {
    auto const dense = ckpt.ffn(l);
    auto partition = fl::ffn::ExpertPartition::random(dense.d_ff(), n_experts, 7 + static_cast<std::uint64_t>(l));
    fl::moe::Gating gating;
    gating.mode = fl::moe::CombineMode::code_ref;
    gating.top_k = n_experts;
    fl::moe::MoeFfn<float, fl::CpuSimd<>> moe(fl::ffn::factorize(dense, partition),
                                              fl::moe::Router<float>::random(dense.d_model(), n_experts, 99 + static_cast<std::uint64_t>(l)),
                                              gating);
    engine.set_ffn(l, std::make_unique<MoeFfnLayer>(std::move(moe), engine.max_seq_len()));
  }
}

float max_abs_diff(float const* a, float const* b, std::ptrdiff_t n) {
  float m = 0.f;
  for (std::ptrdiff_t i = 0; i < n; ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

}  // namespace

TEST_CASE("engine: greedy decoding from BOS reproduces the README check text", "[engine][llama2c]") {
  Model const* m = model();
  if (m == nullptr) return;
  Llama2cEngine engine(m->checkpoint);
  std::vector<int> const tokens = greedy(engine, kGreedySteps);
  CHECK(tokens.size() == static_cast<std::size_t>(kGreedySteps));
  CHECK(raw_text(m->tokenizer, tokens) == kGreedyText);
  // The tokenizer's llama2.c-style decode drops the first piece's leading space after BOS.
  std::vector<int> with_bos{fl::io::Llama2cTokenizer::kBos};
  with_bos.insert(with_bos.end(), tokens.begin(), tokens.end());
  CHECK(m->tokenizer.decode(with_bos) == kGreedyText.substr(1));
}

TEST_CASE("engine: whole-sequence logits equal step-by-step KV-cache logits", "[engine][llama2c]") {
  Model const* m = model();
  if (m == nullptr) return;
  Llama2cEngine engine(m->checkpoint);
  int const vocab = engine.vocab_size();
  // A temperature-1 sample (seed 2023) rather than the greedy text: less repetitive attention patterns.
  Sampler sampler(1.f, 2023);
  std::vector<int> seq{fl::io::Llama2cTokenizer::kBos};
  std::vector<int> const sampled = engine.generate(seq, 96, sampler, /*stop_at_bos=*/false);
  seq.insert(seq.end(), sampled.begin(), sampled.end());
  auto const n = static_cast<std::ptrdiff_t>(seq.size());

  std::vector<float> steps(static_cast<std::size_t>(n * vocab));
  for (std::ptrdiff_t t = 0; t < n; ++t) {
    auto const logits = engine.forward_step(seq[static_cast<std::size_t>(t)], static_cast<int>(t));
    std::copy(logits.data(), logits.data() + vocab, steps.data() + t * vocab);
  }
  auto const whole = engine.forward_sequence(seq);
  REQUIRE(whole.rows() == n);
  float const diff = max_abs_diff(whole.data(), steps.data(), n * vocab);
  INFO("max |sequence - step| over " << n << " positions x " << vocab << " logits = " << diff);
  CHECK(diff <= kLogitTolerance);

  SECTION("decoding continues from the cache that forward_sequence filled") {
    std::vector<int> const prefix(seq.begin(), seq.begin() + 40);
    engine.forward_sequence(prefix);
    for (std::ptrdiff_t t = 40; t < n; ++t) {
      auto const logits = engine.forward_step(seq[static_cast<std::size_t>(t)], static_cast<int>(t));
      CHECK(max_abs_diff(logits.data(), steps.data() + t * vocab, vocab) <= kLogitTolerance);
    }
  }
}

TEST_CASE("engine: a K = N code_ref MoE in every layer equals the dense model", "[engine][llama2c][moe]") {
  Model const* m = model();
  if (m == nullptr) return;
  Llama2cEngine dense(m->checkpoint);
  std::vector<int> const dense_tokens = greedy(dense, kGreedySteps);
  for (std::ptrdiff_t const n_experts : {2, 4}) {
    INFO("n_experts = K = " << n_experts);
    Llama2cEngine moe(m->checkpoint);
    install_full_moe(moe, n_experts);
    CHECK(moe.ffn(0).describe() == "moe");
    std::vector<int> const moe_tokens = greedy(moe, kGreedySteps);
    CHECK(moe_tokens == dense_tokens);
    CHECK(raw_text(m->tokenizer, moe_tokens) == kGreedyText);

    std::vector<int> seq{fl::io::Llama2cTokenizer::kBos};
    seq.insert(seq.end(), dense_tokens.begin(), dense_tokens.end());
    auto const a = dense.forward_sequence(seq);
    auto const b = moe.forward_sequence(seq);
    CHECK(max_abs_diff(a.data(), b.data(), a.size()) <= kLogitTolerance);
  }
}

TEST_CASE("engine: FFN input hook and ffn_inputs see the same rows", "[engine][llama2c]") {
  Model const* m = model();
  if (m == nullptr) return;
  Llama2cEngine engine(m->checkpoint);
  std::vector<int> const seq = {1, 403, 407, 261, 378};
  std::vector<std::vector<float>> seen(static_cast<std::size_t>(engine.n_layers()));
  engine.set_ffn_input_hook([&](int l, std::ptrdiff_t pos0, fl::MatrixView<float const> x) {
    CHECK(pos0 == 0);
    seen[static_cast<std::size_t>(l)].assign(x.data(), x.data() + x.size());
  });
  engine.forward_sequence(seq);
  engine.set_ffn_input_hook({});
  for (int l = 0; l < engine.n_layers(); ++l) {
    auto const x = engine.ffn_inputs(seq, l);
    REQUIRE(static_cast<std::size_t>(x.size()) == seen[static_cast<std::size_t>(l)].size());
    CHECK(std::equal(x.data(), x.data() + x.size(), seen[static_cast<std::size_t>(l)].begin()));
  }
}

TEST_CASE("engine: bad calls throw typed errors", "[engine][llama2c]") {
  Model const* m = model();
  if (m == nullptr) return;
  Llama2cEngine engine(m->checkpoint);
  CHECK_THROWS_AS(engine.forward_step(512, 0), fl::value_error);
  CHECK_THROWS_AS(engine.forward_step(-1, 0), fl::value_error);
  CHECK_THROWS_AS(engine.forward_step(1, 512), fl::value_error);
  CHECK_THROWS_AS(engine.forward_step(1, 3), fl::value_error);  // positions 0..2 were never run
  CHECK_THROWS_AS(engine.forward_sequence({}), fl::value_error);
  CHECK_THROWS_AS(engine.forward_sequence(std::vector<int>(513, 1)), fl::value_error);
  CHECK_THROWS_AS(engine.ffn_inputs({1}, 5), fl::value_error);
  CHECK_THROWS_AS(engine.set_ffn(0, nullptr), fl::value_error);
  CHECK_THROWS_AS(Sampler(-1.f), fl::value_error);
  engine.ffn_inputs({1, 2, 3}, 2);  // stops at layer 2: the upper layers' caches were not written
  CHECK_THROWS_AS(engine.forward_step(1, 3), fl::value_error);
}

TEST_CASE("calibration: held-out and calibration sequences are disjoint and reproducible", "[engine][calibration]") {
  Model const* m = model();
  if (m == nullptr) return;
  Llama2cEngine engine(m->checkpoint);
  factorllm_examples::DataSplitConfig cfg;
  cfg.n_calibration = 6;
  cfg.n_evaluation = 4;
  cfg.length = 24;
  auto const split = factorllm_examples::make_data_split(engine, cfg);
  REQUIRE(split.calibration.size() == 6);
  REQUIRE(split.evaluation.size() == 4);
  for (auto const& s : split.calibration) CHECK(s.size() == 25);
  for (auto const& e : split.evaluation)
    for (auto const& c : split.calibration) CHECK(e != c);
  // Sequence i depends on its own seed only.
  auto const again = factorllm_examples::sample_sequences(engine, 1, 24, cfg.calibration_seed + 2);
  CHECK(again.front() == split.calibration[2]);

  auto const x = factorllm_examples::collect_ffn_inputs(engine, split.calibration, 1);
  CHECK(x.extent(0) == 1 + 6 * 24);
  CHECK(x.extent(1) == engine.config().d_model);

  cfg.evaluation_seed = cfg.calibration_seed + 5;  // overlaps the calibration seeds
  CHECK_THROWS_AS(factorllm_examples::make_data_split(engine, cfg), fl::value_error);
}
