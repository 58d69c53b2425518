// SPDX-License-Identifier: Apache-2.0
// Export of a Llama-family model whose FFNs are MoE layers as a Hugging Face MixtralForCausalLM checkpoint
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
#include "../model/llama_model.hpp"
#include "detail/rope_layout.hpp"
#include "hf_llama.hpp"
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
/// .w3.weight [d_expert, dim] (up); model.norm.weight; lm_head.weight only when the classifier is not tied.
/// \throws value_error when a layer's gating cannot be expressed (check_softmax_topk_renorm_expressible), the layers
///         do not fit the model, N, K differ between layers (check_moe_layers_fit), or the model has q/k/v biases.
template <class T, class Backend>
SafetensorsWriter mixtral_tensors(model::LlamaModel const& m, std::vector<moe::MoeFfn<T, Backend> const*> const& layers,
                                  MixtralExportOptions const& options = {}) {
  m.validate();
  check_moe_layers_fit(m.config, layers, "mixtral_tensors");
  check_softmax_topk_renorm_expressible(layers, "Mixtral");
  if (m.layers[0].bq.size() != 0)
    throw value_error(detail::concat("mixtral_tensors: ", m.source, " has q/k/v biases, which Mixtral does not have"));
  SafetensorsDtype const dt = options.dtype;
  if (dt != SafetensorsDtype::f32 && dt != SafetensorsDtype::f16 && dt != SafetensorsDtype::bf16)
    throw value_error(detail::concat("mixtral_tensors: dtype ", to_string(dt), " is not F32, F16 or BF16"));
  auto const& c = m.config;
  SafetensorsWriter w;
  w.set_metadata("format", "pt");  // transformers expects "pt" for PyTorch checkpoints
  w.add("model.embed_tokens.weight", dt, m.token_embedding.cview());
  for (std::size_t l = 0; l < m.layers.size(); ++l) {
    auto const& L = m.layers[l];
    std::string const p = "model.layers." + std::to_string(l) + ".";
    w.add(p + "input_layernorm.weight", dt, L.attn_norm.cview());
    std::vector<float> const q = detail::interleaved_to_half_split(L.wq.cview(), c.n_heads);
    std::vector<float> const k = detail::interleaved_to_half_split(L.wk.cview(), c.n_kv_heads);
    w.add(p + "self_attn.q_proj.weight", dt, {c.q_dim(), c.d_model}, q.data());
    w.add(p + "self_attn.k_proj.weight", dt, {c.kv_dim(), c.d_model}, k.data());
    w.add(p + "self_attn.v_proj.weight", dt, L.wv.cview());
    w.add(p + "self_attn.o_proj.weight", dt, L.wo.cview());
    w.add(p + "post_attention_layernorm.weight", dt, L.ffn_norm.cview());
    auto const& layer = *layers[l];
    w.add(p + "block_sparse_moe.gate.weight", dt, layer.router().weight());
    for (std::ptrdiff_t e = 0; e < layer.n_experts(); ++e) {
      std::string const ep = p + "block_sparse_moe.experts." + std::to_string(e) + ".";
      w.add(ep + "w1.weight", dt, layer.experts().gate(e));
      w.add(ep + "w2.weight", dt, layer.experts().down(e));
      w.add(ep + "w3.weight", dt, layer.experts().up(e));
    }
  }
  w.add("model.norm.weight", dt, m.final_norm.cview());
  if (!c.tied_embeddings) w.add("lm_head.weight", dt, m.classifier.cview());
  return w;
}

/// mixtral_tensors for a llama2.c checkpoint whose FFNs are replaced by `layers`.
template <class T, class Backend>
SafetensorsWriter mixtral_tensors(Llama2cCheckpoint const& ckpt, std::vector<moe::MoeFfn<T, Backend>> const& layers,
                                  MixtralExportOptions const& options = {}) {
  return mixtral_tensors(model_from_llama2c(ckpt), layer_pointers(layers), options);
}

