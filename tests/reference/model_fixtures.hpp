// SPDX-License-Identifier: Apache-2.0
// Small random Llama-family models for the model/ and io/ tests.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <utility>

#include <factorllm/model/llama_model.hpp>

namespace fixture {

/// Sizes and options of a random model (defaults: grouped-query attention with 2 key/value heads for 4 query heads,
/// head_dim 16 != d_model / n_heads, rope_theta 500000, eps 1e-6).
struct RandomModelShape {
  std::int64_t d_model = 48, d_ff = 96, n_layers = 2, n_heads = 4, n_kv_heads = 2, head_dim = 16, vocab_size = 40,
               context_length = 32;
  bool tied = false;
  bool biases = false;  // q/k/v biases (architecture "qwen2")
};

/// A random model: matrices N(0, 0.15^2), norm weights 1 + N(0, 0.1^2), biases N(0, 0.3^2), embedding N(0, 1).
inline factorllm::model::LlamaModel random_llama_model(RandomModelShape const& s, std::uint32_t seed) {
  namespace fl = factorllm;
  std::mt19937 rng(seed);
  auto fill = [&](auto& t, float scale, float offset = 0.f) {
    std::normal_distribution<float> n(0.f, scale);
    for (std::ptrdiff_t i = 0; i < t.size(); ++i) t.data()[i] = offset + n(rng);
  };
  fl::model::LlamaModel m;
  auto& c = m.config;
  c.architecture = s.biases ? "qwen2" : "llama";
  c.d_model = s.d_model;
  c.d_ff = s.d_ff;
  c.n_layers = s.n_layers;
  c.n_heads = s.n_heads;
  c.n_kv_heads = s.n_kv_heads;
  c.head_dim = s.head_dim;
  c.vocab_size = s.vocab_size;
  c.context_length = s.context_length;
  c.rope_theta = 500000.0;
  c.rms_norm_eps = 1e-6;
  c.tied_embeddings = s.tied;
  m.source = "random model";
  std::ptrdiff_t const d = c.d_model, q = c.q_dim(), kv = c.kv_dim(), f = c.d_ff, v = c.vocab_size;
  m.token_embedding = fl::Matrix<float>({v, d});
  fill(m.token_embedding, 1.f);
  if (!s.tied) {
    m.classifier = fl::Matrix<float>({v, d});
    fill(m.classifier, 0.2f);
  }
  m.final_norm = fl::Vector<float>({d});
  fill(m.final_norm, 0.1f, 1.f);
  for (std::int64_t l = 0; l < c.n_layers; ++l) {
    fl::model::LlamaLayer L;
    L.attn_norm = fl::Vector<float>({d});
    L.ffn_norm = fl::Vector<float>({d});
    fill(L.attn_norm, 0.1f, 1.f);
    fill(L.ffn_norm, 0.1f, 1.f);
    L.wq = fl::Matrix<float>({q, d});
    L.wk = fl::Matrix<float>({kv, d});
    L.wv = fl::Matrix<float>({kv, d});
    L.wo = fl::Matrix<float>({d, q});
    for (auto* w : {&L.wq, &L.wk, &L.wv, &L.wo}) fill(*w, 0.15f);
    if (s.biases) {
      L.bq = fl::Vector<float>({q});
      L.bk = fl::Vector<float>({kv});
      L.bv = fl::Vector<float>({kv});
      for (auto* b : {&L.bq, &L.bk, &L.bv}) fill(*b, 0.3f);
    }
    L.ffn = fl::ffn::DenseFfn<float>{fl::Matrix<float>({f, d}), fl::Matrix<float>({f, d}), fl::Matrix<float>({d, f})};
    fill(L.ffn.gate, 0.15f);
    fill(L.ffn.up, 0.15f);
    fill(L.ffn.down, 0.15f);
    m.layers.push_back(std::move(L));
  }
  m.validate();
  return m;
}

}  // namespace fixture
