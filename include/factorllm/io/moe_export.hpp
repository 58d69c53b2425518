// SPDX-License-Identifier: Apache-2.0
// Checks shared by the model exports (io/mixtral_export.hpp, io/gguf_llama_export.hpp): which MoE layers the target's
// gating can express, and whether the layers fit the checkpoint they replace the FFNs of.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../moe/gating.hpp"
#include "../moe/moe_ffn.hpp"
#include "detail/bytes.hpp"
#include "../model/llama_model.hpp"

namespace factorllm {
namespace io {

/// Throws value_error, naming the layer and the reason, unless every layer's gating is what Mixtral and llama.cpp's
/// llama-architecture MoE compute: softmax over all N router logits, TopK, renormalize over the K selected
/// (softmax_topk_renorm, topk_softmax, or softmax_topk with K = N, where the K probabilities already sum to 1), with
/// a zero router bias, no (or a zero) selection bias and output_scale 1. `target` names the format in messages.
template <class T, class Backend>
void check_softmax_topk_renorm_expressible(std::vector<moe::MoeFfn<T, Backend> const*> const& layers,
                                           char const* target) {
  using moe::CombineMode;
  for (std::size_t l = 0; l < layers.size(); ++l) {
    auto const& g = layers[l]->gating();
    std::string const where = detail::concat(target, " export: layer ", l, ": ");
    bool const renorm = g.mode == CombineMode::softmax_topk_renorm || g.mode == CombineMode::topk_softmax ||
                        (g.mode == CombineMode::softmax_topk && g.top_k == layers[l]->n_experts());
    if (!renorm)
      throw value_error(detail::concat(where, "combine mode ", moe::to_string(g.mode), " (top_k ", g.top_k,
                                       ") cannot be expressed: ", target,
                                       " gating is softmax over all experts, TopK, then renormalize (use "
                                       "softmax_topk_renorm or topk_softmax)"));
    auto const bias = layers[l]->router().bias();
    for (std::ptrdiff_t e = 0; e < bias.extent(0); ++e)
      if (to_double(bias(e)) != 0.0)
        throw value_error(detail::concat(where, "router bias[", e, "] = ", to_double(bias(e)), " is not zero: ",
                                         target, " has no router bias tensor; train the router bias-free "
                                         "(train_bias = false)"));
    for (std::size_t e = 0; e < g.selection_bias.size(); ++e)
      if (g.selection_bias[e] != 0.f)
        throw value_error(detail::concat(where, "selection_bias[", e, "] = ", g.selection_bias[e],
                                         " cannot be expressed: ", target,
                                         " selects experts by the router logits alone"));
    if (g.output_scale != 1.f)
      throw value_error(detail::concat(where, "output_scale ", g.output_scale, " cannot be expressed: ", target,
                                       " combines with weights that sum to 1 (fold the scale into the down "
                                       "projections first: io::fold_output_scale)"));
  }
}

/// Throws value_error unless there is one layer per decoder layer of the model, each with the model's d_model and
/// d_ff (or a larger d_ff: experts padded with zero neurons by ffn::pad_experts, e.g. to whole q8_0 / q4_0 blocks,
/// compute the same function), and all with the same N and K (both formats store one expert count and one top-k
/// per model).
template <class T, class Backend>
void check_moe_layers_fit(model::LlamaConfig const& c, std::vector<moe::MoeFfn<T, Backend> const*> const& layers,
                          char const* function) {
  if (static_cast<std::int64_t>(layers.size()) != c.n_layers)
    throw value_error(detail::concat(function, ": ", layers.size(), " MoE layers for a checkpoint of ", c.n_layers,
                                     " layers"));
  for (std::size_t l = 0; l < layers.size(); ++l) {
    auto const& a = *layers[l];
    if (a.d_model() != c.d_model || a.experts().d_ff() < c.d_ff)
      throw value_error(detail::concat(function, ": layer ", l, " has d_model ", a.d_model(), " and d_ff ",
                                       a.experts().d_ff(), ", the checkpoint has dim ", c.d_model, " and hidden_dim ",
                                       c.d_ff, " (d_ff may exceed hidden_dim only by zero-neuron padding)"));
    if (a.n_experts() != layers[0]->n_experts() || a.top_k() != layers[0]->top_k())
      throw value_error(detail::concat(function, ": layer ", l, " has N = ", a.n_experts(), ", K = ", a.top_k(),
                                       " but layer 0 has N = ", layers[0]->n_experts(), ", K = ", layers[0]->top_k(),
                                       "; the format stores one N and one K for the whole model"));
  }
}

/// Returns the layer with its output scale folded into the expert down projections and set to 1: the same function
/// (every expert output is linear in W_down), in the form Mixtral and llama.cpp can express. Exact when the scale
/// is a power of two (the recipe's output_scale K = 2 or 1); otherwise each down weight is rounded once.
template <class Backend>
moe::MoeFfn<float, Backend> fold_output_scale(moe::MoeFfn<float, Backend> const& layer) {
  auto const& ex = layer.experts();
  float const s = layer.gating().output_scale;
  Tensor<float, 3> down(ex.down_tensor());
  for (std::ptrdiff_t i = 0; i < down.size(); ++i) down[i] *= s;
  moe::Gating g = layer.gating();
  g.output_scale = 1.0f;
  return moe::MoeFfn<float, Backend>(
      ffn::ExpertWeights<float>(Tensor<float, 3>(ex.gate_tensor()), Tensor<float, 3>(ex.up_tensor()), std::move(down),
                                ex.partition()),
      layer.router(), std::move(g));
}

/// Returns pointers to the layers of a vector (the exports take layers by pointer, so that a model's own layers and
/// a separate vector go through one path).
template <class T, class Backend>
std::vector<moe::MoeFfn<T, Backend> const*> layer_pointers(std::vector<moe::MoeFfn<T, Backend>> const& layers) {
  std::vector<moe::MoeFfn<T, Backend> const*> out;
  out.reserve(layers.size());
  for (auto const& l : layers) out.push_back(&l);
  return out;
}

/// Returns pointers to the MoE layers of a model: empty when no layer has one.
/// \throws value_error when some layers have a MoE and others do not (the exported formats store one expert count
///         for every layer).
inline std::vector<model::LlamaMoe const*> model_moe_layers(model::LlamaModel const& m, char const* function) {
  std::vector<model::LlamaMoe const*> out;
  for (auto const& l : m.layers)
    if (l.moe) out.push_back(&*l.moe);
  if (!out.empty() && out.size() != m.layers.size())
    throw value_error(detail::concat(function, ": ", out.size(), " of the model's ", m.layers.size(),
                                     " layers are MoE; the format needs all layers MoE or all dense"));
  return out;
}

}  // namespace io
}  // namespace factorllm
