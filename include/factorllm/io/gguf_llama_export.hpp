// SPDX-License-Identifier: Apache-2.0
// Export of a Llama-family model (model/llama_model.hpp, or a llama2.c checkpoint with its tokenizer), dense or
// factorized into a MoE, as a llama.cpp "llama"-architecture GGUF file with its tokenizer.
#pragma once

#include <cctype>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../moe/moe_ffn.hpp"
#include "detail/bytes.hpp"
#include "gguf.hpp"
#include "../model/llama_model.hpp"
#include "llama2c.hpp"
#include "moe_export.hpp"

namespace factorllm {
namespace io {

/// sentencepiece token types as llama.cpp stores them in tokenizer.ggml.token_type.
enum class GgufTokenType : std::int32_t { normal = 1, unknown = 2, control = 3, user_defined = 4, unused = 5, byte = 6 };

/// The vocabulary a GGUF export writes (tokenizer.ggml.*).
using GgufVocab = model::LlamaVocab;

/// Converts a llama2.c tokenizer to sentencepiece conventions: spaces become U+2581 "▁" (llama2.c's export had
/// replaced them), BOS/EOS ("\n<s>\n", "\n</s>\n" in llama2.c files) become the control tokens "<s>" / "</s>",
/// id 0 "<unk>" is the unknown token, "<0xHH>" pieces are byte tokens (type 6), everything else is normal.
/// Scores are kept (llama.cpp merges the highest-scoring pair first, as llama2.c does).
/// \throws value_error when two tokens end up with the same text (llama.cpp maps text to one id).
inline GgufVocab llama_vocab_from_llama2c(Llama2cTokenizer const& tok) {
  GgufVocab v;
  int const n = tok.vocab_size();
  std::map<std::string, int> seen;
  for (int id = 0; id < n; ++id) {
    std::string const& piece = tok.piece(id);
    std::string text;
    GgufTokenType type = GgufTokenType::normal;
    bool const is_byte = piece.size() == 6 && piece.compare(0, 3, "<0x") == 0 && piece[5] == '>' &&
                         std::isxdigit(static_cast<unsigned char>(piece[3])) &&
                         std::isxdigit(static_cast<unsigned char>(piece[4]));
    if (id == Llama2cTokenizer::kBos) {
      text = piece == "\n<s>\n" ? "<s>" : piece;
      type = GgufTokenType::control;
    } else if (id == Llama2cTokenizer::kEos) {
      text = piece == "\n</s>\n" ? "</s>" : piece;
      type = GgufTokenType::control;
    } else if (id == 0 && piece == "<unk>") {
      text = piece;
      type = GgufTokenType::unknown;
    } else if (is_byte) {
      text = piece;
      type = GgufTokenType::byte;
    } else {
      for (char const c : piece) {
        if (c == ' ') text += "\xE2\x96\x81";  // U+2581, sentencepiece's visible space
        else text += c;
      }
    }
    auto const [it, fresh] = seen.emplace(text, id);
    if (!fresh)
      throw value_error(detail::concat("llama_vocab_from_llama2c: tokens ", it->second, " and ", id,
                                       " both have the text '", text, "'"));
    v.tokens.push_back(std::move(text));
    v.scores.push_back(tok.score(id));
    v.types.push_back(static_cast<std::int32_t>(type));
  }
  v.model = "llama";
  v.bos_id = Llama2cTokenizer::kBos;
  v.eos_id = Llama2cTokenizer::kEos;
  v.unk_id = !v.types.empty() && v.types[0] == static_cast<std::int32_t>(GgufTokenType::unknown) ? 0 : -1;
  v.add_bos = true;
  return v;
}

/// Options of the GGUF export.
struct GgufExportOptions {
  /// Type of the 2-D and 3-D weights (F32, F16 or BF16). Norm weights and routers stay F32, as llama.cpp's own
  /// converter keeps them: rounding a router can change which experts are chosen.
  GgmlType weight_type = GgmlType::f32;
  /// Type of the expert tensors of a MoE export (ffn_gate_exps, ffn_up_exps, ffn_down_exps): F32, F16, BF16, Q8_0
  /// or Q4_0 (the block types quantize each row with ggml's reference rounding, core/quant.hpp, and need d_model and
  /// d_expert multiples of 32: ffn::pad_experts(experts, 32) pads d_expert with zero neurons, e.g. stories260K's
  /// 172 / 4 = 43 to 64, without changing what the layer computes). Every other tensor keeps weight_type (or F32). Unset: weight_type for experts in a
  /// plain format, the experts' own type for q8_0 / q4_0 experts (copied bit for bit). A dense export refuses it.
  std::optional<GgmlType> expert_type;
  /// general.name
  std::string name = "factorllm";
};

namespace detail {
/// llama.cpp's general.file_type (llama_ftype) of the type most weights have.
inline std::uint32_t llama_file_type(GgmlType t) noexcept {
  switch (t) {
    case GgmlType::f16: return 1;   // LLAMA_FTYPE_MOSTLY_F16
    case GgmlType::q4_0: return 2;  // LLAMA_FTYPE_MOSTLY_Q4_0
    case GgmlType::q8_0: return 7;  // LLAMA_FTYPE_MOSTLY_Q8_0
    case GgmlType::bf16: return 32; // LLAMA_FTYPE_MOSTLY_BF16
    default: return 0;              // LLAMA_FTYPE_ALL_F32
  }
}

template <class T, class Backend>
GgufWriter llama_gguf_impl(model::LlamaModel const& m, std::vector<moe::MoeFfn<T, Backend> const*> const& moe,
                           GgufExportOptions const& o) {
  m.validate();
  auto const& c = m.config;
  if (o.weight_type != GgmlType::f32 && o.weight_type != GgmlType::f16 && o.weight_type != GgmlType::bf16)
    throw value_error(concat("llama GGUF export: weight_type ", to_string(o.weight_type), " is not F32, F16 or BF16"));
  if (!m.vocab)
    throw value_error(concat("llama GGUF export: ", m.source, " has no vocabulary (GGUF files carry the tokenizer; "
                             "give one, e.g. the llama2.c tokenizer the checkpoint was trained with)"));
  model::LlamaVocab const& vocab = *m.vocab;
  if (static_cast<std::int64_t>(vocab.tokens.size()) != c.vocab_size)
    throw value_error(concat("llama GGUF export: the tokenizer has ", vocab.tokens.size(), " tokens, the checkpoint ",
                             c.vocab_size));
  if (c.architecture == "qwen2" || m.layers[0].bq.size() != 0)
    throw value_error(concat("llama GGUF export: ", m.source, " has q/k/v biases (", c.architecture,
                             "), which llama.cpp's llama architecture does not load"));
  bool const is_moe = !moe.empty();
  std::ptrdiff_t n_expert = 0, n_used = 0, d_ff = c.d_ff;
  if (!is_moe && o.expert_type.has_value())
    throw value_error(concat("llama GGUF export: expert_type ", to_string(*o.expert_type),
                             " is set but the export is dense (it has no expert tensors; weight_type sets the FFN's)"));
  GgmlType const et = o.expert_type.value_or(is_block_format_v<T> ? ggml_type_of<T>() : o.weight_type);
  if (et != GgmlType::f32 && et != GgmlType::f16 && et != GgmlType::bf16 && et != GgmlType::q8_0 && et != GgmlType::q4_0)
    throw value_error(concat("llama GGUF export: expert_type ", to_string(et), " is not F32, F16, BF16, Q8_0 or Q4_0"));
  if (is_moe) {
    check_moe_layers_fit(c, moe, "llama GGUF export");
    check_softmax_topk_renorm_expressible(moe, "GGUF (llama.cpp)");
    n_expert = moe[0]->n_experts();
    n_used = moe[0]->top_k();
    d_ff = moe[0]->d_expert();  // llama.cpp reads feed_forward_length as the PER-EXPERT size for MoE tensors
    std::int64_t const bw = ggml_block_weights(et);
    if (c.d_model % bw != 0 || d_ff % bw != 0)
      throw value_error(concat("llama GGUF export: expert_type ", to_string(et), " stores rows in ", bw,
                               "-weight blocks, so d_model and d_expert must be multiples of ", bw,
                               "; the layers have d_model ", c.d_model, " and d_expert ", d_ff,
                               " (ffn::pad_experts pads d_expert with zero neurons)"));
  }

  GgufWriter w;
  w.set_string("general.architecture", "llama");
  w.set_string("general.name", o.name);
  // The experts hold most weights of a MoE export; a dense one has weight_type throughout.
  w.set_u32("general.file_type", llama_file_type(is_moe ? et : o.weight_type));
  w.set_u32("llama.context_length", static_cast<std::uint32_t>(c.context_length));
  w.set_u32("llama.embedding_length", static_cast<std::uint32_t>(c.d_model));
  w.set_u32("llama.block_count", static_cast<std::uint32_t>(c.n_layers));
  w.set_u32("llama.feed_forward_length", static_cast<std::uint32_t>(d_ff));
  w.set_u32("llama.attention.head_count", static_cast<std::uint32_t>(c.n_heads));
  w.set_u32("llama.attention.head_count_kv", static_cast<std::uint32_t>(c.n_kv_heads));
  if (c.head_dim * c.n_heads != c.d_model) {
    w.set_u32("llama.attention.key_length", static_cast<std::uint32_t>(c.head_dim));
    w.set_u32("llama.attention.value_length", static_cast<std::uint32_t>(c.head_dim));
  }
  w.set_f32("llama.attention.layer_norm_rms_epsilon", static_cast<float>(c.rms_norm_eps));
  w.set_f32("llama.rope.freq_base", static_cast<float>(c.rope_theta));
  w.set_u32("llama.rope.dimension_count", static_cast<std::uint32_t>(c.head_dim));
  w.set_u32("llama.vocab_size", static_cast<std::uint32_t>(c.vocab_size));
  if (is_moe) {
    w.set_u32("llama.expert_count", static_cast<std::uint32_t>(n_expert));
    w.set_u32("llama.expert_used_count", static_cast<std::uint32_t>(n_used));
  }
  w.set_string("tokenizer.ggml.model", vocab.model);
  w.set_string_array("tokenizer.ggml.tokens", vocab.tokens);
  if (!vocab.scores.empty()) w.set_f32_array("tokenizer.ggml.scores", vocab.scores);
  if (!vocab.types.empty()) w.set_i32_array("tokenizer.ggml.token_type", vocab.types);
  if (!vocab.merges.empty()) w.set_string_array("tokenizer.ggml.merges", vocab.merges);
  if (vocab.bos_id >= 0) w.set_u32("tokenizer.ggml.bos_token_id", static_cast<std::uint32_t>(vocab.bos_id));
  if (vocab.eos_id >= 0) w.set_u32("tokenizer.ggml.eos_token_id", static_cast<std::uint32_t>(vocab.eos_id));
  if (vocab.unk_id >= 0) w.set_u32("tokenizer.ggml.unknown_token_id", static_cast<std::uint32_t>(vocab.unk_id));
  w.set_bool("tokenizer.ggml.add_bos_token", vocab.add_bos);
  w.set_bool("tokenizer.ggml.add_eos_token", false);

  GgmlType const wt = o.weight_type;
  // The model's q/k rows are in the adjacent-pairs RoPE layout (pairs (2j, 2j+1) of each head), which is ggml's
  // "normal" rope mode used by the llama architecture: no reordering (docs/model.md §2).
  w.add_tensor("token_embd.weight", wt, m.token_embedding.cview());
  for (std::size_t l = 0; l < m.layers.size(); ++l) {
    auto const& L = m.layers[l];
    std::string const p = "blk." + std::to_string(l) + ".";
    w.add_tensor(p + "attn_norm.weight", GgmlType::f32, L.attn_norm.cview());
    w.add_tensor(p + "attn_q.weight", wt, L.wq.cview());
    w.add_tensor(p + "attn_k.weight", wt, L.wk.cview());
    w.add_tensor(p + "attn_v.weight", wt, L.wv.cview());
    w.add_tensor(p + "attn_output.weight", wt, L.wo.cview());
    w.add_tensor(p + "ffn_norm.weight", GgmlType::f32, L.ffn_norm.cview());
    if (!is_moe) {
      w.add_tensor(p + "ffn_gate.weight", wt, L.ffn.gate.cview());
      w.add_tensor(p + "ffn_up.weight", wt, L.ffn.up.cview());
      w.add_tensor(p + "ffn_down.weight", wt, L.ffn.down.cview());
    } else {
      auto const& layer = *moe[l];
      // ExpertWeights is stacked expert-major, exactly llama.cpp's [n_expert][n_ff][n_embd] (ne = {n_embd, n_ff,
      // n_expert}) for gate/up and [n_expert][n_embd][n_ff] for down: the export is a copy.
      w.add_tensor(p + "ffn_gate_inp.weight", GgmlType::f32, layer.router().weight());  // [N, dim]: ne {dim, N}
      // Block types keep ggml's row layout: each row of ne[0] weights is ne[0] / 32 consecutive blocks.
      w.add_tensor(p + "ffn_gate_exps.weight", et, layer.experts().gate_tensor().cview());
      w.add_tensor(p + "ffn_up_exps.weight", et, layer.experts().up_tensor().cview());
      w.add_tensor(p + "ffn_down_exps.weight", et, layer.experts().down_tensor().cview());
    }
  }
  w.add_tensor("output_norm.weight", GgmlType::f32, m.final_norm.cview());
  // A tied classifier is left out: llama.cpp then uses token_embd as the output projection.
  if (!c.tied_embeddings) w.add_tensor("output.weight", wt, m.classifier.cview());
  return w;
}

/// A llama2.c checkpoint and its tokenizer as a LlamaModel with a vocabulary.
inline model::LlamaModel llama2c_model_with_vocab(Llama2cCheckpoint const& ckpt, Llama2cTokenizer const& tok) {
  if (tok.vocab_size() != ckpt.config().vocab_size)
    throw value_error(concat("llama GGUF export: the tokenizer has ", tok.vocab_size(), " tokens, the checkpoint ",
                             ckpt.config().vocab_size));
  model::LlamaModel m = model_from_llama2c(ckpt);
  m.vocab = llama_vocab_from_llama2c(tok);
  return m;
}
}  // namespace detail

/// Returns the GGUF file (as a writer, not yet serialized) of a model in llama.cpp's "llama" architecture:
/// hyper-parameters, the vocabulary and every weight; layers that hold a MoE (all or none) are written as
/// llama.cpp's MoE tensors (see llama_moe_gguf).
/// \throws value_error when the model has no vocabulary, q/k/v biases, a mix of dense and MoE layers, a MoE
///         llama.cpp cannot express, or options are invalid (expert_type set for a dense model).
inline GgufWriter llama_gguf(model::LlamaModel const& m, GgufExportOptions const& options = {}) {
  return detail::llama_gguf_impl(m, model_moe_layers(m, "llama GGUF export"), options);
}

/// Returns the GGUF file of a dense llama2.c model with its tokenizer (llama_vocab_from_llama2c).
/// \throws value_error when the tokenizer does not match the checkpoint or options are invalid (expert_type set).
inline GgufWriter llama_gguf(Llama2cCheckpoint const& ckpt, Llama2cTokenizer const& tok,
                             GgufExportOptions const& options = {}) {
  return llama_gguf(detail::llama2c_model_with_vocab(ckpt, tok), options);
}

/// Returns the GGUF file of a model whose FFNs are replaced by the MoE `layers` (one per decoder layer):
/// llama.expert_count N, llama.expert_used_count K, llama.feed_forward_length d_expert (per expert, as llama.cpp
/// reads it for MoE), and per layer ffn_gate_inp [N, dim], ffn_gate_exps / ffn_up_exps [N, d_expert, dim],
/// ffn_down_exps [N, dim, d_expert] (row-major shapes; ggml's ne lists them reversed), of options.expert_type
/// (T may be any weight format, q8_0 and q4_0 included).
/// \throws value_error when a layer's gating is not softmax -> TopK -> renormalize with a bias-free router, no
///         selection bias and output_scale 1 (llama.cpp's llama-architecture MoE computes exactly that and has no
///         router-bias tensor; fold_output_scale folds a scale into the experts), when N or K differ between
///         layers, when the layers do not fit the model, or when expert_type is a block type and d_model or d_expert
///         is not a multiple of 32 (ffn::pad_experts rounds d_expert up with zero neurons, which changes nothing the
///         layers compute; the layers' d_ff may then exceed the model's d_ff).
template <class T, class Backend>
GgufWriter llama_moe_gguf(model::LlamaModel const& m, std::vector<moe::MoeFfn<T, Backend>> const& layers,
                          GgufExportOptions const& options = {}) {
  if (layers.empty()) throw value_error("llama GGUF export: no MoE layers");
  return detail::llama_gguf_impl(m, layer_pointers(layers), options);
}

/// llama_moe_gguf for a llama2.c checkpoint and its tokenizer.
template <class T, class Backend>
GgufWriter llama_moe_gguf(Llama2cCheckpoint const& ckpt, Llama2cTokenizer const& tok,
                          std::vector<moe::MoeFfn<T, Backend>> const& layers, GgufExportOptions const& options = {}) {
  return llama_moe_gguf(detail::llama2c_model_with_vocab(ckpt, tok), layers, options);
}

/// Writes llama_gguf(...) to `path`. \throws value_error as llama_gguf; format_error when the file cannot be written.
inline void export_llama_gguf(std::string const& path, Llama2cCheckpoint const& ckpt, Llama2cTokenizer const& tok,
                              GgufExportOptions const& options = {}) {
  llama_gguf(ckpt, tok, options).save(path);
}

/// Writes llama_moe_gguf(...) to `path`. \throws value_error as llama_moe_gguf; format_error when it cannot write.
template <class T, class Backend>
void export_llama_gguf(std::string const& path, Llama2cCheckpoint const& ckpt, Llama2cTokenizer const& tok,
                       std::vector<moe::MoeFfn<T, Backend>> const& layers, GgufExportOptions const& options = {}) {
  llama_moe_gguf(ckpt, tok, layers, options).save(path);
}

}  // namespace io
}  // namespace factorllm
