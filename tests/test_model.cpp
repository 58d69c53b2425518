// SPDX-License-Identifier: Apache-2.0
// Tests of model/: the reference engine against an independent double-precision forward (grouped-query attention,
// head_dim != d_model / n_heads, q/k/v biases, rope_theta, rms_norm_eps, untied classifier, decode = prefill), the
// layer-local conversion (K = N plain sum is the dense model; softmax_renorm keeps the router bias at zero),
// fold_output_scale, evaluate, and io/model_file.hpp's recognition and factorized-layer application.
#include <catch2/catch.hpp>

#include <factorllm/core/error.hpp>
#include <factorllm/io/factorized_checkpoint.hpp>
#include <factorllm/io/gguf_llama_export.hpp>
#include <factorllm/io/model_file.hpp>
#include <factorllm/io/moe_export.hpp>
#include <factorllm/model/calibration.hpp>
#include <factorllm/model/convert.hpp>
#include <factorllm/model/evaluate.hpp>
#include <factorllm/model/llama_engine.hpp>
#include <factorllm/model/llama_model.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "reference/model_fixtures.hpp"
#include "reference/shared_data.hpp"

namespace {

namespace fl = factorllm;
using fl::model::LlamaModel;

std::string const kModelPath = std::string(FACTORLLM_SHARED_DIR) + "/models/stories260K.bin";

template <class T>
void fill(T& t, std::mt19937& rng, float scale, float offset = 0.f) {
  std::normal_distribution<float> n(0.f, scale);
  for (std::ptrdiff_t i = 0; i < t.size(); ++i) t.data()[i] = offset + n(rng);
}

/// A small random model exercising everything the engine supports.
LlamaModel random_model(bool biases) {
  fixture::RandomModelShape shape;
  shape.biases = biases;
  return fixture::random_llama_model(shape, 7);
}

using Vec = std::vector<double>;

Vec matvec(fl::Matrix<float> const& w, Vec const& x, fl::Vector<float> const& b) {
  Vec y(static_cast<std::size_t>(w.extent(0)));
  for (std::ptrdiff_t r = 0; r < w.extent(0); ++r) {
    double s = b.size() != 0 ? b.data()[r] : 0.0;
    for (std::ptrdiff_t k = 0; k < w.extent(1); ++k) s += static_cast<double>(w(r, k)) * x[static_cast<std::size_t>(k)];
    y[static_cast<std::size_t>(r)] = s;
  }
  return y;
}

Vec rmsnorm(Vec const& x, fl::Vector<float> const& w, double eps) {
  double ss = 0;
  for (double e : x) ss += e * e;
  double const inv = 1.0 / std::sqrt(ss / static_cast<double>(x.size()) + eps);
  Vec y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) y[i] = w.data()[i] * x[i] * inv;
  return y;
}

/// Independent double forward: every position's logits [T][vocab]. RoPE rotates the adjacent pairs (2i, 2i + 1) of
/// each head by pos * theta^(-2i / head_dim).
std::vector<Vec> reference_logits(LlamaModel const& m, std::vector<int> const& tokens) {
  auto const& c = m.config;
  std::size_t const T = tokens.size(), hd = static_cast<std::size_t>(c.head_dim);
  std::vector<Vec> x(T);
  for (std::size_t t = 0; t < T; ++t) {
    x[t].resize(static_cast<std::size_t>(c.d_model));
    for (std::ptrdiff_t i = 0; i < c.d_model; ++i) x[t][static_cast<std::size_t>(i)] = m.token_embedding(tokens[t], i);
  }
  auto rope = [&](Vec& v, std::size_t pos) {
    for (std::size_t h = 0; h < v.size() / hd; ++h)
      for (std::size_t i = 0; i < hd / 2; ++i) {
        double const ang = static_cast<double>(pos) * std::pow(c.rope_theta, -2.0 * static_cast<double>(i) / hd);
        double& a = v[h * hd + 2 * i];
        double& b = v[h * hd + 2 * i + 1];
        double const a0 = a, b0 = b;
        a = a0 * std::cos(ang) - b0 * std::sin(ang);
        b = a0 * std::sin(ang) + b0 * std::cos(ang);
      }
  };
  for (auto const& L : m.layers) {
    std::vector<Vec> q(T), k(T), v(T);
    for (std::size_t t = 0; t < T; ++t) {
      Vec const xn = rmsnorm(x[t], L.attn_norm, c.rms_norm_eps);
      q[t] = matvec(L.wq, xn, L.bq);
      k[t] = matvec(L.wk, xn, L.bk);
      v[t] = matvec(L.wv, xn, L.bv);
      rope(q[t], t);
      rope(k[t], t);
    }
    std::size_t const group = static_cast<std::size_t>(c.n_heads / c.n_kv_heads);
    for (std::size_t t = 0; t < T; ++t) {
      Vec att(static_cast<std::size_t>(c.q_dim()), 0.0);
      for (std::size_t h = 0; h < static_cast<std::size_t>(c.n_heads); ++h) {
        std::size_t const kh = h / group;
        Vec s(t + 1);
        double mx = -1e300;
        for (std::size_t u = 0; u <= t; ++u) {
          double dot = 0;
          for (std::size_t i = 0; i < hd; ++i) dot += q[t][h * hd + i] * k[u][kh * hd + i];
          s[u] = dot / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[u]);
        }
        double z = 0;
        for (double& e : s) z += e = std::exp(e - mx);
        for (std::size_t u = 0; u <= t; ++u)
          for (std::size_t i = 0; i < hd; ++i) att[h * hd + i] += s[u] / z * v[u][kh * hd + i];
      }
      Vec const o = matvec(L.wo, att, fl::Vector<float>());
      for (std::size_t i = 0; i < o.size(); ++i) x[t][i] += o[i];
      Vec const xn = rmsnorm(x[t], L.ffn_norm, c.rms_norm_eps);
      Vec const g = matvec(L.ffn.gate, xn, fl::Vector<float>()), up = matvec(L.ffn.up, xn, fl::Vector<float>());
      Vec h(g.size());
      for (std::size_t i = 0; i < g.size(); ++i) h[i] = g[i] / (1.0 + std::exp(-g[i])) * up[i];
      Vec const y = matvec(L.ffn.down, h, fl::Vector<float>());
      for (std::size_t i = 0; i < y.size(); ++i) x[t][i] += y[i];
    }
  }
  std::vector<Vec> out(T);
  for (std::size_t t = 0; t < T; ++t) out[t] = matvec(m.classifier, rmsnorm(x[t], m.final_norm, c.rms_norm_eps), fl::Vector<float>());
  return out;
}

}  // namespace

