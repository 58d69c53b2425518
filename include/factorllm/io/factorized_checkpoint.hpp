// SPDX-License-Identifier: Apache-2.0
// Factorized-model checkpoints: every layer's permutation, experts, router and gating in one safetensors file
// (save_factorized, load_factorized).
#pragma once

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <system_error>
#include <utility>
#include <type_traits>
#include <vector>

#include "../core/error.hpp"
#include "../ffn/factorize.hpp"
#include "../ffn/permutation.hpp"
#include "../moe/gating.hpp"
#include "../moe/moe_ffn.hpp"
#include "../moe/router.hpp"
#include "detail/bytes.hpp"
#include "safetensors.hpp"

namespace factorllm {
namespace io {

/// Value of the __metadata__ key "format" in factorized-model files.
inline constexpr char const* kFactorizedFormat = "factorllm.moe";
/// Value of the __metadata__ key "format_version" this reader understands.
inline constexpr char const* kFactorizedFormatVersion = "1";

/// Options of save_factorized / factorized_tensors.
struct FactorizedSaveOptions {
  /// Storage type of the expert tensors (F32, F16 or BF16); routers and selection biases are always F32, because
  /// rounding them can change which experts are chosen.
  SafetensorsDtype expert_dtype = SafetensorsDtype::f32;
  /// Extra __metadata__ entries (must not use the reserved keys "format", "format_version", "n_layers", "layers.*").
  std::map<std::string, std::string> metadata;
};

/// Returns the tensor name prefix of layer l in factorized-model files: "layers.{l}.ffn.".
inline std::string factorized_prefix(std::size_t l) { return "layers." + std::to_string(l) + ".ffn."; }

namespace detail {
/// Formats a float so that parsing it back gives the same bits (shortest round-trip form, locale independent).
inline std::string float_text(float v) {
  char buf[64];
  auto const r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}
}  // namespace detail

/// Builds the safetensors file of a factorized model, one MoE layer per decoder layer. Tensor names (prefix
/// layers.{l}.ffn.): permutation I32 [d_ff]; experts.gate [N, d_expert, d_model]; experts.up [same];
/// experts.down [N, d_model, d_expert]; router.weight F32 [N, d_model]; router.bias F32 [N];
/// gating.selection_bias F32 [N] (only when the gating has one). __metadata__: format, format_version, n_layers,
/// and per layer layers.{l}.n_experts, .top_k, .combine_mode, .output_scale, .sigmoid_renormalize.
/// The layers are given by pointer, so an engine that holds its layers elsewhere need not copy them.
/// \throws value_error for an empty layer list, a null layer, bad options or reserved metadata keys.
template <class T, class Backend>
SafetensorsWriter factorized_tensors(std::vector<moe::MoeFfn<T, Backend> const*> const& layers,
                                     FactorizedSaveOptions const& options = {}) {
  if (layers.empty()) throw value_error("factorized_tensors: no layers");
  for (std::size_t l = 0; l < layers.size(); ++l)
    if (layers[l] == nullptr) throw value_error(detail::concat("factorized_tensors: argument 'layers' entry ", l, " is null"));
  SafetensorsDtype const ed = options.expert_dtype;
  if (ed != SafetensorsDtype::f32 && ed != SafetensorsDtype::f16 && ed != SafetensorsDtype::bf16)
    throw value_error(detail::concat("factorized_tensors: expert_dtype ", to_string(ed), " is not F32, F16 or BF16"));
  SafetensorsWriter w;
  for (auto const& [key, value] : options.metadata) {
    if (key == "format" || key == "format_version" || key == "n_layers" || key.rfind("layers.", 0) == 0)
      throw value_error("factorized_tensors: metadata key '" + key + "' is reserved");
    w.set_metadata(key, value);
  }
  w.set_metadata("format", kFactorizedFormat);
  w.set_metadata("format_version", kFactorizedFormatVersion);
  w.set_metadata("n_layers", std::to_string(layers.size()));
  for (std::size_t l = 0; l < layers.size(); ++l) {
    auto const& layer = *layers[l];
    std::string const p = factorized_prefix(l), m = "layers." + std::to_string(l) + ".";
    auto const& ex = layer.experts();
    auto const& perm = ex.partition().permutation();
    std::vector<std::int64_t> const perm64(perm.begin(), perm.end());
    w.add_int(p + "permutation", SafetensorsDtype::i32, {static_cast<std::int64_t>(perm.size())}, perm64.data());
    w.add(p + "experts.gate", ed, ex.gate_tensor().cview());
    w.add(p + "experts.up", ed, ex.up_tensor().cview());
    w.add(p + "experts.down", ed, ex.down_tensor().cview());
    w.add(p + "router.weight", SafetensorsDtype::f32, layer.router().weight());
    w.add(p + "router.bias", SafetensorsDtype::f32, layer.router().bias());
    auto const& g = layer.gating();
    if (!g.selection_bias.empty())
      w.add(p + "gating.selection_bias", SafetensorsDtype::f32, {static_cast<std::int64_t>(g.selection_bias.size())},
            g.selection_bias.data());
    w.set_metadata(m + "n_experts", std::to_string(layer.n_experts()));
    w.set_metadata(m + "top_k", std::to_string(g.top_k));
    w.set_metadata(m + "combine_mode", moe::to_string(g.mode));
    w.set_metadata(m + "output_scale", detail::float_text(g.output_scale));
    w.set_metadata(m + "sigmoid_renormalize", g.sigmoid_renormalize ? "true" : "false");
  }
  return w;
}

/// factorized_tensors for layers held in one vector.
template <class T, class Backend>
SafetensorsWriter factorized_tensors(std::vector<moe::MoeFfn<T, Backend>> const& layers,
                                     FactorizedSaveOptions const& options = {}) {
  std::vector<moe::MoeFfn<T, Backend> const*> pointers;
  pointers.reserve(layers.size());
  for (auto const& layer : layers) pointers.push_back(&layer);
  return factorized_tensors(pointers, options);
}

/// Saves a factorized model (see factorized_tensors for the layout) to `path`; `layers` is a vector of layers or
/// of pointers to them.
/// \throws value_error as factorized_tensors; format_error when the file cannot be written.
template <class Layers>
void save_factorized(std::string const& path, Layers const& layers, FactorizedSaveOptions const& options = {}) {
  factorized_tensors(layers, options).save(path);
}

namespace detail {
/// Parses a decimal integer metadata value in [lo, hi], or throws format_error naming the key.
inline std::int64_t metadata_int(SafetensorsFile const& f, std::string const& key, std::int64_t lo, std::int64_t hi) {
  auto const it = f.metadata().find(key);
  if (it == f.metadata().end()) throw format_error(concat(f.source(), ": __metadata__ lacks '", key, "'"));
  std::string const& s = it->second;
  std::int64_t v = 0;
  auto const r = std::from_chars(s.data(), s.data() + s.size(), v);
  if (r.ec != std::errc() || r.ptr != s.data() + s.size() || v < lo || v > hi)
    throw format_error(concat(f.source(), ": __metadata__ '", key, "' is '", s, "', expected an integer in [", lo, ", ",
                              hi, "]"));
  return v;
}
inline std::string const& metadata_string(SafetensorsFile const& f, std::string const& key) {
  auto const it = f.metadata().find(key);
  if (it == f.metadata().end()) throw format_error(concat(f.source(), ": __metadata__ lacks '", key, "'"));
  return it->second;
}
}  // namespace detail

/// Rebuilds the MoE layers of a factorized-model file (written by save_factorized), with experts in weight format T:
/// float by default; bf16 or f16 keep a file saved in that format bit for bit (a float file is rounded to nearest
/// even). Every layer is fully validated (metadata, tensor names, shapes, dtypes, finiteness, permutation, gating)
/// before the next is read; the result is returned only once every layer is built, so a failure leaves nothing.
/// \throws format_error naming the file and the problem.
template <class Backend = DefaultCpu, class T = float>
std::vector<moe::MoeFfn<T, Backend>> load_factorized(SafetensorsFile const& f) {
  static_assert(std::is_same_v<activation_t<T>, float>, "load_factorized: experts must be f32, bf16 or f16");
  if (detail::metadata_string(f, "format") != kFactorizedFormat)
    throw format_error(detail::concat(f.source(), ": __metadata__ 'format' is '", detail::metadata_string(f, "format"),
                                      "', expected '", kFactorizedFormat, "'"));
  if (detail::metadata_string(f, "format_version") != kFactorizedFormatVersion)
    throw format_error(detail::concat(f.source(), ": format_version '", detail::metadata_string(f, "format_version"),
                                      "' is not supported (this reader knows ", kFactorizedFormatVersion, ")"));
  // Every layer has its own tensors, so the tensor count bounds n_layers before anything is reserved.
  auto const n_layers =
      detail::metadata_int(f, "n_layers", 1, std::max<std::int64_t>(1, static_cast<std::int64_t>(f.tensors().size())));
  std::vector<moe::MoeFfn<T, Backend>> layers;
  layers.reserve(static_cast<std::size_t>(n_layers));
  for (std::int64_t l = 0; l < n_layers; ++l) {
    std::string const p = factorized_prefix(static_cast<std::size_t>(l)), m = "layers." + std::to_string(l) + ".";
    auto const& perm_info = f.info(p + "permutation");
    if (perm_info.shape.size() != 1)
      throw format_error(detail::concat(f.source(), ": tensor '", p, "permutation' has shape ",
                                        detail::shape_text(perm_info.shape), ", expected [d_ff]"));
    std::int64_t const d_ff = perm_info.shape[0];
    std::int64_t const n = detail::metadata_int(f, m + "n_experts", 1, std::max<std::int64_t>(d_ff, 1));
    if (d_ff < 1 || d_ff % n != 0 || d_ff > std::numeric_limits<std::int32_t>::max())
      throw format_error(detail::concat(f.source(), ": layer ", l, " has d_ff ", d_ff, ", which ", n,
                                        " experts cannot split equally"));
    std::int64_t const k = detail::metadata_int(f, m + "top_k", 1, n);
    std::int64_t const d_expert = d_ff / n;
    auto const& gate_info = f.info(p + "experts.gate");
    if (gate_info.shape.size() != 3)
      throw format_error(detail::concat(f.source(), ": tensor '", p, "experts.gate' has shape ",
                                        detail::shape_text(gate_info.shape), ", expected [N, d_expert, d_model]"));
    std::int64_t const d = gate_info.shape[2];
    if (d < 1) throw format_error(detail::concat(f.source(), ": layer ", l, " has d_model ", d));
    try {
      std::vector<std::int64_t> const perm64 = f.to_int64(p + "permutation");
      std::vector<std::int32_t> perm(perm64.size());
      for (std::size_t i = 0; i < perm64.size(); ++i) {
        if (perm64[i] < 0 || perm64[i] >= d_ff)
          throw format_error(detail::concat(f.source(), ": tensor '", p, "permutation' entry ", i, " = ", perm64[i],
                                            " is outside [0, ", d_ff, ")"));
        perm[i] = static_cast<std::int32_t>(perm64[i]);
      }
      auto partition = ffn::ExpertPartition::from_permutation(std::move(perm), n);
      auto gate = f.read_float<3>(p + "experts.gate", {n, d_expert, d});
      auto up = f.read_float<3>(p + "experts.up", {n, d_expert, d});
      auto down = f.read_float<3>(p + "experts.down", {n, d, d_expert});
      auto rw = f.read_float<2>(p + "router.weight", {n, d});
      auto rb = f.read_float<1>(p + "router.bias", {n});
      // Every loaded parameter must be finite: one NaN weight or bias would silently turn every output NaN.
      auto require_finite = [&](auto const& tensor, char const* name) {
        for (std::ptrdiff_t i = 0; i < tensor.size(); ++i)
          if (!std::isfinite(tensor.data()[i]))
            throw format_error(detail::concat(f.source(), ": tensor '", p, name, "' element ", i, " is not finite"));
      };
      require_finite(gate, "experts.gate");
      require_finite(up, "experts.up");
      require_finite(down, "experts.down");
      require_finite(rw, "router.weight");
      require_finite(rb, "router.bias");
      moe::Gating g;
      g.mode = moe::combine_mode_from_string(detail::metadata_string(f, m + "combine_mode"));
      g.top_k = k;
      std::string const& sr = detail::metadata_string(f, m + "sigmoid_renormalize");
      if (sr != "true" && sr != "false")
        throw format_error(detail::concat(f.source(), ": __metadata__ '", m, "sigmoid_renormalize' is '", sr,
                                          "', expected true or false"));
      g.sigmoid_renormalize = sr == "true";
      std::string const& os = detail::metadata_string(f, m + "output_scale");
      auto const r = std::from_chars(os.data(), os.data() + os.size(), g.output_scale);
      if (r.ec != std::errc() || r.ptr != os.data() + os.size() || !std::isfinite(g.output_scale))
        throw format_error(detail::concat(f.source(), ": __metadata__ '", m, "output_scale' is '", os,
                                          "', expected a finite number"));
      if (f.find(p + "gating.selection_bias") != nullptr) {
        f.require_shape(p + "gating.selection_bias", {n});
        g.selection_bias = f.to_float(p + "gating.selection_bias");
      }
      ffn::ExpertWeights<float> experts(std::move(gate), std::move(up), std::move(down), std::move(partition));
      if constexpr (std::is_same_v<T, float>) {
        layers.emplace_back(std::move(experts), moe::Router<float>(std::move(rw), std::move(rb)), std::move(g));
      } else {
        layers.emplace_back(ffn::convert_format<T>(experts), moe::Router<float>(std::move(rw), std::move(rb)), std::move(g));
      }
    } catch (format_error const&) {
      throw;
    } catch (error const& e) {
      // A constructor refused what the file holds (a permutation that is not one, an unknown mode, a NaN bias):
      // for the caller that is a malformed file.
      throw format_error(detail::concat(f.source(), ": layer ", l, ": ", e.what()));
    }
  }
  return layers;
}

/// Loads a factorized-model file from disk (see the overload above). \throws format_error.
template <class Backend = DefaultCpu, class T = float>
std::vector<moe::MoeFfn<T, Backend>> load_factorized(std::string const& path) {
  return load_factorized<Backend, T>(SafetensorsFile::load(path));
}

}  // namespace io
}  // namespace factorllm
