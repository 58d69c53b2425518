// SPDX-License-Identifier: Apache-2.0
// Reader of llama.cpp "llama"-architecture GGUF models (dense, or MoE with ffn_*_exps tensors) into the one
// in-memory model type (docs/formats.md "GGUF models in"). The file is untrusted: every key, size and tensor shape
// is checked before it is used.
#pragma once

#include <cstdint>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../ffn/factorize.hpp"
#include "../ffn/permutation.hpp"
#include "../model/llama_model.hpp"
#include "../moe/gating.hpp"
#include "../moe/router.hpp"
#include "gguf.hpp"

namespace factorllm {
namespace io {

namespace detail {
/// Reads a GGUF integer key that must lie in [lo, hi]; `fallback` when absent and `required` is false.
inline std::int64_t gguf_int(GgufFile const& f, std::string const& key, std::int64_t lo, std::int64_t hi,
                             bool required = true, std::int64_t fallback = 0) {
  if (f.find(key) == nullptr) {
    if (required) throw format_error(concat(f.source(), ": no key '", key, "' (a llama-architecture model needs it)"));
    return fallback;
  }
  std::int64_t const v = f.get_int(key);
  if (v < lo || v > hi) throw format_error(concat(f.source(), ": key '", key, "' = ", v, " outside [", lo, ", ", hi, "]"));
  return v;
}

/// Reads tensor `name` as float, checking its row-major shape against `want`.
template <int Rank>
Tensor<float, Rank> gguf_tensor(GgufFile const& f, std::string const& name, std::array<std::ptrdiff_t, Rank> want) {
  auto const& t = f.tensor(name);
  std::vector<std::int64_t> const shape = t.shape();
  bool ok = shape.size() == static_cast<std::size_t>(Rank);
  for (int i = 0; ok && i < Rank; ++i) ok = shape[static_cast<std::size_t>(i)] == want[static_cast<std::size_t>(i)];
  if (!ok) {
    std::string got, expected;
    for (std::size_t i = 0; i < shape.size(); ++i) got += (i ? ", " : "") + std::to_string(shape[i]);
    for (int i = 0; i < Rank; ++i) expected += (i ? ", " : "") + std::to_string(want[static_cast<std::size_t>(i)]);
    throw format_error(concat(f.source(), ": tensor '", name, "' has shape [", got, "], expected [", expected, "]"));
  }
  std::vector<float> const v = f.to_float(name);
  Tensor<float, Rank> out(want);
  std::copy(v.begin(), v.end(), out.data());
  return out;
}

/// Reads the tokenizer.ggml.* keys into a vocabulary of `vocab_size` tokens, or returns no vocabulary when the file
/// has no token list.
inline std::optional<model::LlamaVocab> gguf_vocab(GgufFile const& f, std::int64_t vocab_size) {
  GgufValue const* tokens = f.find("tokenizer.ggml.tokens");
  if (tokens == nullptr) return std::nullopt;
  if (tokens->type != GgufValueType::array || tokens->array_type != GgufValueType::string)
    throw format_error(concat(f.source(), ": key 'tokenizer.ggml.tokens' is not a string array"));
  model::LlamaVocab v;
  v.tokens = tokens->array_strings;
  if (static_cast<std::int64_t>(v.tokens.size()) != vocab_size)
    throw format_error(concat(f.source(), ": tokenizer.ggml.tokens has ", v.tokens.size(), " tokens, the model ",
                              vocab_size));
  if (f.find("tokenizer.ggml.model") != nullptr) v.model = f.get_string("tokenizer.ggml.model");
  if (GgufValue const* s = f.find("tokenizer.ggml.scores")) {
    std::vector<double> const d = s->floats();
    if (d.size() != v.tokens.size())
      throw format_error(concat(f.source(), ": tokenizer.ggml.scores has ", d.size(), " values for ",
                                v.tokens.size(), " tokens"));
    v.scores.assign(d.begin(), d.end());
  }
  if (GgufValue const* t = f.find("tokenizer.ggml.token_type")) {
    std::vector<std::int64_t> const d = t->ints();
    if (d.size() != v.tokens.size())
      throw format_error(concat(f.source(), ": tokenizer.ggml.token_type has ", d.size(), " values for ",
                                v.tokens.size(), " tokens"));
    for (std::int64_t x : d) {
      if (x < 0 || x > 6) throw format_error(concat(f.source(), ": tokenizer.ggml.token_type value ", x, " outside [0, 6]"));
      v.types.push_back(static_cast<std::int32_t>(x));
    }
  }
  if (GgufValue const* m = f.find("tokenizer.ggml.merges")) {
    if (m->type != GgufValueType::array || m->array_type != GgufValueType::string)
      throw format_error(concat(f.source(), ": key 'tokenizer.ggml.merges' is not a string array"));
    v.merges = m->array_strings;
  }
  v.bos_id = gguf_int(f, "tokenizer.ggml.bos_token_id", 0, vocab_size - 1, false, -1);
  v.eos_id = gguf_int(f, "tokenizer.ggml.eos_token_id", 0, vocab_size - 1, false, -1);
  v.unk_id = gguf_int(f, "tokenizer.ggml.unknown_token_id", 0, vocab_size - 1, false, -1);
  if (GgufValue const* b = f.find("tokenizer.ggml.add_bos_token")) {
    if (b->type != GgufValueType::boolean)
      throw format_error(concat(f.source(), ": key 'tokenizer.ggml.add_bos_token' is not a bool"));
    v.add_bos = b->u != 0;
  }
  return v;
}
}  // namespace detail

/// Builds a LlamaModel from a GGUF file of llama.cpp's "llama" architecture: F32, F16, BF16, Q8_0 or Q4_0 tensors
/// (dequantized to float exactly), grouped-query attention, tied or separate output, and MoE layers when
/// llama.expert_count is set (ffn_gate_inp, ffn_{gate,up,down}_exps: experts in file order, a contiguous partition,
/// softmax -> TopK -> renormalize gating with K = llama.expert_used_count and a zero router bias, which is what
/// llama.cpp computes). RoPE rows are already in the model's adjacent-pairs layout. The vocabulary is read when the
/// file has one.
/// \throws format_error naming the file and the key or tensor when: the architecture is not "llama"; a required key
///         is missing or out of range; rope scaling is set; a tensor is missing, has another shape or an integer
///         type; a tensor is present that the architecture does not use; the vocabulary disagrees with the model.
inline model::LlamaModel read_gguf_llama(GgufFile const& f) {
  std::string const& arch = f.get_string("general.architecture");
  if (arch != "llama")
    throw format_error(detail::concat(f.source(), ": general.architecture is '", arch,
                                      "'; the reader takes llama-architecture models"));
  if (f.find("llama.rope.scaling.type") != nullptr && f.get_string("llama.rope.scaling.type") != "none")
    throw format_error(detail::concat(f.source(), ": llama.rope.scaling.type '", f.get_string("llama.rope.scaling.type"),
                                      "' is not supported (the engine implements plain RoPE)"));
  constexpr std::int64_t kMaxDim = std::int64_t{1} << 20;
  model::LlamaModel m;
  m.source = f.source();
  auto& c = m.config;
  c.architecture = "llama";
  c.d_model = detail::gguf_int(f, "llama.embedding_length", 1, kMaxDim);
  c.n_layers = detail::gguf_int(f, "llama.block_count", 1, 4096);
  c.n_heads = detail::gguf_int(f, "llama.attention.head_count", 1, kMaxDim);
  c.n_kv_heads = detail::gguf_int(f, "llama.attention.head_count_kv", 1, c.n_heads, false, c.n_heads);
  c.head_dim = detail::gguf_int(f, "llama.attention.key_length", 1, kMaxDim, false, c.d_model / c.n_heads);
  if (f.find("llama.attention.value_length") != nullptr &&
      detail::gguf_int(f, "llama.attention.value_length", 1, kMaxDim) != c.head_dim)
    throw format_error(detail::concat(f.source(), ": llama.attention.value_length differs from key_length ", c.head_dim));
  if (f.find("llama.rope.dimension_count") != nullptr &&
      detail::gguf_int(f, "llama.rope.dimension_count", 1, kMaxDim) != c.head_dim)
    throw format_error(detail::concat(f.source(), ": llama.rope.dimension_count = ",
                                      f.get_int("llama.rope.dimension_count"), " is not the head size ", c.head_dim,
                                      " (partial RoPE is not supported)"));
  c.context_length = detail::gguf_int(f, "llama.context_length", 1, std::int64_t{1} << 24);
  c.rms_norm_eps = f.get_float("llama.attention.layer_norm_rms_epsilon");
  c.rope_theta = f.find("llama.rope.freq_base") != nullptr ? f.get_float("llama.rope.freq_base") : 10000.0;
  std::int64_t const n_expert = detail::gguf_int(f, "llama.expert_count", 0, 4096, false, 0);
  std::int64_t const n_used = n_expert > 0 ? detail::gguf_int(f, "llama.expert_used_count", 1, n_expert) : 0;
  std::int64_t const ff = detail::gguf_int(f, "llama.feed_forward_length", 1, kMaxDim);
  c.d_ff = n_expert > 0 ? ff * n_expert : ff;  // llama.cpp stores the per-expert width for MoE models
  auto const& emb = f.tensor("token_embd.weight");
  std::vector<std::int64_t> const emb_shape = emb.shape();
  c.vocab_size = f.find("llama.vocab_size") != nullptr ? detail::gguf_int(f, "llama.vocab_size", 1, std::int64_t{1} << 24)
                 : emb_shape.size() == 2 ? emb_shape[0]
                                         : 0;
  c.tied_embeddings = f.find_tensor("output.weight") == nullptr;
  c.validate(f.source());

  std::ptrdiff_t const d = c.d_model, q = c.q_dim(), kv = c.kv_dim(), v = c.vocab_size;
  std::set<std::string> used;
  auto take = [&](std::string const& name, auto... extents) {
    used.insert(name);
    return detail::gguf_tensor<sizeof...(extents)>(f, name, {static_cast<std::ptrdiff_t>(extents)...});
  };
  m.token_embedding = take("token_embd.weight", v, d);
  for (std::int64_t l = 0; l < c.n_layers; ++l) {
    std::string const p = "blk." + std::to_string(l) + ".";
    model::LlamaLayer L;
    L.attn_norm = take(p + "attn_norm.weight", d);
    L.wq = take(p + "attn_q.weight", q, d);
    L.wk = take(p + "attn_k.weight", kv, d);
    L.wv = take(p + "attn_v.weight", kv, d);
    L.wo = take(p + "attn_output.weight", d, q);
    L.ffn_norm = take(p + "ffn_norm.weight", d);
    if (n_expert == 0) {
      L.ffn.gate = take(p + "ffn_gate.weight", ff, d);
      L.ffn.up = take(p + "ffn_up.weight", ff, d);
      L.ffn.down = take(p + "ffn_down.weight", d, ff);
    } else {
      Matrix<float> router = take(p + "ffn_gate_inp.weight", n_expert, d);
      Tensor<float, 3> gate = take(p + "ffn_gate_exps.weight", n_expert, ff, d);
      Tensor<float, 3> up = take(p + "ffn_up_exps.weight", n_expert, ff, d);
      Tensor<float, 3> down = take(p + "ffn_down_exps.weight", n_expert, d, ff);
      moe::Gating g;
      g.mode = moe::CombineMode::softmax_topk_renorm;
      g.top_k = n_used;
      L.moe.emplace(ffn::ExpertWeights<float>(std::move(gate), std::move(up), std::move(down),
                                              ffn::ExpertPartition::contiguous(n_expert * ff, n_expert)),
                    moe::Router<float>(std::move(router), Vector<float>({n_expert})), g);
    }
    m.layers.push_back(std::move(L));
  }
  m.final_norm = take("output_norm.weight", d);
  if (!c.tied_embeddings) m.classifier = take("output.weight", v, d);
  for (auto const& t : f.tensors())
    if (used.count(t.name) == 0)
      throw format_error(detail::concat(f.source(), ": tensor '", t.name,
                                        "' is not part of a llama-architecture model the reader understands"));
  m.vocab = detail::gguf_vocab(f, v);
  m.validate();
  return m;
}

/// Loads a GGUF file from disk and reads it with read_gguf_llama. \throws format_error.
inline model::LlamaModel read_gguf_llama(std::string const& path) { return read_gguf_llama(GgufFile::load(path)); }

}  // namespace io
}  // namespace factorllm
