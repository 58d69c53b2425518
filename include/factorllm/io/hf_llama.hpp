// SPDX-License-Identifier: Apache-2.0
// Hugging Face Llama-family checkpoints (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM) read into and
// written from model::LlamaModel: config.json plus model.safetensors or sharded model-*.safetensors with
// model.safetensors.index.json (untrusted input on reading).
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/error.hpp"
#include "../model/llama_model.hpp"
#include "detail/bytes.hpp"
#include "detail/file.hpp"
#include "detail/rope_layout.hpp"
#include "safetensors.hpp"

namespace factorllm {
namespace io {

/// Options of write_hf_llama.
struct HfWriteOptions {
  /// Storage type of every tensor: F32, F16 or BF16 (round to nearest even); config.json's torch_dtype says the same.
  SafetensorsDtype dtype = SafetensorsDtype::f32;
  /// 0: one model.safetensors. Otherwise tensors go, in order, into model-0000i-of-0000n.safetensors files of at
  /// most this many data bytes each (a single larger tensor gets a file of its own), listed by
  /// model.safetensors.index.json, as transformers' save_pretrained(max_shard_size=...) does.
  std::uint64_t max_shard_bytes = 0;
};

namespace detail {

/// What config.json says beyond model::LlamaConfig: whether q/k/v carry biases.
struct HfConfig {
  model::LlamaConfig config;
  bool qkv_bias = false;
};

/// Deepest JSON nesting accepted in config.json and the shard index; real files nest 3 or 4 levels.
constexpr int kMaxHfJsonDepth = 64;

/// Parses JSON text from an untrusted file: nesting checked first (no deep recursion), any parse error becomes a
/// format_error naming `source`.
inline nlohmann::json parse_hf_json(std::string const& text, std::string const& source) {
  auto const* p = reinterpret_cast<unsigned char const*>(text.data());
  int const depth = json_nesting_depth(p, text.size());
  if (depth > kMaxHfJsonDepth)
    throw format_error(concat(source, ": JSON nests ", depth, " levels deep, more than ", kMaxHfJsonDepth));
  try {
    return nlohmann::json::parse(text);
  } catch (nlohmann::json::exception const& e) {
    throw format_error(concat(source, ": not valid JSON: ", e.what()));
  }
}

/// Maps HF "architectures"[0] to LlamaConfig::architecture; empty for an unsupported one.
inline std::string hf_architecture_name(std::string const& hf) {
  if (hf == "LlamaForCausalLM") return "llama";
  if (hf == "MistralForCausalLM") return "mistral";
  if (hf == "Qwen2ForCausalLM") return "qwen2";
  return "";
}

/// Parses config.json (see parse_hf_config) and also returns whether q/k/v have biases.
inline HfConfig parse_hf_config_full(std::string const& json_text, std::string const& source) {
  nlohmann::json const j = parse_hf_json(json_text, source);
  if (!j.is_object()) throw format_error(concat(source, ": config is not a JSON object"));
  auto field = [&](char const* name) -> nlohmann::json const* {
    auto const it = j.find(name);
    return it == j.end() || it->is_null() ? nullptr : &*it;
  };
  auto fail = [&](char const* name, nlohmann::json const& v, char const* expected) {
    throw format_error(concat(source, ": field '", name, "' = ", v.dump(), ", expected ", expected));
  };
  auto integer = [&](char const* name, std::int64_t fallback, bool required) -> std::int64_t {
    nlohmann::json const* v = field(name);
    if (v == nullptr) {
      if (required) throw format_error(concat(source, ": field '", name, "' is missing"));
      return fallback;
    }
    if (v->is_number_unsigned()) {
      if (v->get<std::uint64_t>() > (std::uint64_t{1} << 62)) fail(name, *v, "an integer below 2^62");
      return static_cast<std::int64_t>(v->get<std::uint64_t>());
    }
    if (!v->is_number_integer()) fail(name, *v, "an integer");
    return v->get<std::int64_t>();  // negative: LlamaConfig::validate names it
  };
  auto real = [&](char const* name, double fallback) -> double {
    nlohmann::json const* v = field(name);
    if (v == nullptr) return fallback;
    if (!v->is_number()) fail(name, *v, "a number");
    return v->get<double>();
  };
  auto boolean = [&](char const* name, bool fallback) -> bool {
    nlohmann::json const* v = field(name);
    if (v == nullptr) return fallback;
    if (!v->is_boolean()) fail(name, *v, "true or false");
    return v->get<bool>();
  };

  nlohmann::json const* archs = field("architectures");
  if (archs == nullptr) throw format_error(concat(source, ": field 'architectures' is missing"));
  if (!archs->is_array() || archs->empty() || !(*archs)[0].is_string())
    fail("architectures", *archs, "a list of class names");
  HfConfig out;
  model::LlamaConfig& c = out.config;
  c.architecture = hf_architecture_name((*archs)[0].get<std::string>());
  if (c.architecture.empty())
    fail("architectures", *archs, "LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM");
  if (nlohmann::json const* rs = field("rope_scaling"))
    throw format_error(concat(source, ": field 'rope_scaling' = ", rs->dump(),
                              ": rope_scaling is not supported (only plain RoPE; rope_scaling must be null)"));
  if (nlohmann::json const* act = field("hidden_act"); act != nullptr && !(act->is_string() && *act == "silu"))
    fail("hidden_act", *act, "\"silu\"");
  if (boolean("mlp_bias", false))
    throw format_error(concat(source, ": field 'mlp_bias' = true: MLP biases are not supported"));
  bool const qwen2 = c.architecture == "qwen2";
  if (qwen2 && boolean("use_sliding_window", false))
    throw format_error(concat(source, ": field 'use_sliding_window' = true: sliding-window attention is not "
                                      "supported"));
  // Llama's attention_bias adds biases to q, k, v and o; model::LlamaModel has no o bias (the reader names the
  // o_proj.bias tensor when it finds one). Qwen2 always has q/k/v biases and never an o bias.
  out.qkv_bias = qwen2 || boolean("attention_bias", false);

  c.d_model = integer("hidden_size", 0, true);
  c.d_ff = integer("intermediate_size", 0, true);
  c.n_layers = integer("num_hidden_layers", 0, true);
  c.n_heads = integer("num_attention_heads", 0, true);
  c.n_kv_heads = integer("num_key_value_heads", c.n_heads, false);
  if (c.n_heads < 1) throw format_error(concat(source, ": field 'num_attention_heads' = ", c.n_heads, " < 1"));
  c.head_dim = integer("head_dim", c.d_model / c.n_heads, false);
  c.vocab_size = integer("vocab_size", 0, true);
  // transformers' defaults when the field is absent: Llama 2048, Mistral 4096 * 32, Qwen2 32768.
  std::int64_t const default_context = c.architecture == "llama" ? 2048 : qwen2 ? 32768 : 4096 * 32;
  c.context_length = integer("max_position_embeddings", default_context, false);
  c.rope_theta = real("rope_theta", 10000.0);
  c.rms_norm_eps = real("rms_norm_eps", 1e-6);  // the default of all three transformers configs
  c.tied_embeddings = boolean("tie_word_embeddings", false);
  c.validate(source);
  return out;
}

/// Throws format_error unless `name` (from a shard index) is a plain file name: no folder part, no "..".
inline void check_shard_name(std::string const& name, std::string const& source) {
  if (name.empty() || name.find('/') != std::string::npos || name.find('\\') != std::string::npos ||
      name.find("..") != std::string::npos || name == "." || name.find('\0') != std::string::npos)
    throw format_error(concat(source, ": shard name '", name, "' is not a plain file name inside the folder"));
}

/// Where a tensor the reader expects goes: its shape, how to allocate its destination (only once the file shows a
/// tensor of that shape, so a hostile config.json cannot make the reader allocate more than the files hold), and
/// whether its rows are RoPE-reordered.
struct HfSlot {
  std::vector<std::int64_t> shape;
  std::function<float*()> allocate;
  std::ptrdiff_t rope_heads = 0;  // > 0: half-split -> adjacent with this many heads
  bool done = false;
};

inline std::string read_text_file(std::string const& path, char const* what) {
  std::vector<unsigned char> const bytes = read_whole_file(path, what);
  return std::string(bytes.begin(), bytes.end());
}

/// Copies the tensors of one safetensors file into the slots they belong to. `listed`: the names the index assigns
/// to this file (nullptr for an unsharded checkpoint).
inline void fill_hf_slots(SafetensorsFile const& f, std::map<std::string, HfSlot>& slots,
                          std::set<std::string> const* listed, bool tied) {
  for (auto const& t : f.tensors()) {
    if (listed != nullptr && listed->count(t.name) == 0)
      throw format_error(concat(f.source(), ": tensor '", t.name, "' is not listed for this file in the index"));
    auto const it = slots.find(t.name);
    if (it == slots.end()) {
      auto const ends_with = [&](std::string const& s) {
        return t.name.size() >= s.size() && t.name.compare(t.name.size() - s.size(), s.size(), s) == 0;
      };
      // Older checkpoints store RoPE's inverse frequencies (recomputed from rope_theta), and some tied ones a copy of
      // the embedding as lm_head (transformers ties it over the stored value): neither carries information.
      if (ends_with("rotary_emb.inv_freq") || (tied && t.name == "lm_head.weight")) continue;
      if (ends_with("self_attn.o_proj.bias"))
        throw format_error(concat(f.source(), ": tensor '", t.name, "': an o_proj bias (attention_bias = true in a "
                                              "Llama config) is not supported"));
      throw format_error(concat(f.source(), ": unexpected tensor '", t.name, "' ", shape_text(t.shape), " ",
                                to_string(t.dtype)));
    }
    HfSlot& s = it->second;
    if (t.dtype != SafetensorsDtype::f32 && t.dtype != SafetensorsDtype::f16 && t.dtype != SafetensorsDtype::bf16)
      throw format_error(concat(f.source(), ": tensor '", t.name, "' has dtype ", to_string(t.dtype),
                                ", expected F32, F16 or BF16"));
    f.require_shape(t.name, s.shape);
    std::vector<float> v = f.to_float(t.name);
    if (s.rope_heads > 0) {
      std::ptrdiff_t const rows = static_cast<std::ptrdiff_t>(s.shape[0]);
      std::ptrdiff_t const cols = s.shape.size() == 2 ? static_cast<std::ptrdiff_t>(s.shape[1]) : 1;
      v = half_split_to_interleaved(v.data(), rows, cols, s.rope_heads);
    }
    std::copy(v.begin(), v.end(), s.allocate());
    s.done = true;
  }
}

}  // namespace detail

/// Parses a Hugging Face config.json of a LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM.
/// Fields: architectures[0]; hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, vocab_size
/// (required); num_key_value_heads (default num_attention_heads), head_dim (default hidden_size /
/// num_attention_heads), max_position_embeddings (transformers' default per architecture), rope_theta (10000),
/// rms_norm_eps (1e-6), tie_word_embeddings (false), hidden_act ("silu"). A null field counts as absent.
/// \param json_text  the file's text (untrusted)
/// \param source     names the file in messages
/// \throws format_error naming `source`, the field and its value when: the text is not a JSON object; the
///         architecture is not one of the three; rope_scaling is set; hidden_act is not "silu"; mlp_bias or Qwen2's
///         use_sliding_window is true; a field has the wrong type; or the sizes fail LlamaConfig::validate (odd
///         head_dim, n_heads not a multiple of n_kv_heads, ...).
inline model::LlamaConfig parse_hf_config(std::string const& json_text, std::string const& source) {
  return detail::parse_hf_config_full(json_text, source).config;
}

/// Reads a Hugging Face Llama-family checkpoint into a LlamaModel (vocabulary left empty: the tokenizer is not read).
/// Tensors: model.embed_tokens.weight; per layer model.layers.{i}.input_layernorm.weight,
/// self_attn.{q,k,v,o}_proj.weight, self_attn.{q,k,v}_proj.bias (Qwen2, or attention_bias),
/// post_attention_layernorm.weight, mlp.{gate,up,down}_proj.weight; model.norm.weight; lm_head.weight unless tied.
/// F32, F16 and BF16 become float; q/k rows (and biases) go from HF's half-split RoPE layout to adjacent pairs.
/// \param path  the checkpoint folder, its config.json, or a .safetensors file next to config.json (then the tensors
///              come from that file alone)
/// \throws format_error naming the file, the field or tensor and the value or shapes when: config.json is missing or
///         refused by parse_hf_config; neither model.safetensors nor model.safetensors.index.json exists; the index
///         is not {"weight_map": {tensor: file}} or names a shard that is not a plain file name in the folder or
///         cannot be read; a safetensors file is invalid (SafetensorsFile::load); a tensor is missing, has another
///         shape, a dtype other than F32/F16/BF16, or is not expected (an o_proj bias among them; rotary_emb.inv_freq
///         is ignored).
inline model::LlamaModel read_hf_llama(std::string const& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path dir = path, single;
  if (fs::is_regular_file(path, ec)) {
    dir = fs::path(path).parent_path();
    if (fs::path(path).extension() == ".safetensors") single = path;
    else if (fs::path(path).filename() != "config.json")
      throw format_error(detail::concat("hf '", path, "': expected a folder, its config.json or a .safetensors file"));
  }
  if (dir.empty()) dir = ".";
  std::string const config_path = (dir / "config.json").string();
  if (!fs::is_regular_file(config_path, ec))
    throw format_error(detail::concat("hf '", dir.string(), "': no config.json in the folder"));
  detail::HfConfig const hc =
      detail::parse_hf_config_full(detail::read_text_file(config_path, "config.json"), "config.json '" + config_path + "'");

  model::LlamaModel m;
  m.source = "hf '" + dir.string() + "'";
  m.config = hc.config;
  auto const& c = m.config;
  std::ptrdiff_t const d = c.d_model, f = c.d_ff, q = c.q_dim(), kv = c.kv_dim(), v = c.vocab_size;
  std::map<std::string, detail::HfSlot> slots;
  // The tensors are allocated when their data is read (HfSlot); m.layers is sized once, so references stay valid.
  auto slot = [&](std::string const& name, auto& tensor, auto extents, std::ptrdiff_t rope_heads = 0) {
    detail::HfSlot s;
    s.shape.assign(extents.begin(), extents.end());
    s.allocate = [&tensor, extents] {
      tensor = std::decay_t<decltype(tensor)>(extents);
      return tensor.data();
    };
    s.rope_heads = rope_heads;
    slots[name] = std::move(s);
  };
  using E1 = std::array<std::ptrdiff_t, 1>;
  using E2 = std::array<std::ptrdiff_t, 2>;
  slot("model.embed_tokens.weight", m.token_embedding, E2{v, d});
  m.layers.resize(static_cast<std::size_t>(c.n_layers));
  for (std::int64_t i = 0; i < c.n_layers; ++i) {
    auto& L = m.layers[static_cast<std::size_t>(i)];
    std::string const p = detail::concat("model.layers.", i, ".");
    slot(p + "input_layernorm.weight", L.attn_norm, E1{d});
    slot(p + "self_attn.q_proj.weight", L.wq, E2{q, d}, c.n_heads);
    slot(p + "self_attn.k_proj.weight", L.wk, E2{kv, d}, c.n_kv_heads);
    slot(p + "self_attn.v_proj.weight", L.wv, E2{kv, d});
    slot(p + "self_attn.o_proj.weight", L.wo, E2{d, q});
    if (hc.qkv_bias) {
      slot(p + "self_attn.q_proj.bias", L.bq, E1{q}, c.n_heads);
      slot(p + "self_attn.k_proj.bias", L.bk, E1{kv}, c.n_kv_heads);
      slot(p + "self_attn.v_proj.bias", L.bv, E1{kv});
    }
    slot(p + "post_attention_layernorm.weight", L.ffn_norm, E1{d});
    slot(p + "mlp.gate_proj.weight", L.ffn.gate, E2{f, d});
    slot(p + "mlp.up_proj.weight", L.ffn.up, E2{f, d});
    slot(p + "mlp.down_proj.weight", L.ffn.down, E2{d, f});
  }
  slot("model.norm.weight", m.final_norm, E1{d});
  if (!c.tied_embeddings) slot("lm_head.weight", m.classifier, E2{v, d});

  std::string const index_path = (dir / "model.safetensors.index.json").string();
  std::string where;  // names the file(s) a missing tensor was looked for in
  if (single.empty() && !fs::exists(dir / "model.safetensors", ec) && fs::exists(index_path, ec)) {
    // Sharded: each shard is loaded once and released before the next (peak memory: the model plus one shard).
    std::string const isrc = "shard index '" + index_path + "'";
    nlohmann::json const index = detail::parse_hf_json(detail::read_text_file(index_path, "shard index"), isrc);
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
      throw format_error(isrc + ": expected an object with a \"weight_map\" object");
    std::map<std::string, std::set<std::string>> shards;  // file -> tensors the index puts there
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        throw format_error(detail::concat(isrc, ": weight_map entry '", it.key(), "' = ", it.value().dump(),
                                          ", expected a file name"));
      std::string const shard = it.value().get<std::string>();
      detail::check_shard_name(shard, isrc);
      shards[shard].insert(it.key());
    }
    for (auto const& [shard, names] : shards)  // every shard exists before any is loaded
      if (!fs::is_regular_file(dir / shard, ec))
        throw format_error(detail::concat(isrc, ": shard '", shard, "' (listed for tensor '", *names.begin(),
                                          "') does not exist"));
    for (auto const& [shard, names] : shards) {
      SafetensorsFile const sf = SafetensorsFile::load((dir / shard).string());
      detail::fill_hf_slots(sf, slots, &names, c.tied_embeddings);
      for (auto const& name : names)
        if (sf.find(name) == nullptr)
          throw format_error(detail::concat(sf.source(), ": no tensor '", name, "', which the index places there"));
    }
    where = isrc;
  } else {
    std::string const file = single.empty() ? (dir / "model.safetensors").string() : single.string();
    if (!fs::is_regular_file(file, ec))
      throw format_error(detail::concat(m.source, ": neither model.safetensors nor model.safetensors.index.json "
                                                  "in the folder"));
    SafetensorsFile const sf = SafetensorsFile::load(file);
    detail::fill_hf_slots(sf, slots, nullptr, c.tied_embeddings);
    where = sf.source();
  }
  for (auto const& [name, s] : slots)
    if (!s.done)
      throw format_error(detail::concat(where, ": tensor '", name, "' ", detail::shape_text(s.shape), " is missing"));
  m.validate();
  return m;
}

namespace detail {

/// One tensor of an HF checkpoint to write: row-major floats of `shape`, RoPE-reordered when rope_heads > 0.
struct HfOutTensor {
  std::string name;
  std::vector<std::int64_t> shape;
  float const* data;
  std::ptrdiff_t rope_heads = 0;
};

inline char const* hf_torch_dtype(SafetensorsDtype dt) {
  return dt == SafetensorsDtype::f16 ? "float16" : dt == SafetensorsDtype::bf16 ? "bfloat16" : "float32";
}

/// Returns config.json of a model (HF's LlamaConfig / MistralConfig / Qwen2Config fields).
inline nlohmann::json hf_config_json(model::LlamaModel const& m, SafetensorsDtype dt, bool qkv_bias) {
  auto const& c = m.config;
  std::string const arch = c.architecture == "mistral" ? "MistralForCausalLM"
                           : c.architecture == "qwen2" ? "Qwen2ForCausalLM"
                                                       : "LlamaForCausalLM";
  nlohmann::json j{
      {"architectures", {arch}},
      {"model_type", c.architecture},
      {"hidden_size", c.d_model},
      {"intermediate_size", c.d_ff},
      {"num_hidden_layers", c.n_layers},
      {"num_attention_heads", c.n_heads},
      {"num_key_value_heads", c.n_kv_heads},
      {"head_dim", c.head_dim},
      {"hidden_act", "silu"},
      {"max_position_embeddings", c.context_length},
      {"rms_norm_eps", c.rms_norm_eps},
      {"rope_theta", c.rope_theta},
      {"rope_scaling", nullptr},
      {"vocab_size", c.vocab_size},
      {"tie_word_embeddings", c.tied_embeddings},
      {"attention_dropout", 0.0},
      {"initializer_range", 0.02},
      {"use_cache", true},
      {"torch_dtype", hf_torch_dtype(dt)},
  };
  if (c.architecture == "llama") {
    j["attention_bias"] = qkv_bias;
    j["mlp_bias"] = false;
  } else if (c.architecture == "mistral") {
    j["sliding_window"] = nullptr;
  } else {
    j["use_sliding_window"] = false;
    j["sliding_window"] = nullptr;
  }
  if (m.vocab && m.vocab->bos_id >= 0) j["bos_token_id"] = m.vocab->bos_id;
  if (m.vocab && m.vocab->eos_id >= 0) j["eos_token_id"] = m.vocab->eos_id;
  return j;
}

inline void write_text_file(std::string const& path, std::string const& text, char const* what) {
  write_file_atomically(path, reinterpret_cast<unsigned char const*>(text.data()), text.size(), what);
}

}  // namespace detail

/// Writes a LlamaModel as a Hugging Face checkpoint in `dir` (created): config.json and model.safetensors, or
/// shards model-0000i-of-0000n.safetensors with model.safetensors.index.json (HfWriteOptions::max_shard_bytes).
/// Tensor names as read_hf_llama reads them; q/k rows (and biases) in HF's half-split RoPE layout. A Qwen2 model
/// without biases gets zero q/k/v biases (Qwen2 always has them). Every file goes through a temporary renamed into
/// place; config.json is written last.
/// \param m  a model that passes validate(), without MoE layers (export_mixtral writes those)
/// \throws value_error when the model has a MoE layer, q/k/v biases on a non-Qwen2 architecture (HF Llama's
///         attention_bias would add an o_proj bias), an unknown architecture, or a dtype other than F32/F16/BF16;
///         format_error when m fails validate() or a file cannot be written.
inline void write_hf_llama(std::string const& dir, model::LlamaModel const& m, HfWriteOptions const& o = {}) {
  namespace fs = std::filesystem;
  SafetensorsDtype const dt = o.dtype;
  if (dt != SafetensorsDtype::f32 && dt != SafetensorsDtype::f16 && dt != SafetensorsDtype::bf16)
    throw value_error(detail::concat("write_hf_llama: dtype ", to_string(dt), " is not F32, F16 or BF16"));
  if (m.has_moe())
    throw value_error("write_hf_llama: the model has MoE layers; write them with export_mixtral");
  auto const& c = m.config;
  if (c.architecture != "llama" && c.architecture != "mistral" && c.architecture != "qwen2")
    throw value_error(detail::concat("write_hf_llama: architecture '", c.architecture,
                                     "' is not llama, mistral or qwen2"));
  m.validate();
  bool const qwen2 = c.architecture == "qwen2";
  bool has_bias = false;
  for (auto const& L : m.layers) has_bias = has_bias || L.bq.size() != 0;
  if (has_bias && !qwen2)
    throw value_error(detail::concat("write_hf_llama: architecture '", c.architecture,
                                     "' with q/k/v biases has no HF form (Llama's attention_bias adds an o_proj bias);"
                                     " set config.architecture = \"qwen2\""));

  std::int64_t const q = c.q_dim(), kv = c.kv_dim();
  std::vector<float> const zeros(static_cast<std::size_t>(std::max(q, kv)), 0.0f);
  std::vector<detail::HfOutTensor> ts;
  auto add = [&](std::string name, auto const& t, std::ptrdiff_t rope_heads = 0) {
    std::vector<std::int64_t> shape(t.extents().begin(), t.extents().end());
    ts.push_back({std::move(name), std::move(shape), t.data(), rope_heads});
  };
  add("model.embed_tokens.weight", m.token_embedding);
  for (std::size_t i = 0; i < m.layers.size(); ++i) {
    auto const& L = m.layers[i];
    std::string const p = detail::concat("model.layers.", i, ".");
    add(p + "input_layernorm.weight", L.attn_norm);
    add(p + "self_attn.q_proj.weight", L.wq, c.n_heads);
    add(p + "self_attn.k_proj.weight", L.wk, c.n_kv_heads);
    add(p + "self_attn.v_proj.weight", L.wv);
    add(p + "self_attn.o_proj.weight", L.wo);
    if (L.bq.size() != 0) {
      add(p + "self_attn.q_proj.bias", L.bq, c.n_heads);
      add(p + "self_attn.k_proj.bias", L.bk, c.n_kv_heads);
      add(p + "self_attn.v_proj.bias", L.bv);
    } else if (qwen2) {
      ts.push_back({p + "self_attn.q_proj.bias", {q}, zeros.data(), 0});
      ts.push_back({p + "self_attn.k_proj.bias", {kv}, zeros.data(), 0});
      ts.push_back({p + "self_attn.v_proj.bias", {kv}, zeros.data(), 0});
    }
    add(p + "post_attention_layernorm.weight", L.ffn_norm);
    add(p + "mlp.gate_proj.weight", L.ffn.gate);
    add(p + "mlp.up_proj.weight", L.ffn.up);
    add(p + "mlp.down_proj.weight", L.ffn.down);
  }
  add("model.norm.weight", m.final_norm);
  if (!c.tied_embeddings) add("lm_head.weight", m.classifier);

  // Greedy packing in tensor order, as transformers' shard_checkpoint does.
  auto bytes_of = [&](detail::HfOutTensor const& t) {
    std::uint64_t n = element_bytes(dt);
    for (auto const e : t.shape) n *= static_cast<std::uint64_t>(e);
    return n;
  };
  std::vector<std::vector<std::size_t>> shards(1);
  std::uint64_t in_shard = 0, total = 0;
  for (std::size_t i = 0; i < ts.size(); ++i) {
    std::uint64_t const b = bytes_of(ts[i]);
    if (o.max_shard_bytes != 0 && !shards.back().empty() && in_shard + b > o.max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(i);
    in_shard += b;
    total += b;
  }

  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw format_error(detail::concat("write_hf_llama: cannot create the folder '", dir, "': ", ec.message()));
  // A checkpoint written over another of the other kind must not leave the old weights where a reader looks first.
  fs::remove(fs::path(dir) / (o.max_shard_bytes != 0 ? "model.safetensors" : "model.safetensors.index.json"), ec);
  nlohmann::json weight_map = nlohmann::json::object();
  for (std::size_t s = 0; s < shards.size(); ++s) {
    std::string name = "model.safetensors";
    if (o.max_shard_bytes != 0) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
      name = buf;
    }
    SafetensorsWriter w;
    w.set_metadata("format", "pt");  // transformers expects "pt" for PyTorch checkpoints
    for (std::size_t i : shards[s]) {
      auto const& t = ts[i];
      if (t.rope_heads > 0) {
        std::ptrdiff_t const rows = static_cast<std::ptrdiff_t>(t.shape[0]);
        std::ptrdiff_t const cols = t.shape.size() == 2 ? static_cast<std::ptrdiff_t>(t.shape[1]) : 1;
        std::vector<float> const r = detail::reorder_rope_rows(t.data, rows, cols, t.rope_heads, true);
        w.add(t.name, dt, t.shape, r.data());
      } else {
        w.add(t.name, dt, t.shape, t.data);
      }
      weight_map[t.name] = name;
    }
    w.save((fs::path(dir) / name).string());
  }
  if (o.max_shard_bytes != 0) {
    nlohmann::json const index{{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    detail::write_text_file((fs::path(dir) / "model.safetensors.index.json").string(), index.dump(2) + "\n",
                            "shard index");
  }
  detail::write_text_file((fs::path(dir) / "config.json").string(),
                          detail::hf_config_json(m, dt, has_bias).dump(2) + "\n", "config.json");
}

}  // namespace io
}  // namespace factorllm