/// Returns the config.json of the Mixtral export (HF MixtralConfig fields). \throws value_error as mixtral_tensors.
template <class T, class Backend>
nlohmann::json mixtral_config(model::LlamaModel const& m, std::vector<moe::MoeFfn<T, Backend> const*> const& layers,
                              MixtralExportOptions const& options = {}) {
  check_moe_layers_fit(m.config, layers, "mixtral_config");
  check_softmax_topk_renorm_expressible(layers, "Mixtral");
  // The Llama fields (sizes, RoPE, norms, dtype, bos/eos) as the HF writer spells them, then Mixtral's own. Copied
  // key by key rather than overwritten in place: replacing the array value of "architectures" leaked its old array
  // under clang's LeakSanitizer (nlohmann-json 3.11.2).
  nlohmann::json const llama = detail::hf_config_json(m, options.dtype, false);
  nlohmann::json j = nlohmann::json::object();
  for (auto it = llama.begin(); it != llama.end(); ++it)
    if (it.key() != "architectures" && it.key() != "attention_bias" && it.key() != "mlp_bias" &&
        it.key() != "use_sliding_window")
      j[it.key()] = it.value();
  j["architectures"] = nlohmann::json::array({"MixtralForCausalLM"});
  j["model_type"] = "mixtral";
  j["intermediate_size"] = layers[0]->d_expert();  // Mixtral's intermediate_size is per expert
  j["num_local_experts"] = layers[0]->n_experts();
  j["num_experts_per_tok"] = layers[0]->top_k();
  j["router_aux_loss_coef"] = 0.02;
  j["router_jitter_noise"] = 0.0;
  j["output_router_logits"] = false;
  j["sliding_window"] = nullptr;
  if (!j.contains("bos_token_id")) j["bos_token_id"] = Llama2cTokenizer::kBos;
  if (!j.contains("eos_token_id")) j["eos_token_id"] = Llama2cTokenizer::kEos;
  return j;
}

/// mixtral_config for a llama2.c checkpoint whose FFNs are replaced by `layers`.
template <class T, class Backend>
nlohmann::json mixtral_config(Llama2cCheckpoint const& ckpt, std::vector<moe::MoeFfn<T, Backend>> const& layers,
                              MixtralExportOptions const& options = {}) {
  return mixtral_config(model_from_llama2c(ckpt), layer_pointers(layers), options);
}

/// Writes `dir`/model.safetensors and `dir`/config.json (creating `dir`): the model with its FFNs replaced by
/// `layers` (one per decoder layer), in the layout transformers' MixtralForCausalLM loads.
/// \throws value_error as mixtral_tensors; format_error when the files cannot be written.
template <class T, class Backend>
void export_mixtral(std::string const& dir, model::LlamaModel const& m,
                    std::vector<moe::MoeFfn<T, Backend> const*> const& layers, MixtralExportOptions const& options = {}) {
  SafetensorsWriter const w = mixtral_tensors(m, layers, options);
  std::string const config = mixtral_config(m, layers, options).dump(2) + "\n";
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw format_error(detail::concat("export_mixtral: cannot create the folder '", dir, "': ", ec.message()));
  w.save((std::filesystem::path(dir) / "model.safetensors").string());
  detail::write_file_atomically((std::filesystem::path(dir) / "config.json").string(),
                                reinterpret_cast<unsigned char const*>(config.data()), config.size(), "config.json");
}

/// export_mixtral for a llama2.c checkpoint whose FFNs are replaced by `layers`.
template <class T, class Backend>
void export_mixtral(std::string const& dir, Llama2cCheckpoint const& ckpt,
                    std::vector<moe::MoeFfn<T, Backend>> const& layers, MixtralExportOptions const& options = {}) {
  export_mixtral(dir, model_from_llama2c(ckpt), layer_pointers(layers), options);
}

}  // namespace io
}  // namespace factorllm
