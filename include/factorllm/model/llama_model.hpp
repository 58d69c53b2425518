// SPDX-License-Identifier: Apache-2.0
// The one in-memory Llama-family model (Llama, Mistral, Qwen2) that every reader fills, the reference engine runs,
// the conversion rewrites and every writer stores (docs/model.md).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "factorllm/backend/simd/cpu_simd.hpp"
#include "factorllm/core/error.hpp"
#include "factorllm/core/tensor.hpp"
#include "factorllm/core/tensor_view.hpp"
#include "factorllm/ffn/factorize.hpp"
#include "factorllm/moe/moe_ffn.hpp"

namespace factorllm {
namespace model {

/// Hyper-parameters of a Llama-family decoder (docs/model.md §1). Positive sizes once validated.
struct LlamaConfig {
  /// "llama", "mistral" or "qwen2": what the source called it. The math is the same; qwen2 adds q/k/v biases.
  std::string architecture = "llama";
  std::int64_t d_model = 0;
  std::int64_t d_ff = 0;  // hidden width of the dense SwiGLU FFN
  std::int64_t n_layers = 0;
  std::int64_t n_heads = 0;
  std::int64_t n_kv_heads = 0;  // grouped-query attention: n_heads / n_kv_heads query heads share a key/value head
  std::int64_t head_dim = 0;    // usually d_model / n_heads
  std::int64_t vocab_size = 0;
  std::int64_t context_length = 0;  // positions the engine allocates its KV cache for
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-5;
  bool tied_embeddings = true;  // the classifier is the token embedding

  std::int64_t q_dim() const noexcept { return n_heads * head_dim; }
  std::int64_t kv_dim() const noexcept { return n_kv_heads * head_dim; }

  /// \throws format_error naming `source` and the field unless every size is positive and consistent: n_heads a
  ///         multiple of n_kv_heads, head_dim even (RoPE rotates pairs), rope_theta > 1 and rms_norm_eps > 0 finite.
  void validate(std::string const& source) const {
    auto positive = [&](char const* name, std::int64_t v, std::int64_t hi) {
      if (v < 1 || v > hi)
        throw format_error(factorllm::detail::concat(source, ": ", name, " = ", v, " outside [1, ", hi, "]"));
    };
    constexpr std::int64_t kMaxDim = std::int64_t{1} << 20, kMaxCount = std::int64_t{1} << 24;
    positive("d_model", d_model, kMaxDim);
    positive("d_ff", d_ff, kMaxDim);
    positive("n_layers", n_layers, 4096);
    positive("n_heads", n_heads, kMaxDim);
    positive("n_kv_heads", n_kv_heads, n_heads);
    positive("head_dim", head_dim, kMaxDim);
    positive("vocab_size", vocab_size, kMaxCount);
    positive("context_length", context_length, kMaxCount);
    if (n_heads % n_kv_heads != 0)
      throw format_error(factorllm::detail::concat(source, ": n_heads = ", n_heads, " is not a multiple of n_kv_heads = ",
                                        n_kv_heads, " (grouped-query attention shares whole key/value heads)"));
    if (head_dim % 2 != 0)
      throw format_error(factorllm::detail::concat(source, ": head_dim = ", head_dim, " is odd (RoPE rotates pairs)"));
    if (!(rope_theta > 1.0) || !std::isfinite(rope_theta))
      throw format_error(factorllm::detail::concat(source, ": rope_theta = ", rope_theta, " must be finite and > 1"));
    if (!(rms_norm_eps > 0.0) || !std::isfinite(rms_norm_eps) || rms_norm_eps > 1.0)
      throw format_error(factorllm::detail::concat(source, ": rms_norm_eps = ", rms_norm_eps, " must be in (0, 1]"));
  }
};

/// The vocabulary a GGUF file needs (tokenizer.ggml.*). `model` is llama.cpp's tokenizer model name: "llama"
/// (sentencepiece, with scores) or "gpt2" (byte-level BPE, with merges).
struct LlamaVocab {
  std::string model = "llama";
  std::vector<std::string> tokens;
  std::vector<float> scores;         // empty or one per token
  std::vector<std::int32_t> types;   // empty or one per token (llama.cpp's token types)
  std::vector<std::string> merges;   // gpt2 only
  std::int64_t bos_id = -1, eos_id = -1, unk_id = -1;  // -1: none
  bool add_bos = true;
};

/// The MoE type a converted layer holds (float experts on the default CPU backend).
using LlamaMoe = moe::MoeFfn<float, DefaultCpu>;

/// One decoder layer. RoPE layout: q and k rows are stored with each head's rotated pairs adjacent (rows 2i, 2i+1
/// of a head form pair i), as llama2.c and llama.cpp's "llama" GGUF store them; Hugging Face's half-split layout
/// is converted on reading and writing (docs/model.md §2).
struct LlamaLayer {
  Vector<float> attn_norm;        // [d_model]
  Matrix<float> wq;               // [q_dim, d_model]
  Matrix<float> wk, wv;           // [kv_dim, d_model]
  Matrix<float> wo;               // [d_model, q_dim]
  Vector<float> bq, bk, bv;       // empty, or [q_dim] / [kv_dim] (qwen2)
  Vector<float> ffn_norm;         // [d_model]
  ffn::DenseFfn<float> ffn;       // gate/up [d_ff, d_model], down [d_model, d_ff]; empty when `moe` is set
  std::optional<LlamaMoe> moe;    // a converted layer: replaces the dense FFN
};

/// A whole Llama-family model in float. Movable, copyable; no views into it outlive a move of a layer's tensors.
struct LlamaModel {
  LlamaConfig config;
  Matrix<float> token_embedding;  // [vocab_size, d_model]
  std::vector<LlamaLayer> layers;
  Vector<float> final_norm;       // [d_model]
  Matrix<float> classifier;       // [vocab_size, d_model]; empty when config.tied_embeddings
  std::optional<LlamaVocab> vocab;
  /// Where the model came from ("llama2c 'path'", "hf 'dir'", "gguf 'path'"), for messages.
  std::string source;