TEST_CASE("model: the engine matches an independent double forward (GQA, head_dim, biases, theta, eps)", "[model]") {
  std::vector<int> const tokens = {3, 17, 0, 39, 22, 8, 8, 31, 5, 12, 27, 1};
  for (bool const biases : {false, true}) {
    INFO("q/k/v biases " << biases);
    LlamaModel const m = random_model(biases);
    auto const want = reference_logits(m, tokens);
    fl::model::LlamaEngine engine(m);
    auto const got = engine.forward_sequence(tokens);
    double max_err = 0, max_ref = 0;
    for (std::size_t t = 0; t < tokens.size(); ++t)
      for (std::ptrdiff_t v = 0; v < m.config.vocab_size; ++v) {
        max_err = std::max(max_err, std::fabs(got(static_cast<std::ptrdiff_t>(t), v) - want[t][static_cast<std::size_t>(v)]));
        max_ref = std::max(max_ref, std::fabs(want[t][static_cast<std::size_t>(v)]));
      }
    CHECK(max_err <= 2e-5 * std::max(1.0, max_ref));  // float engine vs double reference
    // Decoding one token at a time reproduces the prefill logits (the KV cache path).
    fl::model::LlamaEngine step(m);
    for (std::size_t t = 0; t < tokens.size(); ++t) {
      auto const z = step.forward_step(tokens[t], static_cast<int>(t));
      for (std::ptrdiff_t v = 0; v < m.config.vocab_size; ++v)
        REQUIRE(z(v) == Approx(got(static_cast<std::ptrdiff_t>(t), v)).margin(1e-5));
    }
  }
}

TEST_CASE("model: a shape that disagrees with the config is refused naming the tensor", "[model][bad_input]") {
  LlamaModel m = random_model(false);
  m.layers[1].wk = fl::Matrix<float>({16, 48});
  CHECK_THROWS_WITH(m.validate(), Catch::Contains("layers.1.wk has shape [16, 48], expected [32, 48]"));
  LlamaModel g = random_model(false);
  g.config.n_kv_heads = 3;
  CHECK_THROWS_WITH(g.validate(), Catch::Contains("not a multiple of n_kv_heads"));
  CHECK_THROWS_AS(fl::model::LlamaEngine(g), fl::format_error);
}

