// SPDX-License-Identifier: Apache-2.0
// One entry point for every model file the readers accept: the kind is recognized from the path and the file's
// first bytes (docs/formats.md "Which reader runs"), then the matching reader builds the one LlamaModel type; a
// factorized-model file is applied to a dense base model.
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../model/llama_model.hpp"
#include "factorized_checkpoint.hpp"
#include "gguf.hpp"
#include "gguf_llama.hpp"
#include "gguf_llama_export.hpp"
#include "hf_llama.hpp"
#include "llama2c.hpp"
#include "safetensors.hpp"

namespace factorllm {
namespace io {

/// The kinds of model file.
enum class ModelFileKind { llama2c, gguf, hf, factorized };

inline char const* to_string(ModelFileKind k) noexcept {
  switch (k) {
    case ModelFileKind::llama2c: return "llama2.c checkpoint";
    case ModelFileKind::gguf: return "GGUF";
    case ModelFileKind::hf: return "Hugging Face checkpoint";
    case ModelFileKind::factorized: return "factorized MoE layers (safetensors)";
  }
  return "?";
}

/// Recognizes a model path: a folder, a config.json or a .safetensors file of a Hugging Face checkpoint (hf), a
/// safetensors file whose metadata says format "factorllm.moe" (factorized), a file starting with "GGUF" (gguf),
/// anything else a llama2.c checkpoint (its reader validates the header against the file size).
/// \throws format_error when the path does not exist or cannot be read.
inline ModelFileKind detect_model_file(std::string const& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::exists(path, ec)) throw format_error(detail::concat("'", path, "' does not exist"));
  if (fs::is_directory(path, ec)) return ModelFileKind::hf;
  std::ifstream in(path, std::ios::binary);
  if (!in) throw format_error(detail::concat("cannot open '", path, "'"));
  char magic[4] = {};
  in.read(magic, 4);
  if (in.gcount() == 4 && std::memcmp(magic, "GGUF", 4) == 0) return ModelFileKind::gguf;
  std::string const ext = fs::path(path).extension().string();
  if (ext == ".json") return ModelFileKind::hf;
  if (ext == ".safetensors") {
    SafetensorsFile const f = SafetensorsFile::load(path);
    auto const it = f.metadata().find("format");
    return it != f.metadata().end() && it->second == kFactorizedFormat ? ModelFileKind::factorized : ModelFileKind::hf;
  }
  return ModelFileKind::llama2c;
}

/// Loads any model file the readers accept (see detect_model_file) as a LlamaModel. A llama2.c checkpoint has no
/// vocabulary of its own: `tokenizer` names its llama2.c tokenizer file (optional; a GGUF export needs one).
/// \throws format_error naming the file for an unreadable or invalid file, or for a factorized file (it holds only
///         the MoE layers: use apply_factorized with its dense base model).
inline model::LlamaModel load_model(std::string const& path, std::string const& tokenizer = "") {
  ModelFileKind const kind = detect_model_file(path);
  model::LlamaModel m;
  switch (kind) {
    case ModelFileKind::hf: m = read_hf_llama(path); break;
    case ModelFileKind::gguf: m = read_gguf_llama(path); break;
    case ModelFileKind::llama2c: {
      Llama2cCheckpoint const ck = Llama2cCheckpoint::load(path);
      m = model_from_llama2c(ck, "llama2c '" + path + "'");
      break;
    }
    case ModelFileKind::factorized:
      throw format_error(detail::concat("'", path, "' holds factorized MoE layers only, not a whole model; give its "
                                        "dense base model and this file as the MoE layers"));
  }
  if (!tokenizer.empty()) {
    if (kind != ModelFileKind::llama2c)
      throw format_error(detail::concat("a tokenizer file was given for ", to_string(kind), " '", path,
                                        "', which carries its own vocabulary (or none); it applies to llama2.c "
                                        "checkpoints"));
    m.vocab = llama_vocab_from_llama2c(Llama2cTokenizer::load(tokenizer, static_cast<int>(m.config.vocab_size)));
  }
  return m;
}

/// Returns `base` with the MoE layers of a factorized-model file (io/factorized_checkpoint.hpp) in place of its
/// dense FFNs (one per decoder layer; the dense weights are released).
/// \throws format_error as load_factorized, or when the file's layer count, d_model or d_ff (which may exceed the
///         base's only by zero-neuron padding) do not fit the base model.
inline model::LlamaModel apply_factorized(model::LlamaModel base, std::string const& path) {
  auto layers = load_factorized<DefaultCpu, float>(path);
  if (static_cast<std::int64_t>(layers.size()) != base.config.n_layers)
    throw format_error(detail::concat("factorized '", path, "' has ", layers.size(), " layers, the base model ",
                                      base.source, " has ", base.config.n_layers));
  for (std::size_t l = 0; l < layers.size(); ++l) {
    if (layers[l].d_model() != base.config.d_model || layers[l].experts().d_ff() < base.config.d_ff)
      throw format_error(detail::concat("factorized '", path, "' layer ", l, " has d_model ", layers[l].d_model(),
                                        " and d_ff ", layers[l].experts().d_ff(), "; the base model ", base.source,
                                        " has d_model ", base.config.d_model, " and d_ff ", base.config.d_ff));
    base.layers[l].moe.emplace(std::move(layers[l]));
    base.layers[l].ffn = ffn::DenseFfn<float>{};
  }
  base.source += " + factorized '" + path + "'";
  return base;
}

}  // namespace io
}  // namespace factorllm
