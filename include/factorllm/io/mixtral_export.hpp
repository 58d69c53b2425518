// SPDX-License-Identifier: Apache-2.0
// Export of a llama2.c model whose FFNs are MoE layers as a Hugging Face MixtralForCausalLM checkpoint
// (model.safetensors and config.json).
#pragma once

#include <algorithm>
#include <cstddef>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/error.hpp"
#include "../core/tensor_view.hpp"
#include "../moe/moe_ffn.hpp"
#include "detail/bytes.hpp"
#include "detail/file.hpp"
#include "detail/rope_layout.hpp"
#include "llama2c.hpp"
#include "moe_export.hpp"
#include "safetensors.hpp"

namespace factorllm {
namespace io {

/// Options of the Mixtral export.
struct MixtralExportOptions {
  /// Storage type of every tensor (F32, F16 or BF16); config.json's torch_dtype says the same.
  SafetensorsDtype dtype = SafetensorsDtype::f32;
};

/// Builds the tensors of a Hugging Face MixtralForCausalLM checkpoint: model.embed_tokens.weight, per layer
/// model.layers.{i}.input_layernorm.weight, self_attn.{q,k,v,o}_proj.weight (q and k rows reordered to HF's
/// half-split RoPE layout), post_attention_layernorm.weight, block_sparse_moe.gate.weight [N, dim],
/// block_sparse_moe.experts.{e}.w1.weight [d_expert, dim] (gate), .w2.weight [dim, d_expert] (down),
/// .w3.weight [d_expert, dim] (up); model.norm.weight; lm_head.weight only when the classifier is not shared.
/// \throws value_error when a layer's gating cannot be expressed (check_softmax_topk_renorm_expressible), the layers
///         do not fit the checkpoint, or N, K differ between layers (check_moe_layers_fit).
template <class T, class Backend>
SafetensorsWriter mixtral_tensors(Llama2cCheckpoint const& ckpt, std::vector<moe::MoeFfn<T, Backend>> const& layers,
                                  MixtralExportOptions const& options = {}) {
  check_moe_layers_fit(ckpt, layers, "mixtral_tensors");
  check_softmax_topk_renorm_expressible(layers, "Mixtral");
  SafetensorsDtype const dt = options.dtype;
  if (dt != SafetensorsDtype::f32 && dt != SafetensorsDtype::f16 && dt != SafetensorsDtype::bf16)
    throw value_error(detail::concat("mixtral_tensors: dtype ", to_string(dt), " is not F32, F16 or BF16"));
  auto const& c = ckpt.config();
  SafetensorsWriter w;
  w.set_metadata("format", "pt");  // transformers expects "pt" for PyTorch checkpoints
  w.add("model.embed_tokens.weight", dt, ckpt.token_embedding());
  for (int l = 0; l < c.n_layers; ++l) {
    std::string const p = "model.layers." + std::to_string(l) + ".";
    w.add(p + "input_layernorm.weight", dt, ckpt.rms_att(l));
    std::vector<float> const q = detail::interleaved_to_half_split(ckpt.wq(l), c.n_heads);
    std::vector<float> const k = detail::interleaved_to_half_split(ckpt.wk(l), c.n_kv_heads);
    w.add(p + "self_attn.q_proj.weight", dt, {c.dim, c.dim}, q.data());
    w.add(p + "self_attn.k_proj.weight", dt, {ckpt.config().kv_dim(), c.dim}, k.data());
    w.add(p + "self_attn.v_proj.weight", dt, ckpt.wv(l));
    w.add(p + "self_attn.o_proj.weight", dt, ckpt.wo(l));
    w.add(p + "post_attention_layernorm.weight", dt, ckpt.rms_ffn(l));
    auto const& layer = layers[static_cast<std::size_t>(l)];
    w.add(p + "block_sparse_moe.gate.weight", dt, layer.router().weight());
    for (std::ptrdiff_t e = 0; e < layer.n_experts(); ++e) {
      std::string const ep = p + "block_sparse_moe.experts." + std::to_string(e) + ".";
      w.add(ep + "w1.weight", dt, layer.experts().gate(e));
      w.add(ep + "w2.weight", dt, layer.experts().down(e));
      w.add(ep + "w3.weight", dt, layer.experts().up(e));
    }
  }
  w.add("model.norm.weight", dt, ckpt.rms_final());
  if (!c.shared_classifier) w.add("lm_head.weight", dt, ckpt.classifier());
  return w;
}

/// Returns the config.json of the Mixtral export (HF MixtralConfig fields). \throws value_error as mixtral_tensors.
template <class T, class Backend>
nlohmann::json mixtral_config(Llama2cCheckpoint const& ckpt, std::vector<moe::MoeFfn<T, Backend>> const& layers,
                              MixtralExportOptions const& options = {}) {
  check_moe_layers_fit(ckpt, layers, "mixtral_config");
  check_softmax_topk_renorm_expressible(layers, "Mixtral");
  auto const& c = ckpt.config();
  char const* const torch_dtype = options.dtype == SafetensorsDtype::f16    ? "float16"
                                  : options.dtype == SafetensorsDtype::bf16 ? "bfloat16"
                                                                            : "float32";
  return nlohmann::json{
      {"architectures", {"MixtralForCausalLM"}},
      {"model_type", "mixtral"},
      {"hidden_size", c.dim},
      {"intermediate_size", layers[0].d_expert()},  // Mixtral's intermediate_size is per expert
      {"num_hidden_layers", c.n_layers},
      {"num_attention_heads", c.n_heads},
      {"num_key_value_heads", c.n_kv_heads},
      {"head_dim", c.head_size()},
      {"hidden_act", "silu"},
      {"max_position_embeddings", c.seq_len},
      {"rms_norm_eps", 1e-5},
      {"rope_theta", 10000.0},
      {"num_local_experts", layers[0].n_experts()},
      {"num_experts_per_tok", layers[0].top_k()},
      {"router_aux_loss_coef", 0.02},
      {"router_jitter_noise", 0.0},
      {"output_router_logits", false},
      {"vocab_size", c.vocab_size},
      {"tie_word_embeddings", c.shared_classifier},
      {"bos_token_id", Llama2cTokenizer::kBos},
      {"eos_token_id", Llama2cTokenizer::kEos},
      {"sliding_window", nullptr},
      {"attention_dropout", 0.0},
      {"initializer_range", 0.02},
      {"use_cache", true},
      {"torch_dtype", torch_dtype},
  };
}

/// Writes `dir`/model.safetensors and `dir`/config.json (creating `dir`): a llama2.c checkpoint whose FFNs are
/// replaced by `layers`, in the layout transformers' MixtralForCausalLM loads.
/// \throws value_error as mixtral_tensors; format_error when the files cannot be written.
template <class T, class Backend>
void export_mixtral(std::string const& dir, Llama2cCheckpoint const& ckpt,
                    std::vector<moe::MoeFfn<T, Backend>> const& layers, MixtralExportOptions const& options = {}) {
  SafetensorsWriter const w = mixtral_tensors(ckpt, layers, options);
  std::string const config = mixtral_config(ckpt, layers, options).dump(2) + "\n";
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw format_error(detail::concat("export_mixtral: cannot create the folder '", dir, "': ", ec.message()));
  w.save((std::filesystem::path(dir) / "model.safetensors").string());
  detail::write_file_atomically((std::filesystem::path(dir) / "config.json").string(),
                                reinterpret_cast<unsigned char const*>(config.data()), config.size(), "config.json");
}

}  // namespace io
}  // namespace factorllm