  /// Returns the output classifier (the embedding when tied).
  MatrixView<float const> output() const noexcept {
    return config.tied_embeddings ? token_embedding.cview() : classifier.cview();
  }
  /// Returns true when at least one layer holds a MoE.
  bool has_moe() const noexcept {
    for (auto const& l : layers)
      if (l.moe) return true;
    return false;
  }

  /// Checks every tensor's shape against the config, and the config itself.
  /// \throws format_error naming the source, the tensor and both shapes.
  void validate() const {
    config.validate(source);
    auto const& c = config;
    auto check = [&](auto const& t, std::vector<std::ptrdiff_t> const& want, std::string const& name) {
      constexpr int rank = std::decay_t<decltype(t)>::kRank;
      bool ok = static_cast<std::size_t>(rank) == want.size();
      for (int i = 0; ok && i < rank; ++i) ok = t.extent(i) == want[static_cast<std::size_t>(i)];
      if (!ok) {
        std::string got, expected;
        for (int i = 0; i < rank; ++i) got += (i ? ", " : "") + std::to_string(t.extent(i));
        for (std::size_t i = 0; i < want.size(); ++i) expected += (i ? ", " : "") + std::to_string(want[i]);
        throw format_error(factorllm::detail::concat(source, ": tensor ", name, " has shape [", got, "], expected [",
                                          expected, "]"));
      }
    };
    std::ptrdiff_t const d = c.d_model, f = c.d_ff, q = c.q_dim(), kv = c.kv_dim(), v = c.vocab_size;
    check(token_embedding, {v, d}, "token_embedding");
    check(final_norm, {d}, "final_norm");
    if (!c.tied_embeddings) check(classifier, {v, d}, "classifier");
    if (static_cast<std::int64_t>(layers.size()) != c.n_layers)
      throw format_error(factorllm::detail::concat(source, ": ", layers.size(), " layers, the config says ", c.n_layers));
    for (std::size_t i = 0; i < layers.size(); ++i) {
      auto const& l = layers[i];
      std::string const p = factorllm::detail::concat("layers.", i, ".");
      check(l.attn_norm, {d}, p + "attn_norm");
      check(l.wq, {q, d}, p + "wq");
      check(l.wk, {kv, d}, p + "wk");
      check(l.wv, {kv, d}, p + "wv");
      check(l.wo, {d, q}, p + "wo");
      if (l.bq.size() != 0 || l.bk.size() != 0 || l.bv.size() != 0) {
        check(l.bq, {q}, p + "bq");
        check(l.bk, {kv}, p + "bk");
        check(l.bv, {kv}, p + "bv");
      }
      check(l.ffn_norm, {d}, p + "ffn_norm");
      if (l.moe) {
        if (l.moe->d_model() != d)
          throw format_error(factorllm::detail::concat(source, ": ", p, "moe has d_model ", l.moe->d_model(), ", expected ", d));
      } else {
        check(l.ffn.gate, {f, d}, p + "ffn.gate");
        check(l.ffn.up, {f, d}, p + "ffn.up");
        check(l.ffn.down, {d, f}, p + "ffn.down");
      }
    }
  }
};

}  // namespace model
}  // namespace factorllm