TEST_CASE("model: conversion with K = N and a plain sum is the dense model, and softmax_renorm has no router bias",
          "[model][convert]") {
  LlamaModel const dense = random_model(false);
  fl::model::LlamaEngine engine(dense);
  auto const calib = fl::model::sample_sequences(engine, 4, 12, 100);
  fl::model::ConvertConfig cfg;
  cfg.n_experts = 4;
  cfg.top_k = 4;
  cfg.partition = fl::model::PartitionKind::random;
  cfg.router = fl::model::RouterKind::random;
  cfg.recovery = fl::model::RecoveryKind::none;
  fl::model::MethodConfig mc;
  LlamaModel full = dense;
  fl::model::convert_model(full, calib, cfg, mc);
  REQUIRE(full.has_moe());
  fl::model::DenseReference ref;
  auto const d = fl::model::evaluate(engine, calib, &ref, nullptr);
  CHECK(d.top1_agreement == 1.0);
  fl::model::LlamaEngine moe_engine(full);
  auto const m = fl::model::evaluate(moe_engine, calib, nullptr, &ref);
  CHECK(m.top1_agreement == 1.0);
  CHECK(m.kl_to_dense < 1e-6);  // float summation order only (clang and GCC builds differ at 1e-8)
  CHECK(m.next_token_acc == d.next_token_acc);

  cfg.top_k = 2;
  cfg.router = fl::model::RouterKind::par;
  cfg.recovery = fl::model::RecoveryKind::refit;
  cfg.gating = fl::model::GatingKind::softmax_renorm;
  mc.router_steps = 20;
  LlamaModel exportable = dense;
  fl::model::convert_model(exportable, calib, cfg, mc);
  for (auto const& l : exportable.layers) {
    CHECK(l.moe->gating().mode == fl::moe::CombineMode::softmax_topk_renorm);
    CHECK(l.moe->gating().output_scale == 2.f);
    for (std::ptrdiff_t e = 0; e < 4; ++e) CHECK(l.moe->router().bias()(e) == 0.f);
  }
  // Layers already converted, shared experts and a K outside [1, N] are refused.
  CHECK_THROWS_WITH(fl::model::convert_model(exportable, calib, cfg, mc), Catch::Contains("already has MoE layers"));
  LlamaModel again = dense;
  cfg.top_k = 5;
  CHECK_THROWS_WITH(fl::model::convert_model(again, calib, cfg, mc), Catch::Contains("top_k = 5 must be in [1"));
}

TEST_CASE("model: fold_output_scale computes the same layer with scale 1", "[model][export]") {
  LlamaModel const dense = random_model(false);
  auto experts = fl::ffn::factorize(dense.layers[0].ffn.view(), fl::ffn::ExpertPartition::random(96, 4, 3));
  fl::moe::Gating g;
  g.mode = fl::moe::CombineMode::softmax_topk_renorm;
  g.top_k = 2;
  for (float const scale : {2.f, 1.5f}) {
    g.output_scale = scale;
    fl::model::LlamaMoe const layer(experts, fl::moe::Router<float>::random(48, 4, 9, 1.0), g);
    auto const folded = fl::io::fold_output_scale(layer);
    CHECK(folded.gating().output_scale == 1.f);
    fl::Matrix<float> x({6, 48}), a({6, 48}), b({6, 48});
    std::mt19937 rng(5);
    fill(x, rng, 1.f);
    layer.forward(x.cview(), a.view());
    folded.forward(x.cview(), b.view());
    for (std::ptrdiff_t i = 0; i < a.size(); ++i) {
      if (scale == 2.f)
        REQUIRE(a.data()[i] == b.data()[i]);  // a power of two: exact
      else
        REQUIRE(a.data()[i] == Approx(b.data()[i]).margin(1e-5));
    }
  }
}

TEST_CASE("model files: recognized by content, factorized layers applied to their base", "[model][io]") {
  if (!fixture::have_shared_data({kModelPath})) return;
  namespace fs = std::filesystem;
  fs::path const dir = fs::temp_directory_path() / "factorllm_test_model_files";
  fs::create_directories(dir);
  CHECK(fl::io::detect_model_file(kModelPath) == fl::io::ModelFileKind::llama2c);
  LlamaModel const base = fl::io::load_model(kModelPath);
  CHECK(base.config.d_ff == 172);
  std::vector<fl::model::LlamaMoe> layers;
  for (auto const& l : base.layers)
    layers.emplace_back(fl::ffn::factorize(l.ffn.view(), fl::ffn::ExpertPartition::contiguous(172, 4)),
                        fl::moe::Router<float>::random(64, 4, 1), fl::moe::Gating{});
  std::string const path = (dir / "layers.safetensors").string();
  fl::io::save_factorized(path, layers);
  CHECK(fl::io::detect_model_file(path) == fl::io::ModelFileKind::factorized);
  CHECK_THROWS_WITH(fl::io::load_model(path), Catch::Contains("holds factorized MoE layers only"));
  LlamaModel const moe = fl::io::apply_factorized(base, path);
  REQUIRE(moe.has_moe());
  CHECK(moe.layers[3].moe->n_experts() == 4);
  // A file of another layer count is refused naming both.
  std::vector<fl::model::LlamaMoe> short_list(layers.begin(), layers.begin() + 2);
  fl::io::save_factorized(path, short_list);
  CHECK_THROWS_WITH(fl::io::apply_factorized(base, path), Catch::Contains("has 2 layers, the base model"));
  CHECK_THROWS_WITH(fl::io::detect_model_file((dir / "nothing.bin").string()), Catch::Contains("does not exist"));
  fs::remove_all(dir);
}
